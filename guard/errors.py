"""Exception types shared by every softguard package.

The CLI prints a :class:`SoftguardError` as one line, without a traceback, so each message
names the field or value at fault and states what to do instead.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class SoftguardError(Exception):
    """Base class of the errors that softguard raises for bad input or a missing resource."""


class ConfigError(SoftguardError, ValueError):
    """An invalid setting: the message names the field, the value and the valid choices."""


class NotFoundError(SoftguardError, LookupError):
    """A name (model, task, mitigation, site) that matches nothing registered or present."""


def close_matches(name: str, choices: Iterable[str]) -> str:
    """Return a "did you mean" hint for ``name`` among ``choices``, or an empty string."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def unknown_choice(field: str, value: object, choices: Iterable[str]) -> str:
    """Format the message for a value outside a fixed set of choices."""
    choices = sorted(str(c) for c in choices)
    return (
        f"{field}={value!r} is not valid.{close_matches(str(value), choices)} "
        f"Valid choices: {', '.join(choices)}."
    )
