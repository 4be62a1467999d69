"""The head pipeline's aggregation: sum the sites' class statistics, solve the LDA head.

With ``pipeline = "head"`` a site's train reply carries :class:`fedal.heads.ClassStatistics`
of its labeled samples and of its self-trained ones instead of network weights.
:class:`StatisticsAggregation` wraps a Flower strategy, which samples the nodes and
builds the messages as for any federation, and replaces the weighted average by the sum
of each kind of statistics, in client order, then sends back the two heads of the sums
(:class:`fedal.models.HeadClassifier`): the heads that training on every site's labels
pooled would give (:mod:`fedal.heads`).

Differential privacy (``head-dp-noise``): every site scales its feature vectors to norm at
most ``C`` (``head-clip-norm``), so one sample changes the summed statistics by at most
``sqrt(1 + C^2 + C^4)`` in L2; the server adds Gaussian noise of ``head-dp-noise`` times
that to every entry (the scatter matrices symmetrically) before solving, and the round
book's accountant composes one release per round (the labeled and the self-trained
statistics hold disjoint samples). The guarantee is sample-level: it covers one labeled
or pool sample of any site, not a whole site. Secure aggregation would hide each site's
statistics from the server itself; Flower 1.41 offers SecAgg+ only on its legacy
NumPyClient path, not on the message API fedal uses.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedal.flower import protocol
from fedal.heads import ClassStatistics
from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS, HeadClassifier
from server.privacy import GaussianAccountant, PrivacySettings

log = logging.getLogger("fedal.server")


class StatisticsAggregation(Strategy):
    """Sum of the replies' class statistics -> the LDA head (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples the nodes and averages the evaluation metrics.
    model : HeadClassifier
        Solves the heads from the summed statistics (its shrinkage, classes and features).
    privacy : PrivacySettings, optional
        ``mode = "statistics"``: the noise multiplier and clipping norm of the summed statistics.
    accountant : GaussianAccountant, optional
        Where each noisy release is composed (the round book's); needed with ``privacy``.
    seed : int
        Seed of the noise.
    """

    def __init__(self, inner: Strategy, model: HeadClassifier, privacy: PrivacySettings | None = None,
                 accountant: GaussianAccountant | None = None, seed: int = 0) -> None:
        super().__init__()
        if privacy is not None and (privacy.mode != "statistics" or accountant is None):
            raise ValueError("StatisticsAggregation takes statistics privacy settings and their accountant")
        self.inner = inner
        self.model = model
        self.privacy = privacy
        self.accountant = accountant
        self.rng = np.random.default_rng(seed)
        #: the summed (noisy, with DP) statistics the current heads were solved from; sent with the next round
        self.global_stats: ArrayRecord | None = None

    def summary(self) -> None:
        log.info("\t├──> head pipeline: sums the clients' class statistics, solves the LDA head")
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.global_stats is not None:  # a site that loses the server adds its new labels to these exactly
            for msg in messages:
                msg.content[protocol.GLOBAL_STATS] = self.global_stats
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message], contributors: int | None = None):
        """The heads of the replies' summed statistics; ``contributors``: how many sites a reply's sum holds
        (under secure aggregation one reply holds the federation's sum), for the privacy accounting."""
        n_classes, dim = self.model.n_classes, self.model.dim
        labeled, pseudo = ClassStatistics.empty(n_classes, dim), ClassStatistics.empty(n_classes, dim)
        replies = list(replies)
        for msg in replies:  # the budget wrapper hands them over screened, in client order
            state = protocol.state_from_record(msg.content[protocol.ARRAYS])
            labeled = labeled + ClassStatistics.from_arrays(state, LABELED_STATS)
            pseudo = pseudo + ClassStatistics.from_arrays(state, PSEUDO_STATS)
        if labeled.total <= 0:
            return None, None
        if self.privacy is not None and self.privacy.noise_multiplier > 0:
            labeled, pseudo = self.noisy(labeled), self.noisy(pseudo)
            self.accountant.compose(self.privacy.release(len(replies) if contributors is None else contributors))
            if labeled.total <= 0:
                return None, None
        self.model.fit_statistics(labeled, pseudo)
        self.global_stats = protocol.model_record({**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)})
        log.info("round %d: heads of %.0f labels and %.0f pseudo-labels", server_round, labeled.total, pseudo.total)
        return (protocol.model_record(self.model.get_state()),
                MetricRecord({"labels": float(labeled.total), "pseudo-labels": float(pseudo.total)}))

    def noisy(self, stats: ClassStatistics) -> ClassStatistics:
        """``stats`` with the Gaussian mechanism's noise (std ``sigma x sqrt(1 + C^2 + C^4)``) on every entry;
        counts stay >= 0 and the scatter symmetric."""
        std = self.privacy.noise_multiplier * self.privacy.statistics_sensitivity()
        counts = np.maximum(stats.counts + self.rng.normal(0.0, std, stats.counts.shape), 0.0)
        sums = stats.sums + self.rng.normal(0.0, std, stats.sums.shape)
        upper = np.triu(self.rng.normal(0.0, std, stats.scatter.shape))
        scatter = stats.scatter + upper + np.triu(upper, 1).T
        return ClassStatistics(counts, sums, scatter)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
