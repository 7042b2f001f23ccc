"""ABFT: checksum checks, correction, weight scrubbing and configuration errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guard
from guard import ConfigError
from injectors import FaultSpec, Injector, resolve_faults
from mitigations import ABFT
from mitigations.abft import ABFTConfig, unit_roundoff
from tests.tiny_models import make_prompt, make_tiny_model

GREEDY = dict(max_new_tokens=6, do_sample=False)
INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16}
EXPONENT_MSB = {torch.float64: 62, torch.float32: 30, torch.bfloat16: 14, torch.float16: 14}


class FlipOnce:
    """Forward hook flipping one bit of one output element on the first prompt pass."""

    def __init__(self, row=0, position=-1, element=5, bit=30):
        self.row, self.position, self.element, self.bit = row, position, element, bit
        self.fired = 0

    def __call__(self, module, args, output):
        if self.fired or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        value = output[self.row, self.position, self.element : self.element + 1]
        bits = value.view(INT_OF[output.element_size()])
        bits ^= 1 << self.bit
        return output


def protected_run(model, prompt, abft, hook_module=None, hook=None):
    """Generate with ``abft`` installed (and ``hook`` prepended on ``hook_module``); return tokens and call report."""
    guard.protect(model, abft)
    handle = hook_module.register_forward_hook(hook, prepend=True) if hook_module is not None else None
    try:
        tokens = model.generate(prompt, **GREEDY)
        return tokens, guard.get_report(model).last_call
    finally:
        if handle is not None:
            handle.remove()
        guard.unprotect(model)


# ----- configuration ---------------------------------------------------------------------


def test_config_defaults():
    config = ABFTConfig()
    assert config.roles == ("o_proj", "down_proj")
    assert config.layers == "all"
    assert config.stages == frozenset({"prefill", "first_token", "decode"})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(roles=[]), "abft.roles is empty"),
        (dict(roles=["all_linear", "q_proj"]), "use it alone"),
        (dict(layers="some"), "abft.layers='some' is not valid"),
        (dict(layers=[-1]), "layer indices are integers >= 0"),
        (dict(layers=[]), "abft.layers is empty"),
        (dict(stages=["prefil"]), "Did you mean 'prefill'"),
        (dict(correction="fix"), "abft.correction='fix' is not valid"),
        (dict(scrub="always"), "abft.scrub='always' is not valid"),
        (dict(tolerance_scale=0.5), "abft.tolerance_scale=0.5 is not valid"),
        (dict(accumulation="fp8"), "abft.accumulation='fp8' is not valid"),
        (dict(bound="tight"), "abft.bound='tight' is not valid"),
        (dict(decode_check="batched"), "abft.decode_check='batched' is not valid"),
        (dict(fused_check="yes"), "abft.fused_check='yes' must be True or False"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=message):
        ABFT(**options)


def test_config_unknown_option():
    with pytest.raises(ConfigError, match="unknown option 'role'.*Did you mean 'roles'"):
        ABFT(role="down_proj")


def test_selection_matching_nothing(tiny_llama):
    with pytest.raises(ConfigError, match="match no linear layer.*It has roles.*down_proj.*layers 0-1"):
        guard.protect(tiny_llama, ABFT(layers=[7]))


def test_selection_all_linear(tiny_llama):
    guard.protect(tiny_llama, ABFT(roles="all_linear"))
    checked = guard.protected_mitigations(tiny_llama)[0].checked_modules
    guard.unprotect(tiny_llama)
    assert len(checked) == 2 * 7 + 1  # seven projections per block plus lm_head


def test_selection_gpt2_conv1d_aliases():
    model = make_tiny_model("gpt2")
    guard.protect(model, ABFT())
    checked = guard.protected_mitigations(model)[0].checked_modules
    guard.unprotect(model)
    assert checked == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]


def test_unit_roundoff_values():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11


# ----- fault-free --------------------------------------------------------------------------


# The kernel takes float32 and float64, so the half formats run on the operators only. The
# MoE experts' grouped GEMM has no float64 kernel on CPU.
FAULT_FREE_CASES = [
    (arch, dtype, fused_check)
    for arch in ("llama", "gpt2", "qwen2_moe")
    for dtype, fused_check in [
        (torch.float32, True), (torch.float32, False), (torch.float64, True), (torch.bfloat16, False), (torch.float16, False),
    ]
    if not (arch == "qwen2_moe" and dtype == torch.float64)
]


@pytest.mark.parametrize("bound", ["worst_case", "probabilistic"])
@pytest.mark.parametrize("arch, dtype, fused_check", FAULT_FREE_CASES)
def test_fault_free_no_false_alarm(arch, dtype, bound, fused_check):
    model = make_tiny_model(arch, dtype=dtype)
    prompt = make_prompt(4, 9)
    golden = model.generate(prompt, **GREEDY)
    tokens, call = protected_run(model, prompt, ABFT(roles="all_linear", bound=bound, fused_check=fused_check))
    assert call.detections == []
    assert torch.equal(tokens, golden)


# ----- computation faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, fused_check",
    [(torch.float32, True), (torch.float32, False), (torch.float64, True), (torch.bfloat16, True), (torch.float16, True)],
)
def test_exponent_flip_detected_and_corrected(dtype, fused_check):
    model = make_tiny_model("llama", dtype=dtype)
    prompt = make_prompt(3, 7)
    golden = model.generate(prompt, **GREEDY)
    flip = FlipOnce(row=1, bit=EXPONENT_MSB[dtype])
    abft = ABFT(fused_check=fused_check)
    tokens, call = protected_run(model, prompt, abft, model.model.layers[1].mlp.down_proj, flip)
    assert flip.fired == 1
    (detection,) = call.detections
    assert detection.check in ("output_checksum", "nonfinite_output")
    assert detection.row == 1
    assert detection.stage == "first_token"
    assert detection.action == "recomputed"
    assert torch.equal(tokens, golden)


def test_probabilistic_bound_is_tighter(tiny_llama):
    guard.protect(tiny_llama, [ABFT(bound="probabilistic")])
    tight_gamma, tight_u = guard.protected_mitigations(tiny_llama)[0].layers[1].tolerance_factors(torch.float32)
    guard.unprotect(tiny_llama)
    guard.protect(tiny_llama, [ABFT()])
    worst_gamma, worst_u = guard.protected_mitigations(tiny_llama)[0].layers[1].tolerance_factors(torch.float32)
    guard.unprotect(tiny_llama)

    assert tight_gamma < worst_gamma
    assert tight_u == worst_u


def test_unchecked_layer_not_detected(tiny_llama):
    flip = FlipOnce(bit=30)
    _, call = protected_run(tiny_llama, make_prompt(2, 6), ABFT(), tiny_llama.model.layers[0].mlp.gate_proj, flip)
    assert flip.fired == 1
    assert call.detections == []


def test_prefill_fault_reports_prefill_stage(tiny_llama):
    flip = FlipOnce(row=0, position=2, bit=30)
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(), tiny_llama.model.layers[0].self_attn.o_proj, flip)
    (detection,) = call.detections
    assert detection.stage == "prefill"
    assert torch.equal(tokens, golden)


def test_stage_selection_skips_other_stages(tiny_llama):
    flip = FlipOnce(bit=30)
    _, call = protected_run(
        tiny_llama, make_prompt(2, 6), ABFT(stages="decode"), tiny_llama.model.layers[1].mlp.down_proj, flip
    )
    assert flip.fired == 1
    assert call.detections == []


def test_nan_output_detected(tiny_llama):
    class SetNaN(FlipOnce):
        def __call__(self, module, args, output):
            if self.fired or output.shape[1] < 2:
                return None
            self.fired += 1
            output = output.clone()
            output[0, -1, 0] = float("nan")
            return output

    prompt = make_prompt(1, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(), tiny_llama.model.layers[0].mlp.down_proj, SetNaN())
    assert [d.check for d in call.detections] == ["nonfinite_output"]
    assert torch.equal(tokens, golden)


def test_locate_correction_fixes_element(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipOnce(row=1, bit=30)
    tokens, call = protected_run(
        tiny_llama, prompt, ABFT(correction="locate"), tiny_llama.model.layers[1].mlp.down_proj, flip
    )
    (detection,) = call.detections
    assert detection.action == "corrected"
    assert torch.equal(tokens, golden)


def test_correction_none_only_reports(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipOnce(row=0, bit=30)
    tokens, call = protected_run(
        tiny_llama, prompt, ABFT(correction="none"), tiny_llama.model.layers[1].mlp.down_proj, flip
    )
    (detection,) = call.detections
    assert detection.action == "none"
    assert not torch.equal(tokens, golden)


def test_decode_step_fault_detected(tiny_llama):
    class FlipAtDecode:
        fired = 0

        def __call__(self, module, args, output):
            if self.fired or output.shape[1] != 1:
                return None
            self.fired += 1
            output = output.clone()
            output[0, 0, 1:2].view(torch.int32).__ixor__(1 << 30)
            return output

    prompt = make_prompt(1, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(), tiny_llama.model.layers[0].mlp.down_proj, FlipAtDecode())
    (detection,) = call.detections
    assert detection.stage == "decode"
    assert detection.step == 1
    assert torch.equal(tokens, golden)


class FlipAtStep:
    """Forward hook flipping bit 30 of output element 1 of ``row`` once, on decode step ``step``."""

    def __init__(self, step=2, row=0):
        self.step, self.row = step, row
        self.decode_calls = 0
        self.fired = 0

    def __call__(self, module, args, output):
        if output.shape[1] != 1:
            return None
        self.decode_calls += 1
        if self.fired or self.decode_calls != self.step:
            return None
        self.fired += 1
        return self.fire(output)

    def fire(self, output):
        """Return a copy of ``output`` with the bit flipped."""
        output = output.clone()
        output[self.row, 0, 1:2].view(torch.int32).__ixor__(1 << 30)
        return output


@pytest.mark.parametrize("fused_check", [True, False], ids=["kernel", "operators"])
@pytest.mark.parametrize("decode_check", ["per_pass", "per_layer"])
def test_decode_fault_at_later_step_corrected(tiny_llama, decode_check, fused_check):
    prompt = make_prompt(3, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipAtStep(step=3, row=1)
    abft = ABFT(decode_check=decode_check, fused_check=fused_check)
    tokens, call = protected_run(tiny_llama, prompt, abft, tiny_llama.model.layers[1].self_attn.o_proj, flip)
    assert flip.fired == 1
    (detection,) = call.detections
    assert (detection.stage, detection.step, detection.row, detection.layer, detection.action) == (
        "decode", 3, 1, 1, "recomputed"
    )
    assert torch.equal(tokens, golden)


def test_per_pass_recomputes_faulty_step(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    _, clean_call = protected_run(tiny_llama, prompt, ABFT())
    tokens, call = protected_run(tiny_llama, prompt, ABFT(), tiny_llama.model.layers[0].mlp.down_proj, FlipAtStep(2))
    assert clean_call.extra_forward_passes == 0
    assert call.extra_forward_passes == 1
    assert call.detections[0].detail.endswith("the decode step was recomputed")
    assert torch.equal(tokens, golden)


def test_per_pass_report_only(tiny_llama):
    prompt = make_prompt(1, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipAtStep(2)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(correction="none"), tiny_llama.model.layers[0].mlp.down_proj, flip)
    (detection,) = call.detections
    assert (detection.step, detection.action) == (2, "none")
    assert call.extra_forward_passes == 0
    assert not torch.equal(tokens, golden)


def test_per_pass_static_cache_fallback(tiny_llama):
    """A static cache is written in place and cannot be rolled back, so each layer is checked as it runs."""
    prompt = make_prompt(2, 6)
    static = dict(GREEDY, cache_implementation="static")
    golden = tiny_llama.generate(prompt, **static)
    guard.protect(tiny_llama, ABFT())
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(FlipAtStep(2), prepend=True)
    try:
        tokens = tiny_llama.generate(prompt, **static)
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    (detection,) = call.detections
    assert (detection.step, detection.action, detection.detail.endswith("recomputed")) == (2, "recomputed", False)
    assert call.extra_forward_passes == 0
    assert torch.equal(tokens, golden)


class NestedPassAtStep(FlipAtStep):
    """Forward hook that runs one redundant 3-token forward of ``model`` inside decode step ``step``."""

    def __init__(self, model, step=2):
        super().__init__(step)
        self.model = model

    def fire(self, output):
        from guard.stages import StageTracker

        with StageTracker.of(self.model).redundant():
            self.model(make_prompt(2, 3, seed=5))
        return None


class FlipInThreeTokenPass(FlipAtStep):
    """Forward hook flipping an output bit once, in the first forward over 3 positions."""

    def __call__(self, module, args, output):
        if output.shape[1] != 3 or self.fired:
            return None
        self.fired += 1
        return self.fire(output)


@pytest.mark.parametrize("fault_in", ["step", "nested_pass"])
def test_pass_nested_in_decode_step(tiny_llama, fault_in):
    """A pass run inside a decode step is checked layer by layer, and the step's later layers still wait for its end."""
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    nested = NestedPassAtStep(tiny_llama, step=2)
    flip = FlipAtStep(step=2, row=1) if fault_in == "step" else FlipInThreeTokenPass(row=1)
    guard.protect(tiny_llama, ABFT())
    handles = [
        tiny_llama.model.layers[0].register_forward_hook(nested),
        tiny_llama.model.layers[1].self_attn.o_proj.register_forward_hook(flip, prepend=True),
    ]
    try:
        tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        for handle in handles:
            handle.remove()
        guard.unprotect(tiny_llama)
    assert nested.fired == 1
    assert flip.fired == 1
    (detection,) = call.detections
    assert (detection.step, detection.row, detection.action) == (2, 1, "recomputed")
    # A fault in the step is found when the step ends, one in the nested pass at its layer.
    assert detection.detail.endswith("the decode step was recomputed") == (fault_in == "step")
    assert torch.equal(tokens, golden)


