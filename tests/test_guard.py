"""guard.protect / unprotect / report on tiny random models."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

import guard
import mitigations
from guard import ConfigError, NotFoundError
from guard.report import Detection, RateLimitedLog
from mitigations import ABFT, DualFirstToken
from tests.tiny_models import ARCHITECTURES, make_prompt, make_tiny_model

GREEDY = dict(max_new_tokens=6, do_sample=False)


def hook_snapshot(model):
    """Return the hook dictionaries of every submodule, as (name, kind, keys)."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    )
    return [
        (name, kind, tuple(getattr(module, kind)))
        for name, module in model.named_modules()
        for kind in kinds
    ]


def module_dicts(model):
    return {name: set(module.__dict__) for name, module in model.named_modules()}


class CorruptOnce:
    """Forward hook that writes ``value`` into one output element the first time it runs on the prompt."""

    def __init__(self, row=0, position=-1, element=3, value=1.0e6):
        self.row, self.position, self.element, self.value = row, position, element, value
        self.fired = 0

    def __call__(self, module, args, output):
        if self.fired or output.shape[1] < 2:
            return None
        self.fired += 1
        output = output.clone()
        output[self.row, self.position, self.element] = self.value
        return output


# ----- protect / unprotect -------------------------------------------------------------


def test_protect_returns_same_model(tiny_llama):
    assert guard.protect(tiny_llama) is tiny_llama
    assert guard.is_protected(tiny_llama)
    guard.unprotect(tiny_llama)
    assert not guard.is_protected(tiny_llama)


def test_protect_default_set(tiny_llama):
    guard.protect(tiny_llama)
    names = [m.name for m in guard.protected_mitigations(tiny_llama)]
    guard.unprotect(tiny_llama)
    assert names == list(guard.DEFAULT_MITIGATIONS)


def test_protect_keeps_generate_name_and_signature(tiny_llama):
    original_signature = inspect.signature(tiny_llama.generate)
    guard.protect(tiny_llama)
    try:
        assert tiny_llama.generate.__name__ == "generate"
        assert inspect.signature(tiny_llama.generate) == original_signature
        assert tiny_llama.generate.__doc__ == type(tiny_llama).generate.__doc__
    finally:
        guard.unprotect(tiny_llama)


def test_unprotect_removes_everything(tiny_llama):
    hooks_before = hook_snapshot(tiny_llama)
    dicts_before = module_dicts(tiny_llama)
    guard.protect(tiny_llama, ["abft", "mixed_precision", "dual_first_token", "dynamic_shots"])
    assert hook_snapshot(tiny_llama) != hooks_before
    tiny_llama.generate(make_prompt(2, 5), **GREEDY)
    guard.unprotect(tiny_llama)
    assert hook_snapshot(tiny_llama) == hooks_before
    assert module_dicts(tiny_llama) == dicts_before
    assert "generate" not in tiny_llama.__dict__
    assert tiny_llama.generate == type(tiny_llama).generate.__get__(tiny_llama)
    assert guard.StageTracker.of(tiny_llama) is None


def test_unprotect_outputs_bit_identical(tiny_llama):
    prompt = make_prompt(3, 7)
    golden_tokens = tiny_llama.generate(prompt, **GREEDY)
    golden_logits = tiny_llama(prompt).logits
    guard.protect(tiny_llama, ["abft", "mixed_precision", "dual_first_token", "dynamic_shots"])
    tiny_llama.generate(prompt, **GREEDY)
    guard.unprotect(tiny_llama)
    assert torch.equal(tiny_llama.generate(prompt, **GREEDY), golden_tokens)
    assert torch.equal(tiny_llama(prompt).logits, golden_logits)


