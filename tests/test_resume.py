"""Resume: a campaign process killed at a random point and rerun ends with the uninterrupted result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.campaign_fixtures import records_without_timing, save_tiny_model_folder, summary_without_timing

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("resume") / "model")


def _command(tiny_folder, output_dir):
    return [
        sys.executable, "-m", "evals.cli", "ab", "--model", str(tiny_folder), "--trials", "24",
        "--limit", "4", "--batch-size", "3", "--max-new-tokens", "8", "--arms", "none,abft",
        "--task-option", "n=4", "--output-dir", str(output_dir), "--no-progress",
    ]


def _run(command) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def _kill_after_lines(command, output_dir: Path, lines: int) -> int:
    """Start the run and SIGKILL it once ``trials.jsonl`` has at least ``lines`` lines."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = output_dir / "trials.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if trials.exists() and trials.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    return process.returncode


@pytest.fixture(scope="module")
def reference_dir(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "uninterrupted"
    completed = _run(_command(tiny_folder, folder))
    assert completed.returncode == 0, completed.stderr
    return folder


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_campaign_resumes_to_same_result(tiny_folder, reference_dir, tmp_path, seed):
    resumed_dir = tmp_path / "resumed"
    # A kill point counted in written records, not seconds, so a busy machine cannot let the
    # run finish first: each batch flushes a few records and the full run writes dozens.
    kill_at = random.Random(seed).randint(1, 6)

    status = _kill_after_lines(_command(tiny_folder, resumed_dir), resumed_dir, kill_at)
    partial = len((resumed_dir / "trials.jsonl").read_text().splitlines())
    rerun = _run(_command(tiny_folder, resumed_dir))

    assert status == -signal.SIGKILL, f"the run finished before the kill (after {kill_at} lines)"
    assert rerun.returncode == 0, rerun.stderr
    assert partial < len(records_without_timing(reference_dir))
    assert records_without_timing(resumed_dir) == records_without_timing(reference_dir)
    assert summary_without_timing(resumed_dir) == summary_without_timing(reference_dir)


def test_corrupt_line_resume_counts_add_up(tiny_folder, reference_dir, tmp_path):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "config.json").write_text((reference_dir / "config.json").read_text())
    lines = (reference_dir / "trials.jsonl").read_text().splitlines(keepends=True)
    middle = next(i for i, line in enumerate(lines) if i > len(lines) // 2 and '"kind": "trial"' in line)
    lines[middle] = "{not json\n"
    (folder / "trials.jsonl").write_text("".join(lines))

    rerun = _run(_command(tiny_folder, folder))

    assert rerun.returncode == 0, rerun.stderr
    last = rerun.stdout.strip().splitlines()[-1]
    # 24 trials in each of the two arms: one re-run, the rest already recorded.
    assert last.startswith("1 trials run, 47 already recorded;"), last
    assert records_without_timing(folder) == records_without_timing(reference_dir)
