"""Federated-aware query strategies: use a client's local model next to the global one.

In federated active learning a client holds two views of its data: the global model
(what the federation learned) and a local model (the global model specialised on, or a
model trained only on, the client's own labels). Both papers below show that under
label skew the two disagree in informative ways that the global model alone misses.

Views read from ``QueryContext.extra`` (the federated client fills them, see
``clients/site.py``; all stay on the device):

``"local_model"`` : ModelView, optional
    The client's local model. Without it the global model stands in, so the
    strategies still work on one device (LoGo then reduces to cluster-wise entropy,
    KAFAL to the class-weighted self-discrepancy, which is 0 -> ties broken at random
    with an entropy tie-break).
``"class_counts"`` : array of int, shape (C,), optional
    Labels of each class the client holds; KAFAL weights classes by it. Uniform
    weights without it.

Strategies that want a local model declare ``needs_local_model = True`` and how it is
made (``local_model_init``: ``"scratch"`` = trained only on the local labels, as
LoGo's local-only model; ``"global"`` = the global model fine-tuned locally, as KAFAL's
specialised model).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedal.checks import require_int, require_number
from fedal.exceptions import ConfigError
from fedal.strategies.badge import gradient_embedding
from fedal.strategies.base import ModelView, QueryContext, QueryStrategy, ScoreStrategy, top_k
from fedal.strategies.coldstart import cluster_features
from fedal.strategies.coreset import kcenter_greedy
from fedal.strategies.registry import register
from fedal.strategies.uncertainty import entropy

LOCAL_MODEL, CLASS_COUNTS = "local_model", "class_counts"


def local_forward(ctx: QueryContext) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(n, C)`` and embeddings ``(n, d)`` of the candidates under the local
    model (``ctx.extra["local_model"]``, else the global model), cached in the context."""
    if "local_forward" not in ctx._cache:
        local = ctx.extra.get(LOCAL_MODEL)
        if local is None:
            ctx._cache["local_forward"] = ctx._forward()
        else:
            if not isinstance(local, ModelView):
                raise ConfigError(
                    f"QueryContext.extra['local_model'] must be a model view (forward / sample_probs / "
                    f"n_classes), got {type(local).__name__}"
                )
            ctx._need_model()  # the global model is needed too; fail with the usual message
            ctx._cache["local_forward"] = local.forward(ctx.X)
    return ctx._cache["local_forward"]


def logo_select(local_features: np.ndarray, global_uncertainty: np.ndarray, k: int,
                rng: np.random.Generator) -> np.ndarray:
    """LoGo's two steps: ``k`` k-means clusters of the local features (macro), then the
    candidate the global model is least sure of in each cluster (micro).

    Kim, Ko, Lee, Yun & Lee, "Re-thinking Federated Active Learning based on Inter-class
    Diversity", CVPR 2023, Algorithm 1, with scikit-learn's k-means
    (:func:`~fedal.strategies.coldstart.cluster_features`). If some clusters come out
    empty (duplicate points), the remaining picks are the most uncertain unpicked candidates.

    Parameters
    ----------
    local_features : array, shape (n, d)
        What the local model makes of each candidate (gradient embeddings in the paper).
    global_uncertainty : array, shape (n,)
        Uncertainty of each candidate under the global model (entropy in the paper).
    k : int
        Number of samples to select, ``1 <= k <= n``.
    rng : numpy.random.Generator
        Seeds the clustering and the tie-breaks.

    Returns
    -------
    numpy.ndarray of int64, shape (k,)
        Positions, one per cluster, most uncertain first.
    """
    unc = np.asarray(global_uncertainty, dtype=np.float64)
    assign = cluster_features(np.asarray(local_features, dtype=np.float64), k, int(rng.integers(2**31 - 1)))
    tiebreak = rng.random(len(unc))
    picks = []
    for c in np.unique(assign):
        members = np.flatnonzero(assign == c)
        picks.append(members[np.lexsort((tiebreak[members], -unc[members]))[0]])
    picks = np.asarray(picks, dtype=np.int64)
    if len(picks) < k:  # fewer non-empty clusters than the budget
        rest = np.setdiff1d(np.arange(len(unc)), picks)
        picks = np.concatenate([picks, rest[top_k(unc[rest], k - len(picks), rng)]])
    return picks[np.lexsort((tiebreak[picks], -unc[picks]))]


@register("logo")
class LoGo(QueryStrategy):
    """LoGo: local-model clusters (macro), global-model uncertainty (micro).

    Kim et al., "Re-thinking Federated Active Learning based on Inter-class Diversity",
    CVPR 2023. The local-only model (``extra["local_model"]``, trained from scratch on
    the client's labels) gives each candidate a feature; k-means with ``k = budget``
    makes the batch cover the client's classes (inter-class diversity); within each
    cluster the candidate with the highest entropy under the global model is taken.

    Parameters
    ----------
    features : {"gradient", "embedding"}
        Cluster the local model's BADGE-style gradient embeddings (as the paper) or its
        penultimate-layer embeddings.
    """

    needs_local_model: ClassVar[bool] = True
    local_model_init: ClassVar[str] = "scratch"

    def __init__(self, features: str = "gradient") -> None:
        if features not in ("gradient", "embedding"):
            raise ConfigError(f"LoGo features must be 'gradient' or 'embedding', got {features!r}")
        self.features = features

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        global_unc = entropy(ctx.probs())
        probs, emb = local_forward(ctx)
        feats = gradient_embedding(probs, emb) if self.features == "gradient" else emb
        return logo_select(feats, global_unc, budget, rng)


