"""Fault-injection campaigns: batched trials, resumable and shardable, over one or more arms.

Trial ``t`` runs on input ``t % limit``. The trials of one input are cut into even batches
of at most ``batch_size - 1``. Each ``generate`` call repeats one prompt over the batch rows.
Row 0 is fault-free: this reference row gives the golden tokens under the exact batch
composition of the trials. Every other row carries one trial. Every arm (a set of mitigations, or
none) runs the same batches with the same resolved faults, arm after arm inside each batch,
so timing ratios between arms come from interleaved runs.

Faults are resolved per trial from ``(seed, trial id)``, so they do not depend on the batch
size, the arm or how the work is split across processes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch

from guard.errors import ConfigError, NotFoundError, SoftguardError, close_matches

from evals import provenance
from evals.config import CampaignConfig, check_device, parse_arm
from evals.store import ResultStore, record_key

logger = logging.getLogger(__name__)


# ----- planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """One batch of trials that share a prompt: ``trial_ids[i]`` runs in batch row ``i + 1``."""

    index: int
    input_index: int
    trial_ids: tuple[int, ...]


def plan_units(n_inputs: int, trials: int, trials_per_batch: int) -> list[WorkUnit]:
    """Spread ``trials`` round-robin over ``n_inputs`` inputs and cut each input's trials into even batches."""
    if n_inputs < 1:
        raise ConfigError("The task produced no inputs. Check the task options or raise --limit.")
    per_input: list[list[int]] = [[] for _ in range(n_inputs)]
    for trial in range(trials):
        per_input[trial % n_inputs].append(trial)
    units: list[WorkUnit] = []
    for input_index, ids in enumerate(per_input):
        # Even batches: 32 trials at 31 per batch become 16 + 16, not 31 + 1.
        batches = -(-len(ids) // trials_per_batch)
        start = 0
        for batch in range(batches):
            size = len(ids) // batches + (1 if batch < len(ids) % batches else 0)
            units.append(WorkUnit(len(units), input_index, tuple(ids[start : start + size])))
            start += size
    return units


def order_by_step(units: list[WorkUnit], step_of: Callable[[int, int], int]) -> list[WorkUnit]:
    """Regroup each input's trials so batches hold trials of nearby fault steps.

    ``step_of(input_index, trial)`` is the forward that the trial's fault hits. A batch resumed
    from the golden prefix starts at its earliest fault step, so sorting trials by step lets
    later batches skip decode steps as well as the prefill. A batch whose steps all come after
    the golden run's end needs no forward at all. Unit sizes and indices stay as
    planned, and the order is deterministic, so resumed and sharded runs agree.
    """
    by_input: dict[int, list[WorkUnit]] = {}
    for unit in units:
        by_input.setdefault(unit.input_index, []).append(unit)
    regrouped: dict[int, WorkUnit] = {}
    for input_index, input_units in by_input.items():
        trials = sorted(
            (trial for unit in input_units for trial in unit.trial_ids),
            key=lambda trial: (step_of(input_index, trial), trial),
        )
        start = 0
        for unit in input_units:
            size = len(unit.trial_ids)
            regrouped[unit.index] = WorkUnit(unit.index, input_index, tuple(trials[start : start + size]))
            start += size
    return [regrouped[unit.index] for unit in units]


def derive_seed(seed: int, *parts: object) -> int:
    """Return a 63-bit seed derived from ``seed`` and ``parts``, stable across runs and machines."""
    text = ":".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def shard_units(units: list[WorkUnit], rank: int, world_size: int) -> list[WorkUnit]:
    """Return the units that process ``rank`` of ``world_size`` runs (round-robin, so loads even out)."""
    return units[rank::world_size]


# ----- prompts ----------------------------------------------------------------------------


@dataclass
class PreparedInput:
    """One task input with its encoded prompt."""

    index: int
    input_id: str
    example: Any
    prompt: str
    prompt_ids: torch.Tensor  # [1, prompt_length]

    @property
    def prompt_length(self) -> int:
        return int(self.prompt_ids.shape[1])


def encode_prompt(tokenizer, prompt: Any) -> torch.Tensor:
    """Return ``[1, length]`` token ids for a prompt given as text or as token ids."""
    if torch.is_tensor(prompt):
        return prompt.reshape(1, -1).long()
    if isinstance(prompt, (list, tuple)) and all(isinstance(item, int) for item in prompt):
        return torch.tensor([list(prompt)], dtype=torch.long)
    encoded = tokenizer(str(prompt), return_tensors="pt")
    return encoded["input_ids"]


def example_id(example: Any, index: int) -> str:
    for attribute in ("id", "input_id", "task_id", "name"):
        value = getattr(example, attribute, None)
        if value is None and isinstance(example, dict):
            value = example.get(attribute)
        if value is not None:
            return str(value)
    return str(index)


def prepare_inputs(task, tokenizer, limit: int, n_shots: int | None) -> list[PreparedInput]:
    """Return the first ``limit`` inputs of ``task`` with their prompts built and encoded."""
    prepared = []
    for index, example in enumerate(itertools.islice(task.examples(), limit)):
        prompt = build_prompt(task, example, n_shots, tokenizer)
        prepared.append(PreparedInput(index, example_id(example, index), example, prompt, encode_prompt(tokenizer, prompt)))
    return prepared


def build_prompt(task, example, n_shots: int | None, tokenizer):
    if n_shots is None:
        n_shots = getattr(task, "default_shots", getattr(task, "default_n_shots", 0))
    return task.build_prompt(example, n_shots, tokenizer)


# ----- one batch --------------------------------------------------------------------------


@dataclass
class RowResult:
    """Output of one batch row: generated tokens, text, fault records and detections."""

    tokens: list[int]
    text: str
    nonfinite: bool = False
    error: str | None = None
    fired: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)


