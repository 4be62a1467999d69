"""Secure aggregation (``secure-aggregation = true``): Flower's SecAgg+ sums what the sites send.

The fixed-point encoding (:mod:`fedal.secure`) on its own; then real simulations: the secure run gives
the clear run's model, round for round (head and network pipelines), survives a site dropping out after
it shared its keys (the same model as the clear run where that site fails), and the server receives
nothing but the protocol's keys, masked vectors and the report scalars (the secure audit, which flags a
leak). The minimum count of clear statistics (``min-class-count``) is tested on a site.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (
    CLEAR_ENV,
    audit_secure_reply,
    secure_capturing_client_app,
    small_config,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedal.exceptions import ConfigError
from fedal.heads import ClassStatistics
from fedal.secure import LIMBS, FixedPoint, renew_released

#: digits rows hold 64 values in [0, 1]: their norm is at most 8
DIGITS_BOUND = 8.0


# --------------------------------------------------------------------- the encoding
def _sites(n=3, d=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        X = rng.random((15, d)) * 2 - 1
        y = rng.integers(0, k, 15)
        out.append({**ClassStatistics.from_samples(X, y, k).to_arrays("stats"),
                    **ClassStatistics.from_samples(X[:4], y[:4], k).to_arrays("pseudo")})
    return out


def test_summed_limbs_decode_to_the_sum_of_the_statistics_within_the_stated_step():
    codec = FixedPoint(max_count=2 ** 20, feature_bound=np.sqrt(6), clip_norm=100.0)
    sites = _sites()
    encoded = [codec.encode(s, {}, weight=15) for s in sites]
    assert all(len(e) == LIMBS for e in encoded)
    sums = [sum(e[j] for e in encoded) for j in range(LIMBS)]
    decoded = codec.decode(sums, {k: np.zeros_like(v) for k, v in sites[0].items()}, total_weight=45)
    for key, value in decoded.items():
        clear = sum(s[key] for s in sites)
        kind = key.rsplit(".", 1)[1]
        bound = len(sites) * codec.step({"counts": "count", "sums": "sum", "scatter": "scatter"}[kind]) / 2
        assert np.max(np.abs(value - clear)) <= bound * 1.01 + 1e-12, key
    np.testing.assert_array_equal(decoded["stats.counts"], sum(s["stats.counts"] for s in sites))  # counts exact
    np.testing.assert_array_equal(decoded["stats.scatter"], decoded["stats.scatter"].T)


def test_weights_decode_to_fedavg_of_the_clipped_changes():
    rng = np.random.default_rng(1)
    g = {"w": rng.normal(size=(3, 4)).astype(np.float32), "steps": np.array(7, dtype=np.int64)}
    codec = FixedPoint(max_count=1000, feature_bound=0.0, clip_norm=5.0)
    updates = [({"w": g["w"] + rng.normal(scale=0.1, size=(3, 4)).astype(np.float32), "steps": np.array(9)}, 10),
               ({"w": g["w"] + 50.0, "steps": np.array(9)}, 30)]  # a change of norm ~173: clipped to 5
    clipped = []
    encoded = [codec.encode(u, g, weight=n, on_clip=clipped.append) for u, n in updates]
    assert len(clipped) == 1 and clipped[0] > 100  # the second site's change only, with its norm
    sums = [sum(e[j] for e in encoded) for j in range(LIMBS)]
    out = codec.decode(sums, g, total_weight=40)
    changes = []
    for u, n in updates:
        d = {k: np.asarray(u[k], np.float64) - np.asarray(g[k], np.float64) for k in g}
        norm = np.sqrt(sum(np.sum(v * v) for v in d.values()))
        changes.append((d, n * min(1.0, 5.0 / norm)))
    want = g["w"].astype(np.float64) + sum(d["w"] * s for d, s in changes) / 40
    np.testing.assert_allclose(out["w"], want.astype(np.float32), rtol=0, atol=1e-6)
    assert out["w"].dtype == np.float32 and out["steps"].dtype == np.int64
    assert codec.decode(sums, g, total_weight=0)["steps"] == 7  # no labels anywhere: the global model stays


def test_bad_values_are_refused_on_the_device():
    codec = FixedPoint(max_count=10, feature_bound=1.0, clip_norm=1.0)
    stats = ClassStatistics.from_samples(np.ones((3, 2)), np.array([0, 1, 1]), 2).to_arrays("stats")
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.encode({**stats, "stats.sums": np.full((2, 2), np.nan)}, {}, weight=3)
    with pytest.raises(ValueError, match="exceeds the secure aggregation range"):
        codec.encode({**stats, "stats.counts": np.array([11.0, 0.0])}, {}, weight=3)
    with pytest.raises(ValueError, match="exceed secure-max-count"):
        codec.encode({"w": np.zeros(2)}, {"w": np.zeros(2)}, weight=11)
    with pytest.raises(ValueError, match="secure sum holds"):
        codec.decode([np.zeros(3)] * LIMBS, stats, total_weight=1)


def test_settings_refuse_what_secure_aggregation_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="krum"):
        small_config(tmp_path, secure_aggregation=True, pipeline="network", aggregation="krum")
    with pytest.raises(ConfigError, match='set dp-mode = "client"'):  # the server cannot clip what it never sees
        small_config(tmp_path, secure_aggregation=True, pipeline="network", dp_clipping_norm=1.0)
    with pytest.raises(ConfigError, match="at least 2 sites"):
        small_config(tmp_path, secure_aggregation=True, clients=1, min_clients=1)
    with pytest.raises(ConfigError, match="secure-threshold"):
        small_config(tmp_path, secure_aggregation=True, secure_threshold=0.0)
    cfg = small_config(tmp_path, secure_aggregation=True)
    assert cfg.clear_min_count == 1 and small_config(tmp_path).clear_min_count == 2


def test_raw_features_need_a_bound_and_descriptors_have_one(tmp_path):
    from fedal.models import statistics_clip_norm

    with pytest.raises(ConfigError, match="head-clip-norm"):
        statistics_clip_norm(small_config(tmp_path, secure_aggregation=True), (64,))
    cfg = small_config(tmp_path, secure_aggregation=True, dataset="bloodmnist")
    assert 5.0 < statistics_clip_norm(cfg, (3, 28, 28)) < 5.1
    assert statistics_clip_norm(small_config(tmp_path), (64,)) == 0.0  # no secure aggregation: no clipping


def test_released_statistics_renew_only_with_min_count_new_labels():
    assert renew_released({1: 0}, {}, 2) == {}  # one label of class 0: not sent
    first = renew_released({1: 0, 2: 0, 3: 1}, {}, 2)
    assert first == {0: [1, 2]}
    assert renew_released({1: 0, 2: 0, 3: 1, 4: 0}, first, 2) == first  # one new label: the old set stays
    assert renew_released({1: 0, 2: 0, 3: 1, 4: 0, 5: 0}, first, 2) == {0: [1, 2, 4, 5]}
    assert renew_released({1: 0, 3: 1}, {}, 1) == {0: [1], 1: [3]}  # 1: always current


# --------------------------------------------------------------------- the site's mod
def _context(node_config, state=None):
    return Context(run_id=1, node_id=1, node_config=node_config, state=state or RecordDict(), run_config={})


def test_a_secure_only_site_refuses_a_clear_train_message(flower_task):
    from clients.secure import SecureAggregationRefused, secure_aggregation_mod

    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=1, message_type="train")
    answered = []
    secure_aggregation_mod(msg, _context({"partition-id": 0}), lambda m, c: answered.append(m) or m)
    assert answered  # an ordinary site answers
    with pytest.raises(SecureAggregationRefused, match="secure-only"):
        secure_aggregation_mod(msg, _context({"partition-id": 0, "secure-only": True}), lambda m, c: m)


def test_a_site_refuses_secagg_settings_that_would_not_sum_exactly():
    from clients.secure import SecureAggregationRefused, check_settings

    lossy = RecordDict({"secaggplus_state": ConfigRecord({"clipping_range": 8.0, "target_range": 2 ** 22,
                                                          "max_weight": 1000.0})})
    with pytest.raises(SecureAggregationRefused, match="not sum exactly"):
        check_settings(_context({"partition-id": 0}, lossy))


# --------------------------------------------------------------------- the audit
def _collect_reply(masked, metrics=None, arrays=None):
    from flwr.app import Array
    from flwr.common import ndarray_to_bytes

    from fedal.flower import protocol

    return RecordDict({
        "secaggplus_configs": ConfigRecord({"masked_params": [ndarray_to_bytes(m) for m in masked]}),
        "fitres.parameters": ArrayRecord({} if arrays is None else {str(i): Array(a) for i, a in enumerate(arrays)}),
        "fitres.num_examples": MetricRecord({"num_examples": 1}),
        "fitres.metrics": ConfigRecord(metrics or {k: 0 for k in protocol.TRAIN_METRICS}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
    })


def test_secure_audit_flags_unmasked_vectors_clear_arrays_and_extra_metrics():
    rng = np.random.default_rng(0)
    limbs = [rng.integers(0, 2 ** 20, 50).astype(np.float64) for _ in range(LIMBS)]
    masked = [rng.integers(0, 2 ** 32, 50) for _ in range(LIMBS)]
    assert audit_secure_reply("collect_masked_vectors", _collect_reply(masked), limbs) == []
    unmasked = [(a + 2 ** 21).astype(np.int64) for a in limbs]  # what the mod sends without its masks
    assert any("not masked" in p for p in audit_secure_reply("collect_masked_vectors", _collect_reply(unmasked), limbs))
    leaky = audit_secure_reply("collect_masked_vectors", _collect_reply(masked, arrays=limbs), limbs)
    assert any("in the clear" in p for p in leaky) and any("reached the server" in p for p in leaky)
    extra = audit_secure_reply("collect_masked_vectors", _collect_reply(masked, metrics={"stats.counts": 1}), limbs)
    assert any("fitres.metrics" in p for p in extra)


# --------------------------------------------------------------------- real runs
def _run(cfg, client_app=None, listener=None):
    from server import app as server_app
    from simulations.engine import run_in_simulation

    if listener is not None:
        server_app.SECURE_LISTENERS.append(listener)
    try:
        run_in_simulation(cfg, cpus=2, client_app=client_app)
    finally:
        if listener is not None:
            server_app.SECURE_LISTENERS.remove(listener)
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())


def _curve(results):
    return [(r["round"], r["labels"], r["accuracy"]) for r in results["rounds"]]


@pytest.mark.slow
def test_secure_head_run_gives_the_clear_model_and_the_server_sees_only_masked_vectors(tmp_path, monkeypatch):
    settings = dict(head_clip_norm=DIGITS_BOUND, min_class_count=1)
    clear = _run(small_config(tmp_path / "clear", **settings))
    seen: list[tuple[str, RecordDict]] = []
    clear_dir = tmp_path / "clear-limbs"
    clear_dir.mkdir()
    monkeypatch.setenv(CLEAR_ENV, str(clear_dir))
    secure = _run(small_config(tmp_path / "secure", secure_aggregation=True, **settings),
                  client_app=secure_capturing_client_app(),
                  listener=lambda stage, sent, replies: seen.extend((stage, r.content) for r in replies
                                                                   if not r.has_error()))
    assert _curve(secure) == _curve(clear)  # round for round: the same labels, the same accuracy
    for a, b in zip(secure["rounds"], clear["rounds"]):  # and the same clear reports (but for the clock)
        assert {c: {k: v for k, v in row.items() if k != "answer_seconds"} for c, row in a["clients"].items()} == \
            {c: {k: v for k, v in row.items() if k != "answer_seconds"} for c, row in b["clients"].items()}
    assert not secure.get("events")
    stages = [stage for stage, _ in seen]
    assert {s: stages.count(s) for s in set(stages)} == {s: 3 * 3 for s in
                                                         ("setup", "share_keys", "collect_masked_vectors", "unmask")}
    clear_limbs = [a for p in sorted(clear_dir.glob("*.npz")) for a in np.load(p).values()]
    assert len(clear_limbs) == 3 * 3 * LIMBS
    problems = [p for stage, content in seen for p in audit_secure_reply(stage, content, clear_limbs)]
    assert problems == []


@pytest.mark.slow
def test_secure_network_run_gives_fedavgs_model(tmp_path):
    settings = dict(pipeline="network", min_class_count=1, rounds=2)
    clear = _run(small_config(tmp_path / "clear", **settings))
    secure = _run(small_config(tmp_path / "secure", secure_aggregation=True, **settings))
    assert _curve(secure) == _curve(clear)


DROPOUT_SETTINGS = dict(pipeline="network", min_class_count=1, clients=4, min_clients=3, rounds=2)


@pytest.fixture(scope="module")
def clear_dropout(tmp_path_factory):
    """The clear run in which client 1 fails round 2: what a secure run losing client 1 in any stage must give."""
    from faults_helpers import fault_client_app, write_plan

    cfg = small_config(tmp_path_factory.mktemp("clear-dropout"), **DROPOUT_SETTINGS)
    write_plan(cfg.output_dir, {1: {2: "crash"}})
    return _run(cfg, client_app=fault_client_app())


@pytest.mark.slow
@pytest.mark.parametrize("fault, stage", [("crash", "collect_masked_vectors"), ("crash-in:setup", "setup"),
                                          ("crash-in:share_keys", "share_keys"),
                                          ("short-masked-vector", "masked vector was refused")])
def test_a_site_lost_in_any_stage_leaves_the_round_to_the_others(tmp_path, clear_dropout, fault, stage):
    """Client 1 of 4 fails round 2 in a stage of the protocol (before it shared its keys: flwr 1.41 alone
    stopped the round there), or sends a masked vector one element short (which stopped the ServerApp): the
    round is aggregated from the other three, the model is the clear run's where client 1 fails, and an event
    names the site and the stage."""
    from faults_helpers import fault_client_app, write_plan

    cfg = small_config(tmp_path / "secure", secure_aggregation=True, **DROPOUT_SETTINGS)
    write_plan(cfg.output_dir, {1: {2: fault}})
    results = _run(cfg, client_app=fault_client_app())
    assert _curve(results) == _curve(clear_dropout)
    round2 = results["rounds"][1]
    assert sorted(round2["clients"]) == ["0", "2", "3"] and round2["aggregated"]
    events = [e for e in results["events"] if e["round"] == 2]
    assert any(stage in e["detail"] and "client 1" in e["detail"] for e in events), events


@pytest.mark.slow
def test_a_secure_head_round_without_every_site_is_not_aggregated(tmp_path):
    """Head pipeline under secure aggregation: a sum without client 1 would drop its classes from the head (and
    its difference from a full round's sum would be client 1's statistics), so round 2 keeps round 1's head,
    says why, and round 3, whole again, sums every label asked (client 1's of round 2 too)."""
    from faults_helpers import fault_client_app, write_plan

    cfg = small_config(tmp_path / "secure", secure_aggregation=True, head_clip_norm=DIGITS_BOUND, min_class_count=1,
                       clients=4, min_clients=3)
    write_plan(cfg.output_dir, {1: {2: "crash"}})
    results = _run(cfg, client_app=fault_client_app())
    rows = results["rounds"]
    assert rows[1]["aggregated"] is False and rows[1]["accuracy"] == rows[0]["accuracy"]
    said = [e["detail"] for e in results["events"] if e["round"] == 2 and e["kind"] == "not-aggregated"]
    assert said and "not in the secure sum" in said[0], results["events"]
    assert rows[2]["aggregated"] and sorted(rows[2]["clients"]) == ["0", "1", "2", "3"]


# --------------------------------------------------------------------- the minimum count
def test_a_site_sends_no_clear_statistic_of_a_class_with_one_label(tmp_path):
    """Default settings (no secure aggregation): a class with one label at the site is not in the statistics it
    sends; a class's statistics change only by at least two new labels."""
    from site_helpers import global_state, make_site, site_config

    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.messages import TrainInstruction

    cfg = site_config(tmp_path, pipeline="head", initial_labels=12, round_budget=6, pseudo_label_threshold=0.0)
    assert cfg.clear_min_count == 2
    node = NodeConfig.from_mapping(make_site(tmp_path, cfg, oracle="simulated", labels=True))
    sent_before = None
    state = None
    for server_round in (1, 2, 3):
        site = ClientSite(cfg, node)
        try:
            arrays, report = site.train(state or global_state(site), TrainInstruction(server_round, 6))
            labels = site.labeled_class_counts()
            state = global_state(site)
        finally:
            site.close()
        sent = arrays["stats.counts"]
        assert report.num_examples == labels.sum()
        assert np.all(sent[labels < 2] == 0) and np.all(sent <= labels)
        assert np.any(labels == 1) or server_round > 1  # the test sees a one-label class at least once
        if sent_before is not None:
            grown = sent - sent_before
            assert np.all((grown == 0) | (grown >= 2)), (sent_before, sent)
        sent_before = sent
    assert sent.sum() > 0
