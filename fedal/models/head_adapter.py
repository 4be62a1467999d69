"""A shrinkage-LDA head on fixed features, behind the interface strategies and learners use.

:class:`HeadClassifier` takes feature vectors (:mod:`fedal.features`), not raw inputs. It
is trained in closed form from :class:`~fedal.heads.ClassStatistics`: on one device by
:meth:`HeadClassifier.fit`; in a federation each site sends :meth:`statistics` of its
labels and the server sends back the head of their sum (:meth:`get_state` /
:meth:`set_state`), which is the head of all labels pooled.

Self-training: with ``pseudo_label_threshold > 0`` the unlabeled samples that the head of
the *labeled* samples alone classifies with at least that confidence join the statistics
with their predicted class (recomputed at every fit, never stored as labels). The model
therefore holds two heads: ``labeled_head`` (labels only), which chooses the
pseudo-labels, and ``head`` (labels and pseudo-labels), which predicts. Pseudo-labels
chosen by a head that was itself trained on pseudo-labels feed their own errors back
(confirmation bias): on BloodMNIST that cost 5 to 15 points.

In a federation a site sends the labeled and the self-trained statistics separately
(:meth:`statistics`); the server sums each and sends both heads back
(:meth:`get_state`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedal.exceptions import ConfigError
from fedal.heads import ClassStatistics, LDAHead, log_loss, pseudo_labels

#: names of the two heads in the state, and of the two statistics a site sends
HEAD, LABELED_HEAD = "head", "labeled-head"
LABELED_STATS, PSEUDO_STATS = "stats", "pseudo"
#: the pool's statistics in a private run's reply (:mod:`fedal.dp`)
POOL_STATS = "pool"


@dataclass(frozen=True)
class SelfTraining:
    """What self-training added to one fit: ``positions`` (into the unlabeled rows given) and ``labels``."""

    positions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)


class HeadClassifier:
    """Shrinkage LDA on feature vectors (see the module docstring).

    Parameters
    ----------
    n_classes : int
        Number of classes.
    dim : int
        Number of features.
    shrinkage : float, optional
        Covariance shrinkage in [0, 1]; None = :func:`fedal.heads.auto_shrinkage`.
    pseudo_label_threshold : float
        Self-training confidence threshold (0 = off).
    seed : int
        Seed of the posterior samples (:meth:`sample_probs`).
    clip_norm : float
        With > 0, every feature vector is scaled to an L2 norm of at most this before it enters the
        statistics or is scored, which bounds what one sample adds to the statistics (differential
        privacy of the summed statistics, :mod:`server.head`).
    """

    #: the learner gives :meth:`fit` the unlabeled pool too (self-training)
    uses_unlabeled: ClassVar[bool] = True
    #: its head is an LDAHead that strategies may update in closed form (expected error reduction)
    closed_form: ClassVar[bool] = True

    def __init__(self, n_classes: int, dim: int, *, shrinkage: float | None = None,
                 pseudo_label_threshold: float = 0.0, seed: int = 0, clip_norm: float = 0.0) -> None:
        if n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
        if dim < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= pseudo_label_threshold <= 1.0:
            raise ConfigError(f"pseudo-label threshold must lie in [0, 1], got {pseudo_label_threshold}")
        self.n_classes, self.dim = int(n_classes), int(dim)
        self.shrinkage = shrinkage
        self.pseudo_label_threshold = float(pseudo_label_threshold)
        self.seed = int(seed)
        if not clip_norm >= 0:
            raise ConfigError(f"clip_norm must be >= 0 (0 = no clipping), got {clip_norm}")
        self.clip_norm = float(clip_norm)
        self.head: LDAHead | None = None  # labels and pseudo-labels: predicts
        self.labeled_head: LDAHead | None = None  # labels only: chooses the pseudo-labels

    # ------------------------------------------------------------- training
    def statistics(self, X: np.ndarray, y: np.ndarray, unlabeled: np.ndarray | None = None, *, min_count: int = 1
                   ) -> tuple[ClassStatistics, ClassStatistics, SelfTraining]:
        """``(labeled, self-trained, what was added)``: statistics of the labeled features ``X`` with labels
        ``y``, and of the ``unlabeled`` rows the labeled head is confident about (self-training), leaving out
        the classes with fewer than ``min_count`` such rows."""
        X = self._features(X) if len(X) else np.zeros((0, self.dim))
        stats = ClassStatistics.from_samples(X, y, self.n_classes)
        pseudo = ClassStatistics.empty(self.n_classes, self.dim)
        added = SelfTraining(np.zeros(0, np.int64), np.zeros(0, np.int64))
        if (self.pseudo_label_threshold > 0 and self.labeled_head is not None and unlabeled is not None
                and len(unlabeled)):
            unlabeled = self._features(unlabeled)
            positions, labels = pseudo_labels(self.labeled_head.probs(unlabeled), self.pseudo_label_threshold)
            if min_count > 1 and len(labels):
                keep = np.bincount(labels, minlength=self.n_classes)[labels] >= min_count
                positions, labels = positions[keep], labels[keep]
            if len(positions):
                pseudo = ClassStatistics.from_samples(unlabeled[positions], labels, self.n_classes)
                added = SelfTraining(positions, labels)
        return stats, pseudo, added

    def fit_statistics(self, labeled: ClassStatistics, pseudo: ClassStatistics | None = None) -> None:
        """Set both heads from (e.g. the sites' summed) ``labeled`` and self-trained ``pseudo`` statistics."""
        self.labeled_head = LDAHead.from_statistics(labeled, self.shrinkage)
        has_pseudo = pseudo is not None and pseudo.total > 0
        self.head = LDAHead.from_statistics(labeled + pseudo, self.shrinkage) if has_pseudo else self.labeled_head

    def fit_private(self, labeled: ClassStatistics, pool: ClassStatistics, noise: dict[str, float],
                    centre: np.ndarray) -> None:
        """Set the head from a private run's noisy sums (``labeled``: the labels' counts and sums, centred on
        ``centre``; ``pool``: the pools'; ``noise``: the variance of each array's entries)
        (:meth:`fedal.heads.LDAHead.from_private`); no self-training."""
        self.labeled_head = self.head = LDAHead.from_private(labeled, pool, noise, self.shrinkage, centre=centre)

    def private_statistics(self, X: np.ndarray, y: np.ndarray, pool: np.ndarray | None,
                           centre=None) -> dict[str, np.ndarray]:
        """A private reply's arrays, before noise: the counts and sums of the labeled features ``X`` (labels ``y``),
        centred and clipped by ``centre`` (:class:`fedal.dp.Centre`; labels are sent only once there is one), and the
        count, sum and scatter of the ``pool`` rows (None: none sent), clipped (:mod:`fedal.dp`)."""
        X = self._features(X) if len(X) else np.zeros((0, self.dim))
        if len(X):
            if centre is None:
                raise ConfigError("a private reply's labels are centred on the pools' mean: none is known yet")
            X = centre.apply(X)
        stats = ClassStatistics.from_samples(X, y, self.n_classes)
        rows = self._features(pool) if pool is not None and len(pool) else np.zeros((0, self.dim))
        whole = ClassStatistics.from_samples(rows, np.zeros(len(rows), np.int64), 1)
        return {**{f"{LABELED_STATS}.{k}": v for k, v in (("counts", stats.counts), ("sums", stats.sums))},
                **whole.to_arrays(POOL_STATS)}

    @staticmethod
    def private_statistics_shapes(n_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of a private reply's arrays (:meth:`private_statistics`) for ``n_classes`` classes of ``dim``
        features."""
        return {f"{LABELED_STATS}.counts": (n_classes,), f"{LABELED_STATS}.sums": (n_classes, dim),
                **ClassStatistics.shapes(1, dim, POOL_STATS)}

    def fit(self, X: np.ndarray, y: np.ndarray, *, unlabeled: np.ndarray | None = None, **_ignored) -> float:
        """Train on features ``X`` and labels ``y`` (and, self-training, the ``unlabeled`` rows the new
        labeled head is confident about); return the log loss of the new head on ``(X, y)``. Other
        keyword arguments (epochs, ...) are ignored: the head is solved, not iterated."""
        if len(y) == 0:
            return float("nan")
        labeled = ClassStatistics.from_samples(self._features(X), y, self.n_classes)
        self.labeled_head = LDAHead.from_statistics(labeled, self.shrinkage)
        _, pseudo, _ = self.statistics(X, y, unlabeled)
        self.fit_statistics(labeled, pseudo)
        return log_loss(self.head.probs(self._features(X)), y)

    def reset(self, seed: int | None = None) -> None:
        """Forget both heads (``seed``: new seed of the posterior samples)."""
        self.head = self.labeled_head = None
        if seed is not None:
            self.seed = int(seed)

    # ------------------------------------------------------------- state
    def get_state(self) -> "OrderedDict[str, np.ndarray]":
        """Both heads as named arrays (an untrained head has no class: uniform probabilities)."""
        untrained = LDAHead.untrained(self.n_classes, self.dim)
        arrays = {**(self.head or untrained).to_arrays(HEAD), **(self.labeled_head or untrained).to_arrays(LABELED_HEAD)}
        return OrderedDict((k, np.array(v, copy=True)) for k, v in arrays.items())

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Load both heads from ``state`` (as :meth:`get_state` gives); ConfigError names a wrong array."""
        shapes = self.state_shapes(self.n_classes, self.dim)
        if set(state) != set(shapes):
            raise ConfigError(f"head arrays {sorted(state)} are not {sorted(shapes)}")
        for key, shape in shapes.items():
            if tuple(np.shape(state[key])) != shape:
                raise ConfigError(f"head array {key!r} has shape {tuple(np.shape(state[key]))}, expected {shape}")
        heads = [LDAHead.from_arrays(state, prefix) for prefix in (HEAD, LABELED_HEAD)]
        self.head, self.labeled_head = (h if h.present.any() else None for h in heads)

    @staticmethod
    def state_shapes(n_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays of :meth:`get_state` for ``n_classes`` classes and ``dim`` features."""
        return {**LDAHead.shapes(n_classes, dim, HEAD), **LDAHead.shapes(n_classes, dim, LABELED_HEAD)}

    @staticmethod
    def statistics_shapes(n_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the arrays a site sends (labeled and self-trained statistics), ``n_classes`` classes
        of ``dim`` features."""
        return {**ClassStatistics.shapes(n_classes, dim, LABELED_STATS), **ClassStatistics.shapes(n_classes, dim, PSEUDO_STATS)}

    # ------------------------------------------------------------- inference
    def _features(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ConfigError(f"the head takes feature vectors of {self.dim} values, got an array of shape {X.shape}; "
                              "transform the inputs with the run's featurizer (fedal.features)")
        if self.clip_norm > 0:
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            X = X * np.minimum(1.0, self.clip_norm / np.maximum(norms, 1e-300))
        return X

    def forward(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, C)`` and embeddings ``(n, d)`` of the features ``X`` (scaled by the
        within-class spread)."""
        X = self._features(X)
        if self.head is None:
            return np.full((len(X), self.n_classes), 1.0 / self.n_classes), X
        return self.head.probs(X), self.head.embed(X)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities of the features ``X``, shape (n, C)."""
        return self.forward(X)[0]

    def predict(self, X) -> np.ndarray:
        """Most probable class per row of ``X``."""
        return self.predict_proba(X).argmax(axis=1)

    def evaluate(self, X, y) -> tuple[float, float]:
        """``(mean cross-entropy loss, accuracy)`` on features ``X`` with labels ``y``."""
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(y) == 0:
            return float("nan"), float("nan")
        probs = self.predict_proba(X)
        return log_loss(probs, y), float((probs.argmax(axis=1) == y).mean())

    def sample_probs(self, X, n_samples: int, seed: int | None = None) -> np.ndarray:
        """``(n_samples, n, C)`` probabilities of the features ``X`` under class means drawn from their
        posterior (seeded by ``seed``)."""
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        X = self._features(X)
        if self.head is None:
            return np.full((n_samples, len(X), self.n_classes), 1.0 / self.n_classes)
        return self.head.sample_probs(X, n_samples, np.random.default_rng(self.seed if seed is None else seed))

