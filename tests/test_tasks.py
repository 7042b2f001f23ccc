"""Task registry, the Task base class, arithmetic, JSONL and Hugging Face dataset tasks."""

from __future__ import annotations

import json
import sys
import types

import pytest

from evals.tasks import (
    ArithmeticTask,
    Example,
    Task,
    available_tasks,
    get_task,
    register_task,
    unregister_task,
)
from evals.tasks.arithmetic import extract_number
from guard.errors import ConfigError, NotFoundError


class ChatTokenizer:
    """A stand-in tokenizer with a chat template that renders turns as tagged text."""

    chat_template = "tagged"
    bos_token = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_builtin_tasks():
    names = available_tasks()
    for name in ("arithmetic", "humaneval", "bigbench", "jsonl", "hf"):
        assert name in names


def test_registry_unknown_name_suggests():
    with pytest.raises(NotFoundError, match=r"unknown task 'arithmetik'.*'arithmetic'.*Available tasks"):
        get_task("arithmetik")


def test_registry_unknown_option_lists_valid():
    with pytest.raises(ConfigError, match=r"no option 'digit'.*'digits'.*Valid options"):
        get_task("arithmetic", digit=3)


def test_registry_duplicate_rejected():
    with pytest.raises(ConfigError, match="'arithmetic' is already registered"):
        register_task("arithmetic", ArithmeticTask)


def test_registry_custom_task_roundtrip():
    class Tiny(Task):
        name = "tiny-custom"

        def __init__(self):
            super().__init__()
            self._examples = [Example(id="a", input="1+1?", target="2")]

    register_task("tiny-custom", Tiny)
    try:
        assert get_task("tiny-custom").examples()[0].target == "2"
    finally:
        unregister_task("tiny-custom")
    assert "tiny-custom" not in available_tasks()


def test_registry_path_form_needs_path_option():
    with pytest.raises(ConfigError, match="takes no path"):
        get_task("arithmetic:/tmp/x")


def test_registry_factory_must_return_task():
    register_task("not-a-task", lambda: object())
    try:
        with pytest.raises(ConfigError, match="returned object, not a Task"):
            get_task("not-a-task")
    finally:
        unregister_task("not-a-task")


# --- arithmetic -------------------------------------------------------------------------------


def test_arithmetic_deterministic_per_seed():
    first = [(e.id, e.input, e.target) for e in get_task("arithmetic", n=20, seed=5).examples()]
    second = [(e.id, e.input, e.target) for e in get_task("arithmetic", n=20, seed=5).examples()]
    other = [(e.input, e.target) for e in get_task("arithmetic", n=20, seed=6).examples()]
    assert first == second
    assert [(i, t) for _, i, t in first] != other


def test_arithmetic_targets_correct():
    task = get_task("arithmetic", n=30, digits=3, operators="+-*", seed=1)
    for example in task.examples():
        a, b, op = example.metadata["a"], example.metadata["b"], example.metadata["operator"]
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert example.target == str(expected)
        assert example.input == f"What is {a} {op} {b}?"
        assert a < 1000
        assert b < 1000


def test_arithmetic_subtraction_non_negative():
    task = get_task("arithmetic", n=40, operators="-", seed=2)
    assert all(int(e.target) >= 0 for e in task.examples())


def test_arithmetic_shot_pool_disjoint():
    task = get_task("arithmetic", n=20, shot_pool_size=6, seed=3)
    evaluated = {e.input for e in task.examples()}
    pool = {e.input for e in task.shot_pool()}
    assert len(pool) == 6
    assert evaluated.isdisjoint(pool)
    assert len(evaluated) == 20


def test_arithmetic_string_options_accepted():
    task = get_task("arithmetic", n="4", digits="1", seed="9")
    assert len(task.examples()) == 4


def test_arithmetic_space_too_small():
    # One digit, "+" only: 10 * 10 = 100 distinct problems.
    with pytest.raises(ConfigError, match="exceeds the 100 distinct problems"):
        get_task("arithmetic", n=100, digits=1, operators="+", shot_pool_size=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"operators": "+/"}, "operators='\\+/' is invalid"),
        ({"n": 0}, "n=0 is too small"),
        ({"digits": "two"}, "digits='two' is not an integer"),
        ({"chat": "maybe"}, "chat='maybe' is not a boolean"),
    ],
)
def test_arithmetic_rejects_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        get_task("arithmetic", **options)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 42", "42"),
        (" 42\nQuestion: What is 1 + 1?", "42"),
        ("The answer is -7.", "-7"),
        ("3 + 4 = 7", "7"),
        ("\n\n1,024 apples", "1024"),
        ("no number here", ""),
        ("", ""),
    ],
)
def test_arithmetic_extract_number(text, expected):
    assert extract_number(text) == expected


