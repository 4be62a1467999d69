"""Query strategies: which unlabeled samples to label next.

Every strategy is reachable by name (``get_strategy("badge")``) and obeys the contract
of :class:`QueryStrategy` (see :mod:`fedal.strategies.base`). Score-based strategies
(:class:`ScoreStrategy`) also expose ``score(ctx)``, one informativeness value per
candidate (higher = more informative); its mean is the pool's mean uncertainty.

Families, one module each: :mod:`~fedal.strategies.random`,
:mod:`~fedal.strategies.uncertainty`, :mod:`~fedal.strategies.bald`,
:mod:`~fedal.strategies.committee`, :mod:`~fedal.strategies.egl`,
:mod:`~fedal.strategies.density`, :mod:`~fedal.strategies.coreset`,
:mod:`~fedal.strategies.badge`, :mod:`~fedal.strategies.coldstart`,
:mod:`~fedal.strategies.federated` (LoGo, KAFAL: local model next to the global one),
:mod:`~fedal.strategies.adaptive` (budget-aware switching, expected error reduction).
"""
from fedal.strategies.adaptive import BudgetAware, ExpectedErrorReduction, expected_errors
from fedal.strategies.badge import (
    BADGE,
    badge_select,
    d2_seeding,
    gradient_embedding,
    gradient_embedding_factors,
    gradient_sq_distances_to,
    kmeanspp,
)
from fedal.strategies.bald import BALD, bald
from fedal.strategies.base import (
    ModelView,
    PoolExhaustedWarning,
    QueryContext,
    QueryStrategy,
    ScoreStrategy,
    check_budget,
    top_k,
)
from fedal.strategies.coldstart import KMeansColdStart, TypiClust, cluster_features, typicality
from fedal.strategies.committee import KLToConsensus, VoteEntropy, kl_to_consensus, vote_entropy
from fedal.strategies.coreset import CoreSet, kcenter_greedy, min_sq_distances
from fedal.strategies.density import InformationDensity, information_density, mean_cosine_similarity
from fedal.strategies.egl import ExpectedGradientLength, expected_gradient_length
from fedal.strategies.federated import (
    KAFAL,
    KAFALDiverse,
    LoGo,
    WithViews,
    class_weights,
    local_forward,
    logo_select,
    weighted_discrepancy,
)
from fedal.strategies.random import RandomSampling
from fedal.strategies.registry import available_strategies, get_strategy, register, strategy_class
from fedal.strategies.uncertainty import (
    Entropy,
    LeastConfidence,
    Margin,
    entropy,
    least_confidence,
    margin,
    top2_margin,
)

__all__ = [
    # contract and registry
    "ModelView", "PoolExhaustedWarning", "QueryContext", "QueryStrategy", "ScoreStrategy",
    "available_strategies", "check_budget", "get_strategy", "register", "strategy_class", "top_k",
    # strategies
    "BADGE", "BALD", "BudgetAware", "CoreSet", "ExpectedErrorReduction", "Entropy", "ExpectedGradientLength", "InformationDensity",
    "KLToConsensus", "KMeansColdStart", "LeastConfidence", "Margin", "RandomSampling",
    "TypiClust", "VoteEntropy", "KAFAL", "KAFALDiverse", "LoGo", "WithViews",
    # pure functions
    "badge_select", "bald", "d2_seeding", "entropy", "expected_errors", "expected_gradient_length",
    "gradient_embedding", "gradient_embedding_factors", "gradient_sq_distances_to",
    "information_density", "kcenter_greedy", "kl_to_consensus", "kmeanspp", "least_confidence",
    "margin", "mean_cosine_similarity", "min_sq_distances", "top2_margin", "typicality",
    "vote_entropy", "class_weights", "cluster_features", "local_forward", "logo_select", "weighted_discrepancy",
]
