"""Injection sites of a causal LM: module outputs, parameters and KV-cache layers, with roles.

A *role* names what a module computes (``q_proj``, ``down_proj``, ``router`` ...) so that one
fault description works across architectures. Known families map roles by module-name globs.
An unknown architecture uses the union of those globs and gives its other linear modules the
role ``linear``. It also logs one warning that lists them, so callers can select by ``module`` glob.

Output shapes come from one probe forward of two tokens, recorded with temporary hooks.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from guard.errors import ConfigError, NotFoundError, close_matches, unknown_choice

logger = logging.getLogger(__name__)

KINDS = ("computation", "weight", "kv_cache")

ROLES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "attention",
    "activation",
    "norm",
    "embedding",
    "lm_head",
    "router",
    "expert",
    "shared_expert",
    "kv_cache",
    "linear",
)

# Ordered (glob on the full module name, role) pairs; the first match wins.
_DECODER_ROLES = [
    ("*.self_attn.q_proj", "q_proj"),
    ("*.self_attn.k_proj", "k_proj"),
    ("*.self_attn.v_proj", "v_proj"),
    ("*.self_attn.o_proj", "o_proj"),
    ("*.self_attn", "attention"),
    ("*.shared_expert.gate_proj", "gate_proj"),
    ("*.shared_expert.up_proj", "up_proj"),
    ("*.shared_expert.down_proj", "down_proj"),
    ("*.shared_expert.act_fn", "activation"),
    ("*.shared_expert_gate", "router"),
    ("*.shared_expert", "shared_expert"),
    ("*.mlp.gate_proj", "gate_proj"),
    ("*.mlp.up_proj", "up_proj"),
    ("*.mlp.down_proj", "down_proj"),
    ("*.mlp.act_fn", "activation"),
    ("*.mlp.gate", "router"),
    ("*.block_sparse_moe.gate", "router"),
    ("*.mlp.experts", "expert"),
    ("*.block_sparse_moe.experts", "expert"),
    ("*norm", "norm"),
    ("*.embed_tokens", "embedding"),
    ("lm_head", "lm_head"),
]

_GPT2_ROLES = [
    ("*.attn.c_attn", "qkv_proj"),
    ("*.attn.c_proj", "o_proj"),
    ("*.attn", "attention"),
    ("*.mlp.c_fc", "up_proj"),
    ("*.mlp.c_proj", "down_proj"),
    ("*.mlp.act", "activation"),
    ("*.ln_*", "norm"),
    ("*.wte", "embedding"),
    ("*.wpe", "embedding"),
    ("lm_head", "lm_head"),
]

ARCHITECTURE_ROLES: dict[str, list[tuple[str, str]]] = {
    "llama": _DECODER_ROLES,
    "mistral": _DECODER_ROLES,
    "qwen2": _DECODER_ROLES,
    "gemma3_text": _DECODER_ROLES,
    "gemma3": _DECODER_ROLES,
    "mixtral": _DECODER_ROLES,
    "qwen2_moe": _DECODER_ROLES,
    "gpt2": _GPT2_ROLES,
}

_FALLBACK_ROLES = _DECODER_ROLES + [pattern for pattern in _GPT2_ROLES if pattern not in _DECODER_ROLES]

# Activations inside fused expert modules run once per selected expert on a token subset,
# so their outputs cannot be addressed by batch row and position.
_EXCLUDED = ["*.experts.*"]

_LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Site:
    """One injectable place of a model.

    ``kind`` is ``computation`` (a module output), ``weight`` (a parameter) or ``kv_cache``
    (the keys and values of one attention layer). ``shape`` is the parameter shape for
    weights, the per-token output shape for computations (batch and sequence dimensions
    removed), and ``(kv_heads, head_dim)`` for a KV-cache layer. ``output_index`` picks the
    tensor inside a tuple output.
    """

    name: str
    role: str
    layer: int | None
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str | None = None
    output_index: int | None = None

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "role": self.role,
            "layer": self.layer,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "param": self.param,
        }


def layer_of(name: str) -> int | None:
    """Return the transformer block index in a module name such as ``model.layers.3.mlp``."""
    match = _LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "") or "")


_WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def role_table(model: nn.Module) -> list[tuple[str, str]]:
    """Return the (glob, role) table of the model's family, warning once for unknown families."""
    family = model_type(model)
    table = ARCHITECTURE_ROLES.get(family)
    if table is not None:
        return table
    if model not in _WARNED:
        _WARNED.add(model)
        linear = [name for name, module in model.named_modules() if _is_linear(module)]
        listing = ", ".join(linear[:40]) + (f" ... ({len(linear)} in all)" if len(linear) > 40 else "")
        logger.warning(
            "Architecture %r has no role table; roles are guessed from module names. "
            "Linear modules found: %s. Select sites by module glob if a role is missing.",
            family or type(model).__name__,
            listing,
        )
    return _FALLBACK_ROLES


