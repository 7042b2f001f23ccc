"""Dual first-token: compute the prompt pass twice and vote when the runs disagree.

Prefill and the first generated token are the most error-sensitive stages, and both happen
in forward 0 of ``generate``. After that pass, a hook on the top-level model reruns it
inside ``tracker.redundant()`` with a fresh KV cache and compares, per batch row, the last
logits bit for bit and a KV-cache checksum (plain and position-weighted sums of the cached
keys' and values' bit patterns, which a change to any one or two elements changes). Rows that differ get a
third run and a majority vote; when the primary run is outvoted, its logits and KV-cache
rows are overwritten in place with the agreeing run's, so ``generate`` continues decoding
from an agreeing state without any change on its side.

A persistent fault (a corrupted weight) corrupts every run alike, so agreement does not
prove the pass correct: when the runs agree but the logits are non-finite, the detection
says ``agreed`` instead of claiming a correction.

When ``generate`` receives a cache that already contains a prefix of the prompt, forward 0
processes only the rest, and each rerun starts from the same prefix. A layer that can drop
positions (a sliding window) may no longer contain that prefix, so such a cache is not rerun.
"""

from __future__ import annotations

import ctypes
import logging
import math
import numbers
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from guard.errors import ConfigError
from guard.report import Detection
from guard.stages import cache_key_of
from mitigations.base import InstallHandle, Mitigation, MitigationConfig, register
from mitigations.checksum_kernel import as_bits, bit_checksums

logger = logging.getLogger(__name__)

# glibc returns freed heap memory above its trim threshold to the kernel, and serves chunks
# above its mmap threshold with fresh mappings. It raises both with the largest mmapped chunk
# freed so far, up to 32 MiB and 64 MiB, but only when such a chunk is freed. The redundant
# pass runs while the primary pass's KV cache is alive, so with lower thresholds its
# activations come from fresh pages. On SmolLM2-135M (batch 8, 100 tokens) that measured
# 20,000-150,000 minor page faults per pass, and up to 1.15 times the time of a lone prompt
# pass. With the thresholds at those maxima it measured 7,000-12,000 faults and the time of a
# lone pass.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ALLOCATOR_THRESHOLDS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_allocator_tuned = False


def _tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds to their dynamic maxima, once per process.

    Return whether the thresholds are set, which is False where the C library is not glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = all(mallopt(option, value) == 1 for option, value in _ALLOCATOR_THRESHOLDS)
    if _allocator_tuned:
        logger.info("dual_first_token set glibc's mmap threshold to 32 MiB and trim threshold to 64 MiB")
    return _allocator_tuned


