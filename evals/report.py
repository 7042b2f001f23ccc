"""Summaries and plots of a result folder, computed only from its trial records.

``summarize`` turns the records of ``trials.jsonl`` into per-arm statistics, each with its 95%
confidence interval and n. They are the outcome shares, fault-free accuracy (over distinct
inputs, not trials), accuracy under
faults, recovered fraction against the ``none`` arm, detection rate, false alarms on
fault-free rows, overhead and McNemar's paired test. ``write_outputs`` writes summary.json, summary.csv,
summary.md and the PNG plots. Because the summary depends on the records alone, a resumed or
sharded run gives the same summary as an uninterrupted one (timings aside).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from evals import stats
from evals.config import NO_MITIGATION, CampaignConfig
from evals.outcomes import Outcome

logger = logging.getLogger(__name__)

OUTCOMES = tuple(outcome.value for outcome in Outcome)
CONFIDENCE = 0.95
# A trial counts as correct for McNemar's test when its score reaches this value
# (scores are 0/1 for exact match and pass@1; partial-credit scores are thresholded).
CORRECT_AT = 0.5
BOOTSTRAP_RESAMPLES = 1000


# ----- statistics -------------------------------------------------------------------------


def _estimate(value: float, low: float, high: float, n: int) -> dict[str, Any]:
    return {"value": _finite(value), "low": _finite(low), "high": _finite(high), "n": n}


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def proportion(successes: int, n: int) -> dict[str, Any]:
    """Return a share with its Wilson interval (value None when n is 0)."""
    low, high = stats.wilson_interval(successes, n, CONFIDENCE)
    return _estimate(successes / n if n else math.nan, low, high, n)


def mean_estimate(values: list[float]) -> dict[str, Any]:
    """Return a mean with its interval: Wilson for 0/1 scores, Student's t otherwise."""
    if values and all(value in (0.0, 1.0) for value in values):
        return proportion(int(sum(values)), len(values))
    estimate = stats.mean_ci(values, CONFIDENCE)
    return _estimate(estimate.value, estimate.low, estimate.high, estimate.n)


def _bit_of(fault: dict) -> Any:
    for key in ("bit", "bits", "bit_index", "bit_indices"):
        if key in fault and fault[key] is not None:
            value = fault[key]
            if isinstance(value, (list, tuple)):
                return value[0] if len(value) == 1 else "+".join(str(v) for v in value)
            return value
    return None


def fault_dimensions(fault: dict) -> dict[str, Any]:
    """Return the stage, layer and bit position of a resolved fault record (None where absent)."""
    return {"stage": fault.get("stage"), "layer": fault.get("layer"), "bit": _bit_of(fault)}


def _trials_by_arm(records: Iterable[dict]) -> tuple[dict[str, dict[int, dict]], dict[str, dict[int, dict]]]:
    trials: dict[str, dict[int, dict]] = defaultdict(dict)
    references: dict[str, dict[int, dict]] = defaultdict(dict)
    for record in records:
        if record.get("kind") == "reference":
            references[record["arm"]][int(record["unit"])] = record
        else:
            trials[record["arm"]][int(record["trial"])] = record
    return trials, references


def summarize(records: list[dict[str, Any]], config: CampaignConfig) -> dict[str, Any]:
    """Return the summary of a result folder's records (see the module docstring)."""
    trials, references = _trials_by_arm(records)
    arms = [arm for arm in config.arms if arm in trials or arm in references]
    arms += sorted(set(trials) - set(arms))
    baseline = trials.get(NO_MITIGATION)
    baseline_refs = references.get(NO_MITIGATION)

    per_arm = []
    for arm in arms:
        per_arm.append(_summarize_arm(arm, trials.get(arm, {}), references.get(arm, {}), baseline, baseline_refs))
    breakdown = {arm: _breakdown(trials.get(arm, {})) for arm in arms}
    return {
        "model": config.model,
        "task": config.task,
        "fault": config.fault,
        "seed": config.seed,
        "trials_planned": config.trials,
        "inputs": config.limit,
        "batch_size": config.batch_size,
        "fingerprint": config.fingerprint(),
        "confidence": CONFIDENCE,
        "arms": per_arm,
        "breakdown": breakdown,
    }


