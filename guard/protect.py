"""protect / unprotect: install mitigations on a model and take them off again.

``protect`` wraps the model's ``generate`` with an instance attribute built with
``functools.wraps`` (same name, docstring and signature), adds two hooks on the top-level
module so plain ``forward`` calls are reported too, attaches the shared StageTracker and
installs each mitigation. ``unprotect`` undoes all of it: afterwards ``model.generate`` is the
class's method again and no hook or attribute added by the guard remains. The guard's
bookkeeping lives in module-level weak dictionaries keyed by the model, so nothing is stored
on the model itself except the ``generate`` wrapper.

A protected model runs one guarded call at a time. The report, the stage tracker and the
mitigations' per-step state (such as the KV-cache position an ABFT rollback returns to)
belong to the model, so calls from several threads take a per-model lock in turn.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable

from torch import nn

from guard.context import GuardContext
from guard.errors import ConfigError
from guard.report import GuardReport, RateLimitedLog
from guard.stages import StageTracker

if TYPE_CHECKING:
    from mitigations.base import Mitigation

logger = logging.getLogger(__name__)

# The default set: ABFT on the dimension-reducing projections (o_proj, down_proj), which
# amplify errors most, plus a redundant prompt pass, because prefill and the first token
# are the most vulnerable stages. Both leave fault-free tokens unchanged.
DEFAULT_MITIGATIONS = ("abft", "dual_first_token")

_GUARD_OPTIONS = {"max_report_calls", "log_burst", "log_window_s"}

_STATES: "weakref.WeakKeyDictionary[nn.Module, _GuardState]" = weakref.WeakKeyDictionary()
# Reports outlive unprotect so callers can read them afterwards.
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, GuardReport]" = weakref.WeakKeyDictionary()

_MISSING = object()


class _GuardState:
    """Everything one protect() installed, so unprotect() can undo it."""

    def __init__(self, model: nn.Module, context: GuardContext, mitigations: tuple["Mitigation", ...]):
        self.model_ref = weakref.ref(model)
        self.context = context
        self.mitigations = mitigations
        self.handles: list[Any] = []
        self.previous_generate: Any = _MISSING
        # Held for each guarded generate and forward. Re-entrant, so a generate or forward
        # nested in a guarded call (a redundant pass, a streamer callback) does not wait for itself.
        self.lock = threading.RLock()
        # Per thread: how many forward calls took the lock in _before_forward, so that
        # _after_forward releases only what was taken, even after an earlier pre-hook raised.
        self.forward_locks = threading.local()
        # Nesting depth and start time of a plain forward call being reported.
        self.forward_depth = 0
        self.forward_start = 0.0


def is_protected(model: nn.Module) -> bool:
    """Tell whether ``model`` is currently protected by the guard."""
    try:
        return model in _STATES
    except TypeError:  # unhashable or not weak-referenceable
        return False


def get_report(model: nn.Module) -> GuardReport:
    """Return the report of ``model`` (also after ``unprotect``, until the next ``protect``)."""
    try:
        report = _REPORTS.get(model)
    except TypeError:
        report = None
    if report is None:
        raise ConfigError(
            f"{type(model).__name__} has never been protected, so it has no report; "
            "call guard.protect(model) first."
        )
    return report


def protected_mitigations(model: nn.Module) -> tuple["Mitigation", ...]:
    """Return the mitigations installed on ``model``, in composition order."""
    state = _STATES.get(model)
    return state.mitigations if state is not None else ()


def resolve_mitigations(
    mitigations: "str | Mitigation | Iterable[str | Mitigation] | None",
    options: dict[str, dict] | None = None,
) -> tuple["Mitigation", ...]:
    """Turn names, Mitigation objects or a list of both into objects in composition order.

    ``options`` maps a mitigation name to the config keywords used when it is given by name.
    """
    import mitigations as mitigation_registry  # mitigations imports guard, so load it lazily
    from mitigations.base import Mitigation

    options = dict(options or {})
    if mitigations is None:
        mitigations = DEFAULT_MITIGATIONS
    if isinstance(mitigations, (str, Mitigation)):
        mitigations = [mitigations]
    if isinstance(mitigations, dict):
        # Iterating a dict gives its keys, which would drop every setting in it.
        example = next(iter(mitigations), "abft")
        raise ConfigError(
            f"mitigations={mitigations!r} is a dict; pass the names as a list and each one's "
            f"settings as a keyword, for example protect(model, [{example!r}], {example}={{...}})."
        )
    try:
        items = list(mitigations)
    except TypeError:
        raise ConfigError(
            f"mitigations={mitigations!r} is not valid; give a name such as 'abft', a "
            "Mitigation object or a list of them."
        ) from None
    if not items:
        raise ConfigError(
            "mitigations is empty; give at least one, or None for the default set "
            f"{list(DEFAULT_MITIGATIONS)}."
        )
    resolved: list["Mitigation"] = []
    for item in items:
        if isinstance(item, str):
            resolved.append(mitigation_registry.get(item, **options.pop(item, {})))
        elif isinstance(item, Mitigation):
            if item.name in options:
                raise ConfigError(
                    f"options for {item.name!r} were given but {item!r} is already configured; "
                    "configure the object or pass the name, not both."
                )
            resolved.append(item)
        else:
            raise ConfigError(
                f"mitigations contains {item!r} ({type(item).__name__}); each entry must be a "
                f"name ({', '.join(mitigation_registry.available())}) or a Mitigation object."
            )
    names = [m.name for m in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"mitigation {duplicates[0]!r} is listed twice; list each mitigation once.")
    if options:
        unused = sorted(options)[0]
        raise ConfigError(
            f"options for {unused!r} were given but {unused!r} is not among the mitigations "
            f"{names}; add it or drop its options."
        )
    return tuple(sorted(resolved, key=lambda m: m.order))


def protect(
    model: nn.Module,
    mitigations: "str | Mitigation | Iterable[str | Mitigation] | None" = None,
    **options: Any,
) -> nn.Module:
    """Protect ``model`` with ``mitigations`` and return the same object.

    ``mitigations`` is a registered name, a Mitigation object or a list of both; None applies
    :data:`DEFAULT_MITIGATIONS`. A keyword named after a mitigation given by name takes its
    config keywords (``abft={"roles": ["down_proj"]}``). The guard settings are
    ``max_report_calls`` (call reports kept, default 10000) and ``log_burst`` with
    ``log_window_s`` (detection warnings per mitigation and check in each window, default 10
    per 60 s).
    Mitigations compose in a fixed order whatever the list order: abft, mixed_precision,
    dual_first_token, dynamic_shots (arithmetic first, whole-request reruns last).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"protect() needs a torch.nn.Module such as a transformers causal LM, got "
            f"{type(model).__name__}."
        )
    if not callable(getattr(model, "generate", None)):
        raise ConfigError(
            f"{type(model).__name__} has no generate method; protect a causal LM "
            "(for example AutoModelForCausalLM), not its base model."
        )
    if is_protected(model):
        raise ConfigError(
            f"{type(model).__name__} is already protected; call guard.unprotect(model) first, "
            "then protect it again with the full list of mitigations."
        )
    import mitigations as mitigation_registry  # mitigations imports guard, so load it lazily

    guard_options = {k: options.pop(k) for k in list(options) if k in _GUARD_OPTIONS}
    mitigation_options = {}
    for key, value in options.items():
        if key not in mitigation_registry.available():
            valid = sorted(_GUARD_OPTIONS | set(mitigation_registry.available()))
            raise ConfigError(
                f"protect() got an unknown option {key!r}. Valid options: {', '.join(valid)} "
                "(a mitigation name takes a dict of its config keywords)."
            )
        if not isinstance(value, dict):
            raise ConfigError(f"protect() option {key}={value!r} must be a dict of config keywords.")
        mitigation_options[key] = value
    resolved = resolve_mitigations(mitigations, mitigation_options)
    max_calls = guard_options.get("max_report_calls", 10_000)
    if max_calls is not None and (not isinstance(max_calls, int) or max_calls < 1):
        raise ConfigError(f"max_report_calls={max_calls!r} must be an integer >= 1 or None.")
    burst = guard_options.get("log_burst", 10)
    window = guard_options.get("log_window_s", 60.0)
    if not isinstance(burst, int) or burst < 0:
        raise ConfigError(f"log_burst={burst!r} must be an integer >= 0.")
    if not isinstance(window, (int, float)) or window <= 0:
        raise ConfigError(f"log_window_s={window!r} must be a number of seconds > 0.")

    report = GuardReport(max_calls=max_calls)
    tracker = StageTracker.attach(model)
    context = GuardContext(model, tracker, report, RateLimitedLog(burst, float(window)))
    context.mitigations = resolved
    state = _GuardState(model, context, resolved)
    installed: list["Mitigation"] = []
    try:
        # Mitigations install first, so a calibration pass during install is not reported.
        for mitigation in resolved:
            mitigation.install(model, context)
            installed.append(mitigation)
        state.handles.append(tracker.add_listener(on_start=context.on_forward_start))
        # prepend=True: the call must be open before the tracker's listeners count the pass.
        state.handles.append(
            model.register_forward_pre_hook(
                functools.partial(_before_forward, state), prepend=True
            ).remove
        )
        state.handles.append(
            model.register_forward_hook(
                functools.partial(_after_forward, state), always_call=True
            ).remove
        )
        state.previous_generate = model.__dict__.get("generate", _MISSING)
        model.generate = _wrap_generate(state, model.generate)
    except BaseException:
        _undo(model, state, installed, tracker)
        raise
    _STATES[model] = state
    _REPORTS[model] = report
    logger.info(
        "protected %s with %s", type(model).__name__, ", ".join(m.name for m in resolved)
    )
    return model


