"""The task registry: names to task factories, with option checking and the NAME:PATH form."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

from guard.errors import ConfigError, NotFoundError, close_matches
from evals.tasks.base import Task

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., Task]] = {}
# Names whose factory takes a ``path`` option may be written "NAME:PATH".
_PATH_OPTION = "path"


def register_task(name: str, factory: Callable[..., Task], *, replace: bool = False) -> None:
    """Register ``factory`` (a Task subclass or a function returning a Task) under ``name``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ConfigError(f"task name {name!r} is invalid. Pass a non-empty name without ':'.")
    if not callable(factory):
        raise ConfigError(f"factory for task {name!r} is not callable.")
    if name in _REGISTRY and not replace:
        raise ConfigError(
            f"task {name!r} is already registered. Pass replace=True to override it."
        )
    _REGISTRY[name] = factory


def unregister_task(name: str) -> None:
    """Remove a registered task; unknown names raise NotFoundError."""
    if name not in _REGISTRY:
        raise NotFoundError(_missing_message(name))
    del _REGISTRY[name]


def available_tasks() -> list[str]:
    """Return the registered task names, sorted."""
    return sorted(_REGISTRY)


def _missing_message(name: str) -> str:
    return (
        f"unknown task {name!r}.{close_matches(name, _REGISTRY)} "
        f"Available tasks: {', '.join(available_tasks())}."
    )


def _accepted_options(factory: Callable[..., Task]) -> tuple[set[str], bool]:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)
    return names, open_ended


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with ``options``.

    ``"bigbench:PATH"`` (and the same form for any task with a ``path`` option) is short for
    ``get_task("bigbench", path=PATH)``. Unknown names raise NotFoundError with close
    matches; unknown options raise ConfigError listing the valid ones.
    """
    if not isinstance(name, str) or not name:
        raise NotFoundError(_missing_message(str(name)))
    base, separator, path = name.partition(":")
    if base not in _REGISTRY:
        raise NotFoundError(_missing_message(base if separator else name))
    factory = _REGISTRY[base]
    accepted, open_ended = _accepted_options(factory)
    if separator:
        if _PATH_OPTION not in accepted and not open_ended:
            raise ConfigError(f"task {base!r} takes no path, so the form '{base}:PATH' does not apply.")
        if _PATH_OPTION in options and options[_PATH_OPTION] != path:
            raise ConfigError(
                f"task name {name!r} and option path={options[_PATH_OPTION]!r} disagree. Give the path once."
            )
        options[_PATH_OPTION] = path
    if not open_ended:
        unknown = sorted(set(options) - accepted)
        if unknown:
            hint = close_matches(unknown[0], accepted)
            raise ConfigError(
                f"task {base!r} has no option {unknown[0]!r}.{hint} "
                f"Valid options: {', '.join(sorted(accepted))}."
            )
    task = factory(**options)
    if not isinstance(task, Task):
        raise ConfigError(f"factory of task {base!r} returned {type(task).__name__}, not a Task.")
    logger.debug("built task %s with %d examples", task.name, len(task.examples()))
    return task
