"""Seeded resolution of a :class:`FaultSpec` into concrete :class:`Fault` records."""

from __future__ import annotations

import logging
import random

from torch import nn

from guard.errors import ConfigError
from injectors.bits import format_of, parse_value
from injectors.sites import Site, head_dim_of, select_sites
from injectors.spec import KV_TENSORS, CorruptionSpec, Fault, FaultSpec

logger = logging.getLogger(__name__)


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not valid: give an integer >= {minimum}.")
    return value


def resolve_faults(
    model: nn.Module,
    spec: FaultSpec | dict,
    *,
    seed: int,
    n: int = 1,
    prompt_length: int,
    max_new_tokens: int,
    batch_size: int = 1,
) -> list[Fault]:
    """Turn ``spec`` into ``n`` concrete faults, drawing every open choice from ``seed``.

    The same spec, model layout and seed always give the same faults. A fault whose row is
    not given goes to row ``i % batch_size``, so ``n == batch_size`` puts one trial per row.
    Raises ConfigError when the spec cannot happen in a run of ``prompt_length`` prompt
    positions and ``max_new_tokens`` new tokens (a decode step past the last forward, a
    position beyond the prompt, a row beyond the batch).
    """
    if isinstance(spec, dict):
        spec = FaultSpec.from_dict(spec)
    if not isinstance(spec, FaultSpec):
        raise ConfigError(f"spec must be a FaultSpec or a mapping, got {type(spec).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is not valid: give an integer.")
    _check_count("n", n, 1)
    _check_count("prompt_length", prompt_length, 1)
    _check_count("max_new_tokens", max_new_tokens, 1)
    _check_count("batch_size", batch_size, 1)
    _check_reachable(spec, prompt_length, max_new_tokens, batch_size)

    site_spec = spec.site
    sites = select_sites(
        model,
        role=site_spec.role,
        module=site_spec.module,
        layers=site_spec.layers,
        kind=site_spec.kind,
        param=site_spec.param,
    )
    head_dim = head_dim_of(model)
    rng = random.Random(seed)
    faults = []
    for index in range(n):
        site = sites[rng.randrange(len(sites))]
        faults.append(
            _resolve_one(spec, site, rng, index, prompt_length, max_new_tokens, batch_size, head_dim)
        )
    return faults


def _check_reachable(spec: FaultSpec, prompt_length: int, max_new_tokens: int, batch_size: int) -> None:
    time = spec.time
    last_forward = max_new_tokens - 1
    if time.stage == "decode" and last_forward < 1:
        raise ConfigError(
            f"time.stage='decode' is never reached with max_new_tokens={max_new_tokens}: decode "
            "step k runs only when max_new_tokens >= k + 1."
        )
    if time.step is not None and time.step > last_forward:
        raise ConfigError(
            f"time.step={time.step} is never reached with max_new_tokens={max_new_tokens}: the last "
            f"decode step is {last_forward} (step k produces new token k + 1)."
        )
    if time.stage == "prefill" and prompt_length < 2:
        raise ConfigError(
            f"time.stage='prefill' needs prompt_length >= 2, got {prompt_length}: the only position "
            "of a one-token prompt is the first-token position."
        )
    if time.position is not None and time.position >= prompt_length - 1:
        raise ConfigError(
            f"time.position={time.position} is beyond the prefill positions of a prompt of "
            f"prompt_length={prompt_length}: valid positions are 0..{prompt_length - 2} "
            f"(position {prompt_length - 1} is stage 'first_token')."
        )
    if time.row is not None and time.row >= batch_size:
        raise ConfigError(
            f"time.row={time.row} is beyond the batch of batch_size={batch_size}: valid rows are "
            f"0..{batch_size - 1}."
        )
    if spec.site.kind == "weight" and time.row is not None:
        raise ConfigError("time.row does not apply to weight faults: every row of the batch shares the weights.")


def _resolve_one(
    spec: FaultSpec,
    site: Site,
    rng: random.Random,
    index: int,
    prompt_length: int,
    max_new_tokens: int,
    batch_size: int,
    head_dim: int | None,
) -> Fault:
    time, site_spec, corruption = spec.time, spec.site, spec.corruption

    step = None
    if time.stage == "decode":
        step = time.step if time.step is not None else rng.randint(1, max_new_tokens - 1)
        forward = step
        position = prompt_length + step - 1
    elif time.stage == "first_token":
        forward = 0
        position = prompt_length - 1
    else:
        forward = 0
        # NOTE: positions are sampled below prompt_length; a shorter row of a padded batch
        # skips a position beyond its own prompt (Injector.skipped gives the reason).
        position = time.position if time.position is not None else rng.randrange(prompt_length - 1)

    row = None
    if site.kind != "weight":
        row = time.row if time.row is not None else index % batch_size

    correlated, axis = corruption.correlated, corruption.axis
    positions: tuple[int, ...] = ()
    tensor = head = channel = None
    if site.kind == "kv_cache":
        kv_heads, kv_head_dim = site.shape
        tensor = site_spec.tensor or KV_TENSORS[rng.randrange(2)]
        head = _pick("site.head", site_spec.head, kv_heads, rng)
        channel = _pick("site.channel", site_spec.channel, kv_head_dim, rng)
        elements = _neighbours_kv(head, channel, correlated, axis, kv_heads, kv_head_dim)
    else:
        stride = _stride(site, axis, head_dim)
        elements = _neighbours(site_spec.element, site.numel, correlated, stride, rng, axis)

    if axis == "column" and correlated > 1 and site.kind != "weight":
        # Along a column, a computation or KV-cache fault spans consecutive token positions of
        # one pass, which only the prompt pass has.
        if forward != 0 or position + correlated > prompt_length:
            raise ConfigError(
                f"corruption.correlated={correlated} along axis='column' needs {correlated} consecutive "
                f"positions of the prompt pass from position {position}, but the prompt has "
                f"{prompt_length} positions and stage={time.stage!r}. Use axis='row' or a prefill position."
            )
        positions = tuple(range(position, position + correlated))

    bits = _pick_bits(corruption, site, rng)
    return Fault(
        kind=site.kind,
        module=site.name,
        role=site.role,
        layer=site.layer,
        forward=forward,
        stage=time.stage,
        step=step,
        row=row,
        position=None if site.kind == "weight" else position,
        elements=tuple(elements),
        bits=tuple(bits),
        mode=corruption.mode,
        value=None if corruption.value is None else parse_value(corruption.value),
        stuck_at=corruption.stuck_at,
        param=site.param,
        persistent=site_spec.persistent,
        tensor=tensor,
        head=head,
        channel=channel,
        positions=positions,
    )


