"""The head pipeline's aggregation: sum the sites' class statistics, solve the LDA head.

With ``pipeline = "head"`` a site's train reply carries :class:`fedal.heads.ClassStatistics`
of its labeled samples and of its self-trained ones instead of network weights.
:class:`StatisticsAggregation` wraps a Flower strategy, which samples the nodes and
builds the messages as for any federation, and replaces the weighted average by the sum
of each kind of statistics, in client order, then sends back the two heads of the sums
(:class:`fedal.models.HeadClassifier`): the heads that training on every site's labels
pooled would give (:mod:`fedal.heads`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedal.flower import protocol
from fedal.heads import ClassStatistics
from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS, HeadClassifier

log = logging.getLogger("fedal.server")


class StatisticsAggregation(Strategy):
    """Sum of the replies' class statistics -> the LDA head (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples the nodes and averages the evaluation metrics.
    model : HeadClassifier
        Solves the heads from the summed statistics (its shrinkage, classes and features).
    """

    def __init__(self, inner: Strategy, model: HeadClassifier) -> None:
        super().__init__()
        self.inner = inner
        self.model = model

    def summary(self) -> None:
        log.info("\t├──> head pipeline: sums the clients' class statistics, solves the LDA head")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        n_classes, dim = self.model.n_classes, self.model.dim
        labeled, pseudo = ClassStatistics.empty(n_classes, dim), ClassStatistics.empty(n_classes, dim)
        for msg in replies:  # the budget wrapper hands them over screened, in client order
            state = protocol.state_from_record(msg.content[protocol.ARRAYS])
            labeled = labeled + ClassStatistics.from_arrays(state, LABELED_STATS)
            pseudo = pseudo + ClassStatistics.from_arrays(state, PSEUDO_STATS)
        if labeled.total <= 0:
            return None, None
        self.model.fit_statistics(labeled, pseudo)
        log.info("round %d: heads of %.0f labels and %.0f pseudo-labels", server_round, labeled.total, pseudo.total)
        return (protocol.model_record(self.model.get_state()),
                MetricRecord({"labels": float(labeled.total), "pseudo-labels": float(pseudo.total)}))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
