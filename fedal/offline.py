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
import math
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
#: the machine's clocks at the last contact (:func:`clock_reading`), and the clock offsets of the last messages
LAST_CONTACT_CLOCK, SERVER_CLOCK = "last-contact-clock", "server-clock"
#: messages whose clock offset is kept: the freshest of them tells how far this site's clock is from the server's
CLOCK_SAMPLES = 20
#: seconds a clock may seem to run backwards (two processes' readings, rounding) before it counts as set back
CLOCK_TOLERANCE_S = 60.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def clock_reading(at: float | None = None) -> dict:
    """This machine's clocks: ``wall`` (``time.time()``), ``boot`` (an id of this boot, "" where the system does not
    say) and ``up`` (seconds since boot, counting suspend; unaffected by setting the wall clock).

    ``at`` (a ``time.time()`` value) gives the reading the clocks will show then if nobody sets the wall clock.
    Two readings of the same boot tell how much time passed whatever was done to the wall clock meanwhile
    (:func:`seconds_between`); of different boots, the wall clock is all there is.
    """
    wall = time.time()
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    up = time.clock_gettime(clock)
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    shift = 0.0 if at is None else float(at) - wall
    return {"wall": wall + shift, "boot": boot, "up": up + shift}


def _same_boot(then: dict, now: dict) -> bool:
    return bool(then.get("boot")) and then.get("boot") == now.get("boot") and isinstance(then.get("up"), (int, float))


def seconds_between(then: dict, now: dict) -> float:
    """Seconds from the reading ``then`` to the reading ``now`` (:func:`clock_reading`): by the boot clock on the
    same boot (a wall clock set forward or back meanwhile changes nothing), else by the wall clock."""
    if _same_boot(then, now):
        return float(now["up"]) - float(then["up"])
    return float(now["wall"]) - float(then["wall"])


def wall_clock_step(then: dict, now: dict) -> float:
    """How far the wall clock was set (forward > 0) between the readings ``then`` and ``now`` of the same boot (what
    it moved beyond the time that passed); 0 across boots.

    Parameters
    ----------
    then, now : dict
        Clock readings (``wall``: the wall clock, ``up``: the boot clock, ``boot``: the boot's id).
    """
    if not _same_boot(then, now):
        return 0.0
    return (float(now["wall"]) - float(then["wall"])) - (float(now["up"]) - float(then["up"]))


def message_age(sent_at: float, seen: list[dict], now: dict) -> tuple[float, float, bool]:
    """How long ago a message was made, as this site can tell: ``(age, offset, reference)``.

    ``sent_at`` is the message's time by the server's clock; ``offset`` how far this site's clock reads past it
    (its own wall clock now minus ``sent_at``); ``seen`` the offsets of the last messages with the clocks when
    they came (:data:`SERVER_CLOCK`). The two clocks need not agree: the freshest of those messages (the least
    offset, corrected for any setting of this site's clock since) measures how far apart they are, and a
    message is as old as its offset exceeds that one's. ``reference`` says whether there was one (the first
    message a site gets is its own reference: age 0).
    """
    offset = float(now["wall"]) - float(sent_at)
    past = [float(s["offset"]) + wall_clock_step(s, now) for s in seen]
    if not past:
        return 0.0, offset, False
    return max(offset - min(past), 0.0), offset, True


def snapshot_path(state_dir: str | os.PathLike, client_id: int) -> Path:
    """Where client ``client_id``'s last global model is kept: ``<state_dir>/client-<id>.global.npz``."""
    return Path(state_dir) / f"client-{client_id}.global.npz"


