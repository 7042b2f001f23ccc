"""Prefix reuse: a trial resumed from the golden cache equals the same trial run from scratch."""

from __future__ import annotations

import pytest
import torch

from evals.prefix import golden_cache_of, prefix_start
from guard.errors import ConfigError
from guard.stages import StageTracker
from tests.tiny_models import make_prompt, make_tiny_model

NEW_TOKENS = 8


def _golden(model, prompt):
    output = model.generate(
        input_ids=prompt,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
    )
    return output.sequences, golden_cache_of(output)


def _corrupt_at_step(model, step: int, row: int):
    """Scale one row of the final norm's output at forward ``step``: a stand-in decode fault."""
    tracker = StageTracker.attach(model)

    def corrupt(_module, _args, output):
        info = tracker.current
        if info is not None and info.index == step:
            output = output.clone()
            output[row] *= -50.0
            return output
        return None

    handle = model.model.norm.register_forward_hook(corrupt, prepend=True)
    return tracker, handle


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("step", [1, 4])
def test_resumed_trial_equals_fresh_trial(arch, step):
    model = make_tiny_model(arch)
    prompt = make_prompt(length=7, seed=3)
    sequences, cache = _golden(model, prompt)
    rows = 3

    tracker, handle = _corrupt_at_step(model, step, row=1)
    try:
        fresh = model.generate(
            input_ids=prompt.repeat(rows, 1), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        start = prefix_start(cache, sequences, prompt.shape[1], step, rows, NEW_TOKENS)
        tracker.start_sequence(step)
        resumed = model.generate(**start.generate_kwargs(model), do_sample=False)
    finally:
        handle.remove()
        tracker.detach()

    assert torch.equal(resumed, fresh)
    assert not torch.equal(fresh[1], sequences[0])
    assert torch.equal(fresh[0], sequences[0])


def test_golden_cache_reused_twice_unchanged():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=5)
    sequences, cache = _golden(model, prompt)
    length_before = cache.get_seq_length()

    prefix_start(cache, sequences, prompt.shape[1], 2, 4, NEW_TOKENS)

    assert cache.get_seq_length() == length_before


def test_step_beyond_golden_run_rejected():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=5)
    sequences, cache = _golden(model, prompt)

    with pytest.raises(ConfigError, match=r"step=8 cannot reuse a prefix.*between 1 and 7"):
        prefix_start(cache, sequences, prompt.shape[1], 8, 2, NEW_TOKENS)


def test_step_zero_rejected():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=5)
    sequences, cache = _golden(model, prompt)

    with pytest.raises(ConfigError, match="step=0 cannot reuse a prefix"):
        prefix_start(cache, sequences, prompt.shape[1], 0, 2, NEW_TOKENS)


def test_generate_output_without_cache_rejected():
    with pytest.raises(ConfigError, match="return_dict_in_generate=True"):
        golden_cache_of(object())
