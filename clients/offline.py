"""A site that keeps labeling while its server is away: ``fedal site``.

Two halves share the site's state folder:

* the ClientApp, with every train message (:class:`ServerContact`): notes the contact in the
  site database, keeps the global model it received (with the round, the offline budget the
  server granted, the run's and the node's settings) in ``client-<id>.global.npz``
  (:class:`fedal.offline.GlobalSnapshot`, written atomically; once the reply is made, the labels it
  sent in ``client-<id>.reply.json`` beside it), and reports in its reply the labels asked offline
  since its last reply;
* ``fedal site --state-dir DIR --client-id N`` (:class:`OfflineSite`), a process the site runs
  beside its SuperNode and labeling page. While the server has been silent for longer than
  the node's ``offline-after`` it scores the pool with its own copy of the model (the stored
  global model plus what it learnt from the labels given since), opens requests on the
  labeling page / in the file exchange, at most ``batch`` waiting at a time and never more
  than the offline budget in all, and trains its copy on each answer. With the head pipeline
  the copy is exact: the global sums plus the statistics of the new labels. When the server is
  back, the next round trains on every label given meanwhile (all labels are in the database;
  pending requests are never asked again) and reports the offline spend, which the server's
  budget coordinator takes from the site's next shares.

When the offline budget is spent the site opens no more requests: people still answer the
ones open, the copy still learns from them, and everything waits for the server. After
``offline-max-hours`` without the server it stops asking altogether (the model is too old).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from clients.node import NodeConfig
from clients.oracles import FileOracle, HumanOracle
from clients.site import ClientSite
from fedal.config import FederationConfig
from fedal.exceptions import ConfigError, DataFileError, OutputError, ProtocolError
from fedal.heads import ClassStatistics
from fedal.messages import TrainInstruction, TrainReport
from fedal.models.handover_adapter import HandoverClassifier
from fedal.models.head_adapter import LABELED_STATS, POOL_STATS, PSEUDO_STATS, HeadClassifier
from fedal.offline import (CLOCK_SAMPLES, LAST_CONTACT, LAST_CONTACT_CLOCK, LAST_CONTACT_ROUND, LAST_REPLY,
                           OFFLINE_AFTER, OFFLINE_GRANT, OFFLINE_LOOP, OFFLINE_MAX_HOURS, SERVER_CLOCK, SUGGESTIONS,
                           GlobalSnapshot, clock_reading, link_status, message_age, snapshot_path)
from fedal.pool import PENDING

#: offline requests waiting for an answer at once (default): people get the next ones from a model that learnt
#: from the last answers
DEFAULT_BATCH = 5


@contextmanager
def site_lock(state_dir: str | os.PathLike, client_id: int):
    """Hold ``<state_dir>/client-<id>.site.lock`` (``flock``) while the ``with`` block runs: one ``fedal site`` per
    site. The lock goes with the process, however it ends (even SIGKILL); the file stays, with the last holder's pid.

    Raises
    ------
    ConfigError
        Another process holds it (named by its pid).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock (the grant is still checked in each write transaction)
        yield
        return
    path = Path(state_dir) / f"client-{int(client_id)}.site.lock"
    try:
        handle = open(path, "a+", encoding="ascii")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}): `fedal site` writes in the state folder as "
                          "the SuperNode does; run it as the user the SuperNode runs as") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(f"another `fedal site` (pid {holder}) already runs for client {client_id} on {state_dir} "
                              f"(it holds {path}); one loop per site: leave that one running, or stop it first "
                              f"(kill {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def state_dir_of(cfg: FederationConfig, node: NodeConfig) -> Path:
    """The site's state folder (the node config's, else the run's), as :class:`ClientSite` uses it."""
    return Path(node.state_dir or cfg.client_state_dir)


def effective_grant(granted: int, node: NodeConfig) -> int:
    """The offline budget a site uses: the server's grant, lowered (never raised) by the node's ``offline-budget``."""
    return granted if node.offline_budget is None else min(granted, node.offline_budget)


def note_contact(pool, node: NodeConfig, server_round: int | None) -> None:
    """Record in the site database that a message from the server came now (and the node's offline settings,
    which the labeling page reads; with ``suggest`` off, the model's suggestions leave the page)."""
    reading = clock_reading()
    with pool.transaction():
        pool.set_meta(LAST_CONTACT, repr(reading["wall"]))
        pool.set_meta(LAST_CONTACT_CLOCK, json.dumps(reading))  # how long ago, whatever is done to the wall clock
        if server_round is not None:
            pool.set_meta(LAST_CONTACT_ROUND, server_round)
        pool.set_meta(OFFLINE_AFTER, node.offline_after)
        pool.set_meta(OFFLINE_MAX_HOURS, node.offline_max_hours)
        if not node.suggest:
            clear_suggestions(pool)


def clear_suggestions(pool) -> None:
    """Take the model's suggestions off the labeling page (the node's ``suggest`` is off)."""
    if pool.get_meta(SUGGESTIONS, "{}") != "{}":
        pool.set_meta(SUGGESTIONS, "{}")


class ServerContact:
    """What the ClientApp does around :meth:`ClientSite.train` for the site's offline half.

    Parameters
    ----------
    site : ClientSite
        The site handling the message.
    cfg, node : FederationConfig, NodeConfig
        The run's and the node's settings.
    run_id : int
        Flower's run id of the message.
    run_config, node_config : dict
        The settings as Flower gave them (kept in the snapshot to rebuild the site without a message).
    global_state : dict
        The global model of the message.
    global_stats : dict or None
        Head pipeline: the summed statistics it was solved from.
    instruction : TrainInstruction
        The round and its budgets.
    sent_at : float, optional
        When the server made the message (``time.time()`` seconds; Flower's ``created_at``).

    Raises
    ------
    ProtocolError
        The message is stale: older than the run's ``round-timeout`` (the server stopped waiting for its reply;
        the SuperLink kept it while the site was away), or older than a round this site already handled in the
        same run. Training on it would spend a budget the server already wrote off.
    """

    def __init__(self, site: ClientSite, cfg: FederationConfig, node: NodeConfig, *, run_id: int, run_config: dict,
                 node_config: dict, global_state: dict, global_stats: dict | None,
                 instruction: TrainInstruction, sent_at: float | None = None) -> None:
        self.site, self.node, self.instruction = site, node, instruction
        self.path = snapshot_path(state_dir_of(cfg, node), site.client_id)
        self.run_id, self.state, self.stats = int(run_id), global_state, global_stats
        self.run_config = dict(run_config)
        self.node_config = _resolved(node_config)
        previous = self._previous()
        server_round = instruction.server_round
        stale_problem(cfg, server_round, sent_at, pool=site.pool)
        if previous is not None and previous.run_id == self.run_id and previous.server_round > server_round:
            raise ProtocolError(f"the train message of round {server_round} is older than round "
                                f"{previous.server_round}, which this site already handled in run {self.run_id}: "
                                "it waited at the SuperLink while the site was away; not trained on")
        # this site's labels inside the global sums: what it sent in the round they sum (none if it was away)
        self.included = np.zeros(0, np.int64)
        if previous is not None and previous.run_id == self.run_id:
            if previous.server_round == server_round - 1 and previous.replied:
                self.included = previous.sent_ids
            elif previous.server_round == server_round:  # the same round re-delivered
                self.included = previous.included_ids
        note_contact(site.pool, node, server_round)
        # kept as soon as it arrives: a site cut off in the middle of the round still has it
        self.snapshot = GlobalSnapshot(self.run_id, server_round, time.time(), dict(self.state), self.stats,
                                       self.included, np.zeros(0, np.int64), False, instruction.offline_budget,
                                       self.run_config, self.node_config)
        self.snapshot.save(self.path)
        site.pool.set_meta(OFFLINE_GRANT, json.dumps({"round": server_round, "budget": effective_grant(
            instruction.offline_budget, node)}))  # what the labeling page shows

    def _previous(self) -> GlobalSnapshot | None:
        if not self.path.is_file():
            return None
        try:
            return GlobalSnapshot.load(self.path, models=False)  # its ids and round; the model is replaced
        except (ConfigError, DataFileError):  # unreadable: this message writes a new one
            return None

    def report(self, report: TrainReport) -> TrainReport:
        """After training: keep the global model beside the ledger and add the offline spend to ``report``."""
        pool, server_round = self.site.pool, self.instruction.server_round
        offline_spent = pool.report_offline(server_round)
        sent = self.site.sent_ids  # the labels in this reply's statistics (min-class-count holds some back)
        self.snapshot.save_reply(self.path, pool.labeled_ids() if sent is None else sent)  # the model is on disk
        note_contact(pool, self.node, server_round)  # the site was busy with the server until now
        pool.set_meta(LAST_REPLY, repr(time.time()))
        return dataclasses.replace(report, offline_spent=offline_spent)


def stale_problem(cfg: FederationConfig, server_round: int, sent_at: float | None, *, pool=None) -> None:
    """Raise :class:`ProtocolError` if a message of ``server_round`` made at ``sent_at`` (the server's clock) is older
    than the run's ``round-timeout``: the server no longer waits for its reply.

    The site's clock and the server's need not agree: with the site's ``pool`` the age is measured against the
    freshest of the last messages (:func:`fedal.offline.message_age`; this one is kept among them), so a site clock
    minutes or hours ahead is not taken for a message that waited; without it, the two clocks are assumed to agree.
    """
    if sent_at is None or not sent_at > 0:
        return
    now = clock_reading()
    if pool is None:
        age, offset, reference = now["wall"] - float(sent_at), now["wall"] - float(sent_at), False
    else:
        try:
            seen = [s for s in json.loads(pool.get_meta(SERVER_CLOCK, "[]")) if isinstance(s, dict)
                    and all(isinstance(s.get(k), (int, float)) for k in ("offset", "wall"))]
        except (ValueError, TypeError):  # damaged: start measuring anew
            seen = []
        age, offset, reference = message_age(float(sent_at), seen, now)
        pool.set_meta(SERVER_CLOCK, json.dumps([*seen, {"offset": offset, **now}][-CLOCK_SAMPLES:]))
    if age <= cfg.round_timeout:
        return
    if reference:
        raise ProtocolError(
            f"the message of round {server_round} was made about {age:.0f} s before it reached this site, longer than "
            f"the run's round-timeout ({cfg.round_timeout:g} s): the server stopped waiting for its reply (it waited "
            f"at the SuperLink while this site was away); not handled (its age is measured against the freshest of "
            f"this site's last {CLOCK_SAMPLES} messages, whatever the difference between its clock and the server's: "
            f"by this site's clock it came {offset:.0f} s after its time, the freshest {offset - age:.0f} s after)")
    raise ProtocolError(
        f"the message of round {server_round} is {age:.0f} s older than this site's clock, longer than the run's "
        f"round-timeout ({cfg.round_timeout:g} s): either it waited at the SuperLink while this site was away (the "
        "server stopped waiting for its reply), or this site's clock is ahead of the server's by that much (check "
        "both clocks, e.g. `timedatectl`); not handled")


def _resolved(node_config: dict) -> dict:
    """The node config with its paths made absolute (``fedal site`` may run in another folder)."""
    out = dict(node_config)
    for key in ("data-path", "state-dir", "exchange-dir"):
        if out.get(key):
            out[key] = str(Path(str(out[key])).expanduser().resolve())
    return out


class OfflineSite:
    """The site on its own while the server is away (see the module docstring); one :meth:`step` at a time.

    Parameters
    ----------
    state_dir : path
        The SuperNode's state folder (holds ``client-<id>.db`` and ``client-<id>.global.npz``).
    client_id : int
        The SuperNode's client id.
    batch : int
        Most offline requests waiting for an answer at once.
    """

    def __init__(self, state_dir: str | os.PathLike, client_id: int, *, batch: int = DEFAULT_BATCH) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigError(f"--batch must be an integer >= 1 (requests waiting at once), got {batch!r}")
        self.state_dir = Path(state_dir).expanduser().resolve()
        self.client_id = int(client_id)
        self.batch = batch
        self.path = snapshot_path(self.state_dir, self.client_id)
        self.snapshot: GlobalSnapshot | None = None
        self.site: ClientSite | None = None
        self.node: NodeConfig | None = None
        self._fitted_on: tuple | None = None  # the labels the network copy was last trained on

    def close(self) -> None:
        """Close the site database."""
        if self.site is not None:
            self.site.close()
            self.site = None

    def _open(self) -> None:
        """(Re)build the site from the stored settings whenever the ClientApp stored a newer global model."""
        snapshot = GlobalSnapshot.load(self.path)
        if self.snapshot is not None and (snapshot.run_id, snapshot.server_round, snapshot.received_at) == (
                self.snapshot.run_id, self.snapshot.server_round, self.snapshot.received_at):
            return
        self.close()
        cfg = FederationConfig.from_run_config(snapshot.run_config)
        node = NodeConfig.from_mapping({**snapshot.node_config, "state-dir": str(self.state_dir)})
        if node.client_id != self.client_id:
            raise ConfigError(f"{self.path} belongs to client {node.client_id}, not {self.client_id}; give the "
                              "SuperNode's --client-id")
        self.site, self.node, self.snapshot, self._fitted_on = ClientSite(cfg, node), node, snapshot, None

    def step(self, now: float | None = None) -> dict:
        """One look at the site: if the server is away, update the copy and open the requests the budget allows.

        Returns what it saw and did: ``state`` (``connected``, ``offline``, ``spent``: offline budget used up,
        ``expired``: offline longer than ``offline-max-hours``), ``round`` (of the stored model), ``budget``,
        ``spent``, ``left``, ``asked`` (requests opened now), ``waiting`` (offline requests not answered yet)
        and ``labeled``.
        """
        self._open()
        site, node, snapshot = self.site, self.node, self.snapshot
        pool = site.pool
        status = link_status(pool.get_meta, now)
        budget = effective_grant(snapshot.offline_budget, node)
        pool.expire_overdue()
        asked = np.zeros(0, np.int64)
        state = "connected" if status.connected else "expired" if status.expired else "offline"
        if state != "connected":  # (while connected, the ClientApp takes the file exchange's answers in)
            if isinstance(site.oracle, FileOracle):  # answers that came back by file
                site.oracle.sync()
            self._own_copy()
            left = max(budget - pool.offline_spent(grant_round=snapshot.server_round), 0)
            if state == "offline" and left == 0:
                state = "spent"
            room = min(left, self.batch - self._waiting())
            if state == "offline" and room > 0 and len(pool.unlabeled_ids()):
                # the grant and the batch are checked again in the transaction that writes the requests: another
                # process asking at the same moment (a second `fedal site`, cron's --once) cannot make both exceed them
                asked = site.learner.query(room, round=None, timeout_s=site.query_timeout,
                                           offline_grant=snapshot.server_round, offline_budget=budget,
                                           most_waiting=self.batch)
                if not isinstance(site.oracle, (HumanOracle, FileOracle)):  # a simulated oracle answers now
                    site.learner.teach(round=None)
                elif isinstance(site.oracle, FileOracle):
                    site.oracle.sync()
            if len(asked):
                self._own_copy()
        if node.suggest:
            self._suggest()
        else:  # turned off since: the page shows none
            clear_suggestions(pool)
        spent = pool.offline_spent(grant_round=snapshot.server_round)
        out = {"state": state, "round": snapshot.server_round, "budget": budget, "spent": spent,
               "left": max(budget - spent, 0), "asked": len(asked), "waiting": self._waiting(),
               "labeled": pool.counts()["labeled"], "offline_since": status.offline_since,
               "clock_problem": status.clock_problem}
        pool.set_meta(OFFLINE_LOOP, json.dumps({"pid": os.getpid(), "at": time.time(), "state": state}))
        return out

    def _waiting(self) -> int:
        return sum(1 for r in self.site.pool.offline_requests() if r["status"] == PENDING)

    def _own_copy(self) -> None:
        """The site's model: the stored global one plus what the labels given since teach it."""
        site, snapshot = self.site, self.snapshot
        model, pool = site.model, site.pool
        ids, labels = pool.labels()
        rows = site.X_pool[site.learner.rows(ids)]
        if isinstance(model, HeadClassifier):
            model.set_state(snapshot.state)
            self._own_head(model, rows, ids, labels)
            site.learner.model_ready = model.head is not None
            return
        key = (tuple(ids), tuple(labels))
        if key == self._fitted_on:
            return
        model.set_state(snapshot.state)  # (the handover pipeline: both global models and which one serves)
        if isinstance(model, HandoverClassifier):
            self._own_head(model.head, model.features(rows), ids, labels)
            net, inputs = model.net, model.inputs(rows)
        else:
            net, inputs = model, rows
        if len(labels):  # the network: the global weights fine-tuned on every local label
            net.fit(inputs, labels, epochs=site.cfg.local_epochs, lr=site.cfg.lr, draw=snapshot.server_round)
        self._fitted_on = key
        site.learner.model_ready = snapshot.server_round > 1 or len(labels) > 0

    def _own_head(self, head: HeadClassifier, X: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        """The stored global head plus the labels given since (features ``X`` of the labeled ``ids``): exact from
        the stored global sums; without them (an untrained global head) the site's own labels only."""
        snapshot = self.snapshot
        if snapshot.global_stats is not None and f"{POOL_STATS}.counts" in snapshot.global_stats:
            return  # a private run's sums are noisy and their noise unknown here: the stored global head serves
        if snapshot.global_stats is not None:
            new = ~np.isin(ids, snapshot.included_ids)
            added, _, _ = head.statistics(X[new] if new.any() else np.zeros((0, head.dim)), labels[new])
            head.fit_statistics(ClassStatistics.from_arrays(snapshot.global_stats, LABELED_STATS) + added,
                                ClassStatistics.from_arrays(snapshot.global_stats, PSEUDO_STATS))
        elif head.head is None and len(labels):
            head.fit(X, labels)

    def _suggest(self) -> None:
        """The copy's class and confidence for each pending request (``suggest = true``), for the labeling page."""
        site = self.site
        ids = site.pool.pending_ids()
        if not site.learner.model_ready:
            self._own_copy()
        out = {}
        if len(ids) and site.learner.model_ready:
            probs, _ = site.model.forward(site.learner.inputs(ids))
            out = {str(int(i)): [int(p.argmax()), round(float(p.max()), 4)] for i, p in zip(ids, probs)}
        site.pool.set_meta(SUGGESTIONS, json.dumps(out))
