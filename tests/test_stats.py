"""Statistics against values computed by hand in each test."""

from __future__ import annotations

import math

import pytest

from evals.stats import (
    Estimate,
    bootstrap_ci,
    mcnemar,
    mean_ci,
    ratio_spread,
    recovered_fraction,
    t_quantile,
    wilson_interval,
)
from guard.errors import ConfigError

Z95 = 1.959963984540054


def test_wilson_eight_of_ten():
    # p = 0.8, z^2 = 3.8415: center = (0.8 + z^2/20) / (1 + z^2/10),
    # half width = z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2/10).
    denominator = 1 + Z95**2 / 10
    center = (0.8 + Z95**2 / 20) / denominator
    half = Z95 * math.sqrt(0.016 + Z95**2 / 400) / denominator
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(center - half, abs=1e-12)
    assert high == pytest.approx(center + half, abs=1e-12)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_zero_successes():
    # 0 of 10: low = 0 and high = (z^2/10) / (1 + z^2/10) = 0.2775.
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx((Z95**2 / 10) / (1 + Z95**2 / 10), abs=1e-12)


def test_wilson_empty_sample():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_rejects_too_many_successes():
    with pytest.raises(ConfigError, match="successes=11 is larger than n=10"):
        wilson_interval(11, 10)


def test_wilson_rejects_bad_confidence():
    with pytest.raises(ConfigError, match="confidence=1.5 is out of range"):
        wilson_interval(1, 2, confidence=1.5)


def test_wilson_rejects_float_count():
    with pytest.raises(ConfigError, match="n=2.5 is not an integer"):
        wilson_interval(1, 2.5)


def test_t_quantile_known_values():
    # Standard table values of Student's t.
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    assert t_quantile(0.95, 10) == pytest.approx(1.812461, abs=1e-6)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)


def test_mean_ci_t_five_values():
    # mean 3, sample sd sqrt(2.5), se = sqrt(2.5)/sqrt(5) = 0.70711, t(0.975, 4) = 2.776445.
    estimate = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert estimate.value == pytest.approx(3.0)
    assert estimate.low == pytest.approx(3.0 - half, abs=1e-5)
    assert estimate.high == pytest.approx(3.0 + half, abs=1e-5)
    assert estimate.n == 5


def test_mean_ci_normal_method():
    estimate = mean_ci([1, 2, 3, 4, 5], method="normal")
    half = Z95 * math.sqrt(0.5)
    assert estimate.low == pytest.approx(3.0 - half, abs=1e-9)


def test_mean_ci_single_value_has_nan_bounds():
    estimate = mean_ci([4.0])
    assert estimate.value == 4.0
    assert math.isnan(estimate.low)


def test_mean_ci_rejects_unknown_method():
    with pytest.raises(ConfigError, match="method='median' is not valid"):
        mean_ci([1.0, 2.0], method="median")


def test_mean_ci_rejects_non_numbers():
    with pytest.raises(ConfigError, match="values must be a sequence of numbers"):
        mean_ci(["a", "b"])


def test_bootstrap_constant_data():
    estimate = bootstrap_ci([1.0] * 20, lambda xs: sum(xs) / len(xs), n_resamples=200, seed=1)
    assert estimate == Estimate(1.0, 1.0, 1.0, 20)


def test_bootstrap_seed_reproducible():
    data = [0, 1, 1, 0, 1, 1, 1, 0, 1, 0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    first = bootstrap_ci(data, mean, n_resamples=500, seed=7)
    second = bootstrap_ci(data, mean, n_resamples=500, seed=7)
    assert first == second
    assert first.low <= first.value <= first.high


def test_bootstrap_pairs_stay_together():
    # Every pair has equal members, so each resampled difference of means is exactly 0.
    pairs = [(1, 1), (0, 0), (1, 1), (0, 0), (1, 1)]
    difference = lambda rows: sum(a - b for a, b in rows) / len(rows)  # noqa: E731
    estimate = bootstrap_ci(pairs, difference, n_resamples=300, seed=0)
    assert (estimate.low, estimate.high) == (0.0, 0.0)


def test_bootstrap_rejects_zero_resamples():
    with pytest.raises(ConfigError, match="n_resamples=0 is too small"):
        bootstrap_ci([1.0], lambda xs: xs[0], n_resamples=0)


def test_mcnemar_exact_ten_two():
    # n = 12 < 25: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096.
    result = mcnemar(10, 2)
    assert result.method == "exact"
    assert result.statistic == 2.0
    assert result.p_value == pytest.approx(158 / 4096, abs=1e-12)


def test_mcnemar_chi2_ten_two():
    # (|10 - 2| - 1)^2 / 12 = 49 / 12; p = erfc(sqrt(49 / 24)) for one degree of freedom.
    result = mcnemar(10, 2, exact_threshold=0)
    assert result.method == "chi2"
    assert result.statistic == pytest.approx(49 / 12)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(49 / 24)), abs=1e-12)
    assert result.p_value == pytest.approx(0.0433, abs=1e-4)


