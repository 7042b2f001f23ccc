"""Replay one recorded trial of a result folder and compare its tokens with the record.

The trial's whole batch is run again (same prompt, same rows, same resolved faults, same
arm), because a row's tokens are only reproducible under the batch composition they were
generated in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from guard.errors import NotFoundError, close_matches

from evals.campaign import WorkUnit, _build_context, check_mitigation_names, resolve_task, run_unit
from evals.config import CampaignConfig
from evals.store import ResultStore

logger = logging.getLogger(__name__)


def find_trial(records: list[dict[str, Any]], trial: int, arm: str) -> dict[str, Any]:
    """Return the record of ``trial`` in ``arm``; NotFoundError names the valid ids and arms."""
    arms = sorted({record["arm"] for record in records})
    if arm not in arms:
        raise NotFoundError(
            f"arm={arm!r} has no records in this folder.{close_matches(arm, arms)} Arms: {', '.join(arms)}."
        )
    ids = sorted(record["trial"] for record in records if record["kind"] == "trial" and record["arm"] == arm)
    for record in records:
        if record["kind"] == "trial" and record["arm"] == arm and record["trial"] == trial:
            return record
    span = f"{ids[0]}..{ids[-1]}" if ids else "none"
    raise NotFoundError(f"trial={trial} is not recorded for arm {arm!r}. Recorded trial ids: {span}.")


def replay_trial(folder: str | Path, trial: int, arm: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Re-run the batch of one recorded trial; return the fault, both token lists and whether they match."""
    store = ResultStore(folder)
    stored = store.read_config()
    config = CampaignConfig.from_dict(stored["config"], source=str(store.config_path))
    if device is not None:
        config.device = device
    arm = arm or config.arms[0]
    records = store.records()
    record = find_trial(records, trial, arm)
    unit_trials = tuple(
        sorted(r["trial"] for r in records if r["kind"] == "trial" and r["arm"] == arm and r["unit"] == record["unit"])
    )

    check_mitigation_names(config.mitigation_names())
    task = resolve_task(config)
    from evals.models import load_model

    model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    context = _build_context(config, model, tokenizer, task)
    unit = WorkUnit(record["unit"], record["input"], unit_trials)
    replayed = next(r for r in run_unit(context, unit, arm) if r["kind"] == "trial" and r["trial"] == trial)
    return {
        "fault": record["fault"],
        "recorded_tokens": record["tokens"],
        "replayed_tokens": replayed["tokens"],
        "replayed_text": replayed["text"],
        "outcome": replayed["outcome"],
        "match": replayed["tokens"] == record["tokens"],
    }
