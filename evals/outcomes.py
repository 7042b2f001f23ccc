"""Outcome classes of a fault-injection trial, judged against the fault-free (golden) run.

Precedence, first match wins:

1. ``crash``: the trial raised, or produced non-finite logits or output (the caller decides
   and passes ``crashed=True``).
2. A mitigation detected something (``detected=True``):
   ``detected_corrected`` when the tokens equal the golden tokens or the score is at least
   the golden score, else ``detected_uncorrected``.
3. ``masked``: the tokens equal the golden tokens.
4. ``sdc_benign``: the tokens differ but the score is at least the golden score. A *higher*
   score than golden also counts as benign: the silent data corruption changed the output
   without hurting the task metric, and calling it critical would reward faults.
5. ``sdc_critical``: the tokens differ and the score is lower than golden.

For multiple-choice tasks scored by log-likelihood the "tokens" may be any comparable
sequence, for example the index of the chosen answer.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import Counter
from typing import Any, Iterable, Sequence

from guard.errors import ConfigError

logger = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    """The class of one trial; the value is the name written to result files."""

    MASKED = "masked"
    SDC_BENIGN = "sdc_benign"
    SDC_CRITICAL = "sdc_critical"
    DETECTED_CORRECTED = "detected_corrected"
    DETECTED_UNCORRECTED = "detected_uncorrected"
    CRASH = "crash"

    def __str__(self) -> str:
        return self.value

    @property
    def is_sdc(self) -> bool:
        """Whether the fault silently changed the output (no detector fired, no crash)."""
        return self in (Outcome.SDC_BENIGN, Outcome.SDC_CRITICAL)

    @property
    def is_detected(self) -> bool:
        """Whether a mitigation reported the fault."""
        return self in (Outcome.DETECTED_CORRECTED, Outcome.DETECTED_UNCORRECTED)

    @property
    def is_failure(self) -> bool:
        """Whether the trial ended worse than golden: a critical SDC, an uncorrected detection or a crash."""
        return self in (Outcome.SDC_CRITICAL, Outcome.DETECTED_UNCORRECTED, Outcome.CRASH)


def _token_list(field: str, tokens: Any) -> list:
    if tokens is None:
        raise ConfigError(f"{field} is None. Pass the generated token ids (a sequence).")
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)):
        return [tokens]
    try:
        return list(tokens)
    except TypeError:
        raise ConfigError(
            f"{field}={tokens!r} is not a sequence. Pass a list or tensor of token ids."
        ) from None


def _score(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field}={value!r} is not a number. Pass the task score in [0, 1].")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(
            f"{field} is NaN. A trial with non-finite output is a crash: pass crashed=True "
            "and a finite score such as 0.0."
        )
    return value


def classify_trial(
    *,
    golden_tokens: Sequence[Any],
    golden_score: float,
    tokens: Sequence[Any] | None,
    score: float | None,
    detected: bool,
    crashed: bool,
) -> Outcome:
    """Return the outcome of one trial; the module docstring gives the precedence.

    When ``crashed`` is true, ``tokens`` and ``score`` may be None.
    """
    if not isinstance(crashed, bool):
        raise ConfigError(f"crashed={crashed!r} is not a bool. Pass True or False.")
    if not isinstance(detected, bool):
        raise ConfigError(f"detected={detected!r} is not a bool. Pass True or False.")
    golden = _token_list("golden_tokens", golden_tokens)
    golden_value = _score("golden_score", golden_score)
    if crashed:
        return Outcome.CRASH
    same_tokens = _token_list("tokens", tokens) == golden
    value = _score("score", score)
    no_worse = value >= golden_value
    if detected:
        if same_tokens or no_worse:
            return Outcome.DETECTED_CORRECTED
        return Outcome.DETECTED_UNCORRECTED
    if same_tokens:
        return Outcome.MASKED
    if no_worse:
        return Outcome.SDC_BENIGN
    return Outcome.SDC_CRITICAL


def count_outcomes(outcomes: Iterable[Outcome | str]) -> dict[str, int]:
    """Count outcomes by name, listing every class (zero where absent) in declaration order."""
    counts = Counter()
    for item in outcomes:
        try:
            counts[Outcome(item).value] += 1
        except ValueError:
            valid = ", ".join(o.value for o in Outcome)
            raise ConfigError(f"outcome {item!r} is not valid. Valid choices: {valid}.") from None
    return {o.value: counts.get(o.value, 0) for o in Outcome}
