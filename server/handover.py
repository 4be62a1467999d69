"""The ``handover`` pipeline on the server: the head and the network aggregated side by side, and the switch.

A site's train reply holds the class statistics of its labels for the head (``head/stats.*``,
``head/pseudo.*``), its locally trained network (``net/*``) and the serving flag.
:class:`HandoverAggregation` sums the statistics and solves the heads
(:class:`~server.head.StatisticsAggregation`) and lets the Flower strategy (FedAvg, FedAdam, ...)
aggregate the network alone, so its server optimiser never steps on the head.

:func:`handover_due` decides, from the evaluation replies, when the network takes over: the sites
report the accuracy of both models on their local test sets, Flower averages them weighted by
those sets' sizes, and the network serves from the first evaluation where its average is at least
the head's. Only these two aggregate accuracies cross the network; the switch is never undone
(its flag travels with the model and the checkpoint).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedal.flower import protocol
from fedal.models.handover_adapter import HEAD_PREFIX, NET_PREFIX, SERVES, SERVING, HandoverClassifier, serving_flag
from server.head import StatisticsAggregation

log = logging.getLogger("fedal.server")

#: what a site reports of both models in its evaluation reply, besides :data:`fedal.flower.protocol.EVAL_METRICS`
HEAD_ACC, NET_ACC = "eval-acc-head", "eval-acc-network"
EVAL_METRICS = (*protocol.EVAL_METRICS, HEAD_ACC, NET_ACC)


def _part(record: ArrayRecord, prefix: str) -> ArrayRecord:
    return ArrayRecord({k[len(prefix):]: record[k] for k in record if k.startswith(prefix)})


class HandoverAggregation(Strategy):
    """The head's statistics summed, the network aggregated by ``inner`` (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples the nodes, aggregates the network and averages the evaluation
        metrics.
    model : HandoverClassifier
        The server's model: its head solves the heads from the summed statistics.
    """

    def __init__(self, inner: Strategy, model: HandoverClassifier) -> None:
        super().__init__()
        self.inner = inner
        self.heads = StatisticsAggregation(inner, model.head)
        self._sent: ArrayRecord | None = None

    def summary(self) -> None:
        log.info("\t├──> handover pipeline: sums the head's statistics, aggregates the network, serves the better")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        messages = list(self.inner.configure_train(server_round, _part(arrays, NET_PREFIX), config, grid))
        for m in messages:  # the sites get both models (and the head's sums, for a site that loses the server)
            m.content[protocol.ARRAYS] = arrays
            if self.heads.global_stats is not None:
                m.content[protocol.GLOBAL_STATS] = self.heads.global_stats
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        whole = [m.content[protocol.ARRAYS] for m in replies]
        for m, arrays in zip(replies, whole):
            m.content[protocol.ARRAYS] = _part(arrays, NET_PREFIX)
        net, metrics = self.inner.aggregate_train(server_round, replies)
        for m, arrays in zip(replies, whole):
            m.content[protocol.ARRAYS] = _part(arrays, HEAD_PREFIX)
        heads, head_metrics = self.heads.aggregate_train(server_round, replies)
        for m, arrays in zip(replies, whole):
            m.content[protocol.ARRAYS] = arrays
        sent = self._sent or ArrayRecord()
        if net is None and heads is None:
            return None, None
        merged = {k: sent[k] for k in sent if k.startswith(HEAD_PREFIX)} if heads is None else \
            {HEAD_PREFIX + k: heads[k] for k in heads}
        merged.update({k: sent[k] for k in sent if k.startswith(NET_PREFIX)} if net is None else
                      {NET_PREFIX + k: net[k] for k in net})
        out = dict(metrics or {})
        out.update(dict(head_metrics or {}))
        return ArrayRecord(merged), MetricRecord(out) if out else None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def handover_due(serving: str, client_eval) -> bool:
    """Whether the network takes over now: the head serves and the sites' averaged local test accuracy
    of the network (``client_eval``, the aggregated evaluation metrics) is at least the head's."""
    if serving != SERVES[0] or not client_eval or HEAD_ACC not in client_eval or NET_ACC not in client_eval:
        return False
    return float(client_eval[NET_ACC]) >= float(client_eval[HEAD_ACC])


def serve_network(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with the flag that says the network serves."""
    out = {k: arrays[k] for k in arrays}
    out[SERVING] = Array(serving_flag("network"))
    return ArrayRecord(out)