def test_unprotect_restores_previous_generate_attribute(tiny_llama):
    def custom_generate(*args, **kwargs):
        return "custom"

    tiny_llama.generate = custom_generate
    guard.protect(tiny_llama, "abft")
    guard.unprotect(tiny_llama)
    assert tiny_llama.__dict__["generate"] is custom_generate


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_protect_fault_free_tokens_unchanged(arch):
    model = make_tiny_model(arch)
    prompt = make_prompt(3, 6)
    golden = model.generate(prompt, **GREEDY)
    guard.protect(model, ["abft", "dual_first_token", "dynamic_shots"], abft={"roles": "all_linear"})
    try:
        protected = model.generate(prompt, **GREEDY)
        report = guard.get_report(model)
    finally:
        guard.unprotect(model)
    assert torch.equal(protected, golden)
    assert report.total_detections == 0


def test_install_failure_leaves_model_clean(tiny_llama):
    hooks_before = hook_snapshot(tiny_llama)
    with pytest.raises(ConfigError, match="match no linear layer"):
        guard.protect(tiny_llama, [DualFirstToken(), ABFT(roles=["no_such_proj"])])
    assert not guard.is_protected(tiny_llama)
    assert hook_snapshot(tiny_llama) == hooks_before
    assert "generate" not in tiny_llama.__dict__


def test_protect_accepts_objects_and_names(tiny_llama):
    guard.protect(tiny_llama, [DualFirstToken(), "abft"])
    names = [m.name for m in guard.protected_mitigations(tiny_llama)]
    guard.unprotect(tiny_llama)
    assert names == ["abft", "dual_first_token"]


def test_protect_passes_options_by_name(tiny_llama):
    guard.protect(tiny_llama, "abft", abft={"roles": ["q_proj"], "layers": [1]})
    checked = guard.protected_mitigations(tiny_llama)[0].checked_modules
    guard.unprotect(tiny_llama)
    assert checked == ["model.layers.1.self_attn.q_proj"]


# ----- bad input -------------------------------------------------------------------------


def test_protect_twice_rejected(tiny_llama):
    guard.protect(tiny_llama)
    try:
        with pytest.raises(ConfigError, match="already protected.*unprotect"):
            guard.protect(tiny_llama, "abft")
    finally:
        guard.unprotect(tiny_llama)


def test_protect_unknown_name_suggests_match(tiny_llama):
    with pytest.raises(NotFoundError, match="'abfd'.*Did you mean 'abft'.*Available mitigations"):
        guard.protect(tiny_llama, "abfd")
    assert not guard.is_protected(tiny_llama)


def test_protect_object_without_generate():
    with pytest.raises(ConfigError, match="has no generate method"):
        guard.protect(torch.nn.Linear(2, 2))


def test_protect_non_module():
    with pytest.raises(ConfigError, match="needs a torch.nn.Module"):
        guard.protect("gpt2")


def test_protect_empty_list(tiny_llama):
    with pytest.raises(ConfigError, match="mitigations is empty"):
        guard.protect(tiny_llama, [])


def test_protect_duplicate_mitigation(tiny_llama):
    with pytest.raises(ConfigError, match="'abft' is listed twice"):
        guard.protect(tiny_llama, ["abft", ABFT()])


def test_protect_bad_entry_type(tiny_llama):
    with pytest.raises(ConfigError, match="each entry must be a name"):
        guard.protect(tiny_llama, ["abft", 3])


def test_protect_unknown_option(tiny_llama):
    with pytest.raises(ConfigError, match="unknown option 'abtf'"):
        guard.protect(tiny_llama, "abft", abtf={})


def test_protect_option_not_a_dict(tiny_llama):
    with pytest.raises(ConfigError, match="must be a dict of config keywords"):
        guard.protect(tiny_llama, "abft", abft=["down_proj"])


def test_protect_rejects_settings_dict(tiny_llama):
    with pytest.raises(ConfigError, match=r"is a dict; pass the names as a list .*dual_first_token=\{\.\.\.\}"):
        guard.protect(tiny_llama, {"dual_first_token": {"vote": False}})
    assert not guard.is_protected(tiny_llama)