def _summarize_arm(
    arm: str,
    trials: dict[int, dict],
    references: dict[int, dict],
    baseline: dict[int, dict] | None,
    baseline_refs: dict[int, dict] | None,
) -> dict[str, Any]:
    ordered = [trials[key] for key in sorted(trials)]
    n = len(ordered)
    counts = {name: 0 for name in OUTCOMES}
    for record in ordered:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    detected = sum(1 for record in ordered if record.get("detections"))
    fired = sum(1 for record in ordered if record.get("fired"))
    failures = sum(1 for record in ordered if Outcome(record["outcome"]).is_failure)
    false_alarms = sum(1 for record in references.values() if record.get("detections"))

    summary: dict[str, Any] = {
        "arm": arm,
        "n": n,
        "outcomes": counts,
        "shares": {name: proportion(count, n) for name, count in counts.items()},
        "accuracy_fault_free": mean_estimate(_golden_scores_by_input(ordered)),
        "accuracy_under_faults": mean_estimate([float(record["score"]) for record in ordered]),
        "failure_rate": proportion(failures, n),
        "fired_rate": proportion(fired, n),
        "detection_rate": proportion(detected, n),
        "false_alarm_rate": proportion(false_alarms, len(references)),
        "recovered_fraction": None,
        "mcnemar_vs_none": None,
        "overhead": _overhead(references, baseline_refs),
    }
    if baseline is not None and arm != NO_MITIGATION:
        shared = sorted(set(trials) & set(baseline))
        if shared:
            golden = [float(baseline[key]["golden_score"]) for key in shared]
            none = [float(baseline[key]["score"]) for key in shared]
            mine = [float(trials[key]["score"]) for key in shared]
            estimate = stats.recovered_fraction(golden, none, mine, n_resamples=BOOTSTRAP_RESAMPLES, seed=0)
            summary["recovered_fraction"] = _estimate(estimate.value, estimate.low, estimate.high, estimate.n)
            only_none = sum(1 for a, b in zip(none, mine) if a >= CORRECT_AT > b)
            only_arm = sum(1 for a, b in zip(none, mine) if b >= CORRECT_AT > a)
            test = stats.mcnemar(only_none, only_arm)
            summary["mcnemar_vs_none"] = {
                "b_only_none_correct": test.b,
                "c_only_arm_correct": test.c,
                "statistic": test.statistic,
                "p_value": test.p_value,
                "method": test.method,
                "n": len(shared),
            }
    return summary


def _golden_scores_by_input(trials: list[dict]) -> list[float]:
    """Return one fault-free score per distinct input (the mean over its trials).

    Trials of the same input share one golden run, so counting each trial would treat copies
    of one measurement as independent and make the interval too narrow.
    """
    by_input: dict[str, list[float]] = defaultdict(list)
    for record in trials:
        key = record.get("input", record.get("input_id", record.get("unit")))
        by_input[str(key)].append(float(record["golden_score"]))
    return [sum(scores) / len(scores) for _, scores in sorted(by_input.items())]


def _overhead(references: dict[int, dict], baseline_refs: dict[int, dict] | None) -> dict[str, Any]:
    batches = len(references)
    extra_passes = [int(record.get("extra_forward_passes", 0)) for record in references.values()]
    overhead: dict[str, Any] = {
        "batches": batches,
        "extra_forward_passes_per_batch": (sum(extra_passes) / batches) if batches else None,
        "extra_memory_bytes": max([int(r.get("extra_memory_bytes", 0)) for r in references.values()] or [0]),
        "time_ratio": None,
    }
    if baseline_refs:
        pairs = [
            (float(references[unit]["seconds"]), float(baseline_refs[unit]["seconds"]))
            for unit in sorted(set(references) & set(baseline_refs))
            if float(baseline_refs[unit]["seconds"]) > 0
        ]
        if pairs:
            spread = stats.ratio_spread(pairs)
            total = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
            overhead["time_ratio"] = {
                "total": total,
                "median": spread.median,
                "q1": spread.q1,
                "q3": spread.q3,
                "n": spread.n,
            }
    return overhead


