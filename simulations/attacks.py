"""Attacks on the head pipeline's releases over a whole run, as a curious server or a curious site would try them.

:func:`observe` runs a federation in one process with fedal's own parts: every site is a
:class:`clients.site.ClientSite` (its database, its oracle, its own noise), each round's replies are what
the sites' train function returns, under secure aggregation encoded by each site with the run's
:class:`fedal.secure.FixedPoint` (its noise share added there) and summed as integers, which is what
Flower's SecAgg+ unmasks, and the server is :class:`server.head.StatisticsAggregation`. It records what the
server sees each round (every reply in the clear, the decoded sum under secure aggregation), what every site
is sent back (the global statistics), what each site knows of its own contribution, and the ground truth:
each site's labeled feature vectors.

The attacks (docs/PRIVACY.md, threat model):

* :func:`server_difference`: the server subtracts consecutive sums; where a class grew by one label, the
  difference of its sums is that label's feature vector.
* :func:`site_difference`: a site subtracts consecutive global statistics and its own contribution; where
  another site's class grew by one, the rest is that label's vector.
* :func:`dropout_difference`: under secure aggregation, a round's sum less the next round's, where one site
  dropped out and nobody labeled anything new, is that site's statistics; its classes with one label give the
  vector.
* :func:`eigen_split`: where one site's class grew by two labels ``a`` and ``b`` between its replies, the
  differences of its sums and scatter are ``a + b`` and ``aa' + bb'``: the top eigenvector of
  ``S - ss'/2`` is ``(a - b) / sqrt 2``, which splits them.

Each returns :class:`Recovery`: the candidates it made and how many labeled samples they hit, exactly
(distance at most ``1e-6 C``) or within ``tolerance``.

Usage::

    python -m simulations.attacks                      # every attack, protection off and on, digits
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: a candidate this close (relative to the clip norm) to a labeled sample's feature vector recovers it exactly
EXACT = 1e-6


@dataclass
class Observed:
    """What one run released, round by round (see the module docstring)."""

    cfg: object
    clip_norm: float
    #: round -> client -> the arrays of its reply as the server received it (the clear) or as it sent it for
    #: encoding (secure: the server never holds them)
    replies: dict[int, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    #: round -> the decoded secure sum of that round's replies (secure aggregation only)
    sums: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    #: round -> the clients whose reply is in that round's sum / were received
    present: dict[int, list[int]] = field(default_factory=dict)
    #: round -> the global statistics the server sends every site after that round's aggregation
    global_stats: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    #: round -> client -> what the site itself added to the sum: its reply and its noise share (secure, private)
    own: dict[int, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    #: client -> its labeled samples' clipped feature vectors (the ground truth the attacks are scored on)
    truth: dict[int, np.ndarray] = field(default_factory=dict)
    #: round -> the global head's accuracy on the federation's test set (with ``evaluate``)
    accuracy: dict[int, float] = field(default_factory=dict)
    #: round -> labels the sites hold in all
    labels: dict[int, int] = field(default_factory=dict)

    @property
    def secure(self) -> bool:
        return bool(self.cfg.secure_aggregation)

    @property
    def private(self) -> bool:
        return bool(self.cfg.head_private)

    def all_truth(self) -> np.ndarray:
        return np.concatenate([v for v in self.truth.values() if len(v)]) if self.truth else np.zeros((0, 1))


@dataclass(frozen=True)
class Recovery:
    """An attack's result: ``candidates`` it made, labeled samples recovered ``exact`` (within ``1e-6 C``) and
    within the run's ``tolerance``, and the median distance of a candidate to its nearest labeled sample."""

    attack: str
    candidates: int
    exact: int
    close: int
    median_distance: float

    def row(self) -> str:
        return (f"| {self.attack} | {self.candidates} | {self.exact} | {self.close} | "
                f"{self.median_distance:.3g} |")


