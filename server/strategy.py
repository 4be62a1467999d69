"""Flower strategies extended with per-client query budgets.

:func:`make_strategy` takes one of Flower's own message-based strategies by name and
subclasses it: ``configure_train`` keeps the parent's node sampling and messages and
adds each node's budget (Flower sends one shared config to all nodes);
``aggregate_train`` records what each client reported, drops failed or corrupted
updates, then lets the parent aggregate. Aggregation itself is never re-implemented.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedal.budget import BudgetCoordinator, ClientStats
from fedal.config import FederationConfig
from fedal.flower import protocol

log = logging.getLogger("fedal.server")

BASES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM,
    "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
}
_SUMS = ("num-examples", "budget", "queries-used", "labels-added", "unlabeled-left", "pending")


def aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Sum counts over clients; weight means (loss, uncertainty) by labeled count."""
    metrics = [c[protocol.METRICS] for c in contents]
    out: dict[str, float | int] = {k: int(sum(m[k] for m in metrics)) for k in _SUMS}
    for key in ("train-loss", "mean-uncertainty"):
        vals = [(m[key], m[weight_key]) for m in metrics if m[key] >= 0]  # -1 = not measured
        out[key] = sum(v * w for v, w in vals) / max(sum(w for _, w in vals), 1) if vals else -1.0
    out["clients"] = len(metrics)
    return MetricRecord(out)


def reply_problem(content: RecordDict, metric_keys: tuple[str, ...], *, arrays: bool) -> str | None:
    """Why a reply's records are not what :mod:`fedal.flower.protocol` defines, or None.

    Exactly one ``metrics`` MetricRecord with the protocol's keys, all finite scalars,
    and (``arrays``) one ``arrays`` ArrayRecord.
    """
    expected = {protocol.METRICS: MetricRecord, **({protocol.ARRAYS: ArrayRecord} if arrays else {})}
    names = sorted(content.keys())
    if names != sorted(expected):
        return f"records {names}, expected {sorted(expected)}"
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            return f"record {name!r} is a {type(content[name]).__name__}, expected a {kind.__name__}"
    metrics = content[protocol.METRICS]
    if sorted(metrics.keys()) != sorted(metric_keys):
        return f"metrics {sorted(metrics.keys())}, expected {sorted(metric_keys)}"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key!r} is {value!r}, not a finite number"
    return None


