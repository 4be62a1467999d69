"""Query by committee: disagreement among committee members.

Seung, Opper & Sompolinsky, "Query by Committee", COLT 1992; McCallum & Nigam,
"Employing EM and Pool-Based Active Learning for Text Classification", ICML 1998.
The committee is ``ctx.sample_probs(T)``: MC-dropout samples or ensemble members,
whichever the model adapter provides. Natural logarithms throughout.
"""
from __future__ import annotations

import numpy as np

from fedal.strategies.bald import _entropy_last_axis, _check_n_samples, _check_sample_probs, _sample_seed
from fedal.strategies.base import QueryContext, ScoreStrategy
from fedal.strategies.registry import register


def vote_entropy(sample_probs: np.ndarray) -> np.ndarray:
    """Entropy of the members' hard votes, ``-sum_c (V_c/T) log(V_c/T)`` (Dagan & Engelson 1995).

    Parameters
    ----------
    sample_probs : array, shape (T, n, C)
        Each member's class probabilities; a member votes for its most probable class.

    Returns
    -------
    numpy.ndarray, shape (n,)
        0 when all members vote alike, at most ``log min(T, C)``.
    """
    p = _check_sample_probs(sample_probs)
    choice = p.argmax(axis=2)  # (T, n)
    share = np.stack([(choice == c).mean(axis=0) for c in range(p.shape[2])], axis=1)
    return _entropy_last_axis(share)


def kl_to_consensus(sample_probs: np.ndarray) -> np.ndarray:
    """Mean KL divergence of each member from the consensus, ``mean_t KL(p_t || mean_t p_t)``
    (McCallum & Nigam 1998).

    Algebraically equal to the BALD mutual information of the same samples.

    Parameters
    ----------
    sample_probs : array, shape (T, n, C)
        Each member's class probabilities.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Mean divergence in nats; 0 when all members agree.
    """
    p = _check_sample_probs(sample_probs)
    consensus = p.mean(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(consensus)), 0.0)
    return np.maximum(terms.sum(axis=2).mean(axis=0), 0.0)


class _Committee(ScoreStrategy):
    picks_uncertain = True  # members disagree where the model is unsure

    def __init__(self, n_members: int = 10) -> None:
        self.n_members = _check_n_samples(n_members, "n_members")

    def _members(self, ctx: QueryContext, rng: np.random.Generator | None) -> np.ndarray:
        return ctx.sample_probs(self.n_members, _sample_seed(rng))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_members={self.n_members})"


@register("qbc_vote_entropy")
class VoteEntropy(_Committee):
    """Query by committee with vote entropy (Seung et al. 1992; Dagan & Engelson 1995).

    Parameters
    ----------
    n_members : int
        Committee size ``T`` (>= 2), drawn from ``ctx.sample_probs``.
    """

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return vote_entropy(self._members(ctx, rng))


@register("qbc_kl")
class KLToConsensus(_Committee):
    """Query by committee with mean KL divergence to the consensus (McCallum & Nigam 1998).

    Parameters
    ----------
    n_members : int
        Committee size ``T`` (>= 2), drawn from ``ctx.sample_probs``.
    """

    def score(self, ctx: QueryContext, rng: np.random.Generator | None = None) -> np.ndarray:
        return kl_to_consensus(self._members(ctx, rng))
