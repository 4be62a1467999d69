"""Benchmark: how far FedAvg trails pooled training on the *same* labels (no active learning).

Active learning chooses which samples get labels; the federation then has to learn from
them. This script takes the query strategy out: every client of a preset's federation
gets the same number of random labels from its own pool, and the same model is trained

* federated: FedAvg (or FedProx) rounds, each client training locally with the preset's
  settings (:meth:`fedal.models.TorchClassifier.fit`, the code the clients run), the
  server taking the example-weighted mean of the weights;
* centralized: the same labels pooled, one warm-started fit per round with the same
  settings (what ``fedal compare``'s centralized reference does);

and prints the test accuracy of both after each round, for one or more training variants.
With ``pipeline = "head"`` (a preset's setting or a variant's) the clients send the class
statistics of their labels (and, self-training, of their confident pool samples) and the
server solves the LDA head of the sum; the centralized side fits the same head on the
pooled labels and pools.
The difference at equal labels is the part of the federated-vs-centralized gap that no
query strategy can close. Writes ``simulations/results/bench_fl_gap.{md,json}`` (``--name``
changes the file name).

    .venv/bin/python -m simulations.bench.fl_gap --preset simulations/presets/bloodmnist_a01.toml \\
        --labels-per-client 35 --rounds 20 --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from simulations.bench.common import ROOT, machine_info, portable

#: not a federation setting: evaluate the network with an LDA head solved from the summed class
#: statistics of its penultimate embeddings (Fed3R-style; exact, like the head pipeline's)
LDA_HEAD = "+lda-head"
#: the network recipe's federation settings (see the ConvNet variants)
RECIPE = {"pipeline": "network", "network": "convnet", "norm": "group", "local-optimizer": "sgd", "lr": 1.0,
          "local-steps": 1, "batch-size": 32, "weight-decay": 5e-4, "aggregation": "fedadam", "server-lr": 0.003,
          "lr-schedule": "cosine"}
#: the pooled reference of a ConvNet variant: AdamW, one-cycle schedule, batch 128 (a network trained well)
POOLED = {"optimizer": "adamw", "lr": 0.003, "batch_size": 128, "schedule": "onecycle"}
#: training variants: name -> federation settings that differ from the preset
VARIANTS = {
    "preset": {},
    "fewer local steps (min 10)": {"min-local-steps": 10},
    "fedprox mu 0.1": {"proximal-mu": 0.1},
    "network (SmallCNN + Adam)": {"pipeline": "network"},
    "head without self-training": {"pipeline": "head", "pseudo-label-threshold": 0.0},
    "head + self-training": {"pipeline": "head", "pseudo-label-threshold": 0.9},
    # the SmallCNN's own protocol: one full-batch SGD step per client per round is centralized gradient descent
    "SmallCNN + SGD (1 full-batch step)": {"pipeline": "network", "local-optimizer": "sgd", "lr": 0.05,
                                         "batch-size": 100000, "local-epochs": 1, "min-local-steps": 1},
    "SmallCNN + SGD (1 full-batch step) + FedRS 0.5": {"pipeline": "network", "local-optimizer": "sgd", "lr": 0.05,
                                                      "batch-size": 100000, "local-epochs": 1, "min-local-steps": 1,
                                                      "restricted-softmax": 0.5},
    "SmallCNN + Adam + exact LDA head on its embeddings": {"pipeline": "network", LDA_HEAD: True},
    # the recipe for small images: a ConvNet without batch statistics, one local SGD step per round, Adam on the
    # server (FedAdam): the federation takes the step pooled Adam takes on the union of the clients' batches
    "ConvNet GroupNorm + FedAdam (1 step)": {**RECIPE, "norm": "group"},
    "ConvNet no norm + FedAdam (1 step)": {**RECIPE, "norm": "none"},
    # fewer, longer rounds: two local SGD steps per round (the second from the first's weights: no longer exactly
    # the union's gradient), at the client learning rate given
    "ConvNet GroupNorm + FedAdam (2 steps at lr 1)": {**RECIPE, "norm": "group", "local-steps": 2},
    "ConvNet GroupNorm + FedAdam (2 steps at lr 0.1)": {**RECIPE, "norm": "group", "local-steps": 2, "lr": 0.1},
    # fewer rounds, each the union's gradient of twice the batch (still exact: one step per round)
    "ConvNet GroupNorm + FedAdam (1 step of 64)": {**RECIPE, "norm": "group", "batch-size": 64},
    "ConvNet GroupNorm + FedAdam (1 step of 64 at server lr 0.005)": {**RECIPE, "norm": "group", "batch-size": 64,
                                                                      "server-lr": 0.005},
    # the sites' unlabeled pools in each step: FixMatch's consistency loss (fedal.models.TorchClassifier)
    "ConvNet GroupNorm + FedAdam (1 step) + consistency": {**RECIPE, "norm": "group", "consistency": 1.0},
    # BatchNorm needs mixed batches: a client's batch of one or two classes gives it other statistics
    "ConvNet BatchNorm + FedAdam (1 step)": {**RECIPE, "norm": "batch"},
    "ConvNet BatchNorm + FedAvgM (1 step)": {**RECIPE, "norm": "batch", "aggregation": "fedavgm", "lr": 0.1,
                                             "server-momentum": 0.9},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=str(ROOT / "simulations" / "presets" / "bloodmnist_a01.toml"))
    p.add_argument("--labels-per-client", type=int, default=35, help="random labels each client holds")
    p.add_argument("--total-labels", type=int, default=0,
                   help="instead: this many random labels drawn from the union of the pools (a client holds its "
                        "pool's share)")
    p.add_argument("--pooled-epochs", type=int, default=40,
                   help="epochs of the pooled reference of the ConvNet variants (one fit, one-cycle schedule)")
    p.add_argument("--pooled-norm", default="", choices=["", "group", "batch", "none"],
                   help="norm of the pooled reference's network (default: the variant's own): `batch` is the "
                        "standard pooled training a federation of one-class batches cannot use")
    p.add_argument("--pooled-only", action="store_true",
                   help="train only the pooled references (no federated run): the reference rows of a table")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a federation setting for every variant, over the variant's own (e.g. max-train=0 for all "
                        "training images)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--report-rounds", default="1,2,5,10,20", help="rounds shown in the table")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    p.add_argument("--name", default="bench_fl_gap",
                   help="file name (without .md/.json) of the results, e.g. bench_fl_gap_pneumoniamnist")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    args.report_rounds = [r for r in (int(x) for x in args.report_rounds.split(",")) if 1 <= r <= args.rounds]
    return args


def labeled_sets(cfg, per_client: int, seed: int, total: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each client's random labeled set (``per_client``, at most its pool; or its share of ``total`` random
    labels of the union of the pools) and the rest of its pool: ``(X, y, unlabeled X)``, in what the run's
    model takes (features with the head pipeline)."""
    from fedal.federation import client_data
    from simulations.compare import client_inputs

    rng = np.random.default_rng(seed)
    inputs = client_inputs(cfg)
    sizes = [len(X) for X in inputs]
    if total:
        if total > sum(sizes):
            raise SystemExit(f"--total-labels {total} is more than the {sum(sizes)} pool samples; set a larger "
                             "max-train (--set max-train=0 for all) or ask for fewer labels")
        chosen = rng.choice(sum(sizes), total, replace=False)
        owner = np.searchsorted(np.cumsum(sizes), chosen, side="right")
        counts = np.bincount(owner, minlength=len(sizes))
    sets = []
    for c, X in enumerate(inputs):
        y = client_data(cfg, c).y_pool
        n = int(counts[c]) if total else min(per_client, len(y))
        pick = rng.choice(len(y), n, replace=False)
        rest = np.setdiff1d(np.arange(len(y)), pick)
        sets.append((X[pick], y[pick], X[rest]))
    return sets


