"""The query-strategy contract shared by every strategy.

A strategy sees a :class:`QueryContext` (the unlabeled candidates, a view of the
model, optionally the labeled inputs) and returns the ids of the samples to label.
Every strategy obeys the same contract, checked by ``tests/test_strategy_contract.py``:

* it returns exactly ``min(budget, n_candidates)`` distinct ids, all candidates;
* the same seed gives the same ids;
* ``budget == 0`` returns an empty array; a budget larger than the pool returns the
  whole pool with a :class:`PoolExhaustedWarning`;
* an empty pool raises :class:`~fedal.exceptions.EmptyPoolError`.

Scores are "higher = more informative" for every score-based strategy.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from fedal.checks import require_int
from fedal.exceptions import ConfigError, EmptyPoolError


class PoolExhaustedWarning(UserWarning):
    """The budget asked for is larger than what is left in the pool."""


@runtime_checkable
class ModelView(Protocol):
    """What a strategy may ask of a model. Implemented by the adapters in
    :mod:`fedal.models` (torch modules and scikit-learn classifiers).

    ``forward`` returns class probabilities ``(n, C)`` and penultimate-layer
    embeddings ``(n, d)`` in one pass; ``sample_probs`` returns ``(T, n, C)``
    probabilities from ``T`` stochastic forward passes (MC dropout) or committee
    members.
    """

    n_classes: int

    def forward(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, C)`` and embeddings ``(n, d)`` of the inputs ``X``."""

    def sample_probs(self, X: Any, n_samples: int, seed: int | None = None) -> np.ndarray:
        """``(n_samples, n, C)`` probabilities of ``X`` from stochastic passes, drawn with ``seed``."""


@dataclass
class QueryContext:
    """Everything a strategy may look at, with model outputs computed once and cached.

    Parameters
    ----------
    ids : array of int, shape (n,)
        Ids of the unlabeled candidates.
    X : array-like, shape (n, ...)
        Inputs of the candidates, in the order of ``ids``.
    model : ModelView, optional
        The current model; ``None`` for model-free strategies (random, cold start).
    labeled_X : array-like, optional
        Inputs of the already labeled samples (core-set centres, diversity).
    extra : dict
        Strategy-specific views (e.g. a second, local model for federated-aware
        strategies). Keys are documented by the strategies that read them.
    """

    ids: np.ndarray
    X: Any
    model: ModelView | None = None
    labeled_X: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        if len(self.X) != len(self.ids):
            raise ConfigError(
                f"QueryContext got {len(self.ids)} ids but {len(self.X)} inputs; "
                "pass one input row per candidate id."
            )
        if len(np.unique(self.ids)) != len(self.ids):
            raise ConfigError("QueryContext ids must be unique; the pool gave duplicates.")

    def __len__(self) -> int:
        return len(self.ids)

    def _need_model(self) -> ModelView:
        if self.model is None:
            raise ConfigError(
                "this strategy scores samples with a model but the QueryContext has none; "
                "pass model=... or use a model-free strategy ('random', 'kmeans_coldstart')."
            )
        return self.model

    def _forward(self) -> tuple[np.ndarray, np.ndarray]:
        if "forward" not in self._cache:
            self._cache["forward"] = self._need_model().forward(self.X)
        return self._cache["forward"]

    def probs(self) -> np.ndarray:
        """Class probabilities of the candidates, shape (n, C)."""
        return self._forward()[0]

    def embeddings(self) -> np.ndarray:
        """Penultimate-layer embeddings of the candidates, shape (n, d)."""
        return self._forward()[1]

    def labeled_embeddings(self) -> np.ndarray:
        """Embeddings of the labeled samples, shape (m, d); (0, d) when none."""
        if "labeled_embeddings" not in self._cache:
            if self.labeled_X is None or len(self.labeled_X) == 0:
                d = self.embeddings().shape[1]
                self._cache["labeled_embeddings"] = np.zeros((0, d), dtype=np.float32)
            else:
                self._cache["labeled_embeddings"] = self._need_model().forward(self.labeled_X)[1]
        return self._cache["labeled_embeddings"]

    def sample_probs(self, n_samples: int, seed: int | None = None) -> np.ndarray:
        """``(n_samples, n, C)`` stochastic / committee probabilities, cached per (n_samples, seed)."""
        key = ("sample_probs", n_samples, seed)
        if key not in self._cache:
            self._cache[key] = self._need_model().sample_probs(self.X, n_samples, seed)
        return self._cache[key]