def test_protect_options_for_unlisted_mitigation(tiny_llama):
    with pytest.raises(ConfigError, match="'dual_first_token' is not among the mitigations"):
        guard.protect(tiny_llama, "abft", dual_first_token={"vote": False})


def test_protect_bad_guard_option(tiny_llama):
    with pytest.raises(ConfigError, match="max_report_calls=0"):
        guard.protect(tiny_llama, "abft", max_report_calls=0)


def test_protect_reused_mitigation_object(tiny_llama):
    shared = ABFT()
    other = make_tiny_model("llama", seed=1)
    guard.protect(tiny_llama, shared)
    try:
        with pytest.raises(ConfigError, match="already installed"):
            guard.protect(other, shared)
    finally:
        guard.unprotect(tiny_llama)
    assert not guard.is_protected(other)


def test_unprotect_unprotected_model(tiny_llama):
    with pytest.raises(ConfigError, match="is not protected"):
        guard.unprotect(tiny_llama)


def test_get_report_never_protected(tiny_llama):
    with pytest.raises(ConfigError, match="never been protected"):
        guard.get_report(tiny_llama)


# ----- report ----------------------------------------------------------------------------


def test_report_counts_calls_and_passes(tiny_llama):
    guard.protect(tiny_llama, ["abft", "dual_first_token"])
    try:
        tiny_llama.generate(make_prompt(2, 5), **GREEDY)
        tiny_llama(make_prompt(1, 4))
        report = guard.get_report(tiny_llama)
        generate_call, forward_call = report.calls
    finally:
        guard.unprotect(tiny_llama)
    assert generate_call.kind == "generate"
    assert generate_call.batch_size == 2
    assert generate_call.prompt_length == 5
    assert generate_call.forward_passes == GREEDY["max_new_tokens"]
    assert generate_call.decode_steps == GREEDY["max_new_tokens"] - 1
    assert generate_call.extra_forward_passes == 1  # the dual first-token rerun
    assert generate_call.extra_memory_bytes > 0
    assert generate_call.time_added_s > 0
    assert generate_call.wall_s >= generate_call.time_added_s
    assert forward_call.kind == "forward"
    assert forward_call.forward_passes == 1
    assert report.total_calls == 2
    assert report.last_call is forward_call


def test_report_survives_unprotect_and_resets(tiny_llama):
    guard.protect(tiny_llama, "abft")
    tiny_llama.generate(make_prompt(1, 5), **GREEDY)
    guard.unprotect(tiny_llama)
    report = guard.get_report(tiny_llama)
    assert report.total_calls == 1
    report.reset()
    assert report.calls == []
    assert report.total_calls == 0
    assert report.last_call is None


def test_report_records_detection_fields(tiny_llama):
    golden = tiny_llama.generate(make_prompt(3, 6), **GREEDY)
    guard.protect(tiny_llama, "abft")
    corrupt = CorruptOnce(row=2)
    handle = tiny_llama.model.layers[0].self_attn.o_proj.register_forward_hook(corrupt, prepend=True)
    try:
        tokens = tiny_llama.generate(make_prompt(3, 6), **GREEDY)
        call = guard.get_report(tiny_llama).last_call
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert torch.equal(tokens, golden)
    (detection,) = call.detections
    assert detection.mitigation == "abft"
    assert detection.check == "output_checksum"
    assert detection.layer == 0
    assert detection.module == "model.layers.0.self_attn.o_proj"
    assert detection.stage == "first_token"
    assert detection.step == 0
    assert detection.row == 2
    assert detection.action == "recomputed"
    assert guard.get_report(tiny_llama).detections_by_check["output_checksum"] == 1


def test_report_max_calls_keeps_newest(tiny_llama):
    guard.protect(tiny_llama, "abft", max_report_calls=2)
    try:
        for _ in range(3):
            tiny_llama(make_prompt(1, 4))
        report = guard.get_report(tiny_llama)
    finally:
        guard.unprotect(tiny_llama)
    assert [call.index for call in report.calls] == [1, 2]
    assert report.total_calls == 3


