"""Site discovery and selection on tiny models of every supported architecture."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from guard.errors import ConfigError, NotFoundError
from injectors.sites import layer_of, list_sites, select_sites
from tests.tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, make_tiny_model

DENSE_ROLES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
COMMON_ROLES = {"attention", "norm", "embedding", "lm_head", "o_proj", "kv_cache"}


@pytest.fixture(scope="module")
def models():
    return {arch: make_tiny_model(arch) for arch in ARCHITECTURES}


def roles_of(sites, kind):
    return {site.role for site in sites if site.kind == kind}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_common_roles_present(models, arch):
    sites = list_sites(models[arch])
    roles = roles_of(sites, "computation") | roles_of(sites, "kv_cache")
    assert COMMON_ROLES <= roles


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3_text"])
def test_dense_projection_roles(models, arch):
    sites = list_sites(models[arch])
    assert DENSE_ROLES <= roles_of(sites, "computation")
    assert "activation" in roles_of(sites, "computation")
    down = select_sites(models[arch], role="down_proj")
    assert [site.layer for site in down] == [0, 1]
    assert all(site.shape == (32,) for site in down)


def test_gpt2_conv1d_roles(models):
    sites = {site.name: site for site in list_sites(models["gpt2"]) if site.kind == "computation"}
    assert sites["transformer.h.0.attn.c_attn"].role == "qkv_proj"
    assert sites["transformer.h.0.attn.c_attn"].shape == (96,)
    assert sites["transformer.h.0.attn.c_proj"].role == "o_proj"
    assert sites["transformer.h.0.mlp.c_fc"].role == "up_proj"
    assert sites["transformer.h.1.mlp.c_proj"].role == "down_proj"
    assert sites["transformer.h.1.mlp.c_proj"].layer == 1
    assert sites["transformer.wte"].role == "embedding"


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_moe_router_and_experts(models, arch):
    model = models[arch]
    routers = select_sites(model, role="router")
    assert {site.layer for site in routers} == {0, 1}
    top_k_router = [site for site in routers if site.name.endswith("mlp.gate")][0]
    # The top-k router's routing weights: one per selected expert.
    assert top_k_router.shape == (2,)
    assert top_k_router.output_index == 1
    experts = select_sites(model, role="expert")
    assert [site.shape for site in experts] == [(32,), (32,)]
    expert_weights = select_sites(model, role="expert", kind="weight")
    assert {site.param for site in expert_weights} == {"gate_up_proj", "down_proj"}
    assert all(len(site.shape) == 3 for site in expert_weights)


def test_qwen2_moe_shared_expert(models):
    model = models["qwen2_moe"]
    shared = select_sites(model, role="shared_expert")
    assert [site.name for site in shared] == ["model.layers.0.mlp.shared_expert", "model.layers.1.mlp.shared_expert"]
    down = select_sites(model, role="down_proj")
    assert all(".shared_expert." in site.name for site in down)


def test_expert_activations_excluded(models):
    names = [site.name for site in list_sites(models["mixtral"])]
    assert not any(".experts." in name for name in names)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weight_sites_match_parameters(models, arch):
    model = models[arch]
    sites = [site for site in list_sites(model) if site.kind == "weight"]
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for site in sites:
        parameter = parameters[f"{site.name}.{site.param}"]
        assert tuple(parameter.shape) == site.shape
        assert parameter.dtype == site.dtype


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_cache_sites_per_layer(models, arch):
    sites = select_sites(models[arch], kind="kv_cache")
    assert [site.layer for site in sites] == [0, 1]
    kv_heads = 4 if arch == "gpt2" else 2
    assert sites[0].shape == (kv_heads, 8)


def test_sites_report_dtype():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    assert {site.dtype for site in list_sites(model)} == {torch.bfloat16}


def test_site_to_dict(models):
    site = select_sites(models["llama"], role="down_proj", layers=1)[0]
    assert site.to_dict() == {
        "name": "model.layers.1.mlp.down_proj",
        "role": "down_proj",
        "layer": 1,
        "kind": "computation",
        "shape": [32],
        "dtype": "float32",
        "param": None,
    }


def test_layer_of_names():
    assert layer_of("model.layers.12.mlp.down_proj") == 12
    assert layer_of("transformer.h.3.attn") == 3
    assert layer_of("lm_head") is None


def test_select_by_module_glob(models):
    sites = select_sites(models["llama"], module="*.self_attn.[qk]_proj", layers=[1])
    assert [site.name for site in sites] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_select_weight_param(models):
    sites = select_sites(models["qwen2"], role="q_proj", kind="weight", param="bias")
    assert {site.param for site in sites} == {"bias"}


def test_unknown_role(models):
    with pytest.raises(ConfigError, match=r"role='down_prj'.*Did you mean 'down_proj'.*Roles with computation sites: activation"):
        select_sites(models["llama"], role="down_prj")


def test_role_missing_in_architecture(models):
    with pytest.raises(ConfigError, match=r"role='router' has no computation site in this llama"):
        select_sites(models["llama"], role="router")


def test_glob_matches_nothing(models):
    with pytest.raises(NotFoundError, match=r"module='\*\.mlp\.nothing' matches no computation site.*model\.embed_tokens"):
        select_sites(models["llama"], module="*.mlp.nothing")


def test_layer_out_of_range(models):
    with pytest.raises(ConfigError, match=r"layers=7 is out of range: this model has layers 0\.\.1"):
        select_sites(models["llama"], role="down_proj", layers=7)


def test_layer_without_site(models):
    with pytest.raises(ConfigError, match=r"layers=0 has no selected site"):
        select_sites(models["llama"], role="lm_head", layers=0)


def test_layers_not_int(models):
    with pytest.raises(ConfigError, match=r"layers='first' is not valid"):
        select_sites(models["llama"], role="down_proj", layers="first")


def test_unknown_kind(models):
    with pytest.raises(ConfigError, match=r"kind='memory' is not valid.*computation, kv_cache, weight"):
        select_sites(models["llama"], role="down_proj", kind="memory")


def test_selection_needs_role_or_module(models):
    with pytest.raises(ConfigError, match=r"needs a role or a module glob"):
        select_sites(models["llama"])


def test_unknown_param(models):
    with pytest.raises(ConfigError, match=r"param='bias' matches no parameter.*Parameters there: weight"):
        select_sites(models["llama"], role="down_proj", kind="weight", param="bias")


class _ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(4, 4)
        self.ffn_out = nn.Linear(4, 4)

    def forward(self, hidden):
        return self.ffn_out(self.wq(hidden))


class _ToyModel(nn.Module):
    """A model whose family has no role table."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy")
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([_ToyBlock(), _ToyBlock()])
        self.lm_head = nn.Linear(4, 10)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, use_cache=False):
        hidden = self.embed_tokens(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return self.lm_head(hidden)


def test_unknown_architecture_warns_once(caplog):
    model = _ToyModel()
    with caplog.at_level(logging.WARNING, logger="injectors.sites"):
        sites = list_sites(model)
        select_sites(model, module="layers.*.ffn_out")
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'toy' has no role table" in warnings[0].getMessage()
    assert "layers.0.wq, layers.0.ffn_out" in warnings[0].getMessage()
    assert {site.role for site in sites if site.kind == "computation"} == {"embedding", "lm_head", "linear"}


def test_unknown_architecture_glob_selection():
    model = _ToyModel()
    sites = select_sites(model, module="layers.*.ffn_out", layers=1)
    assert [site.name for site in sites] == ["layers.1.ffn_out"]
    assert sites[0].shape == (4,)
