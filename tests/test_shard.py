"""Sharding: two processes under torchrun write the same trials and summary as one process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.campaign_fixtures import records_without_timing, save_tiny_model_folder, summary_without_timing

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("shard") / "model")


def _arguments(tiny_folder, output_dir):
    return [
        "-m", "evals.cli", "ab", "--model", str(tiny_folder), "--trials", "14", "--limit", "3",
        "--batch-size", "4", "--max-new-tokens", "6", "--arms", "none,dual_first_token",
        "--task-option", "n=3", "--output-dir", str(output_dir), "--no-progress",
    ]


def test_two_processes_match_one(tiny_folder, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    single, split = tmp_path / "single", tmp_path / "split"
    one = subprocess.run([sys.executable, *_arguments(tiny_folder, single)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", *_arguments(tiny_folder, split)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )

    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert not list(split.glob("trials.rank*.jsonl"))
    assert records_without_timing(split) == records_without_timing(single)
    assert summary_without_timing(split) == summary_without_timing(single)


def test_report_merges_leftover_shards(tiny_folder, tmp_path):
    folder = tmp_path / "run"
    completed = subprocess.run([sys.executable, *_arguments(tiny_folder, folder)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    expected = records_without_timing(folder)
    # Split the merged file into two shards, as an interrupted two-process run leaves them.
    lines = (folder / "trials.jsonl").read_text().splitlines(keepends=True)
    (folder / "trials.rank0.jsonl").write_text("".join(lines[::2]))
    (folder / "trials.rank1.jsonl").write_text("".join(lines[1::2]))
    (folder / "trials.jsonl").unlink()

    report = subprocess.run([sys.executable, "-m", "evals.cli", "report", str(folder)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)

    assert report.returncode == 0, report.stderr
    assert not list(folder.glob("trials.rank*.jsonl"))
    assert records_without_timing(folder) == expected