@dataclass
class BatchResult:
    rows: list[RowResult]
    seconds: float
    forward_passes: int
    extra_forward_passes: int = 0
    retried_rows: int = 0


def strip_generation(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Cut generated tokens at the first end-of-sequence token (kept out) and drop trailing padding."""
    kept = []
    for token in tokens:
        if token in eos_ids:
            break
        kept.append(token)
    while kept and pad_id is not None and kept[-1] == pad_id and pad_id not in eos_ids:
        kept.pop()
    return kept


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class _NonFiniteWatch:
    """Forward hook on the model that flags batch rows whose logits hold NaN or Inf."""

    def __init__(self, model, rows: int):
        self.flags = torch.zeros(rows, dtype=torch.bool)
        self._handle = model.register_forward_hook(self._check)

    def _check(self, _module, _args, output) -> None:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output:
            logits = output[0]
        if not torch.is_tensor(logits) or logits.dim() < 2 or logits.shape[0] != self.flags.shape[0]:
            return
        bad = ~torch.isfinite(logits.detach()).reshape(logits.shape[0], -1).all(dim=1)
        self.flags |= bad.cpu()

    def remove(self) -> None:
        self._handle.remove()


def run_batch(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    faults_by_row: list[Any | None],
    max_new_tokens: int,
    injector_factory: Callable[[Any], Any] | None = None,
) -> BatchResult:
    """Generate greedily for ``len(faults_by_row)`` copies of one prompt, row ``r`` carrying its fault.

    A row's fault must already name that row. Rows with None run fault-free. NaN or Inf
    logits mark a row as non-finite; an exception marks every row with the error.
    """
    rows = len(faults_by_row)
    device = _model_device(model)
    input_ids = prompt_ids.to(device).repeat(rows, 1)  # [rows, prompt_length]
    attention_mask = torch.ones_like(input_ids)
    faults = [fault for fault in faults_by_row if fault is not None]
    watch = _NonFiniteWatch(model, rows)
    passes = _PassCounter(model)
    injector = None
    error: str | None = None
    sequences = None
    started = time.perf_counter()
    try:
        if faults:
            injector = (injector_factory or _default_injector)(model)
            with injector.armed(faults):
                sequences = _greedy_generate(model, tokenizer, input_ids, attention_mask, max_new_tokens)
        else:
            sequences = _greedy_generate(model, tokenizer, input_ids, attention_mask, max_new_tokens)
    except SoftguardError:
        # Bad settings (a fault that does not fit its site, say) are errors, not crashes.
        raise
    except (RuntimeError, ValueError, FloatingPointError, IndexError) as caught:
        # A corrupted value can make generate itself fail (for example an invalid index).
        error = f"{type(caught).__name__}: {caught}"
        logger.debug("generate raised under faults %s", faults, exc_info=True)
    finally:
        seconds = time.perf_counter() - started
        watch.remove()
        passes.remove()

    return _collect_rows(
        model, tokenizer, sequences, input_ids.shape[1], rows, watch.flags, injector, error, seconds, passes.count
    )


def prefix_reuse_supported() -> bool:
    """Whether this transformers version has the Cache methods that prefix reuse needs."""
    try:
        from transformers import DynamicCache
    except ImportError:
        return False
    return all(hasattr(DynamicCache, name) for name in ("crop", "batch_repeat_interleave", "get_seq_length"))


def reusable_step(faults_by_row: list[Any | None]) -> int | None:
    """Return the first forward any fault of the batch touches, when it is a decode step; else None.

    Forwards before that step are fault-free in every row, so they equal the golden run.
    Persistent weight faults act from forward 0 and are never reusable.
    """
    faults = [fault for fault in faults_by_row if fault is not None]
    if not faults or any(getattr(fault, "persistent", False) for fault in faults):
        return None
    first = min(int(fault.forward) for fault in faults)
    return first if first >= 1 else None


def run_batch_from_prefix(
    model,
    tokenizer,
    prompt_ids: torch.Tensor,
    faults_by_row: list[Any | None],
    max_new_tokens: int,
    golden: GoldenRun | None = None,
) -> BatchResult:
    """Run a batch like :func:`run_batch`, but start at the first faulty decode step.

    ``golden`` is the fault-free run of the same prompt with the same number of rows (see
    :func:`golden_prefix`). Its cache, cropped to the forwards before the step, replaces those
    forwards. The golden run must have the trial batch's row count: CPU matrix kernels round
    differently for different batch sizes, so a batch-of-one cache would differ from the
    batch's own in the last bits. When every row of the golden run finished before the step,
    a run from scratch would stop before any fault fires, so the golden rows are the result.
    Falls back to a full run when no fault sits in a decode step.
    """
    import copy

    from guard.stages import StageTracker

    step = reusable_step(faults_by_row)
    rows = len(faults_by_row)
    if step is None:
        return run_batch(model, tokenizer, prompt_ids, faults_by_row, max_new_tokens)
    device = _model_device(model)
    prompt_ids = prompt_ids.to(device)
    prompt_length = prompt_ids.shape[1]
    started = time.perf_counter()
    if golden is None:
        golden = golden_prefix(model, tokenizer, prompt_ids, rows, max_new_tokens)
    sequences = golden.sequences
    if sequences.shape[0] != rows:
        return run_batch(model, tokenizer, prompt_ids, faults_by_row, max_new_tokens)
    # The golden run made forwards 0..generated-1. A batch whose faults all come later is
    # fault-free until then in every row, so it stops where the golden run stopped.
    generated = sequences.shape[1] - prompt_length
    if step >= generated:
        seconds = time.perf_counter() - started
        return _collect_rows(model, tokenizer, sequences, prompt_length, rows, golden.nonfinite, None, None, seconds, 0)

    # The cache before forward k contains the prompt and generated tokens 1..k-1.
    cache = copy.deepcopy(golden.cache)
    surplus = cache.get_seq_length() - (prompt_length + step - 1)
    if surplus > 0:
        cache.crop(-surplus)
    input_ids = sequences[:, : prompt_length + step]  # [rows, prompt_length + step]
    generate_kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        cache_keyword(model): cache,
        "max_new_tokens": max_new_tokens - step,
    }
    faults = [fault for fault in faults_by_row if fault is not None]
    tracker = StageTracker.attach(model)
    watch = _NonFiniteWatch(model, rows)
    passes = _PassCounter(model)
    injector = _default_injector(model)
    error = None
    output = None
    try:
        with injector.armed(faults):
            tracker.start_sequence(step)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            with torch.inference_mode():
                output = model.generate(**generate_kwargs, do_sample=False, pad_token_id=pad_id)
    except SoftguardError:
        # Bad settings (a fault that does not fit its site, say) are errors, not crashes.
        raise
    except (RuntimeError, ValueError, FloatingPointError, IndexError) as caught:
        error = f"{type(caught).__name__}: {caught}"
    finally:
        seconds = time.perf_counter() - started
        watch.remove()
        passes.remove()
        tracker.detach()
    return _collect_rows(model, tokenizer, output, prompt_length, rows, watch.flags, injector, error, seconds, passes.count)


def cache_keyword(model) -> str:
    from evals.prefix import cache_keyword as keyword

    return keyword(model)


class GoldenRun(NamedTuple):
    """The fault-free run of one prompt at a batch's row count, whose prefix trials reuse."""

    sequences: torch.Tensor  # [rows, prompt_length + generated]
    cache: Any  # the KV cache after the last forward
    nonfinite: torch.Tensor  # [rows] bool: rows whose logits held NaN or Inf


def golden_prefix(model, tokenizer, prompt_ids: torch.Tensor, rows: int, max_new_tokens: int) -> GoldenRun:
    """Run ``rows`` fault-free copies of the prompt and return their sequences and KV cache."""
    from evals.prefix import golden_cache_of

    input_ids = prompt_ids.to(_model_device(model)).repeat(rows, 1)
    watch = _NonFiniteWatch(model, rows)
    try:
        output = _greedy_generate(
            model, tokenizer, input_ids, torch.ones_like(input_ids), max_new_tokens, return_dict_in_generate=True
        )
    finally:
        watch.remove()
    return GoldenRun(output.sequences, golden_cache_of(output), watch.flags)


def _collect_rows(
    model, tokenizer, sequences, prompt_length, rows, nonfinite, injector, error, seconds, forward_passes
) -> BatchResult:
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    fired_by_row = _fired_by_row(injector)
    results = []
    for row in range(rows):
        if sequences is None:
            results.append(RowResult([], "", nonfinite=bool(nonfinite[row]), error=error))
            continue
        tokens = strip_generation(sequences[row, prompt_length:].tolist(), eos_ids, pad_id)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append(RowResult(tokens, text, nonfinite=bool(nonfinite[row]), fired=fired_by_row.get(row, [])))
    return BatchResult(results, seconds, forward_passes)


def _greedy_generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, **generate_options):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **generate_options,
        )


