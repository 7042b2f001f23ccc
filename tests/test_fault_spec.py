"""Fault descriptions: validation, serialisation and seeded resolution into concrete faults."""

from __future__ import annotations

import json

import pytest
import torch

from guard.errors import ConfigError, NotFoundError
from injectors import CorruptionSpec, Fault, FaultSpec, SiteSpec, TimeSpec, field_bits, resolve_faults
from tests.tiny_models import make_tiny_model

RUN = dict(prompt_length=8, max_new_tokens=6)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def spec(site=None, time=None, corruption=None) -> FaultSpec:
    return FaultSpec.from_dict(
        {"site": site or {"role": "down_proj"}, "time": time or {}, "corruption": corruption or {}}
    )


def test_spec_round_trip():
    original = spec(
        {"kind": "weight", "role": "q_proj", "layers": [0, 1], "persistent": True},
        {"stage": "decode", "step": 3},
        {"field": "exponent", "burst": 2, "correlated": 2, "axis": "column"},
    )
    again = FaultSpec.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original


def test_spec_defaults():
    default = FaultSpec()
    assert default.site.role == "down_proj"
    assert default.time.stage == "first_token"
    assert default.corruption.mode == "flip"


def test_fault_round_trip_json(llama):
    faults = resolve_faults(llama, spec(corruption={"mode": "set", "value": "nan"}), seed=3, **RUN)
    text = json.dumps([fault.to_dict() for fault in faults], allow_nan=False)
    again = [Fault.from_dict(item) for item in json.loads(text)]
    assert again[0].to_dict() == faults[0].to_dict()
    assert json.loads(text)[0]["value"] == "nan"


def test_resolve_is_deterministic(llama):
    description = spec({"role": "down_proj"}, {"stage": "decode"}, {"k": 3})
    first = resolve_faults(llama, description, seed=11, n=8, **RUN)
    second = resolve_faults(llama, description, seed=11, n=8, **RUN)
    assert first == second
    assert resolve_faults(llama, description, seed=12, n=8, **RUN) != first


def test_resolve_first_token(llama):
    fault = resolve_faults(llama, spec(corruption={"field": "exponent_msb"}), seed=0, **RUN)[0]
    assert (fault.forward, fault.stage, fault.position, fault.row) == (0, "first_token", 7, 0)
    assert fault.bits == (30,)
    assert fault.role == "down_proj"
    assert 0 <= fault.elements[0] < 32


def test_resolve_decode_step(llama):
    fault = resolve_faults(llama, spec(time={"stage": "decode", "step": 4}), seed=0, **RUN)[0]
    assert (fault.forward, fault.step, fault.position) == (4, 4, 11)


def test_resolve_sampled_steps_in_range(llama):
    faults = resolve_faults(llama, spec(time={"stage": "decode"}), seed=0, n=50, **RUN)
    assert {fault.step for fault in faults} <= set(range(1, 6))
    assert len({fault.step for fault in faults}) > 1


def test_resolve_prefill_positions(llama):
    faults = resolve_faults(llama, spec(time={"stage": "prefill"}), seed=0, n=50, **RUN)
    assert {fault.position for fault in faults} <= set(range(0, 7))


def test_rows_spread_over_batch(llama):
    faults = resolve_faults(llama, spec(), seed=0, n=4, batch_size=4, **RUN)
    assert [fault.row for fault in faults] == [0, 1, 2, 3]


def test_k_bits_in_field(llama):
    faults = resolve_faults(llama, spec(corruption={"field": "mantissa", "k": 3}), seed=5, n=20, **RUN)
    mantissa = set(field_bits(torch.float32, "mantissa"))
    for fault in faults:
        assert len(set(fault.bits)) == 3
        assert set(fault.bits) <= mantissa


def test_burst_adjacent_bits(llama):
    fault = resolve_faults(llama, spec(corruption={"bit": 20, "burst": 4}), seed=0, **RUN)[0]
    assert fault.bits == (20, 21, 22, 23)


def test_burst_in_field(llama):
    faults = resolve_faults(llama, spec(corruption={"field": "exponent", "burst": 3}), seed=1, n=20, **RUN)
    for fault in faults:
        assert list(fault.bits) == list(range(fault.bits[0], fault.bits[0] + 3))
        assert fault.bits[0] >= 23
        assert fault.bits[-1] <= 30


def test_correlated_row(llama):
    fault = resolve_faults(llama, spec({"role": "down_proj", "element": 4}, corruption={"correlated": 3}), seed=0, **RUN)[0]
    assert fault.elements == (4, 5, 6)


