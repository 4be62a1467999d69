"""The simulated oracle: ground truth, seeded label noise, clear errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedal.exceptions import ConfigError, UnknownSampleError
from fedal.oracle import Oracle, SimulatedOracle

N = 10_000


def truth(n_classes: int, n: int = N, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_classes, size=n)


def answers(oracle: SimulatedOracle, ids) -> np.ndarray:
    out = oracle.label(list(ids))
    return np.array([out[int(i)] for i in ids])


def test_noise_free_answers_are_the_ground_truth():
    labels = truth(5, n=200)
    oracle = SimulatedOracle(labels, 5)
    assert isinstance(oracle, Oracle)
    assert oracle.label([17, 3, 150]) == {17: labels[17], 3: labels[3], 150: labels[150]}
    assert np.array_equal(answers(oracle, range(200)), labels)
    assert oracle.name == "simulated"


def test_custom_ids_map_to_their_labels():
    oracle = SimulatedOracle([2, 0, 1], 3, ids=[1000, 7, 42])
    assert oracle.label([7, 42, 1000]) == {7: 0, 42: 1, 1000: 2}
    with pytest.raises(UnknownSampleError, match="0"):
        oracle.label([0])


def test_answers_are_plain_ints():
    oracle = SimulatedOracle(np.array([1, 0]), 2, noise_rate=0.5)
    out = oracle.label(np.array([0, 1]))
    assert all(type(k) is int and type(v) is int for k, v in out.items())


@pytest.mark.parametrize("n_classes", [2, 3, 10])
@pytest.mark.parametrize("noise_rate", [0.1, 0.3])
def test_observed_flip_rate_matches_the_noise_rate(n_classes, noise_rate):
    labels = truth(n_classes)
    got = answers(SimulatedOracle(labels, n_classes, noise_rate=noise_rate, seed=3), range(N))
    flipped = got != labels
    # binomial sd is at most 0.005 here: 0.02 is four of them
    assert abs(flipped.mean() - noise_rate) < 0.02
    assert got.min() >= 0 and got.max() < n_classes


def test_wrong_answers_spread_over_the_other_classes():
    labels = np.zeros(N, dtype=np.int64)  # every true class is 0
    got = answers(SimulatedOracle(labels, 3, noise_rate=0.5, seed=0), range(N))
    wrong = got[got != 0]
    share_of_1 = (wrong == 1).mean()
    assert abs(share_of_1 - 0.5) < 0.05  # uniform among the two wrong classes


def test_full_noise_never_gives_the_true_class():
    labels = truth(4, n=2000)
    got = answers(SimulatedOracle(labels, 4, noise_rate=1.0, seed=0), range(2000))
    assert not np.any(got == labels)


def test_noise_is_deterministic_per_seed_and_per_id():
    labels = truth(10, n=1000)
    a = SimulatedOracle(labels, 10, noise_rate=0.3, seed=7)
    b = SimulatedOracle(labels, 10, noise_rate=0.3, seed=7)
    c = SimulatedOracle(labels, 10, noise_rate=0.3, seed=8)
    ids = list(range(1000))
    assert np.array_equal(answers(a, ids), answers(b, ids))
    assert not np.array_equal(answers(a, ids), answers(c, ids))
    # the same id gets the same answer whenever and however it is asked
    one_by_one = [a.label([i])[i] for i in reversed(ids)][::-1]
    assert one_by_one == answers(a, ids).tolist()
    assert a.name == "simulated(noise=0.3)"


def test_unknown_id_raises():
    oracle = SimulatedOracle([0, 1, 1], 2)
    with pytest.raises(UnknownSampleError, match="3"):
        oracle.label([0, 3])


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan])
def test_bad_noise_rate_raises(rate):
    with pytest.raises(ConfigError, match="noise_rate"):
        SimulatedOracle([0, 1], 2, noise_rate=rate)


def test_ids_must_align_with_labels():
    with pytest.raises(ConfigError, match="2 ids for 3 labels"):
        SimulatedOracle([0, 1, 1], 2, ids=[5, 6])
