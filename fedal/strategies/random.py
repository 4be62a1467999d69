"""Random sampling: the baseline every active learning result is measured against."""
from __future__ import annotations

import numpy as np

from fedal.strategies.base import QueryContext, QueryStrategy
from fedal.strategies.registry import register


@register("random")
class RandomSampling(QueryStrategy):
    """Uniform random selection without replacement (seeded)."""

    needs_model = False

    def _select(self, ctx: QueryContext, budget: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(ctx), size=budget, replace=False)
