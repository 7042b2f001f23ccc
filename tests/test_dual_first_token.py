"""Dual first-token: redundant prompt pass, vote and recovery."""

from __future__ import annotations

import pytest
import torch

import guard
from guard import ConfigError
from injectors import FaultSpec, Injector, resolve_faults
from mitigations import DualFirstToken
from tests.tiny_models import make_prompt, make_tiny_model

GREEDY = dict(max_new_tokens=6, do_sample=False)


class CorruptPromptCalls:
    """Corrupts one output element on the first ``times`` prompt-pass calls of a module."""

    def __init__(self, row=0, value=1.0e4, times=1, element=3):
        self.row, self.value, self.times, self.element = row, value, times, element
        self.fired = 0

    def __call__(self, module, args, output):
        if self.fired >= self.times or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        output[self.row, -1, self.element] = self.value + self.fired  # each run differs
        return output


def run_protected(model, prompt, mitigation, module=None, hook=None, **generate):
    guard.protect(model, mitigation)
    handle = module.register_forward_hook(hook, prepend=True) if module is not None else None
    try:
        tokens = model.generate(prompt, **{**GREEDY, **generate})
        return tokens, guard.get_report(model).last_call
    finally:
        if handle is not None:
            handle.remove()
        guard.unprotect(model)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(logits_atol=-1), "logits_atol=-1 is not valid"),
        (dict(logits_atol=float("inf")), "logits_atol=inf is not valid; use a finite number"),
        (dict(logits_atol="x"), "logits_atol='x' is not valid"),
        (dict(vote="yes"), "vote='yes' must be True or False"),
        (dict(compare_kv=1), "compare_kv=1 must be True or False"),
        (dict(tune_allocator="no"), "tune_allocator='no' must be True or False"),
    ],
)
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ConfigError, match=message):
        DualFirstToken(**options)


def test_config_accepts_numpy_tolerance():
    import numpy as np

    assert DualFirstToken(logits_atol=np.float32(0.5)).config.logits_atol == 0.5


@pytest.mark.parametrize("tune", [True, False])
def test_allocator_tuned_only_when_enabled(tiny_llama, monkeypatch, tune):
    import mitigations.dual_first_token as dual

    calls = []

    def record_call() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(dual, "_tune_allocator", record_call)
    guard.protect(tiny_llama, DualFirstToken(tune_allocator=tune))
    guard.unprotect(tiny_llama)
    assert len(calls) == (1 if tune else 0)


def test_tune_allocator_sets_glibc_thresholds(monkeypatch):
    import platform
    import sys

    import mitigations.dual_first_token as dual

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds exist only in glibc")
    monkeypatch.setattr(dual, "_allocator_tuned", False)  # an earlier install may have set them
    assert dual._tune_allocator() is True
    assert dual._tune_allocator() is True  # once per process, then a no-op


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "mixtral"])
def test_fault_free_tokens_and_one_extra_pass(arch):
    model = make_tiny_model(arch)
    prompt = make_prompt(3, 9)
    golden = model.generate(prompt, **GREEDY)
    tokens, call = run_protected(model, prompt, DualFirstToken())
    assert torch.equal(tokens, golden)
    assert call.detections == []
    assert call.extra_forward_passes == 1
    assert call.extra_memory_bytes > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_checksum_cache_matches_full_cache(arch):
    """The redundant pass's checksum-only cache gives a full cache's checksums and stores no tensors.

    A 20-token prompt exceeds the tiny Gemma 3 sliding window (16), so its sliding layers store
    only their last positions, and the checksums must cover exactly those.
    """
    from transformers import DynamicCache

    from mitigations.dual_first_token import _ChecksumCache, _kv_checksum

    model = make_tiny_model(arch)
    prompt = make_prompt(2, 20)
    full = DynamicCache(config=model.config)
    dropped = _ChecksumCache(model.config, compare_kv=True)
    with torch.no_grad():
        logits_full = model(prompt, past_key_values=full).logits
        logits_dropped = model(prompt, past_key_values=dropped).logits
    assert torch.equal(logits_full, logits_dropped)
    assert torch.equal(dropped.checksum(), _kv_checksum(full))
    assert all(layer.keys.numel() == 0 and layer.values.numel() == 0 for layer in dropped.layers)
    assert 0 < dropped.largest_layer_bytes < sum(
        layer.keys.nbytes + layer.values.nbytes for layer in full.layers
    )


