"""What the server asks of a site and what the site reports back, as plain data.

No Flower here, so a site (and its labeling page) works without the federation stack;
:mod:`fedal.flower.protocol` turns these into the messages that cross the network and
back, and parses them on the other side. Every report field is a count or a mean over
the site's own data: no sample id, no per-sample label, no input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fedal.exceptions import ProtocolError

#: the config key of each instruction field
INSTRUCTION_KEYS = {"server_round": "server-round", "query_budget": "query-budget", "proximal_mu": "proximal-mu",
                    "lr_factor": "lr-factor", "offline_budget": "offline-budget", "dp_included": "dp-included",
                    "dp_release": "dp-release"}
#: keys a train message may leave out (their defaults apply)
OPTIONAL_INSTRUCTION_KEYS = ("proximal_mu", "lr_factor", "offline_budget", "dp_included", "dp_release")

#: the reply metric of each field (kebab-case, as Flower metrics are named)
REPORT_KEYS = {
    "num_examples": "num-examples",          # labeled samples trained on (the aggregation weight)
    "client_id": "client-id",                # the site's own index (not a sample id)
    "queries_used": "queries-used",          # labels requested in this round (<= its budget)
    "labels_added": "labels-added",          # answers recorded since the last round
    "unlabeled_left": "unlabeled-left",      # unlabeled pool size after the queries
    "pending": "pending",                    # requests still waiting for an oracle answer
    "mean_uncertainty": "mean-uncertainty",  # mean normalised entropy of the pool (-1 = not measured)
    "train_loss": "train-loss",              # mean local training loss (-1 = not trained)
    "auto_labeled": "auto-labeled",          # pool samples self-training labeled this round (head pipeline)
    "auto_correct": "auto-labeled-correct",  # of those, right by the simulation's ground truth (-1 = unknown)
    "requests_made": "requests-made",        # label requests made so far (all rounds)
    "requests_answered": "requests-answered",  # of those, answered by the oracle
    "answer_seconds": "answer-seconds",      # median seconds from request to answer (-1 = none answered)
    "batch_diversity": "batch-diversity",    # this round's batch spread / a random batch's (-1 = not measured)
    "label_entropy": "label-entropy",        # class balance of the site's labels, 0..1 (-1 = no label)
    "labels_reviewed": "labels-reviewed",    # second readings so far (verify-threshold; 0 = none)
    "offline_spent": "offline-spent",        # labels asked while the server was away, not reported before
    "dp_releases": "dp-releases",            # private run: the most replies one of the site's samples was in (0 = none)
}
NOT_MEASURED = -1.0
#: the largest count a report may hold (a site's pool is far smaller; a larger one is a lie or a bug)
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class TrainInstruction:
    """What the server asks of one site in a training round.

    The budget is checked here, where it enters a site, and trusted after.

    Attributes
    ----------
    server_round : int
        The round (>= 1).
    query_budget : int
        Labels the site may ask its oracle for in this round (>= 0; 0 outside query rounds).
    proximal_mu : float
        FedProx's proximal weight (0 = plain local training).
    lr_factor : float
        This round's factor of the local learning rate (the server's ``lr-schedule``; 1 = the run's ``lr``).
    offline_budget : int
        Labels the site may ask for on its own if the server becomes unreachable after this round (the
        run's ``offline-budget``, granted in advance; 0 = none). It replaces any earlier grant.
    dp_included : tuple of int, optional
        Private run (:mod:`fedal.dp`): the rounds whose reply of this site the server added to its sums (on the
        wire a string of comma-separated rounds); None when the server does not know this site yet.
    dp_release : bool
        Private run: whether this round's reply carries the site's new labels (the server releases them on a
        schedule, :func:`fedal.dp.release_due`); the pool's statistics go in every reply until the sums hold them.
    """

    server_round: int
    query_budget: int
    proximal_mu: float = 0.0
    lr_factor: float = 1.0
    offline_budget: int = 0
    dp_included: tuple[int, ...] | None = None
    dp_release: bool = True

    def __post_init__(self) -> None:
        for name, low in (("server_round", 1), ("query_budget", 0), ("offline_budget", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProtocolError(f"the instruction's {INSTRUCTION_KEYS[name]} is {value!r}, not an integer >= {low}"
                                    + (" (the server sent a negative query budget)" if name != "server_round"
                                       and isinstance(value, int) and value < 0 else ""))
        mu = self.proximal_mu
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ProtocolError(f"the instruction's proximal-mu is {mu!r}, not a number >= 0")
        object.__setattr__(self, "proximal_mu", float(mu))
        f = self.lr_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f <= 1:
            raise ProtocolError(f"the instruction's lr-factor is {f!r}, not a number in [0, 1]")
        object.__setattr__(self, "lr_factor", float(f))
        included = self.dp_included
        if isinstance(included, str):
            try:
                included = tuple(int(r) for r in included.split(",") if r.strip())
            except ValueError:
                raise ProtocolError(f"the instruction's dp-included is {self.dp_included!r}, not rounds separated by "
                                    "commas") from None
        if included is not None:
            included = tuple(included)
            if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in included):
                raise ProtocolError(f"the instruction's dp-included is {self.dp_included!r}, not rounds >= 1")
        object.__setattr__(self, "dp_included", included)
        if self.dp_release not in (True, False, 0, 1):
            raise ProtocolError(f"the instruction's dp-release is {self.dp_release!r}, not 0 or 1")
        object.__setattr__(self, "dp_release", bool(self.dp_release))

    @classmethod
    def from_config(cls, config: dict) -> "TrainInstruction":
        """Parse a train message's config (extra keys, such as a DP clipping norm, are left to
        whoever reads them); :class:`ProtocolError` names a missing key."""
        missing = [key for name, key in INSTRUCTION_KEYS.items()
                   if key not in config and name not in OPTIONAL_INSTRUCTION_KEYS]
        if missing:
            raise ProtocolError(f"the train message has no {', '.join(map(repr, missing))} in its config "
                                f"(keys: {sorted(config)}); the server and this client run different fedal versions")
        return cls(config[INSTRUCTION_KEYS["server_round"]], config[INSTRUCTION_KEYS["query_budget"]],
                   config.get(INSTRUCTION_KEYS["proximal_mu"], 0.0), config.get(INSTRUCTION_KEYS["lr_factor"], 1.0),
                   config.get(INSTRUCTION_KEYS["offline_budget"], 0), config.get(INSTRUCTION_KEYS["dp_included"]),
                   config.get(INSTRUCTION_KEYS["dp_release"], 1))


@dataclass(frozen=True)
class TrainReport:
    """The aggregate scalars a site reports after a training round (see :data:`REPORT_KEYS`).

    Attributes: ``num_examples`` (labeled samples trained on), ``client_id``,
    ``queries_used`` (labels requested this round), ``labels_added`` (answers recorded),
    ``unlabeled_left``, ``pending`` (requests waiting for an answer), ``mean_uncertainty``
    (of the pool under the global model), ``train_loss``, ``auto_labeled`` (pool samples
    self-training labeled, head pipeline) and ``auto_correct`` (how many of those a simulation's
    ground truth confirms; -1 where the site has no ground truth), and the KPIs of
    :mod:`fedal.kpi`: ``requests_made`` and ``requests_answered`` (so far), ``answer_seconds``
    (median wait for an answer), ``batch_diversity`` (this round's batch against a random one)
    and ``label_entropy`` (class balance of the site's labels), ``labels_reviewed`` (second
    readings of answers a confident model disagreed with, so far), and ``offline_spent`` (labels the
    site asked for while the server was away and reports for the first time, against its offline budget), and in a
    private run ``dp_releases`` (the most releases one of its samples has been in, :mod:`fedal.dp`). Means that could not be measured (no trained model yet, no label to train on) are
    ``-1`` on the wire and ``NaN`` here.
    """

    num_examples: int
    client_id: int
    queries_used: int
    labels_added: int
    unlabeled_left: int
    pending: int
    mean_uncertainty: float
    train_loss: float
    auto_labeled: int = 0
    auto_correct: int = -1
    requests_made: int = 0
    requests_answered: int = 0
    answer_seconds: float = float("nan")
    batch_diversity: float = float("nan")
    label_entropy: float = float("nan")
    labels_reviewed: int = 0
    offline_spent: int = 0
    dp_releases: int = 0

    def problem(self) -> str | None:
        """Why this report cannot be a site's honest one on its own terms, or None: a count below 0 (``-1`` is
        ``auto-labeled-correct``'s "unknown"), above :data:`MAX_COUNT`, more answers than requests, more
        confirmed self-labels than self-labels, a share above 1. What it says against the server's own books
        (budgets granted) is checked by the server."""
        for f in fields(self):
            if f.type not in ("int", int):
                continue
            value, low = getattr(self, f.name), -1 if f.name == "auto_correct" else 0
            if not low <= value <= MAX_COUNT:
                return f"{REPORT_KEYS[f.name]} is {value}, not a count in [{low}, {MAX_COUNT}]"
        if self.requests_answered > self.requests_made:
            return (f"requests-answered ({self.requests_answered}) is more than requests-made "
                    f"({self.requests_made})")
        if self.auto_correct > self.auto_labeled:
            return f"auto-labeled-correct ({self.auto_correct}) is more than auto-labeled ({self.auto_labeled})"
        for name in ("mean_uncertainty", "label_entropy"):
            if getattr(self, name) > 1 + 1e-6:  # both are normalised to [0, 1]
                return f"{REPORT_KEYS[name]} is {getattr(self, name)}, not a share in [0, 1]"
        return None

    def to_metrics(self) -> dict[str, int | float]:
        """The report as wire metrics: ints for counts, finite floats for means (``-1`` = not measured)."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                out[REPORT_KEYS[f.name]] = int(value)
            else:
                value = float(value)
                out[REPORT_KEYS[f.name]] = value if math.isfinite(value) else NOT_MEASURED
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, int | float]) -> "TrainReport":
        """Parse wire metrics (a KeyError names a missing metric; ``-1`` means become NaN)."""
        values = {}
        for f in fields(cls):
            value = metrics[REPORT_KEYS[f.name]]
            if f.type in ("int", int):
                values[f.name] = int(value)
            else:
                values[f.name] = math.nan if value < 0 else float(value)
        return cls(**values)
