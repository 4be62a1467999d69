"""On-device active learning: query -> ask the oracle -> teach -> fit, until a stop.

:class:`ActiveLearner` needs no federation: it runs on one device (a lab PC, a
phone) with a model adapter (:class:`~fedal.models.TorchClassifier` or
:class:`~fedal.models.SklearnClassifier`), a query strategy, a :class:`~fedal.pool.Pool`
and an :class:`~fedal.oracle.Oracle`. The federated client reuses its pieces.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedal.config import DEFAULT_COLD_START
from fedal.data import UnitImages
from fedal.exceptions import ConfigError, InvalidLabelError, OracleError
from fedal.kpi import batch_diversity
from fedal.oracle import UNSURE, Oracle
from fedal.pool import Pool
from fedal.seeds import query_seed
from fedal.stopping import BudgetExhausted, StepRecord, StoppingCriterion
from fedal.strategies import QueryContext, QueryStrategy, get_strategy
from fedal.strategies.uncertainty import entropy


def pool_uncertainty(probs: np.ndarray) -> tuple[float, float]:
    """``(mean, max)`` normalised entropy (in [0, 1]) of a pool's predicted ``probs`` (n, C)."""
    if len(probs) == 0:
        return math.nan, math.nan
    h = entropy(probs) / math.log(probs.shape[1])
    return float(h.mean()), float(h.max())