@dataclass
class DualFirstTokenConfig(MitigationConfig):
    """Comparison settings of the redundant prompt pass.

    ``logits_atol``: largest absolute logit difference still counted as agreement. 0 requires
    the same bits, which suits CPU, where the same pass is bit-reproducible. Raise it for
    nondeterministic GPU kernels, and the runs must then also agree on the first token.
    ``compare_kv``: also compare per-row KV-cache checksums, which must match exactly. ``vote``: run a third
    time on disagreement and continue from the majority; with False, disagreement is only
    reported. ``tune_allocator``: on glibc, set the C allocator's mmap and trim thresholds to
    the maxima glibc itself would reach (32 MiB, 64 MiB) when the mitigation is installed, so
    the redundant pass reuses freed memory instead of faulting in fresh pages. The setting is
    process-wide and keeps up to 64 MiB of freed heap mapped. False leaves the allocator alone.
    """

    logits_atol: float = 0.0
    compare_kv: bool = True
    vote: bool = True
    tune_allocator: bool = True

    def __post_init__(self) -> None:
        atol = self.logits_atol
        # numbers.Real admits NumPy scalars such as np.float32, which are not Python floats.
        if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not 0 <= atol < math.inf:
            raise ConfigError(
                f"dual_first_token.logits_atol={atol!r} is not valid; use a finite number >= 0 "
                "(0 requires bit-identical logits)."
            )
        self.logits_atol = float(atol)
        for field in ("compare_kv", "vote", "tune_allocator"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(
                    f"dual_first_token.{field}={getattr(self, field)!r} must be True or False."
                )


class _Run:
    """Result of one prompt pass: last-position logits and per-row KV checksums.

    ``cache`` is the run's KV cache when it was kept, for adopting rows from it, else None.
    """

    def __init__(self, logits: torch.Tensor, kv_checksum: torch.Tensor | None, cache: Any = None):
        self.logits = logits  # [batch, vocab] at the last prompt position
        self.kv_checksum = kv_checksum  # [batch, 4 * layers] int64 or None
        self.cache = cache
        self._tokens: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        """``[batch]`` first tokens (argmax of the logits), computed on first access."""
        if self._tokens is None:
            self._tokens = self.logits.argmax(-1)
        return self._tokens


def _stored(layer: Any) -> list[torch.Tensor]:
    """Return one cache layer's stored keys and values, or [] when it stores none."""
    keys = getattr(layer, "keys", None)
    values = getattr(layer, "values", None)
    if not torch.is_tensor(keys) or keys.dim() < 2:
        return []
    return [keys, values]


def _kv_checksum(cache: Any) -> torch.Tensor | None:
    """Return ``[batch, 4 * layers]`` int64 bit checksums (see :func:`bit_checksums`) of each row's keys and values."""
    tensors = [tensor for layer in getattr(cache, "layers", None) or [] for tensor in _stored(layer)]
    return bit_checksums(tensors) if tensors else None


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return ``[batch]`` booleans: True where rows of ``a`` and ``b`` ``[batch, n]`` have the same bits."""
    if a.dtype.is_floating_point:
        # A view of the same width: NaNs with equal bits compare equal, and -0.0 differs from 0.0.
        a, b = as_bits(a), as_bits(b)
    return (a == b).all(-1)


class _ChecksumCache(DynamicCache):
    """A KV cache for the redundant pass that keeps each layer's checksums instead of its tensors.

    The comparison needs only the checksums. Once a layer's checksums are taken, its stored
    tensors are dropped. Their memory is freed when the layer's attention ends, and the next
    layer reuses it. So the pass needs memory for one layer's keys and values, not a second
    KV cache.
    """

    def __init__(self, config: Any, compare_kv: bool):
        super().__init__(config=config)
        self.compare_kv = compare_kv
        self.layer_sums: dict[int, torch.Tensor] = {}  # layer -> [batch, 4]
        self.largest_layer_bytes = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        stored = _stored(layer)
        # Summed here, while the layer's keys and values are still in cache.
        if self.compare_kv and stored:
            self.layer_sums[layer_idx] = bit_checksums(stored)
        self.largest_layer_bytes = max(self.largest_layer_bytes, _cache_bytes([layer]))
        # Empty, not None: the layer stays valid for code that reads its length.
        layer.keys = layer.keys.new_empty(0)
        layer.values = layer.values.new_empty(0)
        return keys, values

    def checksum(self) -> torch.Tensor | None:
        """Return the checksums in :func:`_kv_checksum`'s layout."""
        sums = [self.layer_sums[index] for index in sorted(self.layer_sums)]
        return torch.cat(sums, dim=1) if sums else None


def _cached_prefix(cache: DynamicCache, new_positions: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Return each layer's keys and values from before a pass that added ``new_positions``.

    Returns [] when the pass started from an empty cache, and None when a prefix exists but a
    layer other than :class:`DynamicLayer` may have dropped part of it.
    """
    cached = int(cache.get_seq_length()) - new_positions
    if cached <= 0:
        return []
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    # Views: a DynamicLayer grows by concatenation, so the pass left its first positions as they were.
    return [(layer.keys[:, :, :cached], layer.values[:, :, :cached]) for layer in cache.layers]


def _seed(cache: DynamicCache, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put ``prefix``, each layer's keys and values, into the empty layers of ``cache``.

    The model sizes its attention mask from the cache length before any layer runs, so the
    prefix must be in place from the start. A :class:`DynamicLayer` gets the views themselves:
    its update concatenates, so it reads them and never writes them.
    """
    for layer_idx, (keys, values) in enumerate(prefix):
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        else:
            # The base class's update stores a copy, where a subclass's might not store at all.
            DynamicCache.update(cache, keys, values, layer_idx)


def _nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Return ``[batch]`` booleans: True where a row of ``logits`` ``[batch, vocab]`` contains NaN or Inf."""
    if logits.element_size() < 8:
        # A float64 sum of narrower finite values cannot overflow, so it is finite exactly when
        # every value is, and it reads the row once instead of writing a mask.
        return ~torch.isfinite(logits.sum(-1, dtype=torch.float64))
    return ~torch.isfinite(logits).all(-1)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _cache_bytes(layers: list) -> int:
    """Return the bytes of the keys and values that ``layers`` (cache layers) store."""
    total = 0
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(tensor):
                total += _tensor_bytes(tensor)
    return total


@register
class DualFirstToken(Mitigation):
    """Redundant prompt pass with comparison, third-run vote and in-place recovery."""

    name = "dual_first_token"
    order = 30
    Config = DualFirstTokenConfig

    def _install(self, model: nn.Module, context, handle: InstallHandle) -> None:
        if not hasattr(model, "config"):
            raise ConfigError(
                f"dual_first_token needs a transformers model with a config, got {type(model).__name__}."
            )
        self._model = model
        self._warned_cache = False
        self._warned_prefix = False
        self._warned_no_cache = False
        if self.config.tune_allocator:
            _tune_allocator()
        # prepend=True on the top-level module only: the rerun must start while forward 0 is
        # still open in the stage tracker, so it counts as a recomputation of that pass.
        # Output-corrupting hooks live on submodules and still run before this one.
        handle.add_hook(model.register_forward_hook(self._after_prompt, with_kwargs=True, prepend=True))
        handle.add_cleanup(self._forget)

    def _forget(self) -> None:
        self._model = None

    def _after_prompt(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        context = self._context
        if context is None or not context.in_generate:
            return
        info = context.forward
        if info is None or info.index != 0 or info.redundant:
            return
        if getattr(output, "logits", None) is None:
            return
        cache_key = cache_key_of(kwargs)
        if cache_key is None:
            if not self._warned_no_cache:
                # Without a cache every forward starts a new sequence for the stage tracker, so
                # each one would look like a prompt pass.
                logger.warning(
                    "dual_first_token skips the redundant pass: generate runs without a KV cache "
                    "(use_cache=False); keep the cache on to protect the prompt pass",
                )
                self._warned_no_cache = True
            return
        cache = kwargs[cache_key]
        if type(cache) is not DynamicCache:
            if not self._warned_cache:
                logger.warning(
                    "dual_first_token skips the redundant pass: cache type %s is not a "
                    "DynamicCache, which is the only type it can duplicate",
                    type(cache).__name__,
                )
                self._warned_cache = True
            return
        prefix = _cached_prefix(cache, info.seq_len)
        if prefix is None:
            if not self._warned_prefix:
                logger.warning(
                    "dual_first_token skips the redundant pass: the KV cache already contained "
                    "part of the prompt, and a layer that drops old positions (a sliding window) "
                    "may no longer contain it; pass an empty cache to protect the prompt pass",
                )
                self._warned_prefix = True
            return
        with context.timed(), torch.no_grad():
            self._check(module, args, kwargs, cache_key, output, info, prefix)

    def _rerun(
        self, module: nn.Module, args: tuple, kwargs: dict, cache_key: str, keep_cache: bool, prefix: list
    ) -> tuple[_Run, int]:
        """Rerun the prompt pass with a fresh cache that contains ``prefix``. Return the run and its peak extra bytes.

        Only a run whose rows may be adopted keeps its KV cache. The other runs keep only their checksums.
        """
        compare_kv = self.config.compare_kv
        fresh = DynamicCache(config=module.config) if keep_cache else _ChecksumCache(module.config, compare_kv)
        _seed(fresh, prefix)
        rerun_kwargs = dict(kwargs)
        rerun_kwargs[cache_key] = fresh
        with self._context.redundant():
            output = module(*args, **rerun_kwargs)
        logits = output.logits[:, -1, :]
        if keep_cache:
            run = _Run(logits, _kv_checksum(fresh) if compare_kv else None, fresh)
            cache_bytes = _cache_bytes(fresh.layers)
        else:
            run = _Run(logits, fresh.checksum())
            cache_bytes = fresh.largest_layer_bytes
        return run, cache_bytes + _tensor_bytes(logits)

    def _agree(self, a: _Run, b: _Run) -> torch.Tensor:
        """Return ``[batch]`` booleans: True where the two runs agree on a row."""
        if self.config.logits_atol == 0:
            # Logits with the same bits have the same argmax, so the tokens need no comparison.
            same = _same_bits(a.logits, b.logits)
        else:
            same = a.tokens == b.tokens
            same &= torch.isclose(a.logits, b.logits, rtol=0.0, atol=self.config.logits_atol, equal_nan=True).all(-1)
        if a.kv_checksum is not None and b.kv_checksum is not None:
            same &= (a.kv_checksum == b.kv_checksum).all(-1)
        return same

    def _check(self, module, args, kwargs, cache_key, output, info, prefix) -> None:
        context = self._context
        primary_cache = kwargs[cache_key]
        primary_checksum = _kv_checksum(primary_cache) if self.config.compare_kv else None
        primary = _Run(output.logits[:, -1, :], primary_checksum, primary_cache)
        second, second_bytes = self._rerun(module, args, kwargs, cache_key, False, prefix)
        context.note_memory(second_bytes)
        agree = self._agree(primary, second)
        step = info.index
        if bool(agree.all()):
            nonfinite = _nonfinite_rows(primary.logits)
            for row in torch.nonzero(nonfinite).flatten().tolist():
                context.record(Detection(
                    mitigation=self.name, check="nonfinite_logits", action="agreed",
                    stage="first_token", step=step, row=row,
                    detail="both runs agree, so a persistent fault (such as a corrupted weight) "
                    "would affect each alike; the redundant pass does not protect this row",
                ))
            return
        disagreeing = torch.nonzero(~agree).flatten().tolist()
        if not self.config.vote:
            for row in disagreeing:
                context.record(Detection(
                    mitigation=self.name, check="first_token_mismatch", action="none",
                    stage="first_token", step=step, row=row,
                    detail=self._describe(primary, second, row),
                ))
            return
        # The third run keeps its cache: where it sides with the second run, its rows replace the
        # primary run's.
        third, third_bytes = self._rerun(module, args, kwargs, cache_key, True, prefix)
        context.note_memory(third_bytes + _tensor_bytes(second.logits))
        primary_third = self._agree(primary, third)
        second_third = self._agree(second, third)
        for row in disagreeing:
            detail = self._describe(primary, second, row)
            if bool(primary_third[row]):
                action, detail = "voted", detail + "; the third run agrees with the primary run, which is kept"
            elif bool(second_third[row]):
                self._adopt(output, primary_cache, third, row)
                action, detail = "voted", detail + "; the primary run was outvoted and replaced by the agreeing runs"
            else:
                action, detail = "none", detail + "; all three runs differ, the primary run is kept"
            context.record(Detection(
                mitigation=self.name, check="first_token_mismatch", action=action,
                stage="first_token", step=step, row=row, detail=detail,
            ))

    @staticmethod
    def _describe(a: _Run, b: _Run, row: int) -> str:
        token_a, token_b = int(a.tokens[row]), int(b.tokens[row])
        difference = (a.logits[row].double() - b.logits[row].double()).abs()
        finite = difference[torch.isfinite(difference)]
        largest = float(finite.max()) if finite.numel() else float("nan")
        return f"first tokens {token_a} vs {token_b}, max logit difference {largest:.3g}"

    @staticmethod
    def _adopt(output: Any, primary_cache: Any, source: _Run, row: int) -> None:
        """Overwrite row ``row`` of the primary logits and KV cache with ``source``'s."""
        output.logits[row, -1].copy_(source.logits[row])
        for target, origin in zip(primary_cache.layers, source.cache.layers):
            target.keys[row].copy_(origin.keys[row])
            target.values[row].copy_(origin.values[row])
        # NOTE: hidden states and attentions in the output, when requested, stay those of the
        # primary run.