class _PassCounter:
    """Counts the forward passes of the top-level model (recomputations included)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, _module, _args) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _default_injector(model):
    from injectors import Injector

    return Injector(model)


def _to_dict(item: Any) -> dict:
    if isinstance(item, dict):
        return item
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {key: value for key, value in vars(item).items() if not key.startswith("_")}


def _fired_by_row(injector) -> dict[int, list[dict]]:
    by_row: dict[int, list[dict]] = {}
    if injector is None:
        return by_row
    for fired in getattr(injector, "fired", []) or []:
        record = _jsonable(_to_dict(fired))
        row = record.get("row")
        if row is None and isinstance(record.get("fault"), dict):
            row = record["fault"].get("row")
        by_row.setdefault(int(row or 0), []).append(record)
    return by_row


def _jsonable(value: Any) -> Any:
    """Convert tensors, dtypes and enums inside a record to JSON types."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int)):
        return value.value
    return str(value)


# ----- arms -------------------------------------------------------------------------------


def check_mitigation_names(names: Iterable[str]) -> None:
    """Raise NotFoundError for a mitigation name the registry does not know, with close matches."""
    import mitigations

    available = list(mitigations.available())
    for name in names:
        if name not in available:
            raise NotFoundError(
                f"Unknown mitigation {name!r}.{close_matches(name, available)} "
                f"Available mitigations: {', '.join(sorted(available))}."
            )


