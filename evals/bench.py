"""Overhead and throughput benchmark: ratios from interleaved runs, never absolute seconds.

Three measurements, each repeated ``repeats`` times with the compared variants interleaved
inside every repetition, so slow drift of a shared machine hits all variants alike:

* ``overhead``: protected ``generate`` time over unprotected ``generate`` time on the same
  batch, for each mitigation, ABFT on every linear layer, all four mitigations together and
  an injector armed with no faults. Extra forward passes and extra memory (relative to the
  model's parameter bytes) come with each ratio.
* ``campaign``: campaign trials per second over the fault-free batched ``generate`` rows per
  second of the same prompts at the same batch size (the limit), and over a sequential loop
  of one ``generate`` per trial.
* ``prefix``: decode-step trials with and without reuse of the golden prefix cache, once as
  the model generates and once with end-of-sequence stops turned off (full-length outputs).

Every compared path runs once untimed before the first repetition, so no ratio includes a
cold start. Fewer than 3 repetitions log a warning, and so does a run whose idle injector, a
control that runs the unprotected code, strays more than 1% from 1.00.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from guard.errors import ConfigError, unknown_choice

from evals import provenance, stats

logger = logging.getLogger(__name__)

PARTS = ("overhead", "campaign", "prefix")
# With fewer repetitions, one noisy run can move the median ratio a lot.
MIN_RELIABLE_REPEATS = 3
FEW_REPEATS_WARNING = "ratios from fewer than 3 repeats are unreliable"
# The idle injector adds no hooks, so its ratio times unprotected against unprotected generate.
# When its median or half its IQR is further than this from 1.00, the run's noise exceeds 1%.
NOISE_LIMIT = 0.01
ALL_LINEAR_ABFT = "all_linear_abft"
ALL_FOUR = "all_four"
INJECTOR_IDLE = "injector_idle"
FIRST_TOKEN_FAULT = {
    "site": {"role": "down_proj"},
    "time": {"stage": "first_token"},
    "corruption": {"field": "exponent"},
}


@dataclass
class BenchOptions:
    """Sizes of the benchmark runs (tokens, rows, repetitions)."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    prompt_tokens: int = 100
    new_tokens: int = 32
    repeats: int = 5
    campaign_trials: int = 62
    campaign_batch_size: int = 32
    sequential_trials: int = 4
    prefix_prompt_tokens: int = 200
    prefix_trials: int = 15
    parts: tuple = PARTS
    seed: int = 0
    variants: tuple | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "prompt_tokens", "new_tokens", "repeats", "campaign_trials",
                     "sequential_trials", "prefix_prompt_tokens", "prefix_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)}={value!r} is invalid: give an integer >= 1.")
        if isinstance(self.campaign_batch_size, bool) or not isinstance(self.campaign_batch_size, int) or self.campaign_batch_size < 2:
            raise ConfigError(
                f"--campaign-batch-size={self.campaign_batch_size!r} is invalid: give an integer >= 2 "
                "(one reference row plus at least one trial)."
            )
        if self.repeats < MIN_RELIABLE_REPEATS:
            logger.warning("--repeats=%d: %s; use --repeats 3 or more", self.repeats, FEW_REPEATS_WARNING)
        self.parts = tuple(self.parts)
        for part in self.parts:
            if part not in PARTS:
                raise ConfigError(unknown_choice("--only", part, PARTS))