def test_arithmetic_score_and_validate():
    task = get_task("arithmetic", n=1, seed=0)
    example = task.examples()[0]
    assert task.score(example, f" {example.target}\nQuestion: next") == 1.0
    assert task.score(example, " 100000") == 0.0
    assert task.validate(" 12") is True
    assert task.validate(" twelve") is False


def test_arithmetic_plain_prompt_shots():
    task = get_task("arithmetic", n=3, shot_pool_size=4, seed=0)
    example = task.examples()[0]
    prompt = task.build_prompt(example, n_shots=2)
    assert prompt.startswith("Answer with the number only.\n\nQuestion: ")
    assert prompt.count("Question: ") == 3
    assert prompt.endswith(f"Question: {example.input}\nAnswer:")
    assert prompt == task.build_prompt(example, n_shots=2)


def test_arithmetic_chat_prompt_turns():
    task = get_task("arithmetic", n=2, shot_pool_size=3, seed=0)
    example = task.examples()[0]
    prompt = task.build_prompt(example, n_shots=1, tokenizer=ChatTokenizer())
    assert prompt.count("<user>") == 2
    assert prompt.count("<assistant>") == 2
    assert prompt.startswith("<user>Answer with the number only.")
    assert prompt.endswith(f"<user>{example.input}</user><assistant>")


def test_arithmetic_chat_disabled_plain():
    task = get_task("arithmetic", n=2, chat=False)
    prompt = task.build_prompt(task.examples()[0], tokenizer=ChatTokenizer())
    assert "<user>" not in prompt


def test_task_too_many_shots():
    task = get_task("arithmetic", n=2, shot_pool_size=3)
    with pytest.raises(ConfigError, match="n_shots=4 is more than the 3 few-shot examples"):
        task.build_prompt(task.examples()[0], n_shots=4)


def test_task_shots_vary_by_example():
    task = get_task("arithmetic", n=10, shot_pool_size=8, seed=0)
    chosen = {tuple(s.id for s in task.select_shots(e, 3)) for e in task.examples()}
    assert len(chosen) > 1


def test_task_describe_records_options():
    info = get_task("arithmetic", n=3, digits=1).describe()
    assert info["name"] == "arithmetic"
    assert info["domain"] == "math"
    assert info["examples"] == 3
    assert info["options"]["digits"] == 1


def test_example_rejects_bad_correct_index():
    with pytest.raises(ConfigError, match=r"correct=\[3\] must list indices"):
        Example(id="x", input="q", choices=["a", "b"], correct=[3])


# --- jsonl ------------------------------------------------------------------------------------


def test_jsonl_generative_default_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": f"q{i}", "input": f"Capital number {i}?", "target": f"City{i}"} for i in range(8)
    ])
    task = get_task("jsonl", path=str(path), shot_pool_size=2)
    assert task.kind == "generative"
    assert task.name == "jsonl:qa"
    assert len(task.examples()) == 6
    example = task.examples()[0]
    assert task.score(example, f" {example.target}.\nQuestion: more") == 1.0
    assert task.score(example, " Elsewhere") == 0.0


def test_jsonl_prompt_answer_fields(tmp_path):
    path = write_jsonl(tmp_path / "pa.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": 6}])
    task = get_task(f"jsonl:{path}", shot_pool_size=0)
    assert [e.target for e in task.examples()] == ["4", "6"]
    assert task.examples()[0].id == "pa-1"


def test_jsonl_custom_fields_and_regex(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "Say yes", "a": "yes"}])
    task = get_task("jsonl", path=str(path), input_field="q", target_field="a",
                    answer_regex=r"ANSWER: (\w+)", shot_pool_size=0)
    example = task.examples()[0]
    assert task.score(example, "thinking... ANSWER: yes") == 1.0
    assert task.validate("no marker") is False


def test_jsonl_multiple_choice(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"input": "Sky colour?", "choices": ["green", "blue"], "correct": 1},
        {"input": "Grass colour?", "choices": ["green", "blue"], "target": "green"},
    ])
    task = get_task("jsonl", path=str(path), shot_pool_size=0)
    assert task.kind == "multiple_choice"
    first, second = task.examples()
    assert first.correct == [1]
    assert second.correct == [0]
    context, continuations = task.choice_texts(first)
    assert context.endswith("Answer:")
    assert continuations == [" green", " blue"]
    assert task.score_loglik(first, [-3.0, -1.0]) == 1.0
    assert task.score_loglik(first, [-1.0, float("nan")]) == 0.0
    assert task.score_loglik(first, [float("nan"), float("nan")]) == 0.0


