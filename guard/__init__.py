"""softguard's guard: protect a Hugging Face causal LM with soft-error mitigations.

    import guard
    guard.protect(model)                      # default set: abft + dual_first_token
    model.generate(...)                       # protected
    guard.get_report(model).last_call         # detections, extra passes, time added
    guard.unprotect(model)                    # back to the original, bit for bit
"""

from guard.errors import ConfigError, NotFoundError, SoftguardError
from guard.report import ACTIONS, CallReport, Detection, GuardReport
from guard.stages import ForwardInfo, Stage, StageTracker
from guard.protect import (
    DEFAULT_MITIGATIONS,
    get_report,
    is_protected,
    protect,
    protected_mitigations,
    resolve_mitigations,
    unprotect,
)

__all__ = [
    "ACTIONS",
    "CallReport",
    "ConfigError",
    "DEFAULT_MITIGATIONS",
    "Detection",
    "ForwardInfo",
    "GuardReport",
    "NotFoundError",
    "SoftguardError",
    "Stage",
    "StageTracker",
    "get_report",
    "is_protected",
    "protect",
    "protected_mitigations",
    "resolve_mitigations",
    "unprotect",
]