def _flag(name: str) -> str:
    """Return the command-line flag of a BenchOptions field (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


# ----- inputs -----------------------------------------------------------------------------


def bench_prompts(tokenizer, rows: int, length: int, seed: int) -> torch.Tensor:
    """Return ``[rows, length]`` distinct prompts cut from few-shot arithmetic text (no padding)."""
    from evals.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(n=max(rows, 4) * 4, seed=seed, chat=False)
    examples = list(task.examples())
    text = "\n\n".join(task.build_prompt(example, task.max_shots, None) for example in examples)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    while ids.shape[0] < rows + length:
        ids = torch.cat([ids, ids])
    # Row r starts r tokens later, so rows differ but share the arithmetic vocabulary.
    return torch.stack([ids[row : row + length] for row in range(rows)])


def _generate(model, tokenizer, input_ids: torch.Tensor, new_tokens: int):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )


def _seconds(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def held_tensor_bytes(objects: list, model) -> int:
    """Sum the bytes of tensors and NumPy arrays that mitigation objects hold outside the model's parameters.

    NOTE: an estimate. It walks the objects' attributes (dicts, lists, tuples, dataclasses) and
    counts each tensor storage and each array's memory once; buffers a mitigation keeps
    elsewhere are not seen.
    """
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen_storages: set[int] = set()
    seen_objects: set[int] = set()
    total = 0
    stack = list(objects)
    while stack:
        item = stack.pop()
        if id(item) in seen_objects or isinstance(item, (str, bytes, int, float, bool, type(None))):
            continue
        seen_objects.add(id(item))
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            pointer = storage.data_ptr()
            if pointer not in model_storages and pointer not in seen_storages:
                seen_storages.add(pointer)
                total += storage.nbytes()
            continue
        if isinstance(item, np.ndarray):
            # A view's memory belongs to its base array, counted once by its address.
            owner = item if item.base is None or not isinstance(item.base, np.ndarray) else item.base
            pointer = owner.__array_interface__["data"][0]
            if pointer not in model_storages and pointer not in seen_storages:
                seen_storages.add(pointer)
                total += owner.nbytes
            continue
        if isinstance(item, torch.nn.Module) or callable(item):
            # Modules hold the parameters; functions and compiled kernels hold no activations.
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif isinstance(getattr(item, "__dict__", None), dict):
            stack.extend(vars(item).values())
    return total


# ----- overhead ---------------------------------------------------------------------------


def overhead_variants(available: list[str]) -> dict[str, Callable[[], list]]:
    """Return variant name -> factory of fresh mitigation objects."""
    import mitigations

    variants: dict[str, Callable[[], list]] = {}
    for name in available:
        variants[name] = lambda name=name: [mitigations.get(name)]
    variants[ALL_LINEAR_ABFT] = lambda: [mitigations.get("abft", roles="all_linear")]
    variants[ALL_FOUR] = lambda: [
        mitigations.get(name) for name in ("mixed_precision", "abft", "dual_first_token", "dynamic_shots")
    ]
    return variants


def measure_overhead(model, tokenizer, options: BenchOptions) -> dict[str, Any]:
    """Time each variant against the unprotected model, interleaved per repetition."""
    import guard
    import mitigations

    prompts = bench_prompts(tokenizer, options.batch_size, options.prompt_tokens, options.seed)
    prompts = prompts.to(next(model.parameters()).device)
    factories = overhead_variants(list(mitigations.available()))
    names = list(factories) + [INJECTOR_IDLE]
    if options.variants:
        names = [name for name in names if name in options.variants]
    param_bytes = parameter_bytes(model)

    def unprotected() -> None:
        _generate(model, tokenizer, prompts, options.new_tokens)

    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    detail: dict[str, dict[str, Any]] = {name: {"extra_forward_passes": 0, "extra_memory_bytes": 0} for name in names}
    prefill_pairs: list[tuple[float, float]] = []

    def protected_run(name: str) -> float:
        """Time one generate of variant ``name`` and record its passes, memory and hooks."""
        if name == INJECTOR_IDLE:
            from injectors import Injector

            injector = Injector(model)
            hooks_before = _hook_count(model)
            with injector.armed([]):
                hooks_armed = _hook_count(model)
                seconds = _seconds(unprotected)
            detail[name]["hooks_added"] = hooks_armed - hooks_before
            return seconds
        objects = factories[name]()
        guard.protect(model, mitigations=objects)
        try:
            report = guard.get_report(model)
            report.reset()
            seconds = _seconds(unprotected)
            call = report.last_call
            held = held_tensor_bytes(objects, model)
        finally:
            guard.unprotect(model)
        if call is not None:
            detail[name]["extra_forward_passes"] = int(call.extra_forward_passes)
            detail[name]["extra_memory_bytes"] = max(
                detail[name]["extra_memory_bytes"], int(call.extra_memory_bytes) + held
            )
            detail[name]["detections"] = len(call.detections)
        return seconds

    # Warm-up of every path, untimed: first calls allocate caches and pick kernels, and a
    # protected variant has its own first-call costs (checksums, copies, hooks).
    unprotected()
    for name in names:
        protected_run(name)
    _generate(model, tokenizer, prompts, 1)
    for repetition in range(options.repeats):
        # Rotate the order so no variant always runs first after the previous repetition.
        order = names[repetition % len(names) :] + names[: repetition % len(names)]
        for name in order:
            base = _seconds(unprotected)
            protected = protected_run(name)
            pairs[name].append((protected, base))
        # One prefill alone (a single new token) against a full generate, for the dual
        # first-token bound: its ratio should stay under 1 + prefill / generate.
        prefill = _seconds(lambda: _generate(model, tokenizer, prompts, 1))
        prefill_pairs.append((prefill, _seconds(unprotected)))

    ratios: dict[str, float] = {}
    for name in names:
        spread = stats.ratio_spread(pairs[name])
        ratios[name] = spread.median
        detail[name].update(
            {"ratio": spread.median, "q1": spread.q1, "q3": spread.q3, "n": spread.n,
             "extra_memory_fraction": detail[name]["extra_memory_bytes"] / param_bytes}
        )
    prefill_share = stats.ratio_spread(prefill_pairs)
    return {
        "overhead": ratios,
        "overhead_detail": detail,
        "one_extra_prefill_ratio": 1.0 + prefill_share.median,
        "parameter_bytes": param_bytes,
    }


def noise_warning(detail: dict[str, dict[str, Any]]) -> str | None:
    """Return a warning when the idle injector's ratio shows more noise than :data:`NOISE_LIMIT`, else None."""
    control = detail.get(INJECTOR_IDLE)
    if not control or control.get("hooks_added", 0) != 0:
        return None
    noise = max(abs(control["ratio"] - 1.0), (control["q3"] - control["q1"]) / 2)
    if noise <= NOISE_LIMIT:
        return None
    return (
        f"the idle injector, which adds no hooks, measured {control['ratio']:.3f} "
        f"(IQR {control['q1']:.3f}-{control['q3']:.3f}) against unprotected generate, so ratios "
        f"within {noise:.3f} of a goal are within this run's noise; use more --repeats or a quieter machine"
    )


