"""Bit-level primitives on IEEE-754 tensors: fp32, bf16 and fp16.

Every operation reinterprets the selected elements as signed integers of the same width:
``int32`` for fp32, ``int16`` for bf16 and fp16. It edits those raw bits and writes them back
in place, so a flip acts on the tensor's own format and never on a quantized stand-in.
Bit 0 is the mantissa LSB and bit ``bits - 1`` is the sign.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from guard.errors import ConfigError, unknown_choice

logger = logging.getLogger(__name__)

FIELDS = ("sign", "exponent", "exponent_msb", "mantissa")


@dataclass(frozen=True)
class FloatFormat:
    """Layout of one IEEE-754 binary format: widths and the bit ranges of its fields."""

    name: str
    dtype: torch.dtype
    int_dtype: torch.dtype
    bits: int
    exponent_bits: int
    mantissa_bits: int

    @property
    def sign_bit(self) -> int:
        return self.bits - 1

    @property
    def exponent_range(self) -> tuple[int, int]:
        """First and last bit index (inclusive) of the exponent field."""
        return self.mantissa_bits, self.bits - 2

    @property
    def mantissa_range(self) -> tuple[int, int]:
        """First and last bit index (inclusive) of the mantissa (fraction) field."""
        return 0, self.mantissa_bits - 1

    @property
    def exponent_msb(self) -> int:
        return self.bits - 2

    def field_bits(self, field: str) -> list[int]:
        """Return the bit indices of ``field`` (sign, exponent, exponent_msb, mantissa), ascending."""
        if field == "sign":
            return [self.sign_bit]
        if field == "exponent":
            first, last = self.exponent_range
            return list(range(first, last + 1))
        if field == "exponent_msb":
            return [self.exponent_msb]
        if field == "mantissa":
            first, last = self.mantissa_range
            return list(range(first, last + 1))
        raise ConfigError(unknown_choice("field", field, FIELDS))

    def check_bits(self, bits: Sequence[int], field: str = "bit") -> list[int]:
        """Return ``bits`` as a list of ints, raising ConfigError for an index outside the width."""
        checked = []
        for bit in bits:
            if isinstance(bit, bool) or not isinstance(bit, int):
                raise ConfigError(f"{field}={bit!r} is not valid: a bit index must be an integer.")
            if not 0 <= bit < self.bits:
                raise ConfigError(
                    f"{field}={bit} is out of range for {self.name}: valid bit indices are "
                    f"0..{self.bits - 1} (0 = mantissa LSB, {self.sign_bit} = sign)."
                )
            checked.append(bit)
        return checked


FORMATS: dict[torch.dtype, FloatFormat] = {
    torch.float32: FloatFormat("float32", torch.float32, torch.int32, 32, 8, 23),
    torch.bfloat16: FloatFormat("bfloat16", torch.bfloat16, torch.int16, 16, 8, 7),
    torch.float16: FloatFormat("float16", torch.float16, torch.int16, 16, 5, 10),
}


def format_of(dtype: torch.dtype) -> FloatFormat:
    """Return the :class:`FloatFormat` of ``dtype``, raising ConfigError for formats other than fp32/bf16/fp16."""
    try:
        return FORMATS[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype={dtype} is not supported for bit-level faults. "
            "Valid choices: torch.float32, torch.bfloat16, torch.float16."
        ) from None


def field_bits(dtype: torch.dtype, field: str) -> list[int]:
    """Return the bit indices of ``field`` in the format of ``dtype``."""
    return format_of(dtype).field_bits(field)


class BitChange(NamedTuple):
    """Values of the edited elements before and after an edit, 1-D in the tensor's dtype."""

    before: torch.Tensor
    after: torch.Tensor


