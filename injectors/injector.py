"""The fault injector: arms concrete faults on a model for the span of one or more ``generate`` calls.

Computation faults corrupt one call of one module's output through a forward hook registered
with ``prepend=True``, so every checking hook of a mitigation reads the corrupted value. Weight
faults edit a parameter element at the start of their forward pass and restore it byte for
byte at its end (transient) or when the faults are removed (persistent). KV-cache faults
edit ``cache.layers[l].keys`` / ``.values`` after the pass that writes the position, so the
corrupted entry stays in the cache for every later step. The stage of each pass comes from
the shared :class:`~guard.stages.StageTracker`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from guard.errors import ConfigError, SoftguardError
from guard.stages import ForwardInfo, StageTracker
from injectors.bits import BitChange, flip_bits, format_of, set_value, stuck_at, to_json_float
from injectors.resolve import resolve_faults
from injectors.sites import Site, site_named
from injectors.spec import Fault

logger = logging.getLogger(__name__)

__all__ = ["FiredFault", "InjectionHandle", "Injector", "resolve_faults"]


@dataclass(frozen=True)
class FiredFault:
    """A fault that fired: the fault, the format it hit and the values before and after."""

    fault: Fault
    dtype: str
    value_before: tuple[float, ...]
    value_after: tuple[float, ...]
    forward: int
    redundant: bool = False

    def to_dict(self) -> dict:
        return {
            "fault": self.fault.to_dict(),
            "dtype": self.dtype,
            "value_before": [to_json_float(v) for v in self.value_before],
            "value_after": [to_json_float(v) for v in self.value_after],
            "forward": self.forward,
            "redundant": self.redundant,
        }


def _apply(tensor: torch.Tensor, elements: Sequence[int], fault: Fault) -> BitChange:
    """Apply the corruption of ``fault`` to ``elements`` (flat indices) of ``tensor`` in place."""
    if fault.mode == "flip":
        return flip_bits(tensor, elements, fault.bits)
    if fault.mode == "stuck_at":
        return stuck_at(tensor, elements, fault.bits, fault.stuck_at)
    return set_value(tensor, elements, fault.value)


def _restore(tensor: torch.Tensor, elements: Sequence[int], before: torch.Tensor) -> None:
    """Write the saved raw bits of ``elements`` back, so the tensor is byte-identical again."""
    fmt = format_of(tensor.dtype)
    index = torch.as_tensor(list(elements), dtype=torch.long, device=tensor.device)
    where = torch.unravel_index(index, tuple(tensor.shape))
    with torch.no_grad():
        # Same-width dtype views work for any strides and copy the bits exactly (NaN payloads too).
        tensor.view(fmt.int_dtype)[where] = before.to(tensor.device).view(fmt.int_dtype)


def _pass_positions(fault: Fault, info: ForwardInfo, row: int) -> list[int] | str:
    """Return the indices within the running pass of the tokens ``fault`` hits, or why there are none.

    Prompt positions count the row's own tokens, so left padding is skipped. The first token is
    the row's last prompt token, and a decode pass appends its one new position at the end.
    """
    if info.index > 0:
        return [info.seq_len - 1]
    if info.attention_mask is None:
        valid = list(range(info.seq_len))
    else:
        valid = info.valid_positions(row).tolist()
    if not valid:
        return f"row {row} has no prompt tokens in this pass"
    if fault.stage == "first_token" and not fault.positions:
        return [valid[-1]]
    requested = list(fault.positions) or [fault.position]
    for position in requested:
        if position is None or position >= len(valid):
            return f"position {position} is beyond the {len(valid)} prompt tokens of row {row}"
    return [valid[position] for position in requested]


@dataclass
class _WeightEdit:
    fault: Fault
    tensor: torch.Tensor
    before: torch.Tensor
    pass_info: ForwardInfo | None


@dataclass
class _ArmedState:
    faults: list[Fault]
    sites: dict[int, Site]
    tracker: StageTracker | None = None
    handles: list = field(default_factory=list)
    remove_listener: object = None
    # One call counter per running pass (nested for redundant recomputations).
    call_counters: list[dict[str, int]] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    weight_edits: list[_WeightEdit] = field(default_factory=list)


class InjectionHandle:
    """Handle of armed faults: :meth:`remove` disarms them and restores every weight."""

    def __init__(self, injector: "Injector"):
        self._injector = injector
        self.removed = False

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            self._injector._disarm()

    def __enter__(self) -> "InjectionHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class Injector:
    """Deterministic fault injector for one model.

    ``arm(faults)`` installs hooks only on the modules the faults target and attaches the
    stage tracker only when at least one fault is armed. ``fired`` lists what fired since
    the last ``arm``; ``unfired`` lists the faults whose pass never came (or could not be
    placed, see ``skipped``).
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self._state: _ArmedState | None = None
        self._fired: list[FiredFault] = []
        self._faults: list[Fault] = []
        self._skipped: dict[int, str] = {}

    # ----- public -----------------------------------------------------------------------

    @property
    def fired(self) -> list[FiredFault]:
        return list(self._fired)

    @property
    def unfired(self) -> list[Fault]:
        fired_ids = {id(record.fault) for record in self._fired}
        return [fault for fault in self._faults if id(fault) not in fired_ids]

    @property
    def skipped(self) -> list[tuple[Fault, str]]:
        """Faults whose pass came but which could not be placed, with the reason."""
        return [(fault, self._skipped[id(fault)]) for fault in self._faults if id(fault) in self._skipped]

    @property
    def is_armed(self) -> bool:
        return self._state is not None

    def arm(self, faults: Iterable[Fault | dict]) -> InjectionHandle:
        """Install the hooks for ``faults`` and return a handle whose ``remove()`` undoes them."""
        if self._state is not None:
            raise SoftguardError("This injector is already armed: remove the previous handle before arming again.")
        parsed = [fault if isinstance(fault, Fault) else Fault.from_dict(fault) for fault in faults]
        sites = {id(fault): self._site_of(fault) for fault in parsed}
        for fault in parsed:
            self._check_fits(fault, sites[id(fault)])

        self._fired, self._faults, self._skipped = [], parsed, {}
        handle = InjectionHandle(self)
        if not parsed:
            return handle
        state = _ArmedState(faults=parsed, sites=sites)
        self._state = state
        try:
            self._install(state)
        except BaseException:
            self._disarm()
            raise
        return handle

    @contextlib.contextmanager
    def armed(self, faults: Iterable[Fault | dict]) -> Iterator["Injector"]:
        """Arm ``faults`` for the ``with`` block; weights are restored even if the block raises."""
        handle = self.arm(faults)
        try:
            yield self
        finally:
            handle.remove()

    # ----- validation -------------------------------------------------------------------

    def _site_of(self, fault: Fault) -> Site:
        if fault.kind == "kv_cache":
            return site_named(self.model, f"kv_cache.layers.{fault.layer}", "kv_cache")
        return site_named(self.model, fault.module, fault.kind, fault.param)

    @staticmethod
    def _check_fits(fault: Fault, site: Site) -> None:
        fmt = format_of(site.dtype)
        fmt.check_bits(list(fault.bits), field="fault.bits")
        for element in fault.elements:
            if not 0 <= element < site.numel:
                raise ConfigError(
                    f"fault.elements contains {element}, out of range for {site.name} "
                    f"({site.kind}, shape {site.shape}): valid indices are 0..{site.numel - 1}."
                )

    # ----- install / remove --------------------------------------------------------------

    def _install(self, state: _ArmedState) -> None:
        model = self.model
        state.tracker = StageTracker.attach(model)
        state.remove_listener = state.tracker.add_listener(self._on_start, self._on_end)

        modules = dict(model.named_modules())
        targets: dict[str, list[Fault]] = {}
        for fault in state.faults:
            if fault.kind == "computation":
                targets.setdefault(fault.module, []).append(fault)
        for name, faults in targets.items():
            hook = self._make_output_hook(name, faults)
            # prepend=True: the fault happens inside the module, before any checker reads the output.
            state.handles.append(modules[name].register_forward_hook(hook, prepend=True))

        if any(fault.kind == "kv_cache" for fault in state.faults):
            # prepend=True runs this before the tracker's own forward hook, while the pass is current.
            state.handles.append(
                model.register_forward_hook(self._after_model_forward, with_kwargs=True, prepend=True)
            )

    def _disarm(self) -> None:
        state = self._state
        if state is None:
            return
        try:
            self._restore_weights(lambda edit: True)
        finally:
            for handle in state.handles:
                handle.remove()
            state.handles.clear()
            if state.remove_listener is not None:
                state.remove_listener()
            if state.tracker is not None:
                state.tracker.detach()
            self._state = None

    # ----- pass bookkeeping ---------------------------------------------------------------

    def _on_start(self, tracker: StageTracker, info: ForwardInfo) -> None:
        state = self._state
        if state is None:
            return
        state.call_counters.append({})
        for fault in state.faults:
            if fault.kind != "weight" or id(fault) in state.done:
                continue
            due = info.index >= fault.forward if fault.persistent else info.index == fault.forward
            if due:
                self._apply_weight(state, fault, info)

    def _on_end(self, tracker: StageTracker, info: ForwardInfo) -> None:
        state = self._state
        if state is None:
            return
        try:
            self._restore_weights(lambda edit: not edit.fault.persistent and edit.pass_info is info)
        finally:
            if state.call_counters:
                state.call_counters.pop()

    def _record(self, fault: Fault, dtype: torch.dtype, change: BitChange, info: ForwardInfo) -> None:
        self._fired.append(
            FiredFault(
                fault=fault,
                dtype=str(dtype).replace("torch.", ""),
                value_before=tuple(float(v) for v in change.before.float().flatten()),
                value_after=tuple(float(v) for v in change.after.float().flatten()),
                forward=info.index,
                redundant=info.redundant,
            )
        )

    def _skip(self, state: _ArmedState, fault: Fault, reason: str) -> None:
        state.done.add(id(fault))
        self._skipped[id(fault)] = reason
        logger.warning("Fault on %s at forward %d not injected: %s", fault.module, fault.forward, reason)

    # ----- weights ----------------------------------------------------------------------

    def _apply_weight(self, state: _ArmedState, fault: Fault, info: ForwardInfo) -> None:
        module = self.model.get_submodule(fault.module)
        tensor = getattr(module, fault.param).data
        change = _apply(tensor, fault.elements, fault)
        state.weight_edits.append(_WeightEdit(fault, tensor, change.before, info))
        state.done.add(id(fault))
        self._record(fault, tensor.dtype, change, info)

    def _restore_weights(self, select) -> None:
        state = self._state
        if state is None:
            return
        # Undo in reverse order so overlapping edits of one element end at the original bits.
        keep = []
        for edit in reversed(state.weight_edits):
            if select(edit):
                _restore(edit.tensor, edit.fault.elements, edit.before)
            else:
                keep.append(edit)
        state.weight_edits = list(reversed(keep))

    # ----- computation ------------------------------------------------------------------

    def _make_output_hook(self, name: str, faults: list[Fault]):
        def hook(module: nn.Module, args: tuple, output):
            state = self._state
            if state is None or state.tracker is None:
                return None
            info = state.tracker.current
            if info is None or not state.call_counters:
                return None
            counter = state.call_counters[-1]
            call = counter.get(name, 0)
            counter[name] = call + 1
            pending = [
                fault
                for fault in faults
                if id(fault) not in state.done and fault.forward == info.index and fault.call == call
            ]
            if not pending:
                return None
            return self._corrupt_output(state, output, pending, info)

        return hook

    def _corrupt_output(self, state: _ArmedState, output, faults: list[Fault], info: ForwardInfo):
        site = state.sites[id(faults[0])]
        is_tuple = isinstance(output, tuple)
        index = site.output_index or 0
        target = output[index] if is_tuple else output
        if not torch.is_tensor(target):
            for fault in faults:
                self._skip(state, fault, f"the output of {site.name} is not a tensor")
            return None
        # Corrupt a copy: the module's output tensor may alias a buffer that others still read.
        corrupted = target.clone()
        for fault in faults:
            placed = self._token_slices(corrupted, fault, info)
            if isinstance(placed, str):
                self._skip(state, fault, placed)
                continue
            befores, afters = [], []
            for token_slice in placed:
                change = _apply(token_slice, fault.elements, fault)
                befores.append(change.before)
                afters.append(change.after)
            state.done.add(id(fault))
            self._record(fault, corrupted.dtype, BitChange(torch.cat(befores), torch.cat(afters)), info)
        if is_tuple:
            return output[:index] + (corrupted,) + output[index + 1 :]
        return corrupted

    @staticmethod
    def _token_slices(tensor: torch.Tensor, fault: Fault, info: ForwardInfo) -> list[torch.Tensor] | str:
        """Return views of the per-token vectors the fault hits, or the reason it cannot be placed."""
        batch, seq_len = info.batch_size, info.seq_len
        row = fault.row if fault.row is not None else 0
        if row >= batch:
            return f"row {row} is beyond the batch of {batch}"
        positions = _pass_positions(fault, info, row)
        if isinstance(positions, str):
            return positions

        slices = []
        for position in positions:
            if tensor.dim() >= 3 and tensor.shape[0] == batch:
                # [batch, seq, ...]. Outputs shorter than the pass (lm_head under generate's
                # logits_to_keep) contain its last positions.
                offset = tensor.shape[1] - seq_len + position
                if not 0 <= offset < tensor.shape[1]:
                    return f"position {position} is not in this output of {tensor.shape[1]} positions"
                slices.append(tensor[row, offset])
            elif tensor.dim() >= 2 and tensor.shape[0] == batch * seq_len:
                # [batch * seq, ...], the flattened token layout of MoE blocks.
                slices.append(tensor[row * seq_len + position])
            else:
                return (
                    f"output shape {tuple(tensor.shape)} does not match batch {batch} x {seq_len} positions"
                )
        return slices

    # ----- KV cache ---------------------------------------------------------------------

    def _after_model_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        state = self._state
        if state is None or state.tracker is None:
            return
        info = state.tracker.current
        if info is None:
            return
        due = [
            fault
            for fault in state.faults
            if fault.kind == "kv_cache" and id(fault) not in state.done and fault.forward == info.index
        ]
        if not due:
            return
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        for fault in due:
            self._corrupt_cache(state, cache, fault, info)

    def _corrupt_cache(self, state: _ArmedState, cache, fault: Fault, info: ForwardInfo) -> None:
        layers = getattr(cache, "layers", None)
        if layers is None:
            # NOTE: legacy tuple caches are not supported, because transformers 5 passes a Cache object.
            self._skip(state, fault, "the forward had no Cache object with .layers")
            return
        if fault.layer is None or fault.layer >= len(layers):
            self._skip(state, fault, f"cache has no layer {fault.layer}")
            return

        layer = layers[fault.layer]
        stored = getattr(layer, "keys" if fault.tensor == "key" else "values", None)
        if not torch.is_tensor(stored) or stored.dim() != 4:
            self._skip(state, fault, f"cache layer {fault.layer} holds no [batch, heads, seq, dim] tensor")
            return

        row = fault.row if fault.row is not None else 0
        if row >= stored.shape[0]:
            self._skip(state, fault, f"row {row} is beyond the cached batch of {stored.shape[0]}")
            return

        positions = _pass_positions(fault, info, row)
        if isinstance(positions, str):
            self._skip(state, fault, positions)
            return
        # The pass wrote its seq_len positions at the end of the cached sequence.
        length = stored.shape[2]
        offsets = [length - info.seq_len + position for position in positions]
        for offset in offsets:
            if not 0 <= offset < length:
                # A sliding-window layer may no longer hold an early prompt position.
                self._skip(state, fault, f"position is outside the {length} cached positions of layer {fault.layer}")
                return

        befores, afters = [], []
        for offset in offsets:
            # [kv_heads, head_dim] view of one cached position.
            change = _apply(stored[row, :, offset, :], fault.elements, fault)
            befores.append(change.before)
            afters.append(change.after)
        state.done.add(id(fault))
        self._record(fault, stored.dtype, BitChange(torch.cat(befores), torch.cat(afters)), info)
