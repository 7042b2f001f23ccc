"""Evaluation tasks and their registry.

Built-in names: ``arithmetic`` (seeded synthetic math), ``humaneval`` (coding, executed in a
sandbox), ``bigbench`` (any BIG-bench task.json), ``jsonl`` (JSON Lines records) and ``hf``
(a local Hugging Face dataset, when the ``datasets`` package is installed).
"""

from __future__ import annotations

from evals.tasks.arithmetic import ArithmeticTask
from evals.tasks.base import DOMAINS, KINDS, Example, Task, normalize_answer
from evals.tasks.bigbench import BigBenchTask
from evals.tasks.humaneval import HumanEvalTask
from evals.tasks.records import HFDatasetTask, JsonlTask, RecordTask
from evals.tasks.registry import available_tasks, get_task, register_task, unregister_task

register_task("arithmetic", ArithmeticTask)
register_task("humaneval", HumanEvalTask)
register_task("bigbench", BigBenchTask)
register_task("jsonl", JsonlTask)
register_task("hf", HFDatasetTask)

__all__ = [
    "DOMAINS",
    "KINDS",
    "ArithmeticTask",
    "BigBenchTask",
    "Example",
    "HFDatasetTask",
    "HumanEvalTask",
    "JsonlTask",
    "RecordTask",
    "Task",
    "available_tasks",
    "get_task",
    "normalize_answer",
    "register_task",
    "unregister_task",
]
