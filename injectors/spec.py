"""Fault descriptions: a possibly random :class:`FaultSpec` and the concrete :class:`Fault`.

A fault has a site (where), a time (when) and a corruption (what happens to the bits).
``FaultSpec`` leaves any of them open (``None`` means "sample it"); ``resolve_faults`` turns
it plus a seed into concrete ``Fault`` records, which are JSON-serialisable and replayable.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from guard.errors import ConfigError, close_matches, unknown_choice
from guard.stages import STAGES
from injectors.bits import FIELDS, parse_value, to_json_float
from injectors.sites import KINDS

logger = logging.getLogger(__name__)

KV_TENSORS = ("key", "value")
AXES = ("row", "column", "head")
MODES = ("flip", "stuck_at", "set")


def _check_int(name: str, value: Any, minimum: int = 0, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not valid: give an integer >= {minimum}.")


def _check_keys(section: str, data: Any, cls) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{section} must be a mapping of field names to values, got {data!r}.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{section}.{key} is not a known field.{close_matches(str(key), names)} "
                f"Valid fields: {', '.join(names)}."
            )
    return data


@dataclass
class SiteSpec:
    """Where a fault lands.

    ``kind`` is ``computation`` (a module output chosen by ``role`` or ``module`` glob),
    ``weight`` (an element of parameter ``param`` of such a module) or ``kv_cache`` (layer,
    ``tensor`` key or value, ``head``, ``channel``). A ``persistent`` weight fault lasts for
    the whole generation instead of one forward. A KV-cache position comes from the time.
    ``element`` is a flat index into the per-token output or the parameter, and ``None``
    samples one.
    """

    kind: str = "computation"
    role: str | None = None
    module: str | None = None
    layers: int | list[int] | str | None = None
    param: str | None = None
    element: int | None = None
    persistent: bool = False
    tensor: str | None = None
    head: int | None = None
    channel: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(unknown_choice("site.kind", self.kind, KINDS))
        if self.kind != "kv_cache" and self.role is None and self.module is None:
            raise ConfigError(
                f"site needs a role or a module glob for kind={self.kind!r}, "
                "for example role='down_proj' or module='*.mlp.down_proj'."
            )

        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"site.layers={self.layers!r} is not valid: give an int, a list of ints or 'all'.")
        if isinstance(self.layers, list):
            for layer in self.layers:
                _check_int("site.layers", layer)
        elif not isinstance(self.layers, str):
            _check_int("site.layers", self.layers)
        _check_int("site.element", self.element)
        _check_int("site.head", self.head)
        _check_int("site.channel", self.channel)

        if not isinstance(self.persistent, bool):
            raise ConfigError(f"site.persistent={self.persistent!r} is not valid: give true or false.")
        if self.persistent and self.kind != "weight":
            raise ConfigError(
                f"site.persistent=True only applies to kind='weight', got kind={self.kind!r}; "
                "KV-cache faults persist anyway and computation faults are transient."
            )

        if self.tensor is not None and self.tensor not in KV_TENSORS:
            raise ConfigError(unknown_choice("site.tensor", self.tensor, KV_TENSORS))
        if self.kind != "kv_cache" and (self.tensor, self.head, self.channel) != (None, None, None):
            raise ConfigError(
                f"site.tensor, site.head and site.channel only apply to kind='kv_cache', got kind={self.kind!r}."
            )
        if self.kind == "kv_cache" and self.element is not None:
            raise ConfigError("site.element does not apply to kind='kv_cache': use site.head and site.channel.")
        if self.param is not None and self.kind != "weight":
            raise ConfigError(f"site.param only applies to kind='weight', got kind={self.kind!r}.")


@dataclass
class TimeSpec:
    """When a fault fires: ``stage`` with a decode ``step`` (None samples one), ``position``, ``row``.

    ``position`` is the token index in the row's own prompt (left padding excluded) for
    prefill, and None samples one.
    The first token is the last prompt position, and a decode step processes one position.
    For a KV-cache fault the stage and step select the pass that writes the corrupted position.
    """

    stage: str = "first_token"
    step: int | None = None
    position: int | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(unknown_choice("time.stage", self.stage, STAGES))
        _check_int("time.step", self.step, minimum=1)
        _check_int("time.position", self.position)
        _check_int("time.row", self.row)
        if self.step is not None and self.stage != "decode":
            raise ConfigError(f"time.step={self.step} needs stage='decode', got stage={self.stage!r}.")
        if self.position is not None and self.stage != "prefill":
            raise ConfigError(
                f"time.position={self.position} only applies to stage='prefill': the first token is "
                "the last prompt position and a decode step processes a single position."
            )


@dataclass
class CorruptionSpec:
    """What happens to the selected value(s).

    ``mode`` is ``flip`` (XOR), ``stuck_at`` (force bits to ``stuck_at`` 0/1) or ``set``
    (write ``value``: a number, ``"nan"``, ``"inf"``, ``"-inf"``). Without ``mode``, a given
    ``stuck_at`` means stuck-at, a given ``value`` means set, and otherwise a flip. Bits are chosen by ``bit``
    (an index), ``field`` (one random bit of sign/exponent/exponent_msb/mantissa), ``k``
    (k distinct random bits, within ``field`` if given) or ``burst`` (b adjacent bits starting
    at ``bit`` or at a random start within ``field``). ``correlated`` repeats the corruption
    on n neighbouring values along ``axis`` (row, column or head).
    """

    mode: str | None = None
    bit: int | None = None
    field: str | None = None
    k: int | None = None
    burst: int | None = None
    correlated: int = 1
    axis: str = "row"
    stuck_at: int | None = None
    value: float | str | None = None

    def __post_init__(self) -> None:
        if self.mode is None:
            # Giving only stuck_at or value is enough to say which corruption is meant.
            if self.stuck_at is not None:
                self.mode = "stuck_at"
            elif self.value is not None:
                self.mode = "set"
            else:
                self.mode = "flip"
        if self.mode not in MODES:
            raise ConfigError(unknown_choice("corruption.mode", self.mode, MODES))
        if isinstance(self.bit, str):
            self._bit_from_text(self.bit)
        if self.field is not None and self.field not in FIELDS:
            raise ConfigError(unknown_choice("corruption.field", self.field, FIELDS))
        _check_int("corruption.bit", self.bit)
        _check_int("corruption.k", self.k, minimum=1)
        _check_int("corruption.burst", self.burst, minimum=1)
        _check_int("corruption.correlated", self.correlated, minimum=1, allow_none=False)
        if self.axis not in AXES:
            raise ConfigError(unknown_choice("corruption.axis", self.axis, AXES))

        if self.k is not None and self.burst is not None:
            raise ConfigError("corruption.k and corruption.burst exclude each other: give one of them.")
        if self.bit is not None and self.field is not None:
            raise ConfigError("corruption.bit and corruption.field exclude each other: give one of them.")
        if self.bit is not None and self.k is not None:
            raise ConfigError("corruption.bit and corruption.k exclude each other: k draws its bits at random.")

        if self.mode == "stuck_at":
            if self.stuck_at not in (0, 1) or isinstance(self.stuck_at, bool):
                raise ConfigError(
                    f"corruption.stuck_at={self.stuck_at!r} is not valid for mode='stuck_at'. Valid choices: 0, 1."
                )
        elif self.stuck_at is not None:
            raise ConfigError(f"corruption.stuck_at needs mode='stuck_at', got mode={self.mode!r}.")
        if self.mode == "set":
            if self.value is None:
                raise ConfigError("corruption.value is missing for mode='set': give a number, 'nan', 'inf' or '-inf'.")
            parse_value(self.value)
            if any(x is not None for x in (self.bit, self.field, self.k, self.burst)):
                raise ConfigError("corruption.bit/field/k/burst do not apply to mode='set', which writes a value.")
        elif self.value is not None:
            raise ConfigError(f"corruption.value needs mode='set', got mode={self.mode!r}.")

    def _bit_from_text(self, text: str) -> None:
        """Accept ``bit: "30"`` as an index and ``bit: exponent_msb`` as the field it names."""
        word = text.strip()
        if word.isdigit():
            self.bit = int(word)
        elif word in FIELDS:
            if self.field is not None and self.field != word:
                raise ConfigError(
                    f"corruption.bit={text!r} names a field, and corruption.field={self.field!r} names "
                    "another: give one of them."
                )
            self.bit, self.field = None, word
        else:
            raise ConfigError(
                unknown_choice("corruption.bit", text, FIELDS) + " Or give a bit index (an integer >= 0)."
            )


@dataclass
class FaultSpec:
    """A possibly random fault description: site, time and corruption."""

    site: SiteSpec = field(default_factory=lambda: SiteSpec(role="down_proj"))
    time: TimeSpec = field(default_factory=TimeSpec)
    corruption: CorruptionSpec = field(default_factory=CorruptionSpec)

    def __post_init__(self) -> None:
        for name, cls in (("site", SiteSpec), ("time", TimeSpec), ("corruption", CorruptionSpec)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"FaultSpec.{name} must be a {cls.__name__}; use FaultSpec.from_dict for mappings.")

    @classmethod
    def from_dict(cls, data: dict) -> "FaultSpec":
        """Build a spec from ``{"site": {...}, "time": {...}, "corruption": {...}}``."""
        data = _check_keys("fault", data, cls)
        try:
            site = SiteSpec(**_check_keys("site", data.get("site", {"role": "down_proj"}), SiteSpec))
            time = TimeSpec(**_check_keys("time", data.get("time", {}), TimeSpec))
            corruption = CorruptionSpec(**_check_keys("corruption", data.get("corruption", {}), CorruptionSpec))
        except TypeError as error:
            raise ConfigError(f"fault description is not valid: {error}.") from None
        return cls(site, time, corruption)

    def to_dict(self) -> dict:
        return {
            "site": dataclasses.asdict(self.site),
            "time": dataclasses.asdict(self.time),
            "corruption": dataclasses.asdict(self.corruption),
        }


@dataclass(frozen=True)
class Fault:
    """One concrete fault, fully resolved and JSON-serialisable.

    ``forward`` is the pass that fires it (0 = prompt pass, k = decode step k) and ``call``
    the module call within that pass. ``position`` is the token index in the row's own sequence,
