"""The task abstraction: examples, prompt building with few shots, answer extraction, scoring."""

from __future__ import annotations

import logging
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from guard.errors import ConfigError, unknown_choice

logger = logging.getLogger(__name__)

DOMAINS = ("math", "coding", "reasoning", "multilingual", "generic")
KINDS = ("generative", "multiple_choice")


@dataclass
class Example:
    """One evaluated item.

    Generative tasks set ``target`` (one accepted answer or a list of them). Multiple-choice
    tasks set ``choices`` and ``correct``, the indices of the correct choices.
    """

    id: str
    input: str
    target: str | list[str] | None = None
    choices: list[str] | None = None
    correct: list[int] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"Example id={self.id!r} is invalid. Pass a non-empty str.")
        if not isinstance(self.input, str):
            raise ConfigError(f"Example {self.id}: input={self.input!r} is not a str.")
        if self.choices is not None:
            if not self.choices or not all(isinstance(c, str) for c in self.choices):
                raise ConfigError(
                    f"Example {self.id}: choices={self.choices!r} must be a non-empty list of str."
                )
            if not self.correct or not all(
                isinstance(i, int) and 0 <= i < len(self.choices) for i in self.correct
            ):
                raise ConfigError(
                    f"Example {self.id}: correct={self.correct!r} must list indices of choices "
                    f"(0 to {len(self.choices) - 1})."
                )

    @property
    def targets(self) -> list[str]:
        """The accepted answers as a list (empty when there is no target)."""
        if self.target is None:
            return []
        if isinstance(self.target, str):
            return [self.target]
        return list(self.target)


def normalize_answer(text: str) -> str:
    """Normalize an answer for exact match: collapse whitespace, drop a final period, lowercase."""
    text = " ".join(str(text).split())
    text = text.rstrip(".")
    return text.strip().lower()


def stable_seed(*parts: object) -> int:
    """Return a seed derived from ``parts`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def first_line(text: str) -> str:
    """Return the first non-empty line of ``text``, stripped."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def as_int(field_name: str, value: Any, minimum: int | None = None) -> int:
    """Convert an option to int, accepting the digit strings that CLI and YAML options give."""
    if isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} is not an integer. Pass a whole number.")
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(f"{field_name}={value!r} is not an integer. Pass a whole number.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{field_name}={value!r} is too small. Pass a value >= {minimum}.")
    return value


