"""Dynamic shots: prompt construction, retry policy, prompt-level runs and generate reruns."""

from __future__ import annotations

import math

import pytest
import torch

import guard
from guard import ConfigError
from guard.report import Detection
from mitigations import ABFT, DynamicShots
from tests.test_guard import _tiny_tokenizer
from tests.tiny_models import make_prompt

GREEDY = dict(max_new_tokens=5, do_sample=False)
EXAMPLES = [("a b", "c"), ("d e", "f"), ("g h", "i")]


def shots(**options):
    return DynamicShots(examples=EXAMPLES, example_template="{input} {output} ", **options)


# ----- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(examples=[("only input",)]), r"examples\[0\].*\(input, output\) pair"),
        (dict(template="{examples}"), "must be a string containing '\\{query\\}'"),
        (dict(example_template="{input}"), "must contain '\\{input\\}' and '\\{output\\}'"),
        (dict(validator="yes"), "validator='yes' is not callable"),
        (dict(policy="random"), "policy='random' is not valid"),
        (dict(retry_on="some"), "retry_on='some' is not valid"),
        (dict(examples=EXAMPLES, shots=[0, 5]), "each count must be an integer from 0 to the number of examples \\(3\\)"),
        (dict(examples=EXAMPLES, shots=[]), "shots is empty"),
        (dict(examples=EXAMPLES, shots=[0, 2], start=1), "start=1 is not among shots"),
        (dict(max_retries=-1), "max_retries=-1 must be an integer >= 0"),
        (dict(logit_bound=0), "logit_bound=0 must be a positive number"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=message):
        DynamicShots(**options)


# ----- decision pieces ---------------------------------------------------------------------


def test_build_prompt_uses_first_examples():
    assert shots().build_prompt("j k", 2) == "a b c d e f j k"
    assert shots().build_prompt("j k", 0) == "j k"


def test_build_prompt_rejects_too_many_shots():
    with pytest.raises(ConfigError, match="n_shots=4 must be an integer from 0 to 3"):
        shots().build_prompt("j k", 4)


def test_fewest_first_adds_examples():
    policy = shots(policy="fewest_first")
    assert policy.initial_shots() == 0
    assert [policy.next_shots(n, 1) for n in (0, 1, 2, 3)] == [1, 2, 3, 3]


def test_fewer_on_retry_removes_examples():
    policy = shots(policy="fewer_on_retry")
    assert policy.initial_shots() == 3
    assert [policy.next_shots(n, 1) for n in (3, 2, 1, 0)] == [2, 1, 0, 0]


def test_more_on_retry_from_start():
    policy = shots(policy="more_on_retry", start=1, shots=[0, 1, 3])
    assert policy.initial_shots() == 1
    assert policy.next_shots(1, 1) == 3


def test_next_shots_rejects_attempt_zero():
    with pytest.raises(ConfigError, match="attempt=0 must be >= 1"):
        shots().next_shots(0, 0)


def test_should_retry_on_detection():
    detection = Detection(mitigation="abft", check="output_checksum", action="recomputed", row=0)
    assert shots().should_retry("x", [detection]) == "detector:abft/output_checksum"


def test_should_retry_uncorrected_only():
    corrected = Detection(mitigation="abft", check="output_checksum", action="recomputed")
    clamped = Detection(mitigation="mixed_precision", check="range_clamp", action="clamped")
    policy = shots(retry_on="uncorrected")
    assert policy.should_retry("x", [corrected]) is None
    assert policy.should_retry("x", [clamped]) == "detector:mixed_precision/range_clamp"


def test_should_retry_on_logits():
    policy = shots(logit_bound=50.0)
    assert policy.should_retry("x", [], torch.tensor([1.0, math.nan])) == "nonfinite_logits"
    assert policy.should_retry("x", [], [torch.tensor([1.0]), torch.tensor([-60.0])]) == "logits_out_of_range"
    assert policy.should_retry("x", [], torch.tensor([49.0])) is None


def test_should_retry_on_validator():
    policy = shots(validator=lambda text: text.strip().isdigit())
    assert policy.should_retry("12", []) is None
    assert policy.should_retry("twelve", []) == "validator"


# ----- prompt-level runs -----------------------------------------------------------------------


def test_run_fault_free_matches_plain_generate(tiny_llama):
    tokenizer = _tiny_tokenizer()
    policy = shots(policy="fewer_on_retry")
    result = policy.run(tiny_llama, tokenizer, "j k", **GREEDY)
    encoded = tokenizer(policy.build_prompt("j k", 3), return_tensors="pt")
    plain = tiny_llama.generate(**encoded, **GREEDY)[0, encoded["input_ids"].shape[1]:].tolist()
    assert result.accepted
    assert result.attempts == 1
    assert result.shots_used == 3
    assert result.tokens == plain
    assert result.retry_reasons == []


def test_run_retries_when_validator_rejects(tiny_llama):
    calls = []

    def reject_twice(text):
        calls.append(text)
        return len(calls) > 2

    result = shots(validator=reject_twice).run(tiny_llama, _tiny_tokenizer(), "j k", **GREEDY)
    assert result.accepted
    assert result.attempts == 3
    assert result.shots_used == 2
    assert result.retry_reasons == ["validator", "validator"]


def test_run_gives_up_after_max_retries(tiny_llama):
    result = shots(validator=lambda text: False, max_retries=1).run(tiny_llama, _tiny_tokenizer(), "j k", **GREEDY)
    assert not result.accepted
    assert result.attempts == 2
    assert result.retry_reasons == ["validator", "validator"]


