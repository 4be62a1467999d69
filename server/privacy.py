"""Privacy accounting of the released global models, in Flower's accounting protocol.

:class:`GaussianAccountant` implements Flower's ``PrivacyAccountant`` protocol
(``flwr.supercore.privacy_accounting``: its config, event and result types) with Renyi
DP of the Gaussian mechanism and no sampling amplification, the model Flower's own
``RdpAccountant`` uses; Flower's needs Google's ``dp-accounting`` package, this one only
numpy. :class:`PrivacySettings` are a run's differential privacy settings and say what
the privacy spent means for the run's aggregation.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

#: Renyi orders searched for the tightest epsilon (those of Google's dp-accounting)
RDP_ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], float)
#: aggregations whose output is the (noisy) mean of the clipped updates
ACCOUNTABLE = ("fedavg", "fedprox")
ACCOUNTING_METHOD = "rdp-gaussian-no-amplification"
#: the mode of network DP under secure aggregation: the sites clip and add the noise (:class:`fedal.dp.UpdateNoise`)
DISTRIBUTED = "distributed"


def privacy_config(delta: float, population: int) -> PrivacyConfig:
    """Flower's privacy configuration of a fedal run: client-level add-or-remove-one, no amplification."""
    return PrivacyConfig(target_delta=delta, population_size=population,
                         neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                         sampling_method=SamplingMethod.NO_AMPLIFICATION)


