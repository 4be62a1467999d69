"""The numbers people who run labeling teams report, computed where the data are.

Each function takes what a device already holds (embeddings of a batch, its labels, its
requests) and returns one scalar; a federation sends only these scalars and the server
combines them (``server/book.py``):

* :func:`batch_diversity`: how spread out a queried batch is, against a random batch of
  the same size from the same candidates (1 = as diverse as random; > 1 more diverse);
* :func:`label_entropy`: class balance of the labels gathered (normalised entropy of the
  label histogram, 1 = all classes equally often);
* :func:`oracle_use`: requests made, requests answered and the median answer time;
* :func:`queries_per_point`: labels spent per accuracy point gained since the initial set.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of ``embeddings`` (NaN for fewer than 2 rows)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n < 2:
        return math.nan
    sq = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def batch_diversity(selected: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
                    draws: int = 5) -> float:
    """Mean pairwise distance of the ``selected`` embeddings over that of random batches of the same size
    drawn (``draws`` times, from ``rng``) from the ``candidates`` embeddings; NaN for a batch of fewer than 2.

    Parameters
    ----------
    selected : array, shape (k, d)
        Embeddings of the queried batch.
    candidates : array, shape (n, d)
        Embeddings of the candidates it was chosen from (n >= k).
    rng : numpy.random.Generator
        Seeded source of the random batches.
    draws : int
        Random batches averaged in the reference.
    """
    k = len(selected)
    if k < 2 or len(candidates) < k:
        return math.nan
    own = mean_pairwise_distance(selected)
    reference = np.mean([mean_pairwise_distance(candidates[rng.choice(len(candidates), k, replace=False)])
                         for _ in range(draws)])
    return float(own / reference) if reference > 0 else math.nan


def label_entropy(labels: Sequence[int], n_classes: int) -> float:
    """Normalised entropy (0..1) of the histogram of ``labels`` over ``n_classes`` classes (NaN without labels)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return math.nan
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(n_classes))


def oracle_use(requests: Sequence[dict]) -> tuple[int, int, float]:
    """``(made, answered, median seconds from request to answer)`` of a pool's ``requests``
    (rows of :meth:`fedal.pool.Pool.requests`; the median is NaN before any answer)."""
    answered = [r for r in requests if r["status"] == "answered" and r["closed_at"] is not None]
    waits = [r["closed_at"] - r["created_at"] for r in answered]
    return len(requests), len(answered), float(np.median(waits)) if waits else math.nan


def queries_per_point(labels_start: int, accuracy_start: float, labels: int, accuracy: float) -> float | None:
    """Labels spent per accuracy point (percent) gained from ``(labels_start, accuracy_start)`` to
    ``(labels, accuracy)``; None when nothing was gained (the ratio would be meaningless)."""
    gain = 100.0 * (accuracy - accuracy_start)
    if not gain > 0:
        return None
    return float((labels - labels_start) / gain)
