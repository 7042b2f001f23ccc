"""End to end: `softguard ab` on the bundled SmolLM2-135M over arithmetic, checking files and table."""

from __future__ import annotations

import csv
import json

import pytest

from evals import cli

FAULT_FLAGS = ["--role", "down_proj", "--stage", "first_token", "--bit", "exponent_msb"]


def _ab(tmp_path, arms: str, limit: int, trials: int, batch_size: int) -> list[str]:
    return [
        "ab", "--model", "smollm2-135m", "--task", "arithmetic", "--task-option", "digits=1",
        "--limit", str(limit), "--trials", str(trials), "--batch-size", str(batch_size),
        "--arms", arms, *FAULT_FLAGS, "--output-dir", str(tmp_path), "--no-progress",
    ]


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "arm":
            rows[cells[0]] = cells
    return rows


@pytest.mark.e2e
def test_ab_smollm2_small(smollm2, tmp_path, capsys):
    status = cli.main(_ab(tmp_path, "none,abft", limit=1, trials=2, batch_size=3))

    printed = capsys.readouterr().out
    assert status == 0
    rows = _table_rows(printed)
    assert set(rows) == {"none", "abft"}
    assert rows["abft"][1] == "2"
    assert {"config.json", "trials.jsonl", "summary.json", "summary.csv", "summary.md",
            "recovered_vs_overhead.png", "outcomes_by_layer.png"} <= {p.name for p in tmp_path.iterdir()}
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert sum(1 for r in records if r["kind"] == "trial") == 4
    trial = next(r for r in records if r["kind"] == "trial" and r["arm"] == "abft")
    assert trial["fault"]["module"].endswith("mlp.down_proj")
    assert trial["fault"]["bits"] == [30]


@pytest.mark.slow
@pytest.mark.e2e
def test_ab_smollm2_reference_rows_golden(smollm2, tmp_path, capsys):
    cli.main(_ab(tmp_path, "none,dual_first_token", limit=1, trials=2, batch_size=3))
    capsys.readouterr()

    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    references = {r["arm"]: r for r in records if r["kind"] == "reference"}
    # Dual first-token must not change the tokens of a fault-free row.
    assert references["dual_first_token"]["tokens"] == references["none"]["tokens"]
    assert references["dual_first_token"]["detections"] == []


@pytest.mark.slow
@pytest.mark.e2e
def test_ab_smollm2_all_arms(smollm2, tmp_path, capsys):
    status = cli.main(_ab(tmp_path, cli.DEFAULT_AB_ARMS, limit=2, trials=14, batch_size=8))

    printed = capsys.readouterr().out
    assert status == 0
    rows = _table_rows(printed)
    assert set(rows) == set(cli.DEFAULT_AB_ARMS.split(","))
    with (tmp_path / "summary.csv").open() as handle:
        arms = [row["arm"] for row in csv.DictReader(handle)]
    assert sorted(arms) == sorted(rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    none = next(arm for arm in summary["arms"] if arm["arm"] == "none")
    assert none["n"] == 14
    # Fault-free accuracy counts distinct inputs (limit=2), not trials.
    assert none["accuracy_fault_free"]["n"] == 2
