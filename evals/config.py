"""Validated settings of a fault-injection campaign or an A/B evaluation.

A campaign runs one arm (a set of mitigations, or none) over a model, a task, a fault
description, a seed and a trial count. An A/B evaluation runs several arms over the same
resolved faults. Both use :class:`CampaignConfig`. Settings come from flags or a YAML file; every
field is checked on construction and a bad one raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from guard.errors import ConfigError, unknown_choice

logger = logging.getLogger(__name__)

NO_MITIGATION = "none"
# Shortcut arm that stacks the four mitigations of the product.
ALL_FOUR = "all"
ALL_FOUR_MITIGATIONS = ("mixed_precision", "abft", "dual_first_token", "dynamic_shots")
ARM_SEPARATOR = "+"
# One random exponent bit in the output of a random down projection at the first token: the
# stage and the dimension-reducing layer that propagate errors the most.
DEFAULT_FAULT = {
    "site": {"role": "down_proj"},
    "time": {"stage": "first_token"},
    "corruption": {"field": "exponent"},
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")

# Fields that do not change any trial result: they stay out of the fingerprint, so a run can
# be resumed into the same folder with a different progress setting or output path spelling.
# prefix_reuse is a speed setting: reused-prefix trials give the tokens of fresh ones.
_NOT_FINGERPRINTED = frozenset({"output_dir", "progress", "prefix_reuse"})


def parse_arm(label: str) -> tuple[str, ...]:
    """Split an arm label (``"none"``, ``"abft"``, ``"abft+dual_first_token"``, ``"all"``) into names."""
    text = str(label).strip()
    if not text:
        raise ConfigError("arm='' is empty. Use 'none', a mitigation name or names joined by '+'.")
    if text == NO_MITIGATION:
        return ()
    if text == ALL_FOUR:
        return ALL_FOUR_MITIGATIONS
    names = tuple(part.strip() for part in text.split(ARM_SEPARATOR))
    if any(not name for name in names):
        raise ConfigError(f"arm={label!r} has an empty name between '+' signs. Example: 'abft+dual_first_token'.")
    if len(set(names)) != len(names):
        raise ConfigError(f"arm={label!r} names a mitigation twice. List each mitigation once.")
    return names


def arm_label(names: tuple[str, ...] | list[str]) -> str:
    """Return the canonical label of an arm made of ``names``."""
    return ARM_SEPARATOR.join(names) if names else NO_MITIGATION


@dataclass
class CampaignConfig:
    """Everything that decides the trials of a campaign, plus where and how to run it.

    ``trials`` faulty trials are spread round-robin over the first ``limit`` inputs of the
    task. Each ``generate`` call holds ``batch_size`` rows of one prompt: one fault-free
    reference row and ``batch_size - 1`` trials. ``arms`` lists the mitigation sets to
    compare on identical faults; a plain campaign has one arm. ``prefix_reuse`` starts
    decode-step trials from the golden run's KV cache instead of recomputing the prompt.
    """

    model: str = "smollm2-135m"
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    n_shots: int | None = None
    fault: dict = field(default_factory=lambda: dict(DEFAULT_FAULT))
    trials: int = 64
    limit: int = 8
    seed: int = 0
    arms: list = field(default_factory=lambda: [NO_MITIGATION])
    mitigation_options: dict = field(default_factory=dict)
    batch_size: int = 16
    max_new_tokens: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    output_dir: str = "softguard-runs/campaign"
    progress: bool = True
    prefix_reuse: bool = True

    def __post_init__(self) -> None:
        self._check_scalars()
        self._check_arms()

    def _check_scalars(self) -> None:
        _require_text("model", self.model)
        _require_text("task", self.task)
        _require_mapping("task_options", self.task_options)
        _require_mapping("fault", self.fault)
        _require_mapping("mitigation_options", self.mitigation_options)
        if not self.fault:
            raise ConfigError(
                "fault={} is empty. Give a site, time and corruption, e.g. "
                "{'site': {'role': 'down_proj'}, 'time': {'stage': 'first_token'}}."
            )
        _require_int("trials", self.trials, minimum=1)
        _require_int("limit", self.limit, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        # Two rows at least: the fault-free reference row plus one trial.
        _require_int("batch_size", self.batch_size, minimum=2)
        if self.n_shots is not None:
            _require_int("n_shots", self.n_shots, minimum=0)
        if self.max_new_tokens is not None:
            _require_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if str(self.dtype).lower() not in DTYPE_CHOICES:
            raise ConfigError(unknown_choice("dtype", self.dtype, DTYPE_CHOICES))
        _require_text("device", self.device)
        _require_text("output_dir", self.output_dir)
        if not isinstance(self.progress, bool):
            raise ConfigError(f"progress={self.progress!r} must be true or false.")
        if not isinstance(self.prefix_reuse, bool):
            raise ConfigError(f"prefix_reuse={self.prefix_reuse!r} must be true or false.")

    def _check_arms(self) -> None:
        if isinstance(self.arms, str):
            self.arms = [part.strip() for part in self.arms.split(",")]
        if not isinstance(self.arms, (list, tuple)) or not self.arms:
            raise ConfigError(f"arms={self.arms!r} must be a non-empty list, e.g. ['none', 'abft'].")
        # "all" keeps its short label; other arms take the canonical "a+b" spelling.
        labels = [ALL_FOUR if str(arm).strip() == ALL_FOUR else arm_label(parse_arm(arm)) for arm in self.arms]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"arms={list(self.arms)!r} lists an arm twice. List each arm once.")
        self.arms = labels
        if self.weight_faults:
            logger.debug("weight faults are shared by every batch row, so each trial runs alone")
        for name in self.mitigation_options:
            if not isinstance(self.mitigation_options[name], Mapping):
                raise ConfigError(
                    f"mitigation_options[{name!r}]={self.mitigation_options[name]!r} must be a mapping of "
                    "option names to values."
                )

    # ----- derived views ----------------------------------------------------------------

    @property
    def weight_faults(self) -> bool:
        """Whether the faults hit weights, which every row of a batch shares."""
        site = self.fault.get("site") if isinstance(self.fault, Mapping) else None
        return isinstance(site, Mapping) and site.get("kind") == "weight"

    @property
    def trials_per_batch(self) -> int:
        # A weight fault corrupts every row, so such a trial cannot share a batch.
        return 1 if self.weight_faults else self.batch_size - 1

    def mitigation_names(self) -> list[str]:
        """Return every mitigation name used by any arm, each once, in first-use order."""
        seen: list[str] = []
        for arm in self.arms:
            for name in parse_arm(arm):
                if name not in seen:
                    seen.append(name)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Return a hash of the fields that decide trial results (not output folder or progress)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        text = json.dumps(relevant, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: "CampaignConfig") -> list[str]:
        """Return ``field: mine != theirs`` lines for every fingerprinted field that differs."""
        lines = []
        mine, theirs = self.to_dict(), other.to_dict()
        for key in mine:
            if key in _NOT_FINGERPRINTED:
                continue
            if json.dumps(mine[key], sort_keys=True, default=str) != json.dumps(theirs.get(key), sort_keys=True, default=str):
                lines.append(f"{key}: {theirs.get(key)!r} in the folder, {mine[key]!r} now")
        return lines

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "CampaignConfig":
        """Build a config from a mapping, rejecting unknown keys with close matches."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must be a mapping of settings, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: " + unknown_choice("setting", key, known))
        return cls(**dict(data))