def head_curves(cfg, sets, rounds: int, X_test, y_test) -> tuple[list[float], list[float], float]:
    """Federated (summed statistics) and centralized (pooled) LDA heads on the same labels, and the largest
    difference of their test probabilities; one value per round (the heads are solved, not iterated)."""
    from fedal.heads import ClassStatistics
    from fedal.models import model_for

    n_classes = int(max(y.max() for _, y, _ in sets if len(y)) + 1)
    n_classes = max(n_classes, int(y_test.max()) + 1)
    dim = sets[0][0].shape[1]
    server = model_for(cfg, (dim,), n_classes, seed=cfg.seed)
    labeled, pseudo = ClassStatistics.empty(n_classes, dim), ClassStatistics.empty(n_classes, dim)
    for X, y, _ in sets:  # round 1: the labels alone (no head yet to self-train with)
        labeled = labeled + ClassStatistics.from_samples(X, y, n_classes)
    server.fit_statistics(labeled)
    fed = [server.evaluate(X_test, y_test)[1]]
    for _ in range(1, rounds):  # every client pseudo-labels its pool with the server's labeled head
        pseudo = ClassStatistics.empty(n_classes, dim)
        for X, y, rest in sets:
            _, p, _ = server.statistics(X, y, rest)
            pseudo = pseudo + p
        server.fit_statistics(labeled, pseudo)
        fed.append(server.evaluate(X_test, y_test)[1])
    central = model_for(cfg, (dim,), n_classes, seed=cfg.seed)
    central.fit(np.concatenate([s[0] for s in sets]), np.concatenate([s[1] for s in sets]),
                unlabeled=np.concatenate([s[2] for s in sets]))
    acc = central.evaluate(X_test, y_test)[1]
    return fed, [acc] * rounds, float(np.abs(server.predict_proba(X_test) - central.predict_proba(X_test)).max())


