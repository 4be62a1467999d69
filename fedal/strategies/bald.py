"""Bayesian active learning by disagreement (BALD) with MC dropout.

Houlsby, Huszar, Ghahramani & Lengyel, "Bayesian Active Learning for Classification and
Preference Learning", arXiv:1112.5745, 2011; Gal, Islam & Ghahramani, "Deep Bayesian
Active Learning with Image Data", ICML 2017.
"""
from __future__ import annotations

import numpy as np

from fedal.checks import require_int
from fedal.strategies.base import QueryContext, ScoreStrategy
from fedal.strategies.registry import register


def _entropy_last_axis(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) along the last axis; ``0 log 0 = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


def _check_sample_probs(sample_probs: np.ndarray) -> np.ndarray:
    """Validate ``(T, n, C)`` stochastic / committee probabilities and return them as float64."""
    p = np.asarray(sample_probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[2] < 2:
        raise ValueError(f"sample probabilities must have shape (T, n, C) with C >= 2, got {p.shape}")
    return p


def _check_n_samples(n_samples: object, what: str = "n_samples") -> int:
    """Validate a number of MC samples / committee members: an integer >= 2."""
    return require_int(f"{what} (disagreement needs two samples)", n_samples, low=2)


def _sample_seed(rng: np.random.Generator | None) -> int:
    """Seed for the model's stochastic passes, drawn from the query's generator (0 without one)."""
    return 0 if rng is None else int(rng.integers(2**31 - 1))


def bald(sample_probs: np.ndarray) -> np.ndarray:
    """BALD mutual information ``H[mean_t p_t] - mean_t H[p_t]`` in nats (Houlsby et al. 2011).

    Parameters
    ----------
    sample_probs : array, shape (T, n, C)
        Class probabilities from ``T`` MC-dropout passes (Gal et al., ICML 2017).

    Returns
    -------
    numpy.ndarray, shape (n,)
        Mutual information between the label and the model parameters; 0 when every
        sample agrees, at most ``log C``.
    """
    p = _check_sample_probs(sample_probs)
    predictive = _entropy_last_axis(p.mean(axis=0))
    expected = _entropy_last_axis(p).mean(axis=0)
    return np.maximum(predictive - expected, 0.0)  # clip round-off below zero


@register("bald")
class BALD(ScoreStrategy):
    """BALD with MC dropout (Houlsby et al. 2011; Gal, Islam & Ghahramani, ICML 2017).

    Parameters
    ----------
    n_samples : int
        Number of stochastic forward passes ``T`` (>= 2).
    """

    picks_uncertain = True

    def __init__(self, n_samples: int = 20) -> None:
        self.n_samples = _check_n_samples(n_samples)

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return bald(ctx.sample_probs(self.n_samples, _sample_seed(rng)))

    def __repr__(self) -> str:
        return f"BALD(n_samples={self.n_samples})"
