"""Network differential privacy under secure aggregation (``dp-mode = client`` with ``secure-aggregation = true``):
every site clips its change, weighs it 1 and adds its Skellam share of the noise before masking
(:class:`fedal.dp.UpdateNoise`), so the server unmasks a sum that is already noisy; the rounds are composed in the
round book's accountant through dp-accounting."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from federation_helpers import small_config

from fedal.dp import GRID_BITS, UpdateNoise, network_noise
from fedal.exceptions import ConfigError
from fedal.secure import LIMBS, FixedPoint
from server.privacy import DISTRIBUTED, PrivacySettings

D = 4000  # entries of the toy update: enough for the noise's std to be measured to a few percent


def _codec(noise: UpdateNoise | None, rng=None, clip=1.0) -> FixedPoint:
    return FixedPoint(max_count=1000, feature_bound=0.0, clip_norm=clip, update_noise=noise, noise_rng=rng,
                      equal_weights=True)


def _sum(encoded):
    return [sum(e[j] for e in encoded) for j in range(LIMBS)]


def test_sites_shares_make_the_whole_noise_and_the_mean_of_the_clipped_changes():
    noise = UpdateNoise(noise_multiplier=0.8, clip_norm=1.0, fewest_sites=3)
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=D).astype(np.float32)}
    sites = [{"w": g["w"] + rng.normal(scale=s, size=D).astype(np.float32)} for s in (0.001, 0.1, 1.0)]
    shares: list[dict] = [{} for _ in sites]
    # each site's weight (its labeled samples) is ignored: equal weights bound one site's effect by the clip norm
    encoded = [_codec(noise, np.random.default_rng(10 + i)).encode(u, g, weight=n, noise_out=shares[i])
               for i, (u, n) in enumerate(zip(sites, (5, 50, 500)))]
    server = _codec(noise)  # the server's codec adds nothing
    assert server == _codec(noise, np.random.default_rng(1))  # the same encoding on the sites and the server
    out = server.decode(_sum(encoded), g, total_weight=3)
    clipped = []
    for u in sites:
        d = u["w"].astype(np.float64) - g["w"]
        clipped.append(d * min(1.0, 1.0 / np.linalg.norm(d)))
    clean = g["w"] + sum(clipped) / 3
    error = (out["w"].astype(np.float64) - clean) * 3  # the noise on the sum
    assert np.std(error) == pytest.approx(noise.sum_std(3), rel=0.05)
    # the weakest observer (a site that knows its own share) still faces sigma C on every entry of the sum
    rest = error - shares[0]["w"]
    assert np.std(rest) == pytest.approx(noise.noise_multiplier * noise.clip_norm, rel=0.05)
    assert np.std(shares[0]["w"]) == pytest.approx(0.8 / math.sqrt(2), rel=0.05)
    # and no entry is free of noise: the server never holds the un-noised sum
    assert np.mean(np.abs(error) < 1e-3 * noise.noise_multiplier) < 0.01


def test_a_curious_site_of_two_reads_the_others_update_exactly_without_the_noise_and_not_with_it():
    rng = np.random.default_rng(2)
    g = {"w": rng.normal(size=D).astype(np.float32)}
    other, own = ({"w": g["w"] + rng.normal(scale=0.005, size=D).astype(np.float32)} for _ in range(2))
    for noise in (None, UpdateNoise(1.0, 1.0, 2)):
        mine: dict = {}
        sites = [_codec(noise, np.random.default_rng(3)), _codec(noise, np.random.default_rng(4))]
        total = _codec(noise).decode(_sum([sites[0].encode(other, g, 1), sites[1].encode(own, g, 1, noise_out=mine)]),
                                     g, total_weight=2)
        # what site 2 knows: the global model before and after, its own update and its own noise share
        guess = 2 * (total["w"].astype(np.float64) - g["w"]) - (own["w"].astype(np.float64) - g["w"]) - mine.get("w", 0)
        error = guess - (other["w"].astype(np.float64) - g["w"])
        if noise is None:  # secure aggregation alone: the other site's update, to the float32 rounding of the model
            assert np.max(np.abs(error)) < 1e-6
        else:  # the other site's share alone: noise sigma C = 1 on every entry, 200 times the update's own scale
            assert np.std(error) == pytest.approx(1.0, rel=0.05)


def test_without_noise_the_codec_clips_and_weighs_alike_exactly():
    rng = np.random.default_rng(1)
    g = {"w": rng.normal(size=(5, 4)).astype(np.float32)}
    sites = [{"w": g["w"] + 0.01}, {"w": g["w"] + 10.0}]
    codec = _codec(None, rng, clip=2.0)
    out = codec.decode(_sum([codec.encode(u, g, weight=n) for u, n in zip(sites, (1, 99))]), g, total_weight=2)
    big = np.full((5, 4), 10.0) * (2.0 / np.sqrt(20 * 100.0))
    np.testing.assert_allclose(out["w"], g["w"] + (0.01 + big) / 2, atol=1e-6)


def test_the_settings_take_distributed_noise_under_secure_aggregation_only_on_the_sites(tmp_path):
    with pytest.raises(ConfigError, match='set dp-mode = "client"'):
        small_config(tmp_path, pipeline="network", secure_aggregation=True, dp_clipping_norm=1.0,
                     dp_noise_multiplier=1.0)
    cfg = small_config(tmp_path, pipeline="network", secure_aggregation=True, dp_clipping_norm=1.0,
                       dp_noise_multiplier=1.0, dp_mode="client", clients=10, min_clients=10, secure_threshold=0.5)
    assert cfg.distributed_dp and cfg.sites_add_noise and not cfg.head_private
    assert network_noise(cfg) == UpdateNoise(1.0, 1.0, 5)
    clear = small_config(tmp_path, pipeline="network", dp_clipping_norm=1.0, dp_noise_multiplier=1.0)
    assert not clear.distributed_dp and network_noise(clear) is None
    clipping_only = small_config(tmp_path, pipeline="network", secure_aggregation=True, dp_clipping_norm=1.0,
                                 dp_mode="client")
    assert not clipping_only.distributed_dp and PrivacySettings.from_config(clipping_only).accounted() is False


def test_the_accountant_composes_each_unmasked_sum_as_a_gaussian_of_barely_less_noise(tmp_path):
    cfg = small_config(tmp_path, pipeline="network", secure_aggregation=True, dp_clipping_norm=1.0,
                       dp_noise_multiplier=1.2, dp_mode="client", aggregation="fedadam", rounds=20)
    settings = PrivacySettings.from_config(cfg, entries=10_000)
    assert settings.mode == DISTRIBUTED and settings.accounted()  # a server optimiser is post-processing here
    assert 0.99 * 1.2 < settings.release(3).noise_multiplier < 1.2
    assert settings.distributed_epsilon(0) == 0.0
    eps = [settings.distributed_epsilon(t) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    # a coarser grid would cost more: the noise is 2^GRID_BITS steps, so the rounding is a millionth of it
    assert UpdateNoise(1.2, 1.0, 2).step() == pytest.approx(1.2 / 2 ** GRID_BITS)


@pytest.mark.slow
def test_a_private_secure_network_run_on_flowers_simulation_engine_spends_the_epsilon_it_planned(tmp_path):
    from simulations.engine import run_in_simulation

    cfg = small_config(tmp_path / "run", pipeline="network", secure_aggregation=True, dp_clipping_norm=2.0,
                       dp_noise_multiplier=0.01, dp_mode="client", rounds=3, round_budget=60,
                       state_dir=str(tmp_path / "state"))
    run_in_simulation(cfg, cpus=2)
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["aggregated"] for r in rows)
    privacy = [r["privacy"] for r in rows]
    assert all(p["mode"] == DISTRIBUTED for p in privacy)
    assert [p["releases"] for p in privacy] == [1, 2, 3]
    assert 0 < privacy[0]["epsilon"] < privacy[1]["epsilon"] < privacy[2]["epsilon"]
    assert privacy[2]["epsilon"] == pytest.approx(privacy[2]["epsilon_planned"], rel=1e-9)
    assert privacy[2]["fewest_sites_in_a_sum"] == 2
    # digits, 3 sites, noise 0.01 x 2 on the sum: it learns (0.50 seen; 0.55 clipped without noise, 0.30 at noise
    # 0.05, 0.09 at 0.3: a client-level guarantee over 3 sites costs that much, docs/PRIVACY.md)
    assert rows[-1]["accuracy"] > 0.3
    for row in rows:  # the per-site scalars computed from the labels stay on the sites
        for entry in row["clients"].values():
            assert entry["train_loss"] is None and entry["label_entropy"] is None
