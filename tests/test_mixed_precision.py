"""Mixed precision: compute-format policy, saturating clamps, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch

import guard
from guard import ConfigError
from mitigations import MixedPrecision
from mitigations.mixed_precision import MixedPrecisionConfig
from tests.tiny_models import make_prompt, make_tiny_model

GREEDY = dict(max_new_tokens=6, do_sample=False)


class SetOnce:
    def __init__(self, value, row=0, element=2):
        self.value, self.row, self.element = value, row, element
        self.fired = 0

    def __call__(self, module, args, output):
        if self.fired or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        output[self.row, -1, self.element] = self.value
        return output


class RecordPromptOutput:
    """Keeps the output of the first single-row prompt call (skipping the calibration pass)."""

    def __init__(self):
        self.output = None

    def __call__(self, module, args, output):
        if self.output is None and output.shape[0] == 1 and output.shape[1] > 1:
            self.output = output.detach().clone()


def run_protected(model, prompt, mitigation, module=None, hook=None, recorder=None):
    """Generate under ``mitigation`` with ``hook`` prepended on ``module`` and ``recorder`` appended after the clamp."""
    guard.protect(model, mitigation)
    handle = module.register_forward_hook(hook, prepend=True) if module is not None else None
    if recorder is not None:
        recorder_handle = module.register_forward_hook(recorder)
    try:
        tokens = model.generate(prompt, **GREEDY)
        installed = guard.protected_mitigations(model)[0]
        return tokens, guard.get_report(model).last_call, installed
    finally:
        if handle is not None:
            handle.remove()
        if recorder is not None:
            recorder_handle.remove()
        guard.unprotect(model)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(compute_dtype="float8"), "compute_dtype='float8' is not valid"),
        (dict(clamp="soft"), "clamp='soft' is not valid"),
        (dict(clamp=-1.0), "clamp=-1.0 is not valid"),
        (dict(margin=0.5), "margin=0.5 is not valid"),
        (dict(nonfinite="nan"), "nonfinite='nan' is not valid"),
        (dict(compute_stages=["prefil"]), "Did you mean 'prefill'"),
        (dict(calibration=torch.zeros(4)), "calibration must be a 2-D integer tensor"),
        (dict(calibration_shape=(0, 4)), "calibration_shape=.* must be two integers"),
        (dict(roles=[]), "mixed_precision.roles is empty"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=message):
        MixedPrecision(**options)


def test_narrower_compute_dtype_rejected(tiny_llama):
    with pytest.raises(ConfigError, match="narrower than the model's torch.float64"):
        guard.protect(tiny_llama.to(torch.float64), MixedPrecision(compute_dtype="float32"))
    assert not guard.is_protected(tiny_llama)


def test_integer_model_rejected():
    class IntegerLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_parameter("codes", torch.nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))

        def generate(self, *args, **kwargs):
            return None

    with pytest.raises(ConfigError, match="has no floating-point parameters"):
        guard.protect(IntegerLM(), MixedPrecision())


def test_selection_matching_nothing(tiny_llama):
    with pytest.raises(ConfigError, match="mixed_precision: .* match no linear layer"):
        guard.protect(tiny_llama, MixedPrecision(modules=["*.nothing"]))


def test_fp32_model_tokens_unchanged(tiny_llama):
    prompt = make_prompt(3, 8)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call, installed = run_protected(tiny_llama, prompt, MixedPrecision())
    assert installed.compute_dtype is None  # auto keeps float32
    assert call.detections == []
    assert torch.equal(tokens, golden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_model_runs_selected_layers_wide(dtype):
    model = make_tiny_model("llama", dtype=dtype)
    layer = model.model.layers[0].mlp.down_proj
    guard.protect(model, MixedPrecision(clamp="none"))
    try:
        installed = guard.protected_mitigations(model)[0]
        wrapped = "forward" in layer.__dict__
        tokens = model.generate(make_prompt(2, 6), **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    assert installed.compute_dtype == torch.float32
    assert wrapped
    assert call.detections == []
    assert tokens.shape == (2, 12)
    assert "forward" not in layer.__dict__


def test_wide_forward_matches_fp32_product():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, layer.in_features).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), layer.weight.float()).to(torch.bfloat16)
    guard.protect(model, MixedPrecision(clamp="none", compute_stages="all"))
    try:
        output = layer(x)
    finally:
        guard.unprotect(model)
    assert torch.equal(output, expected)


def test_saturating_cast_keeps_finite():
    model = make_tiny_model("llama", dtype=torch.float16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.full((1, 1, layer.in_features), 60000.0, dtype=torch.float16)
    guard.protect(model, MixedPrecision(clamp="none", compute_stages="all"))
    try:
        output = layer(x)
    finally:
        guard.unprotect(model)
    assert torch.isfinite(output).all()


def test_profiled_bounds_are_margin_times_peak(tiny_llama):
    guard.protect(tiny_llama, MixedPrecision(margin=3.0))
    bounds = guard.protected_mitigations(tiny_llama)[0].bounds
    guard.unprotect(tiny_llama)
    assert set(bounds) == {
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
    }
    assert all(0 < bound < 100 for bound in bounds.values())


def test_calibration_tokens_used(tiny_llama):
    calibration = make_prompt(2, 10, seed=9)
    guard.protect(tiny_llama, MixedPrecision(calibration=calibration, margin=1.0))
    bounds = guard.protected_mitigations(tiny_llama)[0].bounds
    guard.unprotect(tiny_llama)
    peak = []

    def record_peak(module, args, output):
        peak.append(float(output.detach().abs().max()))

    hook = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(record_peak)
    with torch.no_grad():
        tiny_llama(calibration, use_cache=False)
    hook.remove()
    assert bounds["model.layers.1.mlp.down_proj"] == pytest.approx(peak[0])


@pytest.mark.parametrize("value", [1.0e30, float("inf"), float("-inf"), float("nan")])
def test_clamp_bounds_corrupted_value(tiny_llama, value):
    layer = tiny_llama.model.layers[1].mlp.down_proj
    record = RecordPromptOutput()
    _, call, installed = run_protected(tiny_llama, make_prompt(1, 6), MixedPrecision(), layer, SetOnce(value), record)
    bound = installed.bounds["model.layers.1.mlp.down_proj"]
    (detection,) = call.detections
    assert detection.action == "clamped"
    assert detection.check == ("range_clamp" if value == 1.0e30 else "nonfinite_output")
    assert detection.stage == "first_token"
    clamped = record.output[0, -1, 2].item()
    if math.isnan(value):
        expected = 0.0
    else:
        expected = math.copysign(bound, value)
    assert clamped == pytest.approx(expected)


def test_nonfinite_zero_mode(tiny_llama):
    layer = tiny_llama.model.layers[1].mlp.down_proj
    record = RecordPromptOutput()
    run_protected(tiny_llama, make_prompt(1, 6), MixedPrecision(nonfinite="zero"), layer, SetOnce(float("inf")), record)
    assert record.output[0, -1, 2].item() == 0.0


def test_format_max_only_removes_nonfinite(tiny_llama):
    layer = tiny_llama.model.layers[1].mlp.down_proj
    _, call, installed = run_protected(tiny_llama, make_prompt(1, 6), MixedPrecision(clamp="format_max"), layer, SetOnce(1.0e30))
    assert installed.bounds["model.layers.1.mlp.down_proj"] == torch.finfo(torch.float32).max
    assert call.detections == []


def test_calibration_pass_not_reported(tiny_llama):
    guard.protect(tiny_llama, MixedPrecision())
    try:
        calls = guard.get_report(tiny_llama).total_calls
    finally:
        guard.unprotect(tiny_llama)
    assert calls == 0


def test_numeric_clamp_bound(tiny_llama):
    guard.protect(tiny_llama, MixedPrecision(clamp=5.0))
    bounds = set(guard.protected_mitigations(tiny_llama)[0].bounds.values())
    guard.unprotect(tiny_llama)
    assert bounds == {5.0}


def test_default_config_documented_values():
    config = MixedPrecisionConfig()
    assert config.roles == ("o_proj", "down_proj")
    assert config.compute_stages == frozenset({"prefill", "first_token"})
    assert config.clamp == "profile"
    assert config.margin == 8.0
