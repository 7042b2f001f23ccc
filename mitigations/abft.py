"""ABFT: algorithm-based fault tolerance with checksums on selected linear layers.

For a linear layer ``y = x @ W.T + b`` (``W`` is ``[out, in]``) the sum of each output row
obeys ``sum_j y_j = x @ w_c + sum_j b_j`` with the column checksum ``w_c = W.sum(0)``
(``[in]``), precomputed once. A forward hook checks this identity for every output row
(one row per batch row and position). The check reads the input in float32 (float64 for
float64 models) and sums the output in float64; its own rounding error is bounded and added
to the tolerance, so the check itself cannot raise a false alarm. A row whose difference exceeds the rounding
tolerance, or that contains NaN/Inf, is a detection and is corrected by recomputing the layer.

Tolerance. The computed ``y_j`` differs from the exact value by at most
``gamma_n * (|x| @ |W_j|) + u_out * |y_j|``. Here ``gamma_n = n u / (1 - n u)``, ``n`` is the
reduction length, ``u`` the unit roundoff of the accumulation and ``u_out`` that of the
output format, because the result is rounded once on store. Summed over ``j`` this
gives ``gamma_n * (|x| @ |W|_c) + u_out * sum_j |y_j|`` with ``|W|_c = |W|.sum(0)``, a
worst-case bound, scaled by ``tolerance_scale``. ``bound="probabilistic"`` replaces
``gamma_n`` with ``sqrt(n) u``, the usual growth of independent rounding errors. That bound is
tighter, so smaller corruptions are caught, but it is not a guarantee against false alarms.

Accumulation is assumed in float32 or wider, which holds for the CPU kernels of PyTorch 2.13
(zero false alarms on SmolLM2-135M in fp32, bf16 and fp16, in this package's tests).
NOTE: GPU GEMMs may reduce fp16 in lower precision (PyTorch's
``allow_fp16_reduced_precision_reduction``); ``accumulation="format"`` assumes accumulation in
the tensor's own format for such cases.

Weights in memory. Exact int64 sums of the weights' bit patterns per row and per column
locate a corrupted element (its row and column sums differ by the same amount) and restore
it byte for byte. Selected weights are scrubbed at the start of every protected ``generate``
and whenever recomputation does not clear a mismatch.
"""

from __future__ import annotations

import logging
import math
import time
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

