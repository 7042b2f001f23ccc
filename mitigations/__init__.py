"""Soft-error mitigations, each a Mitigation subclass behind one name registry.

    import mitigations
    mitigations.available()          # ['abft', 'dual_first_token', 'dynamic_shots', 'mixed_precision']
    mitigations.get("abft", roles=["down_proj"])

Composition order (lower runs closer to the arithmetic, and its hooks act first on a shared
module): abft (10), mixed_precision (20), dual_first_token (30), dynamic_shots (40). ABFT
precedes mixed precision so an output it can correct exactly is corrected before the
saturating clamp would only bound it.
"""

from mitigations.base import (
    InstallHandle,
    Mitigation,
    MitigationConfig,
    available,
    get,
    register,
    unregister,
)
from mitigations.abft import ABFT, ABFTConfig
from mitigations.dual_first_token import DualFirstToken, DualFirstTokenConfig
from mitigations.mixed_precision import MixedPrecision, MixedPrecisionConfig
from mitigations.dynamic_shots import DynamicShots, DynamicShotsConfig, ShotsResult

__all__ = [
    "ABFT",
    "ABFTConfig",
    "DualFirstToken",
    "DualFirstTokenConfig",
    "DynamicShots",
    "DynamicShotsConfig",
    "InstallHandle",
    "MixedPrecision",
    "MixedPrecisionConfig",
    "Mitigation",
    "MitigationConfig",
    "available",
    "get",
    "register",
    "ShotsResult",
    "unregister",
]