def _hook_count(model) -> int:
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return count


# ----- campaign throughput ----------------------------------------------------------------


def measure_campaign(model, tokenizer, options: BenchOptions) -> dict[str, Any]:
    """Compare campaign trials/s with the fault-free batched limit and a sequential loop."""
    from evals.campaign import FaultPlanner, encode_prompt, run_batch, run_campaign
    from evals.config import CampaignConfig
    from evals.tasks.arithmetic import ArithmeticTask

    per_batch = options.campaign_batch_size - 1
    inputs = max(1, math.ceil(options.campaign_trials / per_batch))
    task = ArithmeticTask(n=inputs, seed=options.seed)
    max_new_tokens = task.default_max_new_tokens
    prompts = [encode_prompt(tokenizer, task.build_prompt(example, 0, tokenizer)) for example in task.examples()]
    planner = FaultPlanner(model, FIRST_TOKEN_FAULT, options.seed, max_new_tokens)
    workdir = Path(tempfile.mkdtemp(prefix="softguard-bench-"))

    def limit() -> None:
        for prompt in prompts:
            run_batch(model, tokenizer, prompt, [None] * options.campaign_batch_size, max_new_tokens)

    def campaign(repetition: int) -> None:
        config = CampaignConfig(
            model=options.model, task="arithmetic", task_options={"n": inputs, "seed": options.seed},
            fault=FIRST_TOKEN_FAULT, trials=options.campaign_trials, limit=inputs, seed=options.seed,
            batch_size=options.campaign_batch_size, max_new_tokens=max_new_tokens, dtype=options.dtype,
            device=options.device, output_dir=str(workdir / f"run{repetition}"), progress=False,
        )
        run_campaign(config, model=model, tokenizer=tokenizer, task=task, render=False)

    def sequential() -> None:
        # What a per-run injector does: one golden and one faulty generate per trial, batch 1.
        for trial in range(options.sequential_trials):
            prompt = prompts[trial % len(prompts)]
            run_batch(model, tokenizer, prompt, [None], max_new_tokens)
            run_batch(model, tokenizer, prompt, [planner.for_row(trial, prompt.shape[1], 0)], max_new_tokens)

    limit_rows = options.campaign_batch_size * len(prompts)
    campaign_pairs, sequential_pairs = [], []
    try:
        # Warm-up of all three paths, untimed (the campaign one writes to its own folder).
        limit()
        campaign(-1)
        sequential()
        for repetition in range(options.repeats):
            limit_s = _seconds(limit)
            campaign_s = _seconds(lambda: campaign(repetition))
            sequential_s = _seconds(sequential)
            campaign_rate = options.campaign_trials / campaign_s
            campaign_pairs.append((campaign_rate, limit_rows / limit_s))
            sequential_pairs.append((campaign_rate, options.sequential_trials / sequential_s))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    versus_limit = stats.ratio_spread(campaign_pairs)
    versus_sequential = stats.ratio_spread(sequential_pairs)
    return {
        "campaign_vs_limit": versus_limit.median,
        "campaign_vs_sequential": versus_sequential.median,
        "campaign_detail": {
            "vs_limit": versus_limit._asdict(),
            "vs_sequential": versus_sequential._asdict(),
            "inputs": len(prompts),
            "prompt_tokens": [int(prompt.shape[1]) for prompt in prompts],
            "max_new_tokens": max_new_tokens,
            "note": "the limit counts every row of a fault-free batch; a campaign batch spends one "
            "row on the fault-free reference, so the ceiling is (batch_size - 1) / batch_size",
        },
    }


