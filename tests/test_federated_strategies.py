"""Federated-aware strategies (LoGo, KAFAL): they must use the local model and the local
class counts they are given, and the client must give them."""
from __future__ import annotations

import numpy as np
import pytest
from strategy_helpers import FixedModel, blobs

from clients.node import NodeConfig
from fedal.exceptions import ConfigError
from fedal.messages import TrainInstruction
from fedal.strategies import (
    QueryContext,
    WithViews,
    class_weights,
    cluster_features,
    get_strategy,
    weighted_discrepancy,
)


def context(global_probs, global_emb, local_probs=None, local_emb=None, class_counts=None) -> QueryContext:
    n = len(global_probs)
    ctx = QueryContext(ids=np.arange(100, 100 + n), X=np.arange(n), model=FixedModel(global_probs, global_emb))
    if local_probs is not None:
        ctx.extra["local_model"] = FixedModel(local_probs, local_emb)
    if class_counts is not None:
        ctx.extra["class_counts"] = class_counts
    return ctx


def uncertain(n, rng, c=3):
    p = rng.dirichlet(np.ones(c) * 0.5, size=n)
    return p


def test_the_clustering_logo_uses_recovers_blobs():
    X, blob = blobs(15)
    assign = cluster_features(X, 3, seed=0)
    for b in range(3):  # each blob is one cluster
        assert len(set(assign[blob == b].tolist())) == 1
    assert len(set(assign.tolist())) == 3


@pytest.mark.parametrize("features", ["gradient", "embedding"])
def test_logo_takes_one_per_local_cluster_and_the_most_uncertain_there(features):
    rng = np.random.default_rng(0)
    X, blob = blobs(10)
    local_probs = np.tile([0.6, 0.3, 0.1], (len(X), 1))  # constant: gradient features ~ embeddings
    global_probs = uncertain(len(X), rng)
    global_emb = np.zeros((len(X), 2))  # the global model sees no structure at all
    ctx = context(global_probs, global_emb, local_probs, X)
    chosen = get_strategy("logo", features=features).query(ctx, 3, seed=0) - 100
    assert sorted(blob[chosen].tolist()) == [0, 1, 2]
    h = -(global_probs * np.log(global_probs)).sum(axis=1)
    for pos in chosen:
        members = np.flatnonzero(blob == blob[pos])
        assert h[pos] == pytest.approx(h[members].max())


def test_logo_clusters_with_the_local_model_not_the_global_one():
    rng = np.random.default_rng(1)
    X, blob = blobs(10)
    probs = uncertain(len(X), rng)
    probs[:10] = np.full(3, 1 / 3) + 0.01 * rng.dirichlet(np.ones(3), size=10)  # most uncertain: all in blob 0
    probs /= probs.sum(axis=1, keepdims=True)
    # global embeddings all on one point: only the local model shows the blobs
    with_local = context(probs, np.zeros((len(X), 2)), np.tile([0.5, 0.3, 0.2], (len(X), 1)), X)
    chosen = get_strategy("logo", features="embedding").query(with_local, 3, seed=0) - 100
    assert sorted(blob[chosen].tolist()) == [0, 1, 2]
    # without it the global model stands in: one cluster -> plain top entropy, all from blob 0
    only_global = context(probs, np.zeros((len(X), 2)))
    other = get_strategy("logo", features="embedding").query(only_global, 3, seed=0) - 100
    assert blob[other].tolist() == [0, 0, 0]


def test_kafal_ranks_local_global_disagreement_first():
    n = 12
    agree = np.tile([0.7, 0.2, 0.1], (n, 1))
    local = agree.copy()
    local[5] = [0.05, 0.05, 0.9]  # the specialised model disagrees on sample 5
    ctx = context(agree, np.eye(n), local, np.eye(n))
    assert get_strategy("kafal").query(ctx, 1, seed=0).tolist() == [105]


def test_kafal_weights_the_classes_the_client_is_short_of():
    glob = np.tile([1 / 3, 1 / 3, 1 / 3], (2, 1))
    local = np.array([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])  # same disagreement, on class 0 vs class 2
    ctx = context(glob, np.eye(2), local, np.eye(2), class_counts=[100, 50, 1])  # class 2 is rare here
    assert get_strategy("kafal").query(ctx, 1, seed=0).tolist() == [101]
    ctx = context(glob, np.eye(2), local, np.eye(2), class_counts=[1, 50, 100])
    assert get_strategy("kafal").query(ctx, 1, seed=0).tolist() == [100]