def test_jsonl_malformed_line_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "c", "target": \n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: invalid JSON"):
        get_task("jsonl", path=str(path))


def test_jsonl_missing_field_named(tmp_path):
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"input": "a", "target": "b"}, {"text": "c"}])
    with pytest.raises(ConfigError, match=r"nofield\.jsonl:2: field 'input or prompt or question' is missing"):
        get_task("jsonl", path=str(path))


def test_jsonl_missing_target_named(tmp_path):
    path = write_jsonl(tmp_path / "notarget.jsonl", [{"input": "a", "target": "b"}, {"input": "c"}])
    with pytest.raises(ConfigError, match=r"notarget\.jsonl:2: no target field"):
        get_task("jsonl", path=str(path), shot_pool_size=0)


def test_jsonl_bad_correct_index(tmp_path):
    path = write_jsonl(tmp_path / "idx.jsonl", [{"input": "a", "choices": ["x", "y"], "correct": 5}])
    with pytest.raises(ConfigError, match=r"idx\.jsonl:1: field 'correct'=5 must be an index"):
        get_task("jsonl", path=str(path), shot_pool_size=0)


def test_jsonl_duplicate_id(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "input": "a", "target": "b"}] * 2)
    with pytest.raises(ConfigError, match=r"dup\.jsonl:2: id '1' repeats"):
        get_task("jsonl", path=str(path), shot_pool_size=0)


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"input": "caf\xe9", "target": "x"}\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        get_task("jsonl", path=str(path))


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="JSONL file not found"):
        get_task("jsonl", path=str(tmp_path / "absent.jsonl"))


def test_jsonl_needs_path():
    with pytest.raises(ConfigError, match="needs path="):
        get_task("jsonl")


# --- hf ---------------------------------------------------------------------------------------


def test_hf_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(NotFoundError, match="needs the Hugging Face 'datasets' package"):
        get_task("hf", path=str(tmp_path))


def _fake_datasets(rows_by_split):
    module = types.ModuleType("datasets")

    class DatasetDict(dict):
        pass

    module.load_from_disk = lambda path: DatasetDict(rows_by_split)
    module.load_dataset = lambda builder, data_files, split: list(rows_by_split[split])
    return module


def test_hf_saved_dataset_split(monkeypatch, tmp_path):
    rows = {"test": [{"question": f"q{i}", "answer": str(i)} for i in range(4)]}
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows))
    task = get_task("hf", path=str(tmp_path), split="test", shot_pool_size=1)
    assert task.name == f"hf:{tmp_path.name}"
    assert len(task.examples()) == 3
    assert {e.target for e in task.examples() + task.shot_pool()} == {"0", "1", "2", "3"}


def test_hf_unknown_split(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets({"train": [{"input": "a", "target": "b"}]}))
    with pytest.raises(NotFoundError, match="split='validation' is not valid.*Valid choices: train"):
        get_task("hf", path=str(tmp_path), split="validation")


def test_hf_rejects_hub_name(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets({}))
    with pytest.raises(ConfigError, match="does not exist locally"):
        get_task("hf", path="openai/gsm8k-not-a-local-path")


def test_hf_bad_row_named(monkeypatch, tmp_path):
    rows = {"train": [{"input": "a", "target": "b"}, {"input": 3, "target": "c"}]}
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows))
    with pytest.raises(ConfigError, match="split 'train' row 1: field 'input or prompt or question'"):
        get_task("hf", path=str(tmp_path))


def test_hf_real_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    source = write_jsonl(tmp_path / "rows.jsonl", [
        {"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)
    ])
    folder = tmp_path / "saved"
    # Built through load_dataset: Dataset.from_dict fails to fingerprint with datasets 5.2 and
    # pyarrow 26 (a PicklingError on MonthDayNano).
    datasets.load_dataset("json", data_files={"test": str(source)}).save_to_disk(str(folder))
    task = get_task("hf", path=str(folder), split="test", shot_pool_size=2)
    assert len(task.examples()) == 4
    assert task.kind == "generative"
    example = task.examples()[0]
    assert task.score(example, f" {example.target}") == 1.0


def test_hf_real_jsonl_file(tmp_path):
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"input": f"Pick {w}", "choices": ["red", "blue"], "label": i} for i, w in enumerate(["red", "blue"])
    ])
    task = get_task("hf", path=str(path), shot_pool_size=0)
    assert task.kind == "multiple_choice"
    assert [e.correct for e in task.examples()] == [[0], [1]]
