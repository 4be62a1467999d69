"""Strategies that adapt to the model: budget-aware switching, expected error reduction.

* ``budget_aware``: typicality while the model is weak, uncertainty once it is not
  (Hacohen, Dekel & Weinshall, "Active Learning on a Budget", ICML 2022: typical samples
  win at low budgets, uncertain ones later). The switch needs no tuning per data set: the
  model is "weak" while it is confident (top probability >= ``confidence``) on less than
  ``coverage`` of the candidates, the regime in which self-training cannot yet label most
  of the pool by itself. A hand-over model (:class:`~fedal.models.handover_adapter.HandoverClassifier`)
  is weak while its head serves: the typical samples of the head's features until the
  network takes over, then the network's own margin. Measured on BloodMNIST (BENCHMARKS.md
  §0.6): typical batches teach the head more than random ones and than the head's margin
  at 145-335 labels, but the network that learned from them takes over weaker.
* ``eer``: expected error reduction (Roy & McCallum, ICML 2001): the candidate whose
  label, in expectation over the model's own prediction, leaves the smallest expected
  error on the pool. Retraining once per candidate and class is what made it
  unaffordable; with a closed-form LDA head (:class:`fedal.models.HeadClassifier`) adding
  one labeled sample changes a class mean and the covariance by a rank-one term, so every
  "retrained" model is a Sherman-Morrison update of the precision.
"""
from __future__ import annotations

import numpy as np

from fedal.checks import require_int, require_number
from fedal.exceptions import ConfigError
from fedal.heads import ABSENT, auto_shrinkage
from fedal.strategies.base import QueryContext, QueryStrategy, top_k
from fedal.strategies.coldstart import TypiClust
from fedal.strategies.registry import register
from fedal.strategies.uncertainty import margin


@register("budget_aware")
class BudgetAware(QueryStrategy):
    """TypiClust while the model is confident on less than ``coverage`` of the pool, then margin.

    Hacohen et al., ICML 2022 (typicality at low budgets, uncertainty at high budgets);
    the switch is the share of candidates the model classifies with top probability at
    least ``confidence``; with a hand-over model, the network taking over (TypiClust on
    the head's features while the head serves, then the network's margin).

    Parameters
    ----------
    confidence : float
        Top probability that counts as confident, in (0, 1].
    coverage : float
        Share of confident candidates from which on uncertainty (margin) is used, in (0, 1].
    """

    def __init__(self, confidence: float = 0.9, coverage: float = 0.5) -> None:
        self.confidence = require_number("confidence", confidence, low=0, high=1, low_open=True)
        self.coverage = require_number("coverage", coverage, low=0, high=1, low_open=True)
        self.low = TypiClust(use_embeddings=True)
        self.features_low = TypiClust(use_embeddings=False)

    def low_budget(self, ctx: QueryContext) -> bool:
        """Whether the model is still in the low-budget regime on the candidates of ``ctx``: a hand-over
        model while its head serves, any other while it is confident on less than ``coverage`` of them."""
        if hands_over(ctx.model):
            return ctx.model.serving == "head"
        return bool(np.mean(ctx.probs().max(axis=1) >= self.confidence) < self.coverage)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        if not self.low_budget(ctx):
            return top_k(margin(ctx.probs()), budget, rng)
        if hands_over(ctx.model):  # typical in the head's features, not in raw pixels
            model = ctx.model
            labeled = None if ctx.labeled_X is None or len(ctx.labeled_X) == 0 else model.features(ctx.labeled_X)
            return self.features_low._select(QueryContext(ctx.ids, model.features(ctx.X), labeled_X=labeled),
                                             budget, rng)
        return self.low._select(ctx, budget, rng)


def hands_over(model) -> bool:
    """Whether ``model`` is a hand-over model (:class:`~fedal.models.handover_adapter.HandoverClassifier`: its
    ``serving`` says which of its head and network answers, ``features`` gives the head's part of a row)."""
    return getattr(model, "hands_over", False) is True


