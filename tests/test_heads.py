"""The head pipeline: fixed features, class statistics that add up, LDA heads, self-training,
expected error reduction and the budget-aware switch."""
from __future__ import annotations

import numpy as np
import pytest

from fedal.exceptions import ConfigError
from fedal.heads import ClassStatistics, LDAHead, pseudo_labels
from fedal.models import HeadClassifier


def gaussian_classes(n_per_class=40, n_classes=4, dim=6, spread=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * spread
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centres])
    return X, np.repeat(np.arange(n_classes), n_per_class)


# --------------------------------------------------------------- statistics add up
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summed_site_statistics_give_the_pooled_head_whatever_the_skew(seed):
    X, y = gaussian_classes(seed=seed)
    rng = np.random.default_rng(seed)
    # ten sites with strong label skew: each holds one or two classes only
    sites = [np.flatnonzero(np.isin(y, rng.choice(4, size=rng.integers(1, 3), replace=False)))[:rng.integers(3, 20)]
             for _ in range(10)]
    pooled = np.concatenate(sites)
    total = ClassStatistics.empty(4, X.shape[1])
    for site in sites:
        total = total + ClassStatistics.from_samples(X[site], y[site], 4)
    federated, central = LDAHead.from_statistics(total), LDAHead.from_statistics(
        ClassStatistics.from_samples(X[pooled], y[pooled], 4))
    np.testing.assert_allclose(federated.probs(X), central.probs(X), atol=1e-9)


def test_the_head_separates_classes_and_gives_an_absent_class_no_probability():
    X, y = gaussian_classes()
    keep = y != 2
    head = LDAHead.from_statistics(ClassStatistics.from_samples(X[keep], y[keep], 4))
    probs = head.probs(X)
    assert np.all(probs[:, 2] == 0)
    assert (probs.argmax(axis=1)[keep] == y[keep]).mean() > 0.95
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    with pytest.raises(ConfigError, match="at least one labeled sample"):
        LDAHead.from_statistics(ClassStatistics.empty(4, 6))
    with pytest.raises(ConfigError, match="shrinkage must lie in"):
        LDAHead.from_statistics(ClassStatistics.from_samples(X, y, 4), shrinkage=1.5)


def test_more_features_than_labels_is_still_well_posed():
    X, y = gaussian_classes(n_per_class=3, dim=50)
    head = LDAHead.from_statistics(ClassStatistics.from_samples(X, y, 4))
    assert np.all(np.isfinite(head.probs(X)))
    assert (head.probs(X).argmax(axis=1) == y).mean() == 1.0


def test_statistics_refuse_mismatched_inputs():
    with pytest.raises(ConfigError, match="labels must lie in"):
        ClassStatistics.from_samples(np.zeros((2, 3)), [0, 5], 4)
    with pytest.raises(ConfigError, match="cannot be added"):
        ClassStatistics.empty(4, 3) + ClassStatistics.empty(4, 2)


# --------------------------------------------------------------- the model adapter
def test_head_classifier_state_round_trips_and_refuses_other_arrays():
    X, y = gaussian_classes()
    model = HeadClassifier(4, 6, pseudo_label_threshold=0.9)
    untrained = model.get_state()
    assert model.forward(X[:3])[0].tolist() == [[0.25] * 4] * 3  # nothing learned: uniform
    model.fit(X[::5], y[::5], unlabeled=X)
    other = HeadClassifier(4, 6)
    other.set_state(model.get_state())
    np.testing.assert_array_equal(other.predict_proba(X), model.predict_proba(X))
    other.set_state(untrained)
    assert other.head is None
    with pytest.raises(ConfigError, match="head arrays"):
        other.set_state({"head.weight": np.zeros((4, 6))})
    with pytest.raises(ConfigError, match="feature vectors of 6 values"):
        model.forward(np.zeros((2, 7)))


def test_self_training_picks_pseudo_labels_with_the_labeled_head_only():
    X, y = gaussian_classes(n_per_class=60)
    model = HeadClassifier(4, 6, pseudo_label_threshold=0.99)
    labeled = np.arange(0, len(y), 30)  # 2 labels per class
    model.fit(X[labeled], y[labeled], unlabeled=X)
    labeled_only = LDAHead.from_statistics(ClassStatistics.from_samples(X[labeled], y[labeled], 4))
    positions, classes = pseudo_labels(labeled_only.probs(X), 0.99)
    _, pseudo, added = model.statistics(X[labeled], y[labeled], X)
    np.testing.assert_array_equal(added.positions, positions)
    assert pseudo.total == len(positions) > len(labeled)
    assert (classes == y[positions]).mean() > 0.95  # confident predictions on separated classes are right
    np.testing.assert_allclose(model.head.counts, np.bincount(y[labeled], minlength=4) + np.bincount(classes, minlength=4))
    assert model.labeled_head.counts.tolist() == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="threshold must lie in"):
        pseudo_labels(labeled_only.probs(X), 0.0)


def test_posterior_samples_spread_around_the_head():
    X, y = gaussian_classes(n_per_class=5, spread=1.0)
    model = HeadClassifier(4, 6, seed=3)
    model.fit(X, y)
    samples = model.sample_probs(X, 20)
    assert samples.shape == (20, len(X), 4)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0)
    assert samples.std(axis=0).mean() > 1e-3  # the means are uncertain with 5 samples a class
    np.testing.assert_array_equal(samples, model.sample_probs(X, 20))  # seeded


