"""Model-free cold start for an empty (or tiny) labeled set: cluster, then pick one
representative per cluster not yet covered by a labeled sample.

* ``typiclust``: the most *typical* member of each cluster, typicality being the inverse
  mean distance to its ``k`` nearest neighbours in the cluster (Hacohen, Dekel &
  Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and Low
  Budgets", ICML 2022).
* ``kmeans_coldstart``: the member nearest each k-means centroid (a common baseline,
  e.g. Zhu et al. 2008; Hacohen et al. 2022, sec. 5).

Both cluster the candidates and the labeled samples together into ``budget + n_labeled``
clusters (scikit-learn k-means, seeded) and visit uncovered clusters largest first.
"""
from __future__ import annotations

import warnings
from abc import abstractmethod

import numpy as np

from fedal.checks import require_int
from fedal.exceptions import ConfigError
from fedal.strategies.base import QueryContext, QueryStrategy
from fedal.strategies.coreset import _sq_norms
from fedal.strategies.registry import register

#: TypiClust's choice: exact k-means for few clusters, mini-batch k-means beyond
MAX_EXACT_KMEANS_CLUSTERS = 50


def cluster_features(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Seeded k-means labels, shape (n,); mini-batch k-means above 50 clusters.

    Parameters
    ----------
    features : array, shape (n, d)
    n_clusters : int
        ``1 <= n_clusters <= n``; fewer distinct points than clusters is allowed.
    seed : int

    Returns
    -------
    numpy.ndarray of int, shape (n,)
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans  # (scikit-learn only where clusters are made)
    from sklearn.exceptions import ConvergenceWarning

    if n_clusters <= MAX_EXACT_KMEANS_CLUSTERS:
        km = KMeans(n_clusters, n_init=3, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters, n_init=1, batch_size=max(1024, 3 * n_clusters), random_state=seed)
    with warnings.catch_warnings():  # fewer distinct points than clusters: some clusters stay empty
        warnings.simplefilter("ignore", ConvergenceWarning)
        return km.fit_predict(features)


def typicality(features: np.ndarray, k: int = 20, chunk_size: int = 1024) -> np.ndarray:
    """Inverse mean distance to the ``k`` nearest other points (Hacohen et al., ICML 2022, eq. 4).

    Computed in row blocks of ``chunk_size`` (memory ``chunk_size * n``), so call it per
    cluster; a single point has typicality 0, an exact duplicate group ``inf``.

    Parameters
    ----------
    features : array, shape (n, d)
    k : int
        Neighbours considered; capped at ``n - 1``.
    chunk_size : int

    Returns
    -------
    numpy.ndarray, shape (n,)
    """
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n)
    x = x - x.mean(axis=0)
    x_sq = _sq_norms(x)
    mean_dist = np.empty(n)
    for i in range(0, n, chunk_size):
        rows = slice(i, i + chunk_size)
        d2 = np.maximum(x_sq[rows, None] + x_sq[None, :] - 2.0 * (x[rows] @ x.T), 0.0)
        d2[np.arange(d2.shape[0]), np.arange(i, i + d2.shape[0])] = np.inf  # exclude self
        nearest = np.partition(d2, k - 1, axis=1)[:, :k]
        mean_dist[i : i + chunk_size] = np.sqrt(nearest).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 1.0 / mean_dist


class _ClusterColdStart(QueryStrategy):
    needs_model = False

    def __init__(self, use_embeddings: bool = False) -> None:
        self.use_embeddings = bool(use_embeddings)

    def _features(self, ctx: QueryContext) -> np.ndarray:
        if self.use_embeddings:
            if ctx.model is None:
                raise ConfigError(
                    f"{self.name!r} with use_embeddings=True needs a model in the QueryContext; "
                    "pass model=... or set use_embeddings=False to cluster the raw inputs"
                )
            return np.vstack([ctx.embeddings(), ctx.labeled_embeddings()]).astype(np.float32)
        parts = [np.asarray(ctx.X, dtype=np.float32).reshape(len(ctx), -1)]
        if ctx.labeled_X is not None and len(ctx.labeled_X):
            parts.append(np.asarray(ctx.labeled_X, dtype=np.float32).reshape(len(ctx.labeled_X), -1))
        return np.vstack(parts)

    @abstractmethod
    def _representative(self, features: np.ndarray, rng: np.random.Generator) -> int:
        """Position, within one cluster's ``features``, of the sample that represents it."""

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        features = self._features(ctx)
        n_pool, n_labeled = len(ctx), len(features) - len(ctx)
        labels = cluster_features(features, budget + n_labeled, int(rng.integers(2**31 - 1)))
        covered = set(labels[n_pool:].tolist())
        pool_labels = labels[:n_pool]
        order = np.argsort(pool_labels, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(pool_labels[order]) != 0])
        groups = [order[s:e] for s, e in zip(starts, np.r_[starts[1:], n_pool])]
        groups = [g for g in groups if pool_labels[g[0]] not in covered]
        groups.sort(key=len, reverse=True)  # largest uncovered clusters first (stable: by cluster id)
        picks = []
        for members in groups[:budget]:
            picks.append(int(members[self._representative(features[members], rng)]))
        if len(picks) < budget:  # fewer non-empty uncovered clusters than budget: seeded random fill
            rest = np.setdiff1d(np.arange(n_pool), picks)
            picks.extend(rng.choice(rest, size=budget - len(picks), replace=False).tolist())
        return np.asarray(picks, dtype=np.int64)


@register("typiclust")
class TypiClust(_ClusterColdStart):
    """TypiClust cold start: the most typical sample of each uncovered k-means cluster
    (Hacohen, Dekel & Weinshall, ICML 2022).

    Parameters
    ----------
    use_embeddings : bool
        Cluster the model's embeddings instead of the flattened inputs (needs a model).
    k_neighbors : int
        Neighbours in the typicality estimate (20 in the paper).
    max_cluster_reference : int
        A cluster larger than this is represented by a seeded random subsample of this
        size, in which typicality is computed and the pick made (bounds the quadratic
        per-cluster cost for tiny budgets on huge pools).
    """

    def __init__(self, use_embeddings: bool = False, k_neighbors: int = 20, max_cluster_reference: int = 10_000):
        super().__init__(use_embeddings)
        self.k_neighbors = require_int("k_neighbors", k_neighbors, low=1)
        self.max_cluster_reference = require_int("max_cluster_reference", max_cluster_reference, low=2)

    def _representative(self, features: np.ndarray, rng: np.random.Generator) -> int:
        if len(features) > self.max_cluster_reference:
            sub = np.sort(rng.choice(len(features), size=self.max_cluster_reference, replace=False))
            return int(sub[np.argmax(typicality(features[sub], self.k_neighbors))])
        return int(np.argmax(typicality(features, self.k_neighbors)))


@register("kmeans_coldstart")
class KMeansColdStart(_ClusterColdStart):
    """Cold start by the sample nearest each uncovered k-means centroid (Hacohen et al. 2022, sec. 5).

    Parameters
    ----------
    use_embeddings : bool
        Cluster the model's embeddings instead of the flattened inputs (needs a model).
    """

    def __init__(self, use_embeddings: bool = False) -> None:
        super().__init__(use_embeddings)

    def _representative(self, features: np.ndarray, rng: np.random.Generator) -> int:
        return int(np.argmin(_sq_norms(features - features.mean(axis=0))))
