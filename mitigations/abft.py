"""ABFT: algorithm-based fault tolerance with checksums on selected linear layers.

For a linear layer ``y = x @ W.T + b`` (``W`` is ``[out, in]``) the sum of each output row
obeys ``sum_j y_j = x @ w_c + sum_j b_j`` with the column checksum ``w_c = W.sum(0)``
(``[in]``), precomputed once. A forward hook checks this identity for every output row
(one row per batch row and position). The check runs in float32 (float64 for float64
models); its own rounding error is bounded and added to the tolerance, so the check itself
cannot raise a false alarm. A row whose difference exceeds the tolerance, or that contains
NaN/Inf, is a detection and is corrected by recomputing the layer.

Tolerance. The computed ``y_j`` differs from the exact value by at most
``gamma_n * (|x| @ |W_j|) + u_out * |y_j|``. Here ``gamma_n = n u / (1 - n u)``, ``n`` is the
reduction length, ``u`` the unit roundoff of the accumulation and ``u_out`` that of the
output format, because the result is rounded once on store. Summed over ``j`` this
gives ``gamma_n * (|x| @ |W|_c) + u_out * sum_j |y_j|`` with ``|W|_c = |W|.sum(0)``, a
worst-case bound, scaled by ``tolerance_scale``. ``bound="probabilistic"`` replaces
``gamma_n`` with ``sqrt(n) u``, the usual growth of independent rounding errors. That bound is
tighter, so smaller corruptions are caught, but it is not a guarantee against false alarms.

Accumulation is assumed in float32 or wider, which holds for the CPU kernels of PyTorch 2.13
(zero false alarms on SmolLM2-135M in fp32, bf16 and fp16, in this package's tests).
NOTE: GPU GEMMs may reduce fp16 in lower precision (PyTorch's
``allow_fp16_reduced_precision_reduction``); ``accumulation="format"`` assumes accumulation in
the tensor's own format for such cases.

Decode steps. A decode step has one position per row, so a per-layer check is a few tiny
tensor ops whose dispatch costs more than their arithmetic. With ``decode_check="per_pass"``
each layer only stores its check sums (computed by the fused kernel of
:mod:`mitigations.checksum_kernel`) or copies its input and output (elsewhere) into a stack
for its group of equally shaped layers, and one comparison per group runs when the step's
forward ends. A mismatch rolls the KV cache back to where the step began and recomputes the
step as a redundant pass. That pass checks its layers one by one, and its fault-free rows
come out bit-identical. ``"per_layer"`` checks (and corrects) every layer right after it
runs. The prompt pass is always checked per layer.

Weights in memory. Exact int64 sums of the weights' bit patterns per row and per column
locate a corrupted element (its row and column sums differ by the same amount) and restore
it byte for byte. Selected weights are scrubbed at the start of every protected ``generate``
and whenever recomputation does not clear a mismatch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from guard.errors import ConfigError, unknown_choice
from guard.report import Detection
from guard.stages import ForwardInfo, cache_key_of
from mitigations import checksum_kernel
from mitigations.checksum_kernel import as_bits
from mitigations.base import InstallHandle, Mitigation, MitigationConfig, register
from mitigations.selection import (
    LinearSite,
    normalize_layers,
    normalize_roles,
    normalize_stages,
    select_linear,
)

logger = logging.getLogger(__name__)

CORRECTIONS = ("recompute", "locate", "none")
SCRUB_MODES = ("generate", "never")
ACCUMULATIONS = ("float32", "format")
BOUNDS = ("worst_case", "probabilistic")
DECODE_CHECKS = ("per_pass", "per_layer")
_NO_ROWS = torch.empty(0, dtype=torch.long)
_NO_DIFFERENCES = torch.empty(0, dtype=torch.float64)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Return ``u = eps / 2`` of a floating-point format."""
    return torch.finfo(dtype).eps / 2


@dataclass
class ABFTConfig(MitigationConfig):
    """Layer selection and mismatch handling of ABFT.

    ``roles``: role names (``o_proj``, ``down_proj``, ``q_proj``, ``lm_head``...) or
    ``"all_linear"``. ``layers``: ``"all"`` or block indices (layers outside the blocks, such as
    ``lm_head``, match only ``"all"``). ``modules``: optional globs on module names.
    ``stages``: stages whose positions are checked. ``correction="recompute"`` reruns the
    layer and takes the mismatching rows, bit-identical to a fault-free run.
    ``"locate"`` finds a single corrupted element per row with a second, index-weighted
    checksum and rebuilds it from the checksum, right to within rounding, and falls back to
    recomputation when that fails. ``"none"`` only reports. ``scrub``: when to verify the
    weights' bit checksums. ``bound``, ``tolerance_scale`` and ``accumulation`` set the
    rounding tolerance, as the module documentation describes. ``decode_check``:
    ``"per_pass"`` verifies all checked layers of a decode step together when the step ends
    and recomputes the step on a mismatch; ``"per_layer"`` verifies each layer as it runs.
    ``fused_check``: compute the check's sums on CPU with one compiled kernel that reads each
    activation once (needs numba, float32 or float64 activations). False, or where the kernel
    does not apply, uses PyTorch operators with the same tolerance.
    """

    roles: Any = ("o_proj", "down_proj")
    layers: Any = "all"
    modules: Any = ()
    stages: Any = "all"
    correction: str = "recompute"
    scrub: str = "generate"
    tolerance_scale: float = 2.0
    accumulation: str = "float32"
    bound: str = "worst_case"
    decode_check: str = "per_pass"
    fused_check: bool = True

    def __post_init__(self) -> None:
        self.roles = normalize_roles("abft.roles", self.roles)
        self.layers = normalize_layers("abft.layers", self.layers)
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.modules = tuple(self.modules)
        self.stages = normalize_stages("abft.stages", self.stages)
        if self.correction not in CORRECTIONS:
            raise ConfigError(unknown_choice("abft.correction", self.correction, CORRECTIONS))
        if self.scrub not in SCRUB_MODES:
            raise ConfigError(unknown_choice("abft.scrub", self.scrub, SCRUB_MODES))
        if self.accumulation not in ACCUMULATIONS:
            raise ConfigError(unknown_choice("abft.accumulation", self.accumulation, ACCUMULATIONS))
        if self.bound not in BOUNDS:
            raise ConfigError(unknown_choice("abft.bound", self.bound, BOUNDS))
        if self.decode_check not in DECODE_CHECKS:
            raise ConfigError(unknown_choice("abft.decode_check", self.decode_check, DECODE_CHECKS))
        if not isinstance(self.fused_check, bool):
            raise ConfigError(f"abft.fused_check={self.fused_check!r} must be True or False.")
        scale = self.tolerance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1.0:
            raise ConfigError(
                f"abft.tolerance_scale={scale!r} is not valid; use a number >= 1 "
                "(1 is the bare rounding bound, larger values loosen it)."
            )


