"""fedal's server strategy: per-client query budgets and screening, around any Flower strategy.

:class:`BudgetedStrategy` wraps (composes) one of Flower's message-based strategies,
as Flower's own DP wrappers do, and is configured in its constructor:

* ``configure_train`` keeps the inner strategy's node sampling and messages and gives
  each node its own query budget (Flower sends one shared config to all nodes); before a
  query round it asks a node it has not heard from yet which client it is;
* ``aggregate_train`` records each reply in the :class:`~server.book.RoundBook`, drops
  failed, malformed and corrupted ones, and lets the inner strategy aggregate the rest
  in client order;
* ``aggregate_evaluate`` drops unusable evaluation replies, the inner strategy averages.

Averaging is never re-implemented. :func:`make_strategy` builds the whole chain for a
run: ``BudgetedStrategy(FedAvg(...))`` for a network, ``BudgetedStrategy(PrivateAggregation
(FedAvg(...)))`` with differential privacy, ``BudgetedStrategy(StatisticsAggregation
(FedAvg(...)))`` for the head pipeline (the sites' statistics are summed, not averaged).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
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

from fedal.config import FederationConfig
from fedal.dp import run_noise
from fedal.flower import protocol
from fedal.models import HandoverClassifier, HeadClassifier
from server import handover
from fedal.messages import TrainReport
from server.book import RoundBook, RoundEvent
from server.dp import PrivateAggregation
from server.privacy import DISTRIBUTED
from server.handover import HandoverAggregation
from server.head import StatisticsAggregation

log = logging.getLogger("fedal.server")

AGGREGATIONS: dict[str, type[Strategy]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM,
    "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
}
#: seconds a node has to say which client it is
IDENTIFY_TIMEOUT_S = 120.0


def error_summary(reason: str, limit: int = 300) -> str:
    """The telling part of a client error (Flower's reason holds the whole remote traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    last = lines[-1] if lines else str(reason)
    if "Message: " in last:
        last = last.split("Message: ", 1)[1]
    if match := re.fullmatch(r"<class '([\w.]+)'>:<'?(.*?)'?>?", last):  # Flower 1.41: <class 'a.b.Error'>:<'why'>
        last = f"{match[1].rsplit('.', 1)[-1]}: {match[2]}"
    last = last.removesuffix("'>").strip() or str(reason).strip()
    return last if len(last) <= limit else last[: limit - 3] + "..."


class BudgetedStrategy(Strategy):
    """Per-client query budgets and reply screening around a Flower strategy (module docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples nodes and aggregates (possibly wrapped for DP).
    book : RoundBook
        Where identities, reports, budgets and problems are kept.
    reference : dict
        Model keys -> shapes: updates that do not match are rejected.
    is_query_round : callable
        ``server_round -> bool``: whether the round asks for labels.
    identify_timeout : float
        Seconds a node has to say which client it is.
    buffers : iterable of str
        Model keys that are statistics, not weights (BatchNorm's running statistics, a network's input
        statistics): the inner strategy never sees them (a server optimiser would step on them); they are
        the clients' example-weighted mean.
    lr_factor : callable, optional
        ``server_round -> factor`` of the learning rate (``lr-schedule``): it scales the step of the inner
        strategy's server optimiser (FedAdam's ``eta``) where it has one, else it goes to the clients with
        their instruction.
    eval_metrics : tuple of str
        The metrics of a usable evaluation reply.
    min_replies : int
        Fewest usable replies a round's aggregation needs (the run's ``min-clients``); a round with fewer keeps
        the global model, and an event says why.
    min_reply_fraction : float
        Share of the round's sampled nodes whose usable replies it needs as well (``min-reply-fraction``).
    full_rounds_only : bool
        Aggregate a secure round only when every sampled site is in the sum (secure aggregation of a head's
        statistics: a sum without a site would drop its classes from the head, and the difference of two sums
        would be that site's statistics).
    """

    def __init__(self, inner: Strategy, book: RoundBook, reference: dict[str, tuple[int, ...]],
                 is_query_round: Callable[[int], bool], *, identify_timeout: float = IDENTIFY_TIMEOUT_S,
                 buffers: Iterable[str] = (), lr_factor: Callable[[int], float] | None = None,
                 eval_metrics: tuple[str, ...] = protocol.EVAL_METRICS, min_replies: int = 1,
                 min_reply_fraction: float = 0.0, full_rounds_only: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.book = book
        self.reference = {k: tuple(v) for k, v in reference.items()}
        self.is_query_round = is_query_round
        self.identify_timeout = float(identify_timeout)
        self.buffers = tuple(k for k in buffers if k in self.reference)
        self.lr_factor = lr_factor
        self.eval_metrics = tuple(eval_metrics)
        self._optimiser = _server_optimiser(inner)
        self._base_eta = None if self._optimiser is None else float(self._optimiser.eta)
        self.min_replies = int(min_replies)
        self.min_reply_fraction = float(min_reply_fraction)
        self.full_rounds_only = bool(full_rounds_only)
        self._usable = 0  # usable replies of the round screen() last saw

    def replies_needed(self, sampled: int) -> int:
        """Usable replies a round of ``sampled`` nodes needs before it is aggregated."""
        return max(self.min_replies, math.ceil(self.min_reply_fraction * sampled - 1e-9))

    def too_few(self, server_round: int, usable: int) -> bool:
        """Whether ``usable`` replies are too few to aggregate ``server_round``; if so the book says why."""
        sampled = len(self.book.rounds[server_round].nodes)
        need = self.replies_needed(sampled)
        if usable >= need:
            return False
        self.book.not_aggregated(server_round, (
            f"{usable} usable repl{'y' if usable == 1 else 'ies'} of the {sampled} node(s) sampled; the run needs "
            f"{need} (min-clients {self.min_replies}, min-reply-fraction {self.min_reply_fraction:g}), so the "
            "round is not aggregated and the global model stays"))
        return True

    def summary(self) -> None:
        log.info("\t├──> per-client query budgets (fedal)")
        self.inner.summary()

    # ------------------------------------------------------------- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        factor = 1.0 if self.lr_factor is None else float(self.lr_factor(server_round))
        client_factor = factor
        if self._base_eta is not None and self.lr_factor is not None:  # the server optimiser takes the schedule
            self._optimiser.eta = self._base_eta * factor
            client_factor = 1.0
        weights = ArrayRecord({k: arrays[k] for k in arrays if k not in self.buffers}) if self.buffers else arrays
        messages = list(self.inner.configure_train(server_round, weights, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        query = self.is_query_round(server_round)
        makeup = not query and self.book.makeup_due()  # the labels of sites that failed the last query round
        if (query or makeup) and (unknown := self.book.unidentified(nodes)):
            self._identify(grid, unknown)
        budgets = self.book.open_round(server_round, nodes, query=query, makeup=makeup)
        out = [protocol.with_budget(m, budgets[m.metadata.dst_node_id], client_factor,
                                    self.book.offline_grant(server_round, m.metadata.dst_node_id)) for m in messages]
        if self.buffers:  # the clients get the whole model, statistics included
            for m in out:
                m.content[protocol.ARRAYS] = arrays
        heads = self._heads()
        if heads is not None and heads.noise is not None:  # each site learns which of its replies the sums hold
            labels = sum(self.book.labeled.values()) + sum(budgets.values())
            last = self.book.rounds_in_run is not None and server_round >= self.book.rounds_in_run
            release = heads.plan_release(server_round, labels, last)
            for m in out:
                m.content[protocol.CONFIG][protocol.DP_RELEASE] = int(release)
                client = self.book.client_of(m.metadata.dst_node_id)
                if client is not None:
                    m.content[protocol.CONFIG][protocol.DP_INCLUDED] = heads.included_for(client)
        return out

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask ``nodes`` which client each is (``query.client_id``); the book keeps the answers."""
        replies = grid.send_and_receive([protocol.identify_message(n) for n in nodes], timeout=self.identify_timeout)
        for msg in replies:
            node = msg.metadata.src_node_id
            problem = (error_summary(msg.error.reason) if msg.has_error()
                       else protocol.reply_problem(msg.content, protocol.IDENTIFY_METRICS, arrays=False))
            if problem:
                log.warning("node %d did not say which client it is: %s", node, problem)
                continue
            self.book.identify(node, int(msg.content[protocol.METRICS][protocol.CLIENT_ID]))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        good = self.screen(server_round, replies)
        if self.too_few(server_round, self._usable):
            return None, self.train_metrics(server_round) if self.book.rounds[server_round].reports else None
        if not good:
            return None, None
        statistics = self._mean_buffers(good)
        return self._aggregate(server_round, good, statistics), self.train_metrics(server_round)

    def aggregate_secure(self, server_round: int, reports: dict[int, dict], failed: dict[int, str],
                         aggregate: Callable[[int], dict] | None):
        """Record a round aggregated under secure aggregation (:mod:`server.secure`); return (arrays, metrics).

        Parameters
        ----------
        reports : dict
            Node -> the scalars of its report (in the clear), for the sites whose update is in the sum.
        failed : dict
            Node -> why it is not in the sum (it failed or dropped out of a stage).
        aggregate : callable or None
            ``total labeled samples -> the decoded aggregate`` (statistics summed, weights averaged), None when
            the protocol did not complete.
        """
        book = self.book
        for node, reason in failed.items():
            book.fail(server_round, node, reason)
        used, refused = [], []
        for node, metrics in reports.items():
            problem = protocol.metrics_problem(metrics, protocol.TRAIN_METRICS)
            if problem:
                book.reject(server_round, node, problem, answered=True)
                refused.append(node)
                continue
            report = TrainReport.from_metrics(metrics)
            reason = book.record_report(server_round, node, report)
            if reason:
                log.warning("round %d: report of node %d not used: %s", server_round, node, reason)
                refused.append(node)
                continue
            used.append(report)
        book.close_round(server_round)
        weight = sum(r.num_examples for r in used)
        metrics = self.train_metrics(server_round) if used else None
        if self.too_few(server_round, len(used)):
            return None, metrics
        if self.full_rounds_only and (missing := sorted(set(book.rounds[server_round].nodes) - set(reports))):
            book.not_aggregated(server_round, (
                f"node(s) {missing} are not in the secure sum: a sum of the others would drop their classes from "
                "the head, and its difference from a full round's would be their statistics, so the round is not "
                "aggregated; the labels they and the others asked are summed in the next full round"))
            return None, metrics
        if aggregate is None or not used or weight <= 0:
            return None, metrics
        if refused:  # a site's share cannot be taken out of the sum: the round is dropped whole
            reason = (f"the secure sum holds the update of node(s) {sorted(refused)}, whose report was refused; a "
                      "share of the sum cannot be taken out, so the round is not aggregated")
            for node in refused:
                book.rounds[server_round].events.append(RoundEvent("rejected", book.client_of(node), node, reason))
            log.warning("round %d: %s", server_round, reason)
            return None, self.train_metrics(server_round)
        total = aggregate(weight)
        statistics = {k: Array(np.asarray(total[k])) for k in self.buffers}
        summed = Message(RecordDict({
            protocol.ARRAYS: protocol.model_record({k: v for k, v in total.items() if k not in self.buffers}),
            protocol.METRICS: MetricRecord({protocol.WEIGHT_KEY: weight})}),
            dst_node_id=0, message_type=MessageType.TRAIN)
        return self._aggregate(server_round, [summed], statistics, contributors=len(used),
                               clients=[r.client_id for r in used]), self.train_metrics(server_round)

    def _aggregate(self, server_round: int, good: list[Message], statistics: dict, contributors: int | None = None,
                   clients: list[int] | None = None):
        """The inner strategy's aggregate of the replies ``good`` (the buffers' ``statistics`` put back)."""
        if contributors is not None and isinstance(self.inner, StatisticsAggregation):
            arrays, _ = self.inner.aggregate_train(server_round, good, contributors=contributors, clients=clients)
        else:
            arrays, _ = self.inner.aggregate_train(server_round, good)
        if arrays is not None and statistics:
            if all(k in arrays or k in statistics for k in self.reference):  # in the model's order
                arrays = ArrayRecord({k: arrays[k] if k in arrays else statistics[k] for k in self.reference})
            else:  # the update is not the model (the handover's head comes back as statistics)
                arrays = ArrayRecord({**{k: arrays[k] for k in arrays}, **statistics})
        return arrays

    def _mean_buffers(self, good: list[Message]) -> dict:
        """The example-weighted mean of the :attr:`buffers` of the replies ``good``, which are taken out of them."""
        if not self.buffers:
            return {}
        weights = np.array([protocol.report_of(m).num_examples for m in good], dtype=np.float64)
        weights = weights / weights.sum()
        means = {}
        for key in self.buffers:
            values = [m.content[protocol.ARRAYS][key].numpy() for m in good]
            mean = sum(w * v.astype(np.float64) for w, v in zip(weights, values))
            dtype = values[0].dtype
            means[key] = Array(np.asarray(np.rint(mean) if np.issubdtype(dtype, np.integer) else mean).astype(dtype))
        for m in good:
            arrays = m.content[protocol.ARRAYS]
            m.content[protocol.ARRAYS] = ArrayRecord({k: arrays[k] for k in arrays if k not in self.buffers})
        return means

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Record every reply of ``server_round`` in the book; return the updates fit to aggregate,
        in client order (failed, malformed and corrupted ones are logged as events and dropped)."""
        book = self.book
        good = []
        self._usable = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                book.fail(server_round, node, error_summary(msg.error.reason))
                continue
            problem = protocol.reply_problem(msg.content, protocol.TRAIN_METRICS, arrays=True)
            if problem:  # Flower's aggregation would raise on it and stop the whole run
                book.reject(server_round, node, problem, answered=True)
                continue
            report = protocol.report_of(msg)
            refused = book.record_report(server_round, node, report)
            if refused:
                log.warning("round %d: reply of node %d not used: %s", server_round, node, refused)
                continue
            reason = protocol.check_update(msg.content[protocol.ARRAYS], self.reference)
            if reason:
                book.reject(server_round, node, reason, answered=True)
                continue
            self._usable += 1
            if report.num_examples <= 0:
                # no label yet (its people have not answered): the model came back unchanged with
                # weight 0; leave it out (a round of only such updates would divide by zero)
                log.info("round %d: client %d has no labels yet; its update is not aggregated",
                         server_round, report.client_id)
                continue
            # same keys in the model's order: Krum and the DP clipping pair arrays by position
            arrays = msg.content[protocol.ARRAYS]
            msg.content[protocol.ARRAYS] = ArrayRecord({k: arrays[k] for k in self.reference})
            good.append(msg)
        book.close_round(server_round)
        # replies come in the order the clients finished; aggregating them in client order makes
        # the floating-point sums, and so a rerun with the same seed, the same
        good.sort(key=self._client_order)
        return good

    # ------------------------------------------------------------- checkpoint
    def _heads(self) -> StatisticsAggregation | None:
        """The aggregation that sums the head's statistics (head and handover pipelines), or None."""
        if isinstance(self.inner, HandoverAggregation):
            return self.inner.heads
        return self.inner if isinstance(self.inner, StatisticsAggregation) else None

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What the strategy keeps between rounds besides the model, as arrays for the checkpoint: the sites'
        last head statistics (:meth:`server.head.StatisticsAggregation.state_arrays`)."""
        heads = self._heads()
        return heads.state_arrays() if heads is not None else {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state_arrays`' arrays (a resumed run)."""
        if (heads := self._heads()) is not None and arrays:
            heads.load_state_arrays(arrays)

    def train_metrics(self, server_round: int) -> MetricRecord:
        """Totals over the clients that reported in ``server_round`` (and the labeled-weighted mean loss)."""
        reports = list(self.book.rounds[server_round].reports.values())
        losses = [(r.train_loss, r.num_examples) for r in reports if r.train_loss == r.train_loss]
        weight = sum(w for _, w in losses)
        return MetricRecord({
            "clients": len(reports), protocol.WEIGHT_KEY: sum(r.num_examples for r in reports),
            "queries-used": sum(r.queries_used for r in reports), "labels-added": sum(r.labels_added for r in reports),
            "pending": sum(r.pending for r in reports),
            "train-loss": sum(v * w for v, w in losses) / weight if weight else -1.0,
        })

    # ------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = []
        for msg in replies:
            problem = (error_summary(msg.error.reason) if msg.has_error()
                       else protocol.reply_problem(msg.content, self.eval_metrics, arrays=False))
            if problem is None and msg.content[protocol.METRICS][protocol.WEIGHT_KEY] <= 0:
                problem = "no local test samples"  # weight 0: nothing to average (all zero would divide by 0)
            if problem:
                log.warning("round %d: evaluation reply of node %d ignored: %s", server_round,
                            msg.metadata.src_node_id, problem)
                continue
            good.append(msg)
        good.sort(key=self._client_order)  # as the training replies: the mean does not depend on who finished first
        return self.inner.aggregate_evaluate(server_round, good) if good else None

    def _client_order(self, msg: Message) -> tuple:
        """Sort key of a reply: its client id, nodes that have not said theirs last (by node id)."""
        client = self.book.client_of(msg.metadata.src_node_id)
        return (client is None, client if client is not None else msg.metadata.src_node_id)


def _server_optimiser(strategy: Strategy):
    """The Flower strategy with a server learning rate ``eta`` (FedAdam) inside fedal's wrappers, or None."""
    while isinstance(strategy, (PrivateAggregation, StatisticsAggregation, HandoverAggregation)):
        strategy = strategy.inner
    return strategy if isinstance(strategy, FedAdam) else None


def flower_strategy(cfg: FederationConfig) -> Strategy:
    """Flower's own strategy named by ``cfg.aggregation``, set up from the run's settings."""
    kwargs: dict = dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0, min_train_nodes=cfg.min_clients,
                        min_evaluate_nodes=cfg.min_clients, min_available_nodes=cfg.min_clients)
    base = AGGREGATIONS[cfg.aggregation]
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.proximal_mu
    elif base is FedAdam:  # Adam's own moments and epsilon (Kingma & Ba): one local SGD step per round makes
        kwargs.update(eta=cfg.server_lr, beta_1=0.9, beta_2=0.999, tau=1e-8)  # it pooled Adam
    elif base is FedAvgM:
        kwargs["server_learning_rate"] = 1.0
        kwargs["server_momentum"] = cfg.server_momentum
    elif base is Krum:
        kwargs["num_malicious_nodes"] = 0
    return base(**kwargs)


def make_strategy(cfg: FederationConfig, book: RoundBook, model, is_query_round=None) -> BudgetedStrategy:
    """The server strategy of the run ``cfg``: budgets around (DP around) Flower's aggregation.

    Parameters
    ----------
    cfg : FederationConfig
        Run settings (aggregation, sampling, FedProx / server optimiser values, DP).
    book : RoundBook
        The run's round book (its ``privacy`` settings switch DP on).
    model : TorchClassifier, HeadClassifier or HandoverClassifier
        The server's model of the run (``fedal.models.model_for``): a reply's arrays must have its
        weights' shapes, or, for a head, the shapes of the statistics the heads are solved from.
    is_query_round : callable, optional
        ``server_round -> bool`` (default ``cfg.is_query_round``; the server's loop passes one that
        also says no once a stopping criterion fired).
    """
    buffers: list[str] = []
    eval_metrics = protocol.EVAL_METRICS
    if isinstance(model, HandoverClassifier):  # (no DP: the settings refuse it)
        reference, buffers, eval_metrics = model.update_shapes(), model.buffer_keys(), handover.EVAL_METRICS
    elif isinstance(model, HeadClassifier) and cfg.head_private:
        reference = HeadClassifier.private_statistics_shapes(model.n_classes, model.dim)
    elif isinstance(model, HeadClassifier):
        reference = HeadClassifier.statistics_shapes(model.n_classes, model.dim)
    else:
        reference = {k: tuple(v.shape) for k, v in model.get_state().items()}
        if book.privacy is None:  # with DP every array goes through clipping and noise, statistics too
            buffers = model.buffer_keys()
    inner = flower_strategy(cfg)
    if isinstance(model, HandoverClassifier):
        inner = HandoverAggregation(inner, model)
    elif isinstance(model, HeadClassifier):
        inner = StatisticsAggregation(inner, model, run_noise(cfg, model.n_classes, model.dim),
                                      release_growth=cfg.head_dp_release_growth)
    elif book.privacy is not None and book.privacy.mode != DISTRIBUTED:  # distributed: the sites clip and noise
        inner = PrivateAggregation(inner, book.privacy, book.accountant,
                                   refuse=lambda rnd, node, reason: book.reject(rnd, node, reason, answered=False))
    schedule = cfg.round_lr_factor if cfg.lr_schedule != "constant" else None
    return BudgetedStrategy(inner, book, reference, is_query_round or cfg.is_query_round, buffers=buffers,
                            lr_factor=schedule, eval_metrics=eval_metrics, min_replies=cfg.min_clients,
                            min_reply_fraction=cfg.min_reply_fraction,
                            full_rounds_only=(cfg.secure_aggregation and cfg.pipeline in ("head", "handover")
                                              and not cfg.head_private))  # a private run's increments wait for no one