def error_summary(reason: str, limit: int = 300) -> str:
    """The telling part of a client error (Flower's reason holds the whole remote traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    last = lines[-1] if lines else str(reason)
    if "Message: " in last:
        last = last.split("Message: ", 1)[1]
    last = last.removesuffix("'>").strip() or str(reason).strip()
    return last if len(last) <= limit else last[: limit - 3] + "..."


@dataclass
class RoundLog:
    """What the server saw of the clients in one round (aggregate scalars only)."""

    reports: dict[int, protocol.TrainReport] = field(default_factory=dict)  # node id -> report
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason
    rejected: dict[int, str] = field(default_factory=dict)  # node id -> why the update was dropped


def make_strategy(cfg: FederationConfig, coordinator: BudgetCoordinator, reference: dict[str, tuple]) -> Strategy:
    """A Flower strategy (by ``cfg.aggregation``) that gives each client its own budget.

    Parameters
    ----------
    cfg : FederationConfig
        Run settings (aggregation name, sampling, FedProx / server optimiser values).
    coordinator : BudgetCoordinator
        Decides budgets from the clients' reported statistics.
    reference : dict
        Model keys -> shapes: updates that do not match are rejected.
    """
    base = BASES[cfg.aggregation]
    kwargs: dict = dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
                        min_train_nodes=cfg.min_clients, min_evaluate_nodes=cfg.min_clients,
                        min_available_nodes=cfg.min_clients, train_metrics_aggr_fn=aggregate_train_metrics)
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.proximal_mu
    elif base is FedAdam:
        kwargs["eta"] = cfg.server_lr
    elif base is FedAvgM:
        kwargs["server_learning_rate"] = 1.0
        kwargs["server_momentum"] = cfg.server_momentum
    elif base is Krum:
        kwargs["num_malicious_nodes"] = 0
    cls = type(f"Budgeted{base.__name__}", (_BudgetMixin, base), {})
    strategy = cls(**kwargs)
    strategy.setup_budgets(cfg, coordinator, reference)
    if cfg.dp_clipping_norm > 0:  # differential privacy wraps the budgeted strategy
        from server.dp import make_private

        return make_private(strategy, cfg)
    return strategy


class _BudgetMixin:
    """Per-node budgets on top of a Flower strategy (see module docstring)."""

    def setup_budgets(self, cfg: FederationConfig, coordinator: BudgetCoordinator, reference: dict) -> None:
        self.cfg = cfg
        self.coordinator = coordinator
        self.reference = reference
        self.stats: dict[int, ClientStats] = {}  # node id -> last reported aggregate stats
        self.client_of: dict[int, int] = {}  # node id -> client id it reported
        self.sent: dict[int, int] = {}  # node id -> budget sent this round
        self.rounds: dict[int, RoundLog] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        query = self.cfg.is_query_round(server_round)
        if query:
            stats = {str(n): self.stats.get(n, ClientStats()) for n in nodes}
            budgets = {int(n): b for n, b in self.coordinator.allocate(server_round, stats).items()}
        else:
            budgets = {n: 0 for n in nodes}
        self.sent = budgets
        self.rounds[server_round] = RoundLog()
        return [protocol.with_node_config(m, {protocol.QUERY_BUDGET: budgets[m.metadata.dst_node_id],
                                              protocol.QUERY_ROUND: query}) for m in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        good = self.screen_replies(server_round, replies)
        if not good:
            return None, None
        return super().aggregate_train(server_round, good)

    def aggregate_screened(self, server_round: int, good: list[Message]):
        """The parent strategy's aggregation of replies :meth:`screen_replies` let through
        (what a wrapper such as :mod:`server.dp` calls after its own step)."""
        return super().aggregate_train(server_round, good)

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Record each reply's report and budget spend; return the updates fit to aggregate
        (failed, malformed and corrupted ones are logged in ``rounds[server_round]`` and dropped)."""
        replies = list(replies)
        rlog = self.rounds.setdefault(server_round, RoundLog())
        query = self.cfg.is_query_round(server_round)
        good = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rlog.failed[node] = error_summary(msg.error.reason)
                continue
            problem = reply_problem(msg.content, protocol.TRAIN_METRICS, arrays=True)
            if problem:  # Flower's aggregation would raise on it and stop the whole run
                rlog.rejected[node] = problem
                log.warning("round %d: reply of node %d rejected: %s", server_round, node, problem)
                if query:  # it was asked and answered: count its budget as spent, carry nothing
                    self.coordinator.record_spent(server_round, str(node), self.sent.get(node, 0))
                continue
            report = protocol.TrainReport.from_record(msg.content[protocol.METRICS])
            reason = protocol.check_update(msg.content[protocol.ARRAYS], self.reference)
            self.client_of[node] = int(report.client_id)
            self.stats[node] = ClientStats(report.unlabeled_left, report.mean_uncertainty
                                           if report.mean_uncertainty >= 0 else float("nan"))
            rlog.reports[node] = report
            if query:
                self.coordinator.record_spent(server_round, str(node), min(int(report.queries_used), self.sent.get(node, 0)))
            if reason:
                rlog.rejected[node] = reason
                log.warning("round %d: update of client %s (node %d) rejected: %s",
                            server_round, report.client_id, node, reason)
                continue
            if report.num_examples <= 0:
                # no label yet (its people have not answered): the model came back unchanged with
                # weight 0; leave it out (a round of only such updates would divide by zero)
                log.info("round %d: client %s has no labels yet; its update is not aggregated",
                         server_round, report.client_id)
                continue
            # same keys in the model's order: Krum and the DP clipping pair arrays by position
            arrays = msg.content[protocol.ARRAYS]
            msg.content[protocol.ARRAYS] = ArrayRecord({k: arrays[k] for k in self.reference})
            good.append(msg)
        for node in self.sent:
            if node not in rlog.reports and node not in rlog.rejected:
                rlog.failed.setdefault(node, "no reply before the round timeout")
                if query:
                    self.coordinator.record_spent(server_round, str(node), None, failed=True)
        for node, reason in rlog.failed.items():
            log.warning("round %d: node %d left out: %s", server_round, node, reason)
        # replies come in the order the clients finished; aggregating them in client order makes
        # the floating-point sums, and so a rerun with the same seed, the same
        good.sort(key=lambda m: self.client_of[m.metadata.src_node_id])
        return good

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        good = []
        for msg in replies:
            problem = None if msg.has_error() else reply_problem(msg.content, protocol.EVAL_METRICS, arrays=False)
            if problem is None and not msg.has_error() and msg.content[protocol.METRICS][protocol.WEIGHT_KEY] <= 0:
                problem = "no local test samples"  # weight 0: nothing to average (all zero would divide by 0)
            if problem:
                log.warning("round %d: evaluation reply of node %d ignored: %s", server_round,
                            msg.metadata.src_node_id, problem)
                continue
            good.append(msg)
        return super().aggregate_evaluate(server_round, good) if good else None