def _is_linear(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def role_of(name: str, table: Sequence[tuple[str, str]]) -> str | None:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in _EXCLUDED):
        return None
    # The leading dot lets "*.embed_tokens" also match a top-level "embed_tokens".
    dotted = "." + name
    for pattern, role in table:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(dotted, pattern):
            return role
    return None


def _kv_geometry(model: nn.Module) -> tuple[int, int] | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if heads is None or hidden is None:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(kv_heads), int(head_dim)


def head_dim_of(model: nn.Module) -> int | None:
    geometry = _kv_geometry(model)
    return geometry[1] if geometry else None


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    for parameter in model.parameters():
        return parameter
    return None


def _probe_output_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, list[tuple[int, ...]]]:
    """Run a two-token forward and record the per-token shape of each tensor each module returns."""
    wanted = set(names)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    handles = []
    batch, seq = 1, 2

    def make_hook(name: str):
        def hook(module, args, output):
            if name in shapes:
                return
            outputs = output if isinstance(output, tuple) else (output,)
            per_token = []
            for item in outputs:
                if not torch.is_tensor(item):
                    per_token.append(())
                elif item.dim() >= 3 and item.shape[0] == batch and item.shape[1] == seq:
                    per_token.append(tuple(item.shape[2:]))
                elif item.dim() >= 2 and item.shape[0] == batch * seq:
                    per_token.append(tuple(item.shape[1:]))
                else:
                    per_token.append(())
            shapes[name] = per_token

        return hook

    try:
        for name, module in model.named_modules():
            if name in wanted:
                handles.append(module.register_forward_hook(make_hook(name)))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        device = embeddings.weight.device if embeddings is not None else _first_parameter(model).device
        tokens = torch.ones(batch, seq, dtype=torch.long, device=device)
        # NOTE: a stage tracker attached at this point counts the probe as a prompt pass, so
        # list sites before protecting the model.
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


_SITE_CACHE: "weakref.WeakKeyDictionary[nn.Module, list[Site]]" = weakref.WeakKeyDictionary()


def list_sites(model: nn.Module) -> list[Site]:
    """Return every injectable site of ``model``: module outputs, parameters and KV-cache layers.

    The result is cached per model object; a model whose modules change needs a new object.
    """
    cached = _SITE_CACHE.get(model)
    if cached is not None:
        return list(cached)

    table = role_table(model)
    roles = {}
    for name, module in model.named_modules():
        if not name:
            continue
        role = role_of(name, table)
        if role is None and table is _FALLBACK_ROLES and _is_linear(module):
            # Without a role table, every linear layer stays reachable by module glob.
            role = "linear"
        if role is not None:
            roles[name] = role

    probed = _probe_output_shapes(model, roles)
    modules = dict(model.named_modules())
    sites: list[Site] = []
    for name, role in roles.items():
        module = modules[name]
        layer = layer_of(name)
        outputs = probed.get(name)
        if outputs:
            index = _output_index(role, outputs)
            if index is not None:
                sites.append(
                    Site(
                        name=name,
                        role=role,
                        layer=layer,
                        kind="computation",
                        shape=outputs[index],
                        dtype=_dtype_of(module, model),
                        output_index=index if len(outputs) > 1 else None,
                    )
                )
        # NOTE: tied parameters (lm_head and embed_tokens in SmolLM2) appear once per module
        # but share storage, so a fault in either corrupts both.
        for param_name, parameter in module.named_parameters(recurse=False):
            if not torch.is_floating_point(parameter):
                continue
            sites.append(
                Site(
                    name=name,
                    role=role,
                    layer=layer,
                    kind="weight",
                    shape=tuple(parameter.shape),
                    dtype=parameter.dtype,
                    param=param_name,
                )
            )

    geometry = _kv_geometry(model)
    attention_layers = sorted({s.layer for s in sites if s.role == "attention" and s.layer is not None})
    if geometry is not None:
        dtype = _dtype_of(model, model)
        for layer in attention_layers:
            sites.append(
                Site(
                    name=f"kv_cache.layers.{layer}",
                    role="kv_cache",
                    layer=layer,
                    kind="kv_cache",
                    shape=geometry,
                    dtype=dtype,
                )
            )
    _SITE_CACHE[model] = sites
    return list(sites)