def test_rollback_keeps_length_not_tensors():
    """A DynamicLayer is rolled back by cutting its keys and values to the step's starting length."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from mitigations.abft import _PendingPass

    layer = DynamicLayer()
    layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    sliding.update(torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))
    keys, values, sliding_keys = layer.keys.clone(), layer.values.clone(), sliding.keys
    pending = _PendingPass(info=None)
    pending.remember_cache([layer, sliding])
    layer.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    sliding.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4))
    pending.roll_back_cache()
    assert pending.cache_lengths == [5, None]
    # Only the sliding-window layer, which drops old positions, keeps references to its tensors.
    assert not any(torch.is_tensor(value) for value in pending.cache_state[0].values())
    assert pending.cache_state[1]["keys"] is sliding_keys
    assert torch.equal(layer.keys, keys)
    assert torch.equal(layer.values, values)
    assert sliding.keys is sliding_keys


@pytest.mark.parametrize("roles", [("o_proj", "down_proj"), "all_linear"])
def test_decode_checks_fault_free(tiny_llama, roles):
    prompt = make_prompt(3, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    per_pass, pass_call = protected_run(tiny_llama, prompt, ABFT(roles=roles))
    per_layer, layer_call = protected_run(tiny_llama, prompt, ABFT(roles=roles, decode_check="per_layer"))
    assert pass_call.detections == layer_call.detections == []
    assert torch.equal(per_pass, golden)
    assert torch.equal(per_layer, golden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_pass_in_half_precision(dtype):
    """Half-precision inputs are stacked, then widened to the float32 check format."""
    model = make_tiny_model("llama", dtype=dtype)
    prompt = make_prompt(2, 6)
    golden = model.generate(prompt, **GREEDY)
    _, clean_call = protected_run(model, prompt, ABFT(roles="all_linear"))
    flip = FlipAtStep(2, row=1)
    flip_bit = 14  # exponent MSB of both 16-bit formats

    def flip16(module, args, output):
        if output.shape[1] != 1:
            return None
        flip.decode_calls += 1
        if flip.decode_calls != flip.step:
            return None
        output = output.clone()
        output[1, 0, 1:2].view(torch.int16).__ixor__(1 << flip_bit)
        return output

    tokens, call = protected_run(model, prompt, ABFT(), model.model.layers[0].mlp.down_proj, flip16)
    assert clean_call.detections == []
    assert [(d.step, d.row, d.action) for d in call.detections] == [(2, 1, "recomputed")]
    assert call.detections[0].detail.endswith("the decode step was recomputed")
    assert torch.equal(tokens, golden)


def test_per_pass_with_bias_and_conv1d():
    """GPT-2 layers carry biases and store W as [in, out], and both enter the stacked checksums."""
    model = make_tiny_model("gpt2")
    prompt = make_prompt(2, 6)
    golden = model.generate(prompt, **GREEDY)
    _, clean_call = protected_run(model, prompt, ABFT(roles="all_linear"))
    tokens, call = protected_run(model, prompt, ABFT(roles="all_linear"), model.transformer.h[1].mlp.c_fc, FlipAtStep(2))
    assert clean_call.detections == []
    assert [(d.step, d.layer, d.action) for d in call.detections] == [(2, 1, "recomputed")]
    assert call.detections[0].detail.endswith("the decode step was recomputed")
    assert torch.equal(tokens, golden)


def test_per_pass_inference_mode_buffers(tiny_llama):
    """Stacking buffers made during an inference-mode generate stay writable by a later plain one."""
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    guard.protect(tiny_llama, ABFT())
    try:
        with torch.inference_mode():
            first = tiny_llama.generate(prompt, **GREEDY)
        with torch.no_grad():
            second = tiny_llama.generate(prompt, **GREEDY)
    finally:
        guard.unprotect(tiny_llama)
    assert torch.equal(first, golden)
    assert torch.equal(second, golden)


def test_per_pass_batch_size_changes(tiny_llama):
    """Scratch buffers grow for a larger batch and serve a smaller one after it."""
    small, large = make_prompt(1, 6), make_prompt(3, 6)
    golden_small, golden_large = tiny_llama.generate(small, **GREEDY), tiny_llama.generate(large, **GREEDY)
    down_proj = tiny_llama.model.layers[1].mlp.down_proj
    guard.protect(tiny_llama, ABFT(roles="all_linear"))
    try:
        first = tiny_llama.generate(small, **GREEDY)
        handle = down_proj.register_forward_hook(FlipAtStep(2, row=2), prepend=True)
        try:
            second = tiny_llama.generate(large, **GREEDY)
        finally:
            handle.remove()
        call = guard.get_report(tiny_llama).last_call
        third = tiny_llama.generate(small, **GREEDY)
    finally:
        guard.unprotect(tiny_llama)
    assert [(d.step, d.row) for d in call.detections] == [(2, 2)]
    assert torch.equal(first, golden_small)
    assert torch.equal(second, golden_large)
    assert torch.equal(third, golden_small)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
@pytest.mark.parametrize("role", ["k_proj", "v_proj", "up_proj"])
def test_fault_in_layer_sharing_input(tiny_llama, role, stage):
    """A layer that reads the same input as an earlier checked layer is still checked on its own output."""
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    block = tiny_llama.model.layers[1]
    module = getattr(block.mlp if role == "up_proj" else block.self_attn, role)
    flip = FlipOnce(row=1, bit=30) if stage == "prefill" else FlipAtStep(2, row=1)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(roles="all_linear"), module, flip)
    assert flip.fired == 1
    (detection,) = call.detections
    assert detection.module.endswith(f"layers.1.{'mlp' if role == 'up_proj' else 'self_attn'}.{role}")
    assert detection.row == 1
    assert detection.action == "recomputed"
    assert torch.equal(tokens, golden)


def test_shared_abs_input_refilled_on_change(tiny_llama):
    """The |x| buffer shared by layers with one input is reused, and refilled when that input changes."""
    guard.protect(tiny_llama, ABFT(roles="all_linear"))
    try:
        abft = guard.protected_mitigations(tiny_llama)[0]
        x = torch.randn(2, 3, 16)
        first = abft._abs_input(x, x.reshape(1, -1, 16))
        expected_first = x.abs().reshape(1, -1, 16)
        first_matches = torch.equal(first, expected_first)
        first.fill_(-1.0)  # a marker: a second reader of the unchanged x must get the buffer as is
        reused = abft._abs_input(x, x.reshape(1, -1, 16)).clone()
        x.mul_(-3)
        changed = abft._abs_input(x, x.reshape(1, -1, 16)).clone()
    finally:
        guard.unprotect(tiny_llama)
    assert first_matches
    assert torch.equal(reused, torch.full_like(reused, -1.0))
    assert torch.equal(changed, x.abs().reshape(1, -1, 16))


def _kept_call(layer, rows=2, corrupt=False):
    """Return ``(x, y)`` of one decode-shaped call of a checked layer, optionally with a flipped exponent."""
    x = torch.randn(rows, 1, layer.in_features)
    y = layer.site.module(x).detach()
    if corrupt:
        y = y.clone()
        y[rows - 1, 0, 1:2].view(torch.int32).__ixor__(1 << 30)
    return x, y


@pytest.mark.parametrize("fused_check", [True, False], ids=["kernel", "operators"])
@pytest.mark.parametrize(
    "calls, failing",
    [
        ([(0, False), (0, True)], [(0, 1)]),  # a layer run twice in a step: the second call is checked alone
        ([(0, False), (1, True)], [(1, 1)]),  # a group where not every layer ran
        ([(0, True)], [(0, 1)]),
    ],
    ids=["repeated_call", "partial_group_second", "partial_group_first"],
)
def test_step_check_uneven_calls(tiny_llama, calls, failing, fused_check):
    """The step check covers repeated calls and groups whose layers did not all run."""
    from mitigations.abft import _PendingPass

    guard.protect(tiny_llama, ABFT(roles=["down_proj"], fused_check=fused_check))
    try:
        abft = guard.protected_mitigations(tiny_llama)[0]
        layers = list(abft.layers)
        pending = _PendingPass(info=None)
        with torch.no_grad():
            for index, corrupt in calls:
                abft._keep(pending, abft.layers[index], *_kept_call(abft.layers[index], corrupt=corrupt))
            failures = abft._verify_pass(pending)
    finally:
        guard.unprotect(tiny_llama)
    assert [(layers.index(layer), rows.tolist()) for layer, rows, _, _ in failures] == [
        (index, [row]) for index, row in failing
    ]


@pytest.mark.parametrize("fused_check, stack_type", [(True, "_TermStack"), (False, "_CopyStack")])
def test_decode_stack_type_follows_fused_check(tiny_llama, fused_check, stack_type):
    """float32 decode steps go through the kernel when it is enabled, and through copies otherwise."""
    guard.protect(tiny_llama, ABFT(fused_check=fused_check))
    try:
        tiny_llama.generate(make_prompt(2, 6), **GREEDY)
        stacks = guard.protected_mitigations(tiny_llama)[0]._stacks
        types = {type(stack).__name__ for stack in stacks.values()}
    finally:
        guard.unprotect(tiny_llama)
    assert types == {stack_type}


def _check_operands(layers, rows, in_features, out_features, dtype, bias, faults=True):
    """Return random stacked ``x``, ``y`` and their checksums; ``faults`` adds faulty and non-finite rows."""
    from mitigations.abft import _Checksums

    generator = torch.Generator().manual_seed(layers * 100 + rows)
    weight = torch.randn(layers, out_features, in_features, generator=generator, dtype=torch.float64)
    bias_values = torch.randn(layers, out_features, generator=generator, dtype=torch.float64) if bias else None
    x = torch.randn(layers, rows, in_features, generator=generator, dtype=torch.float64)
    y = x @ weight.transpose(1, 2)
    if bias:
        y += bias_values.unsqueeze(1)
    x, y = x.to(dtype), y.to(dtype)
    if faults:
        y[0, 1, 3] *= 1.01  # a small error, above the float32 tolerance
        y[layers - 1, 2, 0] += 1e3  # a large error
        y[0, 3, 5] = float("nan")
        x[layers - 1, 4, 2] = float("inf")
    u = unit_roundoff(dtype)
    sums = _Checksums(
        column=weight.sum(1).to(dtype),
        abs_column=weight.abs().sum(1).to(dtype),
        bias=bias_values.sum(1, keepdim=True).to(dtype) if bias else None,
        bias_tolerance=(bias_values.abs().sum(1, keepdim=True) * 10 * u).to(dtype) if bias else None,
        magnitude_factor=4 * in_features * u,
        output_factor=4 * out_features * u,
    )
    return x, y, sums


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_check_matches_operators(dtype, bias):
    """The kernel and the operators flag the same rows and report the same differences."""
    from mitigations.abft import _compare, _fused_check, _input_terms, _output_terms

    x, y, sums = _check_operands(3, 6, 40, 24, dtype, bias)
    fused_passed, fused_difference = _fused_check(x, y, sums)
    terms = (*_input_terms(x.clone(), sums), *_output_terms(y, dtype))
    passed, difference = _compare(terms, sums)
    assert fused_passed.tolist() == passed.tolist()
    assert (~passed).sum() == 4
    finite = torch.isfinite(difference)
    assert torch.equal(torch.isfinite(fused_difference), finite)
    assert torch.allclose(fused_difference[finite], difference[finite].double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_check_passing_makes_no_tensors(dtype):
    """When every row passes, the kernel check returns None, and the operators pass every row too."""
    from mitigations.abft import _compare, _fused_check, _input_terms, _output_terms

    x, y, sums = _check_operands(3, 6, 40, 24, dtype, bias=True, faults=False)
    passed, _ = _compare((*_input_terms(x.clone(), sums), *_output_terms(y, dtype)), sums)
    assert bool(passed.all())
    assert _fused_check(x, y, sums) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_sums_in_operand_format(dtype):
    """The kernel accumulates in the operands' format: float64 keeps a term that float32 rounds away."""
    from mitigations import checksum_kernel

    if checksum_kernel.kernels() is None:
        pytest.skip("numba is not installed, so there is no kernel to test")
    x = torch.tensor([[[1.0, 1e-10]]], dtype=dtype)  # [1 layer, 1 row, 2 in]
    y = torch.tensor([[[1.0, 1e-10]]], dtype=dtype)
    column = torch.ones(1, 2, dtype=dtype)
    terms = checksum_kernel.stack_terms(x, y, column, column)  # [1, 4, 1]
    expected = float(torch.tensor(1.0, dtype=dtype) + torch.tensor(1e-10, dtype=dtype))
    assert terms[0, :, 0].tolist() == [expected] * 4
    assert (expected == 1.0) == (dtype == torch.float32)