def test_correlated_head(llama):
    # q_proj output of the tiny llama: 4 heads of 8 values.
    fault = resolve_faults(
        llama, spec({"role": "q_proj", "element": 1}, corruption={"correlated": 3, "axis": "head"}), seed=0, **RUN
    )[0]
    assert fault.elements == (1, 9, 17)


def test_correlated_weight_column(llama):
    fault = resolve_faults(
        llama,
        spec({"kind": "weight", "role": "down_proj", "element": 2}, corruption={"correlated": 2, "axis": "column"}),
        seed=0,
        **RUN,
    )[0]
    # down_proj weight is [32, 64]: one row below is 64 elements further.
    assert fault.elements == (2, 66)
    assert fault.row is None


def test_correlated_column_positions(llama):
    fault = resolve_faults(
        llama, spec(time={"stage": "prefill", "position": 2}, corruption={"correlated": 3, "axis": "column"}), seed=0, **RUN
    )[0]
    assert fault.positions == (2, 3, 4)


def test_kv_fault_fields(llama):
    fault = resolve_faults(
        llama,
        spec({"kind": "kv_cache", "layers": 1, "tensor": "value", "head": 1, "channel": 3}, corruption={"correlated": 2}),
        seed=0,
        **RUN,
    )[0]
    assert (fault.kind, fault.layer, fault.tensor, fault.head, fault.channel) == ("kv_cache", 1, "value", 1, 3)
    assert fault.elements == (11, 12)


def test_set_value_fault(llama):
    fault = resolve_faults(llama, spec(corruption={"mode": "set", "value": "-inf"}), seed=0, **RUN)[0]
    assert fault.value == float("-inf")
    assert fault.bits == ()


def test_mode_inferred():
    assert CorruptionSpec(stuck_at=0, bit=2).mode == "stuck_at"
    assert CorruptionSpec(value="nan").mode == "set"
    assert CorruptionSpec(bit=2).mode == "flip"


def test_stuck_at_fault(llama):
    fault = resolve_faults(llama, spec(corruption={"mode": "stuck_at", "stuck_at": 1, "bit": 3}), seed=0, **RUN)[0]
    assert (fault.mode, fault.stuck_at, fault.bits) == ("stuck_at", 1, (3,))


def test_bf16_bit_range():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    faults = resolve_faults(model, spec(), seed=0, n=30, **RUN)
    assert all(0 <= fault.bits[0] < 16 for fault in faults)


# ----- error paths -----------------------------------------------------------------------


def test_decode_step_unreachable(llama):
    with pytest.raises(ConfigError, match=r"time.step=40 is never reached with max_new_tokens=8"):
        resolve_faults(llama, spec(time={"stage": "decode", "step": 40}), seed=0, prompt_length=8, max_new_tokens=8)


def test_decode_needs_two_tokens(llama):
    with pytest.raises(ConfigError, match=r"stage='decode' is never reached with max_new_tokens=1"):
        resolve_faults(llama, spec(time={"stage": "decode"}), seed=0, prompt_length=8, max_new_tokens=1)


def test_position_beyond_prompt(llama):
    with pytest.raises(ConfigError, match=r"time.position=9 is beyond the prefill positions.*prompt_length=8"):
        resolve_faults(llama, spec(time={"stage": "prefill", "position": 9}), seed=0, **RUN)


def test_prefill_one_token_prompt(llama):
    with pytest.raises(ConfigError, match=r"needs prompt_length >= 2, got 1"):
        resolve_faults(llama, spec(time={"stage": "prefill"}), seed=0, prompt_length=1, max_new_tokens=4)


def test_row_beyond_batch(llama):
    with pytest.raises(ConfigError, match=r"time.row=3 is beyond the batch of batch_size=2"):
        resolve_faults(llama, spec(time={"row": 3}), seed=0, batch_size=2, **RUN)


def test_weight_fault_row(llama):
    with pytest.raises(ConfigError, match=r"time.row does not apply to weight faults"):
        resolve_faults(llama, spec({"kind": "weight", "role": "q_proj"}, {"row": 0}), seed=0, **RUN)


def test_bit_beyond_format(llama):
    with pytest.raises(ConfigError, match=r"corruption.bit=40 is out of range for float32"):
        resolve_faults(llama, spec(corruption={"bit": 40}), seed=0, **RUN)


