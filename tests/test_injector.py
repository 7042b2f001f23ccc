"""The injector on tiny models: firing once per stage, isolation, restoration, determinism, replay."""

from __future__ import annotations

import json

import pytest
import torch

from guard.errors import ConfigError, NotFoundError, SoftguardError
from guard.stages import StageTracker
from injectors import Fault, FaultSpec, Injector, list_sites, resolve_faults
from tests.tiny_models import ARCHITECTURES, make_prompt, make_tiny_model

PROMPT_LENGTH = 8
NEW_TOKENS = 6
MARK = 12345.0


def generate(model, prompt, new_tokens=NEW_TOKENS, **kwargs):
    return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **kwargs)


def resolve(model, site=None, time=None, corruption=None, batch_size=1, seed=0, n=1):
    description = FaultSpec.from_dict(
        {"site": site or {"role": "down_proj"}, "time": time or {}, "corruption": corruption or {}}
    )
    return resolve_faults(
        model,
        description,
        seed=seed,
        n=n,
        prompt_length=PROMPT_LENGTH,
        max_new_tokens=NEW_TOKENS,
        batch_size=batch_size,
    )


def hook_counts(model):
    return {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
    }


def raw_state(model):
    """Bit patterns of every parameter, so NaN payloads and signed zeros compare exactly."""
    state = {}
    for name, parameter in model.named_parameters():
        width = torch.int32 if parameter.dtype == torch.float32 else torch.int16
        state[name] = parameter.detach().view(width).clone()
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


class MarkWatcher:
    """Counts module calls whose output contains the marker value, with the pass and location.

    Registered without prepend, like a mitigation's checking hook.
    """

    def __init__(self, model, module_name, tracker_model=None):
        self.model = model
        self.hits = []
        self.calls = 0
        module = model.get_submodule(module_name)
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        self.calls += 1
        tracker = StageTracker.of(self.model)
        index = tracker.current.index if tracker and tracker.current else None
        where = torch.nonzero(tensor == MARK)
        if len(where):
            self.hits.append((index, where.tolist()))

    def remove(self):
        self.handle.remove()


# ----- hooks and lifetime ------------------------------------------------------------------


def test_no_fault_no_hooks(tiny_llama):
    before = hook_counts(tiny_llama)
    injector = Injector(tiny_llama)
    with injector.armed([]):
        assert hook_counts(tiny_llama) == before
        assert StageTracker.of(tiny_llama) is None
    assert injector.fired == []


def test_hooks_only_on_targets(tiny_llama):
    before = hook_counts(tiny_llama)
    faults = resolve(tiny_llama, {"role": "down_proj", "layers": 1})
    injector = Injector(tiny_llama)
    with injector.armed(faults):
        during = hook_counts(tiny_llama)
        changed = {name for name in before if during[name] != before[name]}
        assert changed == {"", "model.layers.1.mlp.down_proj"}
        assert StageTracker.of(tiny_llama) is not None
    assert hook_counts(tiny_llama) == before
    assert StageTracker.of(tiny_llama) is None


def test_handle_remove_idempotent(tiny_llama):
    before = hook_counts(tiny_llama)
    injector = Injector(tiny_llama)
    handle = injector.arm(resolve(tiny_llama))
    assert injector.is_armed
    handle.remove()
    handle.remove()
    assert not injector.is_armed
    assert hook_counts(tiny_llama) == before


def test_arm_twice_rejected(tiny_llama):
    injector = Injector(tiny_llama)
    with injector.armed(resolve(tiny_llama)):
        with pytest.raises(SoftguardError, match="already armed"):
            injector.arm(resolve(tiny_llama))


def test_arm_unknown_module(tiny_llama):
    fault = resolve(tiny_llama)[0].to_dict()
    fault["module"] = "model.layers.9.mlp.down_proj"
    with pytest.raises(NotFoundError, match=r"module='model.layers.9.mlp.down_proj' is not a computation site"):
        Injector(tiny_llama).arm([fault])


def test_arm_element_out_of_range(tiny_llama):
    fault = resolve(tiny_llama)[0].to_dict()
    fault["elements"] = [32]
    with pytest.raises(ConfigError, match=r"fault.elements contains 32, out of range.*0..31"):
        Injector(tiny_llama).arm([fault])


