"""A client site: its local data, its durable pool database, its model and oracle.

In deployment every Flower message starts a new ClientApp process, so nothing is kept
in memory between rounds: the SQLite database under the state directory is the
client's memory (labels, requests, budgets), and the global model arrives with each
message.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from clients.oracles import make_oracle
from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from fedal.federation import LocalData, client_data
from fedal.flower.protocol import TrainReport
from fedal.learner import ActiveLearner, pool_uncertainty
from fedal.models import build_model
from fedal.pool import PENDING, Pool
from fedal.sitedata import load_site


def node_client_id(node_config: dict) -> int:
    """The client's index: ``client-id`` from its node config, else the simulation's ``partition-id``."""
    for key in ("client-id", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise ConfigError(
        "the node config has neither client-id nor partition-id; start the SuperNode with "
        "--node-config \"client-id=0 ...\""
    )


def open_site_pool(state_dir: str | Path, client_id: int, data: LocalData, *, create: bool = True) -> Pool:
    """The durable pool of client ``client_id``: ``<state_dir>/client-<id>.db``, sized for its ``data``.

    ``create=False`` (the labeling page, the file exchange) refuses to make a new, empty
    database, which would mean a wrong ``state_dir`` or ``client_id``.
    """
    path = Path(state_dir) / f"client-{client_id}.db"
    if not create and not path.is_file():
        raise ConfigError(
            f"there is no client database {path}; give the state-dir and client-id of the SuperNode's node config "
            "(the file appears when the client handles its first round)"
        )
    return Pool(data.n_classes, size=len(data.y_pool), path=path)


class ClientSite:
    """Everything one client holds, opened for the handling of one message.

    Parameters
    ----------
    cfg : FederationConfig
        The run's settings.
    node_config : dict
        The SuperNode's own settings: ``client-id`` (or the simulation's ``partition-id``),
        ``state-dir``, ``data-path`` (the site's own data file, see :mod:`fedal.sitedata`),
        ``oracle`` (``simulated``, ``web`` or ``file``, see :mod:`clients.oracles`),
        ``query-timeout`` (overrides the run's).
    data : LocalData, optional
        The local data; default: the ``data-path`` file, else this client's share of
        the simulated federation.
    """

    def __init__(self, cfg: FederationConfig, node_config: dict, data: LocalData | None = None) -> None:
        self.cfg = cfg
        self.client_id = node_client_id(node_config)
        if data is None:
            path = node_config.get("data-path")
            data = load_site(str(path), self.client_id) if path else client_data(cfg, self.client_id)
        self.data = data
        state_dir = Path(str(node_config.get("state-dir") or cfg.client_state_dir))
        self.pool = open_site_pool(state_dir, self.client_id, self.data)
        timeout = float(node_config.get("query-timeout", cfg.query_timeout))
        self.query_timeout = timeout if timeout > 0 else None
        seed = cfg.seed * 1000 + self.client_id
        self.model = build_model(self.data.X_pool.shape[1:], self.data.n_classes, epochs=cfg.local_epochs,
                                 batch_size=cfg.batch_size, lr=cfg.lr, min_steps=cfg.min_local_steps, seed=seed)
        self.oracle = make_oracle(str(node_config.get("oracle", "simulated")), pool=self.pool, data=self.data,
                                  state_dir=state_dir, client_id=self.client_id, node_config=node_config,
                                  noise_rate=cfg.noise_rate, seed=seed)
        self.learner = ActiveLearner(self.model, cfg.strategy, self.data.X_pool, self.pool, self.oracle,
                                     cold_start=cfg.initial_strategy, seed=seed)

    def close(self) -> None:
        """Close the database."""
        self.pool.close()

    def train(self, global_state: dict, server_round: int, budget: int, proximal_mu: float = 0.0):
        """Label the initial set if needed, query within ``budget``, train; return (state, report)."""
        if budget < 0:
            raise ConfigError(f"the server sent a negative query budget ({budget})")
        self.model.set_state(global_state)
        self.pool.expire_overdue()
        if hasattr(self.oracle, "sync"):  # file exchange: take in the answers that came back before querying
            self.oracle.sync()
        counts = self.pool.counts()
        labels_before = counts["labeled"]
        # nothing labeled and nothing asked (a new site, or every request expired): ask for the
        # initial set; a crash right after asking leaves it pending, so it is not asked twice
        if labels_before == 0 and counts[PENDING] == 0:
            self.learner.query(self.cfg.initial_labels, round=0, timeout_s=self.query_timeout)
            self.pool.set_meta("initial-done", server_round)
        self.learner.model_ready = server_round > 1  # round 1's global model is untrained
        # a re-delivered message (process killed before replying) must not query twice: what this
        # round spent is read from its requests, written in the same transaction that made them
        # (expired requests gave their budget back)
        spent_before = self._spent(server_round)
        left = max(budget - spent_before, 0)
        self.pool.set_budget(server_round, budget)
        queried = 0
        mean_unc = math.nan
        if left > 0 and self.pool.counts()["unlabeled"] > 0:
            self._give_local_views()
            queried = len(self.learner.query(left, round=server_round, timeout_s=self.query_timeout))
            self.pool.spend_budget(server_round, spent_before + queried)
            mean_unc = self.learner.last_uncertainty[0]
        self.learner.teach(round=server_round)
        if math.isnan(mean_unc) and self.learner.model_ready:
            mean_unc = self._pool_uncertainty()
        X, y = self.learner.labeled_data()
        # people may not have answered anything yet: then the global model goes back unchanged
        # with weight 0 (num-examples) and the requests wait for the next round
        loss = self.model.fit(X, y, epochs=self.cfg.local_epochs, proximal_mu=proximal_mu) if len(y) else math.nan
        counts = self.pool.counts()
        report = TrainReport(
            num_examples=len(y), client_id=self.client_id, budget=budget, queries_used=spent_before + queried,
            labels_added=counts["labeled"] - labels_before, unlabeled_left=counts["unlabeled"],
            pending=counts["pending"], mean_uncertainty=mean_unc, train_loss=loss,
        )
        return self.model.get_state(), report

    def _spent(self, server_round: int) -> int:
        """Labels requested in ``server_round`` and not given back (pending or answered)."""
        return sum(1 for r in self.pool.requests() if r["round"] == server_round and r["status"] in ("pending", "answered"))

    def _give_local_views(self) -> None:
        """Federated-aware strategies (LoGo, KAFAL) also score with a local model and the local
        class counts (``QueryContext.extra``); train that model on the local labels now."""
        strategy = self.learner.strategy
        if not getattr(strategy, "needs_local_model", False) or not self.learner.model_ready:
            return
        from fedal.strategies import WithViews

        X, y = self.learner.labeled_data()
        local = build_model(self.data.X_pool.shape[1:], self.data.n_classes, epochs=self.cfg.local_epochs,
                            batch_size=self.cfg.batch_size, lr=self.cfg.lr, min_steps=self.cfg.min_local_steps,
                            seed=self.cfg.seed * 1000 + self.client_id + 7)
        if getattr(strategy, "local_model_init", "global") == "global":
            local.set_state(self.model.get_state())  # specialise the global model on local labels
        local.fit(X, y, epochs=self.cfg.local_model_epochs or self.cfg.local_epochs)
        self.learner.strategy = WithViews(strategy, local_model=local, class_counts=self.labeled_class_counts())

    def _pool_uncertainty(self) -> float:
        ids = self.pool.unlabeled_ids()
        if len(ids) == 0:
            return 0.0
        probs, _ = self.model.forward(self.data.X_pool[self.learner.rows(ids)])
        return pool_uncertainty(probs)[0]

    def evaluate(self, global_state: dict) -> tuple[int, float, float]:
        """``(n, loss, accuracy)`` of the global model on the local test set."""
        self.model.set_state(global_state)
        if len(self.data.y_test) == 0:
            return 0, math.nan, math.nan
        loss, acc = self.model.evaluate(self.data.X_test, self.data.y_test)
        return len(self.data.y_test), loss, acc

    def labeled_class_counts(self) -> np.ndarray:
        """How many labels of each class this client holds (stays on the device)."""
        _, labels = self.pool.labels()
        return np.bincount(labels, minlength=self.data.n_classes)