def test_detection_rejects_unknown_action():
    with pytest.raises(ValueError, match="action='fixed'"):
        Detection(mitigation="abft", check="output_checksum", action="fixed")


def test_rate_limited_log_suppresses_burst(caplog):
    now = [0.0]
    log = RateLimitedLog(burst=2, window_s=10.0, clock=lambda: now[0])
    detection = Detection(mitigation="abft", check="output_checksum", action="recomputed")
    with caplog.at_level(logging.WARNING, logger="guard.report"):
        logged = [log.log(detection) for _ in range(5)]
        now[0] = 11.0
        logged.append(log.log(detection))
    assert logged == [True, True, False, False, False, True]
    assert "3 further detections were not logged" in caplog.text


def test_detection_logged_at_warning(tiny_llama, caplog):
    guard.protect(tiny_llama, "abft")
    handle = tiny_llama.model.layers[1].mlp.down_proj.register_forward_hook(CorruptOnce(), prepend=True)
    try:
        with caplog.at_level(logging.WARNING, logger="guard.report"):
            tiny_llama.generate(make_prompt(1, 6), **GREEDY)
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert "abft detected output_checksum in model.layers.1.mlp.down_proj" in caplog.text


# ----- compatibility -----------------------------------------------------------------------


def left_padded_batch():
    prompt = make_prompt(3, 8, seed=4)
    mask = torch.ones_like(prompt)
    prompt[0, :3] = 0
    mask[0, :3] = 0
    prompt[2, :1] = 0
    mask[2, :1] = 0
    return prompt, mask


ALL_FOUR = ["abft", "mixed_precision", "dual_first_token", "dynamic_shots"]
EXACT_THREE = ["abft", "dual_first_token", "dynamic_shots"]


def test_generate_left_padding_attention_mask(tiny_llama):
    prompt, mask = left_padded_batch()
    golden = tiny_llama.generate(prompt, attention_mask=mask, **GREEDY)
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        protected = tiny_llama.generate(prompt, attention_mask=mask, **GREEDY)
    finally:
        guard.unprotect(tiny_llama)
    assert torch.equal(protected, golden)


def test_generate_seeded_sampling(tiny_llama):
    prompt = make_prompt(2, 6)
    sampling = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    golden = tiny_llama.generate(prompt, **sampling)
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        torch.manual_seed(123)
        protected = tiny_llama.generate(prompt, **sampling)
    finally:
        guard.unprotect(tiny_llama)
    assert torch.equal(protected, golden)


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_generate_stopping_criteria(tiny_llama):
    prompt = make_prompt(1, 5)
    criteria = StoppingCriteriaList([StopAfter(8)])
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        tokens = tiny_llama.generate(prompt, stopping_criteria=criteria, max_new_tokens=20, do_sample=False)
    finally:
        guard.unprotect(tiny_llama)
    assert tokens.shape[1] == 8


class CollectingStreamer:
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_generate_streamer(tiny_llama):
    prompt = make_prompt(1, 5)
    streamer = CollectingStreamer()
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        tokens = tiny_llama.generate(prompt, streamer=streamer, **GREEDY)
    finally:
        guard.unprotect(tiny_llama)
    assert streamer.ended
    streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks[1:]])
    assert torch.equal(streamed, tokens[0, prompt.shape[1]:])


def test_generate_return_dict_with_scores(tiny_llama):
    prompt = make_prompt(2, 5)
    options = dict(return_dict_in_generate=True, output_scores=True, **GREEDY)
    golden = tiny_llama.generate(prompt, **options)
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        protected = tiny_llama.generate(prompt, **options)
    finally:
        guard.unprotect(tiny_llama)
    assert torch.equal(protected.sequences, golden.sequences)
    assert all(torch.equal(a, b) for a, b in zip(protected.scores, golden.scores))


