"""BIG-bench task.json loading on the real files and on small synthetic files."""

from __future__ import annotations

import json

import pytest

from evals.tasks import get_task
from guard.errors import ConfigError

REAL_TASKS = {
    # folder: (kind in auto mode, domain, total examples)
    "arithmetic/1_digit_addition": ("generative", "math", 100),
    "general_knowledge": ("multiple_choice", "reasoning", 70),
    "entailed_polarity_hindi": ("multiple_choice", "multilingual", 142),
    "code_line_description": ("multiple_choice", "coding", 60),
    "logical_deduction/three_objects": ("multiple_choice", "reasoning", 300),
}


def write_task(path, examples, **fields):
    path.write_text(json.dumps({"name": path.stem, "examples": examples, **fields}), encoding="utf-8")
    return path


@pytest.mark.parametrize("folder", sorted(REAL_TASKS))
def test_bigbench_real_file_loads(bigbench_dir, folder):
    kind, domain, total = REAL_TASKS[folder]
    task = get_task("bigbench", path=str(bigbench_dir / folder / "task.json"))
    assert task.kind == kind
    assert task.domain == domain
    assert len(task.examples()) + len(task.shot_pool()) == total
    assert len(task.shot_pool()) == 5
    example = task.examples()[0]
    prompt = task.build_prompt(example, n_shots=2)
    assert example.input in prompt
    if kind == "multiple_choice":
        context, continuations = task.choice_texts(example, n_shots=1)
        assert len(continuations) == len(example.choices)
        assert context == task.build_prompt(example, n_shots=1)


@pytest.mark.parametrize("folder", sorted(f for f in REAL_TASKS if f != "arithmetic/1_digit_addition"))
def test_bigbench_real_file_generative_rejected(bigbench_dir, folder):
    with pytest.raises(ConfigError, match="mode='generative' needs a 'target'"):
        get_task("bigbench", path=str(bigbench_dir / folder / "task.json"), mode="generative")


def test_bigbench_arithmetic_generative_exact_match(bigbench_dir):
    task = get_task(f"bigbench:{bigbench_dir / 'arithmetic' / '1_digit_addition'}")
    assert task.name == "bigbench:1_digit_addition"
    for example in task.examples()[:20]:
        a, b = (int(w.rstrip("?")) for w in example.input.split() if w.rstrip("?").isdigit())
        assert example.target == str(a + b)
        assert task.score(example, f" {a + b}\n\nQ: What is") == 1.0
        assert task.score(example, f" {a + b + 1}") == 0.0
    # The file's output_regex [-+]?\d+ extracts the number from surrounding words.
    assert task.extract_answer(" The sum is 7.") == "7"
    assert task.validate(" seven") is False


def test_bigbench_arithmetic_multiple_choice_mode(bigbench_dir):
    task = get_task("bigbench", path=str(bigbench_dir / "arithmetic" / "1_digit_addition"),
                    mode="multiple_choice")
    example = task.examples()[0]
    assert task.kind == "multiple_choice"
    assert example.choices[example.correct[0]] == example.target
    assert len(example.correct) == 1
    context, continuations = task.choice_texts(example)
    assert context.endswith("A:")
    assert all(c.startswith(" ") for c in continuations)
    assert "choice: banana" in context


def test_bigbench_hindi_prompt_keeps_prefix(bigbench_dir):
    task = get_task("bigbench", path=str(bigbench_dir / "entailed_polarity_hindi"))
    example = task.examples()[0]
    prompt = task.build_prompt(example)
    assert prompt.startswith("एक तथ्य")
    assert "choice:" not in prompt
    assert sorted(example.choices) == sorted(["हां", "नहीं"])


def test_bigbench_limit_and_pool_disjoint(bigbench_dir):
    task = get_task("bigbench", path=str(bigbench_dir / "general_knowledge"), limit=10, shot_pool_size=7)
    assert len(task.examples()) == 10
    assert {e.id for e in task.examples()}.isdisjoint(e.id for e in task.shot_pool())


def test_bigbench_small_file_both_modes(tmp_path):
    path = write_task(tmp_path / "both.json", [
        {"input": f"Say {w}", "target": w, "target_scores": {w: 1, "other": 0}}
        for w in ("red", "blue", "green", "pink")
    ], preferred_score="exact_str_match")
    generative = get_task("bigbench", path=str(path), shot_pool_size=1)
    multiple_choice = get_task("bigbench", path=str(path), shot_pool_size=1, mode="multiple_choice")
    assert generative.kind == "generative"
    assert multiple_choice.kind == "multiple_choice"
    example = generative.examples()[0]
    assert generative.score(example, f" {example.target}\nQ: Say") == 1.0


def test_bigbench_target_list_accepts_any(tmp_path):
    path = write_task(tmp_path / "alts.json", [{"input": "Colour of snow?", "target": ["white", "snow white"]}])
    task = get_task("bigbench", path=str(path), shot_pool_size=0)
    example = task.examples()[0]
    assert task.score(example, " Snow white.") == 1.0
    assert task.score(example, " White") == 1.0


def test_bigbench_fractional_scores_best_correct(tmp_path):
    path = write_task(tmp_path / "frac.json", [{"input": "q", "target_scores": {"a": 0.5, "b": 1.0, "c": 1.0}}])
    example = get_task("bigbench", path=str(path), shot_pool_size=0).examples()[0]
    assert example.correct == [1, 2]


def test_bigbench_invalid_json_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"examples": [\n  {"input": "a",}\n]}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.json is not valid JSON: .* at line 2"):
        get_task("bigbench", path=str(path))


def test_bigbench_missing_examples(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text('{"name": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="has no 'examples' list"):
        get_task("bigbench", path=str(path))


def test_bigbench_bad_example_named(tmp_path):
    path = write_task(tmp_path / "badex.json", [{"input": "a", "target": "b"}, {"target": "c"}])
    with pytest.raises(ConfigError, match=r"badex\.json: examples\[1\]: field 'input' is missing"):
        get_task("bigbench", path=str(path), shot_pool_size=0)


def test_bigbench_multiple_choice_needs_scores(tmp_path):
    path = write_task(tmp_path / "gen.json", [{"input": "a", "target": "b"}])
    with pytest.raises(ConfigError, match="mode='multiple_choice' needs 'target_scores'"):
        get_task("bigbench", path=str(path), mode="multiple_choice", shot_pool_size=0)


def test_bigbench_unknown_mode(tmp_path):
    path = write_task(tmp_path / "m.json", [{"input": "a", "target": "b"}])
    with pytest.raises(ConfigError, match="mode='mc' is not valid"):
        get_task("bigbench", path=str(path), mode="mc")


def test_bigbench_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="BIG-bench task file not found"):
        get_task(f"bigbench:{tmp_path / 'nowhere.json'}")


def test_bigbench_needs_path():
    with pytest.raises(ConfigError, match="needs path="):
        get_task("bigbench")


def test_bigbench_pool_too_large(tmp_path):
    path = write_task(tmp_path / "tiny.json", [{"input": "a", "target": "b"}])
    with pytest.raises(ConfigError, match="shot_pool_size=5 leaves no example"):
        get_task("bigbench", path=str(path))
