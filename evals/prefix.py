"""Prefix reuse: start a faulty trial at decode step k from the golden run's KV cache.

A fault at decode step k cannot change forwards 0..k-1, so those passes are the golden run's.
The golden cache contains every position written during the golden generate, and a position is
never rewritten once stored, so cropping it to ``prompt_length + k - 1`` positions gives
exactly the cache that a from-scratch run has before forward k. ``generate`` then runs only
forwards k, k+1, ... on the golden tokens up to step k.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from guard.errors import ConfigError


@dataclass
class PrefixStart:
    """Inputs that make ``generate`` resume a golden run at forward ``step``."""

    step: int
    input_ids: torch.Tensor  # [rows, prompt_length + step]
    attention_mask: torch.Tensor  # [rows, prompt_length + step]
    cache: Any  # a transformers Cache holding prompt_length + step - 1 positions per row
    max_new_tokens: int

    def generate_kwargs(self, model) -> dict:
        """Return the keyword arguments for ``model.generate`` (cache under the name it takes)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            cache_keyword(model): self.cache,
            "max_new_tokens": self.max_new_tokens,
        }


def cache_keyword(model) -> str:
    """Return the forward keyword that carries the KV cache for ``model``.

    transformers 5.x renamed ``past_key_values`` to ``cache``; older releases only know the first.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def golden_cache_of(generate_output) -> Any:
    """Return the KV cache of a ``generate`` call made with ``return_dict_in_generate=True``."""
    cache = getattr(generate_output, "cache", None)
    if cache is None:
        cache = getattr(generate_output, "past_key_values", None)
    if cache is None:
        raise ConfigError(
            "The golden generate output has no KV cache. Call generate with "
            "return_dict_in_generate=True and use_cache=True to enable prefix reuse."
        )
    return cache


def prefix_start(
    golden_cache: Any,
    golden_sequence: torch.Tensor,
    prompt_length: int,
    step: int,
    rows: int,
    max_new_tokens: int,
    prompt_attention_mask: torch.Tensor | None = None,
) -> PrefixStart:
    """Build the inputs that resume the golden run of one prompt at decode step ``step``.

    ``golden_sequence`` is the golden run's ``[1, prompt_length + generated]`` token ids and
    ``golden_cache`` its cache (batch 1). The cache is copied, so one golden cache serves
    every trial. ``rows`` copies are made, one per trial of the batch.
    """
    generated = golden_sequence.shape[-1] - prompt_length
    if not 1 <= step <= min(generated, max_new_tokens) - 1:
        raise ConfigError(
            f"step={step} cannot reuse a prefix: the golden run generated {generated} tokens "
            f"with max_new_tokens={max_new_tokens}, so a reusable decode step is between 1 and "
            f"{min(generated, max_new_tokens) - 1}."
        )
    if golden_sequence.dim() != 2 or golden_sequence.shape[0] != 1:
        raise ConfigError(
            f"golden_sequence must have shape [1, length], got {tuple(golden_sequence.shape)}."
        )

    # The cache before forward k contains the prompt and tokens 1..k-1.
    kept_positions = prompt_length + step - 1
    cache = copy.deepcopy(golden_cache)
    surplus = cache.get_seq_length() - kept_positions
    if surplus < 0:
        raise ConfigError(
            f"The golden cache contains only {cache.get_seq_length()} positions, fewer than the "
            f"{kept_positions} needed to resume at step {step}."
        )
    if surplus > 0:
        cache.crop(-surplus)
    if rows > 1:
        cache.batch_repeat_interleave(rows)

    input_ids = golden_sequence[:, : prompt_length + step].repeat(rows, 1)
    if prompt_attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        generated_mask = torch.ones(1, step, dtype=prompt_attention_mask.dtype)
        attention_mask = torch.cat([prompt_attention_mask.reshape(1, -1), generated_mask], dim=1)
        attention_mask = attention_mask.repeat(rows, 1)
    return PrefixStart(step, input_ids, attention_mask, cache, max_new_tokens - step)