def unprotect(model: nn.Module) -> nn.Module:
    """Remove every mitigation, hook and wrapper that :func:`protect` added; return ``model``."""
    state = _STATES.get(model) if isinstance(model, nn.Module) else None
    if state is None:
        raise ConfigError(
            f"{type(model).__name__} is not protected; nothing to remove "
            "(guard.is_protected(model) tells beforehand)."
        )
    del _STATES[model]
    _undo(model, state, list(state.mitigations), state.context.tracker)
    logger.info("unprotected %s", type(model).__name__)
    return model


def _undo(model: nn.Module, state: _GuardState, installed: list["Mitigation"], tracker: StageTracker) -> None:
    try:
        for mitigation in reversed(installed):
            mitigation.remove()
    finally:
        if state.previous_generate is _MISSING:
            model.__dict__.pop("generate", None)
        else:
            model.__dict__["generate"] = state.previous_generate
        for remove in reversed(state.handles):
            remove()
        state.handles.clear()
        tracker.detach()


def _wrap_generate(state: _GuardState, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        return _run_generate(state, original, args, kwargs)

    return generate


def _run_generate(state: _GuardState, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    with state.lock:
        return _run_generate_locked(state, original, args, kwargs)


def _run_generate_locked(state: _GuardState, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    context = state.context
    if context.call is not None:
        # A generate nested in a guarded call (for example from a streamer callback) runs
        # unwrapped and is counted in the outer call.
        return original(*args, **kwargs)

    mitigations = state.mitigations

    def run_attempt(*call_args: Any, **call_kwargs: Any) -> Any:
        with context.timed():
            for mitigation in mitigations:
                mitigation.before_generate(context, call_args, call_kwargs)
        output = original(*call_args, **call_kwargs)
        with context.timed():
            for mitigation in mitigations:
                mitigation.after_generate(context, output)
        return output

    chain = run_attempt
    for mitigation in mitigations:  # lowest order innermost, highest outermost
        chain = functools.partial(_around, mitigation, context, chain)

    call = context.report.open_call("generate", tuple(m.name for m in mitigations))
    context.call, context.call_kind, context.attempt = call, "generate", 0
    start = time.perf_counter()
    try:
        return chain(*args, **kwargs)
    finally:
        call.wall_s = time.perf_counter() - start
        context.call, context.call_kind, context.attempt = None, None, 0
        context.report.close_call(call)


def _around(mitigation: "Mitigation", context: GuardContext, call_next, *args: Any, **kwargs: Any) -> Any:
    return mitigation.around_generate(context, call_next, args, kwargs)


def _before_forward(state: _GuardState, module: nn.Module, args: tuple) -> None:
    # Released in _after_forward, which runs even when the forward raises (always_call=True).
    state.lock.acquire()
    state.forward_locks.count = getattr(state.forward_locks, "count", 0) + 1
    context = state.context
    if context.call is None:
        call = context.report.open_call("forward", tuple(m.name for m in state.mitigations))
        context.call, context.call_kind, context.attempt = call, "forward", 0
        state.forward_depth = 1
        state.forward_start = time.perf_counter()
    elif context.call_kind == "forward":
        state.forward_depth += 1


def _after_forward(state: _GuardState, module: nn.Module, args: tuple, output: Any) -> None:
    if not getattr(state.forward_locks, "count", 0):
        return
    try:
        _close_forward(state)
    finally:
        state.forward_locks.count -= 1
        state.lock.release()


def _close_forward(state: _GuardState) -> None:
    context = state.context
    if context.call_kind != "forward" or context.call is None:
        return
    state.forward_depth -= 1
    if state.forward_depth == 0:
        call = context.call
        call.wall_s = time.perf_counter() - state.forward_start
        context.call, context.call_kind = None, None
        context.report.close_call(call)
