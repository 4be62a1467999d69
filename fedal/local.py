"""On-device active learning with no federation: a strategy's learning curve on one device.

:func:`run_curve` runs the learner from an initial labeled set for a number of query
steps; ``fedal local`` runs it twice from the same initial set (one query strategy, then
a baseline) and prints accuracy against the number of labels (:func:`format_table`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from fedal.learner import ActiveLearner
from fedal.models import build_model
from fedal.oracle import SimulatedOracle
from fedal.pool import Pool
from fedal.stopping import BudgetExhausted, StepRecord, StoppingCriterion


def run_curve(dataset, strategy: str, *, initial: int, budget: int, steps: int, seed: int,
              epochs: int, noise_rate: float = 0.0, noise_kind: str = "uniform", unsure_rate: float = 0.0,
              cold_start: str = "random",
              stopping: Sequence[StoppingCriterion] = ()) -> tuple[list[StepRecord], str | None]:
    """Learning curve of one strategy on one device, and why it stopped early (None: all ``steps`` ran).

    The first record is the initial set.

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
    noise_kind : {"uniform", "neighbour"}
        Which wrong class a noisy answer gives (:data:`fedal.oracle.NOISE_KINDS`).
    unsure_rate : float
        Share of samples the oracle answers "unsure" (not labeled, not asked again).
    cold_start : str
        Strategy that picks the initial set.
    stopping : sequence of StoppingCriterion
        Checked after every step (``fedal.stopping.criteria_from``); the curve ends when one fires.
    """
    model = build_model(dataset.input_shape, dataset.n_classes, epochs=epochs, seed=seed)
    pool = Pool(dataset.n_classes, size=len(dataset.y_train))
    oracle = SimulatedOracle(dataset.y_train, dataset.n_classes, noise_rate=noise_rate, seed=seed,
                             noise_kind=noise_kind, unsure_rate=unsure_rate)
    learner = ActiveLearner(model, strategy, dataset.X_train, pool, oracle, cold_start=cold_start,
                            X_eval=dataset.X_test, y_eval=dataset.y_test, seed=seed)
    learner.step(initial)  # nothing labeled yet: the cold-start strategy picks the initial set
    stop_reason = None
    caps = [c.total_labels for c in stopping if isinstance(c, BudgetExhausted)]
    for _ in range(steps):
        if pool.counts()["unlabeled"] == 0:
            break
        left = min([budget] + [cap - pool.counts()["labeled"] for cap in caps])  # a label budget is a hard cap
        if left <= 0:
            stop_reason = f"label budget of {min(caps)} spent"
            break
        learner.step(left)
        if reason := next((r for c in stopping if (r := c.check(learner.history))), None):
            stop_reason = reason
            break
    pool.close()
    return learner.history, stop_reason


def format_table(curves: dict[str, list[StepRecord]]) -> str:
    """Markdown table: labels | accuracy per strategy, from ``curves`` (name -> step records)."""
    names = list(curves)
    lines = ["| labels | " + " | ".join(f"{n} acc" for n in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for rows in zip(*curves.values()):
        cells = " | ".join("-" if math.isnan(r.accuracy) else f"{r.accuracy:.3f}" for r in rows)
        lines.append(f"| {rows[0].labeled} | {cells} |")
    return "\n".join(lines)