def reply_path(snapshot: str | os.PathLike) -> Path:
    """Beside the stored global model ``snapshot`` (``client-<id>.global.npz``): ``client-<id>.reply.json``, what
    the site's reply to that message sent (:meth:`GlobalSnapshot.save_reply`; the model is not written again)."""
    snapshot = Path(snapshot)
    return snapshot.with_name(snapshot.name.removesuffix(".global.npz") + ".reply.json")


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

    def save_reply(self, path: str | os.PathLike, sent_ids: np.ndarray) -> Path:
        """Record that the site replied to this snapshot's message with the labels ``sent_ids``: a small file beside
        the snapshot at ``path`` (:func:`reply_path`), written atomically; the model, written when the message
        came (:meth:`save`), is not written again. :meth:`load` reads the two together."""
        self.sent_ids, self.replied = np.asarray(sent_ids, dtype=np.int64), True
        record = {"run_id": int(self.run_id), "server_round": int(self.server_round),
                  "received_at": float(self.received_at), "sent_ids": [int(i) for i in self.sent_ids]}
        return atomic_write(reply_path(path), json.dumps(record))

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
        fix = (f"delete {path}: the site's next train message writes it again (`fedal site` waits for it, and no label "
               "is lost: they are all in the site's database)")
        arrays = read_npz(path, what="stored global model", damaged_hint=fix,
                          keys=None if models else ("meta", "included_ids", "sent_ids"))

        def bad(problem: str) -> DataFileError:
            return DataFileError(f"stored global model {path} {problem}; {fix}")

        try:
            meta = json.loads(str(arrays["meta"]))
        except KeyError:
            raise bad("has no 'meta' entry (not written by fedal, or damaged)") from None
        except ValueError as exc:
            raise bad(f"has a 'meta' entry that is not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise bad(f"has a 'meta' entry that is a {type(meta).__name__}, not an object")
        missing = [k for k in _META_KINDS if k not in meta]
        if missing:
            raise bad(f"lacks {', '.join(repr(k) for k in missing)} in its 'meta' entry (written by another fedal "
                      "version, or damaged)")
        for key, (kinds, what) in _META_KINDS.items():
            value, kinds = meta[key], kinds if isinstance(kinds, tuple) else (kinds,)
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if ok and key in ("run_id", "server_round", "offline_budget"):
                ok = value >= (1 if key == "server_round" else 0)
            if ok and key == "received_at":
                ok = math.isfinite(value)
            if ok and key == "keys":
                ok = all(isinstance(k, str) for k in value)
            if not ok:
                raise bad(f"has {key} = {value!r} in its 'meta' entry; expected {what}")
        ids = {}
        for key in ("included_ids", "sent_ids"):
            if key not in arrays:
                raise bad(f"has no {key!r} array")
            a = arrays[key]
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise bad(f"has a {key!r} array of shape {a.shape} and type {a.dtype}; expected integer sample ids")
            ids[key] = a.astype(np.int64)
        state = {}
        stats = None
        if models:
            absent = [k for k in meta["keys"] if f"state/{k}" not in arrays]
            if absent:
                raise bad(f"lacks the model arrays {absent[:5]} its 'meta' entry lists")
            state = {k: arrays[f"state/{k}"] for k in meta["keys"]}
            stats = {k[len("stats/"):]: v for k, v in arrays.items() if k.startswith("stats/")} or None
            for name, value in [*state.items(), *(stats or {}).items()]:
                if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
                    raise bad(f"holds {name!r} of type {value.dtype}; a model array must be numeric")
                if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
                    raise bad(f"holds {int((~np.isfinite(value)).sum())} NaN or infinite value(s) in {name!r} (damaged, "
                              "or a server whose model diverged)")
        snapshot = cls(int(meta["run_id"]), int(meta["server_round"]), float(meta["received_at"]), state, stats,
                       ids["included_ids"], ids["sent_ids"], bool(meta["replied"]), int(meta["offline_budget"]),
                       meta["run_config"], meta["node_config"])
        snapshot._read_reply(path)
        return snapshot

    def _read_reply(self, path: Path) -> None:
        """Take the reply record beside the snapshot at ``path`` (:meth:`save_reply`) if it is this message's: same
        run, round and arrival time (a record of an earlier message is left over until the next reply)."""
        reply = reply_path(path)
        if not reply.is_file():
            return
        fix = (f"delete {reply}: the site then counts its last reply as not sent, and its next train message sets "
               "this right (no label is lost: they are all in the site's database)")
        try:
            record = json.loads(reply.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataFileError(f"reply record {reply} cannot be read ({exc}); {fix}") from None
        keys = ("run_id", "server_round", "received_at", "sent_ids")
        if not isinstance(record, dict) or any(k not in record for k in keys):
            raise DataFileError(f"reply record {reply} lacks one of {', '.join(keys)} (not written by fedal, or "
                                f"damaged); {fix}")
        ids = record["sent_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise DataFileError(f"reply record {reply} has sent_ids that are not a list of integer sample ids; {fix}")
        if (record["run_id"], record["server_round"], record["received_at"]) == (
                self.run_id, self.server_round, self.received_at):
            self.sent_ids, self.replied = np.asarray(ids, dtype=np.int64), True


#: the entries of a stored global model's ``meta``: accepted types and what they are, for the message
_META_KINDS = {
    "run_id": (int, "a run id (an integer >= 0)"),
    "server_round": (int, "a round (an integer >= 1)"),
    "received_at": ((int, float), "a time (a finite number of seconds)"),
    "offline_budget": (int, "an offline budget (an integer >= 0)"),
    "replied": (bool, "true or false"),
    "run_config": (dict, "the run's settings (an object)"),
    "node_config": (dict, "the node's settings (an object)"),
    "keys": (list, "the names of the model's arrays (a list of strings)"),
}


@dataclass(frozen=True)
class LinkStatus:
    """Where a site stands with its server, from the times in its database.

    Attributes: ``connected`` (a message came less than ``offline_after`` seconds ago), ``last_contact``
    (``time.time()`` of the last message, None before any), ``last_round``, ``offline_since`` (the last
    contact, when not connected), ``offline_after`` and ``max_offline_s`` (how long a site may go on alone),
    and ``expired`` (it has been offline longer than that: it asks for no more labels).
    ``clock_problem`` says, when not None, that this site's clock reads earlier than it did at the last contact (it
    was set back while the machine was off): the site then counts as offline, without a time since.
    """

    connected: bool
    last_contact: float | None
    last_round: int | None
    offline_since: float | None
    offline_after: float
    max_offline_s: float
    expired: bool
    clock_problem: str | None = None


def link_status(meta, now: float | None = None, *, offline_after: float | None = None,
                max_offline_hours: float | None = None) -> LinkStatus:
    """The :class:`LinkStatus` of a site at time ``now`` (default: now) from its database's ``meta``
    (``meta(key, default)``, e.g. ``Pool.get_meta``); ``offline_after`` and ``max_offline_hours`` default to
    what the ClientApp stored, else :data:`DEFAULT_OFFLINE_AFTER_S` and :data:`DEFAULT_OFFLINE_MAX_HOURS`."""
    reading = clock_reading(at=now)
    after = float(meta(OFFLINE_AFTER, DEFAULT_OFFLINE_AFTER_S)) if offline_after is None else float(offline_after)
    hours = float(meta(OFFLINE_MAX_HOURS, DEFAULT_OFFLINE_MAX_HOURS)) if max_offline_hours is None else \
        float(max_offline_hours)
    last = meta(LAST_CONTACT, None)
    last = None if last is None else float(last)
    round_ = meta(LAST_CONTACT_ROUND, None)
    if last is None:
        return LinkStatus(False, None, None if round_ is None else int(round_), None, after, hours * 3600.0, False)
    try:  # the clocks at the contact: elapsed time by the boot clock, whatever the wall clock did since
        then = json.loads(meta(LAST_CONTACT_CLOCK, "null")) or {"wall": last}
        elapsed = seconds_between(then, reading)
    except (ValueError, TypeError, KeyError, AttributeError):  # a database written before, or damaged
        elapsed = reading["wall"] - last
    problem = None
    if elapsed < -CLOCK_TOLERANCE_S:
        problem = (f"this site's clock reads {-elapsed:.0f} s earlier than at the last message from the server: it "
                   "was set back, so how long the server has been away is unknown; set the clock right (e.g. NTP, "
                   "`timedatectl`)")
    connected = problem is None and elapsed < after
    since = None if connected else last
    return LinkStatus(connected, last, None if round_ is None else int(round_), since, after, hours * 3600.0,
                      not connected and elapsed > hours * 3600.0, problem)


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
            "answers_waiting": waiting, "site_loop": json.loads(pool.get_meta(OFFLINE_LOOP, "null")),
            "clock_problem": status.clock_problem}