class _CheckedLayer:
    """Precomputed checksums of one linear layer and its check hook."""

    def __init__(self, site: LinearSite, config: ABFTConfig, mitigation: "ABFT"):
        self.site = site
        self.config = config
        self.mitigation = mitigation
        weight = site.weight.detach()
        if not weight.is_floating_point():
            raise ConfigError(
                f"abft: {site.name} has a {weight.dtype} weight; ABFT checks floating-point "
                "layers only, so leave quantized layers out of the selection."
            )
        # Work on W as [out, in] whatever the storage layout (Conv1D stores [in, out]).
        w64 = weight.double().t() if site.transposed else weight.double()
        self.out_features, self.in_features = w64.shape
        self.column_checksum = w64.sum(0)  # [in]
        self.abs_column_checksum = w64.abs().sum(0)  # [in]
        self.weighted_checksum = None
        if config.correction == "locate":
            index = torch.arange(1, w64.shape[0] + 1, dtype=torch.float64, device=w64.device)
            self.weighted_checksum = index @ w64  # [in]: sum_j (j+1) W_j
        bias = site.bias
        self.bias_sum = float(bias.detach().double().sum()) if bias is not None else 0.0
        self.bias_abs_sum = float(bias.detach().double().abs().sum()) if bias is not None else 0.0
        self.bias_weighted = 0.0
        if bias is not None and config.correction == "locate":
            index = torch.arange(1, bias.numel() + 1, dtype=torch.float64, device=bias.device)
            self.bias_weighted = float(index @ bias.detach().double())
        del w64

        self.weight_dtype = weight.dtype
        self.row_bits, self.column_bits = _bit_sums(weight)
        self.bias_copy = bias.detach().clone() if bias is not None else None
        self.checks = 0
        # The group's kernel stack and this layer's block in it, while the decode steps use one.
        self.term_stack: _TermStack | None = None
        self.block_address = 0
        self._factors: dict[torch.dtype, tuple[float, float]] = {}
        self._checksums: dict[tuple[torch.dtype, torch.dtype], _Checksums] = {}

    # ----- computation check ------------------------------------------------------------

    def tolerance_factors(self, dtype: torch.dtype) -> tuple[float, float]:
        """Return ``(gamma, u_out)`` for outputs of ``dtype``, both scaled by ``tolerance_scale``."""
        factors = self._factors.get(dtype)
        if factors is None:
            u_out = unit_roundoff(dtype)
            u_acc = u_out
            if self.config.accumulation == "float32":
                u_acc = min(unit_roundoff(torch.float32), u_out)
            gamma = _gamma(self.in_features + 1, u_acc)  # + 1 for the bias addition
            if self.config.bound == "probabilistic":
                gamma = math.sqrt(self.in_features + 1) * u_acc
            scale = self.config.tolerance_scale
            factors = self._factors[dtype] = (scale * gamma, scale * u_out)
        return factors

    def checksums(self, check_dtype: torch.dtype, out_dtype: torch.dtype) -> "_Checksums":
        """Return this layer's check operands for inputs read as ``check_dtype``, outputs of ``out_dtype``."""
        key = (check_dtype, out_dtype)
        sums = self._checksums.get(key)
        if sums is None:
            gamma, u_out = self.tolerance_factors(out_dtype)
            u = unit_roundoff(check_dtype)
            # The check's own rounding, added so the check cannot raise a false alarm itself.
            # dot_error: the checksum rounded to the check format, then the dot product over
            # `in`. sum_error: the output sum over `out`. slack: the rounding of the tolerance
            # terms and of the final subtraction.
            dot_error = _gamma(self.in_features, u) + u
            sum_error = _gamma(self.out_features, u)
            slack = 1 + 4 * (dot_error + sum_error)
            bias, bias_tolerance = None, None
            if self.bias_sum:
                bias = torch.tensor([[self.bias_sum]], dtype=check_dtype)
            if self.bias_abs_sum:
                bias_tolerance = torch.tensor([[(gamma + sum_error) * self.bias_abs_sum * slack]], dtype=check_dtype)
            sums = self._checksums[key] = _Checksums(
                column=self.column_checksum.to(check_dtype).unsqueeze(0),
                abs_column=self.abs_column_checksum.to(check_dtype).unsqueeze(0),
                bias=bias,
                bias_tolerance=bias_tolerance,
                magnitude_factor=(gamma + dot_error + sum_error) * slack,
                output_factor=(u_out + sum_error) * slack,
            )
        return sums

    def mismatching_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (indices of rows failing the check, their checksum differences)."""
        check_dtype = _check_dtype(x.dtype)
        sums = self.checksums(check_dtype, y.dtype)
        x3 = x.reshape(1, -1, x.shape[-1]).to(check_dtype)  # [1, rows, in]
        y3 = y.reshape(1, -1, y.shape[-1])  # [1, rows, out]
        if _kernel_applies(self.config, x3, y3, sums):
            result = _fused_check(x3, y3, sums)
        else:
            result = _compare(self._operator_terms(x, x3, y3, sums), sums)
        if result is None or bool(result[0].all()):
            return _NO_ROWS, _NO_DIFFERENCES
        passed, difference = result
        bad = ~passed[0]
        return torch.nonzero(bad, as_tuple=False).flatten(), difference[0][bad]

    def _operator_terms(self, x, x3, y3, sums) -> tuple[torch.Tensor, ...]:
        """Return the check terms of one call computed with PyTorch operators."""
        if x3.dtype != x.dtype:
            # A converted copy: |x| may overwrite it once the dot product has read it.
            input_terms = _input_terms(x3, sums, abs_x=x3)
        else:
            abs_x = self.mitigation._abs_input(x, x3)
            input_terms = _row_dot(x3, sums.column), _row_dot(abs_x, sums.abs_column)
        # |y| goes to a reused buffer. A new prompt-sized tensor per layer would be allocated and
        # faulted in page by page on every call.
        abs_y = self.mitigation._scratch.view("abs_y", y3.shape, y3.dtype, y3.device)
        return (*input_terms, *_output_terms(y3, sums.column.dtype, abs_y))

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        mitigation = self.mitigation
        pending = mitigation._collecting
        if pending is not None and args and isinstance(output, torch.Tensor):
            # A decode step: verified with the step's other layers when the step's forward ends.
            # This runs between weights that evict Python's objects from cache, and each object
            # touched costs a memory read, so the common case reads the layer's own kernel block.
            x = args[0]
            stack = self.term_stack
            if stack is None or not (stack.fits(x, output) and stack.kernel(x.data_ptr(), output.data_ptr(), self.block_address)):
                mitigation._keep(pending, self, x, output)
            return None
        context = mitigation._context
        if context is None or not args or not torch.is_tensor(output):
            return None
        info = context.forward
        if info is not None:
            stages = self.config.stages
            if info.index > 0 and "decode" not in stages:
                return None
            if info.index == 0 and not stages & {"prefill", "first_token"}:
                return None
        x = args[0]
        # Plain timing instead of context.timed(): this runs on every checked call.
        start = time.perf_counter()
        try:
            with torch.no_grad():
                self.checks += 1
                rows, differences = self.mismatching_rows(x, output)
                if rows.numel() == 0:
                    return None
                rows, differences = self._select_stages(rows, differences, x, info)
                if rows.numel() == 0:
                    return None
                return self._handle_mismatch(x, output, rows, differences, info)
        finally:
            context.add_time_since(start)

    def _select_stages(self, rows, differences, x, info):
        if info is None or x.dim() != 3 or len(self.config.stages) == 3:
            return rows, differences
        seq_len = x.shape[1]
        keep = torch.tensor(
            [str(info.stage_of(int(r) % seq_len)) in self.config.stages for r in rows.tolist()],
            dtype=torch.bool,
        )
        return rows[keep], differences[keep]

    def _handle_mismatch(self, x, output, rows, differences, info) -> torch.Tensor | None:
        correction = self.config.correction
        out_features = output.shape[-1]
        corrected = output.detach().clone()
        flat = corrected.view(-1, out_features)
        action = "none"
        remaining = rows
        if correction == "locate":
            remaining = self._locate_and_fix(x, flat, rows)
            action = "corrected"
        if correction != "none" and remaining.numel():
            recomputed = self._recompute(x).reshape(-1, out_features)
            flat[remaining] = recomputed[remaining]
            still_bad, _ = self.mismatching_rows(x.reshape(-1, x.shape[-1])[remaining], flat[remaining])
            action = "recomputed"
            if still_bad.numel():
                # The layer reproduces the mismatch, so its parameters changed in memory.
                restored = self.scrub(info)
                recomputed = self._recompute(x).reshape(-1, out_features)
                flat[remaining] = recomputed[remaining]
                still_bad, _ = self.mismatching_rows(
                    x.reshape(-1, x.shape[-1])[remaining], flat[remaining]
                )
                action = "restored" if restored and not still_bad.numel() else "none"
        self._record(rows, differences, x.shape, info, action)
        return corrected if correction != "none" else None

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        # The whole layer is recomputed (not just the failing rows) so fault-free rows come out
        # bit-identical to the original product, whose blocking depends on the batch shape.
        weight = self.site.weight
        if self.site.transposed:
            # Conv1D computes addmm(bias, x, W) with W [in, out].
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ weight if self.site.bias is None else torch.addmm(self.site.bias, x2, weight)
            return out.reshape(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, self.site.bias)

    def _locate_and_fix(self, x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Fix one corrupted element per failing row in place; return the rows that still fail.

        The corrupted column is ``(weighted difference) / (difference) - 1``. Its value is
        rebuilt as the checksum reference minus the other elements, which is right to within
        rounding but not necessarily bit-identical to a fault-free product.
        """
        x64 = x.reshape(-1, x.shape[-1])[rows].double()
        y64 = flat[rows].double()
        reference = x64 @ self.column_checksum + self.bias_sum
        weighted_reference = x64 @ self.weighted_checksum + self.bias_weighted
        index = torch.arange(1, flat.shape[-1] + 1, dtype=torch.float64, device=flat.device)
        failed = []
        for k, row in enumerate(rows.tolist()):
            values = y64[k]
            nonfinite = torch.nonzero(~torch.isfinite(values)).flatten()
            if nonfinite.numel() > 1:
                failed.append(row)
                continue
            if nonfinite.numel() == 1:
                column = int(nonfinite[0])
            else:
                delta = values.sum() - reference[k]
                weighted_delta = values @ index - weighted_reference[k]
                position = float(weighted_delta / delta) if delta != 0 else float("nan")
                if not abs(position - round(position)) <= 0.01:
                    failed.append(row)
                    continue
                column = round(position) - 1
                if not 0 <= column < flat.shape[-1]:
                    failed.append(row)
                    continue
            others = values.clone()
            others[column] = 0
            flat[row, column] = (reference[k] - others.sum()).to(flat.dtype)
        failed_rows = torch.tensor(failed, dtype=rows.dtype, device=rows.device)
        fixed = rows[~torch.isin(rows, failed_rows)]
        if fixed.numel():
            still_bad, _ = self.mismatching_rows(x.reshape(-1, x.shape[-1])[fixed], flat[fixed])
            failed_rows = torch.cat([failed_rows, fixed[still_bad]])
        return failed_rows

    def _record(self, rows, differences, x_shape: torch.Size, info, action, note: str = "") -> None:
        context = self.mitigation._context
        seq_len = x_shape[1] if len(x_shape) == 3 else None
        by_row: dict[tuple[int | None, str | None], list[float]] = {}
        for flat_row, difference in zip(rows.tolist(), differences.tolist()):
            batch_row = flat_row // seq_len if seq_len else None
            stage = None
            if info is not None and seq_len:
                stage = str(info.stage_of(flat_row % seq_len))
            elif info is not None and info.index > 0:
                stage = "decode"
            by_row.setdefault((batch_row, stage), []).append(difference)
        for (batch_row, stage), diffs in by_row.items():
            nonfinite = any(d != d or d == float("inf") for d in diffs)
            context.record(
                Detection(
                    mitigation=self.mitigation.name,
                    check="nonfinite_output" if nonfinite else "output_checksum",
                    action=action,
                    layer=self.site.layer,
                    module=self.site.name,
                    stage=stage,
                    step=info.index if info is not None else None,
                    row=batch_row,
                    detail=f"{len(diffs)} position(s), max checksum difference {max(diffs):.3g}{note}",
                )
            )

    # ----- weight memory --------------------------------------------------------------

    def scrub(self, info=None) -> bool:
        """Verify the weight and bias bits; restore what changed. Return True if anything was restored."""
        weight = self.site.weight.detach()
        rows_now = _words(weight).sum(1)
        bad_rows = torch.nonzero(rows_now != self.row_bits).flatten()
        restored = False
        if bad_rows.numel():
            restored = self._restore_weight(weight, rows_now, bad_rows, info)
        bias = self.site.bias
        if bias is not None and not torch.equal(as_bits(bias.detach()), as_bits(self.bias_copy)):
            changed = torch.nonzero(as_bits(bias.detach()) != as_bits(self.bias_copy)).flatten()
            bias.data.copy_(self.bias_copy)
            restored = True
            self._record_weight(info, "restored", f"bias element(s) {changed.tolist()[:8]} restored")
        return restored

    def _restore_weight(self, weight, rows_now, bad_rows, info) -> bool:
        words = _words(weight)
        columns_now = words.sum(0)
        bad_columns = torch.nonzero(columns_now != self.column_bits).flatten()
        # Differences wrap modulo 2**64 like the sums, so subtracting them is exact.
        row_delta = (rows_now - self.row_bits)[bad_rows]
        column_delta = (columns_now - self.column_bits)[bad_columns]
        fixes: list[tuple[int, int, torch.Tensor]] = []  # (row, word column, delta)
        if bad_rows.numel() == 1:
            fixes = [(int(bad_rows[0]), int(c), d) for c, d in zip(bad_columns, column_delta)]
        elif bad_columns.numel() == 1:
            fixes = [(int(r), int(bad_columns[0]), d) for r, d in zip(bad_rows, row_delta)]
        elif bad_rows.numel() == bad_columns.numel():
            used: set[int] = set()
            for r, d in zip(bad_rows.tolist(), row_delta):
                matches = [k for k, cd in enumerate(column_delta) if bool(cd == d) and k not in used]
                if len(matches) != 1:
                    fixes = []
                    break
                used.add(matches[0])
                fixes.append((r, int(bad_columns[matches[0]]), d))

        if not fixes:
            self._record_weight(
                info, "none",
                f"{bad_rows.numel()} row(s) and {bad_columns.numel()} column(s) of bit checksums "
                "differ and cannot be matched to single elements",
            )
            return False

        for row, column, delta in fixes:
            words[row, column] -= delta
        if not torch.equal(words.sum(1), self.row_bits) or not torch.equal(words.sum(0), self.column_bits):
            # Undo the attempted fix so the weight is left as it was found.
            for row, column, delta in fixes:
                words[row, column] += delta
            self._record_weight(info, "none", "restoring the located elements did not restore the checksums")
            return False
        if words.data_ptr() != weight.data_ptr():
            as_bits(weight).copy_(words.to(as_bits(weight).dtype))
        per_word = weight.shape[-1] // words.shape[1]
        where = [(r, c * per_word) for r, c, _ in fixes][:8]
        self._record_weight(
            info, "restored",
            f"{len(fixes)} corrupted word(s) of {per_word} element(s) restored, starting at {where}",
        )
        return True

    def _record_weight(self, info, action: str, detail: str) -> None:
        context = self.mitigation._context
        if context is None:
            return
        context.record(
            Detection(
                mitigation=self.mitigation.name,
                check="weight_checksum",
                action=action,
                layer=self.site.layer,
                module=self.site.name,
                stage=None,
                step=info.index if info is not None else None,
                row=None,
                detail=detail,
            )
        )


