"""Campaign planning, batched trial rows, result records, resume bookkeeping and config checks."""

from __future__ import annotations

import json

import pytest

from evals.campaign import FaultPlanner, derive_seed, plan_units, run_batch, run_campaign, shard_units
from evals.config import CampaignConfig, parse_arm
from evals.store import ResultStore
from guard.errors import ConfigError, NotFoundError
from tests.campaign_fixtures import save_tiny_model_folder
from tests.tiny_models import make_prompt, make_tiny_model

FIRST_TOKEN_FAULT = {
    "site": {"role": "down_proj"},
    "time": {"stage": "first_token"},
    "corruption": {"field": "exponent_msb"},
}


class _IdTokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    from evals.models import load_model

    return load_model(str(tiny_folder))


def _arithmetic():
    from evals.tasks.arithmetic import ArithmeticTask

    return ArithmeticTask(n=6)


def _config(tiny_folder, output_dir, **overrides) -> CampaignConfig:
    settings = dict(
        model=str(tiny_folder), trials=10, limit=3, batch_size=4, arms=["none"], fault=FIRST_TOKEN_FAULT,
        max_new_tokens=6, output_dir=str(output_dir), progress=False,
    )
    settings.update(overrides)
    return CampaignConfig(**settings)


def _run(config, loaded):
    model, tokenizer = loaded
    return run_campaign(config, model=model, tokenizer=tokenizer, task=_arithmetic())


def _comparable(summary: dict) -> dict:
    """Drop the timing fields, which differ between any two runs."""
    summary = json.loads(json.dumps(summary))
    for arm in summary["arms"]:
        arm["overhead"].pop("time_ratio", None)
    return summary


# ----- planning ---------------------------------------------------------------------------


def test_plan_units_round_robin():
    units = plan_units(n_inputs=3, trials=10, trials_per_batch=2)

    assert [unit.trial_ids for unit in units if unit.input_index == 0] == [(0, 3), (6, 9)]
    assert [unit.trial_ids for unit in units if unit.input_index == 2] == [(2, 5), (8,)]
    assert sorted(t for unit in units for t in unit.trial_ids) == list(range(10))


def test_plan_units_more_inputs_than_trials():
    units = plan_units(n_inputs=5, trials=2, trials_per_batch=4)

    assert [(unit.input_index, unit.trial_ids) for unit in units] == [(0, (0,)), (1, (1,))]


def test_plan_units_no_inputs_rejected():
    with pytest.raises(ConfigError, match="no inputs"):
        plan_units(n_inputs=0, trials=3, trials_per_batch=2)


def test_shard_units_cover_all_once():
    units = plan_units(n_inputs=3, trials=20, trials_per_batch=3)

    shards = [shard_units(units, rank, 2) for rank in range(2)]

    assert sorted(u.index for shard in shards for u in shard) == [u.index for u in units]
    assert not {u.index for u in shards[0]} & {u.index for u in shards[1]}


def test_derive_seed_stable_and_distinct():
    assert derive_seed(0, "fault", 1) == derive_seed(0, "fault", 1)
    assert derive_seed(0, "fault", 1) != derive_seed(0, "fault", 2)
    assert derive_seed(0, "fault", 1) != derive_seed(1, "fault", 1)


# ----- batched rows -----------------------------------------------------------------------


def test_batched_rows_equal_single_rows():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=8, seed=1)
    planner = FaultPlanner(model, FIRST_TOKEN_FAULT, seed=0, max_new_tokens=6)
    batch_faults = [None] + [planner.for_row(trial, 8, row) for row, trial in enumerate(range(4), start=1)]

    batched = run_batch(model, _IdTokenizer(), prompt, batch_faults, 6)

    for row, trial in enumerate(range(4), start=1):
        single = run_batch(model, _IdTokenizer(), prompt, [None, planner.for_row(trial, 8, 1)], 6)
        assert single.rows[1].tokens == batched.rows[row].tokens
        assert single.rows[0].tokens == batched.rows[0].tokens


def test_reference_row_unaffected_by_faults():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=8, seed=1)
    planner = FaultPlanner(model, FIRST_TOKEN_FAULT, seed=0, max_new_tokens=6)

    clean = run_batch(model, _IdTokenizer(), prompt, [None], 6)
    faulty = run_batch(model, _IdTokenizer(), prompt, [None, planner.for_row(0, 8, 1)], 6)

    assert faulty.rows[0].tokens == clean.rows[0].tokens
    assert faulty.rows[1].fired
    assert not faulty.rows[0].fired