def _breakdown(trials: dict[int, dict]) -> dict[str, dict[str, dict[str, int]]]:
    """Count outcomes per stage, per layer and per bit position."""
    table: dict[str, dict[str, dict[str, int]]] = {"stage": {}, "layer": {}, "bit": {}}
    for key in sorted(trials):
        record = trials[key]
        dimensions = fault_dimensions(record.get("fault") or {})
        for dimension, value in dimensions.items():
            label = "n/a" if value is None else str(value)
            bucket = table[dimension].setdefault(label, {name: 0 for name in OUTCOMES})
            bucket[record["outcome"]] += 1
    return table


# ----- rendering --------------------------------------------------------------------------


def _percent(estimate: dict | None) -> str:
    if not estimate or estimate.get("value") is None:
        return "n/a"
    low, high = estimate.get("low"), estimate.get("high")
    if low is None or high is None:
        return f"{100 * estimate['value']:.1f}%"
    return f"{100 * estimate['value']:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def _fraction(estimate: dict | None) -> str:
    if not estimate or estimate.get("value") is None:
        return "n/a"
    low, high = estimate.get("low"), estimate.get("high")
    if low is None or high is None:
        return f"{estimate['value']:.2f}"
    return f"{estimate['value']:.2f} [{low:.2f}, {high:.2f}]"


def _time_ratio(overhead: dict) -> str:
    ratio = overhead.get("time_ratio")
    if not ratio:
        return "n/a"
    return f"{ratio['median']:.2f}x (IQR {ratio['q1']:.2f}-{ratio['q3']:.2f})"


def _mebibytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    return f"{count / 2**20:.2f} MiB"


