"""Stage tracking: forward indices during generate, listeners, recomputation and detach."""

from __future__ import annotations

import pytest
import torch

from guard.stages import ForwardInfo, Stage, StageTracker
from tests.tiny_models import make_prompt, make_tiny_model


def _record_passes(model, **generate_kwargs) -> list[ForwardInfo]:
    tracker = StageTracker.attach(model)
    seen: list[ForwardInfo] = []
    remove = tracker.add_listener(on_start=lambda _tracker, info: seen.append(info))
    try:
        model.generate(**generate_kwargs)
    finally:
        remove()
        tracker.detach()
    return seen


def test_generate_counts_prompt_then_decode_steps():
    model = make_tiny_model("llama")
    prompt = make_prompt(batch_size=2, length=6)

    seen = _record_passes(model, input_ids=prompt, max_new_tokens=4, do_sample=False)

    assert [info.index for info in seen] == [0, 1, 2, 3]
    assert seen[0].seq_len == 6
    assert all(info.seq_len == 1 for info in seen[1:])
    assert seen[0].batch_size == 2


def test_second_generate_restarts_count():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=5)
    tracker = StageTracker.attach(model)
    indices: list[int] = []
    tracker.add_listener(on_start=lambda _tracker, info: indices.append(info.index))
    try:
        model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    finally:
        tracker.detach()

    assert indices == [0, 1, 2, 0, 1, 2]


def test_stage_of_positions():
    info = ForwardInfo(index=0, seq_len=5, batch_size=1)

    assert info.stage_of(0) == Stage.PREFILL
    assert info.stage_of(3) == Stage.PREFILL
    assert info.stage_of(4) == Stage.FIRST_TOKEN
    assert info.stage_of(-1) == Stage.FIRST_TOKEN
    assert ForwardInfo(index=3, seq_len=1, batch_size=1).stage_of(0) == Stage.DECODE


def test_valid_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    info = ForwardInfo(index=0, seq_len=5, batch_size=2, attention_mask=mask)

    assert info.valid_positions(0).tolist() == [2, 3, 4]
    assert info.valid_positions(1).tolist() == [0, 1, 2, 3, 4]


def test_redundant_forward_keeps_index():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=4)
    tracker = StageTracker.attach(model)
    seen: list[ForwardInfo] = []
    tracker.add_listener(on_start=lambda _tracker, info: seen.append(info))

    def recompute_prompt(_tracker, info):
        if info.index == 0 and not info.redundant:
            with tracker.redundant():
                model(prompt)

    tracker.add_listener(on_end=recompute_prompt)
    try:
        model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    finally:
        tracker.detach()

    assert [(info.index, info.redundant) for info in seen] == [(0, False), (0, True), (1, False), (2, False)]


def test_start_sequence_sets_next_index():
    model = make_tiny_model("llama")
    tracker = StageTracker.attach(model)
    try:
        tracker.start_sequence(5)
        model(make_prompt(length=3))
        assert tracker.last.index == 5
        model(make_prompt(length=3))
        assert tracker.last.index == 0
    finally:
        tracker.detach()


def test_start_sequence_rejects_negative():
    model = make_tiny_model("llama")
    tracker = StageTracker.attach(model)
    try:
        with pytest.raises(ValueError, match="first_index must be >= 0"):
            tracker.start_sequence(-1)
    finally:
        tracker.detach()


def test_current_is_none_outside_forward():
    model = make_tiny_model("llama")
    tracker = StageTracker.attach(model)
    try:
        model(make_prompt(length=3))
        assert tracker.current is None
        assert tracker.last is not None
    finally:
        tracker.detach()


def test_forward_that_raises_closes_pass():
    model = make_tiny_model("llama")
    tracker = StageTracker.attach(model)

    def fail(_module, _args, _output):
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model(make_prompt(length=3))
        assert tracker.current is None
    finally:
        handle.remove()
        tracker.detach()


def test_shared_attach_detaches_with_last_holder():
    model = make_tiny_model("llama")
    pre_hooks_before = len(model._forward_pre_hooks)
    hooks_before = len(model._forward_hooks)

    first = StageTracker.attach(model)
    second = StageTracker.attach(model)
    assert first is second
    assert len(model._forward_pre_hooks) == pre_hooks_before + 1

    first.detach()
    assert StageTracker.of(model) is second
    second.detach()

    assert StageTracker.of(model) is None
    assert len(model._forward_pre_hooks) == pre_hooks_before
    assert len(model._forward_hooks) == hooks_before