def class_weights(class_counts: Any, n_classes: int) -> np.ndarray:
    """KAFAL-style class weights from a client's label counts: rare classes weigh more.

    ``w_c = (1 / (n_c + 1)) / mean_c(1 / (n_c + 1))`` so the weights average 1; uniform
    when ``class_counts`` is None.

    Parameters
    ----------
    class_counts : array of int, shape (C,), or None
    n_classes : int
    """
    if class_counts is None:
        return np.ones(n_classes)
    counts = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    if counts.shape != (n_classes,) or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ConfigError(
            f"QueryContext.extra['class_counts'] must hold {n_classes} non-negative counts, got {counts.tolist()}"
        )
    inv = 1.0 / (counts + 1.0)
    return inv / inv.mean()


def weighted_discrepancy(p_local: np.ndarray, p_global: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Class-weighted KL divergence ``sum_c w_c p_l(c) log(p_l(c) / p_g(c))`` per sample.

    Cao, Zhang, Lv, Wang & Han, "Knowledge-Aware Federated Active Learning with Non-IID
    Data", ICCV 2023 (knowledge-specialised active sampling: the discrepancy between the
    specialised local model and the global model, with more weight on the classes the
    client is short of).

    Parameters
    ----------
    p_local, p_global : arrays, shape (n, C)
        Probabilities of the local and the global model.
    weights : array, shape (C,)
        Class weights (:func:`class_weights`).
    """
    eps = 1e-8
    pl = np.clip(np.asarray(p_local, dtype=np.float64), eps, 1.0)
    pg = np.clip(np.asarray(p_global, dtype=np.float64), eps, 1.0)
    if pl.shape != pg.shape or pl.ndim != 2:
        raise ValueError(f"local and global probabilities must have the same (n, C) shape, got {pl.shape} and {pg.shape}")
    return np.maximum((np.asarray(weights)[None, :] * pl * np.log(pl / pg)).sum(axis=1), 0.0)


@register("kafal")
class KAFAL(ScoreStrategy):
    """KAFAL-style local-global disagreement (Cao et al., ICCV 2023).

    Score = class-weighted KL(local || global) (:func:`weighted_discrepancy`) with
    weights from the client's label counts (:func:`class_weights`), plus
    ``entropy_weight`` x the global model's normalised entropy (breaks the ties when both
    models agree, e.g. without a local model).

    Parameters
    ----------
    entropy_weight : float
        Weight of the global entropy term, >= 0.
    """

    needs_local_model: ClassVar[bool] = True
    local_model_init: ClassVar[str] = "global"

    def __init__(self, entropy_weight: float = 0.1) -> None:
        self.entropy_weight = require_number("entropy_weight", entropy_weight, low=0)

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        p_global = ctx.probs()
        p_local, _ = local_forward(ctx)
        weights = class_weights(ctx.extra.get(CLASS_COUNTS), p_global.shape[1])
        h = entropy(p_global) / np.log(p_global.shape[1])
        return weighted_discrepancy(p_local, p_global, weights) + self.entropy_weight * h


@register("kafal_diverse")
class KAFALDiverse(QueryStrategy):
    """KAFAL disagreement with a diverse batch: the top ``pre_factor x budget`` candidates
    by :class:`KAFAL` score, then k-center greedy on the global embeddings among them.

    Top-k by a score alone tends to fill a batch with near-duplicates from one confused
    region; the diversity step (Sener & Savarese, ICLR 2018, on a pre-filtered set as in
    Zhdanov, "Diverse mini-batch active learning", 2019) spreads the batch out.

    Parameters
    ----------
    pre_factor : int
        How many times the budget the pre-filter keeps, >= 1.
    entropy_weight : float
        As in :class:`KAFAL`.
    """

    needs_local_model: ClassVar[bool] = True
    local_model_init: ClassVar[str] = "global"

    def __init__(self, pre_factor: int = 4, entropy_weight: float = 0.1) -> None:
        self.pre_factor = require_int("pre_factor", pre_factor, low=1)
        self.kafal = KAFAL(entropy_weight)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        scores = self.kafal.score(ctx, rng)
        shortlist = top_k(scores, min(len(ctx), self.pre_factor * budget), rng)
        # k-center greedy on the shortlist, first pick = best score (not random)
        chosen = kcenter_greedy(np.asarray(ctx.embeddings())[shortlist], budget, ctx.labeled_embeddings(), first=0)
        return shortlist[chosen]


class WithViews(QueryStrategy):
    """A strategy with extra views (e.g. ``local_model``) added to every context it sees.

    Lets a caller that builds the :class:`QueryContext` itself (``ActiveLearner``) give a
    federated-aware strategy its local model without changing that caller.

    Parameters
    ----------
    inner : QueryStrategy
        The strategy to run.
    **views
        Entries put into ``ctx.extra`` (existing keys are kept).
    """

    def __init__(self, inner: QueryStrategy, **views: Any) -> None:
        self.inner = inner
        self.views = views
        self.name = inner.name
        self.needs_model = inner.needs_model

    def query(self, ctx: QueryContext, budget: int, seed: int | None = None) -> np.ndarray:
        for key, value in self.views.items():
            ctx.extra.setdefault(key, value)
        return self.inner.query(ctx, budget, seed=seed)

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return self.inner._select(ctx, budget, rng)

    def __repr__(self) -> str:
        return f"WithViews({self.inner!r}, {sorted(self.views)})"
