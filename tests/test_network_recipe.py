"""The network recipe for small images: ConvNet, augmentation, one local step, server optimisers, schedules.

What makes a federation of one-class batches train like pooled training: a network whose
output for a sample does not depend on the rest of its batch (GroupNorm / no norm), one local
SGD step per round (the mean of the clients' steps is the pooled step), statistics averaged
and never stepped on by the server optimiser, and a learning-rate schedule the server sets.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from fedal.flower import protocol
from fedal.messages import TrainInstruction
from fedal.models import ConvNet, TorchClassifier, augmentation_for, build_model, model_for
from fedal.models.torch_adapter import augment_images, strong_augment
from fedal.exceptions import ProtocolError
from federation_helpers import train_replies


def _images(n: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, 28, 28), dtype=np.float32)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_convnet_gives_logits_and_pooled_embeddings(norm):
    net = ConvNet(3, 5, norm=norm).eval()
    x = torch.from_numpy(_images(4))
    assert net(x).shape == (4, 5)
    assert net.embed(x).shape == (4, 128)
    assert isinstance(net.head, torch.nn.Linear)


def test_convnet_refuses_a_wrong_input_and_an_unknown_norm():
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        ConvNet(3, 5).embed(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvNet(3, 5, norm="layer")


@pytest.mark.parametrize("norm, independent", [("group", True), ("none", True), ("batch", False)])
def test_only_batchnorm_makes_a_sample_depend_on_its_batch_in_training(norm, independent):
    """The property one-class batches need: with GroupNorm or no norm a sample's training output is the same
    whatever else is in its batch."""
    torch.manual_seed(0)
    net = ConvNet(3, 4, norm=norm, dropout=0.0).train()
    x = torch.from_numpy(_images(8))
    alone = net(x[:2])
    with_others = net(x)[:2]
    assert torch.allclose(alone, with_others, atol=1e-5) is independent


def _two_sites(norm: str, seed: int = 0):
    X = _images(24, seed)
    y = np.array([0] * 12 + [1] * 12)  # each site holds one class: the worst label skew
    return (X[:12], y[:12]), (X[12:], y[12:])


@pytest.mark.parametrize("norm, same", [("group", True), ("batch", False)])
def test_the_mean_of_one_local_sgd_step_per_site_is_the_pooled_step(norm, same):
    sites = _two_sites(norm)

    def model():
        clf = TorchClassifier(lambda: ConvNet(3, 2, norm=norm, dropout=0.0), 2, optimizer="sgd", lr=0.1,
                              local_steps=1, batch_size=64, seed=0)
        clf.module.observe_inputs(torch.from_numpy(np.concatenate([s[0] for s in sites])))  # the federation's
        return clf

    start = model().get_state()
    states, sizes = [], []
    for X, y in sites:
        site = model()
        site.set_state(start)
        site.fit(X, y)
        states.append(site.get_state())
        sizes.append(len(y))
    mean = {k: sum(s[k].astype(np.float64) * n for s, n in zip(states, sizes)) / sum(sizes) for k in start}
    pooled = model()
    pooled.set_state(start)
    pooled.fit(np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites]))
    weights = [k for k in start if "running" not in k and "num_batches" not in k]
    gap = max(np.abs(mean[k] - pooled.get_state()[k]).max() for k in weights)
    assert bool(gap < 1e-5) is same, gap


def test_local_steps_takes_exactly_that_many_steps_and_cycles_through_the_labels():
    clf = TorchClassifier(lambda: ConvNet(1, 3, norm="group"), 3, optimizer="sgd", lr=0.01, local_steps=5,
                          batch_size=4, epochs=50, min_steps=100, seed=0)
    seen = []
    clf.module.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])) if mod.training else None)
    clf.fit(_images(6, channels=1), np.array([0, 1, 2, 0, 1, 2]))
    assert seen == [4, 2, 4, 2, 4]  # 5 batches, epochs and min_steps ignored; each pass covers all 6


def test_fit_takes_the_rounds_learning_rate():
    X, y = _images(8), np.array([0, 1] * 4)
    clfs = [TorchClassifier(lambda: ConvNet(3, 2, norm="group", dropout=0.0), 2, optimizer="sgd", lr=0.5,
                            local_steps=1, batch_size=8, seed=0) for _ in range(3)]
    start = clfs[0].get_state()
    for c in clfs:
        c.set_state(start)
    clfs[0].fit(X, y)
    clfs[1].fit(X, y, lr=0.5)
    clfs[2].fit(X, y, lr=0.0)
    a, b, c = (m.get_state() for m in clfs)
    assert all(np.allclose(a[k], b[k]) for k in start)
    assert all(np.allclose(c[k], start[k]) for k in start if not k.startswith("input_"))
    assert any(not np.allclose(a[k], start[k]) for k in start)


def test_inputs_are_standardised_from_the_first_labels_and_kept():
    clf = build_model((3, 28, 28), 2, network="convnet", optimizer="sgd", lr=0.01, local_steps=1, seed=0)
    X = _images(10) * 0.5 + 0.2
    clf.fit(X, np.array([0, 1] * 5))
    state = clf.get_state()
    assert state["input_ready"] == 1.0
    assert np.allclose(state["input_mean"], X.mean(axis=(0, 2, 3)), atol=1e-5)
    clf.fit(X + 5, np.array([0, 1] * 5))  # later labels do not move the standardisation
    assert np.allclose(clf.get_state()["input_mean"], state["input_mean"])
    assert set(clf.buffer_keys()) == {"input_mean", "input_std", "input_ready"}


def test_augmentation_shifts_and_flips_images_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    assert augment_images(x, "none", gen) is x
    shifted = augment_images(x, "shift", gen)
    assert shifted.shape == x.shape and not torch.equal(shifted, x)
    flat = torch.ones(3, 3, 28, 28)
    assert torch.equal(augment_images(flat, "shift-flip", gen), flat)  # reflect padding: nothing from outside
    tabular = torch.zeros(4, 10)
    assert augment_images(tabular, "shift-flip", gen) is tabular
    # a flip alone (no room to shift) would be caught by comparing with the mirrored image
    ramp = torch.linspace(0, 1, 28).expand(1, 1, 28, 28).repeat(64, 1, 1, 1)
    out = augment_images(ramp, "shift-flip", torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum()
    assert 10 < int(flipped) < 54
    out = augment_images(ramp, "shift", torch.Generator().manual_seed(1))
    assert int((out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum()) == 0


def test_auto_augmentation_flips_only_flip_invariant_images():
    assert augmentation_for("auto", "bloodmnist", (3, 28, 28)) == "shift-flip"
    assert augmentation_for("auto", "../data/BloodMNIST.npz", (3, 28, 28)) == "shift-flip"
    assert augmentation_for("auto", "mnist", (1, 28, 28)) == "shift"  # a flipped 2 is not a 2
    assert augmentation_for("auto", "digits", (64,)) == "none"
    assert augmentation_for("none", "bloodmnist", (3, 28, 28)) == "none"


def test_model_for_builds_the_recipe_from_the_settings():
    cfg = FederationConfig(dataset="bloodmnist", pipeline="network", network="convnet", norm="none",
                           local_optimizer="sgd", lr=1.0, local_steps=1, momentum=0.5, weight_decay=5e-4)
    clf = model_for(cfg, (3, 28, 28), 8, seed=0)
    assert isinstance(clf.module, ConvNet) and clf.module.norm == "none"
    assert (clf.local_steps, clf.momentum, clf.weight_decay, clf.augment) == (1, 0.5, 5e-4, "shift-flip")


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="lbfgs"), "optimizer"), (dict(schedule="step"), "schedule"), (dict(augment="rotate"), "augment"),
    (dict(momentum=1.0), "momentum"), (dict(local_steps=-1), "local_steps")])
def test_recipe_arguments_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TorchClassifier(lambda: ConvNet(3, 2), 2, **kwargs)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = FederationConfig(rounds=100, lr_schedule="cosine")
    factors = [cfg.round_lr_factor(r) for r in range(1, 101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert FederationConfig(rounds=100).round_lr_factor(50) == 1.0


def test_eval_rounds_are_every_kth_the_eves_of_query_rounds_and_the_ends():
    cfg = FederationConfig(rounds=12, query_every=5, eval_every=4)  # queries in rounds 2, 7, 12
    assert [r for r in range(1, 13) if cfg.is_eval_round(r)] == [1, 4, 6, 8, 11, 12]
    stopping = FederationConfig(rounds=12, query_every=5, eval_every=4, stop_when="plateau")
    assert [r for r in range(1, 13) if stopping.is_eval_round(r)] == [1, 2, 4, 6, 7, 8, 11, 12]
    assert all(FederationConfig(rounds=5).is_eval_round(r) for r in range(1, 6))
    # an eval-every round just before a round evaluated anyway is left out: no two test passes in a row
    aligned = FederationConfig(rounds=61, query_every=30, eval_every=30)  # queries in rounds 2, 32
    assert [r for r in range(1, 62) if aligned.is_eval_round(r)] == [1, 31, 61]
    assert [r for r in range(1, 62) if FederationConfig(rounds=61, query_every=30, eval_every=20).is_eval_round(r)] \
        == [1, 20, 31, 40, 61]


def test_the_rounds_lr_factor_travels_in_the_instruction():
    assert TrainInstruction.from_config({"server-round": 3, "query-budget": 0}).lr_factor == 1.0
    assert TrainInstruction.from_config({"server-round": 3, "query-budget": 0, "lr-factor": 0.25}).lr_factor == 0.25
    with pytest.raises(ProtocolError, match="lr-factor"):
        TrainInstruction(3, 0, lr_factor=1.5)


# ------------------------------------------------------------------ the server's side, in process
def _strategy(tmp_path, **settings):
    from fedal.budget import BudgetCoordinator
    from server.book import RoundBook
    from server.privacy import PrivacySettings
    from server.strategy import make_strategy

    cfg = FederationConfig(**{**dict(dataset="bloodmnist", clients=2, min_clients=2, output_dir=str(tmp_path),
                                     pipeline="network", network="convnet"), **settings})
    model = model_for(cfg, (3, 28, 28), 8, seed=0)
    book = RoundBook(BudgetCoordinator(cfg.budget_policy, cfg.round_budget), PrivacySettings.from_config(cfg))
    return make_strategy(cfg, book, model), model.get_state()


def test_statistics_are_averaged_and_the_weights_take_the_server_optimisers_step(flower_task, tmp_path):
    strategy, start = _strategy(tmp_path, aggregation="fedadam", server_lr=0.01)
    one = {k: v.copy() for k, v in start.items()}
    two = {k: v.copy() for k, v in start.items()}
    one["head.bias"] = one["head.bias"] + 1.0
    two["head.bias"] = two["head.bias"] + 1.0
    one["input_mean"], two["input_mean"] = np.full(3, 1.0, np.float32), np.full(3, 3.0, np.float32)
    one["input_ready"] = two["input_ready"] = np.array(1.0, np.float32)
    messages, replies = train_replies(strategy, start, {1: (one, 10), 2: (two, 30)})
    assert set(messages[0].content[protocol.ARRAYS].keys()) == set(start)  # the clients get the statistics too
    arrays, _ = strategy.aggregate_train(1, replies)
    new = protocol.state_from_record(arrays)
    assert list(new) == list(start)
    assert np.allclose(new["input_mean"], 2.5) and new["input_ready"] == 1.0  # example-weighted mean
    # FedAdam's first step moves each weight by about eta towards the mean, not all the way (+1.0)
    step = new["head.bias"] - start["head.bias"]
    assert np.all((step > 0) & (step < 0.05))


def test_a_schedule_scales_fedadams_step_and_otherwise_goes_to_the_clients(flower_task, tmp_path):
    adam, start = _strategy(tmp_path, aggregation="fedadam", server_lr=0.02, lr_schedule="cosine", rounds=20)
    messages, _ = train_replies(adam, start, {1: (start, 5), 2: (start, 5)})
    assert adam._optimiser.eta == pytest.approx(0.02 * 0.5)  # round 1 of a 2-round warm-up
    assert protocol.LR_FACTOR not in messages[0].content[protocol.CONFIG]
    plain, start = _strategy(tmp_path, aggregation="fedavg", lr_schedule="cosine", rounds=20)
    messages, _ = train_replies(plain, start, {1: (start, 5), 2: (start, 5)})
    assert messages[0].content[protocol.CONFIG][protocol.LR_FACTOR] == pytest.approx(0.5)


@pytest.mark.parametrize("aggregation", ["fedadam", "fedavgm"])
def test_the_loop_optimiser_takes_flowers_step(flower_task, tmp_path, aggregation):
    """fedal.serveropt (benchmarks, compare's pooled reference) computes what Flower's strategy does in a run."""
    from fedal.serveropt import ServerOptimiser

    strategy, start = _strategy(tmp_path, aggregation=aggregation, server_lr=0.01, lr_schedule="cosine", rounds=10)
    loop_cfg = FederationConfig(pipeline="network", aggregation=aggregation, server_lr=0.01, lr_schedule="cosine",
                                rounds=10)
    loop = ServerOptimiser(loop_cfg, buffers=["input_mean", "input_std", "input_ready"])
    rng = np.random.default_rng(0)
    state = start
    for server_round in (1, 2, 3):
        updates = {n: ({k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in state.items()}, 10 * n)
                   for n in (1, 2)}
        mean = {k: (updates[1][0][k].astype(np.float64) * 10 + updates[2][0][k] * 20) / 30 for k in state}
        expected = loop.step(state, {k: v.astype(state[k].dtype) for k, v in mean.items()}, server_round)
        _, replies = train_replies(strategy, state, updates, server_round)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        got = protocol.state_from_record(arrays)
        for k in state:
            assert np.allclose(got[k], expected[k], atol=1e-5), (server_round, k)
        state = got


def test_reading_settings_imports_no_torch_and_names_the_norms_the_network_has():
    import subprocess
    import sys

    from fedal.config import NORMS
    from fedal.models import nets

    assert tuple(nets.NORMS) == NORMS
    code = "import sys, fedal.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_fit_draws_its_batches_from_the_round_it_is_told():
    """A site builds its model afresh for every message: without the round, every round of one local step
    would train on the same first batch of the same shuffle."""
    X, y = _images(40), np.array([0, 1] * 20)

    def fitted(draw):
        clf = TorchClassifier(lambda: ConvNet(3, 2, norm="group"), 2, optimizer="sgd", lr=0.5, local_steps=1,
                              batch_size=8, augment="shift-flip", seed=0)
        clf.fit(X, y, draw=draw)
        return clf.get_state()

    one, again, other = fitted(3), fitted(3), fitted(4)
    assert all(np.array_equal(one[k], again[k]) for k in one)
    assert any(not np.allclose(one[k], other[k]) for k in one)


# ------------------------------------------------------------------ the pools: FixMatch's consistency loss
def test_the_strong_view_is_a_different_image_of_the_same_shape_drawn_from_the_generator():
    x = torch.from_numpy(_images(6))
    a = strong_augment(x, "shift-flip", torch.Generator().manual_seed(3))
    b = strong_augment(x, "shift-flip", torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x, atol=0.05)
    table = torch.zeros(5, 10)
    assert strong_augment(table, "none", torch.Generator().manual_seed(0)).shape == (5, 10)


def _consistency_model(consistency: float, threshold: float) -> TorchClassifier:
    return build_model((3, 28, 28), 4, network="convnet", optimizer="sgd", lr=0.5, local_steps=3, batch_size=8,
                       seed=0, augment="shift", consistency=consistency, consistency_threshold=threshold)


def test_the_consistency_loss_trains_on_confident_pool_images_only():
    X, y, pool = _images(8, 0), np.array([0, 1, 2, 3] * 2), _images(40, 1)
    plain = _consistency_model(0.0, 0.95)
    assert not plain.uses_unlabeled and _consistency_model(1.0, 0.95).uses_unlabeled
    plain.fit(X, y, unlabeled=pool)  # consistency off: the pool is ignored
    unreachable = _consistency_model(1.0, 1.0)  # no untrained prediction is certain: nothing is pseudo-labeled
    unreachable.fit(X, y, unlabeled=pool)
    low = _consistency_model(1.0, 0.01)  # every pool image is "confident"
    low.fit(X, y, unlabeled=pool)
    a, b, c = plain.get_state(), unreachable.get_state(), low.get_state()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.allclose(a[k], c[k]) for k in a if not k.startswith("input_"))
    with pytest.raises(ConfigError, match="consistency"):
        _consistency_model(-1.0, 0.95)