def check_device(device: object, option: str = "--device") -> str:
    """Check that ``device`` names a torch device that exists here; return it unchanged.

    Raises ConfigError for a name torch cannot parse (``gpu``) and for an accelerator this
    machine or this build of torch lacks (``cuda:0`` on a CPU-only build).
    """
    import torch

    text = str(device).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"{option}={text!r} is not a torch device. Use cpu, cuda or cuda:N (N = GPU index)."
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{option}={text!r} asks for CUDA, but this build of torch or this machine has no usable "
                "CUDA GPU. Use --device cpu."
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                f"{option}={text!r} names GPU {parsed.index}, but this machine has {count} "
                f"(indices 0 to {count - 1})."
            )
    elif parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ConfigError(f"{option}={text!r} asks for Apple MPS, which is not available here. Use --device cpu.")
    elif parsed.type != "cpu":
        raise ConfigError(f"{option}={text!r} is not supported. Use cpu, cuda or cuda:N.")
    return text


def load_yaml_settings(path: str | Path) -> dict[str, Any]:
    """Read a YAML settings file into a dict; a missing or malformed file raises ConfigError."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"Cannot read config file {str(file)!r}: {error.strerror or error}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"Config file {str(file)!r} is not valid YAML{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(file)!r} must hold a mapping of settings (key: value), "
            f"got a {type(data).__name__}."
        )
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name}={value!r} must be a non-empty string.")


def _require_mapping(name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}={value!r} must be a mapping (key: value).")


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}.")
    if value < minimum:
        raise ConfigError(f"{name}={value} is too small. Use an integer >= {minimum}.")
