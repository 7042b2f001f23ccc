"""Statistics for campaign and A/B results: confidence intervals and paired tests.

Pure functions on plain numbers, with no dependency beyond the standard library and NumPy
(SciPy is not a dependency, so the Student t quantile is computed here from the regularized
incomplete beta function).
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from guard.errors import ConfigError

logger = logging.getLogger(__name__)


class Estimate(NamedTuple):
    """A point estimate with the bounds of its confidence interval and the sample size."""

    value: float
    low: float
    high: float
    n: int


class McNemarResult(NamedTuple):
    """McNemar's test on discordant pairs: the statistic, its two-sided p-value and the method.

    ``method`` is ``"exact"`` (the statistic is min(b, c) and the p-value comes from the
    binomial distribution with p = 1/2) or ``"chi2"`` (the continuity-corrected chi-square
    statistic with one degree of freedom).
    """

    statistic: float
    p_value: float
    method: str
    b: int
    c: int


class RatioSpread(NamedTuple):
    """Median and quartiles of per-repetition ratios (for example protected / unprotected time)."""

    median: float
    q1: float
    q3: float
    iqr: float
    n: int


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise ConfigError(f"confidence={confidence!r} is not a number. Pass a value such as 0.95.")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(
            f"confidence={confidence!r} is out of range. Pass a value strictly between 0 and 1, "
            "such as 0.95."
        )
    return float(confidence)


def _check_count(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{field}={value!r} is not an integer count. Pass a whole number >= 0.")
    if value < 0:
        raise ConfigError(f"{field}={value!r} is negative. Pass a whole number >= 0.")
    return int(value)


def _as_floats(field: str, values: Any) -> list[float]:
    try:
        result = [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"{field} must be a sequence of numbers; got {values!r} ({error})."
        ) from None
    return result


def _normal_quantile(confidence: float) -> float:
    """Two-sided critical value z with P(|Z| <= z) = confidence."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) for a binomial proportion successes / n.

    It stays inside [0, 1] and keeps sensible width at 0 or n successes, unlike the normal
    approximation. With n = 0 there is no information and the interval is (0.0, 1.0).
    """
    successes = _check_count("successes", successes)
    n = _check_count("n", n)
    if successes > n:
        raise ConfigError(
            f"successes={successes} is larger than n={n}. Pass at most n successes."
        )
    confidence = _check_confidence(confidence)
    if n == 0:
        return (0.0, 1.0)
    z = _normal_quantile(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, center - half_width), min(1.0, center + half_width))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
        + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The continued fraction converges fast only for x < (a + 1) / (a + b + 2); use the
    # symmetry I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """Return the quantile of Student's t distribution with ``df`` degrees of freedom."""
    if not 0.0 < probability < 1.0:
        raise ConfigError(f"probability={probability!r} must be strictly between 0 and 1.")
    if df <= 0:
        raise ConfigError(f"df={df!r} must be positive.")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    # Bisection on the CDF: monotone and cheap, 200 halvings reach double precision.
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if _t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return (low + high) / 2.0


def mean_ci(values: Sequence[float], confidence: float = 0.95, method: str = "t") -> Estimate:
    """Return the mean of ``values`` with a confidence interval.

    ``method="t"`` uses Student's t with n - 1 degrees of freedom (right for small samples);
    ``method="normal"`` uses the normal quantile. With fewer than two values the bounds are
    NaN, because the spread cannot be estimated.
    """
    if method not in ("t", "normal"):
        raise ConfigError(f"method={method!r} is not valid. Valid choices: normal, t.")
    confidence = _check_confidence(confidence)
    data = _as_floats("values", values)
    n = len(data)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(data) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    standard_error = statistics.stdev(data) / math.sqrt(n)
    if method == "t":
        critical = t_quantile(0.5 + confidence / 2.0, n - 1)
    else:
        critical = _normal_quantile(confidence)
    return Estimate(mean, mean - critical * standard_error, mean + critical * standard_error, n)


def bootstrap_ci(
    data: Sequence[Any],
    statistic: Callable[[list[Any]], float],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Estimate:
    """Return ``statistic(data)`` with a percentile bootstrap confidence interval.

    ``data`` contains one item per independent unit: a number, or a tuple for paired data (for
    example (correct_without, correct_with) per trial), so a resample keeps each pair together.
    Resamples whose statistic is NaN (such as a ratio with a zero denominator) are left out;
    if all are, the bounds are NaN.
    """
    confidence = _check_confidence(confidence)
    n_resamples = _check_count("n_resamples", n_resamples)
    if n_resamples < 1:
        raise ConfigError("n_resamples=0 is too small. Pass at least 1 (1000 or more is usual).")
    if not callable(statistic):
        raise ConfigError(f"statistic={statistic!r} is not callable. Pass a function of a list.")
    items = list(data)
    n = len(items)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    point = float(statistic(items))
    generator = np.random.default_rng(seed)
    indices = generator.integers(0, n, size=(n_resamples, n))
    replicates = []
    for row in indices:
        value = float(statistic([items[i] for i in row]))
        if not math.isnan(value):
            replicates.append(value)
    if not replicates:
        return Estimate(point, math.nan, math.nan, n)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(replicates), [alpha, 1.0 - alpha])
    return Estimate(point, float(low), float(high), n)


