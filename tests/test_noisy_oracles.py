"""Noisy and differing oracles in a federation: per-site noise, "unsure" answers, second readings.

The readers are simulated per site (:func:`fedal.federation.simulated_oracle`); the centralized
reference of ``fedal compare`` must get the same answers the sites get.
"""
from __future__ import annotations

import numpy as np
import pytest

from clients.node import NodeConfig
from clients.oracles import make_oracle
from clients.site import ClientSite
from fedal.exceptions import ConfigError
from fedal.federation import client_data
from fedal.messages import TrainInstruction
from fedal.models import model_for
from fedal.oracle import UNSURE, VerifyingOracle
from simulations.compare import pooled_oracle
from site_helpers import global_state, make_site, site_config


def open_site(tmp_path, cfg, client_id=0, oracle="simulated"):
    node = make_site(tmp_path, cfg, client_id, oracle=oracle, labels=True)
    return ClientSite(cfg, NodeConfig.from_mapping(node))


def test_each_site_has_its_own_reliability(tmp_path):
    cfg = site_config(tmp_path, client_noise="0,1", initial_labels=20)
    wrong_share = []
    for client in (0, 1):
        site = open_site(tmp_path / str(client), cfg, client)
        site.train(global_state(site), TrainInstruction(1, 0))
        ids, labels = site.pool.labels()
        wrong_share.append(float(np.mean(labels != site.data.y_pool[site.learner.rows(ids)])))
        site.close()
    assert wrong_share == [0.0, 1.0]


def test_the_centralized_reference_gets_the_answers_the_sites_get(tmp_path):
    cfg = site_config(tmp_path, client_noise="0.2,0.5", noise_kind="neighbour", unsure_rate=0.1)
    parts = [client_data(cfg, c) for c in range(cfg.clients)]
    pooled = pooled_oracle(cfg, parts)
    offset = 0
    for c, part in enumerate(parts):
        node = NodeConfig.from_mapping({"client-id": c, "oracle": "simulated"})
        site_oracle = make_oracle(node, pool=None, data=part, state_dir=tmp_path, cfg=cfg)
        ids = list(range(len(part.y_pool)))
        mine = site_oracle.label(ids)
        assert pooled.label([offset + i for i in ids]) == {offset + i: mine[i] for i in ids}
        assert any(a is UNSURE for a in mine.values()) and any(a not in (UNSURE, y) for a, y in
                                                               zip(mine.values(), part.y_pool))
        offset += len(ids)


def test_second_readings_are_asked_where_a_trained_model_disagrees_and_reported(tmp_path):
    cfg = site_config(tmp_path, noise_rate=0.5, verify_threshold=0.6, initial_labels=20, round_budget=30)
    site = open_site(tmp_path, cfg)
    assert isinstance(site.oracle, VerifyingOracle)
    _, report = site.train(global_state(site), TrainInstruction(1, 0))
    assert report.labels_reviewed == 0  # round 1: no trained model to disagree with
    site.close()
    # a model trained on ground truth, as a good global model would be
    data = client_data(cfg, 0)
    trained = model_for(cfg, site.X_pool.shape[1:], data.n_classes, seed=0)
    trained.fit(site.X_pool, data.y_pool, epochs=20)
    site = open_site(tmp_path, cfg)
    _, report = site.train(trained.get_state(), TrainInstruction(2, 30))
    reviewed = report.labels_reviewed
    assert 0 < reviewed <= 30
    site.close()
    # the count lives in the site's database: a new process (the next message) goes on from it
    site = open_site(tmp_path, cfg)
    _, report = site.train(trained.get_state(), TrainInstruction(3, 0))
    assert report.labels_reviewed == reviewed
    site.close()


def test_second_readings_need_a_simulated_oracle(tmp_path):
    cfg = site_config(tmp_path, verify_threshold=0.9)
    with pytest.raises(ConfigError, match='verify-threshold .* needs oracle="simulated"'):
        open_site(tmp_path, cfg, oracle="web")
