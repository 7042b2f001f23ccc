"""PNG plots of a summary: outcome shares by stage, layer and bit, and recovery against overhead.

Rendering uses matplotlib's Agg backend through an explicit Figure, so it needs no display and
never touches pyplot's global state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evals.config import NO_MITIGATION

logger = logging.getLogger(__name__)

# Outcome colours: green for harmless, orange/red for silent corruption, blue for detections.
OUTCOME_COLOURS = {
    "masked": "#4caf50",
    "sdc_benign": "#ffb74d",
    "sdc_critical": "#e53935",
    "detected_corrected": "#1e88e5",
    "detected_uncorrected": "#5e35b1",
    "crash": "#424242",
}
DIMENSION_TITLES = {"stage": "inference stage", "layer": "layer", "bit": "bit position"}


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _sort_labels(labels: list[str]) -> list[str]:
    stage_order = {"prefill": 0, "first_token": 1, "decode": 2}

    def key(label: str) -> tuple:
        if label in stage_order:
            return (0, stage_order[label], "")
        try:
            return (1, float(label), "")
        except ValueError:
            return (2, 0.0, label)

    return sorted(labels, key=key)


def baseline_arm(summary: dict[str, Any]) -> str | None:
    """Return the arm whose vulnerability is plotted: ``none`` when present, else the first."""
    names = [arm["arm"] for arm in summary.get("arms", [])]
    if NO_MITIGATION in names:
        return NO_MITIGATION
    return names[0] if names else None


def plot_outcome_shares(summary: dict[str, Any], dimension: str, path: Path) -> Path | None:
    """Draw stacked outcome shares per value of ``dimension`` for the baseline arm."""
    arm = baseline_arm(summary)
    table = summary.get("breakdown", {}).get(arm, {}).get(dimension, {}) if arm else {}
    if not table:
        return None
    labels = _sort_labels(list(table))
    figure = _figure(max(6.0, 0.35 * len(labels) + 3.0))
    axes = figure.add_subplot(1, 1, 1)
    bottoms = [0.0] * len(labels)
    totals = [max(1, sum(table[label].values())) for label in labels]
    for outcome, colour in OUTCOME_COLOURS.items():
        shares = [table[label].get(outcome, 0) / totals[i] for i, label in enumerate(labels)]
        if not any(shares):
            continue
        axes.bar(labels, shares, bottom=bottoms, color=colour, label=outcome)
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    axes.set_ylim(0, 1)
    axes.set_ylabel("share of trials")
    axes.set_xlabel(DIMENSION_TITLES.get(dimension, dimension))
    axes.set_title(f"Outcomes by {DIMENSION_TITLES.get(dimension, dimension)} (arm: {arm})")
    if len(labels) > 8:
        axes.tick_params(axis="x", labelrotation=90)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_recovery_vs_overhead(summary: dict[str, Any], path: Path) -> Path | None:
    """Draw each arm's recovered fraction (or accuracy under faults) against its time ratio."""
    arms = summary.get("arms", [])
    if not arms:
        return None
    use_recovered = any(arm.get("recovered_fraction") for arm in arms)
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)

    for arm in arms:
        ratio = (arm["overhead"].get("time_ratio") or {}).get("median")
        x = ratio if ratio is not None else 1.0
        if use_recovered:
            estimate = arm.get("recovered_fraction") or ({"value": 0.0} if arm["arm"] == NO_MITIGATION else None)
        else:
            estimate = arm.get("accuracy_under_faults")
        if not estimate or estimate.get("value") is None:
            continue
        y = estimate["value"]
        low, high = estimate.get("low"), estimate.get("high")
        if low is not None and high is not None:
            # max(0, ...): a Wilson bound can sit a rounding error past the point estimate.
            axes.errorbar([x], [y], yerr=[[max(0.0, y - low)], [max(0.0, high - y)]], fmt="o", capsize=3)
        else:
            axes.plot([x], [y], "o")
        axes.annotate(arm["arm"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize="small")

    axes.set_xlabel("time ratio against the none arm (1.0 = no overhead)")
    axes.set_ylabel("recovered fraction of lost accuracy" if use_recovered else "accuracy under faults")
    axes.set_title("Accuracy recovered against overhead")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_plots(folder: Path, summary: dict[str, Any]) -> list[Path]:
    """Write every plot that the summary has data for; return the written paths."""
    written = []
    for dimension in ("stage", "layer", "bit"):
        path = plot_outcome_shares(summary, dimension, folder / f"outcomes_by_{dimension}.png")
        if path is not None:
            written.append(path)
    path = plot_recovery_vs_overhead(summary, folder / "recovered_vs_overhead.png")
    if path is not None:
        written.append(path)
    return written
