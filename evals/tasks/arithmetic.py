"""Seeded synthetic integer arithmetic (math domain)."""

from __future__ import annotations

import logging
import random
import re

from guard.errors import ConfigError
from evals.tasks.base import Example, Task, as_int

logger = logging.getLogger(__name__)

OPERATORS = "+-*"
_NUMBER = re.compile(r"[-+]?\d+")


def extract_number(text: str) -> str:
    """Return the integer that answers an arithmetic question in ``text``, or "".

    Only the first non-empty line counts, so text the model adds after its answer (often a
    new question) is ignored. Within that line the number after the last "=" wins, since
    models often restate the sum ("3 + 4 = 7"); otherwise the first number does.
    """
    for line in str(text).splitlines():
        if not line.strip():
            continue
        tail = line.rsplit("=", 1)[1] if "=" in line else line
        match = _NUMBER.search(tail.replace(",", ""))
        if match is None and "=" in line:
            match = _NUMBER.search(line.replace(",", ""))
        if match is None:
            return ""
        return str(int(match.group()))
    return ""


class ArithmeticTask(Task):
    """Questions "What is a OP b?" on random non-negative integers of up to ``digits`` digits.

    ``n`` evaluated problems and ``shot_pool_size`` few-shot problems come from one
    ``random.Random(seed)`` stream; every problem is distinct and the two sets are disjoint.
    For subtraction the larger operand comes first, so answers are never negative.
    """

    domain = "math"
    kind = "generative"
    default_max_new_tokens = 12
    instruction = "Answer with the number only."

    def __init__(
        self,
        n: int | str = 50,
        digits: int | str = 2,
        operators: str = "+-",
        seed: int | str = 0,
        shot_pool_size: int | str = 8,
        chat: bool | str | None = None,
        shot_seed: int | str = 0,
    ) -> None:
        super().__init__(chat=chat, shot_seed=shot_seed)
        self.n = as_int("n", n, minimum=1)
        self.digits = as_int("digits", digits, minimum=1)
        if self.digits > 18:
            raise ConfigError(f"digits={self.digits} is too large. Pass 1 to 18.")
        if not isinstance(operators, str) or not operators or set(operators) - set(OPERATORS):
            raise ConfigError(
                f"operators={operators!r} is invalid. Pass a non-empty string of the "
                f"characters {OPERATORS!r}, for example '+-'."
            )
        self.operators = "".join(dict.fromkeys(operators))
        self.seed = as_int("seed", seed)
        pool_size = as_int("shot_pool_size", shot_pool_size, minimum=0)
        self.name = "arithmetic"
        self.options = {
            "n": self.n, "digits": self.digits, "operators": self.operators,
            "seed": self.seed, "shot_pool_size": pool_size,
        }

        largest = 10**self.digits - 1
        # Distinct problems: ordered pairs per operator, halved for "-" (larger operand first).
        space = 0
        for operator in self.operators:
            pairs = (largest + 1) ** 2
            space += (pairs + largest + 1) // 2 if operator == "-" else pairs
        if self.n + pool_size > space:
            raise ConfigError(
                f"n={self.n} plus shot_pool_size={pool_size} exceeds the {space} distinct "
                f"problems with digits={self.digits} and operators={self.operators!r}. "
                "Lower n or raise digits."
            )
        generator = random.Random(self.seed)
        seen: set[tuple[int, str, int]] = set()
        problems = []
        while len(problems) < self.n + pool_size:
            a = generator.randint(0, largest)
            b = generator.randint(0, largest)
            operator = generator.choice(self.operators)
            if operator == "-" and b > a:
                a, b = b, a
            key = (a, operator, b)
            if key in seen:
                continue
            seen.add(key)
            problems.append(key)
        examples = [self._make_example(i, *p) for i, p in enumerate(problems)]
        self._examples = examples[: self.n]
        self._shot_pool = examples[self.n:]
        self._check_setup()

    def _make_example(self, index: int, a: int, operator: str, b: int) -> Example:
        if operator == "+":
            result = a + b
        elif operator == "-":
            result = a - b
        else:
            result = a * b
        return Example(
            id=f"arithmetic-{self.seed}-{index}",
            input=f"What is {a} {operator} {b}?",
            target=str(result),
            metadata={"a": a, "b": b, "operator": operator},
        )

    def extract_answer(self, text: str) -> str:
        return extract_number(text)

    def validate(self, completion: str) -> bool:
        """Return whether the completion contains a number on its first non-empty line."""
        return extract_number(completion) != ""

    def score(self, example: Example, completion: str) -> float:
        answer = extract_number(completion)
        return 1.0 if answer != "" and answer in example.targets else 0.0
