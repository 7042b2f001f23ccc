"""Mixed precision: a per-stage, per-module precision policy with saturating casts.

Two independent parts act on the selected linear layers:

* Compute format. In a bf16 or fp16 model, the selected layers run in ``compute_dtype``
  (float32 by default) during the selected stages. Inputs and parameters are cast up and the
  product is accumulated in the wider format. The result is cast back with saturation: it is
  clamped to the model format's finite range, so it cannot round to Inf.
  Parameters are cast on every call rather than copied once, so a corrupted weight in memory
  is used as it is and stays visible to ABFT's weight checksums.
* Saturating clamp. A forward hook (registered after any fault-injecting hook) bounds each
  output to ``[-bound, bound]``. The bound is ``margin`` times the largest magnitude seen on
  fault-free calibration input (``clamp="profile"``), the format's largest finite value
  (``clamp="format_max"``, which only removes Inf/NaN), or a number. Non-finite values become
  the bound with their sign (NaN, which has none, becomes 0) with ``nonfinite="bound"``, or
  all become 0 with ``nonfinite="zero"``.

Unlike ABFT and dual first-token this changes fault-free numerics whenever the compute
format differs from the model's or a fault-free value exceeds the bound, so its fault-free
accuracy must be measured beside its protection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guard.errors import ConfigError, unknown_choice
from guard.report import Detection
from mitigations.base import InstallHandle, Mitigation, MitigationConfig, register
from mitigations.selection import (
    LinearSite,
    normalize_layers,
    normalize_roles,
    normalize_stages,
    select_linear,
)

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64, "none": None}
CLAMP_MODES = ("profile", "format_max", "none")
NONFINITE_MODES = ("bound", "zero")
SUPPORTED_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class MixedPrecisionConfig(MitigationConfig):
    """Precision policy of the selected linear layers.

    ``compute_dtype``: ``"auto"`` (float32 for bf16/fp16 models, unchanged otherwise),
    ``"float32"``, ``"float64"`` or ``"none"``. ``compute_stages``: stages that use it (the
    prompt pass contains both prefill and first_token, so selecting either runs the whole pass
    in the compute format). ``clamp``: ``"profile"``, ``"format_max"``, ``"none"`` or a positive
    number used as the bound for every layer. ``margin``: factor on the profiled maximum.
    ``calibration``: token ids ``[batch, seq]`` for profiling; None draws
    ``calibration_shape`` random ids with ``calibration_seed``.
    """

    roles: Any = ("o_proj", "down_proj")
    layers: Any = "all"
    modules: Any = ()
    compute_dtype: str = "auto"
    compute_stages: Any = ("prefill", "first_token")
    clamp: Any = "profile"
    margin: float = 8.0
    nonfinite: str = "bound"
    calibration: Any = None
    calibration_seed: int = 0
    calibration_shape: tuple[int, int] = (4, 32)

    def __post_init__(self) -> None:
        self.roles = normalize_roles("mixed_precision.roles", self.roles)
        self.layers = normalize_layers("mixed_precision.layers", self.layers)
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.modules = tuple(self.modules)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(unknown_choice("mixed_precision.compute_dtype", self.compute_dtype, COMPUTE_DTYPES))
        self.compute_stages = normalize_stages("mixed_precision.compute_stages", self.compute_stages)
        clamp = self.clamp
        if isinstance(clamp, bool) or not (
            clamp in CLAMP_MODES or (isinstance(clamp, (int, float)) and clamp > 0 and clamp < float("inf"))
        ):
            raise ConfigError(
                f"mixed_precision.clamp={clamp!r} is not valid; use one of {', '.join(CLAMP_MODES)} "
                "or a finite positive number as the bound."
            )
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 1:
            raise ConfigError(
                f"mixed_precision.margin={margin!r} is not valid; use a number >= 1 "
                "(the bound is margin times the largest fault-free magnitude)."
            )
        if self.nonfinite not in NONFINITE_MODES:
            raise ConfigError(unknown_choice("mixed_precision.nonfinite", self.nonfinite, NONFINITE_MODES))
        if self.calibration is not None:
            if not torch.is_tensor(self.calibration) or self.calibration.dim() != 2 or self.calibration.is_floating_point():
                raise ConfigError(
                    "mixed_precision.calibration must be a 2-D integer tensor of token ids "
                    f"[batch, seq], got {type(self.calibration).__name__}"
                    f"{tuple(self.calibration.shape) if torch.is_tensor(self.calibration) else ''}."
                )
        shape = tuple(self.calibration_shape)
        if len(shape) != 2 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ConfigError(
                f"mixed_precision.calibration_shape={self.calibration_shape!r} must be two integers >= 1 (batch, seq)."
            )
        self.calibration_shape = shape
        if not isinstance(self.calibration_seed, int):
            raise ConfigError(f"mixed_precision.calibration_seed={self.calibration_seed!r} must be an integer.")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    raise ConfigError(
        f"mixed_precision: {type(model).__name__} has no floating-point parameters; the "
        "policy applies to float32, bfloat16 or float16 models."
    )


class _Layer:
    """One selected layer: its compute-format forward and its clamp hook."""

    def __init__(self, site: LinearSite, mitigation: "MixedPrecision", model_dtype: torch.dtype):
        self.site = site
        self.mitigation = mitigation
        self.model_dtype = model_dtype
        self.bound: float | None = None
        self.clamps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.site.module
        mitigation = self.mitigation
        context = mitigation._context
        info = context.forward if context is not None else None
        stages = mitigation.config.compute_stages
        use_wide = info is None or (
            ("decode" in stages) if info.index > 0 else bool(stages & {"prefill", "first_token"})
        )
        if not use_wide:
            return type(module).forward(module, x)
        wide = mitigation.compute_dtype
        bias = module.bias.to(wide) if module.bias is not None else None
        if self.site.transposed:
            x2 = x.reshape(-1, x.shape[-1]).to(wide)
            out = x2 @ module.weight.to(wide)
            if bias is not None:
                out = out + bias
            out = out.reshape(*x.shape[:-1], module.weight.shape[1])
        else:
            out = F.linear(x.to(wide), module.weight.to(wide), bias)
        # Saturating cast: values beyond the narrow format's range stay finite.
        limit = torch.finfo(x.dtype).max
        return out.clamp_(-limit, limit).to(x.dtype)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        context = self.mitigation._context
        if context is None or self.bound is None or not torch.is_tensor(output):
            return None
        with context.timed():
            peak = output.detach().abs().amax()
            if bool(peak <= self.bound):  # NaN compares false
                return None
            return self._clamp(output, args[0] if args else None, context)

    def _clamp(self, output: torch.Tensor, x: torch.Tensor | None, context) -> torch.Tensor:
        bound = self.bound
        nonfinite = ~torch.isfinite(output)
        out_of_range = output.abs() > bound
        affected = nonfinite | out_of_range
        fixed = output.clamp(-bound, bound)
        if self.mitigation.config.nonfinite == "zero":
            fixed = torch.where(nonfinite, torch.zeros_like(fixed), fixed)
        else:
            fixed = torch.nan_to_num(fixed, nan=0.0, posinf=bound, neginf=-bound)
        self.clamps += 1
        self._record(affected, nonfinite, output, context)
        return fixed

    def _record(self, affected, nonfinite, output, context) -> None:
        info = context.forward
        if output.dim() == 3:
            per_row_position = affected.any(-1)  # [batch, seq]
            hits = torch.nonzero(per_row_position).tolist()
        else:
            hits = [[None, None]]
        by_row: dict[tuple[Any, Any], int] = {}
        for row, position in hits:
            stage = None
            if info is not None and position is not None:
                stage = str(info.stage_of(position))
            by_row[(row, stage)] = by_row.get((row, stage), 0) + 1
        any_nonfinite = bool(nonfinite.any())
        for (row, stage), count in by_row.items():
            context.record(Detection(
                mitigation=self.mitigation.name,
                check="nonfinite_output" if any_nonfinite else "range_clamp",
                action="clamped",
                layer=self.site.layer,
                module=self.site.name,
                stage=stage,
                step=info.index if info is not None else None,
                row=row,
                detail=f"{count} position(s) clamped to +-{self.bound:.4g}",
            ))


@register
class MixedPrecision(Mitigation):
    """Wider compute format for chosen layers and stages, plus saturating output clamps."""

    name = "mixed_precision"
    order = 20
    Config = MixedPrecisionConfig

    def _install(self, model: nn.Module, context, handle: InstallHandle) -> None:
        config = self.config
        model_dtype = _model_dtype(model)
        if model_dtype not in SUPPORTED_MODEL_DTYPES:
            raise ConfigError(
                f"mixed_precision: model dtype {model_dtype} is not supported; use a float32, "
                "bfloat16 or float16 model."
            )
        requested = COMPUTE_DTYPES[config.compute_dtype]
        if config.compute_dtype == "auto":
            requested = torch.float32 if model_dtype in (torch.bfloat16, torch.float16) else None
        if requested is not None and torch.finfo(requested).bits < torch.finfo(model_dtype).bits:
            raise ConfigError(
                f"mixed_precision.compute_dtype={config.compute_dtype!r} is narrower than the "
                f"model's {model_dtype}; a policy may only widen the format. Use 'auto' or a "
                "wider dtype."
            )
        if requested == model_dtype:
            requested = None
        self.compute_dtype = requested
        self.model_dtype = model_dtype
        sites = select_linear(model, config.roles, config.layers, config.modules, owner="mixed_precision")
        self.layers = [_Layer(site, self, model_dtype) for site in sites]
        if config.clamp != "none":
            self._set_bounds(model)
        self._bounds = {layer.site.name: layer.bound for layer in self.layers}

        if requested is not None:
            for layer in self.layers:
                module = layer.site.module
                if "forward" in module.__dict__:
                    raise ConfigError(
                        f"mixed_precision: {layer.site.name} already has an instance forward "
                        "(another wrapper); set compute_dtype='none' to keep it."
                    )
                module.forward = layer.forward
                handle.add_cleanup(lambda module=module: module.__dict__.pop("forward", None))
        if config.clamp != "none":
            for layer in self.layers:
                # No prepend: the clamp must act on the value a fault-injecting hook produced.
                handle.add_hook(layer.site.module.register_forward_hook(layer.hook))
        handle.add_cleanup(self._forget)
        logger.info(
            "mixed_precision on %d layers: compute %s, clamp %s",
            len(self.layers), requested or model_dtype, config.clamp,
        )

    def _forget(self) -> None:
        self.layers = []

    @property
    def bounds(self) -> dict[str, float | None]:
        """Module name to clamp bound, from the last install (kept after removal)."""
        return dict(getattr(self, "_bounds", {}))

    def _set_bounds(self, model: nn.Module) -> None:
        clamp = self.config.clamp
        if clamp == "format_max":
            for layer in self.layers:
                layer.bound = float(torch.finfo(layer.site.weight.dtype).max)
            return
        if clamp != "profile":
            for layer in self.layers:
                layer.bound = float(clamp)
            return
        peaks = self._profile(model)
        for layer in self.layers:
            limit = float(torch.finfo(layer.site.weight.dtype).max)
            layer.bound = min(self.config.margin * peaks[layer.site.name], limit)

    def _profile(self, model: nn.Module) -> dict[str, float]:
        """Run the calibration input once and return each layer's largest output magnitude."""
        tokens = self.config.calibration
        if tokens is None:
            vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
            if vocab < 2:
                raise ConfigError(
                    "mixed_precision: clamp='profile' needs calibration token ids because the "
                    "model config has no vocab_size; pass calibration= or use clamp='format_max'."
                )
            generator = torch.Generator().manual_seed(self.config.calibration_seed)
            tokens = torch.randint(0, vocab, self.config.calibration_shape, generator=generator)
        device = next(model.parameters()).device
        peaks = {layer.site.name: 0.0 for layer in self.layers}
        handles = []

        def record(name):
            def hook(module, args, output):
                value = float(output.detach().abs().amax())
                if value == value and value != float("inf"):
                    peaks[name] = max(peaks[name], value)
            return hook

        try:
            for layer in self.layers:
                handles.append(layer.site.module.register_forward_hook(record(layer.site.name)))
            # The guard's tracker is attached already: the profile pass counts as a redundant one.
            with torch.no_grad(), self._context.redundant():
                model(input_ids=tokens.to(device), use_cache=False)
        finally:
            for hook_handle in handles:
                hook_handle.remove()
        for name, peak in peaks.items():
            if peak == 0.0:
                raise ConfigError(
                    f"mixed_precision: calibration produced no finite output at {name}; pass "
                    "calibration token ids that reach it, or use clamp='format_max'."
                )
        return peaks