# ----- prefix reuse -----------------------------------------------------------------------


def measure_prefix(model, tokenizer, options: BenchOptions) -> dict[str, Any]:
    """Time a decode-fault campaign with and without golden-prefix reuse, interleaved."""
    from evals.campaign import prefix_reuse_supported, run_campaign
    from evals.config import CampaignConfig
    from evals.tasks.arithmetic import ArithmeticTask

    if not prefix_reuse_supported():
        return {"prefix_reuse_speedup": None, "prefix_reuse_speedup_full_length": None,
                "prefix_detail": {"note": "this transformers has no Cache.crop"}}
    batch_size = min(options.campaign_batch_size, options.prefix_trials + 1)
    # Enough few-shot examples to push one prompt past prefix_prompt_tokens tokens.
    shots = 4
    while True:
        task_options = {"n": 1, "seed": options.seed, "shot_pool_size": shots}
        task = ArithmeticTask(**task_options)
        example = next(iter(task.examples()))
        length = tokenizer(task.build_prompt(example, shots, tokenizer), return_tensors="pt")["input_ids"].shape[1]
        if length >= options.prefix_prompt_tokens or shots >= 256:
            break
        shots *= 2
    trials = 4 * (batch_size - 1)
    fault = {"site": {"role": "down_proj"}, "time": {"stage": "decode"}, "corruption": {"field": "exponent"}}
    workdir = Path(tempfile.mkdtemp(prefix="softguard-bench-prefix-"))

    def campaign(reuse: bool, label: str):
        config = CampaignConfig(
            model=options.model, task="arithmetic", task_options=task_options, n_shots=shots, fault=fault,
            trials=trials, limit=1, seed=options.seed, batch_size=batch_size, max_new_tokens=options.new_tokens,
            dtype=options.dtype, device=options.device, output_dir=str(workdir / f"{reuse}-{label}"),
            progress=False, prefix_reuse=reuse,
        )
        return run_campaign(config, model=model, tokenizer=tokenizer, task=task, render=False)

    def speedup(name: str) -> tuple[stats.RatioSpread, bool]:
        """Return the spread of (time without reuse / time with reuse) and whether tokens agreed."""
        pairs = []
        same_tokens = True
        # Warm-up of both paths, untimed.
        campaign(True, f"{name}-warm-up")
        campaign(False, f"{name}-warm-up")
        for repetition in range(options.repeats):
            order = (True, False) if repetition % 2 else (False, True)
            timings = {}
            results = {}
            for reuse in order:
                started = time.perf_counter()
                results[reuse] = campaign(reuse, f"{name}-{repetition}")
                timings[reuse] = time.perf_counter() - started
            pairs.append((timings[False], timings[True]))
            tokens = {reuse: [r["tokens"] for r in result.records] for reuse, result in results.items()}
            same_tokens = same_tokens and tokens[True] == tokens[False]
        return stats.ratio_spread(pairs), same_tokens

    try:
        spread, same_tokens = speedup("as-generated")
        # Short outputs end the golden run early, and batches whose faults all come later need
        # no forward. Without end-of-sequence stops every batch runs all its decode steps, which
        # shows what reuse saves on long outputs.
        with _without_eos_stop(model):
            full_spread, full_same_tokens = speedup("full-length")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "prefix_reuse_speedup": spread.median,
        "prefix_reuse_speedup_full_length": full_spread.median,
        "prefix_detail": {**spread._asdict(), "trials": trials, "batch_size": batch_size,
                          "prompt_tokens": int(length), "new_tokens": options.new_tokens,
                          "tokens_equal_without_reuse": same_tokens},
        "prefix_full_length_detail": {**full_spread._asdict(), "tokens_equal_without_reuse": full_same_tokens},
    }


