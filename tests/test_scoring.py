"""Log-likelihood scoring of choices with forward passes, on a tiny model and on SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from evals.scoring import encode_text, pick_choice, score_choices_loglik, score_multiple_choice
from evals.tasks import get_task
from guard.errors import ConfigError
from tests.tiny_models import VOCAB_SIZE, make_tiny_model


class CharTokenizer:
    """One token per character (code point mod the tiny vocabulary), BOS id 1, pad id 0."""

    bos_token = "\x01"
    pad_token_id = 0
    eos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(ch) % (VOCAB_SIZE - 3) for ch in text]
        if add_special_tokens:
            ids = [1] + ids
        return {"input_ids": ids}


def reference_loglik(model, context_ids, continuation_ids):
    """Sum of log-probabilities from one unpadded forward of context + continuation."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    total = 0.0
    for offset, token in enumerate(continuation_ids):
        total += float(log_probs[len(context_ids) + offset - 1, token])
    return total


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama")


def test_loglik_one_finite_score_per_choice(tiny):
    scores = score_choices_loglik(tiny, CharTokenizer(), "Q: colour?\nA:", [" red", " blue", " a long answer"])
    assert len(scores) == 3
    assert all(math.isfinite(s) for s in scores)
    assert all(s < 0 for s in scores)


def test_loglik_matches_unpadded_forward(tiny):
    tokenizer = CharTokenizer()
    context = "Q: x?\nA:"
    continuations = [" yes", " no", " maybe not"]
    scores = score_choices_loglik(tiny, tokenizer, context, continuations)
    context_ids = tokenizer(context)["input_ids"]
    for continuation, score in zip(continuations, scores):
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        assert score == pytest.approx(reference_loglik(tiny, context_ids, continuation_ids), abs=1e-4)


def test_loglik_batch_size_invariant(tiny):
    tokenizer = CharTokenizer()
    continuations = [" a", " bb", " ccc", " dddd"]
    together = score_choices_loglik(tiny, tokenizer, "ctx:", continuations)
    chunked = score_choices_loglik(tiny, tokenizer, "ctx:", continuations, batch_size=1)
    assert together == pytest.approx(chunked, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe"])
def test_loglik_other_architectures(arch):
    model = make_tiny_model(arch)
    scores = score_choices_loglik(model, CharTokenizer(), "Q:", [" one", " two"])
    assert len(scores) == 2
    assert all(math.isfinite(s) for s in scores)


def test_loglik_passes_through_module_hooks(tiny):
    # A forward hook on lm_head stands for an injected fault: scoring must run through it.
    def corrupt(module, inputs, output):
        return torch.full_like(output, float("nan"))

    handle = tiny.lm_head.register_forward_hook(corrupt)
    try:
        scores = score_choices_loglik(tiny, CharTokenizer(), "Q:", [" a", " b"])
    finally:
        handle.remove()
    assert all(math.isnan(s) for s in scores)
    assert pick_choice(scores) == -1


def test_loglik_rejects_empty_continuations(tiny):
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        score_choices_loglik(tiny, CharTokenizer(), "Q:", [])


def test_loglik_rejects_empty_choice(tiny):
    with pytest.raises(ConfigError, match="every continuation must be a non-empty str"):
        score_choices_loglik(tiny, CharTokenizer(), "Q:", [" a", ""])


def test_loglik_rejects_bad_batch_size(tiny):
    with pytest.raises(ConfigError, match="batch_size=0 is invalid"):
        score_choices_loglik(tiny, CharTokenizer(), "Q:", [" a"], batch_size=0)


def test_encode_text_skips_duplicate_bos():
    tokenizer = CharTokenizer()
    assert encode_text(tokenizer, "ab")[0] == 1
    assert encode_text(tokenizer, "\x01ab") == tokenizer("\x01ab", add_special_tokens=False)["input_ids"]


def test_pick_choice_ignores_non_finite():
    assert pick_choice([-2.0, float("nan"), -1.0]) == 2
    assert pick_choice([-1.0, -1.0]) == 0
    assert pick_choice([float("inf"), -3.0]) == 1


@pytest.mark.e2e
def test_loglik_smollm2_easy_item(smollm2, bigbench_dir):
    model, tokenizer = smollm2
    task = get_task("bigbench", path=str(bigbench_dir / "general_knowledge"))
    example = next(e for e in task.examples() if e.input == "How many legs do horses have?")
    context, continuations = task.choice_texts(example, n_shots=0, tokenizer=tokenizer)
    scores = score_choices_loglik(model, tokenizer, context, continuations)
    assert len(scores) == len(example.choices)
    assert all(math.isfinite(s) for s in scores)
    assert example.choices[pick_choice(scores)] == "four"


def test_score_multiple_choice_tiny(tiny, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"input": "Pick", "choices": ["aa", "bbb", "c"], "correct": 2}\n', encoding="utf-8")
    task = get_task("jsonl", path=str(path), shot_pool_size=0)
    example = task.examples()[0]
    result = score_multiple_choice(tiny, CharTokenizer(), task, example)
    assert len(result.logliks) == 3
    assert result.nonfinite is False
    assert result.choice == pick_choice(result.logliks)
    assert result.score == (1.0 if result.choice == 2 else 0.0)


def test_score_multiple_choice_nan_is_flagged(tiny, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"input": "Pick", "choices": ["x", "y"], "correct": 0}\n', encoding="utf-8")
    task = get_task("jsonl", path=str(path), shot_pool_size=0)
    handle = tiny.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    try:
        result = score_multiple_choice(tiny, CharTokenizer(), task, task.examples()[0])
    finally:
        handle.remove()
    assert result.nonfinite is True
    assert result.choice == -1
    assert result.score == 0.0


def test_score_multiple_choice_needs_choices(tiny):
    task = get_task("arithmetic", n=1)
    with pytest.raises(ConfigError, match="choice_texts needs a multiple-choice example"):
        score_multiple_choice(tiny, CharTokenizer(), task, task.examples()[0])
