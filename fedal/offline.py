"""What a site keeps to go on without its server: the last global model and how it stands.

A site's ClientApp writes, with each train message, the global model it received (network
weights or the two heads, and with the head pipeline the summed statistics they were
solved from), the round it came with, the offline budget the server granted and the
settings of the run and of the node, into ``client-<id>.global.npz`` beside the site's
label database, atomically (a kill leaves the old or the new file, never half of one).
``fedal site`` reads it back to score the pool and ask people for labels while the
server is unreachable (:mod:`clients.offline`).

The head pipeline's own copy is exact: the global sums plus the statistics of the labels
given since the site last sent its own are the sums the server would add up if the other
sites stood still. :func:`standing` is what the labeling page shows of all this.
Nothing here imports Flower.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedal.exceptions import ConfigError, DataFileError
from fedal.fileio import atomic_write, read_npz

#: seconds without a message from the server after which a site acts on its own (``offline-after``)
DEFAULT_OFFLINE_AFTER_S = 900.0
#: hours a site may go on asking for labels with its last global model (``offline-max-hours``)
DEFAULT_OFFLINE_MAX_HOURS = 72.0
#: meta keys of the site database (:class:`fedal.pool.Pool`) that say where a site stands
LAST_CONTACT, LAST_CONTACT_ROUND, LAST_REPLY = "last-contact", "last-contact-round", "last-reply"
OFFLINE_AFTER, OFFLINE_MAX_HOURS, OFFLINE_LOOP = "offline-after", "offline-max-hours", "offline-loop"
OFFLINE_GRANT, SUGGESTIONS = "offline-grant", "suggestions"


def snapshot_path(state_dir: str | os.PathLike, client_id: int) -> Path:
    """Where client ``client_id``'s last global model is kept: ``<state_dir>/client-<id>.global.npz``."""
    return Path(state_dir) / f"client-{client_id}.global.npz"


@dataclass
class GlobalSnapshot:
    """The last global model a site received, and what it needs to use it alone.

    Attributes
    ----------
    run_id : int
        Flower's run id of the message.
    server_round : int
        The round of the train message that brought it (the model is the aggregate of the round before).
    received_at : float
        ``time.time()`` when the site got it.
    state : dict
        The global model (network weights, or the two heads with ``pipeline = "head"``).
    global_stats : dict or None
        Head pipeline: the summed labeled (``stats.*``) and self-trained (``pseudo.*``) statistics the heads
        were solved from; None without them (network pipeline, or a server that resumed from a checkpoint).
    included_ids : array
        Sample ids of this site's labels inside ``global_stats`` (what it sent in the round they sum).
    sent_ids : array
        Sample ids of the labels this site sent in its reply to this message (empty until ``replied``).
    replied : bool
        Whether the site replied to this message (it is kept as soon as it arrives, again after the reply).
    offline_budget : int
        Labels the server granted for asking while it is away.
    run_config, node_config : dict
        The run's and the node's settings, to rebuild the site without a message.
    """

    run_id: int
    server_round: int
    received_at: float
    state: dict
    global_stats: dict | None
    included_ids: np.ndarray
    sent_ids: np.ndarray
    replied: bool
    offline_budget: int
    run_config: dict = field(default_factory=dict)
    node_config: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the snapshot to ``path`` atomically (``.npz``, no pickle)."""
        arrays = {f"state/{k}": np.asarray(v) for k, v in self.state.items()}
        if self.global_stats is not None:
            arrays.update({f"stats/{k}": np.asarray(v) for k, v in self.global_stats.items()})
        meta = {"run_id": int(self.run_id), "server_round": int(self.server_round),
                "received_at": float(self.received_at), "offline_budget": int(self.offline_budget),
                "replied": bool(self.replied),
                "run_config": self.run_config, "node_config": self.node_config, "keys": list(self.state)}
        arrays["meta"] = np.asarray(json.dumps(meta))
        arrays["included_ids"] = np.asarray(self.included_ids, dtype=np.int64)
        arrays["sent_ids"] = np.asarray(self.sent_ids, dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike, *, models: bool = True) -> "GlobalSnapshot":
        """Read the snapshot at ``path`` written by :meth:`save`; :class:`ConfigError` if there is none yet.
        ``models=False`` reads everything but the global model and its statistics (``state`` comes back
        empty, ``global_stats`` None): what a train message checks it against."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"there is no stored global model {path}: the site keeps one from its first train "
                              "message on; let the SuperNode take part in one round first (and check --state-dir and "
                              "--client-id)")
        arrays = read_npz(path, what="stored global model", damaged_hint="let the site take part in one more round",
                          keys=None if models else ("meta", "included_ids", "sent_ids"))
        try:
            meta = json.loads(str(arrays["meta"]))
            state = {k: arrays[f"state/{k}"] for k in meta["keys"]} if models else {}
        except (KeyError, ValueError) as exc:
            raise DataFileError(f"{path} is not a stored global model of this fedal version ({exc}); let the site "
                                "take part in one more round to write it again") from None
        stats = {k[len("stats/"):]: v for k, v in arrays.items() if k.startswith("stats/")} or None
        return cls(meta["run_id"], meta["server_round"], meta["received_at"], state, stats,
                   arrays["included_ids"], arrays["sent_ids"], meta["replied"], meta["offline_budget"], meta["run_config"],
                   meta["node_config"])


