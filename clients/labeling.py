"""The labeling page: people at a site answer its pending label queries in a browser.

``fedal label --state-dir DIR --client-id N --data-path FILE`` serves one page on
127.0.0.1 (a random port unless ``--port``) and prints its address with a random token;
every request must carry that token (compared in constant time), so another user or a
web page in the same browser cannot read the samples or forge answers. Answers are
written to the site's SQLite pool in one transaction before the reply is sent: an
answer the page shows as saved survives a crash of the page, of the ClientApp or of the
machine's power. The ClientApp of the next round trains on it.

Nothing here talks to the federation: the page reads the site's own data file and
database and never leaves the machine (a remote host needs ``--allow-remote``).

Routes (``?token=`` or the ``X-Fedal-Token`` header; POSTs need the header):

``GET /``                      the page
``GET /static/<file>``         its script and style sheet
``GET /api/state``             pending requests, classes, progress against the round's budget, and ``link``:
                               connected or offline since when, the offline budget left, answers waiting
                               to be sent (:func:`fedal.offline.standing`)
``GET /api/image/<id>.png``    a pending sample as a PNG
``POST /api/answer``           ``{"sample_id": 12, "label": 3}`` -> recorded
``POST /api/unsure``           ``{"sample_id": 12}`` -> request closed as skipped, sample back in the pool
``GET /api/recent``            this labeler's last answers (newest first), to check or change, and which
                               one Undo takes back
``POST /api/undo``             ``{"sample_id": 12}`` -> one of this page's last answers taken back: the
                               sample waits again
``POST /api/change``           ``{"sample_id": 12, "label": 1}`` -> a label corrected (who gave it first
                               and who changed it are both kept)
``GET /api/examples``          a few labeled samples of each class from the site's own labeled set
"""
from __future__ import annotations

import argparse
import errno
import hmac
import importlib.resources
import ipaddress
import json
import re
import secrets
import sqlite3
import ssl
import sys
import threading
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from clients.images import sample_png
from fedal.exceptions import ConfigError, FedalError, InvalidLabelError, SampleStateError, UnknownSampleError
from fedal.data import LocalData
from fedal.offline import SUGGESTIONS, standing
from fedal.pool import LABELED, PENDING, UNLABELED, Pool

TOKEN_HEADER = "X-Fedal-Token"
STATIC_FILES = {"labeling.js": "text/javascript; charset=utf-8", "labeling.css": "text/css; charset=utf-8"}
MAX_BODY = 4096
#: how many of a page's own answers Undo can take back, newest first (older ones are changed instead)
UNDO_DEPTH = 10
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never send it to another site
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


