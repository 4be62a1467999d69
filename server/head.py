"""The head pipeline's aggregation: sum the sites' class statistics, solve the LDA head.

With ``pipeline = "head"`` a site's train reply carries :class:`fedal.heads.ClassStatistics`
of its labeled samples and of its self-trained ones instead of network weights.
:class:`StatisticsAggregation` wraps a Flower strategy, which samples the nodes and
builds the messages as for any federation, and replaces the weighted average by the sum
of each kind of statistics, in client order, then sends back the two heads of the sums
(:class:`fedal.models.HeadClassifier`): the heads that training on every site's labels
pooled would give (:mod:`fedal.heads`).

Differential privacy (``head-dp-epsilon`` / ``head-dp-noise``, :mod:`fedal.dp`): the sites add the noise
themselves, before anything leaves them (before masking under secure aggregation), and send only what the
server's sums do not hold yet: the counts and sums of their new labels, and their pool's count, sum and
scatter once. The server adds these increments up, tracks the noise variance of every entry of the sums,
and solves the head from the pool's covariance and the labels' noisy means
(:meth:`fedal.heads.LDAHead.from_private`); each site is told which of its replies the sums hold, so that
a reply that did not reach them is sent again (and counted) rather than lost.

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
from fedal.dp import CENTRE_CLIP, CENTRE_MEAN, Centre, StatisticsNoise, centring, release_due
from fedal.exceptions import ConfigError
from fedal.models.head_adapter import LABELED_STATS, POOL_STATS, PSEUDO_STATS, HeadClassifier

log = logging.getLogger("fedal.server")
#: the checkpoint's key prefix of the sites' kept statistics (:meth:`StatisticsAggregation.state_arrays`)
SITE_STATS = "site-stats"
#: the checkpoint's key prefix of a private run's sums (:meth:`StatisticsAggregation.state_arrays`)
PRIVATE = "private"


class StatisticsAggregation(Strategy):
    """Sum of the replies' class statistics -> the LDA head (see the module docstring).

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples the nodes and averages the evaluation metrics.
    model : HeadClassifier
        Solves the heads from the summed statistics (its shrinkage, classes and features).
    noise : StatisticsNoise, optional
        A private run's noise: the replies are noisy increments, added up (see the module docstring).
    release_growth : float
        A private run releases the labels when they have grown this many times (:func:`fedal.dp.release_due`).
    """

    def __init__(self, inner: Strategy, model: HeadClassifier, noise: StatisticsNoise | None = None,
                 release_growth: float = 1.5) -> None:
        super().__init__()
        self.inner = inner
        self.model = model
        #: a private run's noise (:mod:`fedal.dp`): the sites send noisy increments, the server adds them up
        self.noise = noise
        #: private run: the sum of every increment added so far, the noise variance of one entry of each array,
        #: and client -> the rounds whose reply of it the sums hold (each site is told its own)
        self.private_sums: dict[str, np.ndarray] = {}
        self.private_variance: dict[str, float] = {}
        self.included: dict[int, list[int]] = {}
        #: private run: round -> the labels' centre of a round that releases labels; clients whose pool the sums
        #: hold; the labels the sites held at the last release
        self.release_rounds: dict[int, Centre] = {}
        self.pool_included: set[int] = set()
        self.last_released = 0
        self.release_growth = float(release_growth)
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message], contributors: int | None = None,
                        clients: list[int] | None = None):
        """The heads of the replies' summed statistics; ``contributors``: how many sites a reply's sum holds
        (under secure aggregation one reply holds the federation's sum, of the sites ``clients``)."""
        if self.noise is not None:
            return self._aggregate_private(server_round, list(replies), contributors, clients)
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
        self.model.fit_statistics(labeled, pseudo)
        self.global_stats = protocol.model_record({**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)})
        log.info("round %d: heads of %.0f labels and %.0f pseudo-labels", server_round, labeled.total, pseudo.total)
        return (protocol.model_record(self.model.get_state()),
                MetricRecord({"labels": float(labeled.total), "pseudo-labels": float(pseudo.total)}))

    # ------------------------------------------------------------- private run
    def _aggregate_private(self, server_round: int, replies: list[Message], contributors: int | None,
                           clients: list[int] | None):
        """Add the replies' noisy increments to the sums (one site's each in the clear, the ``contributors`` sites
        ``clients`` of a secure sum) and solve the head of the sums (:meth:`HeadClassifier.fit_private`)."""
        centre = self.release_rounds.get(int(server_round))
        noise = self.noise.centred(centre)
        for msg in replies:
            state = protocol.state_from_record(msg.content[protocol.ARRAYS])
            metrics = msg.content[protocol.METRICS] if protocol.METRICS in msg.content else {}
            if protocol.CLIENT_ID in metrics:
                sites, who = 1, [int(metrics[protocol.CLIENT_ID])]
            else:
                sites, who = int(contributors or 1), list(clients or [])
            parts = {POOL_STATS} if set(who) - self.pool_included else set()
            if centre is not None:  # a round that does not release labels carries none: its labels' part is noise
                parts.add(LABELED_STATS)
            for key, value in state.items():
                if key.split(".", 1)[0] not in parts:
                    continue
                self.private_sums[key] = self.private_sums.get(key, 0.0) + np.asarray(value, np.float64)
                self.private_variance[key] = self.private_variance.get(key, 0.0) + noise.sum_variance(key, sites)
            for client in who:
                self.included.setdefault(client, []).append(int(server_round))
            self.pool_included.update(who)
        sums = self.private_sums
        if f"{POOL_STATS}.counts" not in sums:
            return None, None
        self._send_sums()
        if f"{LABELED_STATS}.counts" not in sums:
            return None, None
        labeled = ClassStatistics(sums[f"{LABELED_STATS}.counts"], sums[f"{LABELED_STATS}.sums"],
                                  np.zeros((self.model.dim, self.model.dim)))
        pool = ClassStatistics.from_arrays(sums, POOL_STATS)
        try:
            self.model.fit_private(labeled, pool, self.private_variance, self.centre().mean)
        except ConfigError as exc:  # too little signal above the noise yet: the head stays as it was
            log.warning("round %d: the private head is not solved yet: %s", server_round, exc)
        present = self.model.head.present.sum() if self.model.head is not None else 0
        log.info("round %d: private head of about %.0f labels (noisy count), %d classes present", server_round,
                 float(np.sum(labeled.counts)), present)
        return (protocol.model_record(self.model.get_state()),
                MetricRecord({"labels": float(np.sum(labeled.counts)), "pseudo-labels": 0.0}))

    def _send_sums(self) -> None:
        """The global statistics of the next round's messages: the sums and the labels' centre (the sites centre
        their labels on it, so that every release adds up in the same coordinates)."""
        out = dict(self.private_sums)
        centre = self.centre()
        if centre is not None:
            out[CENTRE_MEAN], out[CENTRE_CLIP] = centre.mean, np.array([centre.clip])
        self.global_stats = protocol.model_record(out)

    def centre(self) -> Centre | None:
        """Where the labels are centred (:func:`fedal.dp.centring` of the sums sent to the sites): fixed at the first
        release, so that every release's sums add up in the same coordinates."""
        if self.release_rounds:
            return self.release_rounds[min(self.release_rounds)]
        return centring(self.private_sums, self.noise.clip_norm)

    def plan_release(self, server_round: int, labels: int, last_round: bool) -> bool:
        """Whether ``server_round`` releases the sites' labels (:func:`fedal.dp.release_due`; ``labels``: what the
        sites will hold after its queries); decided before its messages are sent, and kept."""
        centre = self.centre()
        if centre is None or not release_due(labels, self.last_released, last_round, self.release_growth):
            self.release_rounds.pop(int(server_round), None)
            return False
        self.release_rounds[int(server_round)] = centre
        self.last_released = int(labels)
        return True

    def included_for(self, client: int) -> str:
        """The rounds whose reply of ``client`` the sums hold, as the train message carries them (``dp-included``)."""
        return ",".join(str(r) for r in self.included.get(int(client), []))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The sites' kept statistics as arrays (``site-stats:<client>:<name>``), for the run's checkpoint; in a
        private run the sums, their noise and the rounds each client's replies are in (``private:...``)."""
        if self.noise is not None:
            out = {f"{PRIVATE}:sum:{k}": np.asarray(v) for k, v in self.private_sums.items()}
            out.update({f"{PRIVATE}:variance:{k}": np.array(v) for k, v in self.private_variance.items()})
            out.update({f"{PRIVATE}:included:{c}": np.array(r, np.int64) for c, r in self.included.items()})
            out.update({f"{PRIVATE}:release:{r}": np.append(c.mean, c.clip) for r, c in self.release_rounds.items()})
            out[f"{PRIVATE}:pool-included:all"] = np.array(sorted(self.pool_included), np.int64)
            out[f"{PRIVATE}:last-released:all"] = np.array(self.last_released, np.int64)
            return out
        out = {}
        for client, (labeled, pseudo) in sorted(self.site_stats.items()):
            out.update({f"{SITE_STATS}:{client}:{k}": v for k, v in
                        {**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)}.items()})
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take the sites' statistics back from :meth:`state_arrays`' arrays."""
        if self.noise is not None:
            for key, value in arrays.items():
                _, what, name = key.split(":", 2)
                if what == "sum":
                    self.private_sums[name] = np.asarray(value, np.float64)
                elif what == "variance":
                    self.private_variance[name] = float(value)
                elif what == "release":
                    value = np.asarray(value, np.float64)
                    self.release_rounds[int(name)] = Centre(value[:-1], float(value[-1]))
                elif what == "pool-included":
                    self.pool_included = {int(c) for c in np.asarray(value).ravel()}
                elif what == "last-released":
                    self.last_released = int(value)
                else:
                    self.included[int(name)] = [int(r) for r in np.asarray(value).ravel()]
            if self.private_sums:
                self._send_sums()
            return
        by_client: dict[int, dict] = {}
        for key, value in arrays.items():
            _, client, name = key.split(":", 2)
            by_client.setdefault(int(client), {})[name] = value
        self.site_stats = {c: (ClassStatistics.from_arrays(a, LABELED_STATS), ClassStatistics.from_arrays(a, PSEUDO_STATS))
                           for c, a in sorted(by_client.items())}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
