"""Networks and model adapters: outputs, weights, training, committees."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import BaggingClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC, LinearSVC
from torch import nn

from fedal.data import load_dataset
from fedal.exceptions import ConfigError
from fedal.models import MLP, SklearnClassifier, SmallCNN, TorchClassifier, build_model


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits", max_train=300, max_test=200)
    return ds.X_train, ds.y_train, ds.X_test, ds.y_test


def images(n: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, 28, 28), dtype=np.float32)


def mlp_model(seed: int = 0, **kwargs) -> TorchClassifier:
    return TorchClassifier(lambda: MLP(64, 10, hidden=(32, 16)), 10, seed=seed, **kwargs)


def distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------ networks
@pytest.mark.parametrize("channels", [1, 3])
def test_small_cnn_outputs(channels):
    model = TorchClassifier(lambda: SmallCNN(channels, 5, embedding_dim=48), 5)
    probs, emb = model.forward(images(7, channels))
    assert probs.shape == (7, 5) and emb.shape == (7, 48)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    assert np.allclose(model.predict_proba(images(7, channels)), probs, atol=1e-6)  # eval mode: no dropout


def test_small_cnn_rejects_the_wrong_input():
    with pytest.raises(ValueError, match="1 or 3"):
        SmallCNN(2, 5)
    model = TorchClassifier(lambda: SmallCNN(1, 5), 5)
    with pytest.raises(ValueError, match=r"\(n, 1, S, S\) with S >= 28"):
        model.forward(images(2, 3))


@pytest.mark.parametrize("side", [28, 64, 128, 224])
def test_both_networks_take_every_supported_input_size_with_the_same_weights_shape_at_28(side):
    import torch

    from fedal.models import build_model
    from fedal.models.nets import ConvNet

    for network in ("smallcnn", "convnet"):
        model = build_model((3, side, side), 8, network=network, norm="group")
        probs, _ = model.forward(np.zeros((2, 3, side, side), np.float32))
        assert probs.shape == (2, 8)
    # at 28 x 28 the ConvNet is the one it always was: a 3 x 3 first convolution; above, it strides by side / 28
    first = ConvNet(3, 8, input_size=side).features[0]
    assert first.stride == ((max(1, side // 28),) * 2) and first.kernel_size[0] == (3 if side < 56 else 2 * (side // 28) + 1)
    assert list(ConvNet(3, 8, input_size=side).state_dict()) == list(ConvNet(3, 8).state_dict())
    assert torch.is_tensor(first.weight)


def test_mlp_outputs(digits):
    X = digits[0][:9]
    model = TorchClassifier(lambda: MLP(64, 10, hidden=(40, 24)), 10)
    probs, emb = model.forward(X)
    assert probs.shape == (9, 10) and emb.shape == (9, 24)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="64 features"):
        model.forward(np.zeros((2, 30), np.float32))


def test_forward_of_nothing_has_the_right_shapes():
    probs, emb = mlp_model().forward(np.zeros((0, 64), np.float32))
    assert probs.shape == (0, 10) and emb.shape == (0, 16)


def test_prediction_does_not_depend_on_the_batch_size(digits):
    X = digits[0][:50]
    big = mlp_model(predict_batch_size=1024).forward(X)
    small = mlp_model(predict_batch_size=7).forward(X)
    assert np.allclose(big[0], small[0], atol=1e-6) and np.allclose(big[1], small[1], atol=1e-6)


def test_build_model_picks_the_network():
    assert isinstance(build_model((3, 28, 28), 8).module, SmallCNN)
    assert build_model((1, 28, 28), 2).module.in_channels == 1
    mlp = build_model((30,), 2, epochs=2)
    assert isinstance(mlp.module, MLP) and mlp.module.in_features == 30 and mlp.epochs == 2


def test_module_without_embed_and_head_is_refused():
    with pytest.raises(ConfigError, match="head"):
        TorchClassifier(lambda: nn.Sequential(nn.Linear(4, 2)), 2)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}, {"predict_batch_size": 0}])
def test_torch_classifier_arguments_are_validated(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        mlp_model(**kwargs)


# ------------------------------------------------------------------------- weights
def test_state_round_trip(digits):
    X = digits[0][:20]
    a, b = mlp_model(seed=1), mlp_model(seed=2)
    assert not np.allclose(a.predict_proba(X), b.predict_proba(X))
    b.set_state(a.get_state())
    assert np.allclose(a.predict_proba(X), b.predict_proba(X))
    assert same_state(a.get_state(), b.get_state())


def test_get_state_returns_copies():
    model = mlp_model()
    state = model.get_state()
    key = next(iter(state))
    state[key][...] = 123.0
    assert not np.any(model.get_state()[key] == 123.0)


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("head.weight"), "missing.*head.weight"),
    (lambda s: s.update({"extra.weight": np.zeros(3)}), "unexpected.*extra.weight"),
    (lambda s: s.update({"head.bias": np.zeros(11, np.float32)}), "head.bias.*11"),
])
def test_set_state_with_wrong_weights_raises_and_changes_nothing(change, match):
    model = mlp_model()
    before = model.get_state()
    bad = mlp_model(seed=5).get_state()
    change(bad)
    with pytest.raises(ConfigError, match=match):
        model.set_state(bad)
    assert same_state(model.get_state(), before)


# ------------------------------------------------------------------------ training
def test_fit_reduces_the_loss(digits):
    X, y, Xte, yte = digits
    model = mlp_model(epochs=8, lr=1e-2)
    loss_before, acc_before = model.evaluate(X, y)
    model.fit(X, y)
    loss_after, _ = model.evaluate(X, y)
    assert loss_after < 0.5 * loss_before
    assert model.evaluate(Xte, yte)[1] > acc_before + 0.3


def test_fit_is_deterministic_per_seed(digits):
    X, y = digits[0][:64], digits[1][:64]
    a, b = mlp_model(seed=4, epochs=2), mlp_model(seed=4, epochs=2)
    a.fit(X, y)
    torch.rand(100)  # other code drawing from torch's global generator in between
    b.fit(X, y)
    assert same_state(a.get_state(), b.get_state())
    c = mlp_model(seed=5, epochs=2)
    c.fit(X, y)
    assert not same_state(a.get_state(), c.get_state())


def test_fit_validates_labels(digits):
    X = digits[0][:4]
    with pytest.raises(ConfigError, match=r"\[0, 9\]"):
        mlp_model().fit(X, np.array([0, 1, 2, 10]))
    with pytest.raises(ConfigError, match="4 inputs but 3 labels"):
        mlp_model().fit(X, np.array([0, 1, 2]))


def test_fedprox_keeps_weights_closer_to_the_start(digits):
    X, y = digits[0][:100], digits[1][:100]
    start = mlp_model(epochs=5, lr=1e-2).get_state()
    moved = {}
    for mu in (0.0, 1.0):
        model = mlp_model(epochs=5, lr=1e-2)
        model.set_state(start)
        model.fit(X, y, proximal_mu=mu)
        moved[mu] = distance(model.get_state(), start)
    assert 0 < moved[1.0] < 0.8 * moved[0.0]


def test_reset_restores_the_initial_weights(digits):
    model = mlp_model(epochs=2)
    initial = model.get_state()
    model.fit(digits[0][:50], digits[1][:50])
    assert not same_state(model.get_state(), initial)
    model.reset()
    assert same_state(model.get_state(), initial)


# --------------------------------------------------------------------- MC dropout
def test_sample_probs_shape_variation_and_seeding(digits):
    X = digits[0][:30]
    model = TorchClassifier(lambda: MLP(64, 10, hidden=(32,), dropout=0.5), 10)
    samples = model.sample_probs(X, 6, seed=1)
    assert samples.shape == (6, 30, 10)
    assert np.allclose(samples.sum(axis=2), 1, atol=1e-5)
    assert samples.std(axis=0).mean() > 1e-3  # dropout masks differ across the T passes
    assert np.array_equal(samples, model.sample_probs(X, 6, seed=1))
    assert not np.allclose(samples, model.sample_probs(X, 6, seed=2))


def test_sample_probs_without_dropout_repeat_the_prediction(digits):
    X = digits[0][:10]
    model = TorchClassifier(lambda: MLP(64, 10, dropout=0.0), 10)
    samples = model.sample_probs(X, 3, seed=0)
    assert np.allclose(samples, model.predict_proba(X)[None], atol=1e-6)


def test_sample_probs_of_a_cnn():
    model = TorchClassifier(lambda: SmallCNN(3, 4), 4)
    assert model.sample_probs(images(5, 3), 4, seed=0).shape == (4, 5, 4)
    with pytest.raises(ConfigError, match="n_samples"):
        model.sample_probs(images(5, 3), 0)


# ---------------------------------------------------------------- scikit-learn adapter
def test_sklearn_probs_cover_classes_missing_from_the_labeled_set(digits):
    X, y = digits[0], digits[1]
    keep = np.isin(y, [1, 4, 7])
    model = SklearnClassifier(LogisticRegression(max_iter=300), 10)
    model.fit(X[keep], y[keep])
    probs = model.predict_proba(X[:25])
    assert probs.shape == (25, 10)
    assert np.allclose(probs.sum(axis=1), 1)
    assert np.all(probs[:, [0, 2, 3, 5, 6, 8, 9]] == 0)
    assert set(model.predict(X).tolist()) <= {1, 4, 7}
    p, emb = model.forward(X[:25])
    assert p.shape == (25, 10) and emb.shape == (25, 64)


def test_sklearn_with_one_class_predicts_it(digits):
    X = digits[0][:10]
    model = SklearnClassifier(LogisticRegression(), 10)
    model.fit(X, np.full(10, 3))
    assert np.array_equal(model.predict_proba(X), np.eye(10)[np.full(10, 3)])
    assert model.sample_probs(X, 4, seed=0).shape == (4, 10, 10)


def test_sklearn_before_any_label_is_uniform(digits):
    model = SklearnClassifier(LogisticRegression(), 10)
    assert np.allclose(model.predict_proba(digits[0][:3]), 0.1)
    model.fit(np.zeros((0, 64)), np.zeros(0, np.int64))
    assert np.allclose(model.predict_proba(digits[0][:3]), 0.1)


def test_sklearn_fit_validates_labels(digits):
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):
        SklearnClassifier(LogisticRegression(), 3).fit(digits[0][:3], [0, 1, 3])


def test_random_forest_committee_uses_its_trees(digits):
    X, y = digits[0], digits[1]
    keep = y != 5  # a class the forest never saw
    model = SklearnClassifier(RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0), 10, seed=0)
    model.fit(X[keep], y[keep])
    samples = model.sample_probs(X[:40], 8, seed=3)
    assert samples.shape == (8, 40, 10)
    assert np.allclose(samples.sum(axis=2), 1, atol=1e-5) and np.all(samples[:, :, 5] == 0)
    assert samples.std(axis=0).mean() > 1e-3
    assert np.array_equal(samples, model.sample_probs(X[:40], 8, seed=3))
    # with every tree drawn once, the committee mean is the forest's prediction
    assert np.allclose(samples.mean(axis=0), model.predict_proba(X[:40]), atol=1e-5)


def test_bagging_members_that_missed_a_class(digits):
    X, y = digits[0][:60], digits[1][:60]
    y = np.where(np.arange(60) < 2, 9, np.where(y == 9, 0, y))  # class 9: two samples only
    model = SklearnClassifier(BaggingClassifier(KNeighborsClassifier(1), n_estimators=10, random_state=0), 10)
    model.fit(X, y)
    assert any(len(m.classes_) < 10 for m in model.fitted_.estimators_)  # the case being tested
    samples = model.sample_probs(X, 10, seed=0)
    assert samples.shape == (10, 60, 10) and np.allclose(samples.sum(axis=2), 1)


def test_gradient_boosting_falls_back_to_a_bootstrap_committee(digits):
    X, y = digits[0][:60], digits[1][:60] % 3
    model = SklearnClassifier(GradientBoostingClassifier(n_estimators=5, max_depth=2, random_state=0), 3)
    model.fit(X, y)
    assert model.sample_probs(X, 3, seed=0).shape == (3, 60, 3)


def test_bootstrap_committee_for_a_single_model(digits):
    X, y = digits[0][:150], digits[1][:150]
    model = SklearnClassifier(LogisticRegression(max_iter=200), 10, seed=0)
    model.fit(X, y)
    samples = model.sample_probs(X[:30], 4, seed=1)
    assert samples.shape == (4, 30, 10)
    assert np.allclose(samples.sum(axis=2), 1, atol=1e-5)
    assert samples.std(axis=0).mean() > 1e-3  # members trained on different resamples
    again = SklearnClassifier(LogisticRegression(max_iter=200), 10, seed=0)
    again.fit(X, y)
    assert np.allclose(again.sample_probs(X[:30], 4, seed=1), samples)
    assert not np.allclose(model.sample_probs(X[:30], 4, seed=2), samples)


@pytest.mark.parametrize("estimator", [LinearSVC(), SVC()], ids=["LinearSVC", "SVC-without-probability"])
def test_estimator_without_predict_proba_is_refused(estimator):
    with pytest.raises(ConfigError, match="predict_proba"):
        SklearnClassifier(estimator, 2)


def test_sklearn_evaluate(digits):
    X, y, Xte, yte = digits
    model = SklearnClassifier(LogisticRegression(max_iter=300), 10)
    model.fit(X, y)
    loss, acc = model.evaluate(Xte, yte)
    assert acc == pytest.approx((model.predict(Xte) == yte).mean()) and acc > 0.85
    assert 0 < loss < 1


def test_one_full_batch_sgd_step_per_client_averaged_is_centralized_gradient_descent():
    """Why the SGD option converges under skew: FedAvg of one full-batch step each is one step on the union."""
    from fedal.models import MLP, TorchClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 6)).astype(np.float32)
    y = np.r_[np.zeros(10), np.ones(12), np.full(8, 2)].astype(np.int64)  # skewed: client A holds 0 and 1
    parts = [np.arange(0, 16), np.arange(16, 30)]

    def model():
        return TorchClassifier(lambda: MLP(6, 3, hidden=(8,), dropout=0.0), 3, epochs=1, batch_size=1000, lr=0.1,
                               min_steps=1, seed=0, optimizer="sgd")

    start = model().get_state()
    states, sizes = [], []
    for p in parts:
        m = model()
        m.set_state(start)
        m.fit(X[p], y[p])
        states.append(m.get_state())
        sizes.append(len(p))
    fedavg = {k: sum(n * s[k] for n, s in zip(sizes, states)) / sum(sizes) for k in start}
    central = model()
    central.set_state(start)
    central.fit(X, y)
    for k, v in central.get_state().items():
        np.testing.assert_allclose(fedavg[k], v, atol=1e-6)


def test_restricted_softmax_damps_the_classes_a_client_lacks():
    from fedal.models import MLP, TorchClassifier

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)  # classes 0 and 1 only; class 2 absent at this client
    moved = {}
    for factor in (1.0, 0.5):
        m = TorchClassifier(lambda: MLP(5, 3, hidden=(8,), dropout=0.0), 3, epochs=1, lr=0.01, seed=0,
                            optimizer="sgd", restricted_softmax=factor)
        before = m.get_state()["head.weight"][2].copy()
        m.fit(X, y)
        moved[factor] = np.linalg.norm(m.get_state()["head.weight"][2] - before)
    assert moved[0.5] < 0.6 * moved[1.0]  # the absent class's output weights move about half as much
    with pytest.raises(ConfigError, match="restricted_softmax"):
        TorchClassifier(lambda: MLP(5, 3), 3, restricted_softmax=0.0)
