"""The handover pipeline: the head serves first, the network takes over once the sites measure it better.

Unit tests of the model (rows of features and inputs, the serving flag, the state), of the server's
aggregation (the head solved from summed statistics, the network through Flower's strategy) and of the
switch rule; one federation on Flower's Simulation Engine shows the head served exactly as the head
pipeline serves it, then the switch with its event, flag and rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import audit_reply, audited_run, capturing_client_app, read_captures, small_config, \
    train_replies

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from fedal.features import WithInputs, featurizer_for, model_inputs
from fedal.flower import protocol
from fedal.models import HandoverClassifier, HeadClassifier, model_for
from fedal.models.handover_adapter import HEAD_PREFIX, NET_PREFIX, SERVING, prefixed, serving_of


def _cfg(**settings) -> FederationConfig:
    return FederationConfig(**{**dict(dataset="digits", pipeline="handover", clients=2, min_clients=2), **settings})


def _data(n=60, d=64, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
    return X, y


def _model(cfg=None, d=64, classes=3, seed=0) -> HandoverClassifier:
    return model_for(cfg or _cfg(), (2 * d,), classes, seed=seed, raw_shape=(d,))


def test_rows_are_features_then_inputs_and_the_serving_model_answers():
    X, y = _data()
    rows = model_inputs(featurizer_for("auto", (64,), "handover"), X)
    assert rows.shape == (60, 128) and np.array_equal(rows[:, 64:], X)  # digits: the head reads the raw rows too
    model = _model()
    model.fit(rows, y, unlabeled=rows[:10])
    head_probs = model.head.forward(rows[:, :64])[0]
    net_probs = model.net.forward(X)[0]
    assert model.serving == "head" and np.array_equal(model.forward(rows)[0], head_probs)
    model.serving = "network"
    assert np.array_equal(model.forward(rows)[0], net_probs)
    assert model.evaluate(rows, y) == model.net.evaluate(X, y)
    each = model.evaluate_each(rows, y)
    assert each["head"] == model.head.evaluate(rows[:, :64], y) and each["network"] == model.net.evaluate(X, y)


def test_the_state_carries_both_models_and_the_flag():
    X, y = _data()
    rows = np.hstack([X, X])
    model = _model()
    model.fit(rows, y)
    model.serving = "network"
    state = model.get_state()
    assert state[SERVING].tolist() == [1] and serving_of(state) == "network"
    assert any(k.startswith(HEAD_PREFIX) for k in state) and any(k.startswith(NET_PREFIX) for k in state)
    fresh = _model(seed=5)
    fresh.set_state(state)
    assert fresh.serving == "network" and np.allclose(fresh.forward(rows)[0], model.forward(rows)[0])
    with pytest.raises(ConfigError, match="'serving' flag"):
        fresh.set_state({k: v for k, v in state.items() if k != SERVING})
    with pytest.raises(ConfigError, match="serving flag is 0"):
        fresh.set_state({**state, SERVING: np.array([2])})
    with pytest.raises(ConfigError, match="rows of 64 features and an input of shape"):
        model.forward(X)
    assert set(model.buffer_keys()) == {SERVING} | {NET_PREFIX + k for k in model.net.buffer_keys()}


def test_budget_aware_picks_typical_head_features_while_the_head_serves_then_the_networks_margin():
    from fedal.strategies import QueryContext, get_strategy
    from fedal.strategies.uncertainty import margin

    X, y = _data()
    rows = model_inputs(featurizer_for("auto", (64,), "handover"), X)
    rows[:, 64:] = np.random.default_rng(1).normal(size=(60, 64)) * 100  # pixels that would swamp a clustering
    model = _model()
    model.fit(rows[:12], y[:12], unlabeled=rows[12:])  # the head is confident: a plain model would be past the switch
    strategy = get_strategy("budget_aware")
    ctx = QueryContext(np.arange(12, 60), rows[12:], model=model, labeled_X=rows[:12])
    assert strategy.low_budget(ctx)
    typical = get_strategy("typiclust").query(QueryContext(np.arange(12, 60), X[12:], labeled_X=X[:12]), 5, seed=3)
    assert np.array_equal(strategy.query(ctx, 5, seed=3), typical)  # the head's features, not the rows
    model.serving = "network"
    ctx = QueryContext(np.arange(12, 60), rows[12:], model=model, labeled_X=rows[:12])
    assert not strategy.low_budget(ctx)
    scores = margin(model.net.forward(rows[12:, 64:])[0])
    assert set(strategy.query(ctx, 5, seed=3).tolist()) == set((12 + np.argsort(-scores)[:5]).tolist())


def test_the_model_needs_the_inputs_shape_and_the_settings_refuse_dp():
    with pytest.raises(ConfigError, match="raw_shape"):
        model_for(_cfg(), (128,), 3, seed=0)
    with pytest.raises(ConfigError, match="cannot hold features"):
        model_for(_cfg(), (64,), 3, seed=0, raw_shape=(64,))
    with pytest.raises(ConfigError, match="differential privacy is not available with pipeline = handover"):
        _cfg(dp_clipping_norm=1.0)
    assert isinstance(featurizer_for("auto", (3, 28, 28), "handover"), WithInputs)


def test_a_site_caches_only_the_features(tmp_path):
    images = np.random.default_rng(0).random((5, 3, 28, 28), dtype=np.float32)
    cache = tmp_path / "features.npz"
    rows = model_inputs(featurizer_for("auto", (3, 28, 28), "handover"), images, cache)
    with np.load(cache) as f:
        features = f["features"]
    assert features.shape == (5, 373)
    assert rows.shape == (5, 373 + 3 * 28 * 28)
    assert np.array_equal(rows[:, :373], features) and np.array_equal(rows[:, 373:], images.reshape(5, -1))
    assert np.array_equal(model_inputs(featurizer_for("auto", (3, 28, 28), "handover"), images, cache), rows)


def _update(model: HandoverClassifier, X, y, shift: float) -> dict:
    """A site's reply: the head's statistics of (X, y) and its network moved by ``shift``."""
    labeled, pseudo, _ = model.head.statistics(X, y)
    state = prefixed({**labeled.to_arrays("stats"), **pseudo.to_arrays("pseudo")}, HEAD_PREFIX)
    state.update(prefixed({k: (v + shift).astype(v.dtype) if v.dtype.kind == "f" else v
                           for k, v in model.net.get_state().items()}, NET_PREFIX))
    state[SERVING] = model.get_state()[SERVING]
    return state


def test_the_server_solves_the_head_from_the_sums_and_steps_the_network_alone(flower_task, tmp_path):
    from fedal.budget import BudgetCoordinator
    from server.book import RoundBook
    from server.privacy import PrivacySettings
    from server.strategy import make_strategy

    cfg = _cfg(aggregation="fedadam", server_lr=0.01, output_dir=str(tmp_path))
    model = _model(cfg)
    book = RoundBook(BudgetCoordinator(cfg.budget_policy, cfg.round_budget), PrivacySettings.from_config(cfg))
    strategy = make_strategy(cfg, book, model)
    start = model.get_state()
    (X1, y1), (X2, y2) = _data(30, seed=1), _data(50, seed=2)
    updates = {1: (_update(model, X1, y1, 1.0), 30), 2: (_update(model, X2, y2, 1.0), 50)}
    messages, replies = train_replies(strategy, start, updates)
    assert set(messages[0].content[protocol.ARRAYS].keys()) == set(start)  # both models and the flag
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = protocol.state_from_record(arrays)
    assert set(got) == set(start) and serving_of(got) == "head"
    pooled = HeadClassifier(3, 64, shrinkage=None, pseudo_label_threshold=0.9)
    pooled.fit(np.concatenate([X1, X2]), np.concatenate([y1, y2]))
    for key, value in pooled.get_state().items():  # the head of every label pooled
        assert np.allclose(got[HEAD_PREFIX + key], value, rtol=1e-9, atol=1e-12), key
    # FedAdam's first step moves a weight by about eta towards the clients' mean (+1.0), not all the way
    for key in model.net.get_state():
        if key not in model.net.buffer_keys() and start[NET_PREFIX + key].dtype.kind == "f":
            step = got[NET_PREFIX + key] - start[NET_PREFIX + key]
            assert np.all((step > 0) & (step < 0.05)), key
    assert metrics[protocol.WEIGHT_KEY] == 80


def test_the_network_takes_over_when_the_sites_measure_it_at_least_as_good():
    from server.handover import handover_due, serve_network

    assert not handover_due("head", None)
    assert not handover_due("head", {"eval-acc": 0.8})
    assert not handover_due("head", {"eval-acc-head": 0.81, "eval-acc-network": 0.80})
    assert handover_due("head", {"eval-acc-head": 0.80, "eval-acc-network": 0.80})
    assert not handover_due("network", {"eval-acc-head": 0.9, "eval-acc-network": 0.2})  # never undone
    arrays = serve_network(protocol.model_record(_model().get_state()))
    assert serving_of(protocol.state_from_record(arrays)) == "network"


# ------------------------------------------------------------------ a federation
@pytest.mark.slow
def test_a_federation_serves_the_head_as_the_head_pipeline_does_then_hands_over(tmp_path, monkeypatch):
    """3 clients, 3 rounds of digits (the shared audited head-pipeline run's settings): while the head serves,
    every round's labels and accuracy are the head pipeline's; the switch (decided here at round 3's evaluation,
    whatever the sites measured) makes the network serve, says so in an event and travels in the checkpoint.
    Every reply passes the privacy audit with the handover's arrays and evaluation metrics."""
    import server.app
    from federation_helpers import CAPTURE_ENV
    from server import handover
    from simulations.engine import run_in_simulation

    _, head_run, _ = audited_run()
    decisions = []

    def switch_at_round_3(serving, client_eval):
        decisions.append(dict(client_eval))
        return len(decisions) == 3

    monkeypatch.setattr(server.app, "handover_due", switch_at_round_3)
    capture = tmp_path / "captures"
    capture.mkdir()
    cfg = small_config(tmp_path / "run", pipeline="handover", state_dir=str(tmp_path / "state"))
    monkeypatch.setenv(CAPTURE_ENV, str(capture))
    run_in_simulation(cfg, cpus=2, client_app=capturing_client_app())
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    rows, head_rows = results["rounds"], head_run["rounds"]
    assert [r["serving"] for r in rows] == ["head", "head", "network"]
    for row, head_row in zip(rows, head_rows):
        assert row["labels"] == head_row["labels"]
        assert row["head_accuracy"] == pytest.approx(head_row["accuracy"], abs=1e-12)
    assert rows[0]["accuracy"] == rows[0]["head_accuracy"] and rows[2]["accuracy"] == rows[2]["network_accuracy"]
    assert all(0.0 <= d["eval-acc-head"] <= 1.0 and 0.0 <= d["eval-acc-network"] <= 1.0 for d in decisions)
    events = [e for e in results.get("events", []) if e["kind"] == "handover"]
    assert len(events) == 1 and events[0]["round"] == 3 and "the network serves" in events[0]["detail"]
    from server.results import RunRecorder

    _, state, _ = RunRecorder(cfg.output_dir, cfg.to_run_config()).load_checkpoint()
    assert serving_of(state) == "network"
    model = _model(cfg, classes=10)
    shapes = model.update_shapes()
    captures = read_captures(capture)
    assert {c["message_type"] for c in captures} >= {"train", "evaluate"}
    assert [p for c in captures for p in audit_reply(c, shapes, eval_metrics=handover.EVAL_METRICS)] == []