def test_bit_beyond_bf16():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match=r"corruption.bit=20 is out of range for bfloat16: valid bit indices are 0..15"):
        resolve_faults(model, spec(corruption={"bit": 20}), seed=0, **RUN)


def test_burst_beyond_width(llama):
    with pytest.raises(ConfigError, match=r"corruption.bit=32 is out of range"):
        resolve_faults(llama, spec(corruption={"bit": 30, "burst": 3}), seed=0, **RUN)


def test_k_exceeds_field(llama):
    with pytest.raises(ConfigError, match=r"corruption.k=2 exceeds field 'sign' \(1 bits\)"):
        resolve_faults(llama, spec(corruption={"field": "sign", "k": 2}), seed=0, **RUN)


def test_element_out_of_range(llama):
    with pytest.raises(ConfigError, match=r"site.element=40 is out of range.*valid starts are 0..31"):
        resolve_faults(llama, spec({"role": "down_proj", "element": 40}), seed=0, **RUN)


def test_kv_head_out_of_range(llama):
    with pytest.raises(ConfigError, match=r"site.head=5 is out of range: valid values are 0..1"):
        resolve_faults(llama, spec({"kind": "kv_cache", "head": 5}), seed=0, **RUN)


def test_column_outside_prompt_pass(llama):
    with pytest.raises(ConfigError, match=r"axis='column' needs 2 consecutive positions of the prompt pass"):
        resolve_faults(llama, spec(time={"stage": "decode"}, corruption={"correlated": 2, "axis": "column"}), seed=0, **RUN)


def test_head_axis_needs_matrix(llama):
    with pytest.raises(ConfigError, match=r"axis='head' needs a projection weight whose rows split into heads of 8"):
        resolve_faults(
            llama, spec({"kind": "weight", "role": "norm"}, corruption={"correlated": 2, "axis": "head"}), seed=0, **RUN
        )


def test_unknown_role_in_spec(llama):
    with pytest.raises(ConfigError, match=r"role='downproj'.*Did you mean 'down_proj'"):
        resolve_faults(llama, spec({"role": "downproj"}), seed=0, **RUN)


def test_glob_in_spec(llama):
    with pytest.raises(NotFoundError, match=r"module='\*\.ffn' matches no computation site"):
        resolve_faults(llama, spec({"module": "*.ffn"}), seed=0, **RUN)


def test_layer_in_spec(llama):
    with pytest.raises(ConfigError, match=r"layers=2 is out of range: this model has layers 0..1"):
        resolve_faults(llama, spec({"role": "down_proj", "layers": 2}), seed=0, **RUN)


@pytest.mark.parametrize(
    "name,value,pattern",
    [
        ("n", 0, r"n=0 is not valid: give an integer >= 1"),
        ("seed", "x", r"seed='x' is not valid"),
        ("prompt_length", 0, r"prompt_length=0 is not valid"),
        ("batch_size", -1, r"batch_size=-1 is not valid"),
    ],
)
def test_resolve_bad_arguments(llama, name, value, pattern):
    arguments = dict(seed=0, n=1, batch_size=1, **RUN)
    arguments[name] = value
    with pytest.raises(ConfigError, match=pattern):
        resolve_faults(llama, spec(), **arguments)