def test_plain_forward_identical(tiny_llama):
    prompt = make_prompt(2, 9)
    golden = tiny_llama(prompt).logits
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        protected = tiny_llama(prompt).logits
    finally:
        guard.unprotect(tiny_llama)
    assert torch.equal(protected, golden)


def test_text_generation_pipeline(tiny_llama):
    from transformers import pipeline

    tokenizer = _tiny_tokenizer()
    generator = pipeline("text-generation", model=tiny_llama, tokenizer=tokenizer, device="cpu")
    golden = generator("a b c", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    guard.protect(tiny_llama, EXACT_THREE)
    try:
        protected = generator("a b c", max_new_tokens=4, do_sample=False)[0]["generated_text"]
        calls = guard.get_report(tiny_llama).total_calls
    finally:
        guard.unprotect(tiny_llama)
    assert protected == golden
    assert calls == 1


def _tiny_tokenizer():
    """Build a word-level tokenizer over the tiny vocabulary, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(ord("a") + i): 4 + i for i in range(26)})
    vocab.update({f"w{i}": i for i in range(30, 128)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_device_map_auto_model(tmp_path):
    pytest.importorskip("accelerate")
    make_tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    prompt = make_prompt(2, 6)
    golden = model.generate(prompt, **GREEDY)
    guard.protect(model, ALL_FOUR)
    try:
        protected = model.generate(prompt, **GREEDY)
        detections = guard.get_report(model).total_detections
    finally:
        guard.unprotect(model)
    assert torch.equal(protected, golden)
    assert detections == 0
    assert torch.equal(model.generate(prompt, **GREEDY), golden)


def test_registry_lists_four_mitigations():
    assert {"abft", "dual_first_token", "dynamic_shots", "mixed_precision"} <= set(mitigations.available())


def test_tracker_finished_is_closed_pass(tiny_llama):
    tracker = guard.StageTracker.attach(tiny_llama)
    seen = []

    def after_tracker(module, args, output):
        seen.append((tracker.current, tracker.finished))

    handle = tiny_llama.register_forward_hook(after_tracker)
    try:
        tiny_llama.generate(make_prompt(1, 5), max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
        tracker.detach()
    assert [current for current, _ in seen] == [None, None]
    assert [finished.index for _, finished in seen] == [0, 1]


def test_concurrent_generates_served_in_turn(tiny_llama):
    """Two threads generating on one protected model each get their own call in the report."""
    import threading
    import time

    prompt = make_prompt(2, 5)
    golden = tiny_llama.generate(prompt, **GREEDY)
    second_calling = threading.Event()
    paused = threading.Event()

    def pause_first_pass(module, args):
        # Holds the first thread's prompt pass until the second thread has called generate.
        if not paused.is_set():
            paused.set()
            second_calling.wait(10)
            time.sleep(0.2)

    tokens = {}

    def run(name, announce=None):
        if announce is not None:
            announce.set()
        tokens[name] = tiny_llama.generate(prompt, **GREEDY)

    guard.protect(tiny_llama, ["abft", "dual_first_token"])
    handle = tiny_llama.model.layers[0].register_forward_pre_hook(pause_first_pass)
    try:
        first = threading.Thread(target=run, args=("first",))
        first.start()
        assert paused.wait(10)
        second = threading.Thread(target=run, args=("second", second_calling))
        second.start()
        first.join(60)
        second.join(60)
        calls = list(guard.get_report(tiny_llama).calls)
    finally:
        handle.remove()
        guard.unprotect(tiny_llama)
    assert [call.kind for call in calls] == ["generate", "generate"]
    assert [call.forward_passes for call in calls] == [6, 6]
    assert [call.extra_forward_passes for call in calls] == [1, 1]
    assert torch.equal(tokens["first"], golden)
    assert torch.equal(tokens["second"], golden)
