"""End to end on the real SmolLM2-135M-Instruct: which bit of a down_proj output matters."""

from __future__ import annotations

import math

import pytest
import torch

from injectors import Injector, list_sites, resolve_faults

pytestmark = pytest.mark.e2e

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def chat(smollm2):
    model, tokenizer = smollm2
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    return model, tokenizer, encoded


def answer(model, tokenizer, encoded) -> str:
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def inject(model, encoded, corruption: dict):
    faults = resolve_faults(
        model,
        {"site": {"role": "down_proj", "layers": 3}, "time": {"stage": "first_token"}, "corruption": corruption},
        seed=0,
        prompt_length=encoded["input_ids"].shape[1],
        max_new_tokens=NEW_TOKENS,
    )
    return faults, Injector(model)


def test_smollm2_site_count(smollm2):
    model, _ = smollm2
    sites = list_sites(model)
    kinds = {kind: sum(site.kind == kind for site in sites) for kind in ("computation", "weight", "kv_cache")}
    # 30 blocks of 11 computation sites (7 projections, attention, activation, 2 norms) plus
    # embedding, final norm and lm_head; one KV-cache site per block.
    assert kinds["computation"] == 30 * 11 + 3
    assert kinds["kv_cache"] == 30
    down = [site for site in sites if site.role == "down_proj" and site.kind == "computation"]
    assert len(down) == 30
    assert down[0].shape == (576,)


def test_exponent_msb_flip_changes_answer(chat):
    model, tokenizer, encoded = chat
    golden = answer(model, tokenizer, encoded)
    assert "5" in golden
    faults, injector = inject(model, encoded, {"field": "exponent_msb"})
    with injector.armed(faults):
        corrupted = answer(model, tokenizer, encoded)
    record = injector.fired[0]
    assert record.fault.stage == "first_token"
    assert not math.isfinite(record.value_after[0]) or abs(record.value_after[0]) > 1e30
    assert corrupted != golden


def test_mantissa_lsb_flip_masked(chat):
    model, tokenizer, encoded = chat
    golden = answer(model, tokenizer, encoded)
    faults, injector = inject(model, encoded, {"bit": 0})
    with injector.armed(faults):
        corrupted = answer(model, tokenizer, encoded)
    record = injector.fired[0]
    assert record.value_after != record.value_before
    assert corrupted == golden