def test_nonfinite_logits_flag_row():
    model = make_tiny_model("llama")
    prompt = make_prompt(length=8, seed=1)
    nan_fault = {"site": {"role": "lm_head"}, "time": {"stage": "first_token"}, "corruption": {"mode": "set", "value": "nan"}}
    planner = FaultPlanner(model, nan_fault, seed=0, max_new_tokens=4)

    batch = run_batch(model, _IdTokenizer(), prompt, [None, planner.for_row(0, 8, 1)], 4)

    assert batch.rows[1].nonfinite
    assert not batch.rows[0].nonfinite


def test_faults_independent_of_batch_size(tiny_folder, loaded, tmp_path):
    small = _run(_config(tiny_folder, tmp_path / "b3", batch_size=3), loaded)
    large = _run(_config(tiny_folder, tmp_path / "b6", batch_size=6), loaded)

    def faults(result):
        return {r["trial"]: {k: v for k, v in r["fault"].items() if k != "row"} for r in result.records if r["kind"] == "trial"}

    assert faults(small) == faults(large)


# ----- campaign records -------------------------------------------------------------------


def test_campaign_writes_every_trial_once(tiny_folder, loaded, tmp_path):
    result = _run(_config(tiny_folder, tmp_path), loaded)

    trials = [r for r in result.records if r["kind"] == "trial"]
    assert sorted(r["trial"] for r in trials) == list(range(10))
    assert result.trials_run == 10
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(lines) == len(result.records)


def test_campaign_record_fields(tiny_folder, loaded, tmp_path):
    result = _run(_config(tiny_folder, tmp_path), loaded)

    trial = next(r for r in result.records if r["kind"] == "trial")
    assert trial["fault"]["stage"] == "first_token"
    assert trial["fault"]["row"] == trial["row"]
    assert trial["fired"][0]["value_before"] != trial["fired"][0]["value_after"]
    assert trial["outcome"] in {"masked", "sdc_benign", "sdc_critical", "crash"}
    assert isinstance(trial["tokens"], list)


def test_campaign_output_files(tiny_folder, loaded, tmp_path):
    _run(_config(tiny_folder, tmp_path), loaded)

    names = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "trials.jsonl", "summary.json", "summary.csv", "summary.md"} <= names
    assert "outcomes_by_layer.png" in names
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["config"]["seed"] == 0
    assert stored["provenance"]["versions"]["torch"]
    # numba compiles the ABFT check, so its version belongs to a result's provenance.
    assert stored["provenance"]["versions"]["numba"]
    assert "commit" in stored["provenance"]["git"]


def test_campaign_rerun_skips_done(tiny_folder, loaded, tmp_path):
    config = _config(tiny_folder, tmp_path)
    first = _run(config, loaded)

    second = _run(config, loaded)

    assert second.trials_run == 0
    assert second.trials_skipped == 10
    assert _comparable(second.summary) == _comparable(first.summary)


