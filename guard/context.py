"""The services the guard lends to installed mitigations while a model is protected."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Iterator

from torch import nn

from guard.report import CallReport, Detection, GuardReport, RateLimitedLog
from guard.stages import ForwardInfo, StageTracker

if TYPE_CHECKING:
    from mitigations.base import Mitigation

logger = logging.getLogger(__name__)


class GuardContext:
    """Shared state of one protected model: stage tracker, report and the call in progress.

    Mitigations record detections with :meth:`record` and wrap their own work in
    :meth:`timed`, so the report shows what protection cost. :attr:`call` is the running
    request's report (None outside any call).
    """

    def __init__(self, model: nn.Module, tracker: StageTracker, report: GuardReport, log: RateLimitedLog):
        self.model = model
        self.tracker = tracker
        self.report = report
        self.log = log
        self.mitigations: tuple["Mitigation", ...] = ()
        self.call: CallReport | None = None
        self.call_kind: str | None = None
        # Attempt number within the call: 0 first, k for the k-th rerun of the request.
        self.attempt = 0
        self._timed_depth = 0

    @property
    def in_generate(self) -> bool:
        return self.call_kind == "generate"

    @property
    def forward(self) -> ForwardInfo | None:
        """The forward pass running now, or None."""
        return self.tracker.current

    def record(self, detection: Detection) -> Detection:
        """File ``detection`` under the running call and log it (rate-limited)."""
        detection.attempt = self.attempt
        if self.call is not None:
            self.call.detections.append(detection)
        else:
            # NOTE: only reachable when a hook fires outside a guarded call, e.g. a
            # submodule called directly; the detection is logged but not reported.
            logger.debug("detection outside a guarded call: %s", detection)
        self.log.log(detection)
        return detection

    def note_memory(self, extra_bytes: int) -> None:
        """Raise the call's peak extra memory to ``extra_bytes`` if larger."""
        if self.call is not None:
            self.call.extra_memory_bytes = max(self.call.extra_memory_bytes, int(extra_bytes))

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Add the time spent in the block to the call's ``time_added_s`` (outermost block only)."""
        self._timed_depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._timed_depth -= 1
            if self._timed_depth == 0 and self.call is not None:
                self.call.time_added_s += time.perf_counter() - start

    def add_time_since(self, start: float) -> None:
        """Add ``perf_counter() - start`` to the call's ``time_added_s`` unless inside :meth:`timed`."""
        if self._timed_depth == 0 and self.call is not None:
            self.call.time_added_s += time.perf_counter() - start

    def redundant(self):
        """Run nested forwards as recomputations that do not advance the stage count."""
        return self.tracker.redundant()

    # ----- used by the guard ---------------------------------------------------------

    def on_forward_start(self, tracker: StageTracker, info: ForwardInfo) -> None:
        call = self.call
        if call is None:
            return
        if info.redundant or self.attempt > 0:
            call.extra_forward_passes += 1
            return
        call.forward_passes += 1
        if info.index == 0:
            call.batch_size = info.batch_size
            call.prompt_length = info.seq_len
        else:
            call.decode_steps = max(call.decode_steps, info.index)