def sorted_arms(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the arms from best to worst accuracy under faults, then cheapest first."""

    def key(arm: dict) -> tuple:
        accuracy = arm["accuracy_under_faults"]["value"]
        ratio = (arm["overhead"].get("time_ratio") or {}).get("median") or 1.0
        return (-(accuracy if accuracy is not None else -1.0), ratio, arm["arm"])

    return sorted(summary["arms"], key=key)


MARKDOWN_COLUMNS = (
    "arm",
    "n",
    "fault-free acc (per input)",
    "acc under faults",
    "recovered",
    "detected",
    "false alarms",
    "SDC critical",
    "time ratio",
    "extra passes/batch",
    "extra memory",
    "McNemar p",
)


def markdown_table(summary: dict[str, Any]) -> str:
    """Return the per-arm Markdown table, sorted by accuracy under faults (95% CIs in brackets)."""
    lines = ["| " + " | ".join(MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for arm in sorted_arms(summary):
        overhead = arm["overhead"]
        passes = overhead.get("extra_forward_passes_per_batch")
        test = arm.get("mcnemar_vs_none")
        cells = [
            arm["arm"],
            str(arm["n"]),
            _percent(arm["accuracy_fault_free"]),
            _percent(arm["accuracy_under_faults"]),
            _fraction(arm["recovered_fraction"]),
            _percent(arm["detection_rate"]),
            _percent(arm["false_alarm_rate"]),
            _percent(arm["shares"]["sdc_critical"]),
            _time_ratio(overhead),
            "n/a" if passes is None else f"{passes:.1f}",
            _mebibytes(overhead.get("extra_memory_bytes")),
            "n/a" if not test else f"{test['p_value']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(summary: dict[str, Any]) -> str:
    """Return summary.md: a header naming the run, the arm table and the outcome counts."""
    header = (
        f"# softguard results: {summary['model']} on {summary['task']}\n\n"
        f"Fault: `{json.dumps(summary['fault'], sort_keys=True)}`, seed {summary['seed']}, "
        f"{summary['trials_planned']} trials over {summary['inputs']} inputs, batch size "
        f"{summary['batch_size']}. Intervals are {int(100 * summary['confidence'])}% "
        "(Wilson for shares, paired bootstrap for the recovered fraction). Fault-free accuracy and "
        "its interval are over distinct inputs (n = inputs), since trials of one input share its "
        "fault-free run; the other columns are over trials. The time ratio is "
        "against the `none` arm on the same batches (median of per-batch ratios, with the interquartile range).\n\n"
    )
    outcome_lines = ["| arm | " + " | ".join(OUTCOMES) + " |", "|" + "---|" * (len(OUTCOMES) + 1)]
    for arm in summary["arms"]:
        outcome_lines.append(
            f"| {arm['arm']} | " + " | ".join(str(arm["outcomes"].get(name, 0)) for name in OUTCOMES) + " |"
        )
    return header + markdown_table(summary) + "\n## Outcomes\n\n" + "\n".join(outcome_lines) + "\n"


CSV_FIELDS = (
    "arm",
    "n",
    *OUTCOMES,
    "accuracy_fault_free",
    "accuracy_fault_free_low",
    "accuracy_fault_free_high",
    "accuracy_under_faults",
    "accuracy_under_faults_low",
    "accuracy_under_faults_high",
    "recovered_fraction",
    "recovered_fraction_low",
    "recovered_fraction_high",
    "detection_rate",
    "false_alarm_rate",
    "time_ratio",
    "extra_forward_passes_per_batch",
    "extra_memory_bytes",
    "mcnemar_p_value",
)


def csv_text(summary: dict[str, Any]) -> str:
    """Return summary.csv: one row per arm with the main numbers and interval bounds."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for arm in summary["arms"]:
        row: dict[str, Any] = {"arm": arm["arm"], "n": arm["n"], **arm["outcomes"]}
        for name in ("accuracy_fault_free", "accuracy_under_faults", "recovered_fraction"):
            estimate = arm.get(name) or {}
            row[name] = estimate.get("value")
            row[f"{name}_low"] = estimate.get("low")
            row[f"{name}_high"] = estimate.get("high")
        row["detection_rate"] = arm["detection_rate"]["value"]
        row["false_alarm_rate"] = arm["false_alarm_rate"]["value"]
        ratio = arm["overhead"].get("time_ratio")
        row["time_ratio"] = ratio["median"] if ratio else None
        row["extra_forward_passes_per_batch"] = arm["overhead"].get("extra_forward_passes_per_batch")
        row["extra_memory_bytes"] = arm["overhead"].get("extra_memory_bytes")
        test = arm.get("mcnemar_vs_none")
        row["mcnemar_p_value"] = test["p_value"] if test else None
        writer.writerow(row)
    return buffer.getvalue()


def write_outputs(folder: str | Path, summary: dict[str, Any], records: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write summary.json, summary.csv, summary.md and the plots into ``folder``; return the paths."""
    folder = Path(folder)
    written = []
    for name, text in (
        ("summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"),
        ("summary.csv", csv_text(summary)),
        ("summary.md", markdown_report(summary)),
    ):
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    from evals import plots

    written.extend(plots.write_plots(folder, summary))
    return written


def load_summary_inputs(folder: str | Path) -> tuple[CampaignConfig, list[dict[str, Any]]]:
    """Return the config and merged records of a result folder (shards are merged first)."""
    from evals.store import ResultStore

    store = ResultStore(folder)
    stored = store.read_config()
    config = CampaignConfig.from_dict(stored["config"], source=str(store.config_path))
    records = store.merge(order=config.arms)
    return config, records


def render_folder(folder: str | Path) -> dict[str, Any]:
    """Merge shards, recompute the summary and rewrite every output file of ``folder``."""
    config, records = load_summary_inputs(_existing_folder(folder))
    summary = summarize(records, config)
    write_outputs(folder, summary, records)
    return summary


def _existing_folder(folder: str | Path) -> Path:
    from guard.errors import NotFoundError

    path = Path(folder)
    if not path.is_dir():
        raise NotFoundError(f"folder {str(folder)!r} does not exist.")
    return path


def render_folder_with_counts(folder: str | Path) -> tuple[dict[str, Any] | None, int, int]:
    """Like :func:`render_folder`, and also return the recorded and planned trial counts.

    The counts are over all arms (trials times arms are planned). A folder without any trial
    record is left as it is and gives ``(None, 0, planned)``. A missing folder raises
    NotFoundError.
    """
    path = _existing_folder(folder)
    config, records = load_summary_inputs(path)
    planned = config.trials * len(config.arms)
    recorded = sum(1 for record in records if record.get("kind") != "reference")
    if recorded == 0:
        return None, 0, planned
    summary = summarize(records, config)
    write_outputs(path, summary, records)
    return summary, recorded, planned