def _output_index(role: str, outputs: list[tuple[int, ...]]) -> int | None:
    """Pick the tensor of a (possibly tuple) output that a fault corrupts, or None."""
    if role == "router" and len(outputs) == 3 and outputs[1]:
        # Top-k routers return (logits, routing weights, expert indices) and have already
        # consumed the logits, so the routing weights are the value a fault can still change.
        # NOTE: this corrupts the mixing weights of the chosen experts, not the expert choice.
        return 1
    return 0 if outputs and outputs[0] else None


def _dtype_of(module: nn.Module, model: nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        if torch.is_floating_point(parameter):
            return parameter.dtype
    for parameter in model.parameters():
        if torch.is_floating_point(parameter):
            return parameter.dtype
    return torch.float32


def _layer_list(layers) -> list[int] | None:
    if layers is None or layers == "all":
        return None
    if isinstance(layers, bool):
        raise ConfigError(f"layers={layers!r} is not valid: give an int, a list of ints or 'all'.")
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, (list, tuple, range)) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in layers
    ):
        return list(layers)
    raise ConfigError(f"layers={layers!r} is not valid: give an int, a list of ints or 'all'.")


def num_layers(model: nn.Module) -> int | None:
    indices = [layer_of(name) for name, _ in model.named_modules()]
    indices = [index for index in indices if index is not None]
    return max(indices) + 1 if indices else None


def select_sites(
    model: nn.Module,
    role: str | None = None,
    module: str | None = None,
    layers: int | Sequence[int] | str | None = None,
    kind: str = "computation",
    param: str | None = None,
) -> list[Site]:
    """Return the sites of ``kind`` matching ``role`` and/or the ``module`` glob and ``layers``.

    Raises ConfigError for an unknown kind or role, a layer out of range, or a selection that
    matches nothing, and NotFoundError for a module glob that matches no site.
    """
    if kind not in KINDS:
        raise ConfigError(unknown_choice("kind", kind, KINDS))
    sites = [site for site in list_sites(model) if site.kind == kind]
    if role is None and module is None and kind == "kv_cache":
        role = "kv_cache"
    if role is None and module is None:
        raise ConfigError(
            f"site selection for kind={kind!r} needs a role or a module glob. "
            f"Roles of this model: {', '.join(sorted({s.role for s in sites}))}."
        )

    if role is not None:
        present = sorted({site.role for site in sites})
        if role not in present:
            hint = close_matches(role, present)
            known = "" if role in ROLES else " It is not a known role."
            raise ConfigError(
                f"role={role!r} has no {kind} site in this {model_type(model) or 'model'}.{known}{hint} "
                f"Roles with {kind} sites: {', '.join(present)}."
            )
        sites = [site for site in sites if site.role == role]

    if module is not None:
        matched = [site for site in sites if fnmatch.fnmatchcase(site.name, module)]
        if not matched:
            examples = sorted({site.name for site in sites})
            listing = ", ".join(examples[:8]) + (" ..." if len(examples) > 8 else "")
            raise NotFoundError(
                f"module={module!r} matches no {kind} site{close_matches(module, examples)} "
                f"Examples of {kind} sites: {listing}. Use a glob such as '*.mlp.down_proj'."
            )
        sites = matched

    if param is not None:
        matched = [site for site in sites if site.param and fnmatch.fnmatchcase(site.param, param)]
        if not matched:
            names = sorted({site.param for site in sites if site.param})
            raise ConfigError(
                f"param={param!r} matches no parameter of the selected modules.{close_matches(param, names)} "
                f"Parameters there: {', '.join(names) or 'none'}."
            )
        sites = matched

    requested = _layer_list(layers)
    if requested is not None:
        count = num_layers(model)
        valid = sorted({site.layer for site in sites if site.layer is not None})
        for layer in requested:
            if count is not None and not 0 <= layer < count:
                raise ConfigError(
                    f"layers={layer} is out of range: this model has layers 0..{count - 1}."
                )
            if layer not in valid:
                raise ConfigError(
                    f"layers={layer} has no selected site: the selection has sites in layers "
                    f"{_ranges(valid) or 'none (the sites are outside the transformer blocks)'}."
                )
        sites = [site for site in sites if site.layer in requested]
    return sites


def _ranges(values: Sequence[int]) -> str:
    if not values:
        return ""
    if list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(str(v) for v in values)


def site_named(model: nn.Module, name: str, kind: str, param: str | None = None) -> Site:
    """Return the site with exactly this name, kind and parameter; NotFoundError otherwise."""
    for site in list_sites(model):
        if site.name == name and site.kind == kind and (kind != "weight" or site.param == param):
            return site
    names = sorted({site.name for site in list_sites(model) if site.kind == kind})
    raise NotFoundError(
        f"module={name!r} is not a {kind} site of this model.{close_matches(name, names)} "
        "List the sites with injectors.list_sites(model)."
    )