def _cache_like_tensors() -> list[torch.Tensor]:
    """KV-cache-shaped tensors in the layouts and formats a cache can hold, 4 rows each."""
    generator = torch.Generator().manual_seed(0)

    def noise(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    return [
        noise(4, 3, 10, 8),  # contiguous keys
        noise(4, 10, 3, 8).transpose(1, 2),  # keys in the layout projections leave
        noise(4, 3, 20, 8)[:, :, -6:],  # a sliding-window layer's slice
        noise(4, 3, 10, 8, dtype=torch.float16),
        noise(4, 3, 10, 8, dtype=torch.float64),
        noise(4, 10, 3, 8, dtype=torch.float64).transpose(1, 3),  # last dimension not dense
    ]


def _reference_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Return the plain and position-weighted sums of each row's bit patterns, per tensor: ``[4, 2 * tensors]``."""
    from mitigations.checksum_kernel import _bit_view

    columns = []
    for tensor in tensors:
        values = _bit_view(tensor).contiguous().reshape(4, -1).to(torch.int64)
        positions = torch.arange(1, values.shape[1] + 1)
        columns += [values.sum(1), (values * positions).sum(1)]
    return torch.stack(columns, 1)


@pytest.mark.parametrize("path", ["kernel", "serial kernel", "operators"])
def test_bit_checksums_equal_reference(monkeypatch, path):
    """Every path gives the exact integer sums of the bit patterns, in any layout and format."""
    from mitigations import checksum_kernel

    if path != "operators" and checksum_kernel.kernels() is None:
        pytest.skip("numba is not installed, so there is no kernel to test")
    if path == "serial kernel":
        monkeypatch.setattr(checksum_kernel, "_threads_allowed", lambda: False)
    if path == "operators":
        monkeypatch.setattr(checksum_kernel, "_kernels", None)
        monkeypatch.setattr(checksum_kernel, "_loaded", True)
    tensors = _cache_like_tensors()
    assert torch.equal(checksum_kernel.bit_checksums(tensors), _reference_checksums(tensors))


def test_bit_checksums_reject_mixed_rows():
    from mitigations.checksum_kernel import bit_checksums

    with pytest.raises(ValueError, match=r"row counts \[3, 4\]"):
        bit_checksums([torch.zeros(4, 6), torch.zeros(3, 8)])


def test_bit_checksums_of_empty_tensors():
    from mitigations.checksum_kernel import bit_checksums

    one_bits = 0x3F800000  # the bits of 1.0 in float32
    assert bit_checksums([torch.zeros(0, 5)]).shape == (0, 2)
    assert bit_checksums([torch.ones(2, 0), torch.ones(2, 3)]).tolist() == [[0, 0, 3 * one_bits, 6 * one_bits]] * 2


def test_bit_sum_detects_low_bit_flip():
    """Flipping the lowest mantissa bit of a tiny key changes its row's bit checksum, not its float64 sum."""
    from mitigations.checksum_kernel import bit_checksums

    keys = _cache_like_tensors()[0]
    keys[2, 1, 4, 5] = 1e-30
    flipped = keys.clone()
    flipped.view(torch.int32)[2, 1, 4, 5] ^= 1
    assert torch.equal(keys.flatten(1).sum(1, dtype=torch.float64), flipped.flatten(1).sum(1, dtype=torch.float64))
    changed = (bit_checksums([keys]) != bit_checksums([flipped])).any(1)  # [4]
    assert changed.tolist() == [False, False, True, False]


def test_bit_checksum_detects_cancelling_pair():
    """Two elements whose bits change by +1 and -1, as a flip before RoPE can cause, change only the weighted sum."""
    from mitigations.checksum_kernel import bit_checksums

    keys = _cache_like_tensors()[0]
    changed = keys.clone()
    changed.view(torch.int32)[1, 0, 2, 3] += 1
    changed.view(torch.int32)[1, 2, 5, 3] -= 1
    before, after = bit_checksums([keys]), bit_checksums([changed])  # [4, 2]
    assert torch.equal(before[:, 0], after[:, 0])
    assert (before[:, 1] != after[:, 1]).tolist() == [False, True, False, False]


def test_logits_compared_bit_for_bit():
    """Equal NaNs agree, while one unit in the last place or -0.0 against 0.0 does not."""
    from mitigations.dual_first_token import _same_bits

    a = torch.tensor([[1.0, float("nan")], [1.0, 2.0], [0.0, 2.0]])
    b = a.clone()
    b[1, 1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    b[2, 0] = -0.0
    assert _same_bits(a, b).tolist() == [True, False, False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_nonfinite_rows(dtype):
    """Rows with NaN or Inf are found, and a row of the largest finite values is not."""
    from mitigations.dual_first_token import _nonfinite_rows

    largest = torch.finfo(dtype).max
    logits = torch.tensor(
        [[1.0, 2.0], [largest, largest], [float("inf"), 0.0], [float("nan"), 0.0], [-float("inf"), float("inf")]],
        dtype=dtype,
    )
    assert _nonfinite_rows(logits).tolist() == [False, False, True, True, True]


def test_extra_memory_below_second_cache(tiny_llama):
    """Without a disagreement, the extra memory is one layer's keys and values plus the logits."""
    from transformers import DynamicCache

    prompt = make_prompt(3, 9)
    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        logits = tiny_llama(prompt, past_key_values=cache).logits[:, -1, :]
    full_cache = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    _, call = run_protected(tiny_llama, prompt, DualFirstToken())
    assert call.detections == []
    assert logits.nbytes < call.extra_memory_bytes < full_cache + logits.nbytes


def test_first_token_fault_outvoted(tiny_llama):
    prompt = make_prompt(3, 7)
    golden = tiny_llama.generate(prompt, **GREEDY)
    corrupt = CorruptPromptCalls(row=1)
    tokens, call = run_protected(tiny_llama, prompt, DualFirstToken(), tiny_llama.model.layers[1].mlp.down_proj, corrupt)
    assert corrupt.fired == 1
    (detection,) = call.detections
    assert detection.check == "first_token_mismatch"
    assert detection.row == 1
    assert detection.action == "voted"
    assert "outvoted" in detection.detail
    assert call.extra_forward_passes == 2
    assert torch.equal(tokens, golden)


def test_fault_in_second_run_keeps_primary(tiny_llama):
    prompt = make_prompt(2, 7)
    golden = tiny_llama.generate(prompt, **GREEDY)

    class CorruptSecondCall(CorruptPromptCalls):
        def __call__(self, module, args, output):
            if output.shape[1] < 2:
                return None
            self.fired += 1
            if self.fired != 2:
                return None
            output = output.clone()
            output[0, -1, 3] = 1.0e4
            return output

    tokens, call = run_protected(
        tiny_llama, prompt, DualFirstToken(), tiny_llama.model.layers[0].mlp.down_proj, CorruptSecondCall()
    )
    (detection,) = call.detections
    assert detection.action == "voted"
    assert "agrees with the primary run" in detection.detail
    assert torch.equal(tokens, golden)


def test_three_different_runs_unresolved(tiny_llama):
    corrupt = CorruptPromptCalls(row=0, times=3)
    _, call = run_protected(
        tiny_llama, make_prompt(1, 7), DualFirstToken(), tiny_llama.model.layers[0].mlp.down_proj, corrupt
    )
    assert corrupt.fired == 3
    (detection,) = call.detections
    assert detection.action == "none"


def test_vote_disabled_only_reports(tiny_llama):
    corrupt = CorruptPromptCalls(row=0)
    _, call = run_protected(
        tiny_llama, make_prompt(1, 7), DualFirstToken(vote=False), tiny_llama.model.layers[0].mlp.down_proj, corrupt
    )
    (detection,) = call.detections
    assert detection.action == "none"
    assert call.extra_forward_passes == 1


def test_persistent_fault_reported_as_agreed(tiny_llama):
    """A fault in every run (like a corrupted weight) is not outvoted, and the report marks it "agreed"."""

    def always_nan(module, args, output):
        output = output.clone()
        output[0, -1, 0] = float("nan")
        return output

    _, call = run_protected(tiny_llama, make_prompt(2, 7), DualFirstToken(), tiny_llama.model.layers[0].mlp.down_proj, always_nan)
    actions = {(d.row, d.check, d.action) for d in call.detections}
    assert actions == {(0, "nonfinite_logits", "agreed")}


def test_left_padded_batch_fault(tiny_llama):
    prompt = make_prompt(3, 8, seed=2)
    mask = torch.ones_like(prompt)
    prompt[0, :4] = 0
    mask[0, :4] = 0
    golden = tiny_llama.generate(prompt, attention_mask=mask, **GREEDY)
    corrupt = CorruptPromptCalls(row=0)
    tokens, call = run_protected(
        tiny_llama, prompt, DualFirstToken(), tiny_llama.model.layers[1].self_attn.o_proj, corrupt, attention_mask=mask
    )
    assert [d.row for d in call.detections] == [0]
    assert torch.equal(tokens, golden)


def test_kv_only_difference_detected(tiny_llama):
    """A prefill fault that leaves the first token alone still changes the KV checksum."""
    prompt = make_prompt(1, 8)
    golden = tiny_llama.generate(prompt, **GREEDY)

    class CorruptKeyAtPrefill:
        fired = 0

        def __call__(self, module, args, output):
            if self.fired or output.shape[1] < 2:
                return None
            self.fired += 1
            output = output.clone()
            output[0, 1, 0] += 0.5
            return output

    tokens, call = run_protected(
        tiny_llama, prompt, DualFirstToken(), tiny_llama.model.layers[1].self_attn.k_proj, CorruptKeyAtPrefill()
    )
    assert [d.action for d in call.detections] == ["voted"]
    assert torch.equal(tokens, golden)


def test_injected_first_token_fault_recovered(tiny_llama):
    prompt = make_prompt(3, 7)
    golden = tiny_llama.generate(prompt, **GREEDY)
    spec = FaultSpec.from_dict(
        {"site": {"role": "down_proj", "layers": [1]}, "time": {"stage": "first_token", "row": 1},
         "corruption": {"field": "exponent_msb"}}
    )
    faults = resolve_faults(tiny_llama, spec, seed=3, n=1, prompt_length=7, max_new_tokens=6, batch_size=3)
    injector = Injector(tiny_llama)
    guard.protect(tiny_llama, DualFirstToken())
    try:
        with injector.armed(faults):
            tokens = tiny_llama.generate(prompt, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
    assert len(injector.fired) == 1
    assert [(d.row, d.action) for d in call.detections] == [(1, "voted")]
    assert torch.equal(tokens, golden)


def test_plain_forward_not_duplicated(tiny_llama):
    guard.protect(tiny_llama, DualFirstToken())
    try:
        tiny_llama(make_prompt(1, 5))
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
    assert call.extra_forward_passes == 0


def _prefilled_cache(model, prompt: torch.Tensor, length: int):
    """Return a cache that contains the model's keys and values for the first ``length`` prompt tokens."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :length], past_key_values=cache, use_cache=True)
    return cache


def test_prefilled_cache_rerun_from_prefix(tiny_llama):
    """A prompt pass over a cached prefix is rerun from that prefix: no false mismatch, golden tokens."""
    prompt = make_prompt(2, 20)
    golden = tiny_llama.generate(prompt, past_key_values=_prefilled_cache(tiny_llama, prompt, 12), **GREEDY)
    cache = _prefilled_cache(tiny_llama, prompt, 12)
    guard.protect(tiny_llama, DualFirstToken())
    try:
        tokens = tiny_llama.generate(prompt, past_key_values=cache, **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        guard.unprotect(tiny_llama)
    assert call.detections == []
    assert call.extra_forward_passes == 1
    assert torch.equal(tokens, golden)


def test_prefilled_cache_fault_outvoted(tiny_llama):
    """The third run also starts from the prefix, so an outvoted primary row adopts a full-length cache row."""
    prompt = make_prompt(2, 20)
    golden = tiny_llama.generate(prompt, past_key_values=_prefilled_cache(tiny_llama, prompt, 12), **GREEDY)
    cache = _prefilled_cache(tiny_llama, prompt, 12)
    corrupt = CorruptPromptCalls(row=1)
    tokens, call = run_protected(
        tiny_llama, prompt, DualFirstToken(), tiny_llama.model.layers[1].mlp.down_proj, corrupt, past_key_values=cache
    )
    assert [(d.row, d.action) for d in call.detections] == [(1, "voted")]
    assert "outvoted" in call.detections[0].detail
    assert torch.equal(tokens, golden)


def test_prefilled_sliding_cache_skipped(caplog):
    """A sliding-window layer may have dropped the prefix, so the pass is not rerun, with a warning."""
    model = make_tiny_model("gemma3_text")
    prompt = make_prompt(2, 24)
    golden = model.generate(prompt, past_key_values=_prefilled_cache(model, prompt, 20), **GREEDY)
    cache = _prefilled_cache(model, prompt, 20)
    with caplog.at_level("WARNING", logger="mitigations.dual_first_token"):
        tokens, call = run_protected(model, prompt, DualFirstToken(), past_key_values=cache)
    assert call.extra_forward_passes == 0
    assert "already contained part of the prompt" in caplog.text
    assert torch.equal(tokens, golden)



def test_without_cache_skipped(tiny_llama, caplog):
    """Without a KV cache every forward looks like a prompt pass, so none is rerun, with a warning."""
    prompt = make_prompt(2, 9)
    golden = tiny_llama.generate(prompt, use_cache=False, **GREEDY)
    with caplog.at_level("WARNING", logger="mitigations.dual_first_token"):
        tokens, call = run_protected(tiny_llama, prompt, DualFirstToken(), use_cache=False)
    assert call.extra_forward_passes == 0
    assert "without a KV cache" in caplog.text
    assert torch.equal(tokens, golden)
