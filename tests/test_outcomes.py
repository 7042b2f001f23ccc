"""Outcome classification of trials against the golden run."""

from __future__ import annotations

import pytest
import torch

from evals.outcomes import Outcome, classify_trial, count_outcomes
from guard.errors import ConfigError

GOLDEN = [5, 6, 7]


def classify(tokens, score, *, detected=False, crashed=False, golden_score=1.0):
    return classify_trial(
        golden_tokens=GOLDEN, golden_score=golden_score, tokens=tokens, score=score,
        detected=detected, crashed=crashed,
    )


def test_classify_same_tokens_masked():
    assert classify([5, 6, 7], 1.0) is Outcome.MASKED


def test_classify_changed_tokens_same_score_benign():
    assert classify([5, 6, 8], 1.0) is Outcome.SDC_BENIGN


def test_classify_better_score_benign():
    assert classify([5, 9], 1.0, golden_score=0.0) is Outcome.SDC_BENIGN


def test_classify_worse_score_critical():
    assert classify([5, 9], 0.0) is Outcome.SDC_CRITICAL


def test_classify_crash_wins_over_detection():
    assert classify(None, None, detected=True, crashed=True) is Outcome.CRASH


def test_classify_detected_same_tokens_corrected():
    assert classify([5, 6, 7], 1.0, detected=True) is Outcome.DETECTED_CORRECTED


def test_classify_detected_score_kept_corrected():
    assert classify([1, 2], 1.0, detected=True) is Outcome.DETECTED_CORRECTED


def test_classify_detected_worse_uncorrected():
    assert classify([1, 2], 0.0, detected=True) is Outcome.DETECTED_UNCORRECTED


def test_classify_accepts_tensors():
    outcome = classify_trial(
        golden_tokens=torch.tensor(GOLDEN), golden_score=1.0, tokens=torch.tensor([5, 6, 7]),
        score=1.0, detected=False, crashed=False,
    )
    assert outcome is Outcome.MASKED


def test_classify_rejects_nan_score():
    with pytest.raises(ConfigError, match="score is NaN"):
        classify([5], float("nan"))


def test_classify_rejects_missing_tokens():
    with pytest.raises(ConfigError, match="tokens is None"):
        classify(None, 1.0)


def test_classify_rejects_non_bool_flag():
    with pytest.raises(ConfigError, match="detected=1 is not a bool"):
        classify([5], 1.0, detected=1)


def test_outcome_values_and_groups():
    assert Outcome("sdc_critical") is Outcome.SDC_CRITICAL
    assert str(Outcome.CRASH) == "crash"
    assert Outcome.SDC_BENIGN.is_sdc
    assert Outcome.DETECTED_UNCORRECTED.is_detected
    assert Outcome.CRASH.is_failure
    assert not Outcome.MASKED.is_failure


def test_count_outcomes_lists_every_class():
    counts = count_outcomes([Outcome.MASKED, "masked", "crash"])
    assert counts["masked"] == 2
    assert counts["crash"] == 1
    assert counts["sdc_benign"] == 0
    assert list(counts) == [o.value for o in Outcome]


def test_count_outcomes_rejects_unknown():
    with pytest.raises(ConfigError, match="outcome 'lost' is not valid"):
        count_outcomes(["lost"])