# --------------------------------------------------------------- features
def test_image_descriptors_are_fixed_length_and_cached(tmp_path):
    from fedal.features import ImageDescriptors, cached_features, featurizer_for

    rng = np.random.default_rng(0)
    rgb, grey = rng.random((4, 3, 28, 28), dtype=np.float32), rng.random((4, 1, 28, 28), dtype=np.float32)
    desc = ImageDescriptors()
    assert desc.transform(rgb).shape == (4, 373) and desc.transform(grey).shape == (4, 347)
    path = tmp_path / "f.npz"
    first = cached_features(desc, rgb, path)
    assert path.is_file()
    np.testing.assert_array_equal(cached_features(desc, rgb, path), first)
    other = cached_features(desc, rgb[::-1].copy(), path)  # other inputs: computed again, not read back
    np.testing.assert_array_equal(other, first[::-1])
    assert featurizer_for("auto", (3, 28, 28), "head").name == desc.name
    assert featurizer_for("auto", (3, 28, 28), "network") is None  # the network learns its own
    assert featurizer_for("auto", (64,), "head").name == "raw"
    with pytest.raises(ConfigError, match="needs images"):
        featurizer_for("descriptors", (64,), "head")


def test_features_a_process_computed_are_reused_for_another_site_folder(tmp_path, monkeypatch):
    """A simulation's client actor serves every run of a comparison: the second run's site (a new folder)
    gets the features of the same pool without computing them, as a read-only array, and its file is written."""
    from fedal import features
    from fedal.features import ImageDescriptors, cached_features

    rgb = np.random.default_rng(1).random((3, 3, 28, 28), dtype=np.float32)
    calls = []

    class Counting(ImageDescriptors):
        def transform(self, X):
            calls.append(len(X))
            return super().transform(X)

    first = cached_features(Counting(), rgb, tmp_path / "run-a" / "f.npz")
    again = cached_features(Counting(), rgb, tmp_path / "run-b" / "f.npz")
    assert calls == [3] and (tmp_path / "run-b" / "f.npz").is_file()
    np.testing.assert_array_equal(again, first)
    with pytest.raises(ValueError):
        again[0, 0] = 1.0  # shared between sites: nobody may change it in place
    cached_features(Counting(), rgb + 1, None)  # other pixels: computed
    assert calls == [3, 3]
    monkeypatch.setattr(features, "MEMORY_CACHE_BYTES", 0)  # the least recently used go first
    cached_features(Counting(), rgb + 2, None)
    assert len(features._in_memory) == 1
    cached_features(Counting(), rgb, None)
    assert calls == [3, 3, 3, 3]


# --------------------------------------------------------------- strategies on the head
def test_expected_errors_match_retraining_the_head():
    from fedal.heads import auto_shrinkage
    from fedal.strategies import expected_errors

    X, y = gaussian_classes(n_per_class=8, spread=1.5, seed=4)
    stats = ClassStatistics.from_samples(X, y, 4)
    lam = auto_shrinkage(X.shape[1], stats.total)
    head = LDAHead.from_statistics(stats, lam)
    rng = np.random.default_rng(0)
    candidates, reference = rng.normal(size=(5, 6)) * 2, X
    probs = head.probs(candidates)
    fast = expected_errors(head, candidates, probs, reference)
    brute = []
    for x, p in zip(candidates, probs):
        total = 0.0
        for c in range(4):
            new = LDAHead.from_statistics(stats + ClassStatistics.from_samples(x[None], [c], 4), lam)
            total += p[c] * np.sum(1 - new.probs(reference).max(axis=1))
        brute.append(total)
    np.testing.assert_allclose(fast, brute, rtol=0.05)  # rank-one update with the shrinkage target kept
    assert np.corrcoef(np.argsort(np.argsort(fast)), np.argsort(np.argsort(brute)))[0, 1] >= 0.8  # same ranking


def test_eer_and_budget_aware_on_a_trained_head():
    from fedal.strategies import QueryContext, get_strategy

    X, y = gaussian_classes(n_per_class=30)
    weak = HeadClassifier(4, 6)  # untrained: the budget-aware switch stays in the low-budget regime
    strong = HeadClassifier(4, 6)
    strong.fit(X[::3], y[::3])
    budget_aware = get_strategy("budget_aware")
    assert budget_aware.low_budget(QueryContext(np.arange(len(X)), X, model=weak))
    assert not budget_aware.low_budget(QueryContext(np.arange(len(X)), X, model=strong))
    ctx = QueryContext(np.arange(len(X)), X, model=strong)
    chosen = get_strategy("eer", candidates=10).query(ctx, 3, seed=0)
    margin_top = get_strategy("margin").query(QueryContext(np.arange(len(X)), X, model=strong), 10, seed=0)
    assert set(chosen.tolist()) <= set(margin_top.tolist())  # among the most uncertain candidates


# --------------------------------------------------------------- differential privacy of the statistics
def test_clipping_bounds_every_feature_vector_the_head_sees():
    X, y = gaussian_classes(spread=10.0)
    model = HeadClassifier(4, 6, clip_norm=2.0)
    labeled, _, _ = model.statistics(X, y)
    assert np.all(np.linalg.norm(model._features(X), axis=1) <= 2.0 + 1e-9)
    assert np.trace(labeled.scatter) <= len(y) * 4.0 + 1e-6  # sum of squared norms, each <= C^2
