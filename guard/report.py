"""What the guard observed: detections, per-call reports and cumulative totals.

Every mitigation records a :class:`Detection` through the guard. The guard files it under
the running :class:`CallReport`, one per protected ``generate`` or plain ``forward`` call. It
also logs it at WARNING level, rate-limited per (mitigation, check), so a burst of faults
cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Actions a mitigation can take on a detection.
ACTIONS = ("corrected", "recomputed", "restored", "rerun", "voted", "agreed", "clamped", "none")

# Actions after which the affected output is believed to be right again.
CORRECTING_ACTIONS = frozenset({"corrected", "recomputed", "restored", "rerun", "voted"})


@dataclass
class Detection:
    """One fault signal raised by a mitigation.

    ``row`` is the batch row the signal belongs to (None when it concerns the whole batch, for
    example a corrupted weight), ``step`` the forward index (0 = prompt pass, k = decode step
    k) and ``stage`` one of ``prefill``, ``first_token``, ``decode``.
    """

    mitigation: str
    check: str
    action: str
    layer: int | None = None
    module: str | None = None
    stage: str | None = None
    step: int | None = None
    row: int | None = None
    detail: str = ""
    attempt: int = 0
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Detection.action={self.action!r} is not one of {ACTIONS}")

    @property
    def corrected(self) -> bool:
        """True when the action restored a believed-correct value."""
        return self.action in CORRECTING_ACTIONS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CallReport:
    """Record of one protected ``generate`` or plain ``forward`` call.

    ``forward_passes`` counts the passes the caller asked for (decode steps included);
    ``extra_forward_passes`` counts the recomputations the mitigations added (dual first-token
    runs, dynamic-shot reruns). ``time_added_s`` is the time spent inside mitigation code and
    reruns, ``wall_s`` the whole call. ``extra_memory_bytes`` is the peak extra memory held by
    mitigations during the call (for example the duplicate KV cache of a dual run).
    """

    index: int
    kind: str
    batch_size: int | None = None
    prompt_length: int | None = None
    forward_passes: int = 0
    decode_steps: int = 0
    extra_forward_passes: int = 0
    extra_memory_bytes: int = 0
    time_added_s: float = 0.0
    wall_s: float = 0.0
    attempts: int = 1
    detections: list[Detection] = field(default_factory=list)
    mitigations: tuple[str, ...] = ()

    @property
    def detected(self) -> bool:
        return bool(self.detections)

    def rows_detected(self, attempt: int | None = None) -> set[int | None]:
        """Return the batch rows with a detection (None stands for the whole batch)."""
        return {
            d.row for d in self.detections if attempt is None or d.attempt == attempt
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mitigations"] = list(self.mitigations)
        return data


class GuardReport:
    """Per-call reports of one protected model, with cumulative totals.

    ``max_calls`` bounds how many call reports are kept (the oldest go first); the totals
    always count every call since the last :meth:`reset`.
    """

    def __init__(self, max_calls: int | None = 10_000):
        self.max_calls = max_calls
        self.calls: list[CallReport] = []
        self._reset_totals()

    def _reset_totals(self) -> None:
        self.total_calls = 0
        self.total_detections = 0
        self.total_extra_forward_passes = 0
        self.total_forward_passes = 0
        self.total_time_added_s = 0.0
        self.total_wall_s = 0.0
        self.detections_by_check: Counter[str] = Counter()
        self.detections_by_action: Counter[str] = Counter()
        self._next_index = 0

    def reset(self) -> None:
        """Forget every call report and zero the totals."""
        self.calls.clear()
        self._reset_totals()

    @property
    def last_call(self) -> CallReport | None:
        return self.calls[-1] if self.calls else None

    @property
    def detections(self) -> list[Detection]:
        """Every detection of the kept calls, oldest first."""
        return [d for call in self.calls for d in call.detections]

    @property
    def overhead_ratio(self) -> float | None:
        """Wall time over wall time minus the time mitigations added, or None before any call."""
        base = self.total_wall_s - self.total_time_added_s
        if self.total_calls == 0 or base <= 0:
            return None
        return self.total_wall_s / base

    def open_call(self, kind: str, mitigations: tuple[str, ...]) -> CallReport:
        call = CallReport(index=self._next_index, kind=kind, mitigations=mitigations)
        self._next_index += 1
        return call

    def close_call(self, call: CallReport) -> None:
        self.calls.append(call)
        if self.max_calls is not None and len(self.calls) > self.max_calls:
            del self.calls[: len(self.calls) - self.max_calls]
        self.total_calls += 1
        self.total_detections += len(call.detections)
        self.total_extra_forward_passes += call.extra_forward_passes
        self.total_forward_passes += call.forward_passes
        self.total_time_added_s += call.time_added_s
        self.total_wall_s += call.wall_s
        for detection in call.detections:
            self.detections_by_check[detection.check] += 1
            self.detections_by_action[detection.action] += 1

    def summary(self) -> dict[str, Any]:
        """Return the cumulative totals as a plain dictionary."""
        return {
            "calls": self.total_calls,
            "detections": self.total_detections,
            "detections_by_check": dict(self.detections_by_check),
            "detections_by_action": dict(self.detections_by_action),
            "forward_passes": self.total_forward_passes,
            "extra_forward_passes": self.total_extra_forward_passes,
            "time_added_s": self.total_time_added_s,
            "wall_s": self.total_wall_s,
            "overhead_ratio": self.overhead_ratio,
        }

    def __repr__(self) -> str:
        return (
            f"GuardReport(calls={self.total_calls}, detections={self.total_detections}, "
            f"extra_forward_passes={self.total_extra_forward_passes})"
        )


class RateLimitedLog:
    """Logs detections at WARNING, at most ``burst`` per key in each ``window_s`` seconds.

    Suppressed messages are counted and the count is logged when the key's next window opens.
    """

    def __init__(self, burst: int = 10, window_s: float = 60.0, clock=time.monotonic):
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        # key -> [window start, messages logged in the window, messages suppressed]
        self._windows: dict[tuple[str, str], list[float]] = {}

    def log(self, detection: Detection) -> bool:
        """Log ``detection`` unless its key is over the limit; return whether it was logged."""
        key = (detection.mitigation, detection.check)
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.window_s:
            suppressed = int(window[2]) if window is not None else 0
            if suppressed:
                logger.warning(
                    "%s/%s: %d further detections were not logged in the last %.0f s",
                    key[0], key[1], suppressed, self.window_s,
                )
            window = [now, 0, 0]
            self._windows[key] = window
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        logger.warning(
            "%s detected %s in %s (layer %s, %s, step %s, row %s): action %s. %s",
            detection.mitigation, detection.check, detection.module, detection.layer,
            detection.stage, detection.step, detection.row, detection.action, detection.detail,
        )
        return True
