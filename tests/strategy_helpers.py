"""Small deterministic stand-ins for a model, for fast strategy tests."""
from __future__ import annotations

import numpy as np

from fedal.strategies import QueryContext


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class FakeModel:
    """A fixed random two-layer softmax model over flattened features.

    ``forward`` gives ``softmax(relu(x W1) W2)`` and the hidden layer as embedding;
    ``sample_probs`` applies seeded dropout to the hidden layer (MC dropout).
    """

    def __init__(self, n_features: int, n_classes: int = 3, dim: int = 6, seed: int = 0, dropout: float = 0.5):
        rng = np.random.default_rng(seed)
        self.n_classes = n_classes
        self.w1 = rng.normal(size=(n_features, dim))
        self.w2 = rng.normal(size=(dim, n_classes))
        self.dropout = dropout

    def _hidden(self, X) -> np.ndarray:
        x = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        return np.maximum(x @ self.w1, 0.0)

    def forward(self, X):
        h = self._hidden(X)
        return softmax(h @ self.w2), h.astype(np.float32)

    def sample_probs(self, X, n_samples: int, seed: int | None = None) -> np.ndarray:
        rng = np.random.default_rng(seed)
        h = self._hidden(X)
        masks = (rng.random((n_samples, *h.shape)) >= self.dropout) / (1.0 - self.dropout)
        return softmax((h[None] * masks) @ self.w2)


class FixedModel:
    """A model that returns given outputs, row for row (inputs ``X`` are row indices)."""

    def __init__(self, probs, embeddings=None, samples=None):
        self.probs = np.asarray(probs, dtype=np.float64)
        self.n_classes = self.probs.shape[1]
        self.embeddings = np.eye(len(self.probs)) if embeddings is None else np.asarray(embeddings, np.float64)
        self.samples = samples

    def forward(self, X):
        rows = np.asarray(X, dtype=np.int64).reshape(-1)
        return self.probs[rows], self.embeddings[rows]

    def sample_probs(self, X, n_samples: int, seed: int | None = None):
        rows = np.asarray(X, dtype=np.int64).reshape(-1)
        return np.asarray(self.samples, dtype=np.float64)[:, rows]


def fixed_context(probs, embeddings=None, samples=None) -> QueryContext:
    """A context whose candidates are the rows of ``probs`` (ids 0..n-1)."""
    n = len(probs)
    return QueryContext(ids=np.arange(n), X=np.arange(n), model=FixedModel(probs, embeddings, samples))


def blobs(n_per_blob: int = 20, centers=((0, 0), (10, 0), (0, 10)), scale: float = 0.5, seed: int = 0):
    """Well-separated Gaussian blobs; returns ``(X, blob_index)``."""
    rng = np.random.default_rng(seed)
    centers = np.asarray(centers, dtype=np.float64)
    X = np.concatenate([c + scale * rng.normal(size=(n_per_blob, centers.shape[1])) for c in centers])
    return X, np.repeat(np.arange(len(centers)), n_per_blob)