def observe(settings: dict, rounds: int, drop: dict[int, Iterable[int]] | None = None,
            work: Path | None = None, evaluate: bool = False) -> Observed:
    """Run the federation of ``settings`` (fedal setting names) for ``rounds`` rounds in this process and record
    what it released. ``drop``: round -> clients that do not reply in it (after sharing keys, under secure
    aggregation: the others' sum is decoded without them); ``evaluate``: record the global head's test accuracy."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: getattr(TaskIdentity, name) for name in ("_run_id", "_node_id", "_task_id")}
    for name, value in saved.items():  # outside a Flower process nobody set the identity a Message is stamped with
        if value is None:
            setattr(TaskIdentity, name, 0)
    try:
        return _observe(settings, rounds, drop, work, evaluate)
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


def _observe(settings: dict, rounds: int, drop: dict[int, Iterable[int]] | None, work: Path | None,
             evaluate: bool) -> Observed:
    from flwr.app import Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.config import FederationConfig
    from fedal.dp import run_noise
    from fedal.features import featurizer_for, model_inputs
    from fedal.federation import client_data, federation_dataset
    from fedal.flower import protocol
    from fedal.messages import TrainInstruction
    from fedal.models import model_for, secure_codec
    from server.head import StatisticsAggregation

    work = Path(work or tempfile.mkdtemp(prefix="fedal-attack-"))
    cfg = FederationConfig.from_mapping({**settings, "rounds": rounds, "output-dir": str(work / "server")})
    drop = {int(r): set(c) for r, c in (drop or {}).items()}
    nodes = [NodeConfig.from_mapping({"client-id": c, "state-dir": str(work / f"site-{c}"), "oracle": "simulated"})
             for c in range(cfg.clients)]
    datas = [client_data(cfg, c) for c in range(cfg.clients)]
    first = ClientSite(cfg, nodes[0], datas[0])
    model = model_for(cfg, first.X_pool.shape[1:], first.data.n_classes, seed=cfg.seed, raw_shape=first.data.input_shape)
    first.close()
    server = StatisticsAggregation(FedAvg(), model, run_noise(cfg, model.n_classes, model.dim),
                                   release_growth=cfg.head_dp_release_growth)
    obs = Observed(cfg, cfg.head_clip_norm or float("inf"))
    budget = cfg.round_budget // cfg.clients
    test = None
    for server_round in range(1, rounds + 1):
        state = model.get_state()
        query = server_round > 1 and cfg.is_query_round(server_round)
        replies, own, present = {}, {}, []
        release = True
        if cfg.head_private:  # as the server's strategy decides it (server.strategy.BudgetedStrategy)
            held = sum(len(v) for v in obs.truth.values())
            coming = held + (budget * cfg.clients if query else (cfg.initial_labels * cfg.clients if not held else 0))
            release = server.plan_release(server_round, coming, server_round == rounds)
        sent_stats = protocol.state_from_record(server.global_stats) if server.global_stats is not None else None
        codec = None
        if cfg.secure_aggregation:
            codec = secure_codec(cfg, model, centre=server.centre() if cfg.head_private else None)
        for c, node in enumerate(nodes):
            if c in drop.get(server_round, ()):
                continue
            site = ClientSite(cfg, node, datas[c])
            included = server.included_for(c) if cfg.head_private else None
            arrays, report = site.train(state, TrainInstruction(server_round, budget if query else 0,
                                                                dp_included=included, dp_release=release),
                                        global_stats=sent_stats)
            ids, _ = site.pool.labels()
            obs.truth[c] = site.model._features(site.X_pool[site.learner.rows(ids)]) if len(ids) else np.zeros((0, 1))
            if codec is not None:
                noise: dict[str, np.ndarray] = {}
                limbs = site.secure_codec().encode(arrays, state, report.num_examples, noise_out=noise)
                own[c] = {"reply": {k: np.asarray(v, np.float64) for k, v in arrays.items()}, "noise": noise,
                          "limbs": limbs, "weight": report.num_examples}
            else:
                own[c] = {"reply": {k: np.asarray(v, np.float64) for k, v in arrays.items()}, "noise": {}}
            replies[c] = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
            present.append(c)
            site.close()
        obs.replies[server_round], obs.own[server_round] = replies, own
        obs.present[server_round] = present
        if codec is not None:  # what SecAgg+ unmasks: the integer sum of the present sites' limbs
            limb_sums = [sum(own[c]["limbs"][i] for c in present) for i in range(len(own[present[0]]["limbs"]))]
            reference = {k: np.zeros(np.shape(v)) for k, v in replies[present[0]].items()}
            total = codec.decode(limb_sums, reference, sum(own[c]["weight"] for c in present))
            obs.sums[server_round] = {k: np.asarray(v, np.float64) for k, v in total.items()}
            full = len(present) == cfg.clients
            if cfg.head_private or full:  # a clear-statistics secure run aggregates full rounds only
                msg = Message(RecordDict({protocol.ARRAYS: protocol.model_record(total),
                                          protocol.METRICS: MetricRecord({protocol.WEIGHT_KEY: 1})}),
                              dst_node_id=0, message_type=MessageType.TRAIN)
                result, _ = server.aggregate_train(server_round, [msg], contributors=len(present), clients=present)
                if result is not None:
                    model.set_state(protocol.state_from_record(result))
        else:
            msgs = [Message(RecordDict({protocol.ARRAYS: protocol.model_record(replies[c]),
                                        protocol.METRICS: MetricRecord({protocol.CLIENT_ID: c})}),
                            dst_node_id=0, message_type=MessageType.TRAIN) for c in present]
            result, _ = server.aggregate_train(server_round, msgs)
            if result is not None:
                model.set_state(protocol.state_from_record(result))
        if server.global_stats is not None:
            obs.global_stats[server_round] = protocol.state_from_record(server.global_stats)
        obs.labels[server_round] = int(sum(len(v) for v in obs.truth.values()))
        if evaluate:
            if test is None:
                ds = federation_dataset(cfg)
                test = (model_inputs(featurizer_for(cfg.features, ds.input_shape, cfg.pipeline), ds.X_test), ds.y_test)
            obs.accuracy[server_round] = float(model.evaluate(*test)[1])
    return obs


# ----------------------------------------------------------------------------- scoring
def score(name: str, candidates: list[np.ndarray], truth: np.ndarray, clip_norm: float,
          tolerance: float) -> Recovery:
    """How many distinct labeled samples of ``truth`` the ``candidates`` hit, exactly and within ``tolerance``."""
    if not candidates or not len(truth):
        return Recovery(name, len(candidates), 0, 0, float("nan"))
    exact, close, distances = set(), set(), []
    scale = clip_norm if np.isfinite(clip_norm) else max(float(np.max(np.linalg.norm(truth, axis=1))), 1.0)
    for x in candidates:
        d = np.linalg.norm(truth - x[None, :], axis=1)
        nearest = int(np.argmin(d))
        distances.append(float(d[nearest]))
        if d[nearest] <= EXACT * scale:
            exact.add(nearest)
        if d[nearest] <= tolerance:
            close.add(nearest)
    return Recovery(name, len(candidates), len(exact), len(close), float(np.median(distances)))


def _labeled(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(arrays["stats.counts"], np.float64), np.asarray(arrays["stats.sums"], np.float64)


def server_view(obs: Observed) -> dict[int, dict[str, np.ndarray]]:
    """Round -> the labels' statistics the server holds after it: the decoded sum (secure; in a private run the
    running total of the sums it received, which is all it has), or the sum of every site's last reply (clear; in a
    private run the running total of the replies, each an increment)."""
    out, total, last = {}, {}, {}
    for r in sorted(obs.replies):
        if obs.secure:
            if r not in obs.sums:
                continue
            received = [obs.sums[r]]
        else:
            received = list(obs.replies[r].values())
            last.update(obs.replies[r])
        if obs.private:
            for arrays in received:
                total = {k: total.get(k, 0.0) + v for k, v in arrays.items()}
            out[r] = dict(total)
        elif obs.secure:  # a clear-statistics sum holds every site's whole statistics
            out[r] = obs.sums[r]
        else:  # a clear reply is the site's whole statistics
            out[r] = {k: sum(reply[k] for reply in last.values()) for k in next(iter(last.values()))}
    return out


def _singletons(before: dict, after: dict, offset: np.ndarray | float = 0.0) -> list[np.ndarray]:
    """The vectors of the classes whose count grew by one between two views of the labels' statistics (``offset``
    added back: a private run's labels are centred on a mean everyone is sent)."""
    if "stats.counts" not in after:
        return []
    n0, s0 = _labeled(before) if "stats.counts" in before else (0.0, 0.0)
    n1, s1 = _labeled(after)
    grown = np.rint(n1 - n0)
    return [(s1 - s0)[c] + offset for c in np.flatnonzero(grown == 1)]


