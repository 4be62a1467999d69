"""Core-set selection by k-center greedy on embeddings.

Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach", ICLR 2018 (greedy 2-approximation of Gonzalez 1985). Memory is O(n d): the
distance of every candidate to its nearest centre is kept in one vector and updated
after each pick; distances are float64 and computed in chunks.
"""
from __future__ import annotations

import numpy as np

from fedal.checks import require_int
from fedal.strategies.base import QueryContext, QueryStrategy
from fedal.strategies.registry import register

CHUNK_SIZE = 4096


def _sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of each row."""
    return np.einsum("ij,ij->i", x, x)


def _sq_distances_to(x: np.ndarray, x_sq: np.ndarray, j: int) -> np.ndarray:
    """Squared distances from every row of ``x`` to row ``j``, shape (n,), via ``|a|^2 + |b|^2 - 2ab``."""
    return np.maximum(x_sq + x_sq[j] - 2.0 * (x @ x[j]), 0.0)


def min_sq_distances(points: np.ndarray, centers: np.ndarray, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
    """Squared distance from each point to its nearest centre, in float64, in ``chunk_size`` blocks.

    Points and centres are centred on the points' mean first, so the expansion
    ``|a|^2 + |b|^2 - 2ab`` keeps float64's precision when both sit far from the origin.

    Parameters
    ----------
    points : array, shape (n, d)
    centers : array, shape (m, d), m >= 1
    chunk_size : int
        Block side; peak extra memory is ``chunk_size**2`` floats.

    Returns
    -------
    numpy.ndarray of float64, shape (n,)
    """
    if len(centers) == 0:
        raise ValueError("min_sq_distances needs at least one centre")
    points = np.asarray(points, dtype=np.float64)
    shift = points.mean(axis=0) if len(points) else 0.0
    points, centers = points - shift, np.asarray(centers, dtype=np.float64) - shift
    p_sq, c_sq = _sq_norms(points), _sq_norms(centers)
    best = np.full(len(points), np.inf)
    for i in range(0, len(points), chunk_size):
        rows = slice(i, i + chunk_size)
        for k in range(0, len(centers), chunk_size):
            cols = slice(k, k + chunk_size)
            block = p_sq[rows, None] + c_sq[None, cols] - 2.0 * (points[rows] @ centers[cols].T)
            np.minimum(best[rows], block.min(axis=1), out=best[rows])
    return np.maximum(best, 0.0)


def _exact_sq_distances_to(x: np.ndarray, j: int, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
    """Squared distances from every row of ``x`` (float64) to row ``j`` by direct differences."""
    out = np.empty(len(x))
    for i in range(0, len(x), chunk_size):
        diff = x[i : i + chunk_size] - x[j]
        out[i : i + chunk_size] = np.einsum("ij,ij->i", diff, diff)
    return out


def kcenter_greedy(
    embeddings: np.ndarray,
    budget: int,
    centers: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    chunk_size: int = CHUNK_SIZE,
    first: int | None = None,
) -> np.ndarray:
    """Greedy k-center: repeatedly pick the point farthest from every centre chosen so far.

    Sener & Savarese, ICLR 2018, Algorithm 1. Distances are float64: to the existing
    centres by the centred expansion (:func:`min_sq_distances`), to each new pick by
    direct differences, so the pick is the farthest point even when the covering radius
    is tiny next to the embeddings' spread.

    Parameters
    ----------
    embeddings : array, shape (n, d)
        Candidates.
    budget : int
        Number of points to pick, ``0 <= budget <= n``.
    centers : array, shape (m, d), optional
        Existing centres (the labeled set). Without any (and without ``first``), the
        first pick is a random candidate drawn from ``rng``.
    rng : numpy.random.Generator, optional
        Only used for that first pick; seeded generator 0 when omitted.
    chunk_size : int
        Block size of the distance computations (memory ``chunk_size * max(d, chunk_size)``).
    first : int, optional
        Position of a candidate to pick first whatever the distances (e.g. the best score).

    Returns
    -------
    numpy.ndarray of int64, shape (budget,)
        Positions into ``embeddings`` in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (n, d), got {x.shape}")
    n = len(x)
    if not 0 <= budget <= n:
        raise ValueError(f"budget must lie in [0, {n}], got {budget}")
    if first is not None and not 0 <= first < n:
        raise ValueError(f"first must be a position in [0, {n}), got {first}")
    has_centers = centers is not None and len(centers) > 0
    min_d = min_sq_distances(x, centers, chunk_size) if has_centers else np.full(n, np.inf)
    rng = np.random.default_rng(0) if rng is None else rng
    chosen = np.empty(budget, dtype=np.int64)
    for i in range(budget):
        if i == 0 and first is not None:
            j = int(first)
        elif i == 0 and not has_centers:
            j = int(rng.integers(n))
        else:
            j = int(np.argmax(min_d))
        chosen[i] = j
        np.minimum(min_d, _exact_sq_distances_to(x, j, chunk_size), out=min_d)
        min_d[j] = -np.inf  # never pick a point twice, even among exact duplicates
    return chosen


@register("coreset")
class CoreSet(QueryStrategy):
    """Core-set active learning by k-center greedy on embeddings (Sener & Savarese, ICLR 2018).

    The labeled samples' embeddings are the initial centres; without labeled samples the
    first pick is a seeded random candidate.

    Parameters
    ----------
    chunk_size : int
        Block size for distances to the labeled centres (memory ``chunk_size**2``).
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = require_int("chunk_size", chunk_size, low=1)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return kcenter_greedy(ctx.embeddings(), budget, ctx.labeled_embeddings(), rng, self.chunk_size)
