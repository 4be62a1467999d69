"""BADGE: batch active learning by diverse gradient embeddings.

Ash, Zhang, Krishnamurthy, Langford & Agarwal, "Deep Batch Active Learning by Diverse,
Uncertain Gradient Lower Bounds", ICLR 2020. The gradient embedding of a sample is the
cross-entropy gradient of the final linear layer under the predicted label,
``g = (p - e_yhat) (x) h``, of size ``C * d``. It is never materialised: with
``a = p - e_yhat``,

    ||g_i - g_j||^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i . a_j)(h_i . h_j),

so k-means++ seeding runs in O(n (C + d)) memory.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from fedal.strategies.base import QueryContext, QueryStrategy
from fedal.strategies.coreset import _sq_distances_to, _sq_norms
from fedal.strategies.registry import register


def gradient_embedding_factors(probs: np.ndarray, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two factors ``a = p - onehot(argmax p)`` (n, C) and ``h`` (n, d) of BADGE's embedding.

    Parameters
    ----------
    probs : array, shape (n, C)
        Predicted class probabilities.
    embeddings : array, shape (n, d)
        Inputs of the final linear layer.

    Returns
    -------
    (a, h) : tuple of numpy.ndarray
        ``a`` in float64, ``h`` in float32; the gradient embedding is ``a[i] (x) h[i]``.
    """
    a = np.array(probs, dtype=np.float64)
    h = np.asarray(embeddings, dtype=np.float32)
    if a.ndim != 2 or h.ndim != 2 or len(a) != len(h):
        raise ValueError(f"need probs (n, C) and embeddings (n, d) with the same n, got {a.shape} and {h.shape}")
    a[np.arange(len(a)), a.argmax(axis=1)] -= 1.0
    return a, h


def gradient_embedding(probs: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Explicit BADGE gradient embeddings ``(p - e_yhat) (x) h``, shape (n, C * d) (Ash et al. 2020).

    Memory is ``n * C * d`` floats: for small pools and tests; selection uses the
    factorised distances instead (:func:`gradient_sq_distances_to`).

    Parameters
    ----------
    probs : array, shape (n, C)
    embeddings : array, shape (n, d)

    Returns
    -------
    numpy.ndarray, shape (n, C * d)
    """
    a, h = gradient_embedding_factors(probs, embeddings)
    return (a[:, :, None] * h[:, None, :]).reshape(len(a), -1)


def gradient_sq_distances_to(a: np.ndarray, h: np.ndarray, j: int, a_sq=None, h_sq=None) -> np.ndarray:
    """Squared distances ``||g_i - g_j||^2`` from every sample to sample ``j``, shape (n,),
    from the factors of :func:`gradient_embedding_factors` in O(n (C + d)).

    Parameters
    ----------
    a, h : arrays, shapes (n, C) and (n, d)
        Factors of the gradient embeddings.
    j : int
        Reference sample.
    a_sq, h_sq : arrays, shape (n,), optional
        Precomputed squared row norms of ``a`` and ``h``.

    Returns
    -------
    numpy.ndarray, shape (n,)
    """
    a_sq = _sq_norms(a) if a_sq is None else a_sq
    h_sq = _sq_norms(h) if h_sq is None else h_sq
    g_sq = a_sq * h_sq
    cross = (a @ a[j]) * (h @ h[j]).astype(np.float64)
    return np.maximum(g_sq + g_sq[j] - 2.0 * cross, 0.0)


def d2_seeding(
    sq_dist_to: Callable[[int], np.ndarray], n: int, k: int, rng: np.random.Generator, first: int | None = None
) -> np.ndarray:
    """k-means++ seeding by D^2 sampling (Arthur & Vassilvitskii, SODA 2007).

    Each next centre is drawn with probability proportional to its squared distance to
    the nearest centre so far, kept in one incrementally updated vector. When every
    remaining point coincides with a centre, the rest are drawn uniformly.

    Parameters
    ----------
    sq_dist_to : callable
        ``sq_dist_to(j)`` returns the squared distances of all ``n`` points to point ``j``.
    n : int
        Number of points.
    k : int
        Number of centres, ``0 <= k <= n``.
    rng : numpy.random.Generator
        Source of every random draw.
    first : int, optional
        First centre; drawn uniformly when omitted.

    Returns
    -------
    numpy.ndarray of int64, shape (k,)
        Positions in pick order, all distinct.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, {n}], got {k}")
    chosen = np.empty(k, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    weights = np.full(n, np.inf)  # squared distance to the nearest centre; 0 once taken
    for i in range(k):
        cumulative = np.cumsum(weights) if i else None
        if i == 0:
            j = int(rng.integers(n)) if first is None else int(first)
        elif cumulative[-1] > 0 and np.isfinite(cumulative[-1]):
            j = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), n - 1)
            if weights[j] <= 0:  # rounding pushed the draw past the last positive weight
                j = int(np.flatnonzero(weights > 0)[-1])
        else:  # every remaining point sits on a centre
            j = int(rng.choice(np.flatnonzero(~taken)))
        chosen[i], taken[j] = j, True
        np.minimum(weights, sq_dist_to(j), out=weights)
        weights[j] = 0.0  # distances are >= 0, so taken points stay at 0
    return chosen


def kmeanspp(embeddings: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on explicit vectors (Arthur & Vassilvitskii 2007); first centre uniform.

    Parameters
    ----------
    embeddings : array, shape (n, d)
    k : int
        Number of centres.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray of int64, shape (k,)
    """
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0) if len(x) else x
    x_sq = _sq_norms(x)
    return d2_seeding(lambda j: _sq_distances_to(x, x_sq, j), len(x), k, rng)


def badge_select(probs: np.ndarray, embeddings: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """BADGE selection: k-means++ seeding on gradient embeddings (Ash et al., ICLR 2020).

    As in the authors' code, the first centre is the sample with the largest gradient
    embedding norm; the others are D^2-sampled with factorised distances.

    Parameters
    ----------
    probs : array, shape (n, C)
    embeddings : array, shape (n, d)
    k : int
        Number of samples to select.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray of int64, shape (k,)
    """
    a, h = gradient_embedding_factors(probs, embeddings)
    a_sq, h_sq = _sq_norms(a), _sq_norms(h).astype(np.float64)
    first = int(np.argmax(a_sq * h_sq)) if len(a) else None
    return d2_seeding(lambda j: gradient_sq_distances_to(a, h, j, a_sq, h_sq), len(a), k, rng, first)


@register("badge")
class BADGE(QueryStrategy):
    """Batch active learning by diverse gradient embeddings (Ash et al., ICLR 2020)."""

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return badge_select(ctx.probs(), ctx.embeddings(), budget, rng)