def centre_of(obs: Observed) -> np.ndarray | float:
    """The centre a private run's labels are sent around (public to the server and the sites), else 0."""
    for stats in obs.global_stats.values():
        if "centre.mean" in stats:
            return np.asarray(stats["centre.mean"], np.float64)
    return 0.0


def tolerance(obs: Observed) -> float:
    """The distance under which a candidate counts as close: a tenth of the clip norm (a candidate that near a labeled
    vector tells it apart from any other sample of digits; noise of the private run keeps candidates far above it)."""
    return 0.1 * obs.clip_norm if np.isfinite(obs.clip_norm) else 0.1


def server_difference(obs: Observed) -> Recovery:
    """The server's difference of consecutive views, for every class that grew by one label."""
    view = server_view(obs)
    rounds = sorted(view)
    candidates = [x for a, b in zip(rounds, rounds[1:]) for x in _singletons(view[a], view[b], centre_of(obs))]
    return score("server: difference of two rounds' sums", candidates, obs.all_truth(), obs.clip_norm, tolerance(obs))


def site_difference(obs: Observed, attacker: int = 0) -> Recovery:
    """Site ``attacker``'s difference of consecutive global statistics, less its own contribution, for every class
    of the others that grew by one label; scored on the other sites' labels."""
    rounds = sorted(obs.global_stats)
    candidates = []
    for a, b in zip(rounds, rounds[1:]):
        if "stats.counts" not in obs.global_stats[b]:
            continue
        diff = {k: obs.global_stats[b][k] - obs.global_stats[a].get(k, 0.0) for k in ("stats.counts", "stats.sums")}
        mine = obs.own.get(b, {}).get(attacker)
        if mine is not None:  # what it added in round b: in the clear all of its (noisy) reply; secure: + its share
            if obs.private:
                own_counts = mine["reply"]["stats.counts"] + mine["noise"].get("stats.counts", 0.0)
                own_sums = mine["reply"]["stats.sums"] + mine["noise"].get("stats.sums", 0.0).reshape(
                    mine["reply"]["stats.sums"].shape) if "stats.sums" in mine["noise"] else mine["reply"]["stats.sums"]
            else:  # its reply holds all of its labels; the difference of its own two replies is what it added
                before = obs.own.get(a, {}).get(attacker)
                own_counts = mine["reply"]["stats.counts"] - (before["reply"]["stats.counts"] if before else 0.0)
                own_sums = mine["reply"]["stats.sums"] - (before["reply"]["stats.sums"] if before else 0.0)
            diff = {"stats.counts": diff["stats.counts"] - own_counts, "stats.sums": diff["stats.sums"] - own_sums}
        grown = np.rint(diff["stats.counts"])
        candidates += [diff["stats.sums"][c] + centre_of(obs) for c in np.flatnonzero(grown == 1)]
    others = np.concatenate([v for c, v in obs.truth.items() if c != attacker and len(v)])
    return score(f"site {attacker}: difference of two rounds' global statistics", candidates, others, obs.clip_norm,
                 tolerance(obs))


