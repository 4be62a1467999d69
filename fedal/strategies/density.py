"""Information density: uncertainty weighted by how representative a sample is.

Settles & Craven, "An Analysis of Active Learning Strategies for Sequence Labeling
Tasks", EMNLP 2008, eq. (5): ``phi(x) * ((1/U) sum_u sim(x, x_u))^beta``.
"""
from __future__ import annotations

import numpy as np

from fedal.checks import require_number
from fedal.exceptions import ConfigError
from fedal.strategies.base import QueryContext, ScoreStrategy
from fedal.strategies.registry import register
from fedal.strategies.uncertainty import entropy, least_confidence, margin

UNCERTAINTY_SCORES = {"entropy": entropy, "least_confidence": least_confidence, "margin": margin}


def mean_cosine_similarity(embeddings: np.ndarray, chunk_size: int = 8192) -> np.ndarray:
    """Mean cosine similarity of each row to every row (itself included), exactly, in O(n d).

    ``(1/n) sum_u <x/|x|, x_u/|x_u|> = <x/|x|, mean_u x_u/|x_u|>``, so no n x n matrix
    is formed. Zero vectors have similarity 0 to everything. Rows are normalised in
    float64 blocks of ``chunk_size``, so extra memory is O(n + chunk_size * d).

    Parameters
    ----------
    embeddings : array, shape (n, d)
    chunk_size : int
        Rows per block.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Values in [-1, 1].
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must have shape (n, d) with n >= 1, got {x.shape}")
    blocks = [slice(i, i + chunk_size) for i in range(0, len(x), chunk_size)]
    mean_unit = sum(_unit_rows(x[b]).sum(axis=0) for b in blocks) / len(x)
    return np.concatenate([_unit_rows(x[b]) @ mean_unit for b in blocks])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)

def information_density(uncertainty: np.ndarray, embeddings: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Information density ``uncertainty * max(mean cosine similarity, 0)^beta`` (Settles & Craven 2008).

    Negative mean similarities (outliers pointing away from the pool) are clipped to 0,
    so any real ``beta`` is defined.

    Parameters
    ----------
    uncertainty : array, shape (n,)
        Base informativeness, higher = more informative (e.g. :func:`entropy`).
    embeddings : array, shape (n, d)
        Representation used for similarity.
    beta : float
        Weight of the density term; 0 gives the base uncertainty back.

    Returns
    -------
    numpy.ndarray, shape (n,)
    """
    density = np.maximum(mean_cosine_similarity(embeddings), 0.0)
    return np.asarray(uncertainty, dtype=np.float64) * density**beta


@register("density")
class InformationDensity(ScoreStrategy):
    """Density-weighted uncertainty sampling (Settles & Craven, EMNLP 2008).

    Parameters
    ----------
    base : {"entropy", "least_confidence", "margin"}
        Base uncertainty measure.
    beta : float
        Exponent of the density term (>= 0).
    """

    def __init__(self, base: str = "entropy", beta: float = 1.0) -> None:
        if base not in UNCERTAINTY_SCORES:
            raise ConfigError(f"unknown base uncertainty {base!r}; choose one of {sorted(UNCERTAINTY_SCORES)}")
        self.base = base
        self.beta = require_number("beta", beta, low=0)

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return information_density(UNCERTAINTY_SCORES[self.base](ctx.probs()), ctx.embeddings(), self.beta)

    def __repr__(self) -> str:
        return f"InformationDensity(base={self.base!r}, beta={self.beta})"