def build_mitigations(arm: str, options: dict[str, dict]) -> list:
    """Return fresh mitigation objects for ``arm``, configured from ``options[name]``."""
    import mitigations

    return [mitigations.get(name, **dict(options.get(name, {}))) for name in parse_arm(arm)]


class ProtectedArm:
    """Context manager that protects the model with an arm's mitigations and unprotects it after."""

    def __init__(self, model, arm: str, options: dict[str, dict]):
        self.model = model
        self.arm = arm
        self.options = options
        self.active = bool(parse_arm(arm))
        self.objects: list = []
        self.held_bytes = 0

    def __enter__(self) -> "ProtectedArm":
        if self.active:
            import guard

            self.objects = build_mitigations(self.arm, self.options)
            guard.protect(self.model, mitigations=self.objects)
            from evals.bench import held_tensor_bytes

            # Checksum vectors and other state the mitigations keep between calls.
            self.held_bytes = held_tensor_bytes(self.objects, self.model)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            import guard

            guard.unprotect(self.model)

    def reset_report(self) -> None:
        if self.active:
            import guard

            guard.get_report(self.model).reset()

    def call_reports(self) -> list:
        if not self.active:
            return []
        import guard

        return list(guard.get_report(self.model).calls)

    def dynamic_shots(self):
        for item in self.objects:
            if getattr(item, "name", "") == "dynamic_shots":
                return item
        return None


# ----- faults -----------------------------------------------------------------------------


class FaultPlanner:
    """Resolves the fault of each trial once, from ``(seed, trial id)``, and places it in a batch row."""

    def __init__(self, model, fault: dict, seed: int, max_new_tokens: int):
        from injectors import FaultSpec

        self.model = model
        self.spec = FaultSpec.from_dict(dict(fault))
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self._resolved: dict[int, dict] = {}

    def fault_dict(self, trial: int, prompt_length: int) -> dict:
        """Return the resolved fault of ``trial`` as a dict (row 0; :meth:`for_row` moves it)."""
        if trial not in self._resolved:
            from injectors import resolve_faults

            faults = resolve_faults(
                self.model,
                self.spec,
                seed=derive_seed(self.seed, "fault", trial),
                n=1,
                prompt_length=prompt_length,
                max_new_tokens=self.max_new_tokens,
                batch_size=1,
            )
            if len(faults) != 1:
                raise ConfigError(
                    f"fault={self.spec!r} resolved to {len(faults)} faults for one trial; "
                    "a campaign needs exactly one fault per trial."
                )
            self._resolved[trial] = _jsonable(faults[0].to_dict())
        return dict(self._resolved[trial])

    def for_row(self, trial: int, prompt_length: int, row: int):
        """Return the trial's fault as a Fault object aimed at batch row ``row`` (weight faults have no row)."""
        from injectors import Fault

        fault = Fault.from_dict(self.fault_dict(trial, prompt_length))
        if fault.kind == "weight":
            return fault
        return fault.with_row(row)


# ----- running ----------------------------------------------------------------------------