class QueryStrategy(ABC):
    """Base class: validates the budget and the pool, then delegates to ``_select``."""

    #: registry name, set by :func:`fedal.strategies.register`
    name: ClassVar[str] = ""
    #: whether the strategy needs ``ctx.model``
    needs_model: ClassVar[bool] = True
    #: whether it also scores with a client's local model (``ctx.extra["local_model"]``, see
    #: :mod:`fedal.strategies.federated`), and how that model starts: ``"global"`` (the global
    #: model fine-tuned on the local labels) or ``"scratch"`` (trained on the local labels only)
    needs_local_model: ClassVar[bool] = False
    local_model_init: ClassVar[str] = "global"
    #: whether it needs a closed-form head it can update (``model.closed_form``; expected error reduction)
    needs_closed_form: ClassVar[bool] = False
    #: whether it picks what the model is least sure of: then the model is hardly ever confident about a
    #: queried sample, and second readings on a confident disagreement (``verify-threshold``) rarely fire
    picks_uncertain: ClassVar[bool] = False

    def query(self, ctx: QueryContext, budget: int, seed: int | None = None) -> np.ndarray:
        """Return the ids of the ``min(budget, len(ctx))`` candidates to label.

        Parameters
        ----------
        ctx : QueryContext
            The unlabeled candidates and the model view.
        budget : int
            How many samples to select; must be >= 0.
        seed : int, optional
            Seed for every random choice (tie-breaking, initialisation).

        Returns
        -------
        numpy.ndarray of int64
            Selected ids, most informative first where the strategy ranks.
        """
        budget = check_budget(budget)
        if len(ctx) == 0:
            raise EmptyPoolError(
                f"strategy {self.name!r} was asked for {budget} samples but the pool has no "
                "unlabeled sample left; stop querying (see fedal.stopping) or add data."
            )
        if budget == 0:
            return np.zeros(0, dtype=np.int64)
        if budget >= len(ctx):
            if budget > len(ctx):
                warnings.warn(
                    f"budget {budget} exceeds the {len(ctx)} unlabeled samples left; "
                    "returning the whole pool",
                    PoolExhaustedWarning,
                    stacklevel=2,
                )
            budget = len(ctx)
        rng = np.random.default_rng(seed)
        positions = np.asarray(self._select(ctx, budget, rng), dtype=np.int64)
        if positions.shape != (budget,) or len(np.unique(positions)) != budget:
            raise AssertionError(
                f"strategy {self.name!r} broke the contract: returned {positions.shape} "
                f"positions ({len(np.unique(positions))} distinct) for a budget of {budget}"
            )
        return ctx.ids[positions]

    @abstractmethod
    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``budget`` distinct positions into ``ctx.ids`` (0 < budget <= len(ctx))."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScoreStrategy(QueryStrategy):
    """A strategy that scores each candidate independently and takes the top ``budget``."""

    @abstractmethod
    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        """Informativeness of each candidate; higher = more informative.

        The mean over the pool is the pool's mean uncertainty (a stopping / budget signal).

        Parameters
        ----------
        ctx : QueryContext
            The unlabeled candidates and the model view.
        rng : numpy.random.Generator, optional
            Source of the strategy's randomness (e.g. the MC-dropout seed); a fixed
            default when omitted, so scores are reproducible.

        Returns
        -------
        numpy.ndarray of float, shape (n,)
        """

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return top_k(self.score(ctx, rng), budget, rng)


def check_budget(budget: Any) -> int:
    """Validate a query budget: a non-negative integer."""
    return require_int("query budget (0 = query nothing)", budget, low=0)


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``k`` highest ``scores``, ties broken by ``rng`` (seeded), best first."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError("strategy scores contain NaN or Inf; check the model outputs")
    tiebreak = rng.random(len(scores))
    order = np.lexsort((tiebreak, -scores))  # last key is primary
    return order[:k]