class _Scratch:
    """Flat buffers reused from step to step, one per (slot, dtype, device), grown on demand.

    Used where the fused kernel does not apply: a decode step's stacked inputs and outputs go
    here (one slot per group of layers), and so do the absolute values of a prompt pass's
    inputs and outputs. In a warm loop over one
    SmolLM2-135M decode step (all linear layers, batch 8), reused buffers overwritten in place
    cut the check from 2.7 ms to 1.1 ms against fresh tensors.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def view(self, slot: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return a ``shape`` view of the slot's buffer, growing it if it is too small."""
        numel = math.prod(shape)
        key = (slot, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # Normal tensors even when the first step runs under inference mode, because a
            # later step outside inference mode cannot write to inference tensors.
            with torch.inference_mode(False):
                buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)


# KV cache layers whose update replaces (never mutates) their tensors, so a shallow copy of
# their attributes taken before a step is enough to roll the step back.
_REWINDABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


class _CopyStack:
    """Inputs and outputs of one group of equally shaped layers, copied in as the layers run.

    Used where the fused kernel does not apply. Kept from step to step while the shapes stay the
    same, with one view per layer made once.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x  # [L, *rows, in]
        self.y = y  # [L, *rows, out]
        self.x_slots = x.unbind(0)
        self.y_slots = y.unbind(0)
        self.filled = [False] * x.shape[0]
        # Kept apart from the tensors: reading .shape creates a torch.Size on every call.
        self.x_shape, self.y_shape = x.shape[1:], y.shape[1:]
        self.dtype, self.y_dtype = x.dtype, y.dtype

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Return whether one layer call's ``x`` and ``y`` match a slot's shapes and dtypes."""
        same_shapes = x.shape == self.x_shape and y.shape == self.y_shape
        return same_shapes and x.dtype == self.dtype and y.dtype == self.y_dtype

    def take(self, slot: int, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Copy one layer call into its slot; False when the slot is taken or the call does not fit."""
        if self.filled[slot] or not self.fits(x, y):
            return False
        self.x_slots[slot].copy_(x)
        self.y_slots[slot].copy_(y)
        self.filled[slot] = True
        return True

    def reset(self) -> None:
        """Empty every slot for a new step."""
        self.filled = [False] * len(self.filled)

    def check(self, slots: torch.Tensor | None, sums: "_Checksums", check_copies) -> "_CheckResult":
        """Check the kept calls with ``check_copies(x, y, sums)``; see :data:`_CheckResult`."""
        x, y = self.x, self.y
        if slots is not None:
            slots = slots.to(x.device)
            x, y = x.index_select(0, slots), y.index_select(0, slots)
        count = x.shape[0]
        return check_copies(x.view(count, -1, x.shape[-1]), y.view(count, -1, y.shape[-1]), sums)


class _TermStack:
    """Check terms of one group of equally shaped layers, computed by the fused kernel as each runs.

    The kernel reads x and y while they are still in cache and writes four numbers per row.
    Copies of x and y would be written to memory and read back when the step ends.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sums: "_Checksums"):
        count, n_in = sums.column.shape
        rows = x.numel() // n_in
        self.values = np.empty((count, 4, rows))  # [L, 4, rows]
        # The kernel reads the checksums and writes the terms through their addresses, so this
        # stack keeps both alive.
        self.column, self.abs_column = sums.column.contiguous(), sums.abs_column.contiguous()
        step = n_in * self.column.element_size()
        column, abs_column = self.column.data_ptr(), self.abs_column.data_ptr()
        # Per slot, the kernel's block: sizes, operand addresses and the fill flag (last).
        self.blocks = np.array(
            [
                (rows, n_in, y.shape[-1], column + k * step, abs_column + k * step, self.values[k].ctypes.data, 0)
                for k in range(count)
            ],
            dtype=np.int64,
        ).reshape(count, checksum_kernel.CALL_FIELDS)
        self.block_addresses = [self.blocks[k].ctypes.data for k in range(count)]
        self.kernel = checksum_kernel.kernels().call_terms_at[x.dtype]
        self.x_shape = x.shape
        self.x_numel, self.y_numel = x.numel(), y.numel()
        self.dtype = self.y_dtype = x.dtype

    @property
    def filled(self) -> list[bool]:
        """Fill state per slot: True where the slot contains a call of this step."""
        return self.blocks[:, -1].astype(bool).tolist()

    def reset(self) -> None:
        """Empty every slot for a new step."""
        self.blocks[:, -1] = 0

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Return whether the kernel can read one layer call's ``x`` and ``y`` as a slot's operands.

        The kernel reads ``rows * in`` and ``rows * out`` elements through their addresses, so
        they must be contiguous CPU tensors of the group's dtype and sizes. The last dimension
        is ``in`` (``out``) for any call that reached a checked layer's forward hook.
        """
        dtype = self.dtype
        return (
            x.dtype is dtype
            and y.dtype is dtype
            and x.numel() == self.x_numel
            and y.numel() == self.y_numel
            and x.is_contiguous()
            and y.is_contiguous()
            and x.is_cpu
            and y.is_cpu
        )

    def take(self, slot: int, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Compute one layer call's terms into its slot; False when the slot is taken or the call does not fit."""
        return self.fits(x, y) and self.kernel(x.data_ptr(), y.data_ptr(), self.block_addresses[slot])

    def check(self, slots: torch.Tensor | None, sums: "_Checksums", check_copies) -> "_CheckResult":
        """Compare the kept calls' terms with the tolerance; see :data:`_CheckResult`."""
        values = self.values if slots is None else self.values[slots.numpy()]
        return _fused_compare(values, sums)