def dropout_difference(obs: Observed) -> Recovery:
    """A round's sum less the next one's, where a site dropped out of the next: the dropped site's statistics;
    its classes with one label give vectors. Uses what the server received in each round (secure sums)."""
    candidates = []
    rounds = sorted(obs.sums)
    for a, b in zip(rounds, rounds[1:]):
        gone = set(obs.present[a]) - set(obs.present[b])
        if len(gone) != 1 or set(obs.present[b]) - set(obs.present[a]):
            continue
        diff = {k: obs.sums[a][k] - obs.sums[b][k] for k in ("stats.counts", "stats.sums")}
        counts = np.rint(diff["stats.counts"])
        candidates += [diff["stats.sums"][c] + centre_of(obs) for c in np.flatnonzero(counts == 1)]
    return score("server: a sum less the next, one site dropped", candidates, obs.all_truth(), obs.clip_norm,
                 tolerance(obs))


def eigen_split(obs: Observed) -> Recovery:
    """For each site, consecutive replies where exactly one class grew by two: ``a + b`` from the sums, ``aa' + bb'``
    from the scatter, split by the top eigenvector of ``S - ss'/2`` (in the clear, where the server holds each
    site's reply; a private reply carries no labels' scatter, so nothing is split)."""
    candidates = []
    if not obs.secure:
        rounds = sorted(obs.replies)
        for a, b in zip(rounds, rounds[1:]):
            for c, reply in obs.replies[b].items():
                before = obs.replies[a].get(c)
                if before is None or "stats.scatter" not in reply:
                    continue
                dn = np.rint(reply["stats.counts"] - before["stats.counts"])
                if sorted(dn[dn != 0].tolist()) != [2.0]:
                    continue
                k = int(np.flatnonzero(dn)[0])
                s = reply["stats.sums"][k] - before["stats.sums"][k]
                S = reply["stats.scatter"] - before["stats.scatter"]
                values, vectors = np.linalg.eigh(S - np.outer(s, s) / 2.0)
                d = vectors[:, -1] * np.sqrt(max(2.0 * values[-1], 0.0))  # a - b
                candidates += [(s + d) / 2.0, (s - d) / 2.0]
    return score("server: eigen-split of a class grown by two", candidates, obs.all_truth(), obs.clip_norm,
                 tolerance(obs))