@dataclass(frozen=True)
class LinkStatus:
    """Where a site stands with its server, from the times in its database.

    Attributes: ``connected`` (a message came less than ``offline_after`` seconds ago), ``last_contact``
    (``time.time()`` of the last message, None before any), ``last_round``, ``offline_since`` (the last
    contact, when not connected), ``offline_after`` and ``max_offline_s`` (how long a site may go on alone),
    and ``expired`` (it has been offline longer than that: it asks for no more labels).
    """

    connected: bool
    last_contact: float | None
    last_round: int | None
    offline_since: float | None
    offline_after: float
    max_offline_s: float
    expired: bool


def link_status(meta, now: float | None = None, *, offline_after: float | None = None,
                max_offline_hours: float | None = None) -> LinkStatus:
    """The :class:`LinkStatus` of a site at time ``now`` (default: now) from its database's ``meta``
    (``meta(key, default)``, e.g. ``Pool.get_meta``); ``offline_after`` and ``max_offline_hours`` default to
    what the ClientApp stored, else :data:`DEFAULT_OFFLINE_AFTER_S` and :data:`DEFAULT_OFFLINE_MAX_HOURS`."""
    now = time.time() if now is None else now
    after = float(meta(OFFLINE_AFTER, DEFAULT_OFFLINE_AFTER_S)) if offline_after is None else float(offline_after)
    hours = float(meta(OFFLINE_MAX_HOURS, DEFAULT_OFFLINE_MAX_HOURS)) if max_offline_hours is None else \
        float(max_offline_hours)
    last = meta(LAST_CONTACT, None)
    last = None if last is None else float(last)
    round_ = meta(LAST_CONTACT_ROUND, None)
    connected = last is not None and now - last < after
    since = None if connected or last is None else last
    return LinkStatus(connected, last, None if round_ is None else int(round_), since, after, hours * 3600.0,
                      since is not None and now - since > hours * 3600.0)


def standing(pool, now: float | None = None) -> dict:
    """Where the site of ``pool`` (:class:`fedal.pool.Pool`) stands at ``now``, for people: connected or offline since
    when, the offline budget of its last grant and what is left of it, the answers given since its last reply
    (waiting to be sent), and the last step of ``fedal site`` (None if it never ran)."""
    status = link_status(pool.get_meta, now)
    grant = json.loads(pool.get_meta(OFFLINE_GRANT, "null"))
    budget = int(grant["budget"]) if grant else 0
    spent = pool.offline_spent(grant_round=grant["round"]) if grant else 0
    last_reply = float(pool.get_meta(LAST_REPLY, "0"))
    waiting = sum(1 for r in pool.label_records() if r["labeled_at"] > last_reply)
    return {"connected": status.connected, "last_contact": status.last_contact, "last_round": status.last_round,
            "offline_since": status.offline_since, "offline_after": status.offline_after,
            "max_offline_hours": status.max_offline_s / 3600.0, "expired": status.expired,
            "offline_budget": budget, "offline_spent": spent, "offline_left": max(budget - spent, 0),
            "answers_waiting": waiting, "site_loop": json.loads(pool.get_meta(OFFLINE_LOOP, "null"))}
