"""Inference-stage tracking shared by the guard, the mitigations and the fault injector.

A causal LM generates in forward passes over one sequence: forward 0 processes the prompt
(the *prefill* positions, then the last prompt position whose logits pick the *first token*),
and forward k >= 1 is *decode step* k, one new position per row. The tracker counts these
passes with one forward pre-hook on the top-level model, so every component queries it rather
than guessing the stage from tensor shapes.

A new sequence starts when the forward gets no cache or an empty one (Cache API
``get_seq_length() == 0``). Callers that hand ``generate`` a pre-filled cache (prefix reuse)
set where counting resumes with :meth:`StageTracker.start_sequence`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

_TRACKERS: "weakref.WeakKeyDictionary[nn.Module, StageTracker]" = weakref.WeakKeyDictionary()


class Stage(str, enum.Enum):
    """Inference stage of a position in a forward pass."""

    PREFILL = "prefill"
    FIRST_TOKEN = "first_token"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value


STAGES = tuple(stage.value for stage in Stage)


@dataclass(frozen=True)
class ForwardInfo:
    """Position of the running forward pass in its sequence.

    ``index`` is 0 for the prompt pass and k for decode step k. ``seq_len`` is the number of
    positions this pass processes (prompt length on forward 0, usually 1 afterwards).
    ``attention_mask`` is the mask the model received, ``[batch, total_len]``, or None.
    ``redundant`` marks a recomputation (for example dual first-token) that must not advance
    the count.
    """

    index: int
    seq_len: int
    batch_size: int
    attention_mask: torch.Tensor | None = None
    redundant: bool = False

    @property
    def is_prompt(self) -> bool:
        return self.index == 0

    @property
    def decode_step(self) -> int | None:
        return self.index if self.index > 0 else None

    def stage_of(self, position: int) -> Stage:
        """Return the stage of ``position`` (0-based, within this pass's ``seq_len``)."""
        if self.index > 0:
            return Stage.DECODE
        if position < 0:
            position += self.seq_len
        return Stage.FIRST_TOKEN if position == self.seq_len - 1 else Stage.PREFILL

    def valid_positions(self, row: int) -> torch.Tensor:
        """Return the positions of this pass that hold real tokens of ``row`` (left padding excluded)."""
        if self.attention_mask is None:
            return torch.arange(self.seq_len)
        mask_tail = self.attention_mask[row, -self.seq_len :]
        return torch.nonzero(mask_tail.bool(), as_tuple=False).flatten().cpu()


ForwardListener = Callable[["StageTracker", ForwardInfo], None]


class StageTracker:
    """Counts the forward passes of one model and notifies listeners at each one.

    Attach with :meth:`attach` and release with :meth:`detach`. The tracker is shared and
    reference counted, so the guard and an injector can use it at the same time, and its
    hooks go away with the last release.
    """

    def __init__(self, model: nn.Module):
        self._model_ref = weakref.ref(model)
        self._refcount = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._next_index = 0
        self._forced_index: int | None = None
        self._redundant_depth = 0
        self._current: ForwardInfo | None = None
        # Passes enclosing the current one (a redundant recomputation runs inside a pass).
        self._stack: list[ForwardInfo | None] = []
        self._last: ForwardInfo | None = None
        self._finished: ForwardInfo | None = None
        self._start_listeners: list[ForwardListener] = []
        self._end_listeners: list[ForwardListener] = []

    # ----- lifetime -------------------------------------------------------------------

    @classmethod
    def attach(cls, model: nn.Module) -> "StageTracker":
        """Return the model's tracker, installing its hooks if this is the first holder."""
        tracker = _TRACKERS.get(model)
        if tracker is None:
            tracker = cls(model)
            _TRACKERS[model] = tracker
        if tracker._refcount == 0:
            tracker._install(model)
        tracker._refcount += 1
        return tracker

    @staticmethod
    def of(model: nn.Module) -> "StageTracker | None":
        """Return the tracker attached to ``model``, or None."""
        tracker = _TRACKERS.get(model)
        return tracker if tracker is not None and tracker._refcount > 0 else None

    def detach(self) -> None:
        """Release one hold; the last release removes the hooks and the model's entry."""
        if self._refcount == 0:
            return
        self._refcount -= 1
        if self._refcount == 0:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._start_listeners.clear()
            self._end_listeners.clear()
            model = self._model_ref()
            if model is not None:
                _TRACKERS.pop(model, None)

    def _install(self, model: nn.Module) -> None:
        # prepend=True: the stage must be known before any other pre-hook of the model runs.
        self._handles.append(
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True)
        )
        # always_call=True: a forward that raises still closes the pass.
        self._handles.append(model.register_forward_hook(self._after_forward, always_call=True))

    # ----- listeners ------------------------------------------------------------------

    def add_listener(
        self, on_start: ForwardListener | None = None, on_end: ForwardListener | None = None
    ) -> Callable[[], None]:
        """Call ``on_start`` before and ``on_end`` after every forward; return a remover."""
        if on_start is not None:
            self._start_listeners.append(on_start)
        if on_end is not None:
            self._end_listeners.append(on_end)

        def remove() -> None:
            if on_start is not None and on_start in self._start_listeners:
                self._start_listeners.remove(on_start)
            if on_end is not None and on_end in self._end_listeners:
                self._end_listeners.remove(on_end)

        return remove

    # ----- state ----------------------------------------------------------------------

    @property
    def current(self) -> ForwardInfo | None:
        """The forward pass running now, or None outside a forward."""
        return self._current

    @property
    def last(self) -> ForwardInfo | None:
        """The most recent forward pass (running or finished)."""
        return self._last

    @property
    def finished(self) -> ForwardInfo | None:
        """The pass that ended most recently.

        Forward hooks that run after the tracker's own (registered later, without prepend)
        read this, because :attr:`current` has already moved back to the enclosing pass.
        """
        return self._finished

    def encloses(self, info: ForwardInfo) -> bool:
        """Tell whether the current pass runs inside the pass ``info`` (a recomputation within it)."""
        return any(outer is info for outer in self._stack)

    def start_sequence(self, first_index: int = 0) -> None:
        """Make the next forward count as pass ``first_index`` of a sequence.

        Needed when ``generate`` receives a cache that already contains the prompt and
        ``first_index - 1`` decode steps, so the cache length alone would mislead.
        """
        if first_index < 0:
            raise ValueError(f"first_index must be >= 0, got {first_index}")
        self._forced_index = first_index

    @contextlib.contextmanager
    def redundant(self) -> Iterator[None]:
        """Run nested forwards as recomputations of the current pass: the count stays put."""
        self._redundant_depth += 1
        try:
            yield
        finally:
            self._redundant_depth -= 1

    # ----- hooks ----------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        batch_size, seq_len = (tokens.shape[0], tokens.shape[1]) if tokens is not None else (0, 0)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and not torch.is_tensor(attention_mask):
            attention_mask = None

        if self._redundant_depth > 0 and self._current is not None:
            # A recomputation inside a running pass keeps that pass's index.
            base = self._current
            info = ForwardInfo(base.index, seq_len, batch_size, attention_mask, redundant=True)
            self._push(info)
            return

        if self._forced_index is not None:
            index = self._forced_index
            self._forced_index = None
        elif _cache_is_empty(kwargs):
            index = 0
        else:
            index = self._next_index
        self._next_index = index + 1
        redundant = self._redundant_depth > 0
        self._push(ForwardInfo(index, seq_len, batch_size, attention_mask, redundant=redundant))

    def _push(self, info: ForwardInfo) -> None:
        self._stack.append(self._current)
        self._current = info
        self._last = info
        for listener in list(self._start_listeners):
            listener(self, info)

    def _after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        info = self._current
        self._finished = info
        try:
            if info is not None:
                for listener in list(self._end_listeners):
                    listener(self, info)
        finally:
            self._current = self._stack.pop() if self._stack else None


# transformers 5.x passes the KV cache to a forward as ``cache``, and earlier releases as
# ``past_key_values``.
CACHE_KEYS = ("cache", "past_key_values")


def cache_key_of(kwargs: dict) -> str | None:
    """Return the keyword under which a forward received its KV cache, or None."""
    return next((key for key in CACHE_KEYS if kwargs.get(key) is not None), None)


def _cache_is_empty(kwargs: dict) -> bool:
    """Tell whether a forward starts a new sequence: no cache, or an empty one."""
    key = cache_key_of(kwargs)
    cache = kwargs[key] if key is not None else None
    if cache is None:
        return True
    get_seq_length = getattr(cache, "get_seq_length", None)
    if get_seq_length is None:
        # Legacy tuple caches: one (key, value) pair per layer, key [batch, heads, seq, dim].
        try:
            return cache[0][0].shape[-2] == 0
        except (TypeError, IndexError, AttributeError):
            return False
    return int(get_seq_length()) == 0
