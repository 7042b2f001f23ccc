"""Tiny random causal LMs built from configs, one per supported architecture.

They load nothing from a hub: each is a few thousand parameters with the real module layout
of its family, so site discovery, hooks and generation run in milliseconds.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB_SIZE = 128

_COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)

_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

CONFIGS: dict[str, dict] = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER),
    "qwen2": dict(_DECODER),
    "gemma3_text": dict(_DECODER, head_dim=8, sliding_window=16, query_pre_attn_scalar=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
}

ARCHITECTURES = tuple(CONFIGS)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe")


def make_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build a tiny random model of ``arch`` in eval mode, with weights fixed by ``seed``."""
    config = AutoConfig.for_model(arch, **_COMMON, **CONFIGS[arch])
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        # Tests must not leak global RNG state into each other.
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def make_prompt(batch_size: int = 1, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Return ``[batch_size, length]`` token ids drawn from the vocabulary (no special ids)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch_size, length), generator=generator)
