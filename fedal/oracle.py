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


UNSURE = None
"""The answer "I cannot tell": :meth:`ActiveLearner.teach` closes the request as skipped and the sample is not
asked again (a person who could not tell once will not tell next round either)."""

NOISE_KINDS = ("uniform", "neighbour")
"""Label noise of :class:`SimulatedOracle`: ``uniform`` draws the wrong class uniformly among the others;
``neighbour`` flips to a neighbouring class (``y - 1`` or ``y + 1`` modulo the class count), the confusion of
ordered or similar-looking classes (grades, stages, adjacent cell types)."""


class SimulatedOracle(Oracle):
    """Answers from ground truth, optionally with label noise and "unsure" answers (for simulations).

    Parameters
    ----------
    labels : array of int
        Ground-truth label of each sample, indexed by sample id (or aligned with ``ids``).
    n_classes : int
        Number of classes (noisy answers are drawn among the other classes).
    noise_rate : float
        Probability that an answer is replaced by a *wrong* class.
    seed : int
        Seed of the noise; the same id always gets the same (noisy) answer.
    ids : array of int, optional
        Sample ids aligned with ``labels`` when they are not ``0 .. n-1``.
    noise_kind : {"uniform", "neighbour"}
        Which wrong class a noisy answer gives (see :data:`NOISE_KINDS`).
    unsure_rate : float
        Probability that the oracle answers :data:`UNSURE` for a sample (drawn independently of the noise, so
        the same seed gives the same wrong answers whatever the unsure rate).
    """

    name = "simulated"

    def __init__(self, labels: Sequence[int], n_classes: int, *, noise_rate: float = 0.0, seed: int = 0,
                 ids: Sequence[int] | None = None, noise_kind: str = "uniform", unsure_rate: float = 0.0) -> None:
        if not 0.0 <= noise_rate <= 1.0:
            raise ConfigError(f"noise_rate must be in [0, 1], got {noise_rate}")
        if noise_kind not in NOISE_KINDS:
            raise ConfigError(f"noise_kind must be one of {', '.join(NOISE_KINDS)}, got {noise_kind!r}")
        if not 0.0 <= unsure_rate < 1.0:
            raise ConfigError(f"unsure_rate must be in [0, 1) (1 would never answer), got {unsure_rate}")
        if n_classes < 2 and noise_rate > 0:
            raise ConfigError(f"label noise needs at least 2 classes, got {n_classes}")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        ids = np.arange(len(labels)) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != len(labels):
            raise ConfigError(f"SimulatedOracle got {len(ids)} ids for {len(labels)} labels")
        answers: list = labels.tolist()
        if noise_rate > 0:
            rng = np.random.default_rng(seed)
            flip = rng.random(len(labels)) < noise_rate
            if noise_kind == "uniform":
                shift = rng.integers(1, n_classes, size=len(labels))  # never the true class
            else:
                shift = np.where(rng.integers(0, 2, size=len(labels)) == 0, 1, n_classes - 1)
            answers = np.where(flip, (labels + shift) % n_classes, labels).tolist()
        if unsure_rate > 0:
            unsure = np.random.default_rng([seed, 1]).random(len(labels)) < unsure_rate
            answers = [UNSURE if u else a for a, u in zip(answers, unsure.tolist())]
        self._answers = dict(zip(ids.tolist(), answers))
        self.noise_rate, self.noise_kind, self.unsure_rate = noise_rate, noise_kind, unsure_rate
        if noise_rate > 0 or unsure_rate > 0:
            parts = ([f"noise={noise_rate:g}" + ("" if noise_kind == "uniform" else f" {noise_kind}")]
                     if noise_rate > 0 else []) + ([f"unsure={unsure_rate:g}"] if unsure_rate > 0 else [])
            self.name = f"simulated({', '.join(parts)})"

    def label(self, ids: Sequence[int]) -> dict[int, int | None]:
        try:
            return {int(i): self._answers[int(i)] for i in ids}
        except KeyError as exc:
            raise UnknownSampleError(f"the simulated oracle has no ground truth for sample id {exc.args[0]}") from None


class ShardedOracle(Oracle):
    """Several oracles, each answering for its own samples: the pooled view of many sites' readers.

    The centralized reference of a federated comparison pools every site's samples; its labels must come from
    the same (noisy) readers the sites have, so each sample is answered by its own site's oracle.

    Parameters
    ----------
    oracles : sequence of Oracle
        One oracle per shard, each taking shard-local ids ``0 .. size - 1``.
    sizes : sequence of int
        Number of samples of each shard; global id ``offset + i`` is shard-local id ``i``.
    """

    def __init__(self, oracles: Sequence[Oracle], sizes: Sequence[int]) -> None:
        if len(oracles) != len(sizes) or not oracles:
            raise ConfigError(f"ShardedOracle needs one size per oracle, got {len(oracles)} oracles, {len(sizes)} sizes")
        self._oracles = list(oracles)
        self._ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
        names = sorted({o.name for o in oracles})
        self.name = names[0] if len(names) == 1 else "sharded(" + ", ".join(names) + ")"

    def label(self, ids: Sequence[int]) -> dict[int, int | None]:
        ids = [int(i) for i in ids]
        if any(i < 0 or i >= self._ends[-1] for i in ids):
            bad = next(i for i in ids if i < 0 or i >= self._ends[-1])
            raise UnknownSampleError(f"sample id {bad} is outside the {int(self._ends[-1])} samples of the shards")
        shard = np.searchsorted(self._ends, ids, side="right")
        out: dict[int, int | None] = {}
        for s in np.unique(shard).tolist():
            start = 0 if s == 0 else int(self._ends[s - 1])
            mine = [i for i, k in zip(ids, shard.tolist()) if k == s]
            answers = self._oracles[s].label([i - start for i in mine])
            out.update({i: answers[i - start] for i in mine if i - start in answers})
        return out


class VerifyingOracle(Oracle):
    """A second reading where the first answer disagrees with a confident model (a noise-robust measure).

    Each answer of ``first`` is compared with the model's prediction; where the model predicts another class
    with probability at least ``threshold``, the sample goes to ``second`` (a second reader, a senior) and its
    answer is kept. Every second reading costs one more answer: :attr:`verifications` counts them.

    Parameters
    ----------
    first, second : Oracle
        The usual reader and the reviewer.
    predict : callable
        ``predict(ids) -> (classes, confidences)`` of the current model for those sample ids, or ``None`` when
        there is no trained model yet (then nothing is reviewed).
    threshold : float
        Confidence in (0, 1] above which a disagreement is reviewed.
    """

    def __init__(self, first: Oracle, second: Oracle, predict, threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"verify threshold must be in (0, 1], got {threshold}")
        self.first, self.second, self.predict, self.threshold = first, second, predict, threshold
        self.name = first.name
        self.verifications = 0

    def label(self, ids: Sequence[int]) -> dict[int, int | None]:
        answers = dict(self.first.label(ids))
        answered = [i for i, a in answers.items() if a is not UNSURE]
        guess = self.predict(answered) if answered else None
        if guess is None:
            return answers
        classes, confidence = (np.asarray(g).reshape(-1) for g in guess)
        doubtful = [i for i, c, p in zip(answered, classes.tolist(), confidence.tolist())
                    if p >= self.threshold and c != answers[i]]
        if doubtful:
            second = self.second.label(doubtful)
            self.verifications += len(second)
            answers.update(second)
        return answers