def test_campaign_resume_after_torn_write(tiny_folder, loaded, tmp_path):
    config = _config(tiny_folder, tmp_path / "a")
    full = _run(config, loaded)
    interrupted = _config(tiny_folder, tmp_path / "b")
    ResultStore(tmp_path / "b").open(interrupted, "campaign")
    lines = (tmp_path / "a" / "trials.jsonl").read_text().splitlines(keepends=True)
    # A killed writer leaves some complete batches and half a line.
    (tmp_path / "b" / "trials.jsonl").write_text("".join(lines[:6]) + lines[6][: len(lines[6]) // 2])

    resumed = _run(interrupted, loaded)

    assert resumed.trials_run == 10 - sum(1 for line in lines[:6] if '"kind": "trial"' in line)
    assert _comparable(resumed.summary) == _comparable(full.summary)
    assert len((tmp_path / "b" / "trials.jsonl").read_text().splitlines()) == len(lines)


def test_campaign_other_config_rejected(tiny_folder, loaded, tmp_path):
    _run(_config(tiny_folder, tmp_path), loaded)

    with pytest.raises(ConfigError, match=r"different config \(seed: 0 in the folder, 1 now\)"):
        _run(_config(tiny_folder, tmp_path, seed=1), loaded)


def test_campaign_progress_setting_not_fingerprinted(tiny_folder, loaded, tmp_path):
    _run(_config(tiny_folder, tmp_path), loaded)

    result = _run(_config(tiny_folder, tmp_path, progress=True), loaded)

    assert result.trials_run == 0


def test_weight_faults_run_alone(tiny_folder, loaded, tmp_path):
    fault = {"site": {"kind": "weight", "role": "down_proj"}, "time": {"stage": "first_token"},
             "corruption": {"field": "exponent_msb"}}
    result = _run(_config(tiny_folder, tmp_path, fault=fault, trials=3), loaded)

    references = [r for r in result.records if r["kind"] == "reference"]
    assert len(references) == 3
    assert all(r["rows"] == 2 for r in references)
    assert all(r["fault"]["row"] is None for r in result.records if r["kind"] == "trial")


def test_unknown_mitigation_rejected(tiny_folder, loaded, tmp_path):
    with pytest.raises(NotFoundError, match=r"Unknown mitigation 'abtf'.*Did you mean 'abft'"):
        _run(_config(tiny_folder, tmp_path, arms=["abtf"]), loaded)


# ----- config -----------------------------------------------------------------------------


def test_config_batch_size_too_small():
    with pytest.raises(ConfigError, match=r"batch_size=1 is too small. Use an integer >= 2"):
        CampaignConfig(batch_size=1)


def test_config_trials_not_integer():
    with pytest.raises(ConfigError, match=r"trials='many' must be an integer"):
        CampaignConfig(trials="many")


def test_config_unknown_dtype():
    with pytest.raises(ConfigError, match=r"dtype='fp8' is not valid"):
        CampaignConfig(dtype="fp8")


def test_config_duplicate_arm():
    with pytest.raises(ConfigError, match="lists an arm twice"):
        CampaignConfig(arms=["abft", "none", "abft"])


def test_config_unknown_setting():
    with pytest.raises(ConfigError, match=r"setting='trails' is not valid.*Did you mean 'trials'"):
        CampaignConfig.from_dict({"trails": 3})


def test_config_empty_fault():
    with pytest.raises(ConfigError, match=r"fault=\{\} is empty"):
        CampaignConfig(fault={})


def test_config_weight_faults_one_per_batch():
    config = CampaignConfig(fault={"site": {"kind": "weight", "role": "q_proj"}}, batch_size=8)

    assert config.trials_per_batch == 1


def test_parse_arm_all_and_combos():
    assert parse_arm("none") == ()
    assert parse_arm("abft+dual_first_token") == ("abft", "dual_first_token")
    assert len(parse_arm("all")) == 4


def test_parse_arm_repeated_name():
    with pytest.raises(ConfigError, match="names a mitigation twice"):
        parse_arm("abft+abft")


def test_fingerprint_ignores_output_dir():
    assert CampaignConfig(output_dir="a").fingerprint() == CampaignConfig(output_dir="b").fingerprint()
    assert CampaignConfig(seed=1).fingerprint() != CampaignConfig(seed=2).fingerprint()


def test_plan_units_even_batches():
    units = plan_units(n_inputs=1, trials=32, trials_per_batch=31)

    assert [len(unit.trial_ids) for unit in units] == [16, 16]


# ----- prefix reuse -----------------------------------------------------------------------

DECODE_FAULT = {"site": {"role": "down_proj"}, "time": {"stage": "decode"}, "corruption": {"field": "exponent_msb"}}


def test_prefix_batch_equals_fresh_batch():
    from evals.campaign import golden_prefix, run_batch_from_prefix

    model = make_tiny_model("llama")
    prompt = make_prompt(length=20, seed=4)
    planner = FaultPlanner(model, DECODE_FAULT, seed=0, max_new_tokens=10)
    faults = [None] + [planner.for_row(trial, 20, row) for row, trial in enumerate(range(6), start=1)]
    golden = golden_prefix(model, _IdTokenizer(), prompt, len(faults), 10)

    fresh = run_batch(model, _IdTokenizer(), prompt, faults, 10)
    reused = run_batch_from_prefix(model, _IdTokenizer(), prompt, faults, 10, golden=golden)

    assert [row.tokens for row in reused.rows] == [row.tokens for row in fresh.rows]
    assert [row.fired for row in reused.rows] == [row.fired for row in fresh.rows]
    assert reused.forward_passes < fresh.forward_passes


def test_prefix_batch_past_golden_end():
    """Faults after the step where every golden row ended never fire, so the golden rows are the result."""
    from evals.campaign import golden_prefix, run_batch_from_prefix

    model = make_tiny_model("llama")
    prompt = make_prompt(length=20, seed=4)
    free_run = golden_prefix(model, _IdTokenizer(), prompt, 1, 10).sequences[0, 20:].tolist()
    # End generation at the third new token by making it the end-of-sequence token.
    end = next(i for i in range(2, 10) if free_run[i] not in free_run[:i])
    model.generation_config.eos_token_id = free_run[end]
    planner = FaultPlanner(model, DECODE_FAULT, seed=0, max_new_tokens=10)
    late = [trial for trial in range(60) if planner.for_row(trial, 20, 0).forward > end][:4]
    faults = [None] + [planner.for_row(trial, 20, row) for row, trial in enumerate(late, start=1)]
    golden = golden_prefix(model, _IdTokenizer(), prompt, len(faults), 10)

    fresh = run_batch(model, _IdTokenizer(), prompt, faults, 10)
    reused = run_batch_from_prefix(model, _IdTokenizer(), prompt, faults, 10, golden=golden)

    assert end >= 2
    assert golden.sequences.shape[1] - 20 == end + 1
    assert len(late) == 4
    assert [row.tokens for row in reused.rows] == [row.tokens for row in fresh.rows]
    assert [row.fired for row in fresh.rows] == [[]] * 5
    assert [row.fired for row in reused.rows] == [[]] * 5
    assert reused.forward_passes == 0


def test_prefix_reuse_skipped_for_first_token():
    from evals.campaign import reusable_step

    model = make_tiny_model("llama")
    planner = FaultPlanner(model, FIRST_TOKEN_FAULT, seed=0, max_new_tokens=6)

    assert reusable_step([None, planner.for_row(0, 8, 1)]) is None
    assert reusable_step([None]) is None


def test_campaign_prefix_reuse_same_records(tiny_folder, loaded, tmp_path):
    # Two inputs with 4 batches each, so every batch after the first reuses the golden prefix.
    settings = dict(fault=DECODE_FAULT, max_new_tokens=8, trials=24, limit=2)
    reused = _run(_config(tiny_folder, tmp_path / "on", **settings), loaded)
    fresh = _run(_config(tiny_folder, tmp_path / "off", prefix_reuse=False, **settings), loaded)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("seconds", "forward_passes")} for r in records]

    assert strip(reused.records) == strip(fresh.records)
    reused_passes = sum(r["forward_passes"] for r in reused.records if r["kind"] == "reference")
    fresh_passes = sum(r["forward_passes"] for r in fresh.records if r["kind"] == "reference")
    assert reused_passes < fresh_passes