def as_bool(field_name: str, value: Any) -> bool:
    """Convert an option to bool, accepting true/false/yes/no/1/0 strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{field_name}={value!r} is not a boolean. Pass true or false.")


class Task:
    """Base class of evaluation tasks.

    A subclass sets ``name``, ``domain``, ``kind`` and ``default_max_new_tokens``, fills
    ``self._examples`` and ``self._shot_pool`` (disjoint lists), and may override how a
    question and an answer are rendered, how an answer is extracted and how it is scored.

    Prompts use the tokenizer's chat template when the tokenizer has one and ``self.chat``
    is true; otherwise they are plain text ending with the answer prefix (``"Answer:"``), with
    no trailing space so the model produces the space itself.
    """

    name: str = "task"
    domain: str = "generic"
    kind: str = "generative"
    default_max_new_tokens: int = 16
    # Instruction placed before the first question (plain text) or in the first user turn (chat).
    instruction: str = ""
    # Separator between few-shot blocks in plain-text prompts.
    shot_separator: str = "\n\n"
    question_prefix: str = "Question: "
    answer_prefix: str = "Answer: "

    def __init__(self, *, chat: bool | str | None = None, shot_seed: int | str = 0) -> None:
        self.chat = True if chat is None else as_bool("chat", chat)
        self.shot_seed = as_int("shot_seed", shot_seed)
        self._examples: list[Example] = []
        self._shot_pool: list[Example] = []
        # Options as given, for the campaign's provenance record.
        self.options: dict[str, Any] = {}

    # --- data ------------------------------------------------------------------------------

    def examples(self) -> list[Example]:
        """Return the evaluated examples, in a deterministic order."""
        return list(self._examples)

    def shot_pool(self) -> list[Example]:
        """Return the few-shot examples; none of them is among :meth:`examples`."""
        return list(self._shot_pool)

    @property
    def max_shots(self) -> int:
        return len(self._shot_pool)

    def describe(self) -> dict[str, Any]:
        """Return the task's identity for result files: name, kind, domain, sizes and options."""
        return {
            "name": self.name,
            "kind": self.kind,
            "domain": self.domain,
            "examples": len(self._examples),
            "shot_pool": len(self._shot_pool),
            "chat": self.chat,
            "options": dict(self.options),
        }

    def _check_setup(self) -> None:
        if self.domain not in DOMAINS:
            raise ConfigError(unknown_choice("domain", self.domain, DOMAINS))
        if self.kind not in KINDS:
            raise ConfigError(unknown_choice("kind", self.kind, KINDS))
        evaluated = {e.id for e in self._examples}
        overlap = evaluated.intersection(e.id for e in self._shot_pool)
        if overlap:
            raise ConfigError(
                f"task {self.name}: shot pool and evaluated examples share ids {sorted(overlap)[:5]}."
            )

    # --- prompts ---------------------------------------------------------------------------

    def select_shots(self, example: Example, n_shots: int) -> list[Example]:
        """Return ``n_shots`` examples from the pool, chosen by a seed derived from the example id."""
        n_shots = as_int("n_shots", n_shots, minimum=0)
        if n_shots > len(self._shot_pool):
            raise ConfigError(
                f"n_shots={n_shots} is more than the {len(self._shot_pool)} few-shot examples "
                f"of task {self.name}. Pass n_shots <= {len(self._shot_pool)}."
            )
        if n_shots == 0:
            return []
        generator = random.Random(stable_seed(self.shot_seed, example.id))
        return generator.sample(self._shot_pool, n_shots)

    def format_question(self, example: Example) -> str:
        """Render the question part of an example (without any answer prefix)."""
        return example.input

    def format_answer(self, example: Example) -> str:
        """Render the reference answer of a few-shot example."""
        if self.kind == "multiple_choice":
            return example.choices[example.correct[0]]
        targets = example.targets
        if not targets:
            raise ConfigError(f"task {self.name}: example {example.id} has no target to show as a shot.")
        return targets[0]

    def _plain_prompt(self, example: Example, shots: Sequence[Example]) -> str:
        blocks = []
        for shot in shots:
            blocks.append(
                self.question_prefix + self.format_question(shot) + "\n"
                + self.answer_prefix + self.format_answer(shot)
            )
        blocks.append(self.question_prefix + self.format_question(example) + "\n" + self.answer_prefix)
        text = self.shot_separator.join(blocks)
        if self.instruction:
            text = self.instruction + "\n\n" + text
        return text.rstrip(" ")

    def _chat_messages(self, example: Example, shots: Sequence[Example]) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = []
        for shot in shots:
            messages.append({"role": "user", "content": self.format_question(shot)})
            messages.append({"role": "assistant", "content": self.format_answer(shot)})
        messages.append({"role": "user", "content": self.format_question(example)})
        if self.instruction:
            messages[0] = {"role": "user", "content": self.instruction + "\n\n" + messages[0]["content"]}
        return messages

    def uses_chat(self, tokenizer: Any) -> bool:
        """Return whether prompts for ``tokenizer`` go through its chat template."""
        return self.chat and has_chat_template(tokenizer)

    def build_prompt(self, example: Example, n_shots: int = 0, tokenizer: Any = None) -> str:
        """Return the prompt text for ``example`` with ``n_shots`` few-shot examples."""
        shots = self.select_shots(example, n_shots)
        if self.uses_chat(tokenizer):
            return tokenizer.apply_chat_template(
                self._chat_messages(example, shots), tokenize=False, add_generation_prompt=True
            )
        return self._plain_prompt(example, shots)

    def choice_texts(
        self, example: Example, n_shots: int = 0, tokenizer: Any = None
    ) -> tuple[str, list[str]]:
        """Return (context, continuations) for scoring each choice by log-likelihood.

        In plain-text prompts the context ends with the answer prefix without its trailing
        space and each continuation starts with that space, which is how BPE tokenizers
        spell a word after a space.
        """
        if self.kind != "multiple_choice" or not example.choices:
            raise ConfigError(
                f"task {self.name} is {self.kind}; choice_texts needs a multiple-choice example."
            )
        context = self.build_prompt(example, n_shots, tokenizer)
        if self.uses_chat(tokenizer):
            return context, list(example.choices)
        spacing = self.answer_prefix[len(self.answer_prefix.rstrip(" ")):] or " "
        return context, [spacing + choice for choice in example.choices]

    # --- answers ---------------------------------------------------------------------------

    def extract_answer(self, text: str) -> str:
        """Return the answer part of a completion: by default its first non-empty line."""
        return first_line(text)

    def validate(self, completion: str) -> bool:
        """Return whether ``completion`` has the answer format (a format check, not a grade)."""
        return bool(self.extract_answer(completion))

    def score(self, example: Example, completion: str) -> float:
        """Return 1.0 when the extracted answer matches a target (or a correct choice), else 0.0."""
        answer = normalize_answer(self.extract_answer(completion))
        if self.kind == "multiple_choice" and example.choices:
            accepted = [example.choices[i] for i in example.correct]
        else:
            accepted = example.targets
        return 1.0 if answer and answer in {normalize_answer(t) for t in accepted} else 0.0

    def score_choice(self, example: Example, choice_index: int) -> float:
        """Return 1.0 when ``choice_index`` is a correct choice of a multiple-choice example."""
        if not example.choices:
            raise ConfigError(f"example {example.id} of task {self.name} has no choices.")
        return 1.0 if int(choice_index) in example.correct else 0.0

    def score_loglik(self, example: Example, logliks: Sequence[float]) -> float:
        """Score a multiple-choice example from per-choice log-likelihoods (argmax, first on ties)."""
        if not example.choices or len(logliks) != len(example.choices):
            raise ConfigError(
                f"example {example.id}: got {len(logliks)} log-likelihoods for "
                f"{len(example.choices or [])} choices."
            )
        # A non-finite log-likelihood (from a corrupted forward) never wins; all of them score 0.
        finite = [i for i, v in enumerate(logliks) if math.isfinite(float(v))]
        if not finite:
            return 0.0
        best = max(finite, key=lambda i: (float(logliks[i]), -i))
        return self.score_choice(example, best)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, examples={len(self._examples)})"