@dataclass
class _PendingPass:
    """Checked layers' inputs and outputs of one decode step, verified when the step ends."""

    info: ForwardInfo
    cache_layers: list = field(default_factory=list)
    # Attributes of each cache layer when the step began; empty when no rollback is needed.
    cache_state: list[dict] = field(default_factory=list)
    # Per cache layer: the length its keys and values are cut back to, or None when
    # cache_state contains the tensors themselves.
    cache_lengths: list[int | None] = field(default_factory=list)
    stacks: dict[tuple, "_CopyStack | _TermStack"] = field(default_factory=dict)
    # Calls that do not fit their group's stack: a layer run twice, or another shape or dtype.
    extra: list[tuple["_CheckedLayer", torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Passes running inside this step's forward now, such as recomputations. Their layers are checked one by one.
    nested: int = 0

    def remember_cache(self, cache_layers: list) -> None:
        """Record what a rollback of this step restores."""
        for layer in cache_layers:
            state = dict(vars(layer))
            length = None
            keys, values = state.get("keys"), state.get("values")
            if type(layer) is DynamicLayer and torch.is_tensor(keys) and torch.is_tensor(values):
                # A DynamicLayer grows by concatenation, so the step's starting keys and values
                # are the first positions of the new ones. Holding only their length lets the
                # old tensors be freed during the step, as they are without the check.
                del state["keys"], state["values"]
                length = keys.shape[-2]
            self.cache_layers.append(layer)
            self.cache_state.append(state)
            self.cache_lengths.append(length)

    def roll_back_cache(self) -> None:
        """Drop the positions the step appended to the KV cache."""
        for layer, state, length in zip(self.cache_layers, self.cache_state, self.cache_lengths):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            vars(layer).clear()
            vars(layer).update(state)
            if length is not None:
                layer.keys = keys[..., :length, :]  # [batch, heads, positions, head_dim]
                layer.values = values[..., :length, :]


@dataclass
class _Checksums:
    """Check operands of ``L`` linear layers with equal shapes, stacked for one call of :func:`_compare`."""

    column: torch.Tensor  # [L, in]: W.sum(0) per layer
    abs_column: torch.Tensor  # [L, in]: |W|.sum(0) per layer
    bias: torch.Tensor | None  # [L, 1]: sum of each bias, None when all are zero
    bias_tolerance: torch.Tensor | None  # [L, 1]: the tolerance term of sum|b|
    magnitude_factor: float  # multiplies |x| @ |W|_c
    output_factor: float  # multiplies sum_j |y_j|
    _bias_arrays: tuple | None = field(default=None, repr=False)

    def bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``bias`` and ``bias_tolerance`` as ``[L]`` float64 arrays (zeros for None), for the kernels."""
        if self._bias_arrays is None:
            count = self.column.shape[0]

            def flat(tensor: torch.Tensor | None) -> np.ndarray:
                if tensor is None:
                    return np.zeros(count)
                return tensor.detach().double().cpu().reshape(count).numpy()

            self._bias_arrays = (flat(self.bias), flat(self.bias_tolerance))
        return self._bias_arrays

    def select(self, index: torch.Tensor) -> "_Checksums":
        """Return the operands of the layers at ``index`` (a 1-D index tensor)."""

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index)

        return _Checksums(
            column=self.column.index_select(0, index),
            abs_column=self.abs_column.index_select(0, index),
            bias=pick(self.bias),
            bias_tolerance=pick(self.bias_tolerance),
            magnitude_factor=self.magnitude_factor,
            output_factor=self.output_factor,
        )

    @classmethod
    def stack(cls, parts: list["_Checksums"]) -> "_Checksums":
        """Stack layers that share ``in``, the check format and the output format."""

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            if all(value is None for value in values):
                return None
            zero = torch.zeros(1, 1, dtype=parts[0].column.dtype)
            return torch.cat([zero if value is None else value for value in values])

        return cls(
            column=torch.cat([part.column for part in parts]),
            abs_column=torch.cat([part.abs_column for part in parts]),
            bias=cat("bias"),
            bias_tolerance=cat("bias_tolerance"),
            magnitude_factor=parts[0].magnitude_factor,
            output_factor=parts[0].output_factor,
        )


# ``passed [L, rows]`` and the absolute checksum differences ``[L, rows]``, or None when the
# kernels found every row within the tolerance (then no tensors are made).
_CheckResult = tuple[torch.Tensor, torch.Tensor] | None


def _input_terms(
    x: torch.Tensor, sums: _Checksums, abs_x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``x @ w_c`` and ``A = |x| @ |W|_c``, both ``[L, rows]``, for ``x [L, rows, in]``.

    ``x`` is in the check format. ``abs_x`` receives ``|x|``: a reused buffer of ``x``'s shape,
    or ``x`` itself when it is a copy the check may overwrite. Without it ``|x|`` is a new tensor.
    """
    dot = _row_dot(x, sums.column)
    return dot, _row_dot(torch.abs(x, out=abs_x), sums.abs_column)


def _output_terms(
    y: torch.Tensor, check_dtype: torch.dtype, abs_y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``sum_j y_j`` and ``sum_j |y_j|``, both ``[L, rows]``, for ``y [L, rows, out]``.

    ``abs_y`` receives ``|y|`` as ``abs_x`` does ``|x|`` in :func:`_input_terms`.
    """
    # sum(dtype=...) accumulates in the check format without a converted copy of y.
    total = y.sum(-1, dtype=check_dtype)
    # abs() then sum(): on CPU, linalg.vector_norm(ord=1) measured 6x slower than the pair.
    return total, torch.abs(y, out=abs_y).sum(-1, dtype=check_dtype)


def _kernel_applies(config: ABFTConfig, x: torch.Tensor, y: torch.Tensor, sums: _Checksums) -> bool:
    """Return whether the fused kernels check ``x`` and ``y``: enabled in ``config`` and able to take them."""
    return config.fused_check and checksum_kernel.supports(x, y, sums.column)


def _fused_check(x: torch.Tensor, y: torch.Tensor, sums: _Checksums) -> _CheckResult:
    """Check ``x [L, rows, in]`` against ``y [L, rows, out]`` with the fused kernels; see :func:`_compare`.

    Call :func:`_kernel_applies` first.
    """
    terms = checksum_kernel.stack_terms(x, y, sums.column, sums.abs_column)
    return _fused_compare(terms, sums)


def _fused_compare(terms: np.ndarray, sums: _Checksums) -> _CheckResult:
    """Compare kernel terms ``[L, 4, rows]`` with the tolerance as :func:`_compare` does; see :data:`_CheckResult`."""
    bias, bias_tolerance = sums.bias_arrays()
    return checksum_kernel.compare(terms, bias, bias_tolerance, sums.magnitude_factor, sums.output_factor)


def _compare(terms: tuple[torch.Tensor, ...], sums: _Checksums) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``sum_j y_j = x @ w_c + sum_j b_j`` for every row of ``L`` layers at once.

    ``terms`` are ``x @ w_c``, ``|x| @ |W|_c``, ``sum_j y_j`` and ``sum_j |y_j|``, each
    ``[L, rows]``, from :func:`_input_terms` and :func:`_output_terms`. Returns
    ``passed [L, rows]`` and the absolute checksum differences ``[L, rows]``. Every term was
    computed in the check format or wider, and its rounding is bounded and added to the
    tolerance.
    """
    dot, magnitude, total, abs_total = terms
    difference = total.sub(dot)  # [L, rows]
    if sums.bias is not None:
        difference.sub_(sums.bias)
    difference.abs_()
    # tolerance = gamma * (A + sum|b|) + u_out * sum_j |y_j| + the check's own rounding.
    tolerance = abs_total.mul(sums.output_factor)
    tolerance.add_(magnitude, alpha=sums.magnitude_factor)
    if sums.bias_tolerance is not None:
        tolerance.add_(sums.bias_tolerance)
    # NaN compares false, so a non-finite row fails. An infinite tolerance means the sums
    # overflowed, which no fault-free row does, so it fails too.
    passed = (difference <= tolerance).logical_and_(tolerance < math.inf)
    return passed, difference


def _failures(
    layers: list, result: _CheckResult, x_shape: torch.Size
) -> list[tuple[Any, torch.Tensor, torch.Tensor, torch.Size]]:
    """Return ``(layer, rows, differences, x_shape)`` for each layer with a failing row in ``result``."""
    if result is None or bool(result[0].all()):
        return []
    passed, difference = result
    failures = []
    for index in torch.nonzero(~passed.all(-1)).flatten().tolist():
        bad = ~passed[index]
        failures.append((layers[index], torch.nonzero(bad).flatten(), difference[index][bad], x_shape))
    return failures


def _row_dot(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Return ``[L, rows]``: each row of ``x [L, rows, in]`` dotted with its layer's vector ``[L, in]``."""
    if x.shape[0] == 1:
        # One layer (the prefill): a matrix-vector product reads x once.
        return (x[0] @ vectors[0]).unsqueeze(0)
    # Stacked decode rows: a fused multiply-sum. A single-column bmm measured ~5x slower on CPU.
    return torch.linalg.vecdot(x, vectors.unsqueeze(1))


def _version(tensor: torch.Tensor) -> int:
    """Return the tensor's version counter, which in-place writes advance.

    NOTE: inference-mode tensors have no counter, so an in-place write to a layer input
    between two layers that read it goes unseen. Llama and GPT-2 do not write those inputs.
    """
    return 0 if tensor.is_inference() else tensor._version


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the format the check reads inputs of ``dtype`` in: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gamma(n: int, u: float) -> float:
    """Return the worst-case relative error bound ``n u / (1 - n u)`` of an n-term dot product."""
    return n * u / (1 - n * u)


def _words(weight: torch.Tensor) -> torch.Tensor:
    """View a 2-D weight's bits as int64 words ``[rows, words]`` sharing its storage.

    Summing int64 is about 200 times faster on CPU than widening int16/int32 element bits,
    and a word sum (wrapping modulo 2**64) still changes when any bit of any element does.
    Falls back to one integer per element when a row's bytes are not a multiple of 8.
    """
    if weight.dim() == 2 and weight.is_contiguous() and (weight.shape[1] * weight.element_size()) % 8 == 0:
        return weight.view(torch.int64)
    return as_bits(weight).to(torch.int64)  # a copy: _restore_weight writes it back


def _bit_sums(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    words = _words(weight)
    return words.sum(1), words.sum(0)


@register
class ABFT(Mitigation):
    """Checksum-verified linear layers, with correction and weight scrubbing."""

    name = "abft"
    order = 10
    Config = ABFTConfig

    def _install(self, model: nn.Module, context, handle: InstallHandle) -> None:
        sites = select_linear(model, self.config.roles, self.config.layers, self.config.modules, owner="abft")
        self.layers = [_CheckedLayer(site, self.config, self) for site in sites]
        # Layers of equal weight shape form one group, checked together in a decode step.
        self._groups: dict[tuple[int, int], list[_CheckedLayer]] = {}
        self._stacks: dict[tuple[int, int], _CopyStack | _TermStack] = {}
        for layer in self.layers:
            layer.group = (layer.in_features, layer.out_features)
            members = self._groups.setdefault(layer.group, [])
            layer.slot = len(members)
            members.append(layer)
        self._pending: _PendingPass | None = None
        # The pending step while its own forward runs, and None during a pass nested in it.
        self._collecting: _PendingPass | None = None
        self._stacked: dict[tuple, _Checksums] = {}
        self._scratch = _Scratch()
        self._abs_source: tuple[torch.Tensor, int] | None = None
        # Check operands for activations in the weights' format, made now rather than on the
        # first protected call: over 60 layers of SmolLM2-135M that call spent about 3 ms more.
        for members in self._groups.values():
            dtype = members[0].weight_dtype
            self._stacked_checksums(members, _check_dtype(dtype), dtype)
        for layer in self.layers:
            # No prepend: the check must see the output after any fault-injecting hook.
            handle.add_hook(layer.site.module.register_forward_hook(layer.hook))
        config = self.config
        if config.decode_check == "per_pass" and "decode" in config.stages and config.correction != "locate":
            # No prepend on the pre-hook: it runs after the stage tracker's, which is prepended.
            handle.add_hook(model.register_forward_pre_hook(self._begin_pass, with_kwargs=True))
            # prepend=True: the step must still be the tracker's current pass when it is
            # recomputed, so the recomputation counts as a redundant pass of that step.
            handle.add_hook(model.register_forward_hook(self._end_pass, with_kwargs=True, prepend=True))
        handle.add_cleanup(self._forget)
        logger.info("abft checks %d linear layers", len(self.layers))

    def _forget(self) -> None:
        self.layers = []
        self._groups = {}
        self._stacks = {}
        self._pending = self._collecting = None
        self._stacked = {}
        self._scratch = _Scratch()
        self._abs_source = None

    def _abs_input(self, x: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        """Return ``|x3|`` (``x3`` is ``x`` reshaped) in a reused buffer.

        Layers that read one input (q/k/v, gate/up) get the buffer as the first one filled it,
        as long as ``x`` is the same tensor at the same version.
        """
        buffer = self._scratch.view("abs_x", x3.shape, x3.dtype, x3.device)
        source = self._abs_source
        if source is None or source[0] is not x or source[1] != _version(x):
            torch.abs(x3, out=buffer)
            self._abs_source = (x, _version(x))
        return buffer

    # ----- decode steps checked per pass -------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self._context
        info = context.forward if context is not None else None
        if info is None:
            return
        pending = self._pending
        if pending is not None and context.tracker.encloses(pending.info):
            # A pass inside a decode step's forward, whose layers are checked one by one.
            pending.nested += 1
            self._collecting = None
            return
        if info.redundant:
            # A recomputation outside a pending step is checked layer by layer too.
            return
        self._pending = self._collecting = None
        if info.index == 0:
            return
        if self.config.correction == "none":
            pending = _PendingPass(info)
        else:
            key = cache_key_of(kwargs)
            cache_layers = getattr(kwargs[key], "layers", None) if key is not None else None
            if not cache_layers or not all(type(layer) in _REWINDABLE_LAYERS for layer in cache_layers):
                # The step cannot be rolled back, so its layers are checked one by one.
                return
            pending = _PendingPass(info)
            pending.remember_cache(cache_layers)
        for group, stack in self._stacks.items():
            # The previous step's stacks, emptied. The hook makes a new one where none fits.
            stack.reset()
            pending.stacks[group] = stack
        self._pending = self._collecting = pending

    def _end_pass(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        context = self._context
        pending = self._pending
        if context is None or pending is None:
            return None
        if pending.info is not context.forward:
            if pending.nested:
                # A pass inside the step ended, so the step's next layer calls are kept again.
                pending.nested -= 1
                if not pending.nested:
                    self._collecting = pending
            return None
        self._pending = self._collecting = None
        with context.timed():
            with torch.no_grad():
                failures = self._verify_pass(pending)
            if not failures:
                return None
            recompute = self.config.correction == "recompute"
            note = "; the decode step was recomputed" if recompute else ""
            for layer, rows, differences, x_shape in failures:
                layer._record(rows, differences, x_shape, pending.info, "recomputed" if recompute else "none", note)
            if not recompute:
                return None
            # NOTE: the rollback also drops a KV-cache fault that another hook injected into
            # this step's new positions after the forward, which needs both faults in one step.
            pending.roll_back_cache()
            # The recomputation is a redundant pass of this step: its layers are checked one by
            # one, so a persistent fault (a corrupted weight) is handled by scrubbing.
            with context.redundant():
                return module(*args, **kwargs)

    def _keep(self, pending: _PendingPass, layer: _CheckedLayer, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep one layer call of a decode step in its group's stack for the step's check.

        The stack reads x and y while they are still in cache. Stacking them when the step
        ends reads them back from memory, which measured about twice the time.
        """
        stack = pending.stacks.get(layer.group)
        if stack is None or (not any(stack.filled) and not stack.fits(x, y)):
            # The group's first call of the step, in a group without a stack of this shape.
            stack = pending.stacks[layer.group] = self._stacks[layer.group] = self._new_stack(layer.group, x, y)
        if not stack.take(layer.slot, x, y):
            pending.extra.append((layer, x, y))

    def _new_stack(self, group: tuple[int, int], x: torch.Tensor, y: torch.Tensor) -> _CopyStack | _TermStack:
        members = self._groups[group]
        sums = self._stacked_checksums(members, _check_dtype(x.dtype), y.dtype)
        kernel_applies = _kernel_applies(self.config, x, y, sums)
        stack = _TermStack(x, y, sums) if kernel_applies else None
        for layer in members:
            # The hook calls the kernel through these, without a lookup per call.
            layer.term_stack = stack
            layer.block_address = stack.block_addresses[layer.slot] if stack is not None else 0
        if stack is not None:
            return stack
        count = len(members)
        return _CopyStack(
            self._scratch.view(("x", group), (count, *x.shape), x.dtype, x.device),
            self._scratch.view(("y", group), (count, *y.shape), y.dtype, y.device),
        )

    def _verify_pass(self, pending: _PendingPass) -> list[tuple[_CheckedLayer, torch.Tensor, torch.Tensor, torch.Size]]:
        """Check every kept layer call of a step.

        Returns ``(layer, rows, differences, input shape)`` for each failing layer call.
        """
        failures = []
        for group, stack in pending.stacks.items():
            members = self._groups[group]
            layers = [layer for layer, filled in zip(members, stack.filled) if filled]
            for layer in layers:
                layer.checks += 1
            x_shape = stack.x_shape
            # Checksums are cached per whole group and selected per step, so the varying expert
            # subsets of an MoE model do not each add a cache entry.
            sums = self._stacked_checksums(members, _check_dtype(stack.dtype), stack.y_dtype)
            slots = None
            if len(layers) < len(members):
                # Some layers did not run in this step (MoE experts): check the ones that did.
                slots = torch.tensor([layer.slot for layer in layers], device=sums.column.device)
                sums = sums.select(slots)
            failures += _failures(layers, stack.check(slots, sums, self._check_copies), x_shape)
        for layer, x, y in pending.extra:
            layer.checks += 1
            failures += self._check_stacked([layer], x.unsqueeze(0).clone(), y.unsqueeze(0).clone())
        return failures

    def _check_stacked(
        self, layers: list[_CheckedLayer], x: torch.Tensor, y: torch.Tensor
    ) -> list[tuple[_CheckedLayer, torch.Tensor, torch.Tensor, torch.Size]]:
        """Check layers from their stacked inputs ``x [L, *rows, in]`` and outputs ``y [L, *rows, out]``.

        Both are copies: the check may overwrite them with their absolute values.
        """
        count, x_shape = x.shape[0], x.shape[1:]
        sums = self._stacked_checksums(layers, _check_dtype(x.dtype), y.dtype)
        result = self._check_copies(x.view(count, -1, x.shape[-1]), y.view(count, -1, y.shape[-1]), sums)
        return _failures(layers, result, x_shape)

    def _check_copies(self, x: torch.Tensor, y: torch.Tensor, sums: _Checksums) -> _CheckResult:
        """Check copies ``x [L, rows, in]`` and ``y [L, rows, out]``, which it may overwrite; see :func:`_compare`."""
        if _kernel_applies(self.config, x, y, sums):
            return _fused_check(x, y, sums)
        check_dtype = sums.column.dtype
        if x.dtype != check_dtype:
            # The check reads inputs in its own format; a float32 input is read as stacked.
            x = self._scratch.view("x_check", x.shape, check_dtype, x.device).copy_(x)
        return _compare((*_input_terms(x, sums, abs_x=x), *_output_terms(y, check_dtype, abs_y=y)), sums)

    def _stacked_checksums(self, layers: list[_CheckedLayer], check_dtype, out_dtype) -> _Checksums:
        key = (tuple(id(layer) for layer in layers), check_dtype, out_dtype)
        sums = self._stacked.get(key)
        if sums is None:
            sums = self._stacked[key] = _Checksums.stack([layer.checksums(check_dtype, out_dtype) for layer in layers])
        return sums

    @property
    def checked_modules(self) -> list[str]:
        return [layer.site.name for layer in getattr(self, "layers", [])]

    def scrub(self) -> int:
        """Verify every checked layer's weights; return how many layers were restored."""
        context = self._context
        restored = 0
        with torch.no_grad():
            for layer in getattr(self, "layers", []):
                restored += bool(layer.scrub(context.forward if context else None))
        return restored

    def before_generate(self, context, args: tuple, kwargs: dict) -> None:
        if self.config.scrub == "generate":
            self.scrub()

    def after_generate(self, context, output: Any) -> None:
        # Release the last step's kept tensors.
        self._pending = self._collecting = None
        self._abs_source = None