def test_weighted_discrepancy_is_zero_when_the_models_agree():
    p = np.random.default_rng(2).dirichlet(np.ones(4), size=6)
    np.testing.assert_allclose(weighted_discrepancy(p, p, np.ones(4)), 0.0, atol=1e-12)
    assert np.all(weighted_discrepancy(p, p[::-1], np.ones(4)) >= 0)


def test_class_weights_validation():
    w = class_weights([10, 0, 5], 3)
    assert w.mean() == pytest.approx(1.0) and w[1] > w[2] > w[0]
    np.testing.assert_array_equal(class_weights(None, 3), np.ones(3))
    with pytest.raises(ConfigError, match="class_counts"):
        class_weights([1, 2], 3)
    with pytest.raises(ConfigError, match="class_counts"):
        class_weights([1, -2, 3], 3)


def test_kafal_diverse_spreads_a_batch_of_near_duplicates():
    # six near-identical top-scoring samples and three distinct, slightly lower ones
    emb = np.vstack([np.zeros((6, 2)) + 1e-3 * np.arange(6)[:, None], [[10, 0], [0, 10], [10, 10]]])
    glob = np.tile([0.5, 0.3, 0.2], (9, 1))
    local = glob.copy()
    local[:6] = [0.05, 0.05, 0.9]
    local[6:] = [0.1, 0.1, 0.8]
    plain = get_strategy("kafal").query(context(glob, emb, local, emb), 3, seed=0) - 100
    diverse = get_strategy("kafal_diverse", pre_factor=3).query(context(glob, emb, local, emb), 3, seed=0) - 100
    assert set(plain.tolist()) <= set(range(6))  # score alone: all from the duplicate clump
    assert len(set(diverse.tolist()) & set(range(6))) == 1  # one from the clump, then spread out


def test_bad_local_model_view_is_rejected():
    ctx = context(np.tile([0.5, 0.5], (3, 1)), np.eye(3))
    ctx.extra["local_model"] = "not a model"
    with pytest.raises(ConfigError, match="local_model"):
        get_strategy("kafal").query(ctx, 1, seed=0)


def test_with_views_adds_views_without_overwriting():
    seen = {}

    class Spy:
        def query(self, ctx, budget, seed=None):
            seen.update(ctx.extra)
            return ctx.ids[:budget]

    spy = Spy()
    spy.name, spy.needs_model = "spy", False
    ctx = QueryContext(ids=[1, 2, 3], X=np.zeros((3, 1)))
    ctx.extra["class_counts"] = [1, 2]
    WithViews(spy, local_model="L", class_counts=[9, 9]).query(ctx, 2, seed=0)
    assert seen == {"local_model": "L", "class_counts": [1, 2]}


@pytest.mark.parametrize("name", ["logo", "kafal"])
def test_client_site_trains_and_passes_a_local_model(tmp_path, name, monkeypatch):
    """ClientSite trains a local model before a query round and hands it to the strategy."""
    from clients.site import ClientSite
    from fedal.config import FederationConfig
    from fedal.strategies import federated

    cfg = FederationConfig(dataset="digits", clients=2, strategy=name, initial_labels=8, local_epochs=1,
                           min_local_steps=3, local_model_epochs=2, output_dir=str(tmp_path), pipeline="network")
    site = ClientSite(cfg, NodeConfig.from_mapping({"partition-id": 0}))
    state, _ = site.train(site.model.get_state(), TrainInstruction(1, 0))
    site.close()
    used = []
    original = federated.local_forward

    def spy(ctx):
        used.append(ctx.extra.get("local_model"))
        return original(ctx)

    monkeypatch.setattr(federated, "local_forward", spy)
    site = ClientSite(cfg, NodeConfig.from_mapping({"partition-id": 0}))  # a new process per message in deployment
    _, report = site.train(state, TrainInstruction(2, 5))
    assert report.queries_used == 5 and report.num_examples == 13
    assert isinstance(site.learner.strategy, WithViews)
    local = site.learner.strategy.views["local_model"]
    assert used and used[0] is local
    np.testing.assert_array_equal(site.learner.strategy.views["class_counts"].sum(), 8)
    global_w = state["head.weight"]
    assert not np.allclose(local.get_state()["head.weight"], global_w)  # it was trained locally
    site.close()