# ----- multiple choice --------------------------------------------------------------------


def test_campaign_multiple_choice_records(tiny_folder, loaded, tmp_path, bigbench_dir):
    from evals.tasks import get_task

    path = bigbench_dir / "logical_deduction" / "three_objects" / "task.json"
    task = get_task(f"bigbench:{path}")
    fault = {"site": {"role": "down_proj"}, "time": {"stage": "prefill"}, "corruption": {"field": "exponent_msb"}}
    config = _config(tiny_folder, tmp_path, task=f"bigbench:{path}", fault=fault, trials=4, limit=2,
                     arms=["none", "abft"])
    model, tokenizer = loaded

    result = run_campaign(config, model=model, tokenizer=tokenizer, task=task)

    trials = [r for r in result.records if r["kind"] == "trial"]
    assert len(trials) == 8
    assert all(len(r["logliks"]) == 3 for r in trials)
    assert all(r["tokens"][0] in (0, 1, 2) for r in trials)
    assert all(r["fired"] for r in trials)
    abft = [r for r in trials if r["arm"] == "abft"]
    assert any(r["detections"] for r in abft)


def test_order_by_step_groups_nearby_steps():
    from evals.campaign import WorkUnit, order_by_step

    steps = {0: 5, 1: 1, 2: 4, 3: 1, 4: 2, 5: 3}
    units = [WorkUnit(0, 0, (0, 1, 2)), WorkUnit(1, 0, (3, 4, 5)), WorkUnit(2, 1, (6, 7))]

    ordered = order_by_step(units, lambda _input, trial: steps.get(trial, 0))

    assert [unit.trial_ids for unit in ordered] == [(1, 3, 4), (5, 2, 0), (6, 7)]
    assert [unit.index for unit in ordered] == [0, 1, 2]
    assert [unit.input_index for unit in ordered] == [0, 0, 1]
