"""Expected gradient length (EGL) for the final linear layer.

Settles, Craven & Ray, "Multiple-Instance Active Learning", NIPS 2008; Settles,
"Active Learning Literature Survey", 2009, sec. 3.4. For a softmax head ``W h + b``,
the cross-entropy gradient with respect to ``W`` for label ``y`` is ``(p - e_y) h^T``, so
its norm factorises as ``||p - e_y|| * ||h||`` and no per-sample backward pass is needed.
"""
from __future__ import annotations

import numpy as np

from fedal.strategies.base import QueryContext, ScoreStrategy
from fedal.strategies.registry import register


def expected_gradient_length(probs: np.ndarray, embeddings: np.ndarray, include_bias: bool = False) -> np.ndarray:
    """``sum_y p_y ||grad_W CE(y)||`` for a linear softmax head (Settles et al. 2008).

    Parameters
    ----------
    probs : array, shape (n, C)
        Predicted class probabilities.
    embeddings : array, shape (n, d)
        Inputs ``h`` of the final linear layer.
    include_bias : bool
        Also count the bias gradient ``p - e_y``: the norm becomes
        ``||p - e_y|| * sqrt(||h||^2 + 1)``.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Expected gradient norm under the model's own predictive distribution.
    """
    p = np.asarray(probs, dtype=np.float64)
    h = np.asarray(embeddings, dtype=np.float64)
    if p.ndim != 2 or h.ndim != 2 or len(p) != len(h):
        raise ValueError(f"need probs (n, C) and embeddings (n, d) with the same n, got {p.shape} and {h.shape}")
    # ||p - e_y||^2 = ||p||^2 - 2 p_y + 1, for every y at once
    residual = np.sqrt(np.maximum((p * p).sum(axis=1, keepdims=True) - 2.0 * p + 1.0, 0.0))
    h_sq = (h * h).sum(axis=1) + (1.0 if include_bias else 0.0)
    return (p * residual).sum(axis=1) * np.sqrt(h_sq)


@register("egl")
class ExpectedGradientLength(ScoreStrategy):
    """Expected gradient length of the final layer (Settles, Craven & Ray, NIPS 2008).

    Parameters
    ----------
    include_bias : bool
        Include the head's bias in the gradient (see :func:`expected_gradient_length`).
    """

    def __init__(self, include_bias: bool = False) -> None:
        self.include_bias = bool(include_bias)

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return expected_gradient_length(ctx.probs(), ctx.embeddings(), self.include_bias)

    def __repr__(self) -> str:
        return f"ExpectedGradientLength(include_bias={self.include_bias})"