def test_arm_bit_beyond_dtype():
    model = make_tiny_model("llama", dtype=torch.float16)
    fault = resolve(model)[0].to_dict()
    fault["bits"] = [16]
    with pytest.raises(ConfigError, match=r"fault.bits=16 is out of range for float16"):
        Injector(model).arm([fault])


def test_injector_needs_module():
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module"):
        Injector("llama")


# ----- stage targeting ------------------------------------------------------------------


@pytest.mark.parametrize(
    "time,forward,position",
    [
        ({"stage": "prefill", "position": 2}, 0, 2),
        ({"stage": "first_token"}, 0, PROMPT_LENGTH - 1),
        ({"stage": "decode", "step": 1}, 1, 0),
        ({"stage": "decode", "step": 4}, 4, 0),
    ],
    ids=["prefill", "first_token", "decode1", "decode4"],
)
def test_fires_once_at_stage(tiny_llama, time, forward, position):
    name = "model.layers.0.mlp.down_proj"
    faults = resolve(
        tiny_llama, {"role": "down_proj", "layers": 0, "element": 5}, time, {"mode": "set", "value": MARK}
    )
    watcher = MarkWatcher(tiny_llama, name)
    injector = Injector(tiny_llama)
    try:
        with injector.armed(faults):
            generate(tiny_llama, make_prompt(1, PROMPT_LENGTH))
    finally:
        watcher.remove()
    # One call per pass: the prompt pass and NEW_TOKENS - 1 decode passes.
    assert watcher.calls == NEW_TOKENS
    assert watcher.hits == [(forward, [[0, position, 5]])]
    assert len(injector.fired) == 1
    assert injector.fired[0].forward == forward
    assert injector.fired[0].value_after == (MARK,)
    assert injector.unfired == []


def test_not_refired_on_recompute(tiny_llama):
    faults = resolve(tiny_llama, {"role": "down_proj", "layers": 0}, corruption={"mode": "set", "value": MARK})
    watcher = MarkWatcher(tiny_llama, "model.layers.0.mlp.down_proj")
    prompt = make_prompt(1, PROMPT_LENGTH)
    injector = Injector(tiny_llama)
    try:
        with injector.armed(faults), torch.no_grad():
            tiny_llama(prompt)
            tiny_llama(prompt)
            tracker = StageTracker.of(tiny_llama)
            with tracker.redundant():
                tiny_llama(prompt)
    finally:
        watcher.remove()
    assert watcher.calls == 3
    assert len(watcher.hits) == 1
    assert len(injector.fired) == 1


def test_checker_sees_fault(tiny_llama):
    # A checking hook registered before the injector still runs after the corruption.
    watcher = MarkWatcher(tiny_llama, "model.layers.1.self_attn.o_proj")
    faults = resolve(tiny_llama, {"role": "o_proj", "layers": 1}, corruption={"mode": "set", "value": MARK})
    try:
        with Injector(tiny_llama).armed(faults):
            generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    finally:
        watcher.remove()
    assert len(watcher.hits) == 1


def test_unfired_when_step_never_comes(tiny_llama):
    fault = resolve(tiny_llama, time={"stage": "decode", "step": 5})[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=3)
    assert injector.fired == []
    assert injector.unfired == [fault]


