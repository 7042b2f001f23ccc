"""Log-likelihood scoring of multiple-choice continuations with plain forward passes.

Scoring uses ``model(...)`` forward calls, not ``generate``, so fault injectors and
mitigations that hook the model's modules apply to multiple-choice tasks too. One batched
forward scores every continuation of a context; under the stage convention this is forward 0
(a prompt pass), with the last position of each row as its "first token" position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from guard.errors import ConfigError

logger = logging.getLogger(__name__)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Tokenize ``text`` as a prompt, adding the tokenizer's special tokens only when missing.

    Chat templates often write the BOS token into the text already; adding it again would
    give the model a double BOS that it never saw in training.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def _continuation_ids(tokenizer: Any, context_ids: list[int], context: str, continuation: str) -> list[int]:
    # Tokenize context and continuation together so a merge across the boundary is spelled the
    # way the model reads it; fall back to separate tokenization when the context's own tokens
    # are not a prefix of the joint ones.
    joint = encode_text(tokenizer, context + continuation)
    if joint[: len(context_ids)] == context_ids and len(joint) > len(context_ids):
        return joint[len(context_ids):]
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def _model_device(model: torch.nn.Module) -> torch.device:
    # The input embedding's device is where a dispatched (device_map="auto") model takes inputs.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


@torch.no_grad()
def score_choices_loglik(
    model: torch.nn.Module,
    tokenizer: Any,
    context: str,
    continuations: Sequence[str],
    *,
    batch_size: int | None = None,
) -> list[float]:
    """Return, for each continuation, the sum of the log-probabilities of its tokens after ``context``.

    All continuations go through one right-padded batched forward (or several of
    ``batch_size`` rows). Log-softmax runs in float32 whatever the model's dtype. A result
    may be NaN or infinite when the forward produced non-finite logits (for example under an
    injected fault); the caller decides whether that is a crash.
    """
    if not isinstance(context, str):
        raise ConfigError(f"context must be a str; got {type(context).__name__}.")
    if isinstance(continuations, str) or not continuations:
        raise ConfigError("continuations must be a non-empty list of strings.")
    if not all(isinstance(c, str) and c for c in continuations):
        raise ConfigError(f"every continuation must be a non-empty str; got {list(continuations)!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r} is invalid. Pass a positive integer or None.")

    context_ids = encode_text(tokenizer, context)
    if not context_ids:
        raise ConfigError(
            "context tokenizes to no tokens and the tokenizer adds no BOS token, so the first "
            "continuation token has nothing to be conditioned on. Pass a non-empty context."
        )
    rows = []
    for continuation in continuations:
        ids = _continuation_ids(tokenizer, context_ids, context, continuation)
        if not ids:
            raise ConfigError(f"continuation {continuation!r} tokenizes to no tokens.")
        rows.append((context_ids + ids, len(ids)))

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    device = _model_device(model)
    size = batch_size or len(rows)
    scores: list[float] = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        # Right padding keeps every real position at its unpadded index, so positions and the
        # causal mask match an unbatched forward.
        output = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        )
        logits = output.logits if hasattr(output, "logits") else output[0]  # [batch, width, vocab]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        for row, (ids, n_continuation) in enumerate(chunk):
            end = len(ids)
            begin = end - n_continuation
            # The logits at position t predict token t + 1.
            targets = torch.tensor(ids[begin:end], device=log_probs.device)
            picked = log_probs[row, begin - 1:end - 1].gather(-1, targets.unsqueeze(-1))
            scores.append(float(picked.sum()))
    return scores


def pick_choice(logliks: Sequence[float]) -> int:
    """Return the index of the highest finite log-likelihood (the first on ties), or -1 if none is finite."""
    best, best_value = -1, -math.inf
    for index, value in enumerate(logliks):
        value = float(value)
        if math.isfinite(value) and value > best_value:
            best, best_value = index, value
    return best


@dataclass(frozen=True)
class ChoiceScore:
    """Result of scoring one multiple-choice example: per-choice log-likelihoods, the pick, the score.

    ``choice`` is -1 when no log-likelihood is finite (a corrupted forward); ``nonfinite``
    is true when any of them is NaN or infinite, which campaigns count as a crash.
    """

    logliks: list[float]
    choice: int
    score: float
    nonfinite: bool


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    example: Any,
    n_shots: int = 0,
    *,
    batch_size: int | None = None,
) -> ChoiceScore:
    """Score a multiple-choice ``example`` of ``task`` by log-likelihood with forward passes."""
    context, continuations = task.choice_texts(example, n_shots, tokenizer)
    logliks = score_choices_loglik(model, tokenizer, context, continuations, batch_size=batch_size)
    choice = pick_choice(logliks)
    score = 0.0 if choice < 0 else float(task.score_choice(example, choice))
    nonfinite = not all(math.isfinite(value) for value in logliks)
    return ChoiceScore(logliks, choice, score, nonfinite)
