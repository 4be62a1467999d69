"""Core-set selection by k-center greedy on embeddings.

Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
Approach", ICLR 2018 (greedy 2-approximation of Gonzalez 1985). Memory is O(n d): the
distance of every candidate to its nearest centre is kept in one vector and updated
after each pick; distances to the labeled centres are computed in chunks.
"""
from __future__ import annotations

import numpy as np

from fedal.exceptions import ConfigError
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
    """Squared distance from each point to its nearest centre, in ``chunk_size`` blocks.

    Parameters
    ----------
    points : array, shape (n, d)
    centers : array, shape (m, d), m >= 1
    chunk_size : int
        Block side; peak extra memory is ``chunk_size**2`` floats.

    Returns
    -------
    numpy.ndarray, shape (n,)
    """
    if len(centers) == 0:
        raise ValueError("min_sq_distances needs at least one centre")
    p_sq, c_sq = _sq_norms(points), _sq_norms(centers)
    best = np.full(len(points), np.inf, dtype=np.result_type(points.dtype, np.float32))
    for i in range(0, len(points), chunk_size):
        rows = slice(i, i + chunk_size)
        for k in range(0, len(centers), chunk_size):
            cols = slice(k, k + chunk_size)
            block = p_sq[rows, None] + c_sq[None, cols] - 2.0 * (points[rows] @ centers[cols].T)
            np.minimum(best[rows], block.min(axis=1), out=best[rows])
    return np.maximum(best, 0.0)


def kcenter_greedy(
    embeddings: np.ndarray,
    budget: int,
    centers: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> np.ndarray:
    """Greedy k-center: repeatedly pick the point farthest from every centre chosen so far.

    Sener & Savarese, ICLR 2018, Algorithm 1.

    Parameters
    ----------
    embeddings : array, shape (n, d)
        Candidates.
    budget : int
        Number of points to pick, ``0 <= budget <= n``.
    centers : array, shape (m, d), optional
        Existing centres (the labeled set). Without any, the first pick is a random
        candidate drawn from ``rng``.
    rng : numpy.random.Generator, optional
        Only used for that first pick; seeded generator 0 when omitted.
    chunk_size : int
        Block size for the distances to ``centers``.

    Returns
    -------
    numpy.ndarray of int64, shape (budget,)
        Positions into ``embeddings`` in pick order.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must have shape (n, d), got {x.shape}")
    n = len(x)
    if not 0 <= budget <= n:
        raise ValueError(f"budget must lie in [0, {n}], got {budget}")
    shift = x.mean(axis=0, dtype=np.float64).astype(np.float32) if n else 0.0
    x = x - shift  # centring keeps |a|^2 + |b|^2 - 2ab accurate in float32
    x_sq = _sq_norms(x)
    has_centers = centers is not None and len(centers) > 0
    if has_centers:
        min_d = min_sq_distances(x, np.asarray(centers, dtype=np.float32) - shift, chunk_size)
    else:
        min_d = np.full(n, np.inf, dtype=np.float32)
    rng = np.random.default_rng(0) if rng is None else rng
    chosen = np.empty(budget, dtype=np.int64)
    for i in range(budget):
        j = int(rng.integers(n)) if i == 0 and not has_centers else int(np.argmax(min_d))
        chosen[i] = j
        np.minimum(min_d, _sq_distances_to(x, x_sq, j), out=min_d)
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
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return kcenter_greedy(ctx.embeddings(), budget, ctx.labeled_embeddings(), rng, self.chunk_size)
