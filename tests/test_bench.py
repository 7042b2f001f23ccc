"""The overhead and throughput benchmark on a tiny model: keys, sizes and correctness flags (no timings)."""

from __future__ import annotations

import json

import pytest

from evals import bench, cli
from guard.errors import ConfigError
from tests.campaign_fixtures import save_tiny_model_folder

REQUIRED_VARIANTS = {"abft", "dual_first_token", "dynamic_shots", "mixed_precision",
                     "all_linear_abft", "all_four", "injector_idle"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("bench") / "model")


@pytest.fixture(scope="module")
def results(tiny_folder):
    options = bench.BenchOptions(
        model=str(tiny_folder), batch_size=2, prompt_tokens=16, new_tokens=5, repeats=2,
        campaign_trials=6, campaign_batch_size=4, sequential_trials=2, prefix_prompt_tokens=24, prefix_trials=3,
    )
    return bench.run_bench(options)


def test_bench_required_keys(results):
    for key in ("campaign_vs_limit", "campaign_vs_sequential", "prefix_reuse_speedup",
                "prefix_reuse_speedup_full_length", "overhead", "sizes", "machine"):
        assert key in results
    assert set(results["overhead"]) == REQUIRED_VARIANTS
    assert all(ratio > 0 for ratio in results["overhead"].values())


def test_bench_idle_injector_adds_no_hooks(results):
    assert results["overhead_detail"]["injector_idle"]["hooks_added"] == 0


def test_bench_dual_first_token_one_extra_pass(results):
    assert results["overhead_detail"]["dual_first_token"]["extra_forward_passes"] == 1


def test_bench_abft_memory_counted(results):
    detail = results["overhead_detail"]
    assert detail["abft"]["extra_memory_bytes"] > 0
    assert detail["all_linear_abft"]["extra_memory_bytes"] > detail["abft"]["extra_memory_bytes"]


def test_held_bytes_counts_arrays_once():
    """Tensors and NumPy arrays count once each, views with their base, and kernels not at all."""
    import numpy as np
    import torch

    class Holder:
        pass

    model = torch.nn.Linear(4, 4)
    holder = Holder()
    holder.array = np.zeros((4, 8))  # 256 bytes
    holder.views = [holder.array[:, 1], holder.array[2]]
    holder.tensor = torch.zeros(16)  # 64 bytes
    holder.weight_view = model.weight[0]  # the model's own storage
    holder.kernel = len
    assert bench.held_tensor_bytes([holder], model) == 256 + 64


def test_bench_prefix_reuse_same_tokens(results):
    assert results["prefix_detail"]["tokens_equal_without_reuse"] is True
    assert results["prefix_full_length_detail"]["tokens_equal_without_reuse"] is True
    assert results["prefix_detail"]["prompt_tokens"] >= 24


def test_bench_json_serializable(results):
    assert json.loads(json.dumps(results))["sizes"]["campaign_batch_size"] == 4


def test_bench_text_lists_variants(results):
    text = bench.format_results(results)

    assert "campaign / fault-free batched rows (throughput ratio)" in text
    assert "all_linear_abft" in text


def test_bench_options_reject_small_batch():
    with pytest.raises(ConfigError, match=r"--campaign-batch-size=1 is invalid: give an integer >= 2"):
        bench.BenchOptions(campaign_batch_size=1)


def test_bench_options_reject_unknown_part():
    with pytest.raises(ConfigError, match=r"--only='overheads' is not valid.*Did you mean 'overhead'"):
        bench.BenchOptions(parts=("overheads",))


def test_bench_cli_json_directory_rejected(capsys, tiny_folder, tmp_path):
    status = cli.main(["bench", "--model", str(tiny_folder), "--json", str(tmp_path)])

    assert status != 0
    assert f"--json='{tmp_path}' is a directory" in capsys.readouterr().err


def test_bench_cli_writes_json(capsys, tiny_folder, tmp_path):
    target = tmp_path / "bench.json"

    status = cli.main([
        "bench", "--model", str(tiny_folder), "--batch-size", "2", "--prompt-tokens", "12",
        "--new-tokens", "3", "--repeats", "1", "--only", "overhead", "--json", str(target),
    ])

    assert status == 0
    data = json.loads(target.read_text())
    assert set(data["overhead"]) == REQUIRED_VARIANTS
    assert data["campaign_vs_limit"] is None
    # The first warning is about the repeats. The noise control may add a second one.
    assert data["warnings"][0] == "ratios from fewer than 3 repeats are unreliable"
    out = capsys.readouterr().out
    assert "wrote" in out
    assert "note: ratios from fewer than 3 repeats are unreliable" in out


# ----- warm-up, units and short runs ------------------------------------------------------


def test_bench_text_names_units(results):
    text = bench.format_results(results)

    assert "time ratio (median)" in text
    assert "extra memory (% of param bytes)" in text
    assert "time ratio = protected generate time / unprotected generate time" in text


def test_bench_few_repeats_warn(caplog):
    options = bench.BenchOptions(repeats=2)

    assert options.repeats == 2
    assert "ratios from fewer than 3 repeats are unreliable" in caplog.text


@pytest.mark.parametrize(
    "control, expected",
    [
        (dict(ratio=1.004, q1=0.995, q3=1.009, hooks_added=0), None),
        (dict(ratio=0.978, q1=0.972, q3=0.988, hooks_added=0), "within 0.022 of a goal"),
        (dict(ratio=1.001, q1=0.970, q3=1.030, hooks_added=0), "within 0.030 of a goal"),
        (dict(ratio=0.978, q1=0.972, q3=0.988, hooks_added=2), None),
    ],
)
def test_bench_noise_warning(control, expected):
    """The idle injector is the noise control: a warning names its spread, unless it added hooks."""
    from evals.bench import noise_warning

    warning = noise_warning({"abft": dict(ratio=1.02, q1=1.01, q3=1.03), "injector_idle": control})
    if expected is None:
        assert warning is None
    else:
        assert expected in warning


def test_bench_noise_warning_without_control():
    from evals.bench import noise_warning

    assert noise_warning({"abft": dict(ratio=1.02, q1=1.01, q3=1.03)}) is None


def test_bench_options_use_flag_names():
    with pytest.raises(ConfigError, match=r"^--new-tokens=0 is invalid: give an integer >= 1\.$"):
        bench.BenchOptions(new_tokens=0)


def test_bench_warms_up_every_variant(tiny_folder, monkeypatch):
    import guard
    from evals.models import load_model

    model, tokenizer = load_model(str(tiny_folder))
    calls = []
    protect = guard.protect

    def counting_protect(model, mitigations):
        calls.append(mitigations[0].name)
        return protect(model, mitigations=mitigations)

    monkeypatch.setattr(guard, "protect", counting_protect)
    options = bench.BenchOptions(
        model=str(tiny_folder), batch_size=2, prompt_tokens=8, new_tokens=2, repeats=1,
        variants=("abft", "dual_first_token"),
    )

    bench.measure_overhead(model, tokenizer, options)

    # One untimed warm-up call per variant before the timed repetition.
    assert sorted(calls) == ["abft", "abft", "dual_first_token", "dual_first_token"]


def test_bench_help_lists_size_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])

    text = capsys.readouterr().out
    for flag in ("--repeats", "--campaign-trials", "--new-tokens", "--batch-size", "--prompt-tokens"):
        assert flag in text