@pytest.mark.parametrize(
    "section,data,pattern",
    [
        ("site", {"kind": "memory"}, r"site.kind='memory' is not valid.*computation, kv_cache, weight"),
        ("site", {"kind": "computation"}, r"site needs a role or a module glob"),
        ("site", {"role": "q_proj", "persistent": True}, r"persistent=True only applies to kind='weight'"),
        ("site", {"kind": "kv_cache", "tensor": "query"}, r"site.tensor='query' is not valid.*key, value"),
        ("site", {"role": "q_proj", "head": 1}, r"only apply to kind='kv_cache'"),
        ("site", {"role": "q_proj", "element": -1}, r"site.element=-1 is not valid"),
        ("site", {"role": "q_proj", "layers": "some"}, r"site.layers='some' is not valid"),
        ("site", {"role": "q_proj", "param": "weight"}, r"site.param only applies to kind='weight'"),
        ("site", {"rolle": "q_proj"}, r"site.rolle is not a known field. Did you mean 'role'"),
        ("time", {"stage": "decoding"}, r"time.stage='decoding' is not valid.*Did you mean 'decode'"),
        ("time", {"stage": "prefill", "step": 2}, r"time.step=2 needs stage='decode'"),
        ("time", {"stage": "decode", "step": 0}, r"time.step=0 is not valid: give an integer >= 1"),
        ("time", {"stage": "first_token", "position": 3}, r"time.position=3 only applies to stage='prefill'"),
        ("corruption", {"mode": "xor"}, r"corruption.mode='xor' is not valid.*flip, set, stuck_at"),
        ("corruption", {"field": "fraction"}, r"corruption.field='fraction' is not valid"),
        ("corruption", {"bit": 1, "field": "sign"}, r"corruption.bit and corruption.field exclude each other"),
        ("corruption", {"k": 2, "burst": 2}, r"corruption.k and corruption.burst exclude each other"),
        ("corruption", {"bit": 1, "k": 2}, r"corruption.bit and corruption.k exclude each other"),
        ("corruption", {"correlated": 0}, r"corruption.correlated=0 is not valid"),
        ("corruption", {"axis": "diagonal"}, r"corruption.axis='diagonal' is not valid"),
        ("corruption", {"mode": "stuck_at"}, r"corruption.stuck_at=None is not valid for mode='stuck_at'"),
        ("corruption", {"mode": "flip", "stuck_at": 1}, r"corruption.stuck_at needs mode='stuck_at'"),
        ("corruption", {"mode": "set"}, r"corruption.value is missing for mode='set'"),
        ("corruption", {"mode": "set", "value": "huge"}, r"value='huge' is not valid"),
        ("corruption", {"mode": "set", "value": 1.0, "bit": 3}, r"do not apply to mode='set'"),
        ("corruption", {"mode": "stuck_at", "stuck_at": 0, "value": 1.0}, r"corruption.value needs mode='set'"),
    ],
)
def test_spec_validation(section, data, pattern):
    parts = {"site": {"role": "down_proj"}, "time": {}, "corruption": {}}
    parts[section] = data
    with pytest.raises(ConfigError, match=pattern):
        FaultSpec.from_dict(parts)


def test_spec_unknown_section():
    with pytest.raises(ConfigError, match=r"fault.when is not a known field.*Valid fields: site, time, corruption"):
        FaultSpec.from_dict({"when": {}})


def test_spec_section_not_mapping():
    with pytest.raises(ConfigError, match=r"time must be a mapping"):
        FaultSpec.from_dict({"time": "decode"})


def test_spec_wrong_section_type():
    with pytest.raises(ConfigError, match=r"FaultSpec.time must be a TimeSpec"):
        FaultSpec(SiteSpec(role="q_proj"), {"stage": "decode"}, CorruptionSpec())


def test_fault_record_validation():
    base = resolve_faults(make_tiny_model("llama"), spec(), seed=0, **RUN)[0].to_dict()
    with pytest.raises(ConfigError, match=r"fault.stage='early' is not valid"):
        Fault.from_dict(dict(base, stage="early"))
    with pytest.raises(ConfigError, match=r"fault.elements is empty"):
        Fault.from_dict(dict(base, elements=[]))
    with pytest.raises(ConfigError, match=r"fault.colour is not a known field"):
        Fault.from_dict(dict(base, colour="red"))
    with pytest.raises(ConfigError, match=r"fault.forward=-1 is not valid"):
        Fault.from_dict(dict(base, forward=-1))


def test_weight_fault_has_no_row(llama):
    fault = resolve_faults(llama, spec({"kind": "weight", "role": "q_proj"}), seed=0, **RUN)[0]
    with pytest.raises(ConfigError, match=r"a weight fault has no row"):
        fault.with_row(1)


def test_time_spec_direct():
    assert TimeSpec(stage="decode", step=2).step == 2


# ----- bit given as a field name ----------------------------------------------------------


def test_bit_accepts_field_name():
    spec = FaultSpec.from_dict({"corruption": {"bit": "exponent_msb"}})

    assert spec.corruption.field == "exponent_msb"
    assert spec.corruption.bit is None


def test_bit_accepts_index_text():
    assert FaultSpec.from_dict({"corruption": {"bit": "30"}}).corruption.bit == 30


def test_bit_unknown_word_suggests_fields():
    with pytest.raises(ConfigError, match=r"corruption.bit='exponentmsb' is not valid. Did you mean 'exponent_msb'"):
        FaultSpec.from_dict({"corruption": {"bit": "exponentmsb"}})


def test_bit_field_name_conflicting_with_field():
    with pytest.raises(ConfigError, match=r"names a field.*give one of them"):
        FaultSpec.from_dict({"corruption": {"bit": "sign", "field": "mantissa"}})