def test_lm_head_prefill_skipped(tiny_llama):
    # generate computes logits for the last position only, so a prefill lm_head fault cannot land.
    fault = resolve(tiny_llama, {"role": "lm_head"}, {"stage": "prefill", "position": 1})[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    assert injector.unfired == [fault]
    assert "position 1 is not in this output" in injector.skipped[0][1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_site_fires_once(arch):
    model = make_tiny_model(arch)
    prompt = make_prompt(2, PROMPT_LENGTH)
    sites = [site for site in list_sites(model) if site.kind == "computation"]
    faults = []
    for number, site in enumerate(sites):
        stage = ("first_token", "decode")[number % 2]
        faults += resolve(
            model,
            {"module": site.name},
            {"stage": stage, "row": 1, **({"step": 2} if stage == "decode" else {})},
            {"field": "sign"},
            batch_size=2,
            seed=number,
        )
    injector = Injector(model)
    with injector.armed(faults):
        generate(model, prompt)
    fired = {record.fault.module for record in injector.fired}
    assert fired == {site.name for site in sites}
    assert len(injector.fired) == len(faults)
    for record in injector.fired:
        assert record.value_after == tuple(-value for value in record.value_before)


# ----- batch isolation ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rows_without_fault_unchanged(arch):
    model = make_tiny_model(arch)
    prompt = make_prompt(3, PROMPT_LENGTH, seed=1)
    golden = generate(model, prompt)
    role = {"mixtral": "expert", "gpt2": "down_proj"}.get(arch, "down_proj")
    row1 = dict(batch_size=3)
    faults = resolve(model, {"role": role}, {"stage": "first_token", "row": 1}, {"mode": "set", "value": "nan"}, **row1)
    faults += resolve(model, {"kind": "kv_cache"}, {"stage": "prefill", "row": 1}, {"mode": "set", "value": 1e4}, **row1)
    # Forcing one logit of row 1 at decode step 2 makes token id 77 its third new token.
    faults += resolve(
        model,
        {"role": "lm_head", "element": 77},
        {"stage": "decode", "step": 2, "row": 1},
        {"mode": "set", "value": 1e30},
        **row1,
    )
    injector = Injector(model)
    with injector.armed(faults):
        output = generate(model, prompt)
    assert len(injector.fired) == 3
    assert torch.equal(output[0], golden[0])
    assert torch.equal(output[2], golden[2])
    assert int(output[1, PROMPT_LENGTH + 2]) == 77


def test_row_beyond_runtime_batch(tiny_llama):
    fault = resolve(tiny_llama, time={"row": 3}, batch_size=4)[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    assert injector.unfired == [fault]
    assert injector.skipped[0][1] == "row 3 is beyond the batch of 1"


# ----- KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("time,offset", [({"stage": "prefill", "position": 3}, 3), ({"stage": "decode", "step": 2}, PROMPT_LENGTH + 1)])
def test_kv_fault_stays_in_cache(tiny_llama, time, offset):
    fault = resolve(
        tiny_llama,
        {"kind": "kv_cache", "layers": 1, "tensor": "value", "head": 1, "channel": 2},
        dict(time, row=0),
        {"field": "exponent_msb"},
    )[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        result = generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), return_dict_in_generate=True)
    record = injector.fired[0]
    cached = result.past_key_values.layers[1].values[0, 1, offset, 2]
    assert float(cached) == record.value_after[0]
    assert record.value_after != record.value_before


def test_kv_fault_changes_later_steps(tiny_llama):
    prompt = make_prompt(1, PROMPT_LENGTH)
    golden = generate(tiny_llama, prompt)
    faults = resolve(
        tiny_llama,
        {"kind": "kv_cache", "layers": 0, "tensor": "key"},
        {"stage": "first_token"},
        {"mode": "set", "value": 1e4},
        n=1,
    )
    injector = Injector(tiny_llama)
    with injector.armed(faults):
        output = generate(tiny_llama, prompt)
    assert len(injector.fired) == 1
    # The first new token is chosen before the corrupted key is read.
    assert int(output[0, PROMPT_LENGTH]) == int(golden[0, PROMPT_LENGTH])


# ----- weights ----------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def _raise_at(model, module_name, forward, error):
    def hook(module, args, output):
        tracker = StageTracker.of(model)
        if tracker and tracker.current and tracker.current.index == forward:
            raise error

    return model.get_submodule(module_name).register_forward_hook(hook)


@pytest.mark.parametrize("error", [_Boom("mid-generate"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_weights_restored_after_error(tiny_llama, error):
    before = raw_state(tiny_llama)
    faults = resolve(tiny_llama, {"kind": "weight", "role": "down_proj", "persistent": True}, corruption={"mode": "set", "value": "nan"})
    faults += resolve(tiny_llama, {"kind": "weight", "role": "q_proj"}, {"stage": "decode", "step": 2}, {"k": 4}, seed=3)
    handle = _raise_at(tiny_llama, "model.layers.1.mlp", 2, error)
    injector = Injector(tiny_llama)
    try:
        with pytest.raises(type(error)):
            with injector.armed(faults):
                generate(tiny_llama, make_prompt(1, PROMPT_LENGTH))
    finally:
        handle.remove()
    assert len(injector.fired) == 2
    assert_same_state(before, raw_state(tiny_llama))
    assert hook_counts(tiny_llama) == hook_counts(make_tiny_model("llama"))


def test_transient_weight_one_pass(tiny_llama):
    fault = resolve(tiny_llama, {"kind": "weight", "role": "o_proj", "layers": 0}, {"stage": "decode", "step": 2}, {"mode": "set", "value": MARK})[0]
    weight = tiny_llama.get_submodule(fault.module).weight
    seen = []

    def look(module, args):
        tracker = StageTracker.of(tiny_llama)
        seen.append((tracker.current.index, bool((weight == MARK).any())))

    handle = tiny_llama.model.layers[0].register_forward_pre_hook(look)
    try:
        with Injector(tiny_llama).armed([fault]):
            generate(tiny_llama, make_prompt(1, PROMPT_LENGTH))
    finally:
        handle.remove()
    assert [index for index, marked in seen if marked] == [2]
    assert not bool((weight == MARK).any())


def test_persistent_weight_whole_generation(tiny_llama):
    fault = resolve(
        tiny_llama,
        {"kind": "weight", "role": "o_proj", "layers": 0, "persistent": True},
        {"stage": "decode", "step": 1},
        {"mode": "set", "value": MARK},
    )[0]
    weight = tiny_llama.get_submodule(fault.module).weight
    seen = []

    def look(module, args):
        seen.append(bool((weight == MARK).any()))

    handle = tiny_llama.model.layers[0].register_forward_pre_hook(look)
    try:
        with Injector(tiny_llama).armed([fault]):
            generate(tiny_llama, make_prompt(1, PROMPT_LENGTH))
            assert bool((weight == MARK).any())
    finally:
        handle.remove()
    assert seen == [False] + [True] * (NEW_TOKENS - 1)
    assert not bool((weight == MARK).any())


def test_weight_overlap_restores(tiny_llama):
    before = raw_state(tiny_llama)
    fault = resolve(tiny_llama, {"kind": "weight", "role": "q_proj", "layers": 0, "element": 7, "persistent": True}, corruption={"bit": 30})[0]
    twin = Fault.from_dict(dict(fault.to_dict(), bits=[22], forward=1))
    with Injector(tiny_llama).armed([fault, twin]):
        generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=3)
    assert_same_state(before, raw_state(tiny_llama))


def test_bf16_weight_restore():
    model = make_tiny_model("qwen2", dtype=torch.bfloat16)
    before = raw_state(model)
    faults = resolve(model, {"kind": "weight", "role": "k_proj", "param": "bias", "persistent": True}, corruption={"k": 3}, n=4)
    injector = Injector(model)
    with injector.armed(faults):
        generate(model, make_prompt(1, PROMPT_LENGTH), new_tokens=3)
    assert [record.dtype for record in injector.fired] == ["bfloat16"] * 4
    assert_same_state(before, raw_state(model))


def test_moe_expert_weight_fault():
    model = make_tiny_model("mixtral")
    before = raw_state(model)
    faults = resolve(model, {"kind": "weight", "role": "expert", "param": "down_proj"}, corruption={"field": "sign"})
    injector = Injector(model)
    with injector.armed(faults):
        generate(model, make_prompt(1, PROMPT_LENGTH), new_tokens=3)
    assert injector.fired[0].value_after == (-injector.fired[0].value_before[0],)
    assert_same_state(before, raw_state(model))


# ----- determinism and replay ---------------------------------------------------------------


def test_two_runs_identical():
    outputs, records = [], []
    for _ in range(2):
        model = make_tiny_model("qwen2")
        faults = resolve(model, {"role": "v_proj"}, {"stage": "prefill"}, {"k": 2}, batch_size=2, n=2, seed=9)
        injector = Injector(model)
        with injector.armed(faults):
            outputs.append(generate(model, make_prompt(2, PROMPT_LENGTH)))
        records.append([record.to_dict() for record in injector.fired])
    assert torch.equal(outputs[0], outputs[1])
    assert records[0] == records[1]


def test_replay_recorded_fault(tiny_llama):
    prompt = make_prompt(1, PROMPT_LENGTH)
    fault = resolve(tiny_llama, {"role": "up_proj"}, {"stage": "first_token"}, {"field": "exponent"}, seed=4)[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        first = generate(tiny_llama, prompt)
    stored = json.dumps(injector.fired[0].to_dict(), allow_nan=False)

    replayed = Fault.from_dict(json.loads(stored)["fault"])
    again = Injector(tiny_llama)
    with again.armed([replayed]):
        second = generate(tiny_llama, prompt)
    assert torch.equal(first, second)
    assert again.fired[0].value_after == injector.fired[0].value_after
    assert again.fired[0].value_before == injector.fired[0].value_before


def test_fired_record_json(tiny_llama):
    faults = resolve(tiny_llama, corruption={"mode": "set", "value": "inf"})
    injector = Injector(tiny_llama)
    with injector.armed(faults):
        generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    data = json.loads(json.dumps(injector.fired[0].to_dict(), allow_nan=False))
    assert data["value_after"] == ["inf"]
    assert data["dtype"] == "float32"
    assert data["fault"]["stage"] == "first_token"


def test_correlated_column_positions_fire(tiny_llama):
    fault = resolve(
        tiny_llama,
        {"role": "down_proj", "layers": 0, "element": 3},
        {"stage": "prefill", "position": 2},
        {"mode": "set", "value": MARK, "correlated": 3, "axis": "column"},
    )[0]
    watcher = MarkWatcher(tiny_llama, "model.layers.0.mlp.down_proj")
    try:
        with Injector(tiny_llama).armed([fault]):
            generate(tiny_llama, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    finally:
        watcher.remove()
    assert watcher.hits == [(0, [[0, 2, 3], [0, 3, 3], [0, 4, 3]])]


# ----- left padding -----------------------------------------------------------------------


def padded_batch():
    """Two prompts, the second three tokens shorter and left-padded with token 0."""
    prompt = make_prompt(2, PROMPT_LENGTH, seed=2)
    prompt[1, :3] = 0
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    return prompt, mask


@pytest.mark.parametrize("time,column", [({"stage": "prefill", "position": 1}, 4), ({"stage": "first_token"}, PROMPT_LENGTH - 1)])
def test_positions_skip_left_padding(tiny_llama, time, column):
    prompt, mask = padded_batch()
    fault = resolve(
        tiny_llama,
        {"role": "down_proj", "layers": 0, "element": 6},
        dict(time, row=1),
        {"mode": "set", "value": MARK},
        batch_size=2,
    )[0]
    watcher = MarkWatcher(tiny_llama, "model.layers.0.mlp.down_proj")
    try:
        with Injector(tiny_llama).armed([fault]):
            generate(tiny_llama, prompt, new_tokens=2, attention_mask=mask)
    finally:
        watcher.remove()
    assert watcher.hits == [(0, [[1, column, 6]])]


def test_position_beyond_short_row(tiny_llama):
    prompt, mask = padded_batch()
    fault = resolve(tiny_llama, time={"stage": "prefill", "position": 5, "row": 1}, batch_size=2)[0]
    injector = Injector(tiny_llama)
    with injector.armed([fault]):
        generate(tiny_llama, prompt, new_tokens=2, attention_mask=mask)
    assert injector.unfired == [fault]
    assert injector.skipped[0][1] == "position 5 is beyond the 5 prompt tokens of row 1"


def test_kv_position_skips_padding(tiny_llama):
    prompt, mask = padded_batch()
    fault = resolve(
        tiny_llama,
        {"kind": "kv_cache", "layers": 0, "tensor": "key", "head": 0, "channel": 1},
        {"stage": "prefill", "position": 0, "row": 1},
        {"mode": "set", "value": MARK},
        batch_size=2,
    )[0]
    with Injector(tiny_llama).armed([fault]):
        result = generate(tiny_llama, prompt, new_tokens=2, attention_mask=mask, return_dict_in_generate=True)
    keys = result.past_key_values.layers[0].keys
    assert torch.nonzero(keys == MARK).tolist() == [[1, 0, 3, 1]]


# ----- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_flip(dtype):
    model = make_tiny_model("llama", dtype=dtype)
    faults = resolve(model, {"role": "down_proj"}, corruption={"field": "exponent_msb"}, seed=1)
    injector = Injector(model)
    with injector.armed(faults):
        generate(model, make_prompt(1, PROMPT_LENGTH), new_tokens=2)
    record = injector.fired[0]
    assert record.dtype == str(dtype).replace("torch.", "")
    before = torch.tensor(record.value_before, dtype=dtype).view(torch.int16)
    after = torch.tensor(record.value_after, dtype=dtype).view(torch.int16)
    assert int(before[0]) ^ int(after[0]) == 1 << 14
