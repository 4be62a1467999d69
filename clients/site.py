"""A client site: its local data, its durable pool database, its model and oracle.

In deployment every Flower message starts a new ClientApp process, so nothing is kept
in memory between rounds: the SQLite database under the state directory is the
client's memory (labels, requests, budgets), and the global model arrives with each
message.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import sys
from pathlib import Path

import numpy as np

from clients.node import NodeConfig, open_site_pool
from clients.oracles import FileOracle, make_oracle
from fedal.config import FederationConfig
from fedal.data import LocalData
from fedal.dp import centring, run_noise
from fedal.features import featurizer_for, model_inputs
from fedal.kpi import label_entropy, oracle_use
from fedal.federation import client_data
from fedal.learner import ActiveLearner, pool_uncertainty
from fedal.messages import TrainInstruction, TrainReport
from fedal.models import HandoverClassifier, model_for, secure_codec
from fedal.models.handover_adapter import HEAD_PREFIX, NET_PREFIX, SERVING, prefixed, serving_flag
from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS
from fedal.oracle import VerifyingOracle
from fedal.pool import PENDING
from fedal.secure import FixedPoint, renew_released
from fedal.seeds import client_seed, local_model_seed
from fedal.sitedata import at_run_size, load_folder_site, load_site
from fedal.strategies import WithViews


log = logging.getLogger("fedal.client")
#: a private run's report: what the server still needs (budgets, progress), nothing computed over the labels
PRIVATE_REPORT_BLANK = {"train_loss": math.nan, "label_entropy": math.nan, "batch_diversity": math.nan,
                        "auto_labeled": 0, "auto_correct": -1}


def private_report(report: TrainReport, keep_uncertainty: bool) -> TrainReport:
    """``report`` as a private run sends it: the loss, the class balance and the batch's spread (functions of the
    labels and their features) and self-training's counts left out; the pool's mean uncertainty only where the
    budget policy or a stopping rule reads it (docs/PRIVACY.md lists what stays and why)."""
    blank = dict(PRIVATE_REPORT_BLANK)
    if not keep_uncertainty:
        blank["mean_uncertainty"] = math.nan
    return dataclasses.replace(report, **blank)


def secure_random() -> np.random.Generator:
    """A generator seeded from the operating system's entropy: a private run's noise must not follow from the run's
    seed, which the server knows."""
    return np.random.default_rng(secrets.randbits(128))


class ClientSite:
    """Everything one client holds, opened for the handling of one message.

    Parameters
    ----------
    cfg : FederationConfig
        The run's settings.
    node : NodeConfig
        The SuperNode's own settings (client id, data file, state folder, oracle).
    data : LocalData, optional
        The local data; default: the ``data-path`` file, else this client's share of
        the simulated federation.
    """

    def __init__(self, cfg: FederationConfig, node: NodeConfig, data: LocalData | None = None) -> None:
        self.cfg = cfg
        self.client_id = node.client_id
        state_dir = Path(node.state_dir or cfg.client_state_dir)
        if not node.data_path and cfg.site_data:  # a simulation whose clients read their own files
            node = dataclasses.replace(node, data_path=cfg.site_path(self.client_id))
        gone = None
        #: what the scans of a folder site's files found (:class:`fedal.imagefolder.ScanReport`), else empty
        self.scans: list = []
        if data is None and node.folder:  # the site's own image files: new ones join, gone ones are marked
            pool_folder, test_folder = node.site_folders()
            data, gone, self.scans = load_folder_site(cfg, pool_folder, state_dir, self.client_id,
                                                      labels_csv=node.labels_csv, test_path=test_folder)
            for scan in self.scans:  # what changed in the folder, in the SuperNode's log (it stays on the site)
                if scan.read or scan.back:
                    log.warning("%s", "\n".join(scan.lines()))
        elif data is None:
            data = load_site(node.data_path, self.client_id) if node.data_path else client_data(cfg, self.client_id)
        self.data = data = at_run_size(cfg, data)
        self.pool = open_site_pool(state_dir, self.client_id, self.data, grow=gone is not None)
        if gone is not None:
            self.pool.set_gone(gone)
            if node.oracle != "simulated":  # labels the folder already gives start the labeled set
                self._take_given_labels()
        timeout = cfg.query_timeout if node.query_timeout is None else node.query_timeout
        self.query_timeout = timeout if timeout > 0 else None
        seed = client_seed(cfg.seed, self.client_id)
        # what the model sees: the pool's features, computed once and kept beside the database
        featurizer = featurizer_for(cfg.features, data.input_shape, cfg.pipeline)
        self.X_pool = model_inputs(featurizer, data.X_pool, state_dir / f"client-{self.client_id}.features.npz")
        self.X_test = model_inputs(featurizer, data.X_test, state_dir / f"client-{self.client_id}.test-features.npz")
        self.model = model_for(cfg, self.X_pool.shape[1:], data.n_classes, seed=seed, raw_shape=data.input_shape)
        if "torch" in sys.modules:  # a network: one core per client (Ray runs as many clients as cores)
            sys.modules["torch"].set_num_threads(1)
        self.oracle = make_oracle(node, pool=self.pool, data=data, state_dir=state_dir, cfg=cfg,
                                  predict=self._confident_view)
        self.learner = ActiveLearner(self.model, cfg.query_strategy(), self.X_pool, self.pool, self.oracle,
                                     cold_start=cfg.cold_start_strategy(), seed=seed)
        #: the labeled samples whose statistics the last :meth:`train` sent (head and hand-over pipelines; None
        #: before): a site's offline copy adds the others to the server's sums (:mod:`clients.offline`)
        self.sent_ids: np.ndarray | None = None
        #: private run: the most releases one of this site's samples has been in, and the centre of the last reply's
        #: labels (:meth:`_private_release`; the codec scales the labels' noise to its clip)
        self.dp_releases = 0
        self.dp_centre = None

    def close(self) -> None:
        """Close the database."""
        self.pool.close()

    def _take_given_labels(self) -> int:
        """Add the labels a folder site's files already have (class subfolders, its CSV) to the pool, once: a sample
        labeled, or asked of someone, keeps what it has. Returns how many were added."""
        given = np.flatnonzero(self.data.y_pool >= 0)
        free = np.intersect1d(given, self.pool.unlabeled_ids())
        if not len(free):
            return 0
        return self.pool.add_labeled({int(i): int(self.data.y_pool[i]) for i in free}, source="site-folder")

    def train(self, global_state: dict, instruction: TrainInstruction,
              global_stats: dict | None = None) -> tuple[dict, TrainReport]:
        """Label the initial set if needed, query within the round's budget, train; return (arrays, report).

        The arrays are the locally trained network (``pipeline = "network"``) or the class
        statistics of the labeled and self-trained samples (``pipeline = "head"``).

        Parameters
        ----------
        global_state : dict
            The global model (network weights or head).
        instruction : TrainInstruction
            The round, its query budget (checked by the instruction itself) and FedProx's weight.
        global_stats : dict, optional
            The server's summed statistics the message carried (head pipeline; a private run centres its labels on
            the pools' mean read from them).
        """
        server_round, budget = instruction.server_round, instruction.query_budget
        self.model.set_state(global_state)
        self.pool.expire_overdue()
        if isinstance(self.oracle, FileOracle):  # take in the answers that came back before querying
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
        reviewed = self._count_reviews()
        # the coordinator's uncertainty policy and the uncertainty stopping rule read it before a query round; a
        # pass over the pool in every round would cost a run of hundreds of one-step rounds most of its time
        if (math.isnan(mean_unc) and self.learner.model_ready and self.cfg.is_query_round(server_round + 1)
                and (self.cfg.local_steps == 0 or self.cfg.budget_policy == "uncertainty"
                     or "uncertainty" in self.cfg.stop_when)):
            mean_unc = self._pool_uncertainty()
        X, y = self.learner.labeled_data()
        auto = auto_correct = 0
        if self.cfg.head_private:
            arrays, loss = self._private_release(instruction, global_stats), math.nan
        elif self.cfg.pipeline == "head":
            arrays, loss, auto, auto_correct = self._head_statistics(X, y)
        elif self.cfg.pipeline == "handover":
            arrays, loss, auto, auto_correct = self._handover_update(X, y, instruction)
        else:
            # people may not have answered anything yet: then the global model goes back unchanged
            # with weight 0 (num-examples) and the requests wait for the next round
            # the model is built anew for each message: the round tells this fit's batches from the last one's
            loss = (self.model.fit(X, y, epochs=self.cfg.local_epochs, proximal_mu=instruction.proximal_mu,
                                   lr=self.cfg.lr * instruction.lr_factor, draw=server_round,
                                   unlabeled=self._pool_inputs())
                    if len(y) else math.nan)
            arrays = self.model.get_state()
        counts = self.pool.counts()
        made, answered, wait = oracle_use(self.pool.requests())
        report = TrainReport(
            num_examples=len(y), client_id=self.client_id, queries_used=spent_before + queried,
            labels_added=counts["labeled"] - labels_before, unlabeled_left=counts["unlabeled"],
            pending=counts["pending"], mean_uncertainty=mean_unc, train_loss=loss, auto_labeled=auto,
            auto_correct=auto_correct, requests_made=made, requests_answered=answered, answer_seconds=wait,
            batch_diversity=self.learner.last_batch_diversity if queried >= 2 else math.nan,
            label_entropy=label_entropy(y, self.data.n_classes), labels_reviewed=reviewed,
            dp_releases=self.dp_releases,
        )
        if self.cfg.sites_add_noise:
            report = private_report(report, keep_uncertainty=self.cfg.budget_policy == "uncertainty"
                                    or "uncertainty" in self.cfg.stop_when)
        return arrays, report

    # ------------------------------------------------------------- private run (fedal.dp)
    def _private_release(self, instruction: TrainInstruction, global_stats: dict | None) -> dict:
        """This round's private reply (:mod:`fedal.dp`): the counts and sums of the labels the server's sums do not
        hold yet (in a release round, centred on the pools' mean of ``global_stats``), and the pool's statistics
        until the sums hold them, with this site's noise (in the clear all of it; under secure aggregation the codec
        adds the site's share on the integer grid).

        The site's ledger (in its database) keeps what each reply held. ``instruction.dp_included``, the rounds whose
        reply of this site the server added, settles them: a reply the sums hold is never sent again; one they do
        not hold is sent again. In the clear every send is a release, counted, at most ``head-dp-releases`` per
        sample (a label that would need more is held back, logged); under secure aggregation a reply outside the sum
        was never unmasked, so only the one that reached it counts. With ``dp_included`` None (the server does not
        know this site yet) nothing is settled and what waits is not sent again."""
        server_round, included = instruction.server_round, instruction.dp_included
        pool, noise = self.pool, self.private_noise()
        ledger = json.loads(pool.get_meta("dp-ledger", "{}"))
        settled = set(json.loads(pool.get_meta("dp-settled", "[]")))
        sends = {int(k): v for k, v in json.loads(pool.get_meta("dp-sends", "{}")).items()}
        pool_state = json.loads(pool.get_meta("dp-pool", '{"settled": false, "sends": 0}'))
        if included is not None:
            for key in [k for k in ledger if int(k) < server_round]:
                if int(key) in included:
                    settled.update(ledger[key]["labels"])
                    pool_state["settled"] = pool_state["settled"] or ledger[key]["pool"]
                del ledger[key]
        ledger.pop(str(server_round), None)  # a message delivered again: its reply is made anew
        waiting = {i for entry in ledger.values() for i in entry["labels"]}
        pool_waiting = any(entry["pool"] for entry in ledger.values())
        centre = centring(global_stats, self.cfg.head_clip_norm)
        send = []
        if instruction.dp_release and centre is not None:
            limit = self.cfg.head_dp_releases if not noise.secure else None
            ids, labels = pool.labels()
            fresh = [(int(i), int(k)) for i, k in zip(ids, labels) if int(i) not in settled and int(i) not in waiting]
            held = [i for i, _ in fresh if limit is not None and sends.get(i, 0) >= limit]
            send = [(i, k) for i, k in fresh if limit is None or sends.get(i, 0) < limit]
            if held:
                log.warning("round %d: %d label(s) are held back: each was in %d replies that did not reach the "
                            "server's sums, the most head-dp-releases allows", server_round, len(held), limit)
        for i, _ in send:
            sends[i] = sends.get(i, 0) + 1
        send_pool = not pool_state["settled"] and not pool_waiting
        if send_pool:
            pool_state["sends"] += 1
        ledger[str(server_round)] = {"labels": [i for i, _ in send], "pool": send_pool}
        pool.set_meta("dp-ledger", json.dumps(ledger))
        pool.set_meta("dp-settled", json.dumps(sorted(settled)))
        pool.set_meta("dp-sends", json.dumps({str(k): v for k, v in sorted(sends.items())}))
        pool.set_meta("dp-pool", json.dumps(pool_state))
        if noise.secure:  # only a reply inside the unmasked sum released anything
            self.dp_releases = 1 if settled or pool_state["settled"] else 0
        else:
            self.dp_releases = max([pool_state["sends"], *sends.values()])
        send_ids = np.array([i for i, _ in send], dtype=np.int64)
        self.sent_ids = np.array(sorted(settled | waiting | set(send_ids.tolist())), dtype=np.int64)
        X_sent = self.X_pool[self.learner.rows(send_ids)] if len(send_ids) else np.zeros((0,) + self.X_pool.shape[1:])
        arrays = self.model.private_statistics(X_sent, np.array([k for _, k in send], dtype=np.int64),
                                               self.X_pool if send_pool else None, centre=centre)
        if not noise.secure:
            arrays = noise.centred(centre).add_gaussian(arrays, secure_random())
        self.dp_centre = centre
        return arrays

    def private_noise(self):
        """The run's :class:`fedal.dp.StatisticsNoise` (the server computes the same)."""
        return run_noise(self.cfg, self.data.n_classes, self.model.dim)

    def _head_statistics(self, X: np.ndarray, y: np.ndarray, *, with_loss: bool = True
                         ) -> tuple[dict, float, int, int]:
        """Class statistics of the labeled samples and, self-training, of the pool samples the global
        head is confident about: ``(arrays, loss of the global head on the labels, auto-labeled, right)``
        (the loss NaN without ``with_loss``).
        With ``min-class-count`` above 1 (the default without secure aggregation), of the released labeled
        samples only, and of the classes with that many self-trained samples (:meth:`_released`)."""
        unlabeled_rows = self.learner.rows(self.pool.unlabeled_ids())
        ready = self.learner.model_ready
        loss = self.model.evaluate(X, y)[0] if with_loss and ready and len(y) else math.nan
        X_sent, y_sent = self._released()
        # the head reads a row's features only: a hand-over row's input part is not copied for it
        head, cols = ((self.model.head, slice(0, self.model.head.dim)) if isinstance(self.model, HandoverClassifier)
                      else (self.model, slice(None)))
        labeled, pseudo, added = head.statistics(X_sent[:, cols], y_sent,
                                                 self.X_pool[unlabeled_rows, cols] if ready else None,
                                                 min_count=self.cfg.clear_min_count)
        truth = self.data.y_pool[unlabeled_rows[added.positions]]
        correct = int(np.sum(truth == added.labels)) if np.all(truth >= 0) else -1  # -1: no ground truth here
        arrays = {**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)}
        return arrays, loss, len(added), correct

    def _released(self) -> tuple[np.ndarray, np.ndarray]:
        """The labeled samples whose statistics this round sends (:func:`fedal.secure.renew_released`: every class
        with at least ``min-class-count`` labels, renewed only when as many new ones came); the released sets
        are kept in the site's database."""
        ids, labels = self.pool.labels()
        if self.cfg.clear_min_count <= 1:
            self.sent_ids = ids
            return self.X_pool[self.learner.rows(ids)], labels
        before = {int(k): v for k, v in json.loads(self.pool.get_meta("released-labels", "{}")).items()}
        released = renew_released(dict(zip(ids.tolist(), labels.tolist())), before, self.cfg.clear_min_count)
        if released != before:
            self.pool.set_meta("released-labels", json.dumps({str(k): v for k, v in sorted(released.items())}))
        pairs = sorted((i, k) for k, v in released.items() for i in v)
        sent_ids = self.sent_ids = np.array([i for i, _ in pairs], dtype=np.int64)
        return self.X_pool[self.learner.rows(sent_ids)], np.array([k for _, k in pairs], dtype=np.int64)

    def secure_codec(self) -> FixedPoint:
        """The fixed-point encoding of this run's secure aggregation (the server's is the same; in a private run it
        adds this site's share of the noise, drawn from the operating system's entropy)."""
        return secure_codec(self.cfg, self.model, noise_rng=secure_random() if self.cfg.sites_add_noise else None,
                            centre=self.dp_centre)

    def _handover_update(self, X: np.ndarray, y: np.ndarray, instruction: TrainInstruction
                         ) -> tuple[dict, float, int, int]:
        """The head's statistics (as :meth:`_head_statistics`) and the locally trained network, with the serving
        flag as received: ``(arrays, the network's loss, auto-labeled, right)``. The network learns from the labels
        only (the head's pseudo-labels in its batches cost it 4-5 points on BloodMNIST: BENCHMARKS.md)."""
        # (the serving model's loss on the labels is not sent: a network's pass over them would grow every round)
        head_arrays, _, auto, auto_correct = self._head_statistics(X, y, with_loss=False)
        model = self.model
        loss = math.nan
        if len(y):
            pool = self._pool_inputs()
            loss = model.net.fit(model.inputs(X), y, epochs=self.cfg.local_epochs,
                                 proximal_mu=instruction.proximal_mu, lr=self.cfg.lr * instruction.lr_factor,
                                 draw=instruction.server_round, unlabeled=None if pool is None else model.inputs(pool))
        state = prefixed(head_arrays, HEAD_PREFIX)
        state.update(prefixed(model.net.get_state(), NET_PREFIX))
        state[SERVING] = serving_flag(model.serving)  # as received
        return state, loss, auto, auto_correct

    def _pool_inputs(self) -> np.ndarray | None:
        """The unlabeled pool's rows for the network's consistency loss (``consistency > 0``), else None."""
        if self.cfg.consistency <= 0:
            return None
        return self.X_pool[self.learner.rows(self.pool.unlabeled_ids())]

    def _spent(self, server_round: int) -> int:
        """Labels requested in ``server_round`` and not given back: pending, answered, or answered "unsure"
        (skipped: the reader's time was spent; only an expired request gives its budget back)."""
        return sum(1 for r in self.pool.requests()
                   if r["round"] == server_round and r["status"] in ("pending", "answered", "skipped"))

    def _confident_view(self, ids) -> tuple[np.ndarray, np.ndarray] | None:
        """The current global model's class and confidence for pool samples ``ids`` (None while untrained):
        what a second reading (``verify-threshold``) is decided on."""
        if not self.learner.model_ready:
            return None
        probs, _ = self.model.forward(self.learner.inputs(ids))
        return probs.argmax(axis=1), probs.max(axis=1)

    def _count_reviews(self) -> int:
        """Second readings of this site so far (kept in the pool database: each message is a new process)."""
        total = int(self.pool.get_meta("labels-reviewed", "0"))
        if isinstance(self.oracle, VerifyingOracle) and self.oracle.verifications:
            total += self.oracle.verifications
            self.oracle.verifications = 0
            self.pool.set_meta("labels-reviewed", total)
        return total

    def _give_local_views(self) -> None:
        """Federated-aware strategies (LoGo, KAFAL) also score with a local model and the local
        class counts (``QueryContext.extra``); train that model on the local labels now."""
        strategy = self.learner.strategy
        if isinstance(strategy, WithViews):  # views of an earlier round: make this round's
            strategy = strategy.inner
        if not strategy.needs_local_model or not self.learner.model_ready:
            return
        X, y = self.learner.labeled_data()
        local = model_for(self.cfg, self.X_pool.shape[1:], self.data.n_classes,
                          seed=local_model_seed(self.cfg.seed, self.client_id), raw_shape=self.data.input_shape)
        if strategy.local_model_init == "global":
            local.set_state(self.model.get_state())  # specialise the global model on local labels
        local.fit(X, y, epochs=self.cfg.local_model_epochs or self.cfg.local_epochs)
        self.learner.strategy = WithViews(strategy, local_model=local, class_counts=self.labeled_class_counts())

    def _pool_uncertainty(self) -> float:
        ids = self.pool.unlabeled_ids()
        if len(ids) == 0:
            return 0.0
        probs, _ = self.model.forward(self.learner.inputs(ids))
        return pool_uncertainty(probs)[0]

    def evaluate(self, global_state: dict) -> tuple[int, float, float]:
        """``(n, loss, accuracy)`` of the global model on the local test set."""
        self.model.set_state(global_state)
        if len(self.data.y_test) == 0:
            return 0, math.nan, math.nan
        loss, acc = self.model.evaluate(self.X_test, self.data.y_test)
        return len(self.data.y_test), loss, acc

    def evaluate_each(self) -> dict[str, float]:
        """The handover pipeline: the local test accuracy of the head and of the network (set by
        :meth:`evaluate`), under the names the server reads (:data:`server.handover.EVAL_METRICS`)."""
        if not isinstance(self.model, HandoverClassifier):
            return {}
        if len(self.data.y_test) == 0:
            return {"eval-acc-head": math.nan, "eval-acc-network": math.nan}
        each = self.model.evaluate_each(self.X_test, self.data.y_test)
        return {"eval-acc-head": each["head"][1], "eval-acc-network": each["network"][1]}

    def labeled_class_counts(self) -> np.ndarray:
        """How many labels of each class this client holds (stays on the device)."""
        _, labels = self.pool.labels()
        return np.bincount(labels, minlength=self.data.n_classes)