def _accuracy(model, cfg, ds, sets, lda_head: bool) -> float:
    """Test accuracy of a network, or (``lda_head``) of the LDA head of its embeddings of the labels."""
    X_test = _test_inputs(cfg, ds)
    if not lda_head:
        return model.evaluate(X_test, ds.y_test)[1]
    from fedal.heads import ClassStatistics, LDAHead

    total = ClassStatistics.empty(ds.n_classes, model.module.head.in_features)
    for X, y, _ in sets:  # what each client would send: the statistics of its labels' embeddings
        total = total + ClassStatistics.from_samples(model.forward(X)[1], y, ds.n_classes)
    head = LDAHead.from_statistics(total)
    return float((head.probs(model.forward(X_test)[1]).argmax(axis=1) == ds.y_test).mean())


def federated_curve(cfg, sets, rounds: int, ds, evaluate_at=None, lda_head: bool = False) -> list[float]:
    """Test accuracy of the federated model after each round (NaN on rounds not in ``evaluate_at``; default
    every round): FedAvg (FedProx with ``cfg.proximal_mu``), or the server optimiser of ``cfg.aggregation``
    (:class:`fedal.serveropt.ServerOptimiser`), with the learning-rate schedule of ``cfg.lr_schedule``."""
    from fedal.models import model_for
    from fedal.seeds import client_seed
    from fedal.serveropt import ServerOptimiser

    shape = sets[0][0].shape[1:]
    server = model_for(cfg, shape, ds.n_classes, seed=cfg.seed)
    clients = [model_for(cfg, shape, ds.n_classes, seed=client_seed(cfg.seed, c)) for c in range(len(sets))]
    optimiser = ServerOptimiser(cfg, server.buffer_keys())
    curve = []
    for r in range(1, rounds + 1):
        state = server.get_state()
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in state.items()}
        n = 0
        lr = cfg.lr * optimiser.client_lr_factor(r)
        for model, (X, y, pool) in zip(clients, sets):
            if len(y) == 0:
                continue
            model.set_state(state)
            model.fit(X, y, proximal_mu=cfg.proximal_mu, lr=lr, unlabeled=pool)  # (pool: the consistency loss)
            for k, v in model.get_state().items():
                total[k] += v * len(y)
            n += len(y)
        mean = {k: (v / n).astype(state[k].dtype) for k, v in total.items()}
        server.set_state(optimiser.step(state, mean, r))
        if evaluate_at is None or r in evaluate_at:
            curve.append(_accuracy(server, cfg, ds, sets, lda_head))
        else:
            curve.append(float("nan"))
    return curve


def pooled_reference(cfg, sets, ds, epochs: int, norm: str = "") -> float:
    """Test accuracy of the same network trained well on the pooled labels: one fit of ``epochs`` with
    :data:`POOLED` (AdamW, one-cycle) and the run's augmentation and weight decay; ``norm`` replaces the
    run's norm (``batch``: BatchNorm, which pooled batches of every class can use)."""
    from fedal.models import augmentation_for, build_model

    X = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])
    model = build_model(X.shape[1:], ds.n_classes, network=cfg.network, norm=norm or cfg.norm, epochs=epochs,
                        weight_decay=cfg.weight_decay, seed=cfg.seed,
                        augment=augmentation_for(cfg.augment, cfg.dataset, X.shape[1:]), **POOLED)
    model.fit(X, y)
    return model.evaluate(_test_inputs(cfg, ds), ds.y_test)[1]


def centralized_curve(cfg, sets, rounds: int, ds, evaluate_at=None, lda_head: bool = False) -> list[float]:
    """Test accuracy after each of ``rounds`` warm-started fits on the pooled labels (NaN off ``evaluate_at``)."""
    from fedal.models import model_for

    X = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])
    model = model_for(cfg, X.shape[1:], ds.n_classes, seed=cfg.seed)
    curve = []
    for _ in range(rounds):
        model.fit(X, y)
        if evaluate_at is None or len(curve) + 1 in evaluate_at:
            curve.append(_accuracy(model, cfg, ds, sets, lda_head))
        else:
            curve.append(float("nan"))
    return curve