class ActiveLearner:
    """Pool-based active learning on one device.

    Parameters
    ----------
    model : TorchClassifier or SklearnClassifier
        Anything with ``fit``, ``forward``, ``sample_probs``, ``evaluate``.
    strategy : str or QueryStrategy
        Query strategy (a registry name or an instance).
    X : array
        Inputs of every local sample, row ``i`` is sample id ``pool.ids[i]``.
    pool : Pool
        Bookkeeping of labeled / pending / unlabeled ids.
    oracle : Oracle
        Who answers queries.
    cold_start : str or QueryStrategy
        Strategy used while nothing is labeled (default :data:`fedal.config.DEFAULT_COLD_START`).
    X_eval, y_eval : array, optional
        Held-out data for the accuracy in each step record.
    reinit : bool
        Re-initialise the model before each fit (else warm start).
    seed : int
        Seed of every query.
    """

    def __init__(self, model: Any, strategy: str | QueryStrategy, X: np.ndarray, pool: Pool, oracle: Oracle, *,
                 cold_start: str | QueryStrategy = DEFAULT_COLD_START, X_eval: np.ndarray | None = None,
                 y_eval: np.ndarray | None = None, reinit: bool = False, seed: int = 0) -> None:
        if len(X) != len(pool):
            raise ConfigError(f"X has {len(X)} rows but the pool has {len(pool)} samples; give one row per sample")
        self.model = model
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.cold_start = get_strategy(cold_start) if isinstance(cold_start, str) else cold_start
        self.X = X
        self.pool = pool
        self.oracle = oracle
        self.X_eval, self.y_eval = X_eval, y_eval
        self.reinit = reinit
        self.seed = int(seed)
        self.history: list[StepRecord] = []
        self._row = {int(i): r for r, i in enumerate(pool.ids)}
        self.model_ready = False  # True once the model was trained (locally or a received global model)
        self.last_uncertainty = (math.nan, math.nan)
        self.last_batch_diversity = math.nan  # of the last queried batch (fedal.kpi.batch_diversity)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows of ``X`` that hold the given sample ids."""
        return np.fromiter((self._row[int(i)] for i in ids), dtype=np.int64, count=len(ids))

    def inputs(self, ids: Sequence[int]):
        """The inputs of the sample ids ``ids``, for a model to score: rows of ``X``; a folder's images stay uint8
        until a batch reads them (:class:`fedal.data.UnitImages`)."""
        rows = self.rows(ids)
        return self.X.take(rows) if isinstance(self.X, UnitImages) else self.X[rows]

    def labeled_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and labels of the labeled set."""
        ids, labels = self.pool.labels()
        return self.X[self.rows(ids)], labels

    # ------------------------------------------------------------------- steps
    def query(self, budget: int, *, round: int | None = None, timeout_s: float | None = None,
              offline_grant: int | None = None, offline_budget: int | None = None,
              most_waiting: int | None = None) -> np.ndarray:
        """Select up to ``budget`` unlabeled samples and mark them pending; return the ids asked for.

        Parameters
        ----------
        budget : int
            How many samples to ask for.
        round : int, optional
            Round (or step) recorded with the requests.
        timeout_s : float, optional
            Seconds after which an unanswered request may be expired.
        offline_grant : int, optional
            Asked while the server is away, against the offline budget of this round (:meth:`Pool.request`).
        offline_budget, most_waiting : int, optional
            With ``offline_grant``: limits checked in the transaction that writes the requests (:meth:`Pool.request`),
            so a concurrent process cannot make the two exceed them.
        """
        candidates = self.pool.unlabeled_ids()
        skipped = self.pool.skipped_ids()
        if len(skipped):  # "unsure" once: asking again would spend budget on the same doubt
            candidates = np.setdiff1d(candidates, skipped, assume_unique=True)
        if len(candidates) == 0 or budget <= 0:
            self.last_batch_diversity = math.nan
            return np.zeros(0, np.int64)
        labeled = self.pool.labeled_ids()
        if len(labeled) and not self.model_ready:  # e.g. a reopened pool: score with a trained model
            self.fit()
        use_cold = len(labeled) == 0
        strategy = self.cold_start if use_cold else self.strategy
        ctx = QueryContext(candidates, self.inputs(candidates),
                           model=None if use_cold and not strategy.needs_model else self.model,
                           labeled_X=self.inputs(labeled))
        step_seed = query_seed(self.seed, len(self.history))
        ids = strategy.query(ctx, budget, seed=step_seed)
        if self.model_ready and len(candidates) and ctx.model is not None:  # nothing labeled yet: no model to ask
            self.last_uncertainty = pool_uncertainty(ctx.probs())
            # how spread out the batch is in the model's embedding, against random batches (a KPI)
            chosen = np.searchsorted(ctx.ids, ids) if np.all(np.diff(ctx.ids) > 0) else \
                np.fromiter((int(np.flatnonzero(ctx.ids == i)[0]) for i in ids), np.int64, len(ids))
            emb = ctx.embeddings()
            self.last_batch_diversity = batch_diversity(emb[chosen], emb, np.random.default_rng(step_seed))
        else:
            self.last_batch_diversity = math.nan
        return self.pool.request(ids, round=round, timeout_s=timeout_s, offline_grant=offline_grant,
                                 offline_budget=offline_budget, most_waiting=most_waiting)

    def teach(self, *, round: int | None = None) -> tuple[int, list[str]]:
        """Ask the oracle about every pending sample and record valid answers.

        Returns the number of labels recorded and the reasons answers were rejected
        (with a warning each): an invalid label leaves its request pending; an answer
        for a sample that has no pending request is ignored; an oracle that raises
        :class:`~fedal.exceptions.OracleError` or ``TimeoutError`` leaves every request
        pending (they expire only by their deadline, see :meth:`Pool.expire_overdue`). An
        :data:`~fedal.oracle.UNSURE` answer closes its request as skipped: the sample is
        unlabeled again and :meth:`query` does not ask for it again.

        Parameters
        ----------
        round : int, optional
            Round (or step) recorded with the labels.
        """
        pending = self.pool.pending_ids()
        if len(pending) == 0:
            return 0, []
        try:
            answers = self.oracle.label(pending)
            if not isinstance(answers, Mapping):
                raise OracleError(f"label() returned a {type(answers).__name__}, not a {{sample id: class}} mapping")
        except (OracleError, TimeoutError) as exc:  # a person or service may be away: ask again later
            reason = (f"oracle {self.oracle.name!r} did not answer ({type(exc).__name__}: {exc}); "
                      f"{len(pending)} requests stay pending")
            warnings.warn(reason, stacklevel=2)
            return 0, [reason]
        valid, rejected, unsure = {}, [], []
        asked = set(pending.tolist())
        for sample_id, label in answers.items():
            try:
                known = int(sample_id) in asked
            except (TypeError, ValueError):
                known = False
            if not known:  # one stray answer must not void the valid ones
                rejected.append(f"sample {sample_id!r} has no pending request; answer ignored")
                continue
            if label is UNSURE:
                unsure.append(int(sample_id))
                continue
            try:
                valid[sample_id] = self.pool.check_label(label)
            except InvalidLabelError as exc:
                rejected.append(f"sample {sample_id} stays pending: {exc}")
        for reason in rejected:
            warnings.warn(f"oracle answer rejected: {reason}", stacklevel=2)
        if unsure:  # the request closes; the sample is back in the pool but not asked again
            self.pool.release(unsure, status="skipped", note=f"unsure ({self.oracle.name})")
        return self.pool.answer(valid, source=self.oracle.name, round=round), rejected

    def fit(self, **fit_kwargs: Any) -> float:
        """Train on the labeled set; return the training loss."""
        X, y = self.labeled_data()
        if len(y) == 0:
            return math.nan
        if self.reinit and hasattr(self.model, "reset"):
            self.model.reset()
        if getattr(self.model, "uses_unlabeled", False):  # self-training heads also see the unlabeled pool
            fit_kwargs.setdefault("unlabeled", self.X[self.rows(self.pool.unlabeled_ids())])
        loss = self.model.fit(X, y, **fit_kwargs)
        self.model_ready = True
        return loss

    def evaluate(self) -> tuple[float, float]:
        """``(loss, accuracy)`` on the held-out set, NaN without one or before any fit."""
        if self.X_eval is None or not self.model_ready:
            return math.nan, math.nan
        return self.model.evaluate(self.X_eval, self.y_eval)

    def step(self, budget: int) -> StepRecord:
        """One full step: query ``budget`` samples, ask, teach, fit, evaluate; appends to ``history``."""
        n = len(self.history)
        queried = self.query(budget, round=n)
        self.teach(round=n)
        self.fit()
        loss, acc = self.evaluate()
        counts = self.pool.counts()
        record = StepRecord(step=n, queried=len(queried), labeled=counts["labeled"],
                            unlabeled=counts["unlabeled"], accuracy=acc, loss=loss,
                            mean_uncertainty=self.last_uncertainty[0], max_uncertainty=self.last_uncertainty[1])
        self.history.append(record)
        return record

    def run(self, budget_per_step: int, *, max_steps: int = 100,
            stopping: Sequence[StoppingCriterion] = ()) -> str:
        """Step until a stopping criterion fires, the pool empties or ``max_steps``; return why it stopped.

        Parameters
        ----------
        budget_per_step : int
            Samples queried per step.
        max_steps : int
            Upper bound on the number of steps.
        stopping : sequence of StoppingCriterion
            Checked after every step. A :class:`~fedal.stopping.BudgetExhausted` among them
            also caps the last step, so no more than its ``total_labels`` are ever asked for.
        """
        # a label budget is a hard cap: the last step asks only for what is left of it
        caps = [c.total_labels for c in stopping if isinstance(c, BudgetExhausted)]
        for _ in range(max_steps):
            counts = self.pool.counts()
            if counts["unlabeled"] == 0:
                return "the pool has no unlabeled sample left"
            budget = budget_per_step
            if caps:
                budget = max(0, min(budget, min(caps) - counts["labeled"] - counts["pending"]))
                if budget == 0 and counts["pending"] == 0:
                    return f"label budget of {min(caps)} spent"
            self.step(budget)
            for criterion in stopping:
                reason = criterion.check(self.history)
                if reason:
                    return reason
        return f"reached max_steps={max_steps}"