@register("eer")
class ExpectedErrorReduction(QueryStrategy):
    """Expected error reduction (Roy & McCallum, ICML 2001) with a closed-form LDA head.

    For each of the ``candidates`` most uncertain (margin) candidates and each class ``c``,
    the head retrained with that sample labeled ``c`` is a rank-one update; its expected
    0/1 error on ``reference`` pool samples, ``sum_u 1 - max_k p'(k | u)``, is averaged over
    ``c`` with the current head's probabilities. The batch is the candidates with the lowest
    expected error (each scored against the current head: a greedy, non-sequential batch).

    Parameters
    ----------
    candidates : int
        How many margin-ranked candidates are evaluated (>= 1).
    reference : int
        How many pool samples (a seeded subset) estimate the error (>= 1).
    """

    needs_closed_form = True

    def __init__(self, candidates: int = 50, reference: int = 500) -> None:
        self.candidates = require_int("candidates", candidates, low=1)
        self.reference = require_int("reference", reference, low=1)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        probs = ctx.probs()  # (without a model: the usual "needs a model" error)
        if not getattr(ctx.model, "closed_form", False):
            raise ConfigError("eer needs the closed-form LDA head (pipeline = \"head\"); with a network use "
                              "margin, entropy or badge")
        head = ctx.model.head
        if head is None:
            return rng.choice(len(ctx), size=budget, replace=False)  # nothing learned yet
        X = np.asarray(ctx.X, dtype=np.float64)
        order = top_k(margin(probs), min(len(ctx), max(self.candidates, budget)), rng)
        ref = rng.choice(len(ctx), size=min(self.reference, len(ctx)), replace=False)
        errors = expected_errors(head, X[order], probs[order], X[ref])
        return order[np.lexsort((rng.random(len(order)), errors))[:budget]]


def expected_errors(head, candidates: np.ndarray, candidate_probs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Expected error on ``reference`` after labeling each candidate, for an :class:`~fedal.heads.LDAHead`.

    Adding ``x`` with class ``c`` moves the class mean to ``(n_c m_c + x) / (n_c + 1)`` and adds
    ``(1 - lambda) / (dof + 1) * v v^T``, ``v = sqrt(n_c / (n_c + 1)) (x - m_c)``, to the shrunk
    covariance (the shrinkage target is kept); the precision follows by Sherman-Morrison.

    Parameters
    ----------
    head : LDAHead
        The current head.
    candidates : array, shape (m, d)
        Candidate feature vectors.
    candidate_probs : array, shape (m, C)
        The current head's probabilities of the candidates (the expectation over labels).
    reference : array, shape (r, d)
        Pool samples the error is estimated on.

    Returns
    -------
    numpy.ndarray, shape (m,)
        Expected number of errors (``sum_u 1 - max_k p'(k | u)``) per candidate.
    """
    counts = head.counts
    n = float(counts.sum())
    dof = max(n - head.present.sum(), 1.0)
    lam = auto_shrinkage(head.dim, n)
    PM = head.solve(head.means.T)  # (d, C): the precision times each class mean
    out = np.empty(len(candidates))
    for i, x in enumerate(candidates):
        total = 0.0
        for c in np.flatnonzero(candidate_probs[i] >= 1e-4):
            n_c = counts[c]
            if n_c > 0:
                v = np.sqrt(n_c / (n_c + 1.0)) * (x - head.means[c])
                new_mean = (n_c * head.means[c] + x) / (n_c + 1.0)
            else:
                v, new_mean = np.zeros_like(x), x
            u = np.sqrt((1.0 - lam) / (dof + 1.0)) * v
            Pu = head.solve(u)
            denom = 1.0 + float(u @ Pu)
            means, PMc = head.means.copy(), PM.copy()
            means[c], PMc[:, c] = new_mean, head.solve(new_mean)
            # P' m_k = P m_k - Pu (Pu . m_k) / denom, with P' = P - Pu Pu^T / denom
            W = PMc.T - np.outer(means @ Pu, Pu) / denom
            new_counts = counts.copy()
            new_counts[c] += 1
            present = new_counts > 0
            log_prior = np.log(np.where(present, new_counts, 1.0) / (n + 1.0))
            bias = np.where(present, -0.5 * np.einsum("ij,ij->i", W, means) + log_prior, ABSENT)
            logits = reference @ W.T + bias
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            total += float(candidate_probs[i, c]) * float(np.sum(1.0 - e.max(axis=1) / e.sum(axis=1)))
        out[i] = total
    return out
