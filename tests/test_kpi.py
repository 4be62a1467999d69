"""The KPIs people report: each computed from what a device holds, checked on cases with a known answer."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedal.kpi import batch_diversity, label_entropy, mean_pairwise_distance, oracle_use, queries_per_point


def test_mean_pairwise_distance_of_a_known_triangle():
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])) == pytest.approx((3 + 4 + 5) / 3)
    assert math.isnan(mean_pairwise_distance(np.zeros((1, 2))))


def test_a_clustered_batch_is_less_diverse_than_random_and_a_spread_one_more():
    rng = np.random.default_rng(0)
    candidates = rng.normal(size=(500, 4))
    clustered = candidates[np.argsort(np.linalg.norm(candidates - candidates[0], axis=1))[:10]]  # 10 neighbours
    spread = candidates[np.argsort(-np.linalg.norm(candidates, axis=1))[:10]]  # the 10 farthest out
    assert batch_diversity(clustered, candidates, np.random.default_rng(1)) < 0.6
    assert batch_diversity(spread, candidates, np.random.default_rng(1)) > 1.2
    assert math.isnan(batch_diversity(candidates[:1], candidates, rng))


def test_label_entropy_is_one_for_balanced_and_zero_for_one_class():
    assert label_entropy([0, 1, 2, 3] * 5, 4) == pytest.approx(1.0)
    assert label_entropy([2] * 7, 4) == 0.0
    assert 0 < label_entropy([0, 0, 0, 1], 4) < 0.5
    assert math.isnan(label_entropy([], 4))


def test_oracle_use_counts_answers_and_the_median_wait():
    requests = [{"status": "answered", "created_at": 0.0, "closed_at": 2.0},
                {"status": "answered", "created_at": 1.0, "closed_at": 11.0},
                {"status": "answered", "created_at": 5.0, "closed_at": 9.0},
                {"status": "pending", "created_at": 3.0, "closed_at": None},
                {"status": "expired", "created_at": 0.0, "closed_at": 60.0}]
    assert oracle_use(requests) == (5, 3, 4.0)
    made, answered, wait = oracle_use([])
    assert (made, answered) == (0, 0) and math.isnan(wait)


def test_queries_per_point():
    assert queries_per_point(50, 0.50, 350, 0.80) == pytest.approx(10.0)
    assert queries_per_point(50, 0.50, 350, 0.49) is None  # nothing gained: no ratio


def test_savings_at_every_budget():
    from simulations.compare import savings_by_budget

    base_labels, base_acc = [10, 20, 30, 40], [0.5, 0.6, 0.7, 0.8]
    rows = savings_by_budget([10, 20, 30, 40], [0.5, 0.7, 0.8, 0.85], base_labels, base_acc)
    assert [r["labels"] for r in rows] == [10, 15, 20, 30]
    assert [round(r["saving_pct"]) for r in rows] == [0, 25, 33, 25]
    assert savings_by_budget([10, 20], [0.1, 0.2], [10, 20], [0.5, 0.6])[1]["saving_pct"] is None