CORRECTIONS = ("recompute", "locate", "none")
SCRUB_MODES = ("generate", "never")
ACCUMULATIONS = ("float32", "format")
BOUNDS = ("worst_case", "probabilistic")
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NO_ROWS = torch.empty(0, dtype=torch.long)
_NO_DIFFERENCES = torch.empty(0, dtype=torch.float64)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Return ``u = eps / 2`` of a floating-point format."""
    return torch.finfo(dtype).eps / 2


@dataclass
class ABFTConfig(MitigationConfig):
    """Layer selection and mismatch handling of ABFT.

    ``roles``: role names (``o_proj``, ``down_proj``, ``q_proj``, ``lm_head``...) or
    ``"all_linear"``. ``layers``: ``"all"`` or block indices (layers outside the blocks, such as
    ``lm_head``, match only ``"all"``). ``modules``: optional globs on module names.
    ``stages``: stages whose positions are checked. ``correction="recompute"`` reruns the
    layer and takes the mismatching rows, bit-identical to a fault-free run.
    ``"locate"`` finds a single corrupted element per row with a second, index-weighted
    checksum and rebuilds it from the checksum, right to within rounding, and falls back to
    recomputation when that fails. ``"none"`` only reports. ``scrub``: when to verify the
    weights' bit checksums. ``bound``, ``tolerance_scale`` and ``accumulation`` set the
    rounding tolerance, as the module documentation describes.
    """

    roles: Any = ("o_proj", "down_proj")
    layers: Any = "all"
    modules: Any = ()
    stages: Any = "all"
    correction: str = "recompute"
    scrub: str = "generate"
    tolerance_scale: float = 2.0
    accumulation: str = "float32"
    bound: str = "worst_case"

    def __post_init__(self) -> None:
        self.roles = normalize_roles("abft.roles", self.roles)
        self.layers = normalize_layers("abft.layers", self.layers)
        if isinstance(self.modules, str):
            self.modules = (self.modules,)
        self.modules = tuple(self.modules)
        self.stages = normalize_stages("abft.stages", self.stages)
        if self.correction not in CORRECTIONS:
            raise ConfigError(unknown_choice("abft.correction", self.correction, CORRECTIONS))
        if self.scrub not in SCRUB_MODES:
            raise ConfigError(unknown_choice("abft.scrub", self.scrub, SCRUB_MODES))
        if self.accumulation not in ACCUMULATIONS:
            raise ConfigError(unknown_choice("abft.accumulation", self.accumulation, ACCUMULATIONS))
        if self.bound not in BOUNDS:
            raise ConfigError(unknown_choice("abft.bound", self.bound, BOUNDS))
        scale = self.tolerance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1.0:
            raise ConfigError(
                f"abft.tolerance_scale={scale!r} is not valid; use a number >= 1 "
                "(1 is the bare rounding bound, larger values loosen it)."
            )


class _CheckedLayer:
    """Precomputed checksums of one linear layer and its check hook."""

    def __init__(self, site: LinearSite, config: ABFTConfig, mitigation: "ABFT"):
        self.site = site
        self.config = config
        self.mitigation = mitigation
        weight = site.weight.detach()
        if not weight.is_floating_point():
            raise ConfigError(
                f"abft: {site.name} has a {weight.dtype} weight; ABFT checks floating-point "
                "layers only, so leave quantized layers out of the selection."
            )
        # Work on W as [out, in] whatever the storage layout (Conv1D stores [in, out]).
        w64 = weight.double().t() if site.transposed else weight.double()
        self.in_features = w64.shape[1]
        self.column_checksum = w64.sum(0)  # [in]
        self.abs_column_checksum = w64.abs().sum(0)  # [in]
        self.weighted_checksum = None
        if config.correction == "locate":
            index = torch.arange(1, w64.shape[0] + 1, dtype=torch.float64, device=w64.device)
            self.weighted_checksum = index @ w64  # [in]: sum_j (j+1) W_j
        bias = site.bias
        self.bias_sum = float(bias.detach().double().sum()) if bias is not None else 0.0
        self.bias_abs_sum = float(bias.detach().double().abs().sum()) if bias is not None else 0.0
        self.bias_weighted = 0.0
        if bias is not None and config.correction == "locate":
            index = torch.arange(1, bias.numel() + 1, dtype=torch.float64, device=bias.device)
            self.bias_weighted = float(index @ bias.detach().double())
        del w64

        self.weight_dtype = weight.dtype
        self.row_bits, self.column_bits = _bit_sums(weight)
        self.bias_copy = bias.detach().clone() if bias is not None else None
        self.checks = 0
        self._factors: dict[torch.dtype, tuple[float, float]] = {}
        self._vectors: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, float]] = {}

    # ----- computation check ------------------------------------------------------------

    def tolerance_factors(self, dtype: torch.dtype) -> tuple[float, float]:
        """Return ``(gamma, u_out)`` for outputs of ``dtype``, both scaled by ``tolerance_scale``."""
        factors = self._factors.get(dtype)
        if factors is None:
            u_out = unit_roundoff(dtype)
            u_acc = u_out
            if self.config.accumulation == "float32":
                u_acc = min(unit_roundoff(torch.float32), u_out)
            gamma = _gamma(self.in_features + 1, u_acc)  # + 1 for the bias addition
            if self.config.bound == "probabilistic":
                gamma = math.sqrt(self.in_features + 1) * u_acc
            scale = self.config.tolerance_scale
            factors = self._factors[dtype] = (scale * gamma, scale * u_out)
        return factors

    def _check_vectors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Return the column checksums in the check's format and that format's error factor.

        The check runs in float32 (float64 for float64 inputs): reading a float32 input needs no
        copy, and its own rounding is bounded and added to the tolerance, so no false alarm can
        come from the check itself.
        """
        vectors = self._vectors.get(dtype)
        if vectors is None:
            u = unit_roundoff(dtype)
            # Rounding the checksum to the check format (u), then the dot product (gamma).
            check_error = _gamma(self.in_features, u) + u
            vectors = self._vectors[dtype] = (
                self.column_checksum.to(dtype),
                self.abs_column_checksum.to(dtype),
                check_error,
            )
        return vectors

    def mismatching_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (indices of rows failing the check, their checksum differences)."""
        # Few ops and no float64 copy of x. On decode steps the tensors are tiny, so the cost is
        # the number of ops. On the prefill it is the passes over x [rows, in].
        # NOTE: on CPU decode steps each call still costs ~150 us of op dispatch on cold caches
        # (1.10x generate for the default selection on SmolLM2-135M); one batched check of all
        # layers per forward would cut that, at the price of re-running the step on a detection.
        check_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x2 = x.reshape(-1, x.shape[-1]).to(check_dtype)  # [rows, in]
        y2 = y.reshape(-1, y.shape[-1])  # [rows, out]
        column_checksum, abs_column_checksum, check_error = self._check_vectors(check_dtype)
        gamma, u_out = self.tolerance_factors(y.dtype)

        # sum(dtype=float64) accumulates in float64 without a float64 copy of y.
        difference = y2.sum(-1, dtype=torch.float64).sub_(x2 @ column_checksum)
        if self.bias_sum:
            difference.sub_(self.bias_sum)
        difference.abs_()

        # tolerance = gamma * (A + sum|b|) + u_out * sum_j |y_j| + the check's own rounding,
        # with A = |x| @ |W|_c inflated to an upper bound of its exact value.
        tolerance = torch.linalg.vector_norm(y2, 1, dim=-1, dtype=torch.float64).mul_(u_out)
        magnitude = x2.abs() @ abs_column_checksum
        tolerance.add_(magnitude, alpha=(gamma + check_error) * (1 + 2 * check_error))
        if self.bias_abs_sum:
            tolerance.add_(gamma * self.bias_abs_sum)
        # NaN compares false, so a non-finite row fails the check.
        passed = difference <= tolerance
        if bool(passed.all()):
            return _NO_ROWS, _NO_DIFFERENCES
        bad = ~passed
        return torch.nonzero(bad, as_tuple=False).flatten(), difference[bad]

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        context = self.mitigation._context
        if context is None or not args or not torch.is_tensor(output):
            return None
        info = context.forward
        if info is not None:
            stages = self.config.stages
            if info.index > 0 and "decode" not in stages:
                return None
            if info.index == 0 and not stages & {"prefill", "first_token"}:
                return None
        x = args[0]
        # Plain timing instead of context.timed(): this runs on every checked call.
        start = time.perf_counter()
        try:
            with torch.no_grad():
                self.checks += 1
                rows, differences = self.mismatching_rows(x, output)
                if rows.numel() == 0:
                    return None
                rows, differences = self._select_stages(rows, differences, x, info)
                if rows.numel() == 0:
                    return None
                return self._handle_mismatch(x, output, rows, differences, info)
        finally:
            context.add_time_since(start)

    def _select_stages(self, rows, differences, x, info):
        if info is None or x.dim() != 3 or len(self.config.stages) == 3:
            return rows, differences
        seq_len = x.shape[1]
        keep = torch.tensor(
            [str(info.stage_of(int(r) % seq_len)) in self.config.stages for r in rows.tolist()],
            dtype=torch.bool,
        )
        return rows[keep], differences[keep]

    def _handle_mismatch(self, x, output, rows, differences, info) -> torch.Tensor | None:
        correction = self.config.correction
        out_features = output.shape[-1]
        corrected = output.detach().clone()
        flat = corrected.view(-1, out_features)
        action = "none"
        remaining = rows
        if correction == "locate":
            remaining = self._locate_and_fix(x, flat, rows)
            action = "corrected"
        if correction != "none" and remaining.numel():
            recomputed = self._recompute(x).reshape(-1, out_features)
            flat[remaining] = recomputed[remaining]
            still_bad, _ = self.mismatching_rows(x.reshape(-1, x.shape[-1])[remaining], flat[remaining])
            action = "recomputed"
            if still_bad.numel():
                # The layer reproduces the mismatch, so its parameters changed in memory.
                restored = self.scrub(info)
                recomputed = self._recompute(x).reshape(-1, out_features)
                flat[remaining] = recomputed[remaining]
                still_bad, _ = self.mismatching_rows(
                    x.reshape(-1, x.shape[-1])[remaining], flat[remaining]
                )
                action = "restored" if restored and not still_bad.numel() else "none"
        self._record(rows, differences, x, info, action)
        return corrected if correction != "none" else None

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        # The whole layer is recomputed (not just the failing rows) so fault-free rows come out
        # bit-identical to the original product, whose blocking depends on the batch shape.
        weight = self.site.weight
        if self.site.transposed:
            # Conv1D computes addmm(bias, x, W) with W [in, out].
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ weight if self.site.bias is None else torch.addmm(self.site.bias, x2, weight)
            return out.reshape(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, self.site.bias)

    def _locate_and_fix(self, x: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Fix one corrupted element per failing row in place; return the rows that still fail.

        The corrupted column is ``(weighted difference) / (difference) - 1``. Its value is
        rebuilt as the checksum reference minus the other elements, which is right to within
        rounding but not necessarily bit-identical to a fault-free product.
        """
        x64 = x.reshape(-1, x.shape[-1])[rows].double()
        y64 = flat[rows].double()
        reference = x64 @ self.column_checksum + self.bias_sum
        weighted_reference = x64 @ self.weighted_checksum + self.bias_weighted
        index = torch.arange(1, flat.shape[-1] + 1, dtype=torch.float64, device=flat.device)
        failed = []
        for k, row in enumerate(rows.tolist()):
            values = y64[k]
            nonfinite = torch.nonzero(~torch.isfinite(values)).flatten()
            if nonfinite.numel() > 1:
                failed.append(row)
                continue
            if nonfinite.numel() == 1:
                column = int(nonfinite[0])
            else:
                delta = values.sum() - reference[k]
                weighted_delta = values @ index - weighted_reference[k]
                position = float(weighted_delta / delta) if delta != 0 else float("nan")
                if not abs(position - round(position)) <= 0.01:
                    failed.append(row)
                    continue
                column = round(position) - 1
                if not 0 <= column < flat.shape[-1]:
                    failed.append(row)
                    continue
            others = values.clone()
            others[column] = 0
            flat[row, column] = (reference[k] - others.sum()).to(flat.dtype)
        failed_rows = torch.tensor(failed, dtype=rows.dtype, device=rows.device)
        fixed = rows[~torch.isin(rows, failed_rows)]
        if fixed.numel():
            still_bad, _ = self.mismatching_rows(x.reshape(-1, x.shape[-1])[fixed], flat[fixed])
            failed_rows = torch.cat([failed_rows, fixed[still_bad]])
        return failed_rows

    def _record(self, rows, differences, x, info, action) -> None:
        context = self.mitigation._context
        seq_len = x.shape[1] if x.dim() == 3 else None
        by_row: dict[tuple[int | None, str | None], list[float]] = {}
        for flat_row, difference in zip(rows.tolist(), differences.tolist()):
            batch_row = flat_row // seq_len if seq_len else None
            stage = None
            if info is not None and seq_len:
                stage = str(info.stage_of(flat_row % seq_len))
            elif info is not None and info.index > 0:
                stage = "decode"
            by_row.setdefault((batch_row, stage), []).append(difference)
        for (batch_row, stage), diffs in by_row.items():
            nonfinite = any(d != d or d == float("inf") for d in diffs)
            context.record(
                Detection(
                    mitigation=self.mitigation.name,
                    check="nonfinite_output" if nonfinite else "output_checksum",
                    action=action,
                    layer=self.site.layer,
                    module=self.site.name,
                    stage=stage,
                    step=info.index if info is not None else None,
                    row=batch_row,
                    detail=f"{len(diffs)} position(s), max checksum difference {max(diffs):.3g}",
                )
            )

    # ----- weight memory --------------------------------------------------------------

    def scrub(self, info=None) -> bool:
        """Verify the weight and bias bits; restore what changed. Return True if anything was restored."""
        weight = self.site.weight.detach()
        rows_now = _words(weight).sum(1)
        bad_rows = torch.nonzero(rows_now != self.row_bits).flatten()
        restored = False
        if bad_rows.numel():
            restored = self._restore_weight(weight, rows_now, bad_rows, info)
        bias = self.site.bias
        if bias is not None and not torch.equal(_bits(bias.detach()), _bits(self.bias_copy)):
            changed = torch.nonzero(_bits(bias.detach()) != _bits(self.bias_copy)).flatten()
            bias.data.copy_(self.bias_copy)
            restored = True
            self._record_weight(info, "restored", f"bias element(s) {changed.tolist()[:8]} restored")
        return restored

    def _restore_weight(self, weight, rows_now, bad_rows, info) -> bool:
        words = _words(weight)
        columns_now = words.sum(0)
        bad_columns = torch.nonzero(columns_now != self.column_bits).flatten()
        # Differences wrap modulo 2**64 like the sums, so subtracting them is exact.
        row_delta = (rows_now - self.row_bits)[bad_rows]
        column_delta = (columns_now - self.column_bits)[bad_columns]
        fixes: list[tuple[int, int, torch.Tensor]] = []  # (row, word column, delta)
        if bad_rows.numel() == 1:
            fixes = [(int(bad_rows[0]), int(c), d) for c, d in zip(bad_columns, column_delta)]
        elif bad_columns.numel() == 1:
            fixes = [(int(r), int(bad_columns[0]), d) for r, d in zip(bad_rows, row_delta)]
        elif bad_rows.numel() == bad_columns.numel():
            used: set[int] = set()
            for r, d in zip(bad_rows.tolist(), row_delta):
                matches = [k for k, cd in enumerate(column_delta) if bool(cd == d) and k not in used]
                if len(matches) != 1:
                    fixes = []
                    break
                used.add(matches[0])
                fixes.append((r, int(bad_columns[matches[0]]), d))

        if not fixes:
            self._record_weight(
                info, "none",
                f"{bad_rows.numel()} row(s) and {bad_columns.numel()} column(s) of bit checksums "
                "differ and cannot be matched to single elements",
            )
            return False

        for row, column, delta in fixes:
            words[row, column] -= delta
        if not torch.equal(words.sum(1), self.row_bits) or not torch.equal(words.sum(0), self.column_bits):
            # Undo the attempted fix so the weight is left as it was found.
            for row, column, delta in fixes:
                words[row, column] += delta
            self._record_weight(info, "none", "restoring the located elements did not restore the checksums")
            return False
        if words.data_ptr() != weight.data_ptr():
            _bits(weight).copy_(words.to(_bits(weight).dtype))
        per_word = weight.shape[-1] // words.shape[1]
        where = [(r, c * per_word) for r, c, _ in fixes][:8]
        self._record_weight(
            info, "restored",
            f"{len(fixes)} corrupted word(s) of {per_word} element(s) restored, starting at {where}",
        )
        return True

    def _record_weight(self, info, action: str, detail: str) -> None:
        context = self.mitigation._context
        if context is None:
            return
        context.record(
            Detection(
                mitigation=self.mitigation.name,
                check="weight_checksum",
                action=action,
                layer=self.site.layer,
                module=self.site.name,
                stage=None,
                step=info.index if info is not None else None,
                row=None,
                detail=detail,
            )
        )