def test_install_prepares_checksums(tiny_llama):
    """protect() builds the check operands for the weights' format, so the first call does not."""
    guard.protect(tiny_llama, ABFT(roles="all_linear"))
    try:
        abft = guard.protected_mitigations(tiny_llama)[0]
        layer_keys = {key for layer in abft.layers for key in layer._checksums}
        stacked_groups = {key[0] for key in abft._stacked}
        groups = {tuple(id(layer) for layer in members) for members in abft._groups.values()}
    finally:
        guard.unprotect(tiny_llama)
    assert layer_keys == {(torch.float32, torch.float32)}
    assert stacked_groups == groups


def test_kernel_missing_falls_back_to_operators(tiny_llama, monkeypatch):
    """Without numba the check runs on PyTorch operators and still corrects a fault."""
    from mitigations import checksum_kernel

    monkeypatch.setattr(checksum_kernel, "_kernels", None)
    monkeypatch.setattr(checksum_kernel, "_loaded", True)
    prompt = make_prompt(3, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipAtStep(step=3, row=1)
    guard.protect(tiny_llama, ABFT())
    handle = tiny_llama.model.layers[1].self_attn.o_proj.register_forward_hook(flip, prepend=True)
    try:
        tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
        stacks = guard.protected_mitigations(tiny_llama)[0]._stacks
        types = {type(stack).__name__ for stack in stacks.values()}
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert types == {"_CopyStack"}
    (detection,) = call.detections
    assert (detection.step, detection.row, detection.action) == (3, 1, "recomputed")
    assert torch.equal(tokens, golden)


def _parallel_or_skip():
    from mitigations import checksum_kernel

    if checksum_kernel.kernels() is None or not checksum_kernel._threads_allowed():
        pytest.skip("numba has no thread-safe threading layer on this machine, so the checks stay serial")
    return checksum_kernel


def test_parallel_prompt_terms_equal_serial():
    """Splitting a prompt pass's rows across threads gives the serial kernel's sums bit for bit."""
    checksum_kernel = _parallel_or_skip()
    rows = checksum_kernel.PARALLEL_MIN_ROWS + 37
    x, y, sums = _check_operands(1, rows, 40, 24, torch.float32, bias=False)
    parallel = checksum_kernel.stack_terms(x, y, sums.column, sums.abs_column)
    serial = np.empty_like(parallel)
    checksum_kernel.kernels().stack_terms(x.numpy(), y.numpy(), sums.column.numpy(), sums.abs_column.numpy(), serial)
    assert checksum_kernel._threads.confirmed
    assert np.array_equal(parallel, serial, equal_nan=True)


def test_parallel_prompt_fault_corrected(tiny_llama, monkeypatch):
    """A prompt pass with enough rows for the parallel kernel still has its fault found and corrected."""
    checksum_kernel = _parallel_or_skip()
    launches = []
    original = checksum_kernel._confirm_layer
    monkeypatch.setattr(checksum_kernel, "_confirm_layer", lambda: launches.append(1) or original())
    prompt = make_prompt(8, 10)  # 80 rows per layer
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipOnce(row=5, position=4, bit=30)
    tokens, call = protected_run(tiny_llama, prompt, ABFT(), tiny_llama.model.layers[1].mlp.down_proj, flip)
    assert launches  # the prompt pass went through the parallel kernel
    (detection,) = call.detections
    assert (detection.stage, detection.row, detection.action) == ("prefill", 5, "recomputed")
    assert torch.equal(tokens, golden)


def test_threads_rejected_after_fork_or_workqueue(monkeypatch):
    """Parallel kernels run only in the deciding process and only on a thread-safe numba layer."""
    import numba

    from mitigations import checksum_kernel

    monkeypatch.setattr(checksum_kernel, "_threads", checksum_kernel._ThreadPolicy(pid=-1, allowed=True))
    assert checksum_kernel._threads_allowed() is False
    monkeypatch.setattr(checksum_kernel, "_threads", None)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert checksum_kernel._threads_allowed() is False


def test_kernel_compiles_without_disk_cache(monkeypatch):
    """Where numba finds no writable cache folder, the kernels compile without one."""
    from mitigations import checksum_kernel

    build = checksum_kernel._build
    calls = []

    def build_without_locator(numba, cache):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'call_terms': no locator available")
        return build(numba, cache)

    monkeypatch.setattr(checksum_kernel, "_build", build_without_locator)
    monkeypatch.setattr(checksum_kernel, "_loaded", False)
    monkeypatch.setattr(checksum_kernel, "_kernels", None)
    kernels = checksum_kernel.kernels()
    x, y = torch.ones(1, 2, 3), torch.ones(1, 2, 4)
    terms = checksum_kernel.stack_terms(x, y, torch.ones(1, 3), torch.ones(1, 3))
    assert calls == [True, False]
    assert kernels is not None
    assert terms[0, :, 0].tolist() == [3.0, 3.0, 4.0, 4.0]


def test_moe_step_checksums_cached_per_group():
    """Expert subsets that change from step to step reuse their group's stacked checksums."""
    model = make_tiny_model("qwen2_moe")
    prompt = make_prompt(3, 7)
    options = dict(GREEDY, max_new_tokens=24)
    golden = model.generate(prompt, **options)
    guard.protect(model, ABFT(roles="all_linear"))
    try:
        tokens = model.generate(prompt, **options)
        abft = guard.protected_mitigations(model)[0]
        # Allowed entries: a whole group, or one layer checked alone (an expert that got a
        # different number of tokens than the first one of its group).
        allowed = {tuple(id(layer) for layer in group) for group in abft._groups.values()}
        allowed |= {(id(layer),) for layer in abft.layers}
        cached = [key[0] for key in abft._stacked]
    finally:
        guard.unprotect(model)
    assert torch.equal(tokens, golden)
    assert cached
    assert all(layers in allowed for layers in cached)


def test_plain_forward_corrected(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama(prompt).logits
    guard.protect(tiny_llama, ABFT())
    handle = tiny_llama.model.layers[0].mlp.down_proj.register_forward_hook(FlipOnce(bit=30), prepend=True)
    try:
        logits = tiny_llama(prompt).logits
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert call.kind == "forward"
    assert len(call.detections) == 1
    assert torch.equal(logits, golden)


def test_install_order_does_not_matter(tiny_llama):
    """A fault hook registered before protect is still seen, because it is prepended."""
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    flip = FlipOnce(row=1, bit=30)
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(flip, prepend=True)
    guard.protect(tiny_llama, ABFT())
    try:
        tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
        handle.remove()
    assert len(call.detections) == 1
    assert torch.equal(tokens, golden)


# ----- weights in memory ----------------------------------------------------------------------


def flip_weight_bit(weight, row, column, bit):
    bits = weight.detach().view(INT_OF[weight.element_size()])
    bits[row, column] ^= 1 << bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weight_flip_restored_exactly(arch, dtype):
    model = make_tiny_model(arch, dtype=dtype)
    prompt = make_prompt(2, 6)
    golden = model.generate(prompt, **GREEDY)
    guard.protect(model, ABFT())
    weight = guard.protected_mitigations(model)[0].layers[1].site.weight
    original = weight.detach().clone()
    flip_weight_bit(weight, 3, 5, EXPONENT_MSB[dtype])
    try:
        tokens = model.generate(prompt, **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    bits = INT_OF[weight.element_size()]
    assert torch.equal(weight.detach().view(bits), original.view(bits))
    assert [(d.check, d.action) for d in call.detections] == [("weight_checksum", "restored")]
    assert torch.equal(tokens, golden)


def test_weight_flips_in_two_rows_restored(tiny_llama):
    guard.protect(tiny_llama, ABFT())
    abft = guard.protected_mitigations(tiny_llama)[0]
    weight = abft.layers[0].site.weight
    original = weight.detach().clone()
    flip_weight_bit(weight, 1, 2, 30)
    flip_weight_bit(weight, 7, 20, 29)
    try:
        restored = abft.scrub()
    finally:
        guard.unprotect(tiny_llama)
    assert restored == 1
    assert torch.equal(weight.detach().view(torch.int32), original.view(torch.int32))


def test_bias_flip_restored():
    model = make_tiny_model("gpt2")
    prompt = make_prompt(1, 6)
    golden = model.generate(prompt, **GREEDY)
    guard.protect(model, ABFT())
    bias = model.transformer.h[0].mlp.c_proj.bias
    original = bias.detach().clone()
    bias.detach().view(torch.int32)[4] ^= 1 << 30
    try:
        tokens = model.generate(prompt, **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    assert torch.equal(bias.detach(), original)
    assert call.detections[0].check == "weight_checksum"
    assert torch.equal(tokens, golden)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_weight_fault_during_generate_restored(tiny_llama, stage):
    """A weight corrupted after the start-of-generate scrub is caught by the output check.

    On a decode step the mismatch recurs when the step is recomputed, which scrubs the weight.
    """
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    guard.protect(tiny_llama, ABFT())
    weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    decode_calls = []

    def corrupt(module, args):
        if args[0].shape[1] == 1:
            decode_calls.append(1)
        due = args[0].shape[1] > 1 if stage == "prefill" else len(decode_calls) == 2
        if due and torch.equal(weight.detach(), original):
            flip_weight_bit(weight, 4, 9, 30)

    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_pre_hook(corrupt)
    try:
        tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    actions = [(d.check, d.action) for d in call.detections]
    assert "output_checksum" in [check for check, _ in actions]
    assert ("weight_checksum", "restored") in actions
    assert torch.equal(weight.detach(), original)
    assert torch.equal(tokens, golden)


# ----- with the fault injector ------------------------------------------------------------------


def resolve(model, spec, batch_size, seed=0, prompt_length=7):
    return resolve_faults(
        model, FaultSpec.from_dict(spec), seed=seed, n=1,
        prompt_length=prompt_length, max_new_tokens=GREEDY["max_new_tokens"], batch_size=batch_size,
    )


@pytest.mark.parametrize("role", ["down_proj", "o_proj"])
def test_injected_exponent_flip_corrected(tiny_llama, role):
    prompt = make_prompt(3, 7)
    golden = tiny_llama.generate(prompt, **GREEDY)
    spec = {
        "site": {"role": role},
        "time": {"stage": "first_token", "row": 2},
        "corruption": {"bit": 30},
    }
    faults = resolve(tiny_llama, spec, batch_size=3, seed=5)
    injector = Injector(tiny_llama)
    with injector.armed(faults):
        corrupted = tiny_llama.generate(prompt, **GREEDY)
    guard.protect(tiny_llama, ABFT())
    try:
        with injector.armed(faults):
            tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
    assert len(injector.fired) == 1
    assert not torch.equal(corrupted, golden)
    assert [(d.row, d.layer, d.action) for d in call.detections] == [(2, faults[0].layer, "recomputed")]
    assert torch.equal(tokens, golden)


def test_injected_persistent_weight_fault_restored(tiny_llama):
    prompt = make_prompt(2, 7)
    golden = tiny_llama.generate(prompt, **GREEDY)
    spec = {
        "site": {"kind": "weight", "role": "down_proj", "layers": [0], "param": "weight", "persistent": True},
        "time": {"stage": "first_token"},
        "corruption": {"bit": 30},
    }
    faults = resolve(tiny_llama, spec, batch_size=2, seed=1)
    injector = Injector(tiny_llama)
    guard.protect(tiny_llama, ABFT())
    try:
        with injector.armed(faults):
            tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
    assert len(injector.fired) == 1
    assert ("weight_checksum", "restored") in [(d.check, d.action) for d in call.detections]
    assert torch.equal(tokens, golden)
