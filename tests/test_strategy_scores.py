"""Strategy scores and selections checked against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
from strategy_helpers import FakeModel, blobs, fixed_context

from fedal.exceptions import ConfigError
from fedal.strategies import (
    QueryContext,
    bald,
    entropy,
    expected_gradient_length,
    get_strategy,
    gradient_embedding,
    gradient_embedding_factors,
    gradient_sq_distances_to,
    information_density,
    kcenter_greedy,
    kl_to_consensus,
    least_confidence,
    margin,
    mean_cosine_similarity,
    top2_margin,
    vote_entropy,
)

LN2 = np.log(2.0)


def h(*p):  # entropy of one distribution, by hand
    return -sum(q * np.log(q) for q in p if q > 0)


# ------------------------------------------------------------------ uncertainty
def test_one_hot_is_certain():
    one_hot = np.eye(4)
    for score in (entropy, least_confidence, margin):
        np.testing.assert_allclose(score(one_hot), 0.0, atol=1e-12)
    np.testing.assert_allclose(top2_margin(one_hot), 1.0)


@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_uniform_is_most_uncertain(n_classes):
    uniform = np.full((1, n_classes), 1.0 / n_classes)
    np.testing.assert_allclose(entropy(uniform), np.log(n_classes))
    np.testing.assert_allclose(least_confidence(uniform), 1.0 - 1.0 / n_classes)
    np.testing.assert_allclose(margin(uniform), 1.0)
    others = np.random.default_rng(0).dirichlet(np.full(n_classes, 0.5), size=200)
    for score in (entropy, least_confidence, margin):
        assert np.all(score(others) <= score(uniform)[0] + 1e-12)


def test_hand_values():
    p = np.array([[0.5, 0.3, 0.2]])
    np.testing.assert_allclose(entropy(p), h(0.5, 0.3, 0.2))
    np.testing.assert_allclose(least_confidence(p), 0.5)
    np.testing.assert_allclose(top2_margin(p), 0.2)
    np.testing.assert_allclose(margin(p), 0.8)


@pytest.mark.parametrize("name", ["entropy", "least_confidence", "margin", "density", "egl"])
def test_planted_uncertain_row_is_chosen_first(name):
    rng = np.random.default_rng(0)
    probs = np.full((30, 3), 0.02)
    probs[np.arange(30), rng.integers(3, size=30)] = 0.96
    probs[17] = [0.34, 0.33, 0.33]
    embeddings = np.ones((30, 4))  # equal density and gradient scale: only uncertainty differs
    assert get_strategy(name).query(fixed_context(probs, embeddings), 3, seed=0)[0] == 17


# ------------------------------------------------------------ BALD and committees
def test_bald_zero_when_samples_agree():
    same = np.repeat(np.array([[[0.7, 0.3], [0.1, 0.9]]]), 5, axis=0)  # (T=5, n=2, C=2)
    np.testing.assert_allclose(bald(same), 0.0, atol=1e-12)
    np.testing.assert_allclose(kl_to_consensus(same), 0.0, atol=1e-12)
    np.testing.assert_allclose(vote_entropy(same), 0.0, atol=1e-12)


def test_bald_hand_value_two_confident_members_disagree():
    samples = np.array([[[0.9, 0.1]], [[0.1, 0.9]]])  # two members, one sample
    expected = LN2 - h(0.9, 0.1)  # H[mean] = ln 2; mean H = H(0.9, 0.1) = 0.325083
    np.testing.assert_allclose(bald(samples), [expected])
    np.testing.assert_allclose(bald(samples), [0.368064], atol=1e-6)
    np.testing.assert_allclose(bald(np.array([[[1.0, 0.0]], [[0.0, 1.0]]])), [LN2])


def test_kl_to_consensus_equals_bald():
    samples = np.random.default_rng(0).dirichlet(np.ones(4), size=(7, 50))
    np.testing.assert_allclose(kl_to_consensus(samples), bald(samples), atol=1e-12)


def test_vote_entropy_hand_value():
    # three members vote 0, 0, 1 for the first sample and 2, 2, 2 for the second
    samples = np.array([
        [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]],
        [[0.6, 0.3, 0.1], [0.0, 0.3, 0.7]],
        [[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]],
    ])
    np.testing.assert_allclose(vote_entropy(samples), [h(2 / 3, 1 / 3), 0.0])
    np.testing.assert_allclose(vote_entropy(samples)[0], 0.636514, atol=1e-6)


def test_bald_prefers_the_disputed_sample():
    agree = [[0.9, 0.1]] * 4
    dispute = [[0.95, 0.05], [0.05, 0.95]] * 2
    samples = np.array([agree, dispute, agree]).transpose(1, 0, 2)  # (T=4, n=3, C=2)
    ctx = fixed_context(samples.mean(axis=0), samples=samples)
    for name in ("bald", "qbc_vote_entropy", "qbc_kl"):
        assert get_strategy(name).query(ctx, 1, seed=0).tolist() == [1], name


# ------------------------------------------------------------------------- EGL
def test_egl_hand_value():
    p, emb = np.array([[0.75, 0.25]]), np.array([[3.0, 4.0]])  # |h| = 5
    # |p - e0| = |(-0.25, 0.25)| = 0.353553; |p - e1| = |(0.75, -0.75)| = 1.060660
    expected = 5 * (0.75 * np.sqrt(0.125) + 0.25 * np.sqrt(1.125))
    np.testing.assert_allclose(expected_gradient_length(p, emb), [expected])
    np.testing.assert_allclose(expected, 2.651650, atol=1e-6)


def test_egl_matches_explicit_outer_product_gradients():
    rng = np.random.default_rng(0)
    p, emb = rng.dirichlet(np.ones(4), size=6), rng.normal(size=(6, 5))
    explicit = [
        sum(p[i, y] * np.linalg.norm(np.outer(p[i] - np.eye(4)[y], np.r_[emb[i], 1.0])) for y in range(4))
        for i in range(6)
    ]
    np.testing.assert_allclose(expected_gradient_length(p, emb, include_bias=True), explicit)


# --------------------------------------------------------------------- density
def test_density_matches_explicit_pairwise_computation():
    rng = np.random.default_rng(0)
    emb, p = rng.normal(size=(25, 6)) + 0.5, rng.dirichlet(np.ones(3), size=25)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    explicit_sim = (unit @ unit.T).mean(axis=1)  # the N x N reference, fine at N = 25
    np.testing.assert_allclose(mean_cosine_similarity(emb), explicit_sim)
    expected = entropy(p) * np.maximum(explicit_sim, 0) ** 2.0
    np.testing.assert_allclose(information_density(entropy(p), emb, beta=2.0), expected)
    ctx = fixed_context(p, emb)
    np.testing.assert_allclose(get_strategy("density", beta=2.0).score(ctx), expected)
    np.testing.assert_allclose(get_strategy("density", base="margin", beta=0).score(ctx), margin(p))


# --------------------------------------------------------------- core-set / BADGE
def test_kcenter_greedy_picks_farthest_points_in_order():
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    # from centre 0: 20 is farthest; then 10 (10 from both); then 2 (2 from 0, vs 1 for 11)
    assert kcenter_greedy(points, 3, centers=np.array([[0.0]])).tolist() == [5, 3, 2]


def test_kcenter_greedy_is_exact_when_the_radius_is_tiny_next_to_the_spread():
    # float32 |a|^2 + |b|^2 - 2ab loses 0.09 vs 0.04 at |x| ~ 1000 and picked [0, 1, 2]
    pool = np.array([[1000.3], [1000.1], [-1000.25], [-1000.2]])
    centers = np.array([[1000.0], [-1000.0]])
    assert kcenter_greedy(pool, 3, centers=centers).tolist() == [0, 2, 1]
    assert kcenter_greedy(pool.astype(np.float32), 3, centers=centers.astype(np.float32)).tolist() == [0, 2, 1]


def test_kcenter_greedy_matches_a_brute_force_greedy():
    rng = np.random.default_rng(3)
    points, centers = rng.normal(size=(60, 4)) * 50 + 300, rng.normal(size=(3, 4)) * 50 + 300
    expected, chosen = [], list(centers)
    for _ in range(10):
        d = np.min([[np.sum((p - c) ** 2) for c in chosen] for p in points], axis=1)
        d[expected] = -np.inf
        expected.append(int(np.argmax(d)))
        chosen.append(points[expected[-1]])
    assert kcenter_greedy(points, 10, centers=centers).tolist() == expected
    assert kcenter_greedy(points, 3, first=7).tolist()[0] == 7  # a first pick given by the caller


def test_coreset_skips_points_the_labeled_set_already_covers():
    rng = np.random.default_rng(0)
    labeled = rng.normal(size=(5, 3)) * 10
    fresh = rng.normal(size=(20, 3)) * 10
    pool = np.vstack([labeled + 1e-3, fresh])  # the first five duplicate labeled points
    model = FakeModel(3)
    model.forward = lambda X: (np.full((len(X), 2), 0.5), np.asarray(X, dtype=np.float32))
    ctx = QueryContext(ids=np.arange(100, 125), X=pool, model=model, labeled_X=labeled)
    chosen = get_strategy("coreset").query(ctx, 20, seed=0)
    assert not set(chosen.tolist()) & set(range(100, 105))


def test_badge_factorised_distance_equals_explicit():
    rng = np.random.default_rng(0)
    p, emb = rng.dirichlet(np.ones(5), size=40), rng.normal(size=(40, 7)).astype(np.float32)
    g = gradient_embedding(p, emb)
    assert g.shape == (40, 35)
    a, hh = gradient_embedding_factors(p, emb)
    for j in (0, 13, 39):
        explicit = ((g - g[j]) ** 2).sum(axis=1)
        np.testing.assert_allclose(gradient_sq_distances_to(a, hh, j), explicit, rtol=1e-5, atol=1e-5)


def test_badge_first_pick_has_largest_gradient_norm():
    rng = np.random.default_rng(1)
    p, emb = rng.dirichlet(np.ones(3), size=20), rng.normal(size=(20, 4))
    largest = int(np.argmax(np.linalg.norm(gradient_embedding(p, emb), axis=1)))
    assert get_strategy("badge").query(fixed_context(p, emb), 4, seed=0)[0] == largest


def test_badge_with_all_gradients_zero_still_returns_distinct():
    probs = np.tile([1.0, 0.0], (10, 1))  # confident: every gradient embedding is 0
    chosen = get_strategy("badge").query(fixed_context(probs, np.ones((10, 3))), 6, seed=0)
    assert len(set(chosen.tolist())) == 6


# ----------------------------------------------------------------- cold start
@pytest.mark.parametrize("name, options", [
    ("typiclust", {}),
    ("typiclust", {"max_cluster_reference": 5}),  # typicality on a subsample of each cluster
    ("typiclust", {"use_embeddings": True}),
    ("kmeans_coldstart", {}),
])
def test_cold_start_covers_each_blob(name, options):
    X, blob = blobs()
    model = FakeModel(2)
    model.forward = lambda X: (np.full((len(X), 2), 0.5), np.asarray(X, dtype=np.float32) * 3)
    ctx = QueryContext(ids=np.arange(len(X)), X=X, model=model if options.get("use_embeddings") else None)
    chosen = get_strategy(name, **options).query(ctx, 3, seed=0)
    assert sorted(blob[chosen].tolist()) == [0, 1, 2]


def test_typiclust_picks_the_dense_core_and_skips_covered_blobs():
    X, blob = blobs(n_per_blob=30, scale=1.0)
    labeled = X[blob == 0][:1] + 0.01  # blob 0 is already covered
    chosen = get_strategy("typiclust").query(QueryContext(ids=np.arange(len(X)), X=X, labeled_X=labeled), 2, seed=0)
    assert sorted(blob[chosen].tolist()) == [1, 2]
    for c in chosen:  # the most typical point sits near its blob's centre
        centre = X[blob == blob[c]].mean(axis=0)
        assert np.linalg.norm(X[c] - centre) < 1.0


def test_cold_start_with_duplicates_fills_budget():
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0]]), 6, axis=0)  # 2 distinct points, 12 rows
    for name in ("typiclust", "kmeans_coldstart"):
        chosen = get_strategy(name).query(QueryContext(ids=np.arange(12), X=X), 8, seed=0)
        assert len(set(chosen.tolist())) == 8
        assert set(X[chosen, 0].tolist()) == {0.0, 5.0}, name


# -------------------------------------------------------------------- options
@pytest.mark.parametrize("name, options", [
    ("bald", {"n_samples": 1}),
    ("qbc_vote_entropy", {"n_members": 2.5}),
    ("density", {"base": "variance"}),
    ("density", {"beta": -1}),
    ("coreset", {"chunk_size": 0}),
    ("typiclust", {"k_neighbors": 0}),
])
def test_bad_options_raise_config_error(name, options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        get_strategy(name, **options)