left padding excluded.
    ``elements`` are flat indices into the target slice: the per-token output vector
    (computation), the flattened parameter (weight) or the ``[kv_heads, head_dim]`` slice of
    one cache position (KV cache). ``positions`` lists more token positions for a fault
    correlated along a column. ``row`` is None for weight faults, which every row shares.
    """

    kind: str
    module: str
    role: str
    layer: int | None
    forward: int
    stage: str
    step: int | None
    row: int | None
    position: int | None
    elements: tuple[int, ...]
    bits: tuple[int, ...]
    mode: str = "flip"
    value: float | None = None
    stuck_at: int | None = None
    call: int = 0
    param: str | None = None
    persistent: bool = False
    tensor: str | None = None
    head: int | None = None
    channel: int | None = None
    positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(unknown_choice("fault.kind", self.kind, KINDS))
        if self.stage not in STAGES:
            raise ConfigError(unknown_choice("fault.stage", self.stage, STAGES))
        if self.mode not in MODES:
            raise ConfigError(unknown_choice("fault.mode", self.mode, MODES))
        if not self.elements:
            raise ConfigError("fault.elements is empty: a fault needs at least one element index.")
        if self.mode != "set" and not self.bits:
            raise ConfigError(f"fault.bits is empty: mode={self.mode!r} needs at least one bit index.")
        if self.kind == "kv_cache" and self.tensor not in KV_TENSORS:
            raise ConfigError(unknown_choice("fault.tensor", self.tensor, KV_TENSORS))
        if self.kind == "weight" and not self.param:
            raise ConfigError("fault.param is missing: a weight fault names its parameter, such as 'weight'.")
        _check_int("fault.forward", self.forward, allow_none=False)
        _check_int("fault.call", self.call, allow_none=False)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["elements"] = list(self.elements)
        data["bits"] = list(self.bits)
        data["positions"] = list(self.positions)
        if self.value is not None:
            data["value"] = to_json_float(self.value)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Fault":
        data = dict(_check_keys("fault", data, cls))
        for key in ("elements", "bits", "positions"):
            if key in data:
                data[key] = tuple(data[key])
        if data.get("value") is not None:
            data["value"] = parse_value(data["value"])
        try:
            return cls(**data)
        except TypeError as error:
            raise ConfigError(f"fault record is not valid: {error}.") from None

    def with_row(self, row: int | None) -> "Fault":
        """Return a copy of this fault moved to batch ``row``."""
        if self.kind == "weight":
            raise ConfigError("a weight fault has no row: every row of the batch shares the weights.")
        return dataclasses.replace(self, row=row)