def _gamma(n: int, u: float) -> float:
    """Return the worst-case relative error bound ``n u / (1 - n u)`` of an n-term dot product."""
    return n * u / (1 - n * u)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """View a floating-point tensor as signed integers of the same width (shares storage)."""
    return tensor.view(_INT_VIEW[tensor.element_size()])


def _words(weight: torch.Tensor) -> torch.Tensor:
    """View a 2-D weight's bits as int64 words ``[rows, words]`` sharing its storage.

    Summing int64 is about 200 times faster on CPU than widening int16/int32 element bits,
    and a word sum (wrapping modulo 2**64) still changes when any bit of any element does.
    Falls back to one integer per element when a row's bytes are not a multiple of 8.
    """
    if weight.dim() == 2 and weight.is_contiguous() and (weight.shape[1] * weight.element_size()) % 8 == 0:
        return weight.view(torch.int64)
    return _bits(weight).to(torch.int64)  # a copy: _restore_weight writes it back


def _bit_sums(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    words = _words(weight)
    return words.sum(1), words.sum(0)


@register
class ABFT(Mitigation):
    """Checksum-verified linear layers, with correction and weight scrubbing."""

    name = "abft"
    order = 10
    Config = ABFTConfig

    def _install(self, model: nn.Module, context, handle: InstallHandle) -> None:
        sites = select_linear(model, self.config.roles, self.config.layers, self.config.modules, owner="abft")
        self.layers = [_CheckedLayer(site, self.config, self) for site in sites]
        for layer in self.layers:
            # No prepend: the check must see the output after any fault-injecting hook.
            handle.add_hook(layer.site.module.register_forward_hook(layer.hook))
        handle.add_cleanup(self._forget)
        logger.info("abft checks %d linear layers", len(self.layers))

    def _forget(self) -> None:
        self.layers = []

    @property
    def checked_modules(self) -> list[str]:
        return [layer.site.name for layer in getattr(self, "layers", [])]

    def scrub(self) -> int:
        """Verify every checked layer's weights; return how many layers were restored."""
        context = self._context
        restored = 0
        with torch.no_grad():
            for layer in getattr(self, "layers", []):
                restored += bool(layer.scrub(context.forward if context else None))
        return restored

    def before_generate(self, context, args: tuple, kwargs: dict) -> None:
        if self.config.scrub == "generate":
            self.scrub()