def test_run_retries_on_detector_signal(tiny_llama):
    fired = []

    def corrupt_first_prompt(module, args, output):
        if fired or output.shape[1] < 2:
            return None
        fired.append(True)
        output = output.clone()
        output[0, -1, 1] = 1.0e6
        return output

    guard.protect(tiny_llama, ABFT())
    handle = tiny_llama.model.layers[0].mlp.down_proj.register_forward_hook(corrupt_first_prompt, prepend=True)
    try:
        result = shots().run(tiny_llama, _tiny_tokenizer(), "j k", **GREEDY)
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert result.retry_reasons == ["detector:abft/output_checksum"]
    assert result.shots_used == 1
    assert result.accepted


def test_run_rejects_reserved_keyword(tiny_llama):
    with pytest.raises(ConfigError, match="sets output_logits itself"):
        shots().run(tiny_llama, _tiny_tokenizer(), "j k", output_logits=False)


def test_run_rejects_object_without_generate():
    with pytest.raises(ConfigError, match="needs a model with generate"):
        shots().run(torch.nn.Linear(2, 2), _tiny_tokenizer(), "j k")


# ----- inside a protected generate -------------------------------------------------------------


class NaNOnPrompt:
    """Writes NaN into one output element on the first ``times`` prompt passes."""

    def __init__(self, row=0, times=1):
        self.row, self.times, self.fired = row, times, 0

    def __call__(self, module, args, output):
        if self.fired >= self.times or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        output[self.row, -1, 0] = float("nan")
        return output


def generate_protected(model, prompt, mitigation, hook=None):
    guard.protect(model, mitigation)
    module = model.model.layers[1].mlp.down_proj
    handle = module.register_forward_hook(hook, prepend=True) if hook is not None else None
    try:
        return model.generate(prompt, **GREEDY), guard.get_report(model).last_call
    finally:
        if handle is not None:
            handle.remove()
        guard.unprotect(model)


def test_generate_fault_free_no_rerun(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = generate_protected(tiny_llama, prompt, DynamicShots())
    assert torch.equal(tokens, golden)
    assert call.attempts == 1
    assert call.extra_forward_passes == 0


def test_generate_reruns_on_nonfinite_logits(tiny_llama):
    prompt = make_prompt(3, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = generate_protected(tiny_llama, prompt, DynamicShots(), NaNOnPrompt(row=2))
    (detection,) = call.detections
    assert (detection.check, detection.action, detection.row) == ("retry", "rerun", 2)
    assert detection.detail.startswith("nonfinite_logits at step 0")
    assert call.attempts == 2
    assert call.extra_forward_passes == GREEDY["max_new_tokens"]
    assert torch.equal(tokens, golden)


def test_generate_retries_exhausted(tiny_llama):
    _, call = generate_protected(tiny_llama, make_prompt(1, 6), DynamicShots(max_retries=1), NaNOnPrompt(times=5))
    assert [d.action for d in call.detections] == ["rerun", "none"]
    assert call.attempts == 2


def test_generate_reruns_on_other_detector(tiny_llama):
    prompt = make_prompt(2, 6)
    golden = tiny_llama.generate(prompt, **GREEDY)
    tokens, call = generate_protected(
        tiny_llama, prompt, [ABFT(correction="none"), DynamicShots()], NaNOnPrompt(row=1)
    )
    checks = [(d.mitigation, d.check, d.row, d.attempt) for d in call.detections]
    assert checks[0] == ("abft", "nonfinite_output", 1, 0)
    assert ("dynamic_shots", "retry", 1, 0) in checks
    assert torch.equal(tokens, golden)


class LargeOnPrompt(NaNOnPrompt):
    def __call__(self, module, args, output):
        if self.fired >= self.times or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        output[self.row, -1, 0] = 1.0e6
        return output


def test_generate_rerun_keeps_unflagged_samples(tiny_llama):
    prompt = make_prompt(3, 6)
    sampling = dict(max_new_tokens=5, do_sample=True, top_k=30)
    torch.manual_seed(7)
    golden = tiny_llama.generate(prompt, **sampling)
    guard.protect(tiny_llama, [ABFT(correction="none"), DynamicShots()])
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(LargeOnPrompt(row=1), prepend=True)
    try:
        torch.manual_seed(7)
        tokens = tiny_llama.generate(prompt, **sampling)
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert call.attempts == 2
    assert torch.equal(tokens[0], golden[0])
    assert torch.equal(tokens[2], golden[2])
    assert tokens.shape == golden.shape


def test_generate_sampling_crash_rerun(tiny_llama):
    sampling = dict(max_new_tokens=5, do_sample=True, top_k=30)
    tokens, call = None, None
    guard.protect(tiny_llama, DynamicShots())
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(NaNOnPrompt(row=1), prepend=True)
    try:
        torch.manual_seed(7)
        tokens = tiny_llama.generate(make_prompt(3, 6), **sampling)
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert call.attempts == 2
    assert tokens.shape == (3, 11)


def test_generate_unflagged_crash_propagates(tiny_llama):
    guard.protect(tiny_llama, DynamicShots())
    try:
        with pytest.raises(ValueError):
            tiny_llama.generate(make_prompt(1, 6), max_new_tokens=-3)
    finally:
        guard.unprotect(tiny_llama)
