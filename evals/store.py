"""Result folders: the config guard, append-only trial files, shards and their merge.

A folder contains ``config.json`` and ``trials.jsonl``. Records are appended one batch at a
time and flushed to disk, so a killed run loses at most the batch in flight; running the
same command again reads the keys already present and skips them. When several processes
share a run, each appends to its own ``trials.rank<N>.jsonl`` and :meth:`ResultStore.merge`
folds the shards into ``trials.jsonl`` (dropping duplicates) in a fixed order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from guard.errors import ConfigError, NotFoundError

from evals.config import CampaignConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TRIALS_FILE = "trials.jsonl"
SHARD_PATTERN = "trials.rank*.jsonl"
FORMAT_VERSION = 1


def record_key(record: dict[str, Any]) -> str:
    """Return the identity of a record: arm, kind and trial id (or batch id for a reference row)."""
    if record.get("kind") == "reference":
        return f"{record['arm']}/reference/{record['unit']}"
    return f"{record['arm']}/trial/{record['trial']}"


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".softguard-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir={str(folder)!r} is not writable ({error.strerror or error}). "
            "Choose a folder you can write to with --output-dir."
        ) from None


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete records of a JSONL file; a torn last line (killed writer) is skipped."""
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n"):
                logger.warning("Ignoring the incomplete last line %d of %s", number, path)
                return
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                logger.warning("Ignoring the unreadable line %d of %s", number, path)


def _truncate_torn_tail(path: Path) -> None:
    """Cut a file back to its last newline so that the next append starts a fresh line."""
    if not path.exists():
        return
    with path.open("rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        # Scan backwards in blocks for the last complete line.
        position = size
        while position > 0:
            step = min(4096, position)
            position -= step
            handle.seek(position)
            block = handle.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                handle.truncate(position + cut + 1)
                return
        handle.truncate(0)


class ResultStore:
    """One result folder, opened for a given config by one process of a (possibly sharded) run."""

    def __init__(self, folder: str | Path, rank: int = 0, world_size: int = 1):
        self.folder = Path(folder)
        self.rank = rank
        self.world_size = world_size

    # ----- files ----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def trials_path(self) -> Path:
        return self.folder / TRIALS_FILE

    @property
    def write_path(self) -> Path:
        """The file this process appends to: its own shard when the run has several processes."""
        if self.world_size > 1:
            return self.folder / f"trials.rank{self.rank}.jsonl"
        return self.trials_path

    def shard_paths(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_PATTERN))

    # ----- config guard ---------------------------------------------------------------

    def open(self, config: CampaignConfig, kind: str, provenance: dict[str, Any] | None = None) -> None:
        """Bind the folder to ``config``: write config.json, or check that it matches the one there.

        Raises ConfigError when the folder holds results of another config, or trial files
        without a config.json. A config.json of another config without any trial record is
        replaced (with a warning), so a run that failed before its first batch does not lock
        the folder.
        """
        ensure_writable(self.folder)
        if self.config_path.exists():
            stored = self.read_config()
            previous = CampaignConfig.from_dict(stored["config"], source=str(self.config_path))
            if previous.fingerprint() != config.fingerprint():
                changes = "; ".join(config.differences(previous)) or "settings differ"
                if not self.records():
                    # Only trial records need the old config, and this folder has none.
                    logger.warning(
                        "Replacing the config.json of %s, which has no recorded trials (%s)", self.folder, changes
                    )
                    self.config_path.unlink()
                    return self.open(config, kind, provenance)
                raise ConfigError(
                    f"output_dir={str(self.folder)!r} holds results of a different config ({changes}). "
                    "Use another --output-dir, or rerun with the settings stored in its config.json."
                )
            return
        if self.trials_path.exists() or self.shard_paths():
            raise ConfigError(
                f"output_dir={str(self.folder)!r} holds trial files but no {CONFIG_FILE}, so they "
                "cannot be matched to a config. Use an empty folder."
            )
        if self.rank != 0:
            # Rank 0 writes the config; other ranks only need the folder to exist.
            return
        payload = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "fingerprint": config.fingerprint(),
            "config": config.to_dict(),
            "provenance": provenance or {},
        }
        _write_atomic(self.config_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        """Return the parsed config.json of the folder."""
        if not self.config_path.exists():
            raise NotFoundError(
                f"{str(self.folder)!r} has no {CONFIG_FILE}; it is not a softguard result folder. "
                "Pass the --output-dir of a campaign or ab run."
            )
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"Cannot read {str(self.config_path)!r}: {error}.") from None
        if not isinstance(data, dict) or "config" not in data:
            raise ConfigError(f"{str(self.config_path)!r} has no 'config' entry; the folder is damaged.")
        return data

    # ----- records --------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Return every complete record from trials.jsonl and the shards, first copy of each key."""
        seen: dict[str, dict[str, Any]] = {}
        for path in [self.trials_path, *self.shard_paths()]:
            if not path.exists():
                continue
            for record in _read_records(path):
                seen.setdefault(record_key(record), record)
        return list(seen.values())

    def done_keys(self) -> set[str]:
        return {record_key(record) for record in self.records()}

    def prepare_append(self) -> None:
        """Drop a torn last line left by a killed writer from this process's file."""
        _truncate_torn_tail(self.write_path)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records as JSON lines with one write, then flush them to disk."""
        text = "".join(json.dumps(record, sort_keys=True, allow_nan=True) + "\n" for record in records)
        if not text:
            return
        with self.write_path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self, order: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Fold the shards into trials.jsonl in a fixed order and remove them; return the records.

        The order is: arms as listed in ``order`` (others after, by name), then reference
        rows by batch, then trials by id, so one process and several give the same file.
        """
        records = self.records()
        ranking = {arm: index for index, arm in enumerate(order or [])}

        def sort_key(record: dict[str, Any]) -> tuple:
            arm = record.get("arm", "")
            is_trial = record.get("kind") != "reference"
            number = record.get("trial") if is_trial else record.get("unit")
            return (ranking.get(arm, len(ranking)), arm, is_trial, int(number or 0))

        records.sort(key=sort_key)
        shards = self.shard_paths()
        text = "".join(json.dumps(record, sort_keys=True, allow_nan=True) + "\n" for record in records)
        _write_atomic(self.trials_path, text)
        for shard in shards:
            shard.unlink()
        return records


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