def _pick(name: str, requested: int | None, size: int, rng: random.Random) -> int:
    if requested is None:
        return rng.randrange(size)
    if requested >= size:
        raise ConfigError(f"{name}={requested} is out of range: valid values are 0..{size - 1}.")
    return requested


def _stride(site: Site, axis: str, head_dim: int | None) -> int:
    if axis == "row" or (axis == "column" and site.kind != "weight"):
        return 1
    last = site.shape[-1] if site.shape else 1
    if axis == "column":
        # Neighbours down a column of a weight matrix are one row length apart.
        return last
    if head_dim is None:
        raise ConfigError("corruption.axis='head' needs a model config with num_attention_heads and hidden_size.")
    if site.kind == "weight":
        if len(site.shape) < 2 or site.shape[0] % head_dim:
            raise ConfigError(
                f"corruption.axis='head' needs a projection weight whose rows split into heads of "
                f"{head_dim}; {site.name}.{site.param} has shape {site.shape}."
            )
        return head_dim * last
    if site.numel % head_dim:
        raise ConfigError(
            f"corruption.axis='head' needs an output that splits into heads of {head_dim}; "
            f"{site.name} has {site.numel} values per token."
        )
    return head_dim


def _neighbours(requested: int | None, numel: int, count: int, stride: int, rng: random.Random, axis: str) -> list[int]:
    # Along a column of a computation output the neighbours are positions, not elements.
    spread = 0 if stride == 1 and axis == "column" else (count - 1) * stride
    if spread >= numel:
        raise ConfigError(
            f"corruption.correlated={count} along axis={axis!r} does not fit a target of {numel} values."
        )
    if requested is None:
        start = rng.randrange(numel - spread)
    elif requested + spread >= numel:
        raise ConfigError(
            f"site.element={requested} is out of range for {count} correlated values along axis={axis!r}: "
            f"valid starts are 0..{numel - spread - 1}."
        )
    else:
        start = requested
    if spread == 0:
        return [start]
    return [start + j * stride for j in range(count)]


def _neighbours_kv(head: int, channel: int, count: int, axis: str, kv_heads: int, head_dim: int) -> list[int]:
    if axis == "row" and count > 1:
        if channel + count > head_dim:
            raise ConfigError(
                f"corruption.correlated={count} along axis='row' from site.channel={channel} exceeds "
                f"head_dim={head_dim}."
            )
        return [head * head_dim + channel + j for j in range(count)]
    if axis == "head" and count > 1:
        if head + count > kv_heads:
            raise ConfigError(
                f"corruption.correlated={count} along axis='head' from site.head={head} exceeds "
                f"the {kv_heads} KV heads."
            )
        return [(head + j) * head_dim + channel for j in range(count)]
    return [head * head_dim + channel]


def _pick_bits(corruption: CorruptionSpec, site: Site, rng: random.Random) -> list[int]:
    if corruption.mode == "set":
        return []
    fmt = format_of(site.dtype)
    candidates = fmt.field_bits(corruption.field) if corruption.field else list(range(fmt.bits))
    where = f"field {corruption.field!r}" if corruption.field else f"the {fmt.bits} bits of {fmt.name}"

    if corruption.burst is not None:
        width = corruption.burst
        if corruption.bit is not None:
            start = corruption.bit
        else:
            if width > len(candidates):
                raise ConfigError(
                    f"corruption.burst={width} does not fit {where} ({len(candidates)} bits)."
                )
            start = candidates[0] + rng.randrange(len(candidates) - width + 1)
        bits = list(range(start, start + width))
        return fmt.check_bits(bits, field="corruption.bit")
    if corruption.k is not None:
        if corruption.k > len(candidates):
            raise ConfigError(f"corruption.k={corruption.k} exceeds {where} ({len(candidates)} bits).")
        return sorted(rng.sample(candidates, corruption.k))
    if corruption.bit is not None:
        return fmt.check_bits([corruption.bit], field="corruption.bit")
    return [candidates[rng.randrange(len(candidates))]]
