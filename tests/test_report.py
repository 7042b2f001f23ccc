"""Summaries, tables and plots rendered from synthetic trial records."""

from __future__ import annotations

import csv
import json

import pytest

from evals import report
from evals.config import CampaignConfig
from evals.store import ResultStore


def _config(tmp_path, arms=("none", "abft")) -> CampaignConfig:
    return CampaignConfig(
        model="tiny", task="arithmetic", trials=8, limit=2, batch_size=5, arms=list(arms),
        output_dir=str(tmp_path),
    )


def _records(arm: str, scores: list[float], outcomes: list[str], seconds: float, detected=()):
    """Two batches of four trials each, golden score 1.0, one reference row per batch."""
    records = []
    for unit in range(2):
        records.append({
            "kind": "reference", "arm": arm, "unit": unit, "input": unit, "input_id": str(unit),
            "tokens": [5, 6], "text": "42", "score": 1.0, "nonfinite": False, "error": None,
            "detections": [], "rows": 5, "seconds": seconds, "forward_passes": 4,
            "extra_forward_passes": 2 if arm != "none" else 0, "extra_memory_bytes": 0,
        })
    for trial, (score, outcome) in enumerate(zip(scores, outcomes)):
        records.append({
            "kind": "trial", "arm": arm, "trial": trial, "unit": trial // 4, "input": trial // 4,
            "input_id": str(trial // 4), "row": trial % 4 + 1,
            "fault": {"stage": "first_token" if trial % 2 else "prefill", "layer": trial % 3, "bits": [30]},
            "fired": [{"row": trial % 4 + 1}], "tokens": [5], "text": "4", "score": score,
            "golden_score": 1.0, "nonfinite": False, "error": None,
            "detections": [{"check": "checksum"}] if trial in detected else [], "outcome": outcome,
        })
    return records


def _ab_records():
    none = _records(
        "none", [1, 0, 0, 0, 1, 0, 1, 1],
        ["masked", "sdc_critical", "sdc_critical", "sdc_critical", "masked", "sdc_critical", "masked", "masked"],
        seconds=1.0,
    )
    abft = _records(
        "abft", [1, 1, 1, 0, 1, 1, 1, 1],
        ["masked", "detected_corrected", "detected_corrected", "sdc_critical", "masked",
         "detected_corrected", "masked", "masked"],
        seconds=1.5, detected=(1, 2, 5),
    )
    return none + abft


def test_summary_counts_outcomes(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    arms = {arm["arm"]: arm for arm in summary["arms"]}
    assert arms["none"]["outcomes"]["sdc_critical"] == 4
    assert arms["abft"]["outcomes"]["detected_corrected"] == 3
    assert arms["abft"]["n"] == 8


def test_summary_recovered_fraction(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    abft = {arm["arm"]: arm for arm in summary["arms"]}["abft"]
    # A_golden = 1.0, A_none = 4/8, A_abft = 7/8: (0.875 - 0.5) / (1 - 0.5) = 0.75.
    assert abft["recovered_fraction"]["value"] == pytest.approx(0.75)
    assert abft["recovered_fraction"]["n"] == 8


def test_summary_mcnemar_counts(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    test = {arm["arm"]: arm for arm in summary["arms"]}["abft"]["mcnemar_vs_none"]
    assert test["b_only_none_correct"] == 0
    assert test["c_only_arm_correct"] == 3
    # Exact two-sided binomial: 2 * (1/2)^3 = 0.25.
    assert test["p_value"] == pytest.approx(0.25)


def test_summary_time_ratio(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    abft = {arm["arm"]: arm for arm in summary["arms"]}["abft"]
    assert abft["overhead"]["time_ratio"]["total"] == pytest.approx(1.5)
    assert abft["overhead"]["extra_forward_passes_per_batch"] == pytest.approx(2.0)


def test_summary_detection_and_accuracy(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    abft = {arm["arm"]: arm for arm in summary["arms"]}["abft"]
    assert abft["detection_rate"]["value"] == pytest.approx(3 / 8)
    assert abft["false_alarm_rate"]["value"] == 0.0
    assert abft["accuracy_under_faults"]["value"] == pytest.approx(7 / 8)
    assert abft["accuracy_fault_free"]["value"] == 1.0
    assert abft["accuracy_under_faults"]["low"] < 7 / 8 < abft["accuracy_under_faults"]["high"]


def test_breakdown_by_stage_and_bit(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    stage = summary["breakdown"]["none"]["stage"]
    assert stage["first_token"]["sdc_critical"] == 3
    assert stage["prefill"]["sdc_critical"] == 1
    assert summary["breakdown"]["none"]["bit"]["30"]["masked"] == 4


def test_markdown_table_sorted_by_accuracy(tmp_path):
    table = report.markdown_table(report.summarize(_ab_records(), _config(tmp_path)))

    rows = [line for line in table.splitlines() if line.startswith("| ") and "arm" not in line]
    assert rows[0].startswith("| abft |")
    assert rows[1].startswith("| none |")
    assert "0.75 [" in rows[0]


def test_write_outputs_files(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    written = report.write_outputs(tmp_path, summary)

    names = {path.name for path in written}
    assert {"summary.json", "summary.csv", "summary.md"} <= names
    assert {"outcomes_by_stage.png", "outcomes_by_layer.png", "outcomes_by_bit.png", "recovered_vs_overhead.png"} <= names
    for path in written:
        assert path.stat().st_size > 0
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["arm"] for row in rows] == ["none", "abft"]
    assert json.loads((tmp_path / "summary.json").read_text())["arms"][1]["arm"] == "abft"


def test_png_files_are_images(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    report.write_outputs(tmp_path, summary)

    assert (tmp_path / "outcomes_by_stage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_folder_merges_shards(tmp_path):
    config = _config(tmp_path)
    ResultStore(tmp_path).open(config, "ab")
    records = _ab_records()
    ResultStore(tmp_path, rank=0, world_size=2).append(records[::2])
    ResultStore(tmp_path, rank=1, world_size=2).append(records[1::2])

    summary = report.render_folder(tmp_path)

    assert not list(tmp_path.glob("trials.rank*.jsonl"))
    assert summary == report.summarize(records, config)
    assert (tmp_path / "summary.md").exists()


def test_single_arm_has_no_recovery(tmp_path):
    records = [r for r in _ab_records() if r["arm"] == "abft"]

    summary = report.summarize(records, _config(tmp_path, arms=("abft",)))

    assert summary["arms"][0]["recovered_fraction"] is None
    assert summary["arms"][0]["overhead"]["time_ratio"] is None
    assert "n/a" in report.markdown_table(summary)


# ----- fault-free accuracy over inputs and folder notes -----------------------------------


def test_fault_free_accuracy_counts_inputs_not_trials(tmp_path):
    records = _records("none", [1.0] * 8, ["masked"] * 8, 1.0)
    for record in records:
        if record["kind"] == "trial" and record["input"] == 1:
            record["golden_score"] = 0.0

    arm = report.summarize(records, _config(tmp_path, arms=("none",)))["arms"][0]

    assert arm["accuracy_fault_free"]["n"] == 2
    assert arm["accuracy_fault_free"]["value"] == pytest.approx(0.5)
    assert arm["accuracy_under_faults"]["n"] == 8


def test_fault_free_column_says_per_input(tmp_path):
    summary = report.summarize(_ab_records(), _config(tmp_path))

    assert "fault-free acc (per input)" in report.markdown_table(summary)
    assert "over distinct inputs (n = inputs)" in report.markdown_report(summary)


def test_render_missing_folder(tmp_path):
    from guard.errors import NotFoundError

    with pytest.raises(NotFoundError, match=r"^folder '.*nowhere' does not exist\.$"):
        report.render_folder_with_counts(tmp_path / "nowhere")


def test_render_counts_zero_and_partial(tmp_path):
    config = _config(tmp_path)
    store = ResultStore(tmp_path)
    store.open(config, "ab")

    assert report.render_folder_with_counts(tmp_path) == (None, 0, 16)

    store.append([r for r in _ab_records() if r["arm"] == "none"])
    summary, recorded, planned = report.render_folder_with_counts(tmp_path)

    assert summary is not None
    assert (recorded, planned) == (8, 16)
