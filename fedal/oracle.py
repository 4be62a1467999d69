"""Oracles: whoever answers label queries.

An :class:`Oracle` gets the ids of samples to label and returns the answers it has
*now*: a simulated oracle answers everything at once; a person (the labeling page, a
file exchange) answers some, later, or never. Answers are validated by the pool, so an
out-of-range class is rejected and its request stays pending.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from fedal.exceptions import ConfigError, UnknownSampleError


class Oracle(ABC):
    """Interface of every oracle.

    Attributes
    ----------
    name : str
        Recorded with every label as its source (e.g. ``"simulated"``, ``"web:alice"``).
    """

    name: str = "oracle"

    @abstractmethod
    def label(self, ids: Sequence[int]) -> dict[int, int]:
        """Return ``{id: class}`` for the requested ids answered so far (possibly none).

        Parameters
        ----------
        ids : sequence of int
            Pending sample ids, in the order the strategy ranked them.
        """


class SimulatedOracle(Oracle):
    """Answers from ground truth, optionally with label noise (for simulations).

    Parameters
    ----------
    labels : array of int
        Ground-truth label of each sample, indexed by sample id (or aligned with ``ids``).
    n_classes : int
        Number of classes (noisy answers are drawn among the other classes).
    noise_rate : float
        Probability that an answer is replaced by a uniformly drawn *wrong* class.
    seed : int
        Seed of the noise; the same id always gets the same (noisy) answer.
    ids : array of int, optional
        Sample ids aligned with ``labels`` when they are not ``0 .. n-1``.
    """

    name = "simulated"

    def __init__(self, labels: Sequence[int], n_classes: int, *, noise_rate: float = 0.0, seed: int = 0,
                 ids: Sequence[int] | None = None) -> None:
        if not 0.0 <= noise_rate <= 1.0:
            raise ConfigError(f"noise_rate must be in [0, 1], got {noise_rate}")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        ids = np.arange(len(labels)) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != len(labels):
            raise ConfigError(f"SimulatedOracle got {len(ids)} ids for {len(labels)} labels")
        answers = labels.copy()
        if noise_rate > 0:
            rng = np.random.default_rng(seed)
            flip = rng.random(len(labels)) < noise_rate
            shift = rng.integers(1, n_classes, size=len(labels))  # never the true class
            answers[flip] = (labels[flip] + shift[flip]) % n_classes
        self._answers = dict(zip(ids.tolist(), answers.tolist()))
        self.noise_rate = noise_rate
        if noise_rate > 0:
            self.name = f"simulated(noise={noise_rate:g})"

    def label(self, ids: Sequence[int]) -> dict[int, int]:
        try:
            return {int(i): self._answers[int(i)] for i in ids}
        except KeyError as exc:
            raise UnknownSampleError(f"the simulated oracle has no ground truth for sample id {exc.args[0]}") from None
