"""Uncertainty sampling (Lewis & Gale, SIGIR 1994; Settles, "Active Learning Literature
Survey", 2009, sec. 3.1): least confidence, margin and entropy of the predicted
class distribution. Each score is "higher = more informative".
"""
from __future__ import annotations

import numpy as np

from fedal.strategies.base import QueryContext, ScoreStrategy
from fedal.strategies.registry import register


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (n, C) with C >= 2, got {probs.shape}")
    return probs


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``1 - max_c p(c|x)`` for each row of ``probs`` (n, C): 0 for a certain prediction, ``1 - 1/C`` for a uniform one."""
    return 1.0 - _as_probs(probs).max(axis=1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Smallest-margin score ``1 - (p1 - p2)`` of each row of ``probs`` (n, C) (Scheffer et al., IDA 2001).

    ``p1 - p2`` is the textbook margin (small = uncertain); returning ``1 - margin`` keeps
    "higher = more informative". Use :func:`top2_margin` for the raw margin.
    """
    return 1.0 - top2_margin(probs)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """The raw margin ``p1 - p2`` between the two most probable classes of each row of ``probs``."""
    top2 = np.partition(_as_probs(probs), -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats, ``-sum_c p log p``, of each row of ``probs`` (Shannon 1948; Settles 2009):
    0 for one-hot, ``log C`` for uniform."""
    p = _as_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


@register("least_confidence")
class LeastConfidence(ScoreStrategy):
    """Least confidence sampling: score ``1 - max p`` (Lewis & Gale 1994)."""

    picks_uncertain = True

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return least_confidence(ctx.probs())


@register("margin")
class Margin(ScoreStrategy):
    """Smallest-margin sampling: picks the smallest ``p1 - p2`` (Scheffer et al. 2001)."""

    picks_uncertain = True

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return margin(ctx.probs())


@register("entropy")
class Entropy(ScoreStrategy):
    """Maximum-entropy sampling (Settles 2009, eq. 3.3), natural log."""

    picks_uncertain = True

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return entropy(ctx.probs())