@dataclass
class CampaignContext:
    """Everything a worker needs to run work units: model, task, inputs and faults."""

    config: CampaignConfig
    model: Any
    tokenizer: Any
    task: Any
    inputs: list[PreparedInput]
    max_new_tokens: int
    planner: FaultPlanner
    # Number of batches per (input index, rows): prefix reuse pays only from two batches on.
    batches_per_shape: dict = field(default_factory=dict)
    _golden: dict = field(default_factory=dict)

    def golden_prefix(self, prepared: PreparedInput, rows: int) -> GoldenRun:
        """Return the golden (sequences, KV cache) of an input at ``rows`` rows; only the latest is kept."""
        key = (prepared.index, rows)
        if key not in self._golden:
            self._golden.clear()
            self._golden[key] = golden_prefix(
                self.model, self.tokenizer, prepared.prompt_ids, rows, self.max_new_tokens
            )
        return self._golden[key]


def _detections_by_row(reports: list, rows: int, one_call_per_row: bool = False) -> dict[int, list[dict]]:
    """Group the detections of the guard's call reports by batch row; whole-batch ones go to every row.

    With ``one_call_per_row`` each row ran as its own ``generate`` call, so call i is row i.
    """
    by_row: dict[int, list[dict]] = {row: [] for row in range(rows)}
    for index, report in enumerate(reports):
        for detection in report.detections:
            record = _jsonable(_to_dict(detection))
            record.pop("time", None)
            if one_call_per_row:
                targets = [index]
            elif detection.row is None:
                targets = range(rows)
            else:
                targets = [int(detection.row)]
            for row in targets:
                if row in by_row:
                    by_row[row].append(record)
    return by_row


def _score(task, example, text: str) -> float:
    return float(task.score(example, text))


def run_unit(context: CampaignContext, unit: WorkUnit, arm: str) -> list[dict[str, Any]]:
    """Run one batch of ``unit`` under ``arm`` and return its reference and trial records."""
    config = context.config
    prepared = context.inputs[unit.input_index]
    if getattr(context.task, "kind", "generative") == "multiple_choice":
        return run_choice_unit(context, unit, arm)
    faults = [None] + [
        context.planner.for_row(trial, prepared.prompt_length, row)
        for row, trial in enumerate(unit.trial_ids, start=1)
    ]
    with ProtectedArm(context.model, arm, config.mitigation_options) as protected:
        protected.reset_report()
        if config.weight_faults:
            batch = _run_rows_alone(context, prepared, faults)
        elif _use_prefix(context, prepared, faults):
            batch = run_batch_from_prefix(
                context.model, context.tokenizer, prepared.prompt_ids, faults, context.max_new_tokens,
                golden=context.golden_prefix(prepared, len(faults)),
            )
        else:
            batch = run_batch(context.model, context.tokenizer, prepared.prompt_ids, faults, context.max_new_tokens)
        first_calls = protected.call_reports()
        detections = _detections_by_row(first_calls, len(faults), one_call_per_row=config.weight_faults)
        retries = _retry_with_other_shots(context, prepared, protected, batch, detections)
        reports = protected.call_reports()
    extra_passes = batch.extra_forward_passes + sum(int(getattr(report, "extra_forward_passes", 0)) for report in reports)
    extra_memory = max([int(getattr(report, "extra_memory_bytes", 0)) for report in reports] or [0])
    extra_memory += protected.held_bytes

    reference_row = batch.rows[0]
    reference_score = _row_score(context, prepared, reference_row)
    records: list[dict[str, Any]] = [
        {
            "kind": "reference",
            "arm": arm,
            "unit": unit.index,
            "input": unit.input_index,
            "input_id": prepared.input_id,
            "tokens": reference_row.tokens,
            "text": reference_row.text,
            "score": reference_score,
            "nonfinite": reference_row.nonfinite,
            "error": reference_row.error,
            "detections": detections[0],
            "rows": len(faults),
            "shots": retries[0],
            "seconds": batch.seconds,
            "forward_passes": batch.forward_passes,
            "extra_forward_passes": extra_passes,
            "extra_memory_bytes": extra_memory,
        }
    ]
    for row, trial in enumerate(unit.trial_ids, start=1):
        result = batch.rows[row]
        score = _row_score(context, prepared, result)
        outcome = classify(reference_row, result, reference_score, score, detections[row])
        records.append(
            {
                "kind": "trial",
                "arm": arm,
                "trial": trial,
                "unit": unit.index,
                "input": unit.input_index,
                "input_id": prepared.input_id,
                "row": row,
                "fault": _jsonable(faults[row].to_dict()),
                "fired": result.fired,
                "tokens": result.tokens,
                "text": result.text,
                "score": score,
                "golden_score": reference_score,
                "nonfinite": result.nonfinite,
                "error": result.error,
                "detections": detections[row],
                "shots": retries[row],
                "outcome": outcome,
            }
        )
    return records


