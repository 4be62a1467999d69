"""Stopping criteria, one at a time, on hand-made histories."""
from __future__ import annotations

import math

import pytest

from fedal.exceptions import ConfigError
from fedal.stopping import AccuracyPlateau, BudgetExhausted, StepRecord, UncertaintyBelow


def rec(step=0, labeled=10, unlabeled=90, accuracy=math.nan, mean_u=math.nan, max_u=math.nan) -> StepRecord:
    return StepRecord(step=step, queried=10, labeled=labeled, unlabeled=unlabeled, accuracy=accuracy,
                      mean_uncertainty=mean_u, max_uncertainty=max_u)


def accs(*values) -> list[StepRecord]:
    return [rec(step=i, accuracy=a) for i, a in enumerate(values)]


# ------------------------------------------------------------------ BudgetExhausted
def test_budget_goes_on_below_the_total():
    crit = BudgetExhausted(50)
    assert crit.check([]) is None
    assert crit.check([rec(labeled=10), rec(labeled=49)]) is None


@pytest.mark.parametrize("labeled", [50, 51])
def test_budget_stops_at_or_past_the_total(labeled):
    reason = BudgetExhausted(50).check([rec(labeled=labeled)])
    assert reason is not None and "50" in reason


def test_budget_stops_when_the_pool_is_empty():
    reason = BudgetExhausted(1000).check([rec(labeled=100, unlabeled=0)])
    assert reason is not None and "unlabeled" in reason


def test_budget_looks_at_the_latest_record_only():
    assert BudgetExhausted(50).check([rec(labeled=60, unlabeled=0), rec(labeled=10)]) is None


def test_budget_must_not_be_negative():
    with pytest.raises(ConfigError, match="total_labels"):
        BudgetExhausted(-1)


# ------------------------------------------------------------------- AccuracyPlateau
def test_plateau_goes_on_while_accuracy_improves():
    assert AccuracyPlateau(patience=2, min_delta=0.01).check(accs(0.5, 0.6, 0.7, 0.8)) is None


def test_plateau_needs_more_than_patience_records():
    crit = AccuracyPlateau(patience=3, min_delta=0.01)
    assert crit.check(accs(0.5, 0.5, 0.5)) is None
    assert crit.check(accs(0.5, 0.5, 0.5, 0.5)) is not None


def test_plateau_stops_after_patience_steps_without_gain():
    reason = AccuracyPlateau(patience=2, min_delta=0.01).check(accs(0.5, 0.8, 0.79, 0.805))
    assert reason is not None and "plateau" in reason


def test_plateau_gain_must_reach_min_delta():
    crit = AccuracyPlateau(patience=1, min_delta=0.05)
    assert crit.check(accs(0.8, 0.84)) is not None  # +0.04 < 0.05
    assert crit.check(accs(0.8, 0.86)) is None


def test_plateau_ignores_steps_without_accuracy():
    crit = AccuracyPlateau(patience=2, min_delta=0.01)
    # only two real accuracies: not enough to judge
    assert crit.check(accs(math.nan, 0.5, math.nan, 0.5, math.nan)) is None
    assert crit.check(accs(math.nan, 0.5, 0.5, math.nan, 0.5)) is not None


@pytest.mark.parametrize("patience", [0, -1])
def test_plateau_patience_must_be_positive(patience):
    with pytest.raises(ConfigError, match="patience"):
        AccuracyPlateau(patience=patience)


# ------------------------------------------------------------------ UncertaintyBelow
def test_uncertainty_max_statistic():
    crit = UncertaintyBelow(0.2, statistic="max")
    assert crit.check([]) is None
    assert crit.check([rec(mean_u=0.05, max_u=0.3)]) is None
    reason = crit.check([rec(mean_u=0.05, max_u=0.1)])
    assert reason is not None and "max" in reason and "0.2" in reason


def test_uncertainty_mean_statistic():
    crit = UncertaintyBelow(0.2, statistic="mean")
    assert crit.check([rec(mean_u=0.25, max_u=0.1)]) is None
    assert crit.check([rec(mean_u=0.1, max_u=0.9)]) is not None


def test_uncertainty_nan_does_not_stop():
    assert UncertaintyBelow(0.5).check([rec(mean_u=math.nan, max_u=math.nan)]) is None


def test_uncertainty_uses_the_latest_record():
    crit = UncertaintyBelow(0.2)
    assert crit.check([rec(max_u=0.1), rec(max_u=0.5)]) is None


@pytest.mark.parametrize("kwargs, match", [({"threshold": 0}, "threshold"), ({"threshold": 1.5}, "threshold"),
                                           ({"statistic": "median"}, "statistic")])
def test_uncertainty_arguments_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UncertaintyBelow(**kwargs)