def test_mcnemar_large_counts_use_chi2():
    # b + c = 40 >= 25: (|30 - 10| - 1)^2 / 40 = 361 / 40.
    result = mcnemar(30, 10)
    assert result.method == "chi2"
    assert result.statistic == pytest.approx(361 / 40)


def test_mcnemar_equal_counts_capped_at_one():
    assert mcnemar(3, 3).p_value == 1.0
    assert mcnemar(0, 0).p_value == 1.0


def test_mcnemar_rejects_negative():
    with pytest.raises(ConfigError, match="b=-1 is negative"):
        mcnemar(-1, 2)


def test_recovered_fraction_scalars():
    # (0.8 - 0.5) / (0.9 - 0.5) = 0.75
    assert recovered_fraction(0.9, 0.5, 0.8) == pytest.approx(0.75)


def test_recovered_fraction_nothing_lost_is_nan():
    assert math.isnan(recovered_fraction(0.7, 0.7, 0.7))


def test_recovered_fraction_per_trial_interval():
    golden = [1] * 10
    none = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    arm = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    estimate = recovered_fraction(golden, none, arm, n_resamples=400, seed=3)
    # (0.8 - 0.5) / (1.0 - 0.5) = 0.6
    assert estimate.value == pytest.approx(0.6)
    assert estimate.n == 10
    assert 0.0 <= estimate.low <= 0.6 <= estimate.high <= 1.0


def test_recovered_fraction_rejects_length_mismatch():
    with pytest.raises(ConfigError, match="per-trial sequences differ in length"):
        recovered_fraction([1, 1], [0, 0], [1])


def test_recovered_fraction_rejects_mixed_inputs():
    with pytest.raises(ConfigError, match="not a mix"):
        recovered_fraction(1.0, [0, 0], [1, 1])


def test_ratio_spread_four_ratios():
    # Sorted 1, 2, 3, 4: linear quartiles at positions 0.75, 1.5, 2.25 -> 1.75, 2.5, 3.25.
    spread = ratio_spread([4.0, 1.0, 3.0, 2.0])
    assert spread.median == pytest.approx(2.5)
    assert spread.q1 == pytest.approx(1.75)
    assert spread.q3 == pytest.approx(3.25)
    assert spread.iqr == pytest.approx(1.5)
    assert spread.n == 4


def test_ratio_spread_from_pairs():
    spread = ratio_spread([(2.0, 1.0), (3.0, 2.0), (1.2, 1.0)])
    # Ratios 2.0, 1.5, 1.2 -> median 1.5.
    assert spread.median == pytest.approx(1.5)


def test_ratio_spread_rejects_zero_denominator():
    with pytest.raises(ConfigError, match="zero denominator"):
        ratio_spread([(1.0, 0.0)])


def test_ratio_spread_rejects_empty():
    with pytest.raises(ConfigError, match="samples is empty"):
        ratio_spread([])


def test_recovered_fraction_no_loss_interval_nan():
    estimate = recovered_fraction([1, 1, 0], [1, 1, 0], [1, 1, 0], n_resamples=50)
    assert math.isnan(estimate.value)
    assert math.isnan(estimate.low)
    assert estimate.n == 3


def test_recovered_fraction_seed_reproducible():
    golden = [1] * 12
    none = [0, 1] * 6
    arm = [1, 1, 0, 1] * 3
    first = recovered_fraction(golden, none, arm, n_resamples=300, seed=11)
    second = recovered_fraction(golden, none, arm, n_resamples=300, seed=11)
    assert first == second
