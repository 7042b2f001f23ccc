"""The mitigations on the real SmolLM2-135M-Instruct: exactness, false alarms and recovery."""

from __future__ import annotations

import pytest
import torch

import guard
from injectors import FaultSpec, Injector, resolve_faults
from mitigations import ABFT, DualFirstToken, DynamicShots, MixedPrecision

NEW_TOKENS = 8
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
EXACT = ["abft", "dual_first_token", "dynamic_shots"]

pytestmark = pytest.mark.e2e


def arithmetic_prompts(count=50):
    return [f"Question: what is {a} + {b}?\nAnswer:" for a, b in zip(range(2, 2 + count), range(40, 40 + count))]


def encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def batch(smollm2):
    model, tokenizer = smollm2
    inputs = encode(tokenizer, arithmetic_prompts())
    golden = model.generate(**inputs, **GREEDY)
    return inputs, golden


def first_token_faults(model, inputs, role, seed, n=1, row=None):
    time = {"stage": "first_token"}
    if row is not None:
        time["row"] = row
    spec = FaultSpec.from_dict({"site": {"role": role}, "time": time, "corruption": {"field": "exponent_msb"}})
    return resolve_faults(
        model, spec, seed=seed, n=n, prompt_length=inputs["input_ids"].shape[1],
        max_new_tokens=NEW_TOKENS, batch_size=inputs["input_ids"].shape[0],
    )


def test_fault_free_tokens_equal_fifty_prompts(smollm2, batch):
    model, _ = smollm2
    inputs, golden = batch
    guard.protect(model, EXACT, abft={"roles": "all_linear"})
    try:
        tokens = model.generate(**inputs, **GREEDY)
        report = guard.get_report(model)
    finally:
        guard.unprotect(model)
    assert tokens.shape[0] == 50
    assert torch.equal(tokens, golden)
    assert report.total_detections == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_abft_no_false_alarm(smollm2, batch, dtype):
    """Every linear layer checked over 50 prompts: not one detection in any format."""
    from evals.models import load_model

    if dtype == "float32":
        model, _ = smollm2
        inputs, golden = batch
    else:
        model, tokenizer = load_model("smollm2-135m", dtype=dtype)
        inputs = encode(tokenizer, arithmetic_prompts())
        golden = model.generate(**inputs, **GREEDY)
    guard.protect(model, ABFT(roles="all_linear"))
    try:
        tokens = model.generate(**inputs, **GREEDY)
        report = guard.get_report(model)
    finally:
        guard.unprotect(model)
    assert report.total_detections == 0
    assert report.total_forward_passes == NEW_TOKENS
    assert torch.equal(tokens, golden)


def test_abft_exponent_flip_detected_and_corrected(smollm2):
    model, tokenizer = smollm2
    inputs = encode(tokenizer, arithmetic_prompts(4))
    golden = model.generate(**inputs, **GREEDY)
    faults = first_token_faults(model, inputs, "down_proj", seed=11, row=2)
    guard.protect(model, ABFT())
    injector = Injector(model)
    try:
        with injector.armed(faults):
            tokens = model.generate(**inputs, **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    assert len(injector.fired) == 1
    assert [(d.row, d.layer, d.stage, d.action) for d in call.detections] == [
        (2, faults[0].layer, "first_token", "recomputed")
    ]
    assert torch.equal(tokens, golden)


def test_dual_first_token_recovers_fault(smollm2):
    model, tokenizer = smollm2
    inputs = encode(tokenizer, arithmetic_prompts(4))
    golden = model.generate(**inputs, **GREEDY)
    faults = first_token_faults(model, inputs, "o_proj", seed=4, row=1)
    injector = Injector(model)
    with injector.armed(faults):
        corrupted = model.generate(**inputs, **GREEDY)
    guard.protect(model, DualFirstToken())
    try:
        with injector.armed(faults):
            tokens = model.generate(**inputs, **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    assert not torch.equal(corrupted, golden)
    assert [(d.row, d.action) for d in call.detections] == [(1, "voted")]
    assert torch.equal(tokens, golden)


ROUND_TRIP = {
    "abft": lambda: [ABFT()],
    "mixed_precision": lambda: [MixedPrecision()],
    "dual_first_token": lambda: [DualFirstToken()],
    "dynamic_shots": lambda: [DynamicShots()],
    "all_four": lambda: [ABFT(), MixedPrecision(), DualFirstToken(), DynamicShots()],
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip(smollm2, name):
    """protect -> same output -> fault detected (and corrected) -> unprotect -> identical output."""
    model, tokenizer = smollm2
    inputs = encode(tokenizer, arithmetic_prompts(4))
    golden = model.generate(**inputs, **GREEDY)
    # A NaN-producing flip (exponent field all ones) at the first token of layer 3's down_proj.
    spec = FaultSpec.from_dict({
        "site": {"role": "down_proj", "layers": [3]}, "time": {"stage": "first_token", "row": 0},
        "corruption": {"mode": "set", "value": "nan"},
    })
    faults = resolve_faults(model, spec, seed=0, n=1, prompt_length=inputs["input_ids"].shape[1],
                            max_new_tokens=NEW_TOKENS, batch_size=4)
    guard.protect(model, ROUND_TRIP[name]())
    injector = Injector(model)
    try:
        fault_free = model.generate(**inputs, **GREEDY)
        with injector.armed(faults):
            recovered = model.generate(**inputs, **GREEDY)
        call = guard.get_report(model).last_call
    finally:
        guard.unprotect(model)
    assert torch.equal(fault_free, golden)
    assert call.detections, "the fault was not detected"
    if name != "mixed_precision":  # a clamp bounds the value, it does not restore it
        assert torch.equal(recovered, golden)
    assert torch.equal(model.generate(**inputs, **GREEDY), golden)
