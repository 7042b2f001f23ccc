"""Tasks built from records (dicts): JSONL files and local Hugging Face datasets."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from guard.errors import ConfigError, NotFoundError, unknown_choice
from evals.tasks.base import DOMAINS, Example, Task, as_int, first_line, stable_seed

logger = logging.getLogger(__name__)

INPUT_FIELDS = ("input", "prompt", "question")
TARGET_FIELDS = ("target", "answer", "output")
CORRECT_FIELDS = ("correct", "label")
KINDS = ("auto", "generative", "multiple_choice")


class RecordTask(Task):
    """A task whose examples come from records with configurable field names.

    ``input_field`` and ``target_field`` default to the first of ``input``/``prompt``/
    ``question`` and ``target``/``answer``/``output`` present in a record. A record is
    multiple choice when it has ``choices_field`` (a list of strings); its correct choices
    come from ``correct_field`` (an index or a list of indices, default field ``correct`` or
    ``label``) or from a target equal to one choice. ``answer_regex`` (optional) extracts
    the answer from a completion; without it the first non-empty line is the answer.
    """

    default_max_new_tokens = 32

    def _configure(
        self,
        *,
        name: str,
        input_field: str | None,
        target_field: str | None,
        choices_field: str,
        correct_field: str | None,
        id_field: str,
        kind: str,
        domain: str,
        answer_regex: str | None,
        max_new_tokens: int | str | None,
    ) -> None:
        self.name = name
        if kind not in KINDS:
            raise ConfigError(unknown_choice("kind", kind, KINDS))
        if domain not in DOMAINS:
            raise ConfigError(unknown_choice("domain", domain, DOMAINS))
        self.requested_kind = kind
        self.domain = domain
        self.input_field = input_field
        self.target_field = target_field
        self.choices_field = choices_field
        self.correct_field = correct_field
        self.id_field = id_field
        self.answer_regex = None
        if answer_regex:
            try:
                self.answer_regex = re.compile(answer_regex)
            except re.error as error:
                raise ConfigError(f"answer_regex={answer_regex!r} is not a valid regular expression ({error}).") from None
        if max_new_tokens is not None:
            self.default_max_new_tokens = as_int("max_new_tokens", max_new_tokens, minimum=1)

    @staticmethod
    def _pick(record: dict, explicit: str | None, defaults: tuple[str, ...]) -> str | None:
        if explicit is not None:
            return explicit if explicit in record else None
        for key in defaults:
            if key in record:
                return key
        return None

    def _record_to_example(self, record: Any, where: str, fallback_id: str) -> Example:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: the record is not a JSON object.")
        input_key = self._pick(record, self.input_field, INPUT_FIELDS)
        if input_key is None or not isinstance(record[input_key], str):
            wanted = self.input_field or " or ".join(INPUT_FIELDS)
            raise ConfigError(
                f"{where}: field {wanted!r} is missing or not a string. Set input_field to the "
                f"field that holds the prompt (fields present: {', '.join(map(str, record))})."
            )
        target_key = self._pick(record, self.target_field, TARGET_FIELDS)
        target = record.get(target_key) if target_key else None
        if target is not None:
            if isinstance(target, (int, float)) and not isinstance(target, bool):
                target = str(target)
            elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
                target = list(target)
            elif not isinstance(target, str):
                raise ConfigError(f"{where}: field {target_key!r} must be a string or a list of strings.")

        choices = correct = None
        if self.choices_field in record:
            choices = record[self.choices_field]
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise ConfigError(f"{where}: field {self.choices_field!r} must be a non-empty list of strings.")
            correct = self._correct_indices(record, choices, target, where)

        record_id = record.get(self.id_field, fallback_id)
        return Example(
            id=str(record_id),
            input=record[input_key],
            target=target,
            choices=choices,
            correct=correct,
            metadata={"where": where},
        )

    def _correct_indices(self, record: dict, choices: list[str], target: Any, where: str) -> list[int]:
        key = self._pick(record, self.correct_field, CORRECT_FIELDS)
        if key is not None:
            value = record[key]
            indices = value if isinstance(value, list) else [value]
            if not indices or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(choices) for i in indices
            ):
                raise ConfigError(
                    f"{where}: field {key!r}={value!r} must be an index or a list of indices "
                    f"into the {len(choices)} choices (0 to {len(choices) - 1})."
                )
            return sorted(set(indices))
        targets = [target] if isinstance(target, str) else list(target or [])
        indices = [i for i, choice in enumerate(choices) if choice in targets]
        if not indices:
            raise ConfigError(
                f"{where}: multiple-choice record has no correct choice. Add a 'correct' index "
                "or a target equal to one of the choices."
            )
        return indices

    def _finish(self, examples: list[Example], shot_pool_size: int | str | None, limit: int | str | None,
                source: str) -> None:
        if not examples:
            raise ConfigError(f"{source} contains no records.")
        multiple_choice = [e.choices is not None for e in examples]
        kind = self.requested_kind
        if kind == "auto":
            kind = "multiple_choice" if all(multiple_choice) else "generative"
        if kind == "multiple_choice" and not all(multiple_choice):
            index = multiple_choice.index(False)
            raise ConfigError(
                f"{examples[index].metadata['where']}: kind='multiple_choice' but the record has no "
                f"{self.choices_field!r} list."
            )
        if kind == "generative":
            for example in examples:
                if not example.targets:
                    raise ConfigError(
                        f"{example.metadata['where']}: no target field "
                        f"({self.target_field or ' or '.join(TARGET_FIELDS)}). Set target_field."
                    )
        self.kind = kind
        seen: dict[str, str] = {}
        for example in examples:
            if example.id in seen:
                raise ConfigError(
                    f"{example.metadata['where']}: id {example.id!r} repeats {seen[example.id]}. "
                    "Ids must be unique."
                )
            seen[example.id] = example.metadata["where"]

        if shot_pool_size is None:
            pool_size = min(5, len(examples) // 4)
        else:
            pool_size = as_int("shot_pool_size", shot_pool_size, minimum=0)
        if pool_size >= len(examples):
            raise ConfigError(
                f"shot_pool_size={pool_size} leaves no example to evaluate in {source} "
                f"({len(examples)} records). Pass a smaller value."
            )
        held_out = set(random.Random(stable_seed("record-pool", self.shot_seed)).sample(
            range(len(examples)), pool_size))
        self._shot_pool = [e for i, e in enumerate(examples) if i in held_out]
        evaluated = [e for i, e in enumerate(examples) if i not in held_out]
        if limit is not None:
            evaluated = evaluated[: as_int("limit", limit, minimum=1)]
        self._examples = evaluated
        self.options.update({"shot_pool_size": pool_size, "limit": limit, "kind": kind})
        self._check_setup()

    def extract_answer(self, text: str) -> str:
        if self.answer_regex is not None:
            match = self.answer_regex.search(str(text))
            if match is None:
                return ""
            return (match.group(1) if match.groups() else match.group()).strip()
        return first_line(text)


class JsonlTask(RecordTask):
    """Examples from a JSON Lines file, one JSON object per line (blank lines are skipped)."""

    def __init__(
        self,
        path: str | Path | None = None,
        input_field: str | None = None,
        target_field: str | None = None,
        choices_field: str = "choices",
        correct_field: str | None = None,
        id_field: str = "id",
        kind: str = "auto",
        domain: str = "generic",
        answer_regex: str | None = None,
        max_new_tokens: int | str | None = None,
        limit: int | str | None = None,
        shot_pool_size: int | str | None = None,
        chat: bool | str | None = None,
        shot_seed: int | str = 0,
    ) -> None:
        super().__init__(chat=chat, shot_seed=shot_seed)
        if path is None or str(path) == "":
            raise ConfigError("the jsonl task needs path=... to a .jsonl file (or the name form 'jsonl:PATH').")
        source = Path(path)
        if not source.is_file():
            raise ConfigError(f"path={str(path)!r}: JSONL file not found.")
        self._configure(
            name=f"jsonl:{source.stem}", input_field=input_field, target_field=target_field,
            choices_field=choices_field, correct_field=correct_field, id_field=id_field,
            kind=kind, domain=domain, answer_regex=answer_regex, max_new_tokens=max_new_tokens,
        )
        self.source = str(source)
        self.options = {
            "path": self.source, "input_field": input_field, "target_field": target_field,
            "choices_field": choices_field, "correct_field": correct_field, "id_field": id_field,
            "domain": domain, "answer_regex": answer_regex,
        }
        examples = [
            self._record_to_example(record, where, f"{source.stem}-{line_number}")
            for record, where, line_number in self._read(source)
        ]
        self._finish(examples, shot_pool_size, limit, str(source))

    @staticmethod
    def _read(source: Path) -> Iterator[tuple[Any, str, int]]:
        try:
            handle = source.open(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"cannot read JSONL file {source}: {error.strerror or error}.") from None
        with handle:
            try:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    where = f"{source}:{line_number}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ConfigError(
                            f"{where}: invalid JSON ({error.msg} at column {error.colno})."
                        ) from None
                    yield record, where, line_number
            except UnicodeDecodeError as error:
                raise ConfigError(f"JSONL file {source} is not UTF-8 text ({error.reason}).") from None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise NotFoundError(
            "the hf task needs the Hugging Face 'datasets' package, which is not installed. "
            "Install it with 'pip install datasets', or export the data to JSON Lines and use "
            "the jsonl task."
        ) from None
    return datasets


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class HFDatasetTask(RecordTask):
    """Examples from a local Hugging Face dataset: a folder written by ``save_to_disk``, or a
    local .json/.jsonl/.csv/.parquet file read with ``datasets.load_dataset``.

    NOTE: hub dataset names are rejected, even when the local cache contains them, so that an
    evaluation never reaches the network; pass the path of a saved copy instead.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        split: str = "train",
        input_field: str | None = None,
        target_field: str | None = None,
        choices_field: str = "choices",
        correct_field: str | None = None,
        id_field: str = "id",
        kind: str = "auto",
        domain: str = "generic",
        answer_regex: str | None = None,
        max_new_tokens: int | str | None = None,
        limit: int | str | None = None,
        shot_pool_size: int | str | None = None,
        chat: bool | str | None = None,
        shot_seed: int | str = 0,
    ) -> None:
        super().__init__(chat=chat, shot_seed=shot_seed)
        if path is None or str(path) == "":
            raise ConfigError("the hf task needs path=... to a local dataset folder or data file (or 'hf:PATH').")
        datasets = _import_datasets()
        source = Path(path)
        if not source.exists():
            raise ConfigError(
                f"path={str(path)!r} does not exist locally. The hf task reads only local data: "
                "a folder written by Dataset.save_to_disk or a .json/.jsonl/.csv/.parquet file."
            )
        self._configure(
            name=f"hf:{source.name}", input_field=input_field, target_field=target_field,
            choices_field=choices_field, correct_field=correct_field, id_field=id_field,
            kind=kind, domain=domain, answer_regex=answer_regex, max_new_tokens=max_new_tokens,
        )
        self.source = str(source)
        self.options = {
            "path": self.source, "split": split, "input_field": input_field,
            "target_field": target_field, "choices_field": choices_field,
            "correct_field": correct_field, "id_field": id_field, "domain": domain,
            "answer_regex": answer_regex,
        }
        rows = self._load(datasets, source, split)
        examples = [
            self._record_to_example(dict(row), f"{source} split {split!r} row {index}", f"{source.name}-{index}")
            for index, row in enumerate(rows)
        ]
        self._finish(examples, shot_pool_size, limit, str(source))

    @staticmethod
    def _load(datasets: Any, source: Path, split: str) -> Iterable[Any]:
        if source.is_dir():
            try:
                loaded = datasets.load_from_disk(str(source))
            except (FileNotFoundError, ValueError, OSError) as error:
                raise ConfigError(f"cannot load a saved dataset from {source}: {error}.") from None
            # A DatasetDict (several splits) is a dict subclass; a single Dataset is not.
            if isinstance(loaded, dict):
                splits = list(loaded.keys())
                if split not in splits:
                    raise NotFoundError(unknown_choice("split", split, splits))
                return loaded[split]
            return loaded
        builder = _FILE_BUILDERS.get(source.suffix.lower())
        if builder is None:
            raise ConfigError(unknown_choice("file type", source.suffix, _FILE_BUILDERS))
        try:
            return datasets.load_dataset(builder, data_files={split: str(source)}, split=split)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ConfigError(f"cannot load {source} with datasets ({builder}): {error}.") from None
