"""Partitions: disjoint and covering, seeded, as skewed as asked, with clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from fedal.exceptions import ConfigError
from fedal.partition import class_counts, partition

N_CLASSES = 10
LABELS = np.repeat(np.arange(N_CLASSES), 100)  # 1000 samples, 100 per class
np.random.default_rng(1).shuffle(LABELS)


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the entropy (bits) of the client's label distribution."""
    counts = class_counts(labels, parts, N_CLASSES).astype(float)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return float(h.mean())


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
@pytest.mark.parametrize("n_clients", [1, 3, 5, 10])
def test_parts_are_disjoint_and_cover_every_sample(method, n_clients):
    parts = partition(LABELS, n_clients, method, alpha=0.3, classes_per_client=2, seed=4)
    assert len(parts) == n_clients
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)  # no sample twice ...
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))  # ... and none left out
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates inside a part


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
def test_same_seed_same_partition_other_seed_other_partition(method):
    a = partition(LABELS, 5, method, alpha=0.5, seed=7)
    b = partition(LABELS, 5, method, alpha=0.5, seed=7)
    c = partition(LABELS, 5, method, alpha=0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_parts_have_equal_sizes_and_near_uniform_labels():
    parts = partition(LABELS, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [250] * 4
    assert mean_label_entropy(LABELS, parts) > 0.95 * np.log2(N_CLASSES)


def test_small_alpha_is_much_more_skewed_than_large_alpha():
    skewed = np.mean([mean_label_entropy(LABELS, partition(LABELS, 5, "dirichlet", alpha=0.1, seed=s))
                      for s in range(5)])
    flat = np.mean([mean_label_entropy(LABELS, partition(LABELS, 5, "dirichlet", alpha=100.0, seed=s))
                    for s in range(5)])
    assert flat > 0.97 * np.log2(N_CLASSES)  # near-IID: about log2(10) = 3.32 bits
    assert skewed < 0.6 * flat  # strong label skew: a few dominant classes per client


def test_dirichlet_gives_every_client_at_least_min_size():
    parts = partition(LABELS, 20, "dirichlet", alpha=0.05, seed=3, min_size=5)
    assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("n_clients, k", [(5, 2), (10, 2), (4, 3), (10, 1), (3, 4)])
def test_pathological_gives_each_client_exactly_k_classes(n_clients, k):
    # every class has an owner when n_clients * k >= n_classes
    parts = partition(LABELS, n_clients, "pathological", classes_per_client=k, seed=2)
    per_client = (class_counts(LABELS, parts, N_CLASSES) > 0).sum(1)
    assert per_client.tolist() == [k] * n_clients


def test_pathological_with_fewer_slots_than_classes_still_covers_every_sample():
    # 3 clients x 2 classes = 6 slots for 10 classes: the 4 unowned classes go to random
    # clients, so no sample is dropped and each client has at least k classes
    parts = partition(LABELS, 3, "pathological", classes_per_client=2, seed=2)
    per_client = (class_counts(LABELS, parts, N_CLASSES) > 0).sum(1)
    assert per_client.min() >= 2
    assert per_client.sum() == N_CLASSES
    assert sum(len(p) for p in parts) == len(LABELS)


def test_class_counts_matrix():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
    assert class_counts(labels, parts, 4).tolist() == [[1, 0, 1, 0], [1, 1, 2, 0]]


@pytest.mark.parametrize("args, kwargs, words", [
    ((LABELS, 0, "iid"), {}, "n_clients must be >= 1, got 0"),
    ((LABELS[:5], 3, "iid"), {}, "5 samples cannot be split among 3 clients"),
    ((LABELS, 3, "shards"), {}, "unknown partition 'shards'; choose iid, dirichlet or pathological"),
    ((LABELS, 3, "dirichlet"), {"alpha": 0.0}, "alpha must be > 0, got 0.0"),
    ((LABELS, 3, "dirichlet"), {"alpha": -1.0}, "alpha must be > 0"),
    ((LABELS, 3, "pathological"), {"classes_per_client": 11}, r"classes-per-client \(11\) exceeds the 10 classes"),
    ((LABELS[:40], 20, "dirichlet"), {"alpha": 0.01, "min_size": 2}, "raise alpha or use fewer clients"),
])
def test_bad_arguments_raise_config_error_naming_the_problem(args, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        partition(*args, **kwargs)