def _bit_mask(fmt: FloatFormat, bits: Sequence[int]) -> int:
    """Return the mask with ``bits`` set, as a signed integer of the format's width."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    # The sign bit makes the mask negative in two's complement.
    if mask >= 1 << (fmt.bits - 1):
        mask -= 1 << fmt.bits
    return mask


def _locate(tensor: torch.Tensor, flat_indices: Sequence[int] | torch.Tensor):
    """Turn flat (row-major) element indices into an index tuple valid for any strides."""
    if not torch.is_floating_point(tensor):
        raise ConfigError(f"tensor dtype {tensor.dtype} is not a floating-point format.")
    index = torch.as_tensor(flat_indices, dtype=torch.long).reshape(-1)
    numel = tensor.numel()
    if index.numel() == 0:
        raise ConfigError("flat_indices is empty: give at least one element index.")
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= numel:
        bad = low if low < 0 else high
        raise ConfigError(
            f"element index {bad} is out of range for a tensor of shape {tuple(tensor.shape)} "
            f"({numel} elements): valid indices are 0..{numel - 1}."
        )
    index = index.to(tensor.device)
    if tensor.dim() == 0:
        return (), index
    return torch.unravel_index(index, tuple(tensor.shape)), index


def _edit(tensor: torch.Tensor, flat_indices, update) -> BitChange:
    fmt = format_of(tensor.dtype)
    where, _ = _locate(tensor, flat_indices)
    with torch.no_grad():
        if tensor.dim() == 0:
            before = tensor.detach().reshape(1).clone()
        else:
            before = tensor[where].detach().clone()
        raw = before.view(fmt.int_dtype)
        after = update(fmt, raw).view(fmt.dtype)
        if tensor.dim() == 0:
            tensor.copy_(after.reshape(()))
        else:
            tensor[where] = after
    return BitChange(before, after.clone())


def flip_bits(
    tensor: torch.Tensor, flat_indices: Sequence[int] | torch.Tensor, bits: Sequence[int]
) -> BitChange:
    """Flip ``bits`` of each element at ``flat_indices`` (row-major) in place."""
    fmt = format_of(tensor.dtype)
    bits = fmt.check_bits(list(bits))
    mask = _bit_mask(fmt, bits)

    def update(fmt: FloatFormat, raw: torch.Tensor) -> torch.Tensor:
        return torch.bitwise_xor(raw, torch.tensor(mask, dtype=fmt.int_dtype, device=raw.device))

    return _edit(tensor, flat_indices, update)


def stuck_at(
    tensor: torch.Tensor,
    flat_indices: Sequence[int] | torch.Tensor,
    bits: Sequence[int],
    value: int,
) -> BitChange:
    """Force ``bits`` of each element at ``flat_indices`` to ``value`` (0 or 1) in place."""
    if isinstance(value, bool) or value not in (0, 1):
        raise ConfigError(f"stuck_at={value!r} is not valid. Valid choices: 0, 1.")
    fmt = format_of(tensor.dtype)
    bits = fmt.check_bits(list(bits))
    mask = _bit_mask(fmt, bits)

    def update(fmt: FloatFormat, raw: torch.Tensor) -> torch.Tensor:
        mask_tensor = torch.tensor(mask, dtype=fmt.int_dtype, device=raw.device)
        if value == 1:
            return torch.bitwise_or(raw, mask_tensor)
        return torch.bitwise_and(raw, torch.bitwise_not(mask_tensor))

    return _edit(tensor, flat_indices, update)


def parse_value(value: float | int | str) -> float:
    """Return ``value`` as a float, accepting ``"nan"``, ``"inf"``, ``"-inf"`` and numbers."""
    if isinstance(value, bool):
        raise ConfigError(f"value={value!r} is not valid: give a number, 'nan', 'inf' or '-inf'.")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"value={value!r} is not valid: give a number, 'nan', 'inf' or '-inf'.")


def set_value(
    tensor: torch.Tensor, flat_indices: Sequence[int] | torch.Tensor, value: float | str
) -> BitChange:
    """Write ``value`` (a number, NaN or Inf, rounded to the tensor's format) at ``flat_indices``."""
    number = parse_value(value)
    fmt = format_of(tensor.dtype)
    replacement = torch.tensor(number, dtype=fmt.dtype).view(fmt.int_dtype)

    def update(fmt: FloatFormat, raw: torch.Tensor) -> torch.Tensor:
        return torch.full_like(raw, int(replacement))

    return _edit(tensor, flat_indices, update)


def to_json_float(value: float) -> float | str:
    """Return ``value`` for strict JSON: non-finite values become ``"nan"``, ``"inf"``, ``"-inf"``."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