def run_choice_unit(context: CampaignContext, unit: WorkUnit, arm: str) -> list[dict[str, Any]]:
    """Run the trials of a multiple-choice input: one log-likelihood forward per trial.

    All choices of one trial go through one forward, one choice per batch row, so a trial's
    fault sits in one row (a choice drawn from the trial's seed). The reference is the
    fault-free forward under the same arm. ``tokens`` contains the index of the picked choice.
    """
    # NOTE: rows are right-padded to the longest choice, so a first_token fault (the last
    # position of the forward) lands on padding in rows whose choice is shorter.
    from evals.scoring import score_multiple_choice

    config = context.config
    prepared = context.inputs[unit.input_index]
    n_choices = len(getattr(prepared.example, "choices", None) or [])
    shots = config.n_shots if config.n_shots is not None else 0

    def score(faults: list) -> tuple[Any, str | None, list[dict]]:
        injector = _default_injector(context.model) if faults else None
        try:
            if injector is None:
                return score_multiple_choice(context.model, context.tokenizer, context.task, prepared.example, shots), None, []
            with injector.armed(faults):
                result = score_multiple_choice(context.model, context.tokenizer, context.task, prepared.example, shots)
            return result, None, _fired_by_row(injector).get(faults[0].row or 0, [])
        except SoftguardError:
            raise
        except (RuntimeError, ValueError, FloatingPointError, IndexError) as caught:
            return None, f"{type(caught).__name__}: {caught}", []

    records: list[dict[str, Any]] = []
    with ProtectedArm(context.model, arm, config.mitigation_options) as protected:
        protected.reset_report()
        started = time.perf_counter()
        reference, reference_error, _ = score([])
        reference_detections = _detections_by_row(protected.call_reports(), 1, one_call_per_row=True)[0]
        reference_choice = [reference.choice] if reference is not None else []
        reference_score = reference.score if reference is not None else 0.0
        reference_row = RowResult(reference_choice, "", nonfinite=bool(reference and reference.nonfinite), error=reference_error)
        for trial in unit.trial_ids:
            protected.reset_report()
            row = derive_seed(config.seed, "choice-row", trial) % max(1, n_choices)
            fault = context.planner.for_row(trial, prepared.prompt_length, row)
            result, error, fired = score([fault])
            detections = [d for ds in _detections_by_row(protected.call_reports(), n_choices or 1).values() for d in ds]
            crashed = error is not None or bool(result and result.nonfinite)
            trial_row = RowResult([result.choice] if result is not None else [], "", nonfinite=crashed, error=error, fired=fired)
            trial_score = 0.0 if crashed or result is None else float(result.score)
            records.append(
                {
                    "kind": "trial", "arm": arm, "trial": trial, "unit": unit.index, "input": unit.input_index,
                    "input_id": prepared.input_id, "row": row, "fault": _jsonable(fault.to_dict()), "fired": fired,
                    "tokens": trial_row.tokens, "text": "", "score": trial_score, "golden_score": reference_score,
                    "logliks": _jsonable(result.logliks) if result is not None else None,
                    "nonfinite": crashed, "error": error, "detections": _dedupe(detections), "shots": [shots],
                    "outcome": classify(reference_row, trial_row, reference_score, trial_score, _dedupe(detections)),
                }
            )
        seconds = time.perf_counter() - started
    records.insert(0, {
        "kind": "reference", "arm": arm, "unit": unit.index, "input": unit.input_index, "input_id": prepared.input_id,
        "tokens": reference_choice, "text": "", "score": reference_score, "nonfinite": reference_row.nonfinite,
        "error": reference_error, "detections": reference_detections, "rows": n_choices, "shots": [shots],
        "seconds": seconds, "forward_passes": 1 + len(unit.trial_ids), "extra_forward_passes": 0, "extra_memory_bytes": 0,
    })
    return records


