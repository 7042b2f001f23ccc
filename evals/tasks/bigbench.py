"""Any BIG-bench ``task.json`` file: generative exact match or multiple choice by log-likelihood.

The file is a JSON object with ``examples``; each has ``input`` and ``target`` (a string or a
list of accepted strings) and/or ``target_scores`` (choice -> score, the highest-scoring
choices being correct). Optional formatting fields are honoured: ``task_prefix``,
``example_input_prefix`` (default ``"\\nQ: "``), ``example_output_prefix`` (default
``"\\nA: "``), ``choice_prefix`` (default ``"\\n  choice: "``), ``append_choices_to_input``
(default true), ``few_shot_example_separator`` (default ``"\\n"``) and ``output_regex``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from guard.errors import ConfigError, unknown_choice
from evals.tasks.base import Example, Task, as_int, first_line, normalize_answer, stable_seed

logger = logging.getLogger(__name__)

MODES = ("auto", "generative", "multiple_choice")
_DOMAIN_KEYWORDS = (
    ("coding", ("computer code", "programming", "code")),
    ("math", ("mathematics", "arithmetic", "algebra", "mathematical proof")),
    ("multilingual", ("multilingual", "non-english", "translation", "low-resource language")),
)


def _read_task_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read BIG-bench task file {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"BIG-bench task file {path} is not UTF-8 text ({error.reason}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"BIG-bench task file {path} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ConfigError(
            f"BIG-bench task file {path} has no 'examples' list. A task.json is an object with "
            "an 'examples' list (programmatic BIG-bench tasks with task.py are not supported)."
        )
    if not data["examples"]:
        raise ConfigError(f"BIG-bench task file {path} has an empty 'examples' list.")
    return data


def _mostly_non_latin(texts: Sequence[str]) -> bool:
    letters = [ch for text in texts for ch in text if ch.isalpha()]
    if not letters:
        return False
    latin = sum(1 for ch in letters if "LATIN" in unicodedata.name(ch, ""))
    return latin / len(letters) < 0.5


def infer_domain(data: dict) -> str:
    """Guess the study domain of a BIG-bench task from its keywords and script."""
    keywords = " | ".join(str(k).lower() for k in data.get("keywords", []))
    inputs = [str(e.get("input", "")) for e in data["examples"][:50] if isinstance(e, dict)]
    if _mostly_non_latin(inputs):
        return "multilingual"
    for domain, words in _DOMAIN_KEYWORDS:
        if any(word in keywords for word in words):
            return domain
    return "reasoning"


class BigBenchTask(Task):
    """A BIG-bench JSON task.

    ``mode`` chooses generative exact match (needs ``target``) or multiple choice (needs
    ``target_scores``); ``auto`` follows the file's ``preferred_score`` when both exist.
    ``shot_pool_size`` examples, chosen with ``random.Random(shot_seed)``, are held out as
    few-shot examples; the rest are evaluated in file order (``limit`` keeps the first ones).
    """

    default_max_new_tokens = 16

    def __init__(
        self,
        path: str | Path | None = None,
        mode: str = "auto",
        limit: int | str | None = None,
        shot_pool_size: int | str = 5,
        domain: str | None = None,
        chat: bool | str | None = None,
        shot_seed: int | str = 0,
    ) -> None:
        super().__init__(chat=chat, shot_seed=shot_seed)
        if path is None or str(path) == "":
            raise ConfigError(
                "the bigbench task needs path=... to a BIG-bench task.json file "
                "(or the name form 'bigbench:PATH')."
            )
        source = Path(path)
        if source.is_dir():
            source = source / "task.json"
        if not source.is_file():
            raise ConfigError(f"path={str(path)!r}: BIG-bench task file not found at {source}.")
        if mode not in MODES:
            raise ConfigError(unknown_choice("mode", mode, MODES))
        data = _read_task_file(source)
        self.source = str(source)
        self.data_name = str(data.get("name") or source.parent.name)
        self.name = f"bigbench:{self.data_name}"
        self.domain = domain if domain is not None else infer_domain(data)

        self.task_prefix = str(data.get("task_prefix", ""))
        self.input_prefix = str(data.get("example_input_prefix", "\nQ: "))
        self.output_prefix = str(data.get("example_output_prefix", "\nA: "))
        self.choice_prefix = str(data.get("choice_prefix", "\n  choice: "))
        self.append_choices = bool(data.get("append_choices_to_input", True))
        self.shot_separator = str(data.get("few_shot_example_separator", "\n"))
        self.output_regex = None
        if data.get("output_regex"):
            try:
                self.output_regex = re.compile(str(data["output_regex"]))
            except re.error as error:
                raise ConfigError(f"{source}: output_regex is not a valid regular expression ({error}).") from None

        self.mode = self._resolve_mode(mode, data, source)
        self.kind = self.mode
        examples = [self._make_example(i, record, source) for i, record in enumerate(data["examples"])]

        pool_size = as_int("shot_pool_size", shot_pool_size, minimum=0)
        if pool_size >= len(examples):
            raise ConfigError(
                f"shot_pool_size={pool_size} leaves no example to evaluate in {source} "
                f"({len(examples)} examples). Pass a smaller value."
            )
        held_out = set(random.Random(stable_seed("bigbench-pool", self.shot_seed)).sample(
            range(len(examples)), pool_size))
        self._shot_pool = [e for i, e in enumerate(examples) if i in held_out]
        evaluated = [e for i, e in enumerate(examples) if i not in held_out]
        if limit is not None:
            evaluated = evaluated[: as_int("limit", limit, minimum=1)]
        self._examples = evaluated
        self.options = {
            "path": self.source, "mode": self.mode, "limit": limit,
            "shot_pool_size": pool_size, "domain": self.domain,
        }
        self._check_setup()

    # --- loading ---------------------------------------------------------------------------

    @staticmethod
    def _resolve_mode(mode: str, data: dict, source: Path) -> str:
        examples = data["examples"]
        has_targets = all(isinstance(e, dict) and "target" in e for e in examples)
        has_scores = all(isinstance(e, dict) and "target_scores" in e for e in examples)
        if mode == "generative" and not has_targets:
            raise ConfigError(
                f"mode='generative' needs a 'target' in every example of {source}. "
                "Use mode='multiple_choice' for this file."
            )
        if mode == "multiple_choice" and not has_scores:
            raise ConfigError(
                f"mode='multiple_choice' needs 'target_scores' in every example of {source}. "
                "Use mode='generative' for this file."
            )
        if mode != "auto":
            return mode
        if has_scores and (not has_targets or data.get("preferred_score") == "multiple_choice_grade"):
            return "multiple_choice"
        if has_targets:
            return "generative"
        raise ConfigError(
            f"{source}: not every example has 'target' or 'target_scores', so neither generative "
            "nor multiple-choice scoring applies to all of them."
        )

    def _make_example(self, index: int, record: Any, source: Path) -> Example:
        where = f"{source}: examples[{index}]"
        if not isinstance(record, dict):
            raise ConfigError(f"{where} is not a JSON object.")
        if not isinstance(record.get("input"), str):
            raise ConfigError(f"{where}: field 'input' is missing or not a string.")
        target = record.get("target")
        if target is not None:
            if isinstance(target, list) and target and all(isinstance(t, str) for t in target):
                target = list(target)
            elif not isinstance(target, str):
                raise ConfigError(f"{where}: field 'target' must be a string or a list of strings.")
        choices = correct = None
        if self.mode == "multiple_choice":
            scores = record.get("target_scores")
            if not isinstance(scores, dict) or not scores:
                raise ConfigError(f"{where}: field 'target_scores' must be a non-empty object.")
            try:
                values = [float(v) for v in scores.values()]
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: 'target_scores' values must be numbers.") from None
            best = max(values)
            if best <= 0:
                raise ConfigError(f"{where}: no choice in 'target_scores' has a positive score.")
            choices = [str(c) for c in scores]
            correct = [i for i, v in enumerate(values) if v == best]
        return Example(
            id=f"{self.data_name}-{index}",
            input=record["input"],
            target=target,
            choices=choices,
            correct=correct,
            metadata={"index": index, "source": str(source)},
        )

    # --- prompts ---------------------------------------------------------------------------

    def format_question(self, example: Example) -> str:
        text = example.input
        if self.mode == "multiple_choice" and self.append_choices and example.choices:
            text += "".join(self.choice_prefix + choice for choice in example.choices)
        return text

    def _plain_prompt(self, example: Example, shots) -> str:
        blocks = [
            self.input_prefix + self.format_question(shot) + self.output_prefix + self.format_answer(shot)
            for shot in shots
        ]
        blocks.append(self.input_prefix + self.format_question(example) + self.output_prefix)
        text = self.task_prefix + self.shot_separator.join(blocks)
        return text.lstrip("\n").rstrip(" ")

    def _chat_messages(self, example: Example, shots) -> list[dict[str, str]]:
        messages = super()._chat_messages(example, shots)
        if self.task_prefix.strip():
            first = messages[0]
            messages[0] = {"role": "user", "content": self.task_prefix.strip() + "\n\n" + first["content"]}
        return messages

    def choice_texts(self, example: Example, n_shots: int = 0, tokenizer: Any = None):
        context, continuations = super().choice_texts(example, n_shots, tokenizer)
        if not self.uses_chat(tokenizer):
            spacing = self.output_prefix[len(self.output_prefix.rstrip(" ")):]
            continuations = [spacing + choice for choice in example.choices]
        return context, continuations

    # --- answers ---------------------------------------------------------------------------

    def extract_answer(self, text: str) -> str:
        """Return the first match of the file's ``output_regex``, else the first non-empty line."""
        if self.output_regex is not None:
            match = self.output_regex.search(str(text))
            return match.group().strip() if match else ""
        line = first_line(text)
        # The model may continue with the next few-shot question on the same line.
        for marker in (self.input_prefix.strip(), self.output_prefix.strip()):
            if marker and marker in line:
                line = line.split(marker, 1)[0].strip()
        return line

    def score(self, example: Example, completion: str) -> float:
        if self.mode == "multiple_choice":
            return super().score(example, completion)
        answer = normalize_answer(self.extract_answer(completion))
        accepted = {normalize_answer(t) for t in example.targets}
        return 1.0 if answer and answer in accepted else 0.0