class GaussianAccountant:
    """Privacy spent by a sequence of Gaussian-mechanism releases (Renyi DP), Flower's protocol.

    A release with noise multiplier ``sigma`` (noise std / sensitivity) has Renyi DP
    ``alpha / (2 sigma^2)`` at every order ``alpha``; releases add up. The
    ``(epsilon, delta)`` conversion is Canonne, Kamath & Steinke (2020), Prop. 12:
    ``eps = rdp(a) + log((a-1)/a) - (log delta + log a) / (a-1)``, minimised over ``a``.

    Parameters
    ----------
    config : PrivacyConfig
        Flower's accounting settings (:func:`privacy_config`); only no amplification is supported.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        if config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
            raise ValueError(f"GaussianAccountant accounts without sampling amplification, not "
                             f"{config.sampling_method.value!r}")
        self._config = config
        self._events: list[tuple[GaussianPrivacyEvent, int]] = []

    @property
    def config(self) -> PrivacyConfig:
        """The accounting settings."""
        return self._config

    @property
    def num_releases(self) -> int:
        """Number of composed releases."""
        return sum(count for _, count in self._events)

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Add ``count`` releases of ``event`` (its noise multiplier is the effective one)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        self._events.append((event, count))

    def _rdp(self, extra: tuple[GaussianPrivacyEvent, int] | None = None) -> np.ndarray:
        events = self._events + ([extra] if extra else [])
        return RDP_ORDERS * sum(count / (2 * e.noise_multiplier ** 2) for e, count in events)

    def _epsilon(self, delta: float, rdp: np.ndarray) -> tuple[float, float | None]:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not rdp.any():
            return 0.0, None
        a = RDP_ORDERS
        eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
        best = int(np.argmin(eps))
        return float(max(eps[best], 0.0)), float(a[best])

    def get_epsilon(self, delta: float) -> float:
        """Epsilon of the composition at ``delta`` (0 before any release)."""
        return self._epsilon(delta, self._rdp())[0]

    def get_delta(self, epsilon: float) -> float:
        """Smallest delta at which the composition is ``epsilon``-DP (by the same conversion)."""
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        rdp = self._rdp()
        if not rdp.any():
            return 0.0
        a = RDP_ORDERS
        log_delta = (a - 1) * (rdp + np.log((a - 1) / a) - epsilon) - np.log(a)
        return float(min(math.exp(min(log_delta.min(), 0.0)), 1.0))

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """Epsilon at ``delta`` (default the config's target delta), releases and the order that gave it."""
        delta = self._config.target_delta if delta is None else delta
        epsilon, order = self._epsilon(delta, self._rdp())
        return PrivacySpent(epsilon=epsilon, delta=delta, num_releases=self.num_releases,
                            accounting_method=ACCOUNTING_METHOD, optimal_order=order)

    def would_exceed(self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1) -> bool:
        """Whether ``count`` more releases of ``event`` would take epsilon above ``max_epsilon``
        (default the config's ``max_epsilon``; False when neither is set)."""
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        return self._epsilon(self._config.target_delta, self._rdp((event, count)))[0] > limit

    def state_dict(self) -> dict[str, object]:
        """JSON-able state (for checkpoints)."""
        return {"events": [{"noise_multiplier": e.noise_multiplier, "sample_size": e.sample_size,
                            "population_size": e.population_size, "count": c} for e, c in self._events]}

    def load_state_dict(self, state: dict[str, object] | None) -> None:
        """Restore from :meth:`state_dict` (None: nothing released yet)."""
        self._events = [(GaussianPrivacyEvent(float(r["noise_multiplier"]), int(r["sample_size"]),
                                              int(r["population_size"])), int(r["count"]))
                        for r in (state or {}).get("events", [])]


@dataclass(frozen=True)
class PrivacySettings:
    """A run's differential privacy settings (``dp-*`` in :class:`fedal.config.FederationConfig`).

    Attributes: ``mode`` (``server`` or ``client`` clipping, ``distributed`` under secure
    aggregation: the sites clip and add the noise), ``clipping_norm``, ``noise_multiplier``,
    ``sampled_clients`` (per round), ``population`` (clients), ``delta``, ``aggregation``
    (the Flower strategy that averages the clipped updates), and for ``distributed``
    ``fewest_sites`` (the fewest a secure sum holds), ``entries`` (values in an update) and
    ``rounds`` (the releases planned).
    """

    mode: str
    clipping_norm: float
    noise_multiplier: float
    sampled_clients: int
    population: int
    delta: float
    aggregation: str
    fewest_sites: int = 1
    entries: int = 0
    rounds: int = 0

    @classmethod
    def from_config(cls, cfg, entries: int = 0) -> "PrivacySettings | None":
        """The settings of the run ``cfg`` whose updates hold ``entries`` values; None when differential privacy is
        off.

        ``mode`` ``server`` / ``client``: client-level DP of the network updates (``dp-*``), noise added by the
        server; ``distributed`` (under secure aggregation): noise added by the sites before masking
        (:class:`fedal.dp.UpdateNoise`). The head pipeline's private run (``head-dp-epsilon``) adds its noise on
        the sites: :mod:`fedal.dp`, :func:`statistics_report`.
        """
        from fedal.dp import fewest_in_sum

        sampled = max(int(cfg.clients * cfg.fraction_train), cfg.min_clients)  # as Flower's FedAvg samples
        if cfg.dp_clipping_norm <= 0:
            return None
        if cfg.secure_aggregation:
            return cls(DISTRIBUTED, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, sampled, cfg.clients, cfg.dp_delta,
                       cfg.aggregation, fewest_in_sum(sampled, cfg.secure_threshold), int(entries), int(cfg.rounds))
        return cls(cfg.dp_mode, cfg.dp_clipping_norm, cfg.dp_noise_multiplier, sampled, cfg.clients, cfg.dp_delta,
                   cfg.aggregation, rounds=int(cfg.rounds))

    def accounted(self) -> bool:
        """Whether an epsilon holds: noise is added and the aggregate is a noisy mean (under distributed noise any
        server optimiser's state is post-processing of the noisy sum)."""
        return self.noise_multiplier > 0 and (self.mode == DISTRIBUTED or self.aggregation in ACCOUNTABLE)

    @functools.cached_property
    def distributed_multiplier(self) -> float:
        """``distributed``: the Gaussian multiplier whose Renyi DP bounds one round's noisy sum (the Skellam shares
        of the ``fewest_sites - 1`` other sites a curious site faces, :class:`fedal.dp.UpdateNoise`)."""
        from fedal.dp import UpdateNoise

        return UpdateNoise(self.noise_multiplier, self.clipping_norm, self.fewest_sites).effective_multiplier(
            max(self.entries, 1))

    def release(self, aggregated: int) -> GaussianPrivacyEvent:
        """The privacy event of a round that aggregated ``aggregated`` of the sampled clients' replies.

        Network updates: the noise is calibrated for the sampled clients (std ``sigma C / n``), the
        mean of ``m`` updates has sensitivity ``C / m``: the effective multiplier is ``sigma m / n``.
        Distributed: the sum has sensitivity ``C`` and at least ``k - 1`` shares of noise ``sigma C``
        (:attr:`distributed_multiplier`), however many sites it holds.
        """
        if self.mode == DISTRIBUTED:
            return GaussianPrivacyEvent(self.distributed_multiplier, aggregated, max(self.population, aggregated))
        return GaussianPrivacyEvent(self.noise_multiplier * aggregated / self.sampled_clients, aggregated,
                                    max(self.population, aggregated))

    @functools.cached_property
    def planned_epsilon(self) -> float:
        """``distributed``: epsilon at ``delta`` of all ``rounds`` (:meth:`distributed_epsilon`), computed once."""
        return self.distributed_epsilon(self.rounds)

    def distributed_epsilon(self, releases: int) -> float:
        """``distributed``: epsilon at ``delta`` of ``releases`` rounds (dp-accounting's Renyi accountant at the
        integer orders the Skellam bound holds at)."""
        from fedal.dp import epsilon

        return epsilon([(self.distributed_multiplier, int(releases))], self.delta)

    def report(self, accountant: GaussianAccountant) -> dict:
        """Settings and privacy spent so far (``epsilon`` None where no guarantee holds)."""
        report = {"mode": self.mode, "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                  "sampled_clients": self.sampled_clients, "releases": accountant.num_releases, "delta": self.delta,
                  "epsilon": None, "note": ""}
        if self.noise_multiplier <= 0:
            report["note"] = "clipping only, no noise: no differential privacy guarantee"
        elif self.mode == DISTRIBUTED:
            report.update(epsilon=self.distributed_epsilon(accountant.num_releases),
                          epsilon_planned=self.planned_epsilon, fewest_sites_in_a_sum=self.fewest_sites,
                          note=("client-level (epsilon, delta)-DP of every secure sum the server unmasked (each site "
                                "adds its Skellam share before masking), Renyi DP accounting (dp-accounting)"))
        elif self.aggregation not in ACCOUNTABLE:
            report["note"] = (f"aggregation {self.aggregation!r} is not a noisy mean of the clipped updates; "
                              f"epsilon is computed for {', '.join(ACCOUNTABLE)} only")
        else:
            report["epsilon"] = accountant.get_epsilon(self.delta)
            report["note"] = "client-level (epsilon, delta)-DP of the released models, Renyi DP accounting"
        return report


def statistics_report(cfg, noise, entries: dict[str, int], releases_made: int) -> dict:
    """A private head run's privacy (:mod:`fedal.dp`): the noise, the epsilon planned for each labeled sample (its
    :func:`fedal.dp.planned_releases` releases of its label and of its pool) and the epsilon spent so far (the most replies any site
    says one of its samples was in, ``releases_made``), both at ``dp-delta``, per labeled sample, whole run."""
    from fedal.dp import ACCOUNTING_METHOD, planned_releases, sample_epsilon

    made, planned = max(int(releases_made), 0), planned_releases(cfg)
    return {"mode": "statistics-on-sites", "secure": noise.secure, "noise_multiplier": noise.noise_multiplier,
            "clipping_norm": noise.clip_norm, "fewest_sites_in_a_sum": noise.fewest_sites if noise.secure else 1,
            "delta": cfg.dp_delta, "releases_planned": planned, "releases_made": made,
            "epsilon_planned": sample_epsilon(noise, planned, cfg.dp_delta, entries, pool_releases=planned),
            "epsilon": sample_epsilon(noise, made, cfg.dp_delta, entries, pool_releases=min(made, planned)),
            "accounting": ACCOUNTING_METHOD,
            "note": ("sample-level (epsilon, delta)-DP of everything the sites' statistics release over the run (one "
                     "labeled or pool sample of any site, add or remove), against the server and against a site that "
                     "knows its own noise; the noise is added on the sites")}