def table(results: dict) -> str:
    shown = results["report_rounds"]
    lines = [f"Mean test accuracy over seeds {results['seeds']} after round r "
             + (f"({results['args']['total_labels']} random labels of the union of the pools; per seed: "
                if results["args"].get("total_labels") else
                f"(up to {results['labels_per_client']} random labels per client; labels in all, per seed: ")
             + f"{', '.join(map(str, results['total_labels']))}).", "",
             "| training | " + " | ".join(f"r={r}" for r in shown) + " | gap to centralized at r=" + f"{shown[-1]} |",
             "|---|" + "---:|" * (len(shown) + 1)]
    for name, curves in results["curves"].items():
        mean = np.mean(curves, axis=0)
        if name.endswith(" | centralized"):
            norm = results["args"].get("pooled_norm")
            lines.append(f"| {name.replace(' | ', ': ')} (pooled labels{f', {norm} norm' if norm else ''}) | "
                         + " | ".join(f"{mean[r - 1]:.3f}" for r in shown) + " | - |")
            continue
        central = np.mean(results["curves"][f"{name} | centralized"], axis=0)
        gap = 100 * (mean[shown[-1] - 1] - central[shown[-1] - 1])
        lines.append(f"| {name}: federated | " + " | ".join(f"{mean[r - 1]:.3f}" for r in shown) + f" | {gap:+.1f} pt |")
    return "\n".join(lines)


def _test_inputs(cfg, ds) -> np.ndarray:
    from fedal.features import featurizer_for, model_inputs

    return model_inputs(featurizer_for(cfg.features, ds.input_shape, cfg.pipeline), ds.X_test)


def main(argv=None) -> dict:
    import torch

    from fedal.config import FederationConfig
    from fedal.federation import federation_dataset
    from simulations.compare import load_preset

    torch.set_num_threads(1)
    args = parse_args(argv)
    from fedal.config import parse_assignments

    base, _ = load_preset(args.preset)
    if args.overrides:
        base = FederationConfig.from_mapping(parse_assignments(args.overrides), base=base)
    curves: dict[str, list[list[float]]] = {}
    seconds: dict[str, float] = {}
    max_prob_difference: dict[str, float] = {}
    total_labels = []
    for seed in args.seeds:
        cfg = FederationConfig.from_mapping({"seed": seed}, base=base)
        ds = federation_dataset(cfg)
        for name in args.variants:
            settings = {k: v for k, v in VARIANTS[name].items() if k != LDA_HEAD}
            lda_head = bool(VARIANTS[name].get(LDA_HEAD))
            # the run is --rounds long: a learning-rate schedule spans those rounds
            vcfg = FederationConfig.from_mapping({**settings, "rounds": args.rounds,
                                                  **parse_assignments(args.overrides)}, base=cfg)
            sets = labeled_sets(vcfg, args.labels_per_client, seed, args.total_labels)  # the same in every variant
            if name == args.variants[0]:
                total_labels.append(sum(len(s[1]) for s in sets))
            t0 = time.perf_counter()
            if vcfg.pipeline == "head":
                X_test = _test_inputs(vcfg, ds)
                fed, central, diff = head_curves(vcfg, sets, args.rounds, X_test, ds.y_test)
                max_prob_difference[f"{name}-seed{seed}"] = diff
            else:
                fed = None if args.pooled_only else federated_curve(vcfg, sets, args.rounds, ds, args.report_rounds,
                                                                     lda_head)
                if vcfg.network == "convnet":  # trained well once on the pooled labels: the same value every round
                    central = [pooled_reference(vcfg, sets, ds, args.pooled_epochs, args.pooled_norm)] * args.rounds
                else:
                    central = centralized_curve(vcfg, sets, args.rounds, ds, args.report_rounds, lda_head)
            if fed is not None:
                curves.setdefault(name, []).append(fed)
            curves.setdefault(f"{name} | centralized", []).append(central)
            seconds[f"{name}-seed{seed}"] = round(time.perf_counter() - t0, 1)
            print(f"seed {seed} {name}: final {'-' if fed is None else f'{fed[-1]:.4f}'} (centralized "
                  f"{central[-1]:.4f}), {seconds[f'{name}-seed{seed}']:.0f} s", flush=True)
    results = {"command": "python -m simulations.bench.fl_gap " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info(), "args": portable({k: v for k, v in vars(args).items()}),
               "variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds,
               "labels_per_client": args.labels_per_client, "total_labels": total_labels,
               "report_rounds": args.report_rounds, "curves": curves, "seconds": seconds,
               "max_probability_difference_federated_vs_pooled_head": max_prob_difference}
    text = table(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    finite = {**results, "curves": {k: [[None if v != v else v for v in c] for c in cs]  # NaN: not evaluated
                                     for k, cs in results["curves"].items()}}
    (out / f"{args.name}.json").write_text(json.dumps(finite, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(f"Command: `{results['command']}`\n\n{text}\n")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return results


if __name__ == "__main__":
    main()
