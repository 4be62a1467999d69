"""The server optimisers' step, for loops without Flower (benchmarks, ``fedal compare``'s pooled reference).

A federation's global update is computed by Flower's own strategies (:mod:`server.strategy`); this
module computes the same update from the current weights and the clients' example-weighted mean,
so that a bare loop (one site holding every label, or a benchmark's federation) trains exactly as
the run does: FedAvg takes the mean, FedAvgM (server learning rate 1) adds momentum to the
pseudo-gradient ``old - mean``, FedAdam (beta_1 0.9, beta_2 0.999, tau 1e-8, as fedal sets it) takes
its bias-corrected Adam step. Statistics (``buffers``: BatchNorm's running statistics, a network's
input standardisation) are the mean, as :class:`server.strategy.BudgetedStrategy` keeps them.
"""
from __future__ import annotations

import numpy as np

#: aggregations whose server keeps an optimiser state
SERVER_OPTIMISERS = ("fedavgm", "fedadam")
BETA_1, BETA_2, TAU = 0.9, 0.999, 1e-8


class ServerOptimiser:
    """The server's update of a run's ``aggregation``, with its state between rounds.

    Parameters
    ----------
    cfg : fedal.config.FederationConfig
        ``aggregation``, ``server_lr``, ``server_momentum`` and the ``lr_schedule`` over ``rounds``.
    buffers : iterable of str
        Keys that are statistics: averaged, never stepped on.
    """

    def __init__(self, cfg, buffers=()) -> None:
        self.cfg = cfg
        self.buffers = set(buffers)
        self.memory: dict = {}

    def client_lr_factor(self, server_round: int) -> float:
        """The factor of the clients' learning rate in ``server_round`` (FedAdam takes the schedule itself)."""
        return 1.0 if self.cfg.aggregation == "fedadam" else self.cfg.round_lr_factor(server_round)

    def step(self, state: dict, mean: dict, server_round: int) -> dict:
        """The new global weights of round ``server_round`` from the current ``state`` and the clients'
        example-weighted ``mean``."""
        cfg = self.cfg
        if cfg.aggregation not in SERVER_OPTIMISERS:
            return mean
        new = {}
        for k, x in state.items():
            if k in self.buffers:
                new[k] = mean[k]
                continue
            x64 = x.astype(np.float64)
            delta = mean[k].astype(np.float64) - x64
            if cfg.aggregation == "fedavgm":
                grad = -delta
                self.memory[k] = grad if k not in self.memory else cfg.server_momentum * self.memory[k] + grad
                new[k] = (x64 - self.memory[k]).astype(x.dtype)
                continue
            m, v = self.memory.get(k, (np.zeros_like(x64), np.zeros_like(x64)))
            m = BETA_1 * m + (1 - BETA_1) * delta
            v = BETA_2 * v + (1 - BETA_2) * delta ** 2
            self.memory[k] = (m, v)
            eta = cfg.server_lr * cfg.round_lr_factor(server_round)
            # Flower's FedAdam counts its bias correction from server_round + 1
            eta_norm = eta * np.sqrt(1 - BETA_2 ** (server_round + 1.0)) / (1 - BETA_1 ** (server_round + 1.0))
            new[k] = (x64 + eta_norm * m / (np.sqrt(v) + TAU)).astype(x.dtype)
        return new
