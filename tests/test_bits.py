"""Bit primitives on fp32, bf16 and fp16: property-based checks with hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.errors import ConfigError
from injectors.bits import (
    FORMATS,
    field_bits,
    flip_bits,
    format_of,
    parse_value,
    set_value,
    stuck_at,
    to_json_float,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(format_of(tensor.dtype).int_dtype).clone()


@st.composite
def tensor_and_bit(draw, dtype):
    fmt = format_of(dtype)
    size = draw(st.integers(1, 6))
    raw = draw(st.lists(st.integers(-(1 << (fmt.bits - 1)), (1 << (fmt.bits - 1)) - 1), min_size=size, max_size=size))
    tensor = torch.tensor(raw, dtype=fmt.int_dtype).view(dtype)
    index = draw(st.integers(0, size - 1))
    bit = draw(st.integers(0, fmt.bits - 1))
    return tensor, index, bit


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_format_widths(dtype):
    fmt = format_of(dtype)
    assert 1 + fmt.exponent_bits + fmt.mantissa_bits == fmt.bits
    assert torch.finfo(dtype).bits == fmt.bits
    # torch's mantissa precision counts the implicit leading 1.
    assert fmt.mantissa_bits == {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_field_bits_partition(dtype):
    fmt = format_of(dtype)
    fields = field_bits(dtype, "sign") + field_bits(dtype, "exponent") + field_bits(dtype, "mantissa")
    assert sorted(fields) == list(range(fmt.bits))
    assert field_bits(dtype, "exponent_msb") == [max(field_bits(dtype, "exponent"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flip_twice_restores(dtype):
    @settings(max_examples=60, deadline=None)
    @given(tensor_and_bit(dtype))
    def check(case):
        tensor, index, bit = case
        original = raw_bits(tensor)
        flip_bits(tensor, [index], [bit])
        assert not torch.equal(raw_bits(tensor), original)
        flip_bits(tensor, [index], [bit])
        assert torch.equal(raw_bits(tensor), original)

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flip_changes_one_bit(dtype):
    @settings(max_examples=60, deadline=None)
    @given(tensor_and_bit(dtype))
    def check(case):
        tensor, index, bit = case
        fmt = format_of(dtype)
        original = raw_bits(tensor)
        change = flip_bits(tensor, [index], [bit])
        diff = int(original[index]) ^ int(raw_bits(tensor)[index])
        assert diff & ((1 << fmt.bits) - 1) == 1 << bit
        others = [i for i in range(tensor.numel()) if i != index]
        assert torch.equal(raw_bits(tensor)[others], original[others])
        assert torch.equal(change.before.view(fmt.int_dtype), original[[index]])
        assert torch.equal(change.after.view(fmt.int_dtype), raw_bits(tensor)[[index]])

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sign_flip_negates(dtype):
    @settings(max_examples=60, deadline=None)
    @given(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False))
    def check(number):
        tensor = torch.tensor([number], dtype=dtype)
        expected = -tensor.clone()
        change = flip_bits(tensor, [0], field_bits(dtype, "sign"))
        assert torch.equal(tensor, expected)
        assert torch.equal(change.after, expected)

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exponent_msb_flip_blows_up(dtype):
    @settings(max_examples=60, deadline=None)
    @given(st.floats(1.0, 1.99))
    def check(number):
        tensor = torch.tensor([number], dtype=dtype)
        flip_bits(tensor, [0], field_bits(dtype, "exponent_msb"))
        # Values in [1, 2) carry the biased exponent 0b011...1, so setting its MSB gives the
        # all-ones exponent: Inf for 1.0 and NaN otherwise, in all three formats.
        assert not math.isfinite(float(tensor[0]))

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exponent_msb_flip_small_value(dtype):
    # 0.75 has the biased exponent 0b011...10, so the flip gives the largest finite binade.
    tensor = torch.tensor([0.75], dtype=dtype)
    flip_bits(tensor, [0], field_bits(dtype, "exponent_msb"))
    limit = 4e4 if dtype == torch.float16 else 1e38
    assert math.isfinite(float(tensor[0]))
    assert float(tensor[0]) > limit


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mantissa_lsb_flip_is_tiny(dtype):
    @settings(max_examples=60, deadline=None)
    @given(st.floats(0.5, 100.0))
    def check(number):
        tensor = torch.tensor([number], dtype=dtype)
        before = float(tensor[0])
        flip_bits(tensor, [0], [0])
        assert abs(float(tensor[0]) - before) <= abs(before) * float(torch.finfo(dtype).eps)

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stuck_at_sets_bits(dtype):
    @settings(max_examples=60, deadline=None)
    @given(tensor_and_bit(dtype), st.sampled_from([0, 1]))
    def check(case, level):
        tensor, index, bit = case
        stuck_at(tensor, [index], [bit], level)
        assert (int(raw_bits(tensor)[index]) >> bit) & 1 == level
        again = raw_bits(tensor)
        stuck_at(tensor, [index], [bit], level)
        assert torch.equal(raw_bits(tensor), again)

    check()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", 3.5])
def test_set_value_writes(dtype, value):
    tensor = torch.ones(4, dtype=dtype)
    change = set_value(tensor, [2], value)
    written = float(tensor[2])
    expected = float(value)
    if math.isnan(expected):
        assert math.isnan(written)
    else:
        assert written == expected
    assert float(change.before[0]) == 1.0
    assert torch.equal(tensor[[0, 1, 3]], torch.ones(3, dtype=dtype))


def test_flip_on_strided_view():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    view = base.t()  # non-contiguous [4, 3]
    flip_bits(view, [1], field_bits(torch.float32, "sign"))
    # Flat index 1 of the transposed view is view[0, 1] == base[1, 0] == 4.0.
    assert float(base[1, 0]) == -4.0


def test_flip_bursts_several_bits():
    tensor = torch.tensor([1.0])
    flip_bits(tensor, [0], [0, 1, 2])
    assert int(raw_bits(tensor)[0]) ^ int(torch.tensor([1.0]).view(torch.int32)[0]) == 0b111


@pytest.mark.parametrize("dtype,bit", [(torch.float32, 32), (torch.bfloat16, 16), (torch.float16, 16), (torch.float32, -1)])
def test_bit_beyond_width(dtype, bit):
    tensor = torch.ones(2, dtype=dtype)
    with pytest.raises(ConfigError, match=rf"bit={bit} is out of range for {FORMATS[dtype].name}"):
        flip_bits(tensor, [0], [bit])


def test_bit_not_integer():
    with pytest.raises(ConfigError, match="must be an integer"):
        flip_bits(torch.ones(1), [0], [1.5])


def test_unknown_field():
    with pytest.raises(ConfigError, match="field='exponant'.*Did you mean 'exponent'"):
        field_bits(torch.float32, "exponant")


def test_unsupported_dtype():
    with pytest.raises(ConfigError, match="float64 is not supported"):
        format_of(torch.float64)


def test_element_out_of_range():
    with pytest.raises(ConfigError, match="element index 9 is out of range"):
        flip_bits(torch.ones(3), [9], [0])


def test_empty_indices():
    with pytest.raises(ConfigError, match="flat_indices is empty"):
        flip_bits(torch.ones(3), [], [0])


def test_stuck_at_bad_level():
    with pytest.raises(ConfigError, match="stuck_at=2 is not valid"):
        stuck_at(torch.ones(3), [0], [0], 2)


def test_parse_value_rejects_word():
    with pytest.raises(ConfigError, match="value='big' is not valid"):
        parse_value("big")


def test_json_float_non_finite():
    assert to_json_float(float("nan")) == "nan"
    assert to_json_float(float("-inf")) == "-inf"
    assert to_json_float(2.0) == 2.0
