"""The pool: which samples are unlabeled, pending (asked of an oracle) or labeled.

Bookkeeping lives in SQLite: in memory by default, in a file when a path is given
(a client's on-device database). Every change is one transaction, committed before
the method returns, so a process killed at any point loses no label it acknowledged.

Sample ids are stable integers chosen by the caller (default ``0 .. n-1``, the row of
each sample in the local data); they never leave the device.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedal.exceptions import SampleStateError, ConfigError, InvalidLabelError, UnknownSampleError

UNLABELED, PENDING, LABELED = "unlabeled", "pending", "labeled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('unlabeled', 'pending', 'labeled'))
);
CREATE INDEX IF NOT EXISTS samples_state ON samples (state);
CREATE TABLE IF NOT EXISTS labels (
    sample_id INTEGER PRIMARY KEY REFERENCES samples (id),
    label INTEGER NOT NULL,
    source TEXT NOT NULL,
    labeled_at REAL NOT NULL,
    round INTEGER
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    round INTEGER,
    status TEXT NOT NULL CHECK (status IN ('pending', 'answered', 'expired', 'skipped')),
    created_at REAL NOT NULL,
    deadline REAL,
    closed_at REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, sample_id);
-- every correction and every taken-back answer, so no label a person gave is lost
CREATE TABLE IF NOT EXISTS label_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    action TEXT NOT NULL CHECK (action IN ('change', 'undo')),
    before INTEGER NOT NULL,
    label INTEGER,
    given_by TEXT NOT NULL,
    by TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS label_history_sample ON label_history (sample_id);
-- where a label given in another tool came from (who, when, the tool's own ids): a hospital's audit
CREATE TABLE IF NOT EXISTS label_origins (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id INTEGER NOT NULL REFERENCES samples (id),
    label INTEGER NOT NULL,
    source TEXT NOT NULL,
    given_by TEXT NOT NULL,
    given_at TEXT,
    reference TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS label_origins_sample ON label_origins (sample_id);
-- requests a site opened while the server was away, against the offline budget granted in round grant_round;
-- reported_round: the round whose reply reported them to the server (NULL until then)
CREATE TABLE IF NOT EXISTS offline_requests (
    request_id INTEGER PRIMARY KEY REFERENCES requests (id),
    grant_round INTEGER NOT NULL,
    reported_round INTEGER
);
-- samples whose file left the site's folder (fedal.imagefolder): never asked for; a label given stays
CREATE TABLE IF NOT EXISTS gone (
    sample_id INTEGER PRIMARY KEY REFERENCES samples (id),
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS budgets (
    round INTEGER PRIMARY KEY,
    assigned INTEGER NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0
);
"""