def _dedupe(detections: list[dict]) -> list[dict]:
    """Drop repeats of whole-batch detections that were copied to every row."""
    unique, seen = [], set()
    for detection in detections:
        key = json.dumps(detection, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            unique.append(detection)
    return unique


def _all_arms_unprotected(config) -> bool:
    # NOTE: only unprotected arms reuse the prefix. Mitigations act on forward 0 (dual
    # first-token) or rerun generate with its inputs (dynamic shots), which a pre-filled
    # cache would break, and every arm of an A/B run must do the same work for fair timing.
    return not any(parse_arm(name) for name in config.arms)


def _fault_step(context: CampaignContext, input_index: int, trial: int) -> int:
    """Return the decode step a trial's fault resumes at, or 0 when it cannot reuse a prefix."""
    fault = context.planner.for_row(trial, context.inputs[input_index].prompt_length, 0)
    return reusable_step([fault]) or 0


def _use_prefix(context: CampaignContext, prepared: PreparedInput, faults: list) -> bool:
    if not context.config.prefix_reuse or not _all_arms_unprotected(context.config):
        return False
    if context.batches_per_shape.get((prepared.index, len(faults)), 0) < 2:
        return False
    return prefix_reuse_supported() and reusable_step(faults) is not None


def _shot_counts(task) -> list[int]:
    return list(range(int(getattr(task, "max_shots", 0)) + 1))


def _next_shots(current: int, counts: list[int]) -> int:
    """Return the next few-shot count after ``current``: one more if the pool allows, else one fewer."""
    larger = [count for count in counts if count > current]
    if larger:
        return larger[0]
    smaller = [count for count in counts if count < current]
    return smaller[-1] if smaller else current


def _retry_with_other_shots(
    context: CampaignContext,
    prepared: PreparedInput,
    protected: "ProtectedArm",
    batch: BatchResult,
    detections: dict[int, list[dict]],
) -> dict[int, list[int]]:
    """Drive dynamic shots at the prompt level: rerun suspicious rows with another shot count.

    A row is suspicious when its completion fails the task's format check, its logits were
    non-finite or generate failed. Detections of other mitigations already triggered the
    guard-level rerun inside ``generate``. Reruns carry no fault, because a transient fault
    does not recur, and run as one batch of the new prompt. Return the shot counts each row
    used (one entry per attempt); rows are updated in place.
    """
    config = context.config
    base = config.n_shots if config.n_shots is not None else 0
    used = {row: [base] for row in range(len(batch.rows))}
    shots_mitigation = protected.dynamic_shots()
    if shots_mitigation is None:
        return used
    counts = _shot_counts(context.task)
    validate = getattr(context.task, "validate", None)
    shots = base
    for attempt in range(1, int(shots_mitigation.config.max_retries) + 1):
        suspicious = [
            row
            for row, result in enumerate(batch.rows)
            if result.error is not None
            or result.nonfinite
            or (validate is not None and not validate(result.text))
        ]
        if not suspicious:
            break
        shots = _next_shots(shots, counts)
        prompt = build_prompt(context.task, prepared.example, shots, context.tokenizer)
        prompt_ids = encode_prompt(context.tokenizer, prompt)
        rerun = run_batch(context.model, context.tokenizer, prompt_ids, [None] * len(suspicious), context.max_new_tokens)
        batch.seconds += rerun.seconds
        batch.forward_passes += rerun.forward_passes
        batch.extra_forward_passes += rerun.forward_passes
        for index, row in enumerate(suspicious):
            previous = batch.rows[row]
            fresh = rerun.rows[index]
            fresh.fired = previous.fired
            batch.rows[row] = fresh
            used[row].append(shots)
            detections[row].append(
                {
                    "mitigation": "dynamic_shots",
                    "check": "format",
                    "action": "rerun",
                    "row": row,
                    "attempt": attempt,
                    "detail": f"answer failed the format check; rerun with {shots} shots",
                }
            )
    return used


def _run_rows_alone(context: CampaignContext, prepared: PreparedInput, faults: list) -> BatchResult:
    """Run each row in its own batch of one: a weight fault would otherwise hit every row."""
    rows, seconds, passes = [], 0.0, 0
    for fault in faults:
        single = run_batch(context.model, context.tokenizer, prepared.prompt_ids, [fault], context.max_new_tokens)
        rows.append(single.rows[0])
        seconds += single.seconds
        passes += single.forward_passes
    return BatchResult(rows, seconds, passes)


def _row_score(context: CampaignContext, prepared: PreparedInput, row: RowResult) -> float:
    if row.error is not None or row.nonfinite:
        return 0.0
    return _score(context.task, prepared.example, row.text)


def classify(reference: RowResult, trial: RowResult, reference_score: float, score: float, detections: list[dict]) -> str:
    """Return the outcome class of a trial against the fault-free reference row of its batch."""
    from evals.outcomes import classify_trial

    crashed = trial.error is not None or trial.nonfinite
    outcome = classify_trial(
        golden_tokens=reference.tokens,
        golden_score=reference_score,
        tokens=None if crashed else trial.tokens,
        score=None if crashed else score,
        detected=bool(detections),
        crashed=crashed,
    )
    return str(getattr(outcome, "value", outcome))


# ----- orchestration ----------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place in a run split over several processes."""

    rank: int = 0
    world_size: int = 1
    state: Any = None

    def barrier(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def detect_distributed(device: str) -> Distributed:
    """Join the process group when launched by torchrun or ``accelerate launch``; else run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    from accelerate import PartialState

    state = PartialState(cpu=str(device) == "cpu")
    return Distributed(state.process_index, state.num_processes, state)


@dataclass
class CampaignResult:
    """Result folder and outcome of a run (records and summary only on rank 0)."""

    folder: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    trials_run: int
    trials_skipped: int


def resolve_task(config: CampaignConfig):
    from evals.tasks import get_task

    return get_task(config.task, **dict(config.task_options))


def run_campaign(
    config: CampaignConfig,
    *,
    kind: str = "campaign",
    model=None,
    tokenizer=None,
    task=None,
    distributed: Distributed | None = None,
    render: bool = True,
) -> CampaignResult:
    """Run (or resume) every trial of ``config`` and write the result folder.

    ``model``/``tokenizer``/``task`` may be passed in (tests, notebooks); otherwise they are
    loaded from the config. With several processes, each runs its share of the batches into
    its own shard file. Rank 0 then merges the shards and writes the summary and plots.
    """
    from evals import report

    # Before anything is written: a bad device must not leave a config.json behind.
    check_device(config.device, option="device")
    dist = distributed or detect_distributed(config.device)
    check_mitigation_names(config.mitigation_names())
    if task is None:
        task = resolve_task(config)
    store = ResultStore(config.output_dir, dist.rank, dist.world_size)
    if dist.rank == 0:
        store.open(config, kind, provenance.collect(config.device))
    dist.barrier()
    if dist.rank != 0:
        store.open(config, kind)

    if model is None or tokenizer is None:
        from evals.models import load_model

        device = config.device
        if dist.world_size > 1 and str(device).startswith("cuda") and dist.state is not None:
            device = str(dist.state.device)
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=device)

    context = _build_context(config, model, tokenizer, task)
    units = plan_units(len(context.inputs), config.trials, config.trials_per_batch)
    # The grouping must not depend on prefix_reuse itself, so runs with and without it agree.
    if _all_arms_unprotected(config):
        units = order_by_step(units, lambda index, trial: _fault_step(context, index, trial))
    mine = shard_units(units, dist.rank, dist.world_size)
    context.batches_per_shape = dict(Counter((unit.input_index, len(unit.trial_ids) + 1) for unit in mine))
    done = store.done_keys()
    store.prepare_append()

    run = skipped = 0
    if len(config.arms) > 1 and mine:
        _warm_up(context)
    progress = _progress(len(mine) * len(config.arms), config, dist)
    try:
        for unit in mine:
            # Rotate which arm runs first, so no arm always pays for cold caches after a switch.
            shift = unit.index % len(config.arms)
            for arm in config.arms[shift:] + config.arms[:shift]:
                keys = _unit_keys(unit, arm)
                if keys <= done:
                    skipped += len(unit.trial_ids)
                else:
                    records = run_unit(context, unit, arm)
                    fresh = [record for record in records if record_key(record) not in done]
                    store.append(fresh)
                    # A batch with a lost record (torn or unreadable line) runs again. Its new
                    # trials count as run and its kept ones as already recorded, so the two
                    # counts add up to the trials in the table.
                    new_trials = sum(1 for record in fresh if record["kind"] == "trial")
                    run += new_trials
                    skipped += len(unit.trial_ids) - new_trials
                if progress is not None:
                    progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    logger.info("rank %d ran %d trials and skipped %d already recorded", dist.rank, run, skipped)

    dist.barrier()
    if dist.rank != 0:
        return CampaignResult(store.folder, [], None, run, skipped)
    records = store.merge(order=config.arms)
    summary = report.summarize(records, config)
    if render:
        report.write_outputs(store.folder, summary, records)
    return CampaignResult(store.folder, records, summary, run, skipped)


def _warm_up(context: CampaignContext) -> None:
    """Run one untimed fault-free batch, so the first timed arm does not pay for first-call setup."""
    prepared = context.inputs[0]
    run_batch(context.model, context.tokenizer, prepared.prompt_ids, [None, None], context.max_new_tokens)


def _unit_keys(unit: WorkUnit, arm: str) -> set[str]:
    keys = {record_key({"kind": "reference", "arm": arm, "unit": unit.index})}
    keys.update(record_key({"kind": "trial", "arm": arm, "trial": trial}) for trial in unit.trial_ids)
    return keys


def _build_context(config: CampaignConfig, model, tokenizer, task) -> CampaignContext:
    max_new_tokens = config.max_new_tokens or int(getattr(task, "default_max_new_tokens", 32))
    inputs = prepare_inputs(task, tokenizer, config.limit, config.n_shots)
    planner = FaultPlanner(model, config.fault, config.seed, max_new_tokens)
    return CampaignContext(config, model, tokenizer, task, inputs, max_new_tokens, planner)


def _progress(total: int, config: CampaignConfig, dist: Distributed):
    """Return a tqdm bar over (batch, arm) pairs, or None when progress is off."""
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    label = "batches x arms" if dist.world_size == 1 else f"batches x arms (rank {dist.rank})"
    return tqdm(total=total, desc=label, unit="batch", position=dist.rank, leave=True)