def mcnemar(b: int, c: int, exact_threshold: int = 25) -> McNemarResult:
    """Return McNemar's paired test for discordant counts b and c.

    b counts pairs where only the first arm is correct, c those where only the second is.
    When b + c < ``exact_threshold`` the exact two-sided binomial p-value is used,
    2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2) capped at 1; otherwise the
    chi-square statistic (|b - c| - 1)^2 / (b + c) with one degree of freedom.
    """
    b = _check_count("b", b)
    c = _check_count("c", c)
    exact_threshold = _check_count("exact_threshold", exact_threshold)
    n = b + c
    if n == 0:
        return McNemarResult(0.0, 1.0, "exact", b, c)
    if n < exact_threshold:
        k = min(b, c)
        tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return McNemarResult(float(k), min(1.0, 2.0 * tail), "exact", b, c)
    statistic = (abs(b - c) - 1.0) ** 2 / n
    # Survival function of chi-square with one degree of freedom.
    p_value = math.erfc(math.sqrt(statistic / 2.0))
    return McNemarResult(statistic, p_value, "chi2", b, c)


def _recovered(golden: float, none: float, arm: float) -> float:
    lost = golden - none
    if lost == 0:
        return math.nan
    return (arm - none) / lost


def recovered_fraction(
    acc_golden: float | Sequence[float],
    acc_none: float | Sequence[float],
    acc_arm: float | Sequence[float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> float | Estimate:
    """Return the share of lost accuracy that a mitigation recovers: (A_arm - A_none) / (A_golden - A_none).

    With three accuracies (floats) it returns the float. With three per-trial score sequences of
    equal length (trial i of each arm saw the same input and fault) it returns an
    :class:`Estimate` whose interval comes from a paired bootstrap over trials. The fraction is
    NaN when the faults cost no accuracy (A_golden == A_none); 1 means full recovery, values
    above 1 mean the arm scored better than the fault-free run.
    """
    scalars = [isinstance(v, (int, float, np.floating, np.integer)) for v in (acc_golden, acc_none, acc_arm)]
    if all(scalars):
        return _recovered(float(acc_golden), float(acc_none), float(acc_arm))
    if any(scalars):
        raise ConfigError(
            "recovered_fraction takes either three accuracies or three per-trial score "
            "sequences, not a mix. Pass all three the same way."
        )
    golden = _as_floats("acc_golden", acc_golden)
    none = _as_floats("acc_none", acc_none)
    arm = _as_floats("acc_arm", acc_arm)
    if not len(golden) == len(none) == len(arm):
        raise ConfigError(
            f"per-trial sequences differ in length (golden {len(golden)}, none {len(none)}, "
            f"arm {len(arm)}). Pass the scores of the same trials for every arm."
        )

    confidence = _check_confidence(confidence)
    n_resamples = _check_count("n_resamples", n_resamples)
    if n_resamples < 1:
        raise ConfigError("n_resamples=0 is too small. Pass at least 1 (1000 or more is usual).")
    n = len(golden)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    point = _recovered(math.fsum(golden) / n, math.fsum(none) / n, math.fsum(arm) / n)
    # Paired bootstrap, vectorized: each resample draws trial indices once for all three arms.
    scores = np.asarray([golden, none, arm], dtype=np.float64)  # [3, n]
    generator = np.random.default_rng(seed)
    # Blocks of resamples bound memory to about 3 * block * n floats.
    block = max(1, min(n_resamples, 2_000_000 // n))
    parts = []
    for start in range(0, n_resamples, block):
        indices = generator.integers(0, n, size=(min(block, n_resamples - start), n))
        parts.append(scores[:, indices].mean(axis=2))  # [3, block]
    means = np.concatenate(parts, axis=1)  # [3, n_resamples]
    lost = means[0] - means[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = np.where(lost != 0, (means[2] - means[1]) / lost, np.nan)
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return Estimate(point, math.nan, math.nan, n)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Estimate(point, float(low), float(high), n)


def ratio_spread(samples: Sequence[float] | Sequence[tuple[float, float]]) -> RatioSpread:
    """Return the median and interquartile range of per-repetition ratios.

    ``samples`` contains either the ratios or (numerator, denominator) pairs, for example
    (protected seconds, unprotected seconds) of one interleaved repetition. Quartiles use
    linear interpolation between order statistics (NumPy's default "linear" method).
    """
    items = list(samples)
    if not items:
        raise ConfigError("samples is empty. Pass at least one ratio or (numerator, denominator) pair.")
    ratios: list[float] = []
    for index, item in enumerate(items):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise ConfigError(
                    f"samples[{index}]={item!r} is not a (numerator, denominator) pair."
                )
            numerator, denominator = _as_floats(f"samples[{index}]", item)
            if denominator == 0:
                raise ConfigError(
                    f"samples[{index}]={item!r} has a zero denominator. Drop that repetition."
                )
            ratios.append(numerator / denominator)
        else:
            ratios.extend(_as_floats(f"samples[{index}]", [item]))
    q1, median, q3 = (float(q) for q in np.quantile(np.asarray(ratios), [0.25, 0.5, 0.75]))
    return RatioSpread(median, q1, q3, q3 - q1, len(ratios))
