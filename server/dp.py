"""Differential privacy as a strategy wrapper: clip each update, average, add Gaussian noise.

``dp-clipping-norm > 0`` turns it on. :class:`PrivateAggregation` wraps the Flower
strategy that aggregates (FedAvg, FedProx, ...), as Flower's own
``DifferentialPrivacy*FixedClipping`` wrappers do, and is configured in its constructor.
Every update it is given is clipped to the clipping norm (by the server, ``dp-mode =
server``, or by each client before it sends, ``dp-mode = client``, with Flower's
``fixedclipping_mod``; an update above the norm is then refused), the clipped updates
reach the wrapped strategy with equal weights, and Gaussian noise of standard deviation
``dp-noise-multiplier x dp-clipping-norm / sampled clients`` is added to the aggregate
(McMahan et al., ICLR 2018), with Flower's clipping and noise functions.

What this protects: the released global model (and what any client or outsider can learn
from it) against inference about one *client's* whole data set. It does not hide an
individual update from the server itself, which sees every update before it is noised.

It is given only updates the budget wrapper (:class:`server.strategy.BudgetedStrategy`)
already screened: failed and corrupted replies never reach the clipping. (Flower's own
wrappers clip before any screening and divide by each update's norm, so one client that
sends the model back unchanged stops the run; they also skip a round in which one
sampled client failed.) The privacy spent is accounted in the round book's
:class:`server.privacy.GaussianAccountant`; a round that averaged ``m`` of the ``n``
sampled clients' updates is a release with the effective multiplier ``sigma m / n``
(:meth:`server.privacy.PrivacySettings.release`). Epsilon is reported only where it
holds: ``fedavg`` / ``fedprox`` (a noisy mean); FedAdam / FedAvgM keep server state
computed from the un-noised mean, and median / trimmed mean / Krum have another
sensitivity, so for them the run records ``epsilon = null`` with the reason.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
)

from fedal.flower import protocol
from server.privacy import GaussianAccountant, PrivacySettings

log = logging.getLogger("fedal.server")

#: called with (server round, node id, reason) for an update refused here
Refuse = Callable[[int, int, str], None]


class PrivateAggregation(Strategy):
    """Clipping, equal weights, Gaussian noise and accounting around a Flower strategy.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples the nodes and aggregates the clipped updates.
    settings : PrivacySettings
        Mode, clipping norm, noise multiplier, sampled clients.
    accountant : GaussianAccountant
        Where each noisy release is composed (the round book's).
    refuse : callable
        Told about an update refused for exceeding the clipping norm (client mode).
    """

    def __init__(self, inner: Strategy, settings: PrivacySettings, accountant: GaussianAccountant,
                 refuse: Refuse) -> None:
        super().__init__()
        if settings.clipping_norm <= 0:
            raise ValueError("PrivateAggregation needs a clipping norm > 0")
        self.inner = inner
        self.settings = settings
        self.accountant = accountant
        self.refuse = refuse
        self.sent_arrays = ArrayRecord()
        if settings.noise_multiplier > 0 and not settings.accounted():
            log.warning("dp: aggregation %r is not a noisy mean; no epsilon will be reported", settings.aggregation)

    def summary(self) -> None:
        log.info("\t├──> DP: %s clipping to %g, noise multiplier %g", self.settings.mode, self.settings.clipping_norm,
                 self.settings.noise_multiplier)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent_arrays = arrays
        if self.settings.mode == "client":  # the ClientApp's mod clips to this norm
            config[protocol.DP_CLIPPING_NORM] = self.settings.clipping_norm
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept = []
        for msg in replies:
            received = msg.content[protocol.ARRAYS]
            if self.settings.mode == "client":
                norm = self._update_norm(received)
                if norm > self.settings.clipping_norm * (1 + 1e-4):
                    self.refuse(server_round, msg.metadata.src_node_id,
                                f"update norm {norm:.4g} exceeds dp-clipping-norm {self.settings.clipping_norm:g}: "
                                "the client did not clip")
                    continue
            else:
                received = self._clip(received)
            # equal weights: the noise is calibrated for a mean of the clipped updates
            kept.append(Message(RecordDict({protocol.ARRAYS: received,
                                            protocol.METRICS: MetricRecord({protocol.WEIGHT_KEY: 1})}),
                                dst_node_id=msg.metadata.src_node_id, message_type=MessageType.TRAIN))
        if not kept:
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is None:
            return None, None
        s = self.settings
        stdv = compute_stdv(s.noise_multiplier, s.clipping_norm, s.sampled_clients)
        noisy = [arrays[k].numpy().copy() for k in arrays.keys()]
        add_gaussian_noise_inplace(noisy, stdv)
        arrays = ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), noisy, strict=True)})
        if s.noise_multiplier > 0:
            self.accountant.compose(s.release(len(kept)))
        log.info("round %d: %d updates clipped to %g, noise std %.4g", server_round, len(kept), s.clipping_norm, stdv)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------- clipping
    def _update_norm(self, received: ArrayRecord) -> float:
        sent = self.sent_arrays
        return math.sqrt(sum(float(np.sum((received[k].numpy().astype(np.float64)
                                           - sent[k].numpy().astype(np.float64)) ** 2)) for k in sent.keys()))

    def _clip(self, received: ArrayRecord) -> ArrayRecord:
        if self._update_norm(received) == 0:  # nothing to clip (Flower's clip would divide by zero)
            return received
        keys = list(self.sent_arrays.keys())
        arrays = [received[k].numpy().copy() for k in keys]
        compute_clip_model_update(arrays, [self.sent_arrays[k].numpy() for k in keys], self.settings.clipping_norm)
        return ArrayRecord({k: Array(v) for k, v in zip(keys, arrays, strict=True)})
