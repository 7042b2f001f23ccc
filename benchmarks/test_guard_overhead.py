"""pytest-benchmark suites: guarded generate per mitigation, campaign throughput and the ratio report.

Run with ``python -m pytest benchmarks``; they are outside the default test run. Absolute times
on a shared machine are noise, so compare the rows of one run with each other, or read the
interleaved ratios that ``test_interleaved_ratios`` stores in ``extra_info``.
"""

from __future__ import annotations

import pytest

from evals import bench

# Sizes of the guard-overhead goals: batch 8, prompts of about 100 tokens, 32 new tokens.
BATCH, PROMPT_TOKENS, NEW_TOKENS = 8, 100, 32
VARIANTS = ("none", "abft", "all_linear_abft", "dual_first_token", "dynamic_shots", "mixed_precision",
            "all_four", "injector_idle")


@pytest.fixture(scope="module")
def prompts(smollm2):
    _model, tokenizer = smollm2
    return bench.bench_prompts(tokenizer, BATCH, PROMPT_TOKENS, seed=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate(benchmark, smollm2, prompts, variant):
    import guard
    import mitigations
    from injectors import Injector

    model, tokenizer = smollm2
    benchmark.group = "generate batch 8, 100 + 32 tokens"
    factories = bench.overhead_variants(list(mitigations.available()))

    def run():
        bench._generate(model, tokenizer, prompts, NEW_TOKENS)

    if variant == "none":
        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    elif variant == "injector_idle":
        with Injector(model).armed([]):
            benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    else:
        guard.protect(model, mitigations=factories[variant]())
        try:
            benchmark.pedantic(run, rounds=3, warmup_rounds=1)
        finally:
            guard.unprotect(model)


def test_campaign_first_token(benchmark, smollm2):
    model, tokenizer = smollm2
    options = bench.BenchOptions(repeats=1, parts=("campaign",))
    benchmark.group = "campaign"

    results = benchmark.pedantic(lambda: bench.measure_campaign(model, tokenizer, options), rounds=1)

    benchmark.extra_info.update({key: results[key] for key in ("campaign_vs_limit", "campaign_vs_sequential")})


def test_interleaved_ratios(benchmark, smollm2):
    model, tokenizer = smollm2
    options = bench.BenchOptions(repeats=3)
    benchmark.group = "ratios"

    results = benchmark.pedantic(lambda: bench.run_bench(options, model=model, tokenizer=tokenizer), rounds=1)

    benchmark.extra_info.update(
        {
            key: results[key]
            for key in ("campaign_vs_limit", "campaign_vs_sequential", "prefix_reuse_speedup",
                        "prefix_reuse_speedup_full_length", "overhead")
        }
    )
    assert set(results["overhead"]) >= {"all_linear_abft", "all_four", "injector_idle"}
