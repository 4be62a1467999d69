"""Differential privacy: Flower's fixed-clipping DP wrappers around the budgeted strategy.

``dp-clipping-norm > 0`` turns it on. Every accepted model update is clipped to that L2
norm (by the server, ``dp-mode = server``, or by each client before it sends,
``dp-mode = client``), the clipped updates are averaged with equal weights, and Gaussian
noise of standard deviation ``dp-noise-multiplier x dp-clipping-norm / sampled clients``
is added to the average (Flower's :class:`DifferentialPrivacyServerSideFixedClipping` /
:class:`DifferentialPrivacyClientSideFixedClipping`, after McMahan et al., ICLR 2018).

What this protects: the released global model (and what any client or outsider can learn
from it) against inference about one *client's* whole data set. It does not hide an
individual update from the server itself, which sees every update before it is noised.

Flower's wrappers configure the rounds (the clipping norm sent to clients in client
mode, the model each update is measured against); the aggregation goes, with Flower's
clipping and noise functions:

1. the budgeted strategy screens the replies (bookkeeping, failed / corrupted updates
   dropped: :meth:`server.strategy._BudgetMixin.screen_replies`);
2. server mode: each accepted update is clipped; client mode: an update whose norm
   exceeds the clipping norm (a client that did not clip) is rejected;
3. the budgeted strategy's parent (FedAvg, ...) aggregates them with equal weights;
4. Gaussian noise is added; :class:`GaussianAccountant` composes the release.

(Flower's own ``aggregate_train`` would clip before any screening, and divides by each
update's norm: one client sending the model back unchanged would stop the run.)

The privacy spent is an (epsilon, delta) guarantee at client level from Renyi DP of the
Gaussian mechanism without sampling amplification (every sampled client takes part),
the same model as Flower's own accountant. A round where only ``m`` of the ``n`` sampled
clients' updates were aggregated has sensitivity ``C / m`` with noise ``sigma C / n``, so
it is composed with the effective multiplier ``sigma m / n``. Epsilon is reported only
where it holds: ``fedavg`` / ``fedprox`` (a noisy mean); FedAdam / FedAvgM keep server
state computed from the un-noised mean, and median / trimmed mean / Krum have another
sensitivity, so for them the run records ``epsilon = null`` with the reason.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
)

from fedal.config import FederationConfig
from fedal.flower import protocol

log = logging.getLogger("fedal.server")

#: a server-side metric added to accepted replies before aggregation (clients never send it):
#: the noise is calibrated for an equally weighted mean
UNIT_WEIGHT = "dp-unit-weight"
#: aggregations whose output is the (noisy) mean of the clipped updates
ACCOUNTABLE = ("fedavg", "fedprox")
#: Renyi orders searched for the tightest epsilon (those of Google's dp-accounting)
RDP_ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024], float)
#: the budgeted strategy's bookkeeping, read and set through the wrapper by server/app.py
_FORWARDED = ("cfg", "coordinator", "reference", "stats", "client_of", "sent", "rounds")


class GaussianAccountant:
    """Privacy spent by a sequence of Gaussian-mechanism releases (Renyi DP).

    A release with noise multiplier ``sigma`` (noise std / sensitivity) has Renyi DP
    ``alpha / (2 sigma^2)`` at every order ``alpha``; releases add up. The
    ``(epsilon, delta)`` conversion is Canonne, Kamath & Steinke (2020), Prop. 12:
    ``eps = rdp(a) + log((a-1)/a) - (log delta + log a) / (a-1)``, minimised over ``a``.
    """

    def __init__(self) -> None:
        self.multipliers: list[float] = []

    def compose(self, noise_multiplier: float) -> None:
        """Add one release with this (effective) noise multiplier (> 0)."""
        if not noise_multiplier > 0:
            raise ValueError(f"a DP release needs a noise multiplier > 0, got {noise_multiplier}")
        self.multipliers.append(float(noise_multiplier))

    @property
    def releases(self) -> int:
        """Number of composed releases."""
        return len(self.multipliers)

    def epsilon(self, delta: float) -> float:
        """Epsilon of the composition at ``delta`` (0 before any release)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.multipliers:
            return 0.0
        a = RDP_ORDERS
        rdp = a * sum(1 / (2 * s * s) for s in self.multipliers)
        eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
        return float(max(eps.min(), 0.0))

    def state_dict(self) -> dict:
        """JSON-able state (for checkpoints)."""
        return {"multipliers": list(self.multipliers)}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore from :meth:`state_dict` (None: nothing released yet)."""
        self.multipliers = [float(s) for s in (state or {}).get("multipliers", [])]


class _Screened(Strategy):
    """The budgeted strategy as Flower's DP wrapper sees it: aggregation of replies the
    budgeted strategy already screened (so failed / corrupt ones never reach the clipping)."""

    def __init__(self, budgeted: Strategy) -> None:
        self.budgeted = budgeted

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.budgeted.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        weight_key = self.budgeted.weighted_by_key
        self.budgeted.weighted_by_key = UNIT_WEIGHT  # equal weights for the training updates only
        try:
            return self.budgeted.aggregate_screened(server_round, list(replies))
        finally:
            self.budgeted.weighted_by_key = weight_key

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.budgeted.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.budgeted.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.budgeted.summary()


class _PrivateMixin:
    """Screening, equal weights and accounting around one of Flower's DP wrappers."""

    def setup_privacy(self, budgeted: Strategy, cfg: FederationConfig) -> None:
        self.budgeted = budgeted
        self.mode = cfg.dp_mode
        self.delta = cfg.dp_delta
        self.aggregation = cfg.aggregation
        self.privacy = GaussianAccountant()

    # server/app.py reads and sets the bookkeeping of the strategy it holds
    def __getattr__(self, name: str):
        if name in _FORWARDED and "budgeted" in self.__dict__:
            return getattr(self.__dict__["budgeted"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _FORWARDED and "budgeted" in self.__dict__:
            setattr(self.budgeted, name, value)
        else:
            super().__setattr__(name, value)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # Flower's own aggregate_train would clip before any screening and divides by the
        # update's norm (a client sending the model back unchanged stops the run); the
        # steps are the same, with Flower's clipping and noise functions.
        good = self.budgeted.screen_replies(server_round, replies)
        if self.mode == "client":  # the clients clip; refuse an update that did not
            good = [msg for msg in good if self._clipped_by_client(server_round, msg)]
        else:
            for msg in good:
                self._clip(msg)
        if not good:
            return None, None
        for msg in good:
            msg.content[protocol.METRICS][UNIT_WEIGHT] = 1
        arrays, metrics = self.strategy.aggregate_train(server_round, good)
        if arrays is None:
            return None, None
        stdv = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noisy = [arrays[k].numpy().copy() for k in arrays.keys()]
        add_gaussian_noise_inplace(noisy, stdv)
        arrays = ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), noisy, strict=True)})
        if self.noise_multiplier > 0:
            self.privacy.compose(self.noise_multiplier * len(good) / self.num_sampled_clients)
        log.info("round %d: %d updates clipped to %g, noise std %.4g", server_round, len(good),
                 self.clipping_norm, stdv)
        return arrays, metrics

    def _update_norm(self, msg: Message) -> float:
        sent, received = self.sent_arrays, msg.content[protocol.ARRAYS]
        return math.sqrt(sum(float(np.sum((received[k].numpy().astype(np.float64)
                                           - sent[k].numpy().astype(np.float64)) ** 2)) for k in sent.keys()))

    def _clip(self, msg: Message) -> None:
        if self._update_norm(msg) == 0:  # nothing to clip (Flower's clip would divide by zero)
            return
        keys = list(self.sent_arrays.keys())
        received = [msg.content[protocol.ARRAYS][k].numpy().copy() for k in keys]
        compute_clip_model_update(received, [self.sent_arrays[k].numpy() for k in keys], self.clipping_norm)
        msg.content[protocol.ARRAYS] = ArrayRecord({k: Array(v) for k, v in zip(keys, received, strict=True)})

    def _clipped_by_client(self, server_round: int, msg: Message) -> bool:
        norm = self._update_norm(msg)
        if norm <= self.clipping_norm * (1 + 1e-4):
            return True
        node = msg.metadata.src_node_id
        reason = f"update norm {norm:.4g} exceeds dp-clipping-norm {self.clipping_norm:g}: the client did not clip"
        self.budgeted.rounds[server_round].rejected[node] = reason
        log.warning("round %d: update of node %d rejected: %s", server_round, node, reason)
        return False

    # ----------------------------------------------------------------- report
    def privacy_report(self) -> dict:
        """Settings and privacy spent so far (``epsilon`` None where no guarantee holds)."""
        report = {"mode": self.mode, "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                  "sampled_clients": self.num_sampled_clients, "releases": self.privacy.releases,
                  "delta": self.delta, "epsilon": None, "note": ""}
        if self.noise_multiplier <= 0:
            report["note"] = "clipping only, no noise: no differential privacy guarantee"
        elif self.aggregation not in ACCOUNTABLE:
            report["note"] = (f"aggregation {self.aggregation!r} is not a noisy mean of the clipped updates; "
                              f"epsilon is computed for {', '.join(ACCOUNTABLE)} only")
        else:
            report["epsilon"] = self.privacy.epsilon(self.delta)
            report["note"] = "client-level (epsilon, delta)-DP of the released models, Renyi DP accounting"
        return report

    def privacy_state(self) -> dict:
        """Checkpointed accountant state."""
        return self.privacy.state_dict()

    def load_privacy_state(self, state: dict | None) -> None:
        """Continue the accounting of a resumed run."""
        self.privacy.load_state_dict(state)