@contextlib.contextmanager
def _without_eos_stop(model) -> Iterator[None]:
    """Let ``generate`` run to ``max_new_tokens`` by clearing the model's end-of-sequence ids."""
    generation_config = model.generation_config
    saved = generation_config.eos_token_id
    generation_config.eos_token_id = None
    try:
        yield
    finally:
        generation_config.eos_token_id = saved


# ----- driver -----------------------------------------------------------------------------


def run_bench(options: BenchOptions, model=None, tokenizer=None) -> dict[str, Any]:
    """Run the selected parts and return one JSON-ready dict (keys listed in the module docstring)."""
    if model is None or tokenizer is None:
        from evals.models import load_model

        model, tokenizer = load_model(options.model, dtype=options.dtype, device=options.device)
    results: dict[str, Any] = {
        "campaign_vs_limit": None,
        "campaign_vs_sequential": None,
        "prefix_reuse_speedup": None,
        "prefix_reuse_speedup_full_length": None,
        "overhead": {},
        "sizes": {
            "model": options.model,
            "dtype": options.dtype,
            "overhead_batch_size": options.batch_size,
            "overhead_prompt_tokens": options.prompt_tokens,
            "new_tokens": options.new_tokens,
            "repeats": options.repeats,
            "campaign_trials": options.campaign_trials,
            "campaign_batch_size": options.campaign_batch_size,
            "sequential_trials": options.sequential_trials,
            "prefix_prompt_tokens": options.prefix_prompt_tokens,
        },
        "machine": {**provenance.machine_info(), "device": provenance.device_info(options.device),
                    "versions": provenance.library_versions()},
        "warnings": [FEW_REPEATS_WARNING] if options.repeats < MIN_RELIABLE_REPEATS else [],
    }
    if "overhead" in options.parts:
        results.update(measure_overhead(model, tokenizer, options))
        warning = noise_warning(results["overhead_detail"])
        if warning is not None:
            logger.warning("%s", warning)
            results["warnings"].append(warning)
    if "campaign" in options.parts:
        results.update(measure_campaign(model, tokenizer, options))
    if "prefix" in options.parts:
        results.update(measure_prefix(model, tokenizer, options))
    return results


def format_results(results: dict[str, Any]) -> str:
    """Return a short text table of the ratios with their interquartile ranges."""
    labels = {
        "campaign_vs_limit": "campaign / fault-free batched rows (throughput ratio)",
        "campaign_vs_sequential": "campaign / sequential loop (throughput ratio)",
        "prefix_reuse_speedup": "prefix reuse speed-up (time ratio)",
        "prefix_reuse_speedup_full_length": "prefix reuse speed-up, no early stop (time ratio)",
    }
    lines = [f"note: {warning}" for warning in results.get("warnings", [])]
    for key, label in labels.items():
        value = results.get(key)
        lines.append(f"{label:<56} {'n/a' if value is None else f'{value:.2f}x'}")
    detail = results.get("overhead_detail", {})
    if detail:
        lines.append("")
        lines.append(
            f"{'overhead variant':<22} {'time ratio (median)':>20} {'time ratio IQR':>15} "
            f"{'extra passes/call':>18} {'extra memory (% of param bytes)':>32}"
        )
        for name, item in detail.items():
            memory = f"{100 * item.get('extra_memory_fraction', 0.0):.2f}%"
            spread = f"{item['q1']:.3f}-{item['q3']:.3f}"
            lines.append(
                f"{name:<22} {item['ratio']:>19.3f}x {spread:>15} "
                f"{item.get('extra_forward_passes', 0):>18} {memory:>32}"
            )
        if "one_extra_prefill_ratio" in results:
            lines.append(f"{'one extra prefill':<22} {results['one_extra_prefill_ratio']:>19.3f}x")
        lines.append("time ratio = protected generate time / unprotected generate time on the same batch")
    return "\n".join(lines) + "\n"
