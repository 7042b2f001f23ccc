"""The Mitigation base class, its install handle and the name registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from torch import nn

from guard.errors import ConfigError, NotFoundError, close_matches

if TYPE_CHECKING:
    from guard.context import GuardContext

logger = logging.getLogger(__name__)


@dataclass
class MitigationConfig:
    """Base of every mitigation's configuration; subclasses validate in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class InstallHandle:
    """Undoes one install: removes hooks and runs cleanups, last installed first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def add_hook(self, hook_handle) -> None:
        self._undo.append(hook_handle.remove)

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        self._undo.append(cleanup)

    def remove(self) -> None:
        """Undo everything; later calls do nothing. Every step runs even if one raises."""
        if self.removed:
            return
        self.removed = True
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as error:  # keep undoing the rest, then re-raise the first
                logger.exception("cleanup step failed: %s", error)
                errors.append(error)
        if errors:
            raise errors[0]


class Mitigation:
    """A soft-error mitigation that installs into a model through the guard.

    Subclasses set ``name`` (the registry name), ``order`` (composition position: lower runs
    closer to the arithmetic, higher wraps more of the request) and ``Config`` (a dataclass
    validated on construction). The guard calls :meth:`install` once, the generate-level
    hooks around each protected ``generate``, and :meth:`remove` on ``unprotect``.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    Config: ClassVar[type[MitigationConfig]] = MitigationConfig

    def __init__(self, config: MitigationConfig | None = None, **options: Any):
        if config is not None and options:
            raise ConfigError(
                f"{type(self).__name__}: pass either config= or keyword options, not both "
                f"(got config and {sorted(options)})."
            )
        if config is None:
            valid = {f.name for f in fields(self.Config)}
            unknown = sorted(set(options) - valid)
            if unknown:
                raise ConfigError(
                    f"{type(self).__name__}: unknown option {unknown[0]!r}."
                    f"{close_matches(unknown[0], valid)} Valid options: {', '.join(sorted(valid))}."
                )
            config = self.Config(**options)
        elif not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__}: config must be a {self.Config.__name__}, "
                f"got {type(config).__name__}."
            )
        self.config = config
        self._handle: InstallHandle | None = None
        self._context: "GuardContext | None" = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def install(self, model: nn.Module, context: "GuardContext") -> InstallHandle:
        """Attach to ``model`` and return the handle that undoes it."""
        if self._handle is not None:
            raise ConfigError(
                f"mitigation {self.name!r} is already installed on a model; create a new "
                f"{type(self).__name__} for each protected model."
            )
        handle = InstallHandle()
        self._context = context
        try:
            self._install(model, context, handle)
        except BaseException:
            handle.remove()
            self._context = None
            raise
        self._handle = handle
        return handle

    def remove(self) -> None:
        """Undo :meth:`install`; safe to call twice."""
        handle, self._handle = self._handle, None
        self._context = None
        if handle is not None:
            handle.remove()

    # ----- subclass interface ---------------------------------------------------------

    def _install(self, model: nn.Module, context: "GuardContext", handle: InstallHandle) -> None:
        raise NotImplementedError

    def before_generate(self, context: "GuardContext", args: tuple, kwargs: dict) -> None:
        """Run before every attempt of a protected ``generate``."""

    def after_generate(self, context: "GuardContext", output: Any) -> None:
        """Run after every attempt of a protected ``generate``."""

    def around_generate(
        self, context: "GuardContext", call_next: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        """Wrap a protected ``generate``; the default runs it once."""
        return call_next(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_REGISTRY: dict[str, type[Mitigation]] = {}


def register(cls: type[Mitigation]) -> type[Mitigation]:
    """Register a Mitigation subclass under its ``name``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Mitigation)):
        raise ConfigError(f"register() takes a Mitigation subclass, got {cls!r}.")
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has an empty name; set the class attribute name.")
    if cls.name in _REGISTRY:
        raise ConfigError(
            f"a mitigation named {cls.name!r} is already registered "
            f"({_REGISTRY[cls.name].__name__}); choose another name."
        )
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for plug-ins that replace a mitigation)."""
    if name not in _REGISTRY:
        raise NotFoundError(_missing_message(name))
    del _REGISTRY[name]


def available() -> list[str]:
    """Return the registered mitigation names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **config: Any) -> Mitigation:
    """Return a new mitigation registered as ``name``, configured with ``config``."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise NotFoundError(_missing_message(name))
    return _REGISTRY[name](**config)


def _missing_message(name: object) -> str:
    return (
        f"unknown mitigation {name!r}.{close_matches(str(name), _REGISTRY)} "
        f"Available mitigations: {', '.join(available())}."
    )
