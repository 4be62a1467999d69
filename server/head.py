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
or pool sample of any site, not a whole site. Secure aggregation (:mod:`server.secure`) hides
each site's statistics from the server: it then holds one sum per round.

A site that does not reply in a round keeps its classes in the head: in the clear, the sum
takes each site's statistics from its last usable reply (kept in the run's checkpoint); under
secure aggregation only rounds whose sum holds every sampled site are aggregated
(:class:`server.strategy.BudgetedStrategy`'s ``full_rounds_only``).
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
#: the checkpoint's key prefix of the sites' kept statistics (:meth:`StatisticsAggregation.state_arrays`)
SITE_STATS = "site-stats"


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
        #: client -> the (labeled, self-trained) statistics of its last usable reply, in the clear: a site that
        #: does not reply in a round keeps its classes in the head (under secure aggregation the server holds
        #: sums only, and the budget strategy aggregates full rounds alone)
        self.site_stats: dict[int, tuple[ClassStatistics, ClassStatistics]] = {}
        #: the clients whose statistics the last aggregation took from an earlier round
        self.carried: list[int] = []

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
        present = set()
        for msg in replies:  # the budget wrapper hands them over screened, in client order
            state = protocol.state_from_record(msg.content[protocol.ARRAYS])
            site = (ClassStatistics.from_arrays(state, LABELED_STATS), ClassStatistics.from_arrays(state, PSEUDO_STATS))
            metrics = msg.content[protocol.METRICS] if protocol.METRICS in msg.content else {}
            if protocol.CLIENT_ID in metrics:  # one site's statistics: kept for the rounds it misses
                client = int(metrics[protocol.CLIENT_ID])
                self.site_stats[client] = site
                present.add(client)
            else:  # a secure sum of several sites
                labeled, pseudo = labeled + site[0], pseudo + site[1]
        self.carried = sorted(set(self.site_stats) - present)
        for client in sorted(self.site_stats):  # in client order: a rerun sums in the same order
            labeled, pseudo = labeled + self.site_stats[client][0], pseudo + self.site_stats[client][1]
        if self.carried:
            log.warning("round %d: the head keeps the statistics of client(s) %s from their last reply (no usable "
                        "reply this round)", server_round, self.carried)
        if labeled.total <= 0:
            return None, None
        if self.privacy is not None and self.privacy.noise_multiplier > 0:
            labeled, pseudo = self.noisy(labeled), self.noisy(pseudo)
            sites = contributors if contributors is not None else len(self.site_stats) + len(replies) - len(present)
            self.accountant.compose(self.privacy.release(sites))
            if labeled.total <= 0:
                return None, None
        self.model.fit_statistics(labeled, pseudo)
        self.global_stats = protocol.model_record({**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)})
        log.info("round %d: heads of %.0f labels and %.0f pseudo-labels", server_round, labeled.total, pseudo.total)
        return (protocol.model_record(self.model.get_state()),
                MetricRecord({"labels": float(labeled.total), "pseudo-labels": float(pseudo.total)}))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The sites' kept statistics as arrays (``site-stats:<client>:<name>``), for the run's checkpoint."""
        out = {}
        for client, (labeled, pseudo) in sorted(self.site_stats.items()):
            out.update({f"{SITE_STATS}:{client}:{k}": v for k, v in
                        {**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)}.items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the sites' statistics back from :meth:`state_arrays`' arrays."""
        by_client: dict[int, dict] = {}
        for key, value in arrays.items():
            _, client, name = key.split(":", 2)
            by_client.setdefault(int(client), {})[name] = value
        self.site_stats = {c: (ClassStatistics.from_arrays(a, LABELED_STATS), ClassStatistics.from_arrays(a, PSEUDO_STATS))
                           for c, a in sorted(by_client.items())}

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
