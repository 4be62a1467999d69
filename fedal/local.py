"""On-device active learning with no federation: a strategy's learning curve on one device.

:func:`run_curve` runs the learner from an initial labeled set for a number of query
steps; ``fedal local`` runs it twice from the same initial set (one query strategy, then
a baseline) and prints accuracy against the number of labels (:func:`format_table`).
"""
from __future__ import annotations

import math

from fedal.learner import ActiveLearner
from fedal.models import build_model
from fedal.oracle import SimulatedOracle
from fedal.pool import Pool
from fedal.stopping import StepRecord


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