class Pool:
    """Labeled / unlabeled / pending bookkeeping for one device's samples.

    Parameters
    ----------
    n_classes : int
        Number of classes; answers outside ``0 .. n_classes - 1`` are rejected.
    ids : iterable of int, optional
        Sample ids; default ``range(size)``. When reopening a database that already
        holds a pool they must equal the stored ids (else :class:`ConfigError`).
    size : int, optional
        Number of samples when ``ids`` is not given.
    path : path, optional
        SQLite file for durable state; default in memory.
    grow : bool
        A pool that grows (a site's folder, :mod:`fedal.imagefolder`): reopened with more ids, the new ones join
        as unlabeled; fewer is still an error (no sample is forgotten: one whose file left is :meth:`set_gone`).
    """

    def __init__(self, n_classes: int, ids: Iterable[int] | None = None, *, size: int | None = None,
                 path: str | os.PathLike | None = None, grow: bool = False) -> None:
        if n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {n_classes}")
        self.n_classes = int(n_classes)
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we open transactions ourselves with BEGIN IMMEDIATE
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", isolation_level=None,
                                   timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL" if self.path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        if ids is None:
            if size is None:
                raise ConfigError("Pool needs ids or size")
            ids = range(int(size))
        self.grow = bool(grow)
        self._init_ids(np.asarray(list(ids), dtype=np.int64))

    # ----------------------------------------------------------------- plumbing
    @contextmanager
    def _tx(self):
        if getattr(self, "_tx_thread", None) == threading.get_ident():  # inside transaction(): join it
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _init_ids(self, ids: np.ndarray) -> None:
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("pool sample ids must be unique")
        with self._tx() as db:  # one transaction: two processes opening a new database make one pool
            stored = db.execute("SELECT value FROM meta WHERE key='n_classes'").fetchone()
            if stored is None:
                db.execute("INSERT INTO meta VALUES ('n_classes', ?)", (str(self.n_classes),))
                db.executemany("INSERT INTO samples VALUES (?, 'unlabeled')", ((int(i),) for i in ids))
                return
        if int(stored[0]) != self.n_classes:
            raise ConfigError(
                f"database {self.path} holds a pool with {stored[0]} classes, not {self.n_classes}; "
                "use a new state directory for a different data set"
            )
        have = self._ids_where(None)
        if self.grow and np.isin(have, ids).all():  # a folder's pool: new files join, none is forgotten
            new = np.setdiff1d(ids, have)
            if len(new):
                with self._tx() as db:
                    db.executemany("INSERT OR IGNORE INTO samples VALUES (?, 'unlabeled')", ((int(i),) for i in new))
            return
        if len(have) != len(ids) or not np.array_equal(np.sort(have), np.sort(ids)):
            raise ConfigError(
                f"database {self.path} holds a pool of {len(have)} samples that differs from the "
                f"{len(ids)} given; the local data changed since the pool was made: restore it or "
                "use a new state directory"
            )

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ids_where(self, state: str | None) -> np.ndarray:
        if state is None:
            rows = self._db.execute("SELECT id FROM samples ORDER BY id")
        else:
            rows = self._db.execute("SELECT id FROM samples WHERE state = ? ORDER BY id", (state,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    # ------------------------------------------------------------------- reads
    @property
    def ids(self) -> np.ndarray:
        """All sample ids, sorted."""
        return self._ids_where(None)

    def unlabeled_ids(self) -> np.ndarray:
        """Ids neither labeled nor waiting for an answer (the query candidates), but for those whose file is gone."""
        rows = self._db.execute("SELECT id FROM samples WHERE state = ? AND id NOT IN (SELECT sample_id FROM gone) "
                                "ORDER BY id", (UNLABELED,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def gone_ids(self) -> np.ndarray:
        """Ids whose file left the site's folder (:meth:`set_gone`), sorted."""
        return np.fromiter((r[0] for r in self._db.execute("SELECT sample_id FROM gone ORDER BY sample_id")),
                           dtype=np.int64)

    def set_gone(self, gone: Iterable[int]) -> None:
        """Mark exactly the ids ``gone`` as gone (their files left the folder): an unlabeled one is never asked for,
        a label or a request already made stays; an id no longer in ``gone`` (its file came back) is asked again."""
        gone = sorted({int(i) for i in gone})
        with self._tx() as db:
            unknown = [i for i in gone if db.execute("SELECT 1 FROM samples WHERE id = ?", (i,)).fetchone() is None]
            if unknown:
                raise UnknownSampleError(f"sample id(s) {unknown[:5]} are not in the pool")
            since = dict(db.execute("SELECT sample_id, since FROM gone").fetchall())  # when each went, kept
            db.execute("DELETE FROM gone")
            now = time.time()
            db.executemany("INSERT INTO gone VALUES (?, ?)", ((i, since.get(i, now)) for i in gone))

    def pending_ids(self) -> np.ndarray:
        """Ids asked of an oracle and not yet answered."""
        return self._ids_where(PENDING)

    def skipped_ids(self) -> np.ndarray:
        """Unlabeled ids whose oracle answered "unsure" (a request closed as skipped): not asked again."""
        rows = self._db.execute(
            "SELECT DISTINCT r.sample_id FROM requests r JOIN samples s ON s.id = r.sample_id "
            "WHERE r.status = 'skipped' AND s.state = ? ORDER BY r.sample_id", (UNLABELED,)).fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def labeled_ids(self) -> np.ndarray:
        """Ids with a label."""
        return self._ids_where(LABELED)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def counts(self) -> dict[str, int]:
        """Number of samples per state."""
        out = {UNLABELED: 0, PENDING: 0, LABELED: 0}
        out.update(dict(self._db.execute("SELECT state, COUNT(*) FROM samples GROUP BY state")))
        out[UNLABELED] -= self._db.execute("SELECT COUNT(*) FROM gone g JOIN samples s ON s.id = g.sample_id "
                                           "WHERE s.state = ?", (UNLABELED,)).fetchone()[0]  # not candidates
        return out

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, labels)`` of the labeled samples, sorted by id."""
        rows = self._db.execute("SELECT sample_id, label FROM labels ORDER BY sample_id").fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        arr = np.asarray(rows, dtype=np.int64)
        return arr[:, 0], arr[:, 1]

    def label_records(self) -> list[dict]:
        """Every label with who gave it, when and in which round."""
        cur = self._db.execute("SELECT sample_id, label, source, labeled_at, round FROM labels ORDER BY sample_id")
        return [dict(zip(("id", "label", "source", "labeled_at", "round"), r)) for r in cur]

    def label_history(self, sample_id: int | None = None) -> list[dict]:
        """Every change and taken-back answer (of the sample ``sample_id``, or all), oldest first.

        Each entry: ``action`` (``"change"`` or ``"undo"``), ``before`` (the label replaced or taken back),
        ``label`` (the new label; None for an undo), ``given_by`` (who gave the label first), ``by`` (who
        changed or took it back) and ``at`` (``time.time()`` seconds).
        """
        sql = "SELECT id, sample_id, action, before, label, given_by, by, at FROM label_history"
        args: tuple = ()
        if sample_id is not None:
            sql, args = sql + " WHERE sample_id = ?", (int(sample_id),)
        cur = self._db.execute(sql + " ORDER BY id", args)
        keys = ("entry", "sample_id", "action", "before", "label", "given_by", "by", "at")
        return [dict(zip(keys, r)) for r in cur]

    def state_of(self, sample_id: int) -> str:
        """The state (``"unlabeled"``, ``"pending"`` or ``"labeled"``) of the sample ``sample_id``."""
        row = self._db.execute("SELECT state FROM samples WHERE id = ?", (int(sample_id),)).fetchone()
        if row is None:
            raise UnknownSampleError(f"sample id {sample_id} is not in this pool")
        return row[0]

    def requests(self, status: str | None = None) -> list[dict]:
        """Query requests (optionally of one status), oldest first."""
        sql = "SELECT id, sample_id, round, status, created_at, deadline, closed_at, note FROM requests"
        args: tuple = ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        cur = self._db.execute(sql + " ORDER BY id", args)
        keys = ("request_id", "sample_id", "round", "status", "created_at", "deadline", "closed_at", "note")
        return [dict(zip(keys, r)) for r in cur]

    # ------------------------------------------------------------------ writes
    def _check_state(self, db, ids: list[int], state: str, action: str) -> None:
        marks = ",".join("?" * len(ids))
        rows = dict(db.execute(f"SELECT id, state FROM samples WHERE id IN ({marks})", ids).fetchall())
        unknown = [i for i in ids if i not in rows]
        if unknown:
            raise UnknownSampleError(f"cannot {action}: sample ids {unknown[:10]} are not in this pool")
        wrong = [i for i in ids if rows[i] != state]
        if wrong:
            raise SampleStateError(
                f"cannot {action}: samples {wrong[:10]} are {rows[wrong[0]]}, not {state}"
            )

    def request(self, ids: Iterable[int], *, round: int | None = None, timeout_s: float | None = None,
                offline_grant: int | None = None, offline_budget: int | None = None,
                most_waiting: int | None = None) -> np.ndarray:
        """Mark unlabeled samples as pending, recording one request each; return the ids requested.

        Parameters
        ----------
        ids : iterable of int
            Distinct ids of unlabeled samples.
        round : int, optional
            Federated round (or query step) the request belongs to.
        timeout_s : float, optional
            Seconds until the request is overdue (see :meth:`expire_overdue`); default never.
        offline_grant : int, optional
            The request is made while the server is away, against the offline budget granted in this
            round (see :meth:`offline_spent`), recorded in the same transaction.
        offline_budget, most_waiting : int, optional
            With ``offline_grant``: the grant's offline budget, and the most offline requests waiting for an answer
            at once. Both are counted inside the write transaction (SQLite's ``BEGIN IMMEDIATE``: one writer at a
            time), so two processes asking at once never exceed them: the ids beyond them, and those another
            process asked for since they were chosen, are left out (the returned ids are what was requested).
        """
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("request ids must be distinct")
        if not ids:
            return np.zeros(0, np.int64)
        now = time.time()
        deadline = None if timeout_s is None else now + float(timeout_s)
        with self._tx() as db:
            if offline_grant is not None and (offline_budget is not None or most_waiting is not None):
                ids = self._offline_room(db, ids, int(offline_grant), offline_budget, most_waiting)
                if not ids:
                    return np.zeros(0, np.int64)
            for start in range(0, len(ids), 900):
                self._check_state(db, ids[start : start + 900], UNLABELED, "request labels")
            db.executemany("UPDATE samples SET state = 'pending' WHERE id = ?", ((i,) for i in ids))
            db.executemany(
                "INSERT INTO requests (sample_id, round, status, created_at, deadline) VALUES (?, ?, 'pending', ?, ?)",
                ((i, round, now, deadline) for i in ids),
            )
            if offline_grant is not None:
                db.execute("INSERT INTO offline_requests (request_id, grant_round) SELECT id, ? FROM requests "
                           "ORDER BY id DESC LIMIT ?", (int(offline_grant), len(ids)))  # the rows just inserted
        return np.asarray(ids, dtype=np.int64)

    def _offline_room(self, db, ids: list[int], grant_round: int, budget: int | None, most_waiting: int | None
                      ) -> list[int]:
        """Of ``ids``, those still unlabeled, cut to the room the offline ``budget`` of ``grant_round`` and
        ``most_waiting`` leave now (read in the caller's write transaction)."""
        spent, waiting = db.execute(
            "SELECT COALESCE(SUM(o.grant_round = ? AND r.status IN ('pending', 'answered', 'skipped')), 0), "
            "COALESCE(SUM(r.status = 'pending'), 0) FROM offline_requests o JOIN requests r ON r.id = o.request_id",
            (grant_round,)).fetchone()
        room = len(ids)
        if budget is not None:
            room = min(room, int(budget) - int(spent))
        if most_waiting is not None:
            room = min(room, int(most_waiting) - int(waiting))
        if room <= 0:
            return []
        free = set()
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            free.update(r[0] for r in db.execute(f"SELECT id FROM samples WHERE state = 'unlabeled' AND id IN "
                                                 f"({','.join('?' * len(chunk))})", chunk))
        return [i for i in ids if i in free][:room]

    def check_label(self, label: object, *,
                    then: str = "the request stays pending: answer again with a valid class") -> int:
        """Return ``label`` as an int class, or raise InvalidLabelError naming the valid range.

        ``then`` ends the out-of-range message: what happens to the thing being labeled.
        """
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            if isinstance(label, (float, np.floating)) and float(label).is_integer():
                label = int(label)
            else:
                raise InvalidLabelError(
                    f"label {label!r} is not a class index; answer with an integer in 0..{self.n_classes - 1}"
                )
        if not 0 <= int(label) < self.n_classes:
            raise InvalidLabelError(
                f"label {label} is outside the {self.n_classes} known classes (0..{self.n_classes - 1}); {then}"
            )
        return int(label)

    def answer(self, answers: Mapping[int, object], *, source: str,
               round: int | Mapping[int, int | None] | None = None) -> int:
        """Record oracle answers for pending samples, all or nothing.

        Every label is validated before anything is written: one invalid label or one
        sample that is not pending raises and leaves every request pending.

        Parameters
        ----------
        answers : mapping of int to int
            ``{sample id: class}`` for pending samples.
        source : str
            Who answered (the oracle's name), stored with each label.
        round : int or mapping of int to int, optional
            Round (or query step) the labels are recorded in, or ``{sample id: round}``
            (people answer requests of several rounds at once).

        Returns
        -------
        int
            Number of labels recorded.
        """
        items = [(int(i), self.check_label(lab)) for i, lab in answers.items()]
        if not items:
            return 0
        now = time.time()
        with self._tx() as db:
            ids = [i for i, _ in items]
            for start in range(0, len(ids), 900):
                self._check_state(db, ids[start : start + 900], PENDING, "record answers")
            db.executemany("UPDATE samples SET state = 'labeled' WHERE id = ?", ((i,) for i in ids))
            db.executemany(
                "INSERT INTO labels (sample_id, label, source, labeled_at, round) VALUES (?, ?, ?, ?, ?)",
                ((i, lab, source, now, round.get(i) if isinstance(round, Mapping) else round) for i, lab in items),
            )
            db.executemany(
                "UPDATE requests SET status = 'answered', closed_at = ? WHERE sample_id = ? AND status = 'pending'",
                ((now, i) for i in ids),
            )
        return len(items)

    def change_label(self, sample_id: int, label: object, *, source: str) -> int:
        """Replace the label of a labeled sample (a person corrects an answer); return the previous label.

        The label keeps who gave it first (``label_records``' source); the change, with who made it, is
        added to :meth:`label_history`. A change to the same class writes nothing. The next round trains on
        the new label: every round uses the whole labeled set.

        Parameters
        ----------
        sample_id : int
            A labeled sample.
        label : int
            Its new class (validated like an answer).
        source : str
            Who changed it.
        """
        sample_id = int(sample_id)
        label = self.check_label(label, then="the label was not changed: pick a valid class")
        with self._tx() as db:
            self._check_state(db, [sample_id], LABELED, "change a label")
            old, given_by = db.execute("SELECT label, source FROM labels WHERE sample_id = ?", (sample_id,)).fetchone()
            if old != label:
                db.execute("UPDATE labels SET label = ? WHERE sample_id = ?", (label, sample_id))
                db.execute("INSERT INTO label_history (sample_id, action, before, label, given_by, by, at) "
                           "VALUES (?, 'change', ?, ?, ?, ?, ?)", (sample_id, old, label, given_by, source, time.time()))
        return int(old)

    def reopen(self, sample_id: int, *, by: str | None = None, given_by: str | None = None) -> None:
        """Take back the answer of a sample labeled through a request (undo): its label is removed and the
        request waits again, so the sample is asked again without spending more budget. The label taken
        back stays in :meth:`label_history`.

        Parameters
        ----------
        sample_id : int
            A labeled sample whose label answered a request.
        by : str, optional
            Who takes it back (default: who gave it).
        given_by : str, optional
            Take it back only if this source gave the label and nobody else changed it since; checked in
            the same transaction, so a correction made a moment ago elsewhere is never lost.

        Raises
        ------
        SampleStateError
            The sample is not labeled, answered no request, or (``given_by``) is someone else's label.
        """
        sample_id = int(sample_id)
        with self._tx() as db:
            self._check_state(db, [sample_id], LABELED, "take back an answer")
            label, source = db.execute("SELECT label, source FROM labels WHERE sample_id = ?", (sample_id,)).fetchone()
            if given_by is not None:
                if source != given_by:
                    raise SampleStateError(f"cannot take back the label of sample {sample_id}: {source!r} gave it, "
                                           f"not {given_by!r}; change it instead")
                changed = db.execute("SELECT by FROM label_history WHERE sample_id = ? AND action = 'change' AND "
                                     "by != ? AND at >= (SELECT labeled_at FROM labels WHERE sample_id = ?) "
                                     "ORDER BY id DESC LIMIT 1", (sample_id, given_by, sample_id)).fetchone()
                if changed is not None:
                    raise SampleStateError(f"cannot take back the label of sample {sample_id}: {changed[0]!r} "
                                           "corrected it since; change it instead")
            row = db.execute("SELECT id FROM requests WHERE sample_id = ? AND status = 'answered' ORDER BY id DESC "
                             "LIMIT 1", (sample_id,)).fetchone()
            if row is None:
                raise SampleStateError(f"cannot take back the label of sample {sample_id}: it answered no request; "
                                       "change it instead")
            db.execute("INSERT INTO label_history (sample_id, action, before, label, given_by, by, at) "
                       "VALUES (?, 'undo', ?, NULL, ?, ?, ?)", (sample_id, label, source, by or source, time.time()))
            db.execute("DELETE FROM labels WHERE sample_id = ?", (sample_id,))
            db.execute("UPDATE samples SET state = ? WHERE id = ?", (PENDING, sample_id))
            db.execute("UPDATE requests SET status = 'pending', closed_at = NULL WHERE id = ?", (row[0],))

    def release(self, ids: Iterable[int], *, status: str = "expired", note: str | None = None) -> int:
        """Return pending samples to the unlabeled pool (request expired or skipped).

        Parameters
        ----------
        ids : iterable of int
            Ids of pending samples.
        status : {"expired", "skipped"}
            How the requests are closed.
        note : str, optional
            Why, stored with the requests.
        """
        if status not in ("expired", "skipped"):
            raise ConfigError(f"release status must be 'expired' or 'skipped', got {status!r}")
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        now = time.time()
        with self._tx() as db:
            for start in range(0, len(ids), 900):
                self._check_state(db, ids[start : start + 900], PENDING, "release requests")
            db.executemany("UPDATE samples SET state = 'unlabeled' WHERE id = ?", ((i,) for i in ids))
            db.executemany(
                "UPDATE requests SET status = ?, closed_at = ?, note = ? WHERE sample_id = ? AND status = 'pending'",
                ((status, now, note, i) for i in ids),
            )
        return len(ids)

    def expire_overdue(self, now: float | None = None) -> list[int]:
        """Release every pending request whose deadline has passed; return their ids.

        The released samples are unlabeled again: the budget they held can be spent anew.

        Parameters
        ----------
        now : float, optional
            Time to compare deadlines with (``time.time()`` seconds); default now.
        """
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT sample_id FROM requests WHERE status = 'pending' AND deadline IS NOT NULL AND deadline <= ?",
            (now,),
        ).fetchall()
        ids = sorted({r[0] for r in rows})
        self.release(ids, status="expired", note="deadline passed")
        return ids

    def add_labeled(self, labels: Mapping[int, object], *, source: str, round: int | None = None) -> int:
        """Label unlabeled samples directly (an initial labeled set): request + answer in one go.

        Parameters
        ----------
        labels : mapping of int to int
            ``{sample id: class}`` for unlabeled samples.
        source : str
            Where the labels come from, stored with each label.
        round : int, optional
            Round the labels are recorded in.
        """
        items = {int(i): self.check_label(v) for i, v in labels.items()}  # validate before writing
        if not items:
            return 0
        ids, now = list(items), time.time()
        with self._tx() as db:  # one transaction: all labeled, or none
            for start in range(0, len(ids), 900):
                self._check_state(db, ids[start : start + 900], UNLABELED, "add labels")
            db.executemany("UPDATE samples SET state = 'labeled' WHERE id = ?", ((i,) for i in ids))
            db.executemany(
                "INSERT INTO requests (sample_id, round, status, created_at, closed_at, note) "
                "VALUES (?, ?, 'answered', ?, ?, 'added directly')",
                ((i, round, now, now) for i in ids),
            )
            db.executemany(
                "INSERT INTO labels (sample_id, label, source, labeled_at, round) VALUES (?, ?, ?, ?, ?)",
                ((i, lab, source, now, round) for i, lab in items.items()),
            )
        return len(ids)

    @contextmanager
    def transaction(self):
        """Several writes (answers, changes, origins) as one transaction: all of them are kept, or none.

        Every write method called inside ``with pool.transaction():`` joins it; an exception rolls all back.
        """
        if getattr(self, "_tx_thread", None) == threading.get_ident():
            raise ConfigError("Pool.transaction() is already open in this thread")
        with self._tx():
            self._tx_thread = threading.get_ident()
            try:
                yield self
            finally:
                self._tx_thread = None

    def add_label_origins(self, origins: Iterable[Mapping]) -> int:
        """Record where labels given in another tool came from (append only, next to the label and its history).

        Parameters
        ----------
        origins : iterable of mapping
            Each with ``sample_id``, ``label`` (the class that tool gave), ``source`` (as stored with the label or
            its change), ``given_by`` (the person in that tool), ``given_at`` (its time, as it wrote it; optional)
            and ``reference`` (its own ids, e.g. a Label Studio task and annotation).
        """
        rows = [(int(o["sample_id"]), self.check_label(o["label"]), str(o["source"]), str(o["given_by"]),
                 None if o.get("given_at") is None else str(o["given_at"]), str(o["reference"])) for o in origins]
        if not rows:
            return 0
        now, ids = time.time(), sorted({r[0] for r in rows})
        with self._tx() as db:
            for start in range(0, len(ids), 900):
                self._check_state(db, ids[start : start + 900], LABELED, "record label origins")
            db.executemany("INSERT INTO label_origins (sample_id, label, source, given_by, given_at, reference, "
                           "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)", (r + (now,) for r in rows))
        return len(rows)

    def label_origins(self, sample_id: int | None = None) -> list[dict]:
        """Where labels given in another tool came from (of the sample ``sample_id``, or all), oldest first.

        Each entry: ``sample_id``, ``label``, ``source``, ``given_by``, ``given_at``, ``reference`` and
        ``recorded_at`` (``time.time()`` seconds); see :meth:`add_label_origins`.
        """
        sql = "SELECT id, sample_id, label, source, given_by, given_at, reference, recorded_at FROM label_origins"
        args: tuple = ()
        if sample_id is not None:
            sql, args = sql + " WHERE sample_id = ?", (int(sample_id),)
        keys = ("entry", "sample_id", "label", "source", "given_by", "given_at", "reference", "recorded_at")
        return [dict(zip(keys, r)) for r in self._db.execute(sql + " ORDER BY id", args)]

    # ----------------------------------------------------------------- budgets
    def set_budget(self, round: int, assigned: int) -> None:
        """Record the query budget assigned for a round (idempotent)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO budgets (round, assigned) VALUES (?, ?) "
                "ON CONFLICT(round) DO UPDATE SET assigned = excluded.assigned",
                (int(round), int(assigned)),
            )

    def spend_budget(self, round: int, spent: int) -> None:
        """Record how much of a round's budget was spent."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO budgets (round, assigned, spent) VALUES (?, 0, ?) "
                "ON CONFLICT(round) DO UPDATE SET spent = excluded.spent",
                (int(round), int(spent)),
            )

    def offline_requests(self) -> list[dict]:
        """Requests made while the server was away, oldest first: the request's fields (:meth:`requests`) with
        ``grant_round`` (the round whose offline budget they count against) and ``reported_round``."""
        cur = self._db.execute(
            "SELECT r.id, r.sample_id, r.round, r.status, r.created_at, r.deadline, r.closed_at, r.note, o.grant_round, "
            "o.reported_round FROM offline_requests o JOIN requests r ON r.id = o.request_id ORDER BY r.id")
        keys = ("request_id", "sample_id", "round", "status", "created_at", "deadline", "closed_at", "note",
                "grant_round", "reported_round")
        return [dict(zip(keys, r)) for r in cur]

    def offline_spent(self, grant_round: int | None = None, *, unreported_by: int | None = None) -> int:
        """Offline requests that spent budget (pending, answered or answered "unsure"; an expired one gave it
        back): of the grant of ``grant_round`` (default all), or (``unreported_by``) those not yet reported in
        a reply before round ``unreported_by`` (a re-delivered round counts its own again)."""
        sql = ("SELECT COUNT(*) FROM offline_requests o JOIN requests r ON r.id = o.request_id "
               "WHERE r.status IN ('pending', 'answered', 'skipped')")
        args: list = []
        if grant_round is not None:
            sql, args = sql + " AND o.grant_round = ?", [int(grant_round)]
        if unreported_by is not None:
            sql += " AND (o.reported_round IS NULL OR o.reported_round >= ?)"
            args.append(int(unreported_by))
        return int(self._db.execute(sql, args).fetchone()[0])

    def report_offline(self, server_round: int) -> int:
        """Mark the offline requests not yet reported as reported in ``server_round``'s reply; return how many
        spent budget (what that reply says; the same again if the round is re-delivered)."""
        with self._tx() as db:
            db.execute("UPDATE offline_requests SET reported_round = ? WHERE reported_round IS NULL",
                       (int(server_round),))
        return self.offline_spent(unreported_by=server_round)

    def budgets(self) -> list[dict]:
        """Assigned and spent budget per round."""
        cur = self._db.execute("SELECT round, assigned, spent FROM budgets ORDER BY round")
        return [dict(zip(("round", "assigned", "spent"), r)) for r in cur]

    # -------------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """The string stored under ``key`` (e.g. the last round seen), or ``default``."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: object) -> None:
        """Store ``str(value)`` under ``key`` durably."""
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, str(value)))
