"""A closed-form classifier head whose training data add up across sites: shrinkage LDA.

Linear discriminant analysis needs only three sums over the labeled samples of each
class: the (weighted) count, the sum of the feature vectors, and the sum of their outer
products. :class:`ClassStatistics` holds them; statistics of two sites add up exactly to
the statistics of their union, so a server that sums the sites' statistics computes
*the same head* as training on all labels pooled, whatever the label skew between sites
(the idea of Fed3R, Fani' et al., ICML 2024, and FedNCM, Legate et al., 2023, for ridge
and nearest-class-mean heads).

:meth:`LDAHead.from_statistics` shrinks the pooled within-class covariance towards its
diagonal (Schafer & Strimmer 2005, target "D"), which keeps the head well posed when
there are fewer labels than features; the class priors are the (weighted) class
frequencies. Scores, probabilities, embeddings (features scaled by the within-class
standard deviations) and posterior samples of the class means (for BALD and committee
strategies) come from the same few arrays, :meth:`LDAHead.to_arrays`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedal.exceptions import ConfigError

#: the array names of ClassStatistics and of LDAHead (see ``prefix`` of to_arrays / from_arrays)
STATISTICS_KEYS = ("counts", "sums", "scatter")
HEAD_KEYS = ("means", "counts", "chol", "log_prior")
ABSENT = -1e9  # score of a class with no labeled sample: probability 0


@dataclass
class ClassStatistics:
    """Weighted per-class sums of labeled feature vectors (the sufficient statistics of LDA).

    Attributes
    ----------
    counts : array, shape (C,)
        Total weight of each class.
    sums : array, shape (C, d)
        Weighted sum of each class's feature vectors.
    scatter : array, shape (d, d)
        Weighted sum of ``x x^T`` over all samples.
    """

    counts: np.ndarray
    sums: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, n_classes: int, dim: int) -> "ClassStatistics":
        """Statistics of no sample, for ``n_classes`` classes of ``dim`` features."""
        return cls(np.zeros(n_classes), np.zeros((n_classes, dim)), np.zeros((dim, dim)))

    @classmethod
    def from_samples(cls, X: np.ndarray, y: np.ndarray, n_classes: int,
                     weights: np.ndarray | None = None) -> "ClassStatistics":
        """Statistics of features ``X`` (n, d) with labels ``y`` (n,) in ``n_classes`` classes and
        optional sample ``weights``."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if X.ndim != 2 or len(X) != len(y):
            raise ConfigError(f"statistics need features (n, d) and n labels, got {X.shape} and {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ConfigError(f"labels must lie in [0, {n_classes - 1}], got range [{y.min()}, {y.max()}]")
        w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        counts = np.bincount(y, weights=w, minlength=n_classes).astype(np.float64)
        sums = np.zeros((n_classes, X.shape[1]))
        np.add.at(sums, y, X * w[:, None])
        scatter = (X * w[:, None]).T @ X
        return cls(counts, sums, scatter)

    def __add__(self, other: "ClassStatistics") -> "ClassStatistics":
        if self.sums.shape != other.sums.shape:
            raise ConfigError(f"statistics of {self.sums.shape} and {other.sums.shape} (classes, features) cannot be added")
        return ClassStatistics(self.counts + other.counts, self.sums + other.sums, self.scatter + other.scatter)

    @property
    def total(self) -> float:
        """Total weight (number of labeled samples when unweighted)."""
        return float(self.counts.sum())

    def to_arrays(self, prefix: str = "stats") -> dict[str, np.ndarray]:
        """The statistics as float64 arrays named ``<prefix>.<name>`` (names :data:`STATISTICS_KEYS`)."""
        return {f"{prefix}.{k}": v for k, v in zip(STATISTICS_KEYS, (self.counts, self.sums, self.scatter))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "stats") -> "ClassStatistics":
        """Statistics from :meth:`to_arrays`' output ``arrays`` (written with ``prefix``)."""
        return cls(*(np.asarray(arrays[f"{prefix}.{k}"], dtype=np.float64) for k in STATISTICS_KEYS))

    @staticmethod
    def shapes(n_classes: int, dim: int, prefix: str = "stats") -> dict[str, tuple[int, ...]]:
        """The array shapes of statistics of ``n_classes`` classes and ``dim`` features (names with ``prefix``)."""
        return {f"{prefix}.{k}": s for k, s in zip(STATISTICS_KEYS, ((n_classes,), (n_classes, dim), (dim, dim)))}


def auto_shrinkage(dim: int, n: float) -> float:
    """Shrinkage used when none is given: ``dim / (dim + n)`` (strong with few samples, fading with many)."""
    return float(dim / (dim + max(n, 0.0)))


@dataclass
class LDAHead:
    """Shrinkage LDA: class means, counts, the Cholesky factor of the shrunk pooled covariance.

    Attributes
    ----------
    means : array, shape (C, d)
        Class means (0 for a class with no sample).
    counts : array, shape (C,)
        Class weights (0 = absent: the class gets probability 0).
    chol : array, shape (d, d)
        Lower Cholesky factor ``L`` of the shrunk within-class covariance (``L L^T``).
    log_prior : array, shape (C,)
        Log class priors.
    """

    means: np.ndarray
    counts: np.ndarray
    chol: np.ndarray
    log_prior: np.ndarray

    def __post_init__(self) -> None:
        self.means, self.counts = np.asarray(self.means, np.float64), np.asarray(self.counts, np.float64)
        self.chol, self.log_prior = np.asarray(self.chol, np.float64), np.asarray(self.log_prior, np.float64)
        self.present = self.counts > 0
        # W = Sigma^-1 m (by two triangular solves), b = -m^T Sigma^-1 m / 2 + log prior
        self.weight = self.solve(self.means.T).T
        self.bias = np.where(self.present, -0.5 * np.einsum("ij,ij->i", self.weight, self.means) + self.log_prior,
                             ABSENT)
        self.scale = 1.0 / np.sqrt(np.maximum(np.einsum("ij,ij->i", self.chol, self.chol), 1e-300))

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.counts)

    @property
    def dim(self) -> int:
        """Number of features."""
        return self.means.shape[1]

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``Sigma^-1 B`` for the shrunk covariance ``Sigma`` (``B`` of shape (d, k) or (d,))."""
        from scipy.linalg import solve_triangular

        return solve_triangular(self.chol, solve_triangular(self.chol, B, lower=True), lower=True, trans="T")

    @classmethod
    def from_statistics(cls, stats: ClassStatistics, shrinkage: float | None = None) -> "LDAHead":
        """The head of the summed statistics ``stats`` (``shrinkage`` in [0, 1]; None = :func:`auto_shrinkage`).

        Raises
        ------
        ConfigError
            When no class has a sample.
        """
        counts = np.asarray(stats.counts, np.float64)
        present = counts > 0
        if not present.any():
            raise ConfigError("an LDA head needs at least one labeled sample; none was reported")
        n, dim = float(counts.sum()), stats.sums.shape[1]
        means = np.where(present[:, None], stats.sums / np.where(present, counts, 1.0)[:, None], 0.0)
        within = stats.scatter - (means.T * counts) @ means
        dof = n - present.sum() if n - present.sum() >= 1 else max(n, 1.0)
        cov = (within + within.T) / (2.0 * dof)
        var = np.diag(cov).copy()
        floor = max(float(var.mean()) * 1e-6, 1e-12) if np.isfinite(var.mean()) and var.mean() > 0 else 1e-12
        var = np.maximum(var, floor)
        lam = auto_shrinkage(dim, n) if shrinkage is None else float(shrinkage)
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"head shrinkage must lie in [0, 1], got {lam}")
        shrunk = (1.0 - lam) * cov + lam * np.diag(var)
        shrunk[np.diag_indices(dim)] = np.maximum(np.diag(shrunk), floor)
        chol = _cholesky(shrunk, floor)
        log_prior = np.where(present, np.log(np.where(present, counts, 1.0) / n), ABSENT)
        return cls(means, counts, chol, log_prior)

    @classmethod
    def from_private(cls, labeled: ClassStatistics, pool: ClassStatistics, noise: dict[str, float],
                     shrinkage: float | None = None, centre: np.ndarray | None = None) -> "LDAHead":
        """The head of a private run's sums (:mod:`fedal.dp`): the labels' noisy ``counts`` and ``sums`` (the scatter
        of ``labeled`` is not read; its sums are of vectors less ``centre``) and the pool's noisy count, sum and
        scatter (``pool``, one class).

        ``shrinkage`` as in :meth:`from_statistics` (the noise's own is taken where larger). ``noise``: the variance of
        the noise on one entry of each array (``stats.counts``, ``stats.sums``,
        ``pool.counts``, ``pool.sums``, ``pool.scatter``). A class is present where its noisy count stands two
        standard deviations (and at least 1) above 0. The covariance is the pools' total covariance (Fisher's
        discriminant directions are those of the within-class one; subtracting the between-class scatter of a few
        noisy labeled means instead left near-zero variances in exactly those directions: 0.54 against 0.84 on
        digits), shrunk towards its diagonal at least as far as the noise's share of its off-diagonal energy, its
        eigenvalues raised to the noise's spectral level: positive definite by construction, whatever the noise.

        Raises
        ------
        ConfigError
            When no class stands out of the count noise, or the pool's count does not.
        """
        counts = np.asarray(labeled.counts, np.float64)
        threshold = max(1.0, 2.0 * math.sqrt(noise["stats.counts"]))
        present = counts >= threshold
        if not present.any():
            raise ConfigError(f"no class of the private sums stands out of the count noise yet (every noisy count is "
                              f"below {threshold:.1f}): more labels, or less noise (a larger head-dp-epsilon)")
        n_pool = float(pool.counts[0])
        if not n_pool >= max(2.0, 3.0 * math.sqrt(noise["pool.counts"])):
            raise ConfigError(f"the pools' noisy count {n_pool:.1f} does not stand out of its noise: too few pool samples "
                              "for a private head")
        counts = np.where(present, counts, 0.0)
        n, dim = float(counts.sum()), labeled.sums.shape[1]
        offset = np.zeros(dim) if centre is None else np.asarray(centre, np.float64)
        means = np.where(present[:, None], offset + labeled.sums / np.where(present, counts, 1.0)[:, None], 0.0)
        pool_mean = pool.sums[0] / n_pool
        total = pool.scatter / n_pool - np.outer(pool_mean, pool_mean)
        cov = (total + total.T) / 2.0
        noise_var = noise["pool.scatter"] / n_pool ** 2  # of one covariance entry
        off = cov - np.diag(np.diag(cov))
        energy = float(np.sum(off * off))
        lam_noise = min(1.0, dim * (dim - 1) * noise_var / energy) if energy > 0 else 1.0
        lam = max(auto_shrinkage(dim, n) if shrinkage is None else float(shrinkage), lam_noise)
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"head shrinkage must lie in [0, 1], got {lam}")
        diag = np.diag(cov)
        typical = max(float(np.mean(np.abs(diag))), 1e-12)
        var = np.maximum(diag, 1e-2 * typical)
        shrunk = (1.0 - lam) * cov + lam * np.diag(var)
        values, vectors = np.linalg.eigh(shrunk)
        floor = max(1e-2 * typical, 2.0 * math.sqrt(noise_var * dim))  # the noise matrix's spectral norm
        chol = np.linalg.cholesky((vectors * np.maximum(values, floor)) @ vectors.T + 1e-9 * floor * np.eye(dim))
        log_prior = np.where(present, np.log(np.where(present, counts, 1.0) / n), ABSENT)
        return cls(means, counts, chol, log_prior)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Discriminant scores of features ``X`` (n, d), shape (n, C)."""
        return np.asarray(X, np.float64) @ self.weight.T + self.bias

    def probs(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities of features ``X``, shape (n, C)."""
        return _softmax(self.logits(X))

    def embed(self, X: np.ndarray) -> np.ndarray:
        """Features ``X`` scaled by the within-class standard deviations (distances for diversity strategies)."""
        return np.asarray(X, np.float64) * self.scale

    def sample_probs(self, X: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
        """``(n_samples, n, C)`` probabilities of features ``X`` under class means drawn (from ``rng``) from
        their posterior ``N(m_c, Sigma / n_c)``."""
        X = np.asarray(X, np.float64)
        out = np.empty((n_samples, len(X), self.n_classes))
        weights = np.sqrt(np.where(self.present, self.counts, 1.0))
        for t in range(n_samples):
            z = rng.standard_normal((self.dim, self.n_classes)) / weights  # per-class N(0, I / n_c)
            means = self.means + (self.chol @ z).T
            weight = self.solve(means.T).T
            bias = np.where(self.present, -0.5 * np.einsum("ij,ij->i", weight, means) + self.log_prior, ABSENT)
            out[t] = _softmax(X @ weight.T + bias)
        return out

    def to_arrays(self, prefix: str = "head") -> dict[str, np.ndarray]:
        """The head as arrays named ``<prefix>.<name>`` (names :data:`HEAD_KEYS`): what the server sends."""
        return {f"{prefix}.{k}": v for k, v in zip(HEAD_KEYS, (self.means, self.counts, self.chol, self.log_prior))}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "head") -> "LDAHead":
        """The head from :meth:`to_arrays`' output ``arrays`` (written with ``prefix``)."""
        return cls(*(arrays[f"{prefix}.{k}"] for k in HEAD_KEYS))

    @staticmethod
    def untrained(n_classes: int, dim: int) -> "LDAHead":
        """A head of ``n_classes`` classes and ``dim`` features with no class present (uniform
        probabilities): what the server sends before any label."""
        return LDAHead(np.zeros((n_classes, dim)), np.zeros(n_classes), np.eye(dim), np.full(n_classes, ABSENT))

    @staticmethod
    def shapes(n_classes: int, dim: int, prefix: str = "head") -> dict[str, tuple[int, ...]]:
        """The array shapes of a head of ``n_classes`` classes and ``dim`` features (names with ``prefix``)."""
        return {f"{prefix}.{k}": s for k, s in zip(HEAD_KEYS, ((n_classes, dim), (n_classes,), (dim, dim), (n_classes,)))}


def pseudo_labels(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions and classes of the samples whose top probability is at least ``threshold``.

    Self-training (Lee 2013; Simeoni et al., ICPR 2020 for active learning): confident
    predictions of unlabeled samples join the training data as labels. ``threshold`` in
    (0, 1]; ``probs`` shape (n, C).
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"pseudo-label threshold must lie in (0, 1], got {threshold}")
    probs = np.asarray(probs)
    keep = np.flatnonzero(probs.max(axis=1) >= threshold)
    return keep, probs[keep].argmax(axis=1)


def _softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=1, keepdims=True)


def _cholesky(matrix: np.ndarray, floor: float) -> np.ndarray:
    jitter = 0.0
    for _ in range(8):  # rounding can leave a tiny negative eigenvalue: add a little to the diagonal
        try:
            return np.linalg.cholesky(matrix + jitter * np.eye(len(matrix)))
        except np.linalg.LinAlgError:
            jitter = floor if jitter == 0 else jitter * 10
    raise ConfigError("the head's covariance is not positive definite; raise head-shrinkage")


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``probs`` (n, C) against labels ``y``."""
    y = np.asarray(y, dtype=np.int64).reshape(-1)
    if len(y) == 0:
        return math.nan
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
