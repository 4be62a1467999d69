"""Stopping criteria: when to stop asking for labels.

Each criterion looks at the learner's history (one :class:`StepRecord` per query
step) and returns a reason string to stop, or ``None`` to go on.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from fedal.exceptions import ConfigError


@dataclass
class StepRecord:
    """What one query step did and measured.

    Attributes
    ----------
    step : int
        Index of the step, from 0.
    queried : int
        Samples selected in this step.
    labeled, unlabeled : int
        Pool counts after the step.
    accuracy, loss : float
        On the held-out set after the step's fit (NaN without one).
    mean_uncertainty, max_uncertainty : float
        Normalised entropy in [0, 1] over the unlabeled pool, as scored when the step queried
        (NaN before the model was first trained).
    """

    step: int
    queried: int
    labeled: int
    unlabeled: int
    accuracy: float = math.nan
    loss: float = math.nan
    mean_uncertainty: float = math.nan
    max_uncertainty: float = math.nan


class StoppingCriterion(ABC):
    """Decides from the history whether to stop querying."""

    @abstractmethod
    def check(self, history: Sequence[StepRecord]) -> str | None:
        """A reason to stop, or ``None``.

        Parameters
        ----------
        history : sequence of StepRecord
            One record per query step so far, oldest first.
        """


class BudgetExhausted(StoppingCriterion):
    """Stop once ``total_labels`` samples are labeled or the pool is empty.

    Parameters
    ----------
    total_labels : int
        Label budget of the whole campaign.
    """

    def __init__(self, total_labels: int) -> None:
        if total_labels < 0:
            raise ConfigError(f"total_labels must be >= 0, got {total_labels}")
        self.total_labels = int(total_labels)

    def check(self, history: Sequence[StepRecord]) -> str | None:
        if not history:
            return None
        last = history[-1]
        if last.labeled >= self.total_labels:
            return f"label budget of {self.total_labels} spent"
        if last.unlabeled == 0:
            return "the pool has no unlabeled sample left"
        return None


class AccuracyPlateau(StoppingCriterion):
    """Stop when accuracy has not improved by ``min_delta`` for ``patience`` steps
    (a held-out-set version of the stabilising-predictions criterion, Bloodgood &
    Vijay-Shanker, CoNLL 2009).

    Parameters
    ----------
    patience : int
        Steps without improvement tolerated.
    min_delta : float
        Smallest accuracy gain that counts as improvement.
    """

    def __init__(self, patience: int = 3, min_delta: float = 0.005) -> None:
        if patience < 1:
            raise ConfigError(f"patience must be >= 1, got {patience}")
        self.patience, self.min_delta = int(patience), float(min_delta)

    def check(self, history: Sequence[StepRecord]) -> str | None:
        accs = [h.accuracy for h in history if not math.isnan(h.accuracy)]
        if len(accs) <= self.patience:
            return None
        best_before = max(accs[: -self.patience])
        if max(accs[-self.patience :]) < best_before + self.min_delta:
            return f"accuracy plateaued: no gain of {self.min_delta} in {self.patience} steps"
        return None


class UncertaintyBelow(StoppingCriterion):
    """Stop when the pool's uncertainty (normalised entropy in [0, 1]) falls below a
    threshold (max-uncertainty criterion, Zhu, Wang & Hovy, COLING 2008).

    Parameters
    ----------
    threshold : float
        In (0, 1].
    statistic : {"max", "mean"}
        Which pool statistic is compared.
    """

    def __init__(self, threshold: float = 0.1, statistic: str = "max") -> None:
        if not 0 < threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        if statistic not in ("max", "mean"):
            raise ConfigError(f"statistic must be 'max' or 'mean', got {statistic!r}")
        self.threshold, self.statistic = float(threshold), statistic

    def check(self, history: Sequence[StepRecord]) -> str | None:
        if not history:
            return None
        value = getattr(history[-1], f"{self.statistic}_uncertainty")
        if not math.isnan(value) and value < self.threshold:
            return f"{self.statistic} pool uncertainty {value:.3f} below {self.threshold}"
        return None


#: the criteria a run's ``stop-when`` may name
CRITERIA = ("plateau", "uncertainty", "budget")


def criteria_from(names: str, *, patience: int = 3, min_delta: float = 0.005, uncertainty: float = 0.1,
                  total_budget: int = 0) -> list[StoppingCriterion]:
    """The criteria named in ``names`` (comma-separated, from :data:`CRITERIA`), one factory for the
    federation (``stop-when``) and ``fedal local`` (``--stop-when``).

    Parameters
    ----------
    names : str
        ``"plateau"``: :class:`AccuracyPlateau` (``patience``, ``min_delta``); ``"uncertainty"``:
        :class:`UncertaintyBelow` on the mean pool uncertainty (``uncertainty``); ``"budget"``:
        :class:`BudgetExhausted` (``total_budget`` labels, > 0). "" = none.
    patience, min_delta, uncertainty, total_budget
        The criteria's settings.
    """
    out: list[StoppingCriterion] = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name == "plateau":
            out.append(AccuracyPlateau(patience, min_delta))
        elif name == "uncertainty":
            out.append(UncertaintyBelow(uncertainty, statistic="mean"))
        elif name == "budget":
            if total_budget < 1:
                raise ConfigError("stop-when budget needs total-budget > 0 (the labels of the whole run)")
            out.append(BudgetExhausted(total_budget))
        else:
            raise ConfigError(f"unknown stopping criterion {name!r} in stop-when; choose from {', '.join(CRITERIA)}")
    return out