class PrivateServerClipping(_PrivateMixin, DifferentialPrivacyServerSideFixedClipping):
    """Budgeted strategy with server-side clipping and central Gaussian noise."""


class PrivateClientClipping(_PrivateMixin, DifferentialPrivacyClientSideFixedClipping):
    """Budgeted strategy with client-side clipping (clients' ``fixedclipping_mod``) and central noise."""


def sampled_clients(cfg: FederationConfig) -> int:
    """Clients sampled per round, as Flower's FedAvg samples them."""
    return max(int(cfg.clients * cfg.fraction_train), cfg.min_clients)


def make_private(budgeted: Strategy, cfg: FederationConfig) -> Strategy:
    """Wrap a budgeted strategy (:func:`server.strategy.make_strategy`) in Flower's DP wrapper.

    Parameters
    ----------
    budgeted : Strategy
        The budgeted strategy; its training updates are averaged with equal weights.
    cfg : FederationConfig
        ``dp_clipping_norm`` (> 0), ``dp_noise_multiplier``, ``dp_mode``, ``dp_delta``.
    """
    if cfg.dp_clipping_norm <= 0:
        raise ValueError("make_private needs dp-clipping-norm > 0")
    cls = PrivateServerClipping if cfg.dp_mode == "server" else PrivateClientClipping
    strategy = cls(_Screened(budgeted), cfg.dp_noise_multiplier, cfg.dp_clipping_norm, sampled_clients(cfg))
    strategy.setup_privacy(budgeted, cfg)
    if cfg.dp_noise_multiplier > 0 and cfg.aggregation not in ACCOUNTABLE:
        log.warning("dp: aggregation %r is not a noisy mean; no epsilon will be reported (use %s)",
                    cfg.aggregation, " or ".join(ACCOUNTABLE))
    return strategy
