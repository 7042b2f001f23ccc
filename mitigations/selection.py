"""Selection of linear layers by role, layer index and module-name glob.

The role of a layer is the last component of its module name (``q_proj``, ``o_proj``,
``down_proj``, ``lm_head``...). GPT-2 style models use ``Conv1D`` with other names, so their
layers also match the Llama-style role they play (``attn.c_proj`` is ``o_proj``,
``mlp.c_proj`` is ``down_proj``, ``mlp.c_fc`` is ``up_proj``, ``attn.c_attn`` is ``qkv_proj``).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from guard.errors import ConfigError, unknown_choice

logger = logging.getLogger(__name__)

try:  # transformers keeps GPT-2's Conv1D here in 4.x and 5.x
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]

STAGE_NAMES = ("prefill", "first_token", "decode")

# Roles that take part in the usual decoder block, for validating user input.
KNOWN_ROLES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
    "lm_head", "c_attn", "c_proj", "c_fc",
)
ALL_LINEAR = "all_linear"

_GPT2_ALIASES = {
    "attn.c_attn": "qkv_proj",
    "attn.c_proj": "o_proj",
    "mlp.c_fc": "up_proj",
    "mlp.c_proj": "down_proj",
}
_LAYER_PATTERN = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LinearSite:
    """A linear layer chosen for protection: ``y = x @ W.T + b`` (or ``x @ W + b`` for Conv1D)."""

    name: str
    module: nn.Module
    roles: tuple[str, ...]
    layer: int | None
    transposed: bool  # True for Conv1D, whose weight is [in, out]

    @property
    def role(self) -> str:
        return self.roles[-1]

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)


def layer_index(name: str) -> int | None:
    """Return the decoder-block index in a module name, or None outside the blocks."""
    match = _LAYER_PATTERN.search("." + name)
    return int(match.group(1)) if match else None


def roles_of(name: str) -> tuple[str, ...]:
    """Return the roles of a module name: its last component and any alias."""
    last = name.rsplit(".", 1)[-1]
    roles = [last]
    for suffix, alias in _GPT2_ALIASES.items():
        if name.endswith(suffix):
            roles.append(alias)
    return tuple(roles)


def normalize_roles(field: str, roles: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a role selection: ``"all_linear"`` or a non-empty list of role names."""
    if isinstance(roles, str):
        roles = (roles,)
    roles = tuple(roles)
    if not roles:
        raise ConfigError(f"{field} is empty; give role names such as 'down_proj' or '{ALL_LINEAR}'.")
    for role in roles:
        if not isinstance(role, str) or not role:
            raise ConfigError(f"{field} contains {role!r}; roles are non-empty strings.")
    if ALL_LINEAR in roles and len(roles) > 1:
        raise ConfigError(f"{field}={roles!r}: '{ALL_LINEAR}' already selects every linear layer; use it alone.")
    return roles


def normalize_layers(field: str, layers: str | int | Iterable[int]) -> str | tuple[int, ...]:
    """Validate a layer selection: ``"all"``, one index or a collection of indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ConfigError(unknown_choice(field, layers, ["all"]) + " Or give layer indices.")
        return "all"
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    try:
        values = tuple(layers)
    except TypeError:
        raise ConfigError(f"{field}={layers!r} is not valid; use 'all' or a list of layer indices.") from None
    if not values:
        raise ConfigError(f"{field} is empty; use 'all' or a list of layer indices.")
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{field} contains {value!r}; layer indices are integers >= 0.")
    return tuple(sorted(set(values)))


def normalize_stages(field: str, stages: str | Sequence[str]) -> frozenset[str]:
    """Validate a stage selection: ``"all"`` or names among prefill, first_token, decode."""
    if isinstance(stages, str):
        stages = STAGE_NAMES if stages == "all" else (stages,)
    stages = tuple(stages)
    if not stages:
        raise ConfigError(f"{field} is empty; choose among {', '.join(STAGE_NAMES)} or 'all'.")
    for stage in stages:
        if stage not in STAGE_NAMES:
            raise ConfigError(unknown_choice(field, stage, STAGE_NAMES + ("all",)))
    return frozenset(stages)


def select_linear(
    model: nn.Module,
    roles: tuple[str, ...],
    layers: str | tuple[int, ...],
    modules: tuple[str, ...] = (),
    owner: str = "selection",
) -> list[LinearSite]:
    """Return the ``nn.Linear`` / ``Conv1D`` layers of ``model`` matching every criterion.

    Raises ConfigError when nothing matches, listing the roles the model does have.
    """
    sites = []
    seen_roles: set[str] = set()
    seen_layers: set[int] = set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear)
        is_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        if not (is_linear or is_conv1d):
            continue
        module_roles = roles_of(name)
        layer = layer_index(name)
        seen_roles.update(module_roles)
        if layer is not None:
            seen_layers.add(layer)
        if roles != (ALL_LINEAR,) and not set(module_roles) & set(roles):
            continue
        if layers != "all" and layer not in layers:
            continue
        if modules and not any(fnmatch.fnmatchcase(name, pattern) for pattern in modules):
            continue
        sites.append(LinearSite(name, module, module_roles, layer, transposed=is_conv1d))
    if not sites:
        layer_text = f"layers 0-{max(seen_layers)}" if seen_layers else "no numbered layers"
        raise ConfigError(
            f"{owner}: roles={list(roles)!r}, layers={layers!r}, modules={list(modules)!r} "
            f"match no linear layer of {type(model).__name__}. It has roles "
            f"{', '.join(sorted(seen_roles)) or 'none'} and {layer_text}; widen the selection."
        )
    return sites