class LabelingError(FedalError):
    """A request the page refuses: ``status`` is the HTTP status to answer, ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _static(name: str) -> bytes:
    return importlib.resources.files("clients").joinpath("static", name).read_bytes()


class LabelingService:
    """What the page does, without HTTP: read the pending requests, record answers.

    Parameters
    ----------
    pool : Pool
        The site's pool (opened on the ClientApp's database).
    data : LocalData
        The site's data (row ``i`` of ``X_pool`` is sample id ``i``).
    labeler : str
        Name stored with each label (``web:<labeler>``; ``web`` when empty).

    Undo belongs to the page: it takes back only answers given through this service since it started,
    the last :data:`UNDO_DEPTH` of them, while nobody else has changed them. Anything else (a label from a
    file, another labeler's answer, an older answer) is corrected with a change, which keeps its history.
    """

    def __init__(self, pool: Pool, data: LocalData, *, labeler: str = "") -> None:
        if len(data.y_pool) != len(pool):
            raise ConfigError(f"the data file has {len(data.y_pool)} pool samples but the database {len(pool)}; "
                              "give the data-path of this SuperNode")
        self.pool, self.data = pool, data
        self.source = f"web:{labeler}" if labeler else "web"
        self.lock = threading.Lock()  # one SQLite connection, shared by the server's threads
        self._undoable: deque[int] = deque(maxlen=UNDO_DEPTH)  # this page's last answers, newest last

    def _pending_request(self, sample_id: int) -> dict:
        state = self.pool.state_of(sample_id)
        if state != PENDING:
            why = "it is already labeled" if state == "labeled" else "its request expired or was closed"
            raise LabelingError(HTTPStatus.CONFLICT, f"sample {sample_id} is not waiting for a label: {why}; "
                                                     "reload the page for the current requests")
        return next(r for r in self.pool.requests(PENDING) if r["sample_id"] == sample_id)

    def state(self) -> dict:
        """Pending requests (oldest round first), classes and progress of the latest round."""
        with self.lock:
            requests = self.pool.requests()
            budgets = {b["round"]: b for b in self.pool.budgets()}
            counts = self.pool.counts()
            link = standing(self.pool)
            offline_ids = {r["request_id"] for r in self.pool.offline_requests()}
            suggestions = json.loads(self.pool.get_meta(SUGGESTIONS, "{}"))
        pending = [r for r in requests if r["status"] == PENDING]
        pending.sort(key=lambda r: (-1 if r["round"] is None else r["round"], r["request_id"]))
        items = []
        for r in pending:
            item = {"sample_id": r["sample_id"], "request_id": r["request_id"], "round": r["round"],
                    "deadline": r["deadline"], "offline": r["request_id"] in offline_ids}
            if (hint := suggestions.get(str(r["sample_id"]))) is not None:  # node config suggest = true
                item["suggestion"] = {"label": hint[0], "class": self.data.class_names[hint[0]], "confidence": hint[1]}
            items.append({**item, **self._view(r["sample_id"])})
        progress = None
        rounds = [r["round"] for r in requests if r["round"] is not None]
        if rounds:
            latest = max(rounds)
            of_round = [r for r in requests if r["round"] == latest]
            status = {s: sum(1 for r in of_round if r["status"] == s) for s in ("pending", "answered", "expired", "skipped")}
            budget = budgets[latest]["assigned"] if latest in budgets else len(of_round)
            progress = {"round": latest, "budget": budget, "asked": len(of_round), **status}
        return {"kind": self.data.kind, "classes": list(self.data.class_names), "labeler": self.source,
                "pending": items, "progress": progress, "counts": counts, "link": link}

    def image(self, sample_id: int) -> bytes:
        """PNG of the image sample ``sample_id``: pending (asked about) or labeled (an answer to check, a
        reference example); the rest of the pool is not shown."""
        if self.data.kind != "image":
            raise LabelingError(HTTPStatus.NOT_FOUND, "this site's samples are table rows, not images")
        with self.lock:
            self._check_known(sample_id, HTTPStatus.NOT_FOUND)
            if self.pool.state_of(sample_id) == UNLABELED:
                raise LabelingError(HTTPStatus.NOT_FOUND, f"sample {sample_id} is neither asked about nor labeled")
        return sample_png(self.data, sample_id)

    def _view(self, sample_id: int) -> dict:
        """How the page shows a sample: its image address or its feature row."""
        if self.data.kind == "image":
            return {"image": f"api/image/{sample_id}.png"}
        return {"features": [round(float(v), 4) for v in self.data.X_pool[sample_id]]}

    def recent(self, limit: int = 10) -> dict:
        """This labeler's last ``limit`` answers, newest first (to check or change), and ``undo``: the sample
        Undo takes back (the newest answer of this page it still may), or None."""
        with self.lock:
            records = [r for r in self.pool.label_records() if r["source"] == self.source]
            changes = {h["sample_id"]: h["by"] for h in self.pool.label_history() if h["action"] == "change"}
            undo = self._undo_target()
        records.sort(key=lambda r: -r["labeled_at"])
        return {"undo": undo,
                "recent": [{"sample_id": r["id"], "label": r["label"], "class": self.data.class_names[r["label"]],
                            "source": r["source"], "round": r["round"], "changed_by": changes.get(r["id"]),
                            "undoable": r["id"] in self._undoable, **self._view(r["id"])}
                           for r in records[:limit]]}

    def _undo_target(self) -> int | None:
        """The newest of this page's answers that is still its own label (call with the lock held)."""
        while self._undoable:
            sample_id = self._undoable[-1]
            if self._own_label(sample_id):
                return sample_id
            self._undoable.pop()  # taken back or corrected elsewhere: no longer this page's to take back
        return None

    def _own_label(self, sample_id: int) -> bool:
        record = next((r for r in self.pool.label_records() if r["id"] == sample_id), None)
        if record is None or record["source"] != self.source:
            return False
        return not any(h["action"] == "change" and h["by"] != self.source and h["at"] >= record["labeled_at"]
                       for h in self.pool.label_history(sample_id))

    def examples(self, per_class: int = 3) -> dict:
        """Up to ``per_class`` labeled samples of each class (the earliest labeled), as references."""
        with self.lock:
            records = sorted(self.pool.label_records(), key=lambda r: (r["labeled_at"], r["id"]))
        out: dict[int, list] = {c: [] for c in range(len(self.data.class_names))}
        for r in records:
            if len(out[r["label"]]) < per_class:
                out[r["label"]].append({"sample_id": r["id"], **self._view(r["id"])})
        return {"examples": [{"label": c, "class": self.data.class_names[c], "samples": s} for c, s in out.items()]}

    def _labeled(self, sample_id: object, action: str) -> tuple[int, dict]:
        """``sample_id`` checked as a labeled sample of this site, with its label record."""
        sample_id = _int_field("sample_id", sample_id, len(self.pool))
        self._check_known(sample_id)
        if self.pool.state_of(sample_id) != LABELED:
            raise LabelingError(HTTPStatus.CONFLICT, f"cannot {action} sample {sample_id}: it has no label; "
                                                     "reload the page for the current requests")
        return sample_id, next(r for r in self.pool.label_records() if r["id"] == sample_id)

    def _raced(self, sample_id: int, action: str) -> LabelingError:
        """The 409 of an action whose sample another process changed between our check and our write."""
        state = self.pool.state_of(sample_id)
        now = {PENDING: "it was taken back and waits for an answer again",
               UNLABELED: "it is back in the pool without a label"}.get(state, "its label was corrected")
        return LabelingError(HTTPStatus.CONFLICT, f"cannot {action} sample {sample_id}: another page changed it a "
                                                  f"moment ago ({now}); nothing was written, reload the page")

    def undo(self, sample_id: object) -> dict:
        """Take back one of this page's last answers: the label is removed (kept in the pool's history) and
        the sample waits again (no new budget is spent; the next round trains without it until it is
        answered again). Anything else is refused with a 409 that says to change it instead."""
        with self.lock:
            sample_id, record = self._labeled(sample_id, "take back")
            if record["source"] != self.source:
                where = "not on this page" if not str(record["source"]).startswith("web") else "on another page"
                raise LabelingError(HTTPStatus.CONFLICT, f"sample {sample_id} was labeled by {record['source']!r}, "
                                                         f"{where}: Undo takes back only your own answers; change it "
                                                         "instead in the list of answers")
            if sample_id not in self._undoable:
                raise LabelingError(HTTPStatus.CONFLICT, f"sample {sample_id} is not among the last {UNDO_DEPTH} "
                                                         "answers given on this page since it started: Undo does not "
                                                         "reach that far back; change it instead in the list of answers")
            try:
                self.pool.reopen(sample_id, by=self.source, given_by=self.source)
            except SampleStateError as exc:  # corrected by someone else since, maybe a moment ago
                self._undoable.remove(sample_id)
                raise LabelingError(HTTPStatus.CONFLICT, f"{exc} (in the list of answers)") from None
            self._undoable.remove(sample_id)
        return {"reopened": True, "sample_id": sample_id}

    def change(self, sample_id: object, label: object) -> dict:
        """Correct the label of a labeled sample (the next round trains on the new one). Who gave the label
        first stays with it; the change and who made it go to the pool's history. Same class: nothing
        is written (``changed`` False)."""
        with self.lock:
            sample_id, record = self._labeled(sample_id, "change")
            label = self._label_field(label, then=f"the label stays {self.data.class_names[record['label']]}: "
                                                  "pick one of the classes")
            try:
                before = self.pool.change_label(sample_id, label, source=self.source)
            except SampleStateError:
                raise self._raced(sample_id, "change") from None
        return {"changed": before != label, "sample_id": sample_id, "label": label,
                "class": self.data.class_names[label], "before": self.data.class_names[before]}

    def _label_field(self, label: object, **then: str) -> int:
        """``label`` checked as a class of this site (a 400 naming the range otherwise; ``then`` says what
        happens to the request or label, see :meth:`Pool.check_label`)."""
        if isinstance(label, bool) or not isinstance(label, int):
            raise LabelingError(HTTPStatus.BAD_REQUEST, f"label must be an integer class 0..{self.pool.n_classes - 1}, "
                                                        f"got {str(label)[:40]!r}")
        try:
            return self.pool.check_label(label, **then)
        except InvalidLabelError as exc:
            raise LabelingError(HTTPStatus.BAD_REQUEST, str(exc)) from None

    def _check_known(self, sample_id: int, status: int = HTTPStatus.BAD_REQUEST) -> None:
        try:
            self.pool.state_of(sample_id)
        except UnknownSampleError as exc:
            raise LabelingError(status, str(exc)) from None

    def answer(self, sample_id: object, label: object) -> dict:
        """Record ``label`` for the pending sample ``sample_id`` (committed before this returns)."""
        sample_id = _int_field("sample_id", sample_id, len(self.pool))
        label = self._label_field(label)
        with self.lock:
            self._check_known(sample_id)
            req = self._pending_request(sample_id)
            try:
                self.pool.answer({sample_id: label}, source=self.source, round=req["round"])
            except SampleStateError:  # another page (a second `fedal label`) answered it first
                raise LabelingError(HTTPStatus.CONFLICT, f"sample {sample_id} was answered a moment ago on another "
                                                         "page; reload for the current requests") from None
            self._undoable.append(sample_id)
        return {"recorded": True, "sample_id": sample_id, "label": label, "class": self.data.class_names[label],
                "round": req["round"]}

    def unsure(self, sample_id: object) -> dict:
        """Close the pending request of ``sample_id`` as skipped ("unsure"): the sample goes back to the pool."""
        sample_id = _int_field("sample_id", sample_id, len(self.pool))
        with self.lock:
            self._check_known(sample_id)
            self._pending_request(sample_id)
            try:
                self.pool.release([sample_id], status="skipped", note=f"unsure ({self.source})")
            except SampleStateError:
                raise LabelingError(HTTPStatus.CONFLICT, f"sample {sample_id} was answered a moment ago on another "
                                                         "page; reload for the current requests") from None
        return {"released": True, "sample_id": sample_id}


def _int_field(name: str, value: object, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabelingError(HTTPStatus.BAD_REQUEST, f"{name} must be an integer, got {str(value)[:40]!r}")
    if not 0 <= value < size:  # also keeps ids the database cannot hold (10**30) away from SQLite
        raise LabelingError(HTTPStatus.BAD_REQUEST, f"{name} must be a sample of this site, 0..{size - 1}, "
                                                    f"got {str(value)[:40]}")
    return value


def make_handler(service: LabelingService, token: str) -> type[BaseHTTPRequestHandler]:
    """The request handler class of one page (bound to its service and token)."""
    expected = token.encode()
    page = _static("labeling.html").replace(b"{{TOKEN}}", token.encode())

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedal-label"
        sys_version = ""

        def log_message(self, fmt: str, *args) -> None:  # no access log: URLs carry the token
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in SECURITY_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _authorized(self, query: dict, *, header_only: bool) -> bool:
            given = self.headers.get(TOKEN_HEADER)
            if given is None and not header_only:
                given = (query.get("token") or [None])[0]
            return given is not None and hmac.compare_digest(given.encode(), expected)

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            # POSTs need the header: a form or script on another site cannot set it without CORS
            if not self._authorized(query, header_only=method == "POST"):
                self._error(HTTPStatus.FORBIDDEN, "missing or wrong token: open the address `fedal label` printed")
                return
            try:
                if method == "GET":
                    self._get(url.path)
                else:
                    self._post(url.path)
            except LabelingError as exc:
                self._error(exc.status, str(exc))
            except FedalError as exc:
                self._error(HTTPStatus.BAD_REQUEST, str(exc))
            except sqlite3.OperationalError as exc:  # e.g. locked longer than the pool's 30 s timeout
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"the site database is busy ({exc}); nothing was "
                                                            "recorded, try again")

        def _get(self, path: str) -> None:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
                name = path[len("/static/"):]
                self._send(HTTPStatus.OK, _static(name), STATIC_FILES[name])
            elif path == "/api/state":
                self._json(HTTPStatus.OK, service.state())
            elif path == "/api/recent":
                self._json(HTTPStatus.OK, service.recent())
            elif path == "/api/examples":
                self._json(HTTPStatus.OK, service.examples())
            elif m := re.fullmatch(r"/api/image/(\d{1,12})\.png", path):
                self._send(HTTPStatus.OK, service.image(int(m.group(1))), "image/png")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no page {path}")

        def _post(self, path: str) -> None:
            length = self.headers.get("Content-Length", "")
            length = int(length) if length.isdigit() else 0
            if not 0 < length <= MAX_BODY:
                raise LabelingError(HTTPStatus.BAD_REQUEST, f"send a JSON body of at most {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # 4 kB of "[" nests too deep
                raise LabelingError(HTTPStatus.BAD_REQUEST, "the body is not JSON; send {\"sample_id\": N, \"label\": C}") from None
            if not isinstance(body, dict):
                raise LabelingError(HTTPStatus.BAD_REQUEST, "send a JSON object {\"sample_id\": N, \"label\": C}")
            if path == "/api/answer":
                self._json(HTTPStatus.OK, service.answer(body.get("sample_id"), body.get("label")))
            elif path == "/api/unsure":
                self._json(HTTPStatus.OK, service.unsure(body.get("sample_id")))
            elif path == "/api/undo":
                self._json(HTTPStatus.OK, service.undo(body.get("sample_id")))
            elif path == "/api/change":
                self._json(HTTPStatus.OK, service.change(body.get("sample_id"), body.get("label")))
            else:
                raise LabelingError(HTTPStatus.NOT_FOUND, f"no action {path}")

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._route("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

    return Handler


def is_loopback(host: str) -> bool:
    """True if ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LabelingServer(ThreadingHTTPServer):
    """The page's HTTP server; :attr:`url` is the address to open (with the token).

    Parameters
    ----------
    service : LabelingService
        What the page shows and records.
    host : str
        Address to listen on; a non-loopback one needs ``allow_remote``.
    port : int
        Port (0 = a free one).
    token : str, optional
        Access token (default: 32 random URL-safe characters).
    allow_remote : bool
        Allow a non-loopback ``host``.
    certfile, keyfile : str, optional
        Serve HTTPS with this certificate and key.
    """

    daemon_threads = True
    #: connections waiting to be accepted: a team answering at once must not be reset (the default is 5)
    request_queue_size = 128

    def __init__(self, service: LabelingService, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 allow_remote: bool = False, certfile: str | None = None, keyfile: str | None = None) -> None:
        if not allow_remote and not is_loopback(host):
            raise ConfigError(
                f"--host {host} would let other machines reach the labeling page; keep the default 127.0.0.1 "
                "(people use a browser on this machine or an SSH tunnel), or pass --allow-remote with --ssl-certfile"
            )
        if token is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,}", token):
            raise ConfigError("--token must be at least 16 characters of A-Z a-z 0-9 _ -")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"--port must be a port number in 0..65535 (0 = a free one), got {port!r}")
        context = _tls_context(certfile, keyfile) if certfile else None  # checked before the port is taken
        if keyfile and not certfile:
            raise ConfigError("--ssl-keyfile needs --ssl-certfile (the certificate it is the key of)")
        self.token = token or secrets.token_urlsafe(24)
        self.service = service
        try:
            super().__init__((host, port), make_handler(service, self.token))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (another `fedal label`, or another program); give "
                                  "another --port, or --port 0 for a free one") from None
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host} needs privileges this user lacks (ports below 1024 do); give "
                                  "a --port of 1024 or more, or --port 0 for a free one") from None
            raise ConfigError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; check --host and --port") \
                from None
        self.scheme = "http"
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"

    @property
    def url(self) -> str:
        """The address to open, token included."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{self.scheme}://{host}:{port}/?token={self.token}"


def _tls_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """The server's TLS context from ``certfile`` and ``keyfile``; :class:`ConfigError` naming a missing or bad file."""
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{flag} {path} does not exist (or is not a file); give the PEM file, e.g. made with "
                              "`openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem`")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise ConfigError(f"--ssl-certfile {certfile}" + (f" with --ssl-keyfile {keyfile}" if keyfile else "")
                          + f" cannot be used ({exc.reason or exc}): give a PEM certificate and its private key "
                          "(the key in the certificate file, or with --ssl-keyfile)") from None
    except OSError as exc:
        raise ConfigError(f"--ssl-certfile {certfile}: cannot read it ({exc.strerror or exc})") from None
    return context


def open_labeling(state_dir: str | Path, client_id: int, data_path: str | Path, *, labeler: str = "",
                  **server_kwargs) -> LabelingServer:
    """A labeling server for one site (not yet serving; call ``serve_forever``).

    Parameters
    ----------
    state_dir : path
        The SuperNode's ``state-dir`` (holds ``client-<client_id>.db``; it must exist).
    client_id : int
        The SuperNode's ``client-id``.
    data_path : path
        The site's data file (the node config's ``data-path``).
    labeler : str
        Name stored with each label.
    **server_kwargs
        Passed to :class:`LabelingServer` (host, port, token, ...).
    """
    from clients.node import open_site_pool
    from fedal.sitedata import load_site

    data: LocalData = load_site(data_path, client_id, state_dir)
    pool = open_site_pool(state_dir, client_id, data, create=False)
    try:
        return LabelingServer(LabelingService(pool, data, labeler=labeler), **server_kwargs)
    except BaseException:
        pool.close()
        raise


# ------------------------------------------------------------------ fedal label
def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal label`` to ``parser``."""
    parser.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (holds client-<id>.db)")
    parser.add_argument("--client-id", type=int, required=True, help="the SuperNode's client-id")
    parser.add_argument("--data-path", required=True, help="the site's data file (the node config's data-path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0 = a free one)")
    parser.add_argument("--labeler", default="", help="name stored with each label (web:<name>)")
    parser.add_argument("--token", default=None, help="access token (default: a new random one)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key")


def run_label(args: argparse.Namespace) -> int:
    """Serve the page for the parsed ``args`` until Ctrl-C."""
    if not 0 <= args.port <= 65535:  # the flags first, before the site's files are read
        raise ConfigError(f"--port must be a port number in 0..65535 (0 = a free one), got {args.port}")
    if args.ssl_certfile:
        _tls_context(args.ssl_certfile, args.ssl_keyfile)
    if args.allow_remote and not is_loopback(args.host) and not args.ssl_certfile:
        print("fedal label: warning: serving plain HTTP to the network; the token can be sniffed. "
              "Prefer --ssl-certfile/--ssl-keyfile or an SSH tunnel.", file=sys.stderr)
    server = open_labeling(args.state_dir, args.client_id, args.data_path, labeler=args.labeler, host=args.host,
                           port=args.port, token=args.token, allow_remote=args.allow_remote,
                           certfile=args.ssl_certfile, keyfile=args.ssl_keyfile)
    print(f"labeling page for client {args.client_id}: {server.url}", flush=True)
    print("open it in a browser on this machine; Ctrl-C stops it (every answer is already saved)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server.service.pool.close()
    return 0