#: the attacks' settings: digits, 4 sites, one label per site per query round (the hardest case to hide)
BASE = {"dataset": "digits", "clients": 4, "min-clients": 4, "initial-labels": 5, "round-budget": 4, "seed": 0,
        "head-clip-norm": 4.0, "strategy": "random"}
PRIVATE = {"head-dp-epsilon": 8.0}


def run_all(rounds: int = 6, epsilon: float = 8.0) -> list[tuple[str, Recovery, Recovery]]:
    """Every attack on its own run, protection off (the settings it was found with) and on (``head-dp-epsilon``)."""
    private = {"head-dp-epsilon": epsilon}
    secure = {"secure-aggregation": True}
    drop = {rounds - 1: [1]}  # the attack needs a round with no new labels: round rounds-1 is not a query round
    no_query_then_drop = {"query-every": 2}
    out = []
    for name, attack, off, on, extra in (
            ("server difference", server_difference, secure, {**secure, **private}, {}),
            ("site difference", site_difference, secure, {**secure, **private}, {}),
            ("dropout difference", dropout_difference, {**secure, **no_query_then_drop},
             {**secure, **private, **no_query_then_drop}, {"drop": drop}),
            ("eigen-split", eigen_split, {"min-class-count": 2}, private, {})):
        before = attack(observe({**BASE, **off}, rounds, **extra))
        after = attack(observe({**BASE, **on}, rounds, **extra))
        out.append((name, before, after))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--epsilon", type=float, default=8.0)
    args = p.parse_args(argv)
    print("| attack | protection | candidates | exact | within 0.1 C | median distance |")
    print("|---|---|---:|---:|---:|---:|")
    for name, before, after in run_all(args.rounds, args.epsilon):
        for label, r in (("off", before), (f"on (epsilon {args.epsilon:g})", after)):
            print(f"| {name} | {label} | {r.candidates} | {r.exact} | {r.close} | {r.median_distance:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
