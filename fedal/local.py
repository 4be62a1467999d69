"""``fedal local``: on-device active learning with no federation, a strategy next to random.

Runs the same learner twice from the same initial labeled set (one query strategy,
then random sampling) and prints accuracy against the number of labels.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path


from fedal.data import available_datasets, load_dataset
from fedal.exceptions import ConfigError
from fedal.learner import ActiveLearner
from fedal.models import build_model
from fedal.oracle import SimulatedOracle
from fedal.pool import Pool
from fedal.stopping import StepRecord
from fedal.strategies import available_strategies, get_strategy


def run_curve(dataset, strategy: str, *, initial: int, budget: int, steps: int, seed: int,
              epochs: int, noise_rate: float = 0.0, cold_start: str = "random") -> list[StepRecord]:
    """Learning curve of one strategy on one device; the first record is the initial set.

    Parameters
    ----------
    dataset : fedal.data.Dataset
        Training pool and held-out test set.
    strategy : str
        Query strategy name.
    initial : int
        Size of the initial labeled set, picked by ``cold_start``.
    budget : int
        Labels per query step.
    steps : int
        Query steps after the initial set.
    seed : int
        Seed of the model, the oracle noise and every query.
    epochs : int
        Training epochs per step.
    noise_rate : float
        Label-noise rate of the simulated oracle.
    cold_start : str
        Strategy that picks the initial set.
    """
    model = build_model(dataset.input_shape, dataset.n_classes, epochs=epochs, seed=seed)
    pool = Pool(dataset.n_classes, size=len(dataset.y_train))
    oracle = SimulatedOracle(dataset.y_train, dataset.n_classes, noise_rate=noise_rate, seed=seed)
    learner = ActiveLearner(model, strategy, dataset.X_train, pool, oracle, cold_start=cold_start,
                            X_eval=dataset.X_test, y_eval=dataset.y_test, seed=seed)
    learner.step(initial)  # nothing labeled yet: the cold-start strategy picks the initial set
    for _ in range(steps):
        if pool.counts()["unlabeled"] == 0:
            break
        learner.step(budget)
    pool.close()
    return learner.history


def format_table(curves: dict[str, list[StepRecord]]) -> str:
    """Markdown table: labels | accuracy per strategy, from ``curves`` (name -> step records)."""
    names = list(curves)
    lines = ["| labels | " + " | ".join(f"{n} acc" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for rows in zip(*curves.values()):
        cells = " | ".join("-" if math.isnan(r.accuracy) else f"{r.accuracy:.3f}" for r in rows)
        lines.append(f"| {rows[0].labeled} | {cells} |")
    return "\n".join(lines)


def add_local_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fedal local`` flags to the parser ``p``."""
    p.add_argument("--dataset", default="digits", help=f"one of {available_datasets()} or an .npz path (default digits)")
    p.add_argument("--data-dir", default=None, help="folder with the .npz files (default $FEDAL_DATA_DIR or ./data)")
    p.add_argument("--strategy", default="entropy", help="query strategy (see `fedal strategies`)")
    p.add_argument("--baseline", default="random", help="strategy to compare against (default random)")
    p.add_argument("--initial", type=int, default=20, help="initial labeled set size (default 20)")
    p.add_argument("--budget", type=int, default=20, help="labels per query step (default 20)")
    p.add_argument("--steps", type=int, default=10, help="query steps (default 10)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per step (default 30)")
    p.add_argument("--max-train", type=int, default=None, help="subsample the training pool")
    p.add_argument("--noise", type=float, default=0.0, help="simulated oracle label-noise rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results.json here")


def run_local(args: argparse.Namespace) -> int:
    """Run ``fedal local`` with the parsed ``args``; print the table, return 0."""
    for flag in ("initial", "budget", "steps", "epochs"):
        least = 0 if flag == "steps" else 1
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    for name in (args.strategy, args.baseline):  # fail on a typo before minutes of training
        get_strategy(name)
    dataset = load_dataset(args.dataset, args.data_dir, seed=args.seed, max_train=args.max_train)
    print(f"on-device active learning: {dataset.name}, {len(dataset.y_train)} pool samples, "
          f"{dataset.n_classes} classes; initial {args.initial}, {args.steps} steps of {args.budget}")
    curves = {}
    for name in dict.fromkeys([args.strategy, args.baseline]):
        start = time.perf_counter()
        curves[name] = run_curve(dataset, name, initial=args.initial, budget=args.budget, steps=args.steps,
                                 seed=args.seed, epochs=args.epochs, noise_rate=args.noise)
        print(f"  {name}: {time.perf_counter() - start:.1f} s")
    print(format_table(curves))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "local.json").write_text(json.dumps(
            {"config": vars(args), "curves": {k: [asdict(r) for r in v] for k, v in curves.items()}}, indent=2))
    return 0


def add_strategies_arguments(p: argparse.ArgumentParser) -> None:
    """``fedal strategies`` takes no flags; ``p`` is left as it is."""


def run_strategies(args: argparse.Namespace) -> int:
    """Print every registered strategy name with the first line of its docstring (``args`` unused)."""
    for name in available_strategies():
        doc = (type(get_strategy(name)).__doc__ or "").strip().splitlines()[0]
        print(f"{name:20s} {doc}")
    return 0
