"""The private head pipeline (fedal.dp): noise on the sites, its accounting, its encoding, the ledger of releases,
a head that solves at any noise, and the attacks of docs/PRIVACY.md, off and on."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedal.config import FederationConfig
from fedal.dp import (
    GRID_BITS,
    Centre,
    StatisticsNoise,
    centring,
    epsilon,
    noise_for_epsilon,
    release_due,
    released_entries,
    run_noise,
    sample_epsilon,
    skellam_noise_multiplier,
)
from fedal.exceptions import ConfigError
from fedal.heads import ClassStatistics, LDAHead


# --------------------------------------------------------------- accounting
def test_composition_of_gaussian_releases_is_one_release_of_smaller_noise():
    # Renyi DP of the Gaussian mechanism adds up: k releases at sigma are one at sigma / sqrt(k)
    assert epsilon([(2.0, 4)], 1e-5) == pytest.approx(epsilon([(1.0, 1)], 1e-5), rel=1e-9)
    assert epsilon([(1.0, 1), (1.0, 1)], 1e-5) == pytest.approx(epsilon([(1.0, 2)], 1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(1.0, 2)], 1e-5) > epsilon([(1.0, 1)], 1e-5) > epsilon([(2.0, 1)], 1e-5)


def test_the_noise_for_a_target_epsilon_is_the_smallest_that_stays_within_it():
    entries = released_entries(8, 50)
    for target in (1.0, 3.0, 8.0):
        sigma = noise_for_epsilon(target, 2, 1e-5, 4.0, 1, entries)
        assert sample_epsilon(StatisticsNoise(sigma, 4.0), 2, 1e-5, entries, pool_releases=2) <= target
        assert sample_epsilon(StatisticsNoise(sigma * 0.99, 4.0), 2, 1e-5, entries, pool_releases=2) > target
    with pytest.raises(ConfigError, match="head-dp-epsilon"):
        noise_for_epsilon(0.0, 1, 1e-5, 4.0, 1, entries)


def test_the_skellam_bound_is_a_gaussian_of_barely_less_noise_at_the_grid():
    mu = 4.0 ** GRID_BITS  # the weakest observer's noise, in steps
    l2 = 2.0 ** GRID_BITS / 1.5  # sigma = 1.5
    effective = skellam_noise_multiplier(math.sqrt(100) * l2, l2, mu)
    assert 0.99 * math.sqrt(mu) / l2 < effective < math.sqrt(mu) / l2
    # a coarse grid (little noise in steps) costs visibly more
    assert skellam_noise_multiplier(10.0, 1.0, 4.0) < 0.95 * math.sqrt(4.0)


def test_a_run_plans_its_noise_from_its_epsilon_and_its_secure_sums():
    clear = FederationConfig(clients=10, min_clients=10, head_clip_norm=4.0, head_dp_epsilon=3.0)
    secure = FederationConfig(clients=10, min_clients=10, head_clip_norm=4.0, head_dp_epsilon=3.0,
                              secure_aggregation=True, secure_threshold=0.5)
    a, b = run_noise(clear, 8, 60), run_noise(secure, 8, 60)
    assert not a.secure and b.secure and b.fewest_sites == 5
    assert b.share_std("stats.sums") == pytest.approx(b.std("stats.sums") / 2.0)  # 4 shares make the whole
    entries = released_entries(8, 60)
    # in the clear head-dp-releases (2) releases per sample; under secure aggregation one (a reply outside the sum
    # was never unmasked), so less noise for the same epsilon
    assert sample_epsilon(a, 2, 1e-5, entries, pool_releases=2) == pytest.approx(3.0, rel=1e-3)
    assert sample_epsilon(b, 1, 1e-5, entries, pool_releases=1) == pytest.approx(3.0, rel=1e-3)
    assert b.noise_multiplier < a.noise_multiplier
    assert run_noise(FederationConfig(), 8, 60) is None
    assert run_noise(FederationConfig(head_clip_norm=4.0, head_dp_noise=1.5), 8, 60).noise_multiplier == 1.5


# --------------------------------------------------------------- the noise itself
def test_the_clear_noise_has_each_blocks_calibrated_std_and_a_symmetric_scatter():
    noise = StatisticsNoise(1.0, 3.0, dim=30).centred(Centre(np.zeros(30), 2.0))
    rng = np.random.default_rng(0)
    zeros = {"stats.counts": np.zeros(2000), "stats.sums": np.zeros((40, 30)), "pool.counts": np.zeros(2000),
             "pool.sums": np.zeros((1, 3000)), "pool.scatter": np.zeros((60, 60))}
    noisy = noise.add_gaussian(zeros, rng)
    for key, value in noisy.items():
        flat = value[np.triu_indices(60)] if key.endswith("scatter") else value.ravel()
        assert np.std(flat) == pytest.approx(noise.std(key), rel=0.08), key
    np.testing.assert_array_equal(noisy["pool.scatter"], noisy["pool.scatter"].T)
    # the labels' blocks scale with the centred clip, the pool's with the run's
    assert noise.std("stats.sums") / noise.std("stats.counts") == pytest.approx(
        2.0 * math.sqrt(noise.share("stats.counts") / noise.share("stats.sums")))
    assert noise.std("pool.scatter") == pytest.approx(2.0 * 9.0 / math.sqrt(0.8))


def test_secure_shares_sum_to_the_whole_noise_on_the_grid_and_decode_to_the_noisy_sum():
    from fedal.secure import FixedPoint

    sites = 5
    noise = StatisticsNoise(1.0, 3.0, fewest_sites=sites, dim=4)
    rng = np.random.default_rng(1)
    arrays = {"stats.counts": np.array([3.0, 1.0]), "stats.sums": np.ones((2, 4)),
              "pool.counts": np.array([10.0]), "pool.sums": np.ones((1, 4)), "pool.scatter": np.eye(4)}
    reference = {k: np.zeros(v.shape) for k, v in arrays.items()}
    site_codec = FixedPoint(max_count=2 ** 20, feature_bound=3.0, clip_norm=100.0, noise=noise, noise_rng=rng)
    server_codec = FixedPoint(max_count=2 ** 20, feature_bound=3.0, clip_norm=100.0, noise=noise)
    draws = []
    for _ in range(400):  # many rounds of 5 sites: the sum's noise is the whole noise and a share more
        limbs = [site_codec.encode(arrays, {}, 0) for _ in range(sites)]
        total = server_codec.decode([sum(lb[i] for lb in limbs) for i in range(3)], reference, 0)
        draws.append(total["stats.sums"] - sites * arrays["stats.sums"])
    draws = np.array(draws)
    assert abs(draws.mean()) < 0.1 * noise.std("stats.sums")
    assert draws.std() == pytest.approx(math.sqrt(noise.sum_variance("stats.sums", sites)), rel=0.05)
    # without a noise generator (the server's side), the grid alone: exact to a millionth of the noise
    exact = server_codec.decode(server_codec.encode(arrays, {}, 0), reference, 0)
    assert np.max(np.abs(exact["stats.sums"] - arrays["stats.sums"])) <= noise.step("stats.sums")


def test_the_centre_is_read_from_the_pools_sums_or_from_what_the_server_fixed():
    rng = np.random.default_rng(2)
    X = rng.normal(1.0, 0.5, (500, 6))
    pool = ClassStatistics.from_samples(X, np.zeros(500, int), 1).to_arrays("pool")
    centre = centring(pool, 10.0)
    np.testing.assert_allclose(centre.mean, X.mean(0))
    assert centre.clip == pytest.approx(1.25 * math.sqrt(np.trace(np.cov(X.T, bias=True))), rel=1e-6)
    fixed = {**pool, "centre.mean": np.zeros(6), "centre.clip": np.array([0.7])}
    assert centring(fixed, 10.0).clip == 0.7 and not centring(fixed, 10.0).mean.any()
    assert centring(None, 1.0) is None and centring({"stats.counts": np.ones(2)}, 1.0) is None
    assert np.all(np.linalg.norm(centre.apply(X * 10), axis=1) <= centre.clip + 1e-9)


def test_labels_are_released_when_they_have_grown_half_again_and_in_the_last_round():
    assert release_due(50, 0, False) and not release_due(70, 50, False) and release_due(75, 50, False)
    assert release_due(80, 75, True) and not release_due(75, 75, True)


# --------------------------------------------------------------- the private head
def test_the_private_head_solves_at_any_noise_and_matches_the_clear_one_without_noise():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    pool_stats = ClassStatistics.from_samples(X, np.zeros(len(X), int), 1)
    centre = X.mean(0)
    labeled = ClassStatistics.from_samples(X[:600] - centre, y[:600], 10)
    none = {k: 0.0 for k in ("stats.counts", "stats.sums", "pool.counts", "pool.sums", "pool.scatter")}
    head = LDAHead.from_private(labeled, pool_stats, none, centre=centre)
    clear = LDAHead.from_statistics(ClassStatistics.from_samples(X[:600], y[:600], 10))
    test = slice(1000, None)
    acc = lambda h: float((h.probs(X[test]).argmax(1) == y[test]).mean())  # noqa: E731
    # the total covariance of the pools in place of the labels' within-class one: 0.79 against 0.90 on digits
    assert acc(head) > 0.75 and acc(head) > acc(clear) - 0.15
    rng = np.random.default_rng(3)
    for std in (0.1, 10.0, 1e4):  # noise far above the signal: still a positive definite head, never an error
        noisy_pool = ClassStatistics(pool_stats.counts + 5.0, pool_stats.sums + rng.normal(0, std, (1, 64)),
                                     pool_stats.scatter + rng.normal(0, std, (64, 64)))
        noisy = ClassStatistics(labeled.counts + rng.normal(0, 1.0, 10), labeled.sums + rng.normal(0, std, (10, 64)),
                                np.zeros((64, 64)))
        variance = {"stats.counts": 1.0, "stats.sums": std ** 2, "pool.counts": 1.0, "pool.sums": std ** 2,
                    "pool.scatter": std ** 2}
        h = LDAHead.from_private(noisy, noisy_pool, variance, centre=centre)
        assert np.all(np.isfinite(h.probs(X[test])))
    with pytest.raises(ConfigError, match="count noise"):
        LDAHead.from_private(ClassStatistics(np.ones(10), np.zeros((10, 64)), np.zeros((64, 64))), pool_stats,
                             {**none, "stats.counts": 100.0})


# --------------------------------------------------------------- the site's ledger
def _private_site(tmp_path, **extra):
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.federation import client_data

    cfg = FederationConfig.from_mapping({"dataset": "digits", "clients": 3, "min-clients": 3, "initial-labels": 4,
                                         "head-clip-norm": 4.0, "head-dp-noise": 1.0, "strategy": "random", **extra})
    node = NodeConfig.from_mapping({"client-id": 0, "state-dir": str(tmp_path), "oracle": "simulated"})
    return cfg, lambda: ClientSite(cfg, node, client_data(cfg, 0))


def test_a_site_sends_each_label_once_again_after_a_lost_reply_and_holds_it_back_past_the_limit(tmp_path, caplog):
    from fedal.messages import TrainInstruction

    cfg, open_site = _private_site(tmp_path, **{"head-dp-releases": 2})
    site = open_site()
    state = site.model.get_state()
    arrays, report = site.train(state, TrainInstruction(1, 0))  # the pool's statistics; no centre yet: no label
    count_std = run_noise(cfg, site.model.n_classes, site.model.dim).std("pool.counts")  # 8.9: the noise is fresh
    assert arrays["pool.counts"][0] == pytest.approx(len(site.X_pool), abs=6 * count_std) and report.dp_releases == 1
    assert math.isnan(report.train_loss) and math.isnan(report.label_entropy)  # nothing over the labels
    pool = {k: v for k, v in arrays.items() if k.startswith("pool")}
    site.close()

    def sent(server_round, included):
        s = open_site()
        try:
            s.train(state, TrainInstruction(server_round, 2, dp_included=included), global_stats=pool)
            return json.loads(s.pool.get_meta("dp-ledger"))[str(server_round)], s.dp_releases
        finally:
            s.close()

    first, _ = sent(2, "1")  # round 1 reached the sums: the pool is settled; 4 initial labels and 2 asked go out
    assert len(first["labels"]) == 6 and not first["pool"]
    again, releases = sent(3, "1")  # round 2's reply did not reach the sums: its labels again, and two new ones
    assert set(first["labels"]) < set(again["labels"]) and len(again["labels"]) == 8 and releases == 2
    with caplog.at_level("WARNING", logger="fedal.client"):
        third, _ = sent(4, "1")  # lost again: the first four were in 2 replies already, the most allowed
    assert not set(first["labels"]) & set(third["labels"]) and "held back" in caplog.text
    settled, _ = sent(5, "1,4")  # round 4 reached the sums: nothing of it again
    assert not set(third["labels"]) & set(settled["labels"])


def test_under_secure_aggregation_a_reply_outside_the_sum_is_not_counted(tmp_path):
    from fedal.messages import TrainInstruction

    cfg, open_site = _private_site(tmp_path, **{"secure-aggregation": True, "head-dp-releases": 1})
    site = open_site()
    state = site.model.get_state()
    arrays, _ = site.train(state, TrainInstruction(1, 0))
    site.close()
    pool = {k: v for k, v in arrays.items() if k.startswith("pool")}
    for server_round in (2, 3, 4):  # never in the sum (never unmasked): sent every time, never held back
        s = open_site()
        s.train(state, TrainInstruction(server_round, 1, dp_included="1"), global_stats=pool)
        assert len(json.loads(s.pool.get_meta("dp-ledger"))[str(server_round)]["labels"]) >= 4
        s.close()


# --------------------------------------------------------------- the attacks, off and on
@pytest.fixture(scope="module")
def attacks():
    from simulations.attacks import run_all

    return {name: (off, on) for name, off, on in run_all(rounds=6, epsilon=8.0)}


@pytest.mark.parametrize("name", ["server difference", "site difference", "dropout difference", "eigen-split"])
def test_each_attack_recovers_labeled_vectors_exactly_without_protection_and_none_with_it(attacks, name):
    off, on = attacks[name]
    assert off.exact >= 1, off  # the attack works: the test can fail
    assert on.exact == 0 and on.close == 0, on


# --------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_private_secure_run_on_flowers_simulation_engine_reports_its_planned_and_spent_epsilon(tmp_path):
    from simulations.engine import run_in_simulation

    cfg = FederationConfig.from_mapping({
        "dataset": "digits", "clients": 3, "min-clients": 3, "rounds": 4, "initial-labels": 30, "round-budget": 90,
        "head-clip-norm": 4.0, "head-dp-epsilon": 8.0, "secure-aggregation": True, "strategy": "random",
        "output-dir": str(tmp_path / "run"), "state-dir": str(tmp_path / "state")})
    run_in_simulation(cfg, cpus=2)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[-1]["labels"] == 90 + 3 * 90
    privacy = rows[-1]["privacy"]
    assert privacy["mode"] == "statistics-on-sites" and privacy["secure"]
    assert privacy["epsilon_planned"] == pytest.approx(8.0, rel=1e-3)
    assert 0 < privacy["epsilon"] <= privacy["epsilon_planned"] and privacy["releases_made"] == 1
    assert rows[-1]["accuracy"] > 0.2  # 360 labels under noise of epsilon 8 (0.25 to 0.45 seen): above chance, 0.1
    for row in rows:  # the per-site scalars a private run leaves out
        for entry in row["clients"].values():
            assert entry["train_loss"] is None and entry["label_entropy"] is None and entry["batch_diversity"] is None
