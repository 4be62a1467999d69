"""The simulated oracle: ground truth, seeded label noise, clear errors."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fedal.exceptions import ConfigError, UnknownSampleError
from fedal.oracle import UNSURE, Oracle, ShardedOracle, SimulatedOracle, VerifyingOracle

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


def test_neighbour_noise_flips_only_to_an_adjacent_class():
    labels = truth(6)
    oracle = SimulatedOracle(labels, 6, noise_rate=0.3, seed=4, noise_kind="neighbour")
    got = answers(oracle, range(N))
    wrong = got != labels
    assert 0.27 < wrong.mean() < 0.33
    step = (got[wrong] - labels[wrong]) % 6
    assert set(step.tolist()) == {1, 5}  # y + 1 or y - 1, modulo the classes
    assert 0.45 < np.mean(step == 1) < 0.55
    assert "neighbour" in oracle.name


def test_unsure_answers_are_seeded_and_do_not_change_the_noise():
    labels = truth(4)
    noisy = SimulatedOracle(labels, 4, noise_rate=0.2, seed=9)
    unsure = SimulatedOracle(labels, 4, noise_rate=0.2, seed=9, unsure_rate=0.25)
    a, b = noisy.label(range(N)), unsure.label(range(N))
    skipped = [i for i in range(N) if b[i] is UNSURE]
    assert 0.22 < len(skipped) / N < 0.28
    assert all(b[i] == a[i] for i in range(N) if b[i] is not UNSURE)  # the same wrong answers
    assert SimulatedOracle(labels, 4, noise_rate=0.2, seed=9, unsure_rate=0.25).label(range(N)) == b


@pytest.mark.parametrize("kwargs, words", [
    ({"noise_kind": "gaussian"}, "noise_kind must be one of uniform, neighbour"),
    ({"unsure_rate": 1.0}, "unsure_rate must be in [0, 1)"),
])
def test_bad_noise_settings_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        SimulatedOracle(truth(3, n=10), 3, **kwargs)


def test_sharded_oracle_asks_each_sample_of_its_own_shard():
    first, second = truth(3, n=5, seed=1), truth(3, n=7, seed=2)
    oracle = ShardedOracle([SimulatedOracle(first, 3), SimulatedOracle(second, 3, noise_rate=1.0, seed=0)], [5, 7])
    got = oracle.label([0, 4, 5, 11])
    assert got[0] == first[0] and got[4] == first[4]
    assert got[5] != second[0] and got[11] != second[6]  # the second shard's reader is always wrong
    assert "noise=1" in oracle.name
    with pytest.raises(UnknownSampleError, match="outside the 12 samples"):
        oracle.label([12])


def test_verifying_oracle_asks_the_second_reader_only_where_a_confident_model_disagrees():
    labels = np.array([0, 1, 2, 0, 1])
    wrong = SimulatedOracle(labels, 3, noise_rate=1.0, seed=0)  # every first answer wrong
    right = SimulatedOracle(labels, 3)
    model_says = {0: (0, 0.99), 1: (1, 0.5), 2: (2, 0.95), 3: (0, 0.97), 4: (1, 0.99)}

    def predict(ids):
        return [model_says[i][0] for i in ids], [model_says[i][1] for i in ids]

    oracle = VerifyingOracle(wrong, right, predict, threshold=0.9)
    got = oracle.label(range(5))
    assert got == {0: 0, 1: wrong.label([1])[1], 2: 2, 3: 0, 4: 1}  # sample 1: model not confident, no review
    assert oracle.verifications == 4
    # no trained model yet: no review
    untrained = VerifyingOracle(wrong, right, lambda ids: None, threshold=0.9)
    assert untrained.label(range(5)) == wrong.label(range(5)) and untrained.verifications == 0
    with pytest.raises(ConfigError, match="verify threshold"):
        VerifyingOracle(wrong, right, predict, threshold=0.0)
