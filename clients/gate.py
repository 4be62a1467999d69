"""The site gate: a site's SuperNode reaches the coordinator only through it, and only apps the site accepted run.

Flower's SuperNode runs whatever app (FAB) the coordinator submits, next to the site's data; flwr 1.41 can check a
FAB's signature (``--trusted-entities``) only against a licence record that the open-source SuperLink never sends,
so every signed or unsigned FAB is refused and the check cannot be used. The gate enforces the site's choice
outside the app: it listens on loopback at the site, the SuperNode is started with ``--superlink`` pointing at it,
and it forwards the Fleet API to the coordinator over TLS (the coordinator's certificate checked against the site's
``ca.crt``). On the way it reads what Flower sends:

* ``get-run``: the run's app hash (SHA-256 of the FAB). A run whose hash is not one the site accepts is refused:
  the SuperNode is answered ``403`` (Flower's SuperNode then ignores the message as of a run that is not
  running), a log line names the run and the hash, and from then on the run's messages are taken out of what the
  SuperNode pulls. Its code is never fetched and never started, so it never reaches the site's data.
* ``get-fab``: fetched only for an accepted hash, and the FAB that comes back must have that hash.
* every other request naming a refused run (``pull-object``, ``push-object``, ``confirm-message-received``,
  ``push-messages``) is refused; a path outside the Fleet API is refused.

The site accepts an app by its hash: ``fedal gate --accept-app DIR`` builds the FAB of the checkout the site
reviewed (as ``flwr build`` and ``flwr run`` do: the build is reproducible), ``--accept-app FILE.fab`` hashes a built
one, ``--accept-app HEX`` takes the 64 hex digits that ``flwr build`` prints in the file name and ``flwr ls`` shows.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import re
import socketserver
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from clients.labeling import is_loopback
from fedal.exceptions import ConfigError

LOG = logging.getLogger("fedal.gate")
FLEET = "/v1/fleet/"
#: request headers not forwarded (hop-by-hop, or set again by the client for the next hop)
_DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                 "proxy-connection", "accept-encoding"}
_DROP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


def app_hash(source: str | Path) -> str:
    """The hash Flower gives the app ``source``: 64 hex digits as given, a ``.fab`` file's SHA-256, or the SHA-256 of
    the FAB that ``flwr build`` / ``flwr run`` would build from the app folder ``source``."""
    text = str(source).strip().lower()
    if _HEX64.fullmatch(text):
        return text
    path = Path(source).expanduser()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        if not (path / "pyproject.toml").is_file():
            raise ConfigError(f"--accept-app {path} is a folder without pyproject.toml: give the Flower app's folder "
                              "(the fedal checkout the site reviewed), a .fab file or the app's 64-hex-digit hash")
        from flwr.cli.build import build_fab_from_disk

        return hashlib.sha256(build_fab_from_disk(path.resolve())).hexdigest()
    raise ConfigError(f"--accept-app {source!r} is neither a 64-hex-digit app hash nor an existing .fab file or app "
                      "folder")


def split_address(address: str, what: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), or :class:`ConfigError` naming the flag ``what``."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} {address!r} is not host:port (e.g. 127.0.0.1:9095)")
    return host.strip("[]"), int(port)


def gate_certificates(folder: str | Path) -> tuple[Path, Path, Path]:
    """The gate's TLS files in ``folder``, made once: ``gate-ca.crt`` (the SuperNode's ``--root-certificates``),
    ``gate.crt`` and ``gate.key`` (owner-only), valid for 127.0.0.1, ::1 and localhost only.

    Flower's SuperNode signs its requests only over TLS, so the loopback hop from the SuperNode to the gate is TLS
    too, with a CA of the site's own that nothing else trusts (its key is not kept)."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder).expanduser()
    ca_path, cert_path, key_path = folder / "gate-ca.crt", folder / "gate.crt", folder / "gate.key"
    if ca_path.is_file() and cert_path.is_file() and key_path.is_file():
        return ca_path, cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedal site gate CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedal site gate")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert_path, key_path


@dataclass
class SiteGate:
    """The gate between a site's SuperNode and the coordinator (use as a context manager, or :meth:`serve`).

    Parameters
    ----------
    superlink : str
        The coordinator's Fleet address, ``host:port`` (its gateway).
    root_certificates : path
        The CA the coordinator's certificate is checked against (the federation's public ``ca.crt``).
    accepted : set of str
        Hashes of the apps this site runs (:func:`app_hash`); at least one.
    listen : str
        Loopback ``host:port`` the SuperNode connects to (port 0: any free one, see :attr:`address`).
    tls_dir : path
        Folder of the gate's own certificate (:func:`gate_certificates`; made there the first time).
    """

    superlink: str
    root_certificates: Path
    accepted: set[str]
    listen: str = "127.0.0.1:0"
    tls_dir: Path = Path("gate-tls")
    refused: dict[int, str] = field(default_factory=dict)  # run id -> its app hash
    allowed: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import httpx

        self.accepted = {app_hash(a) for a in self.accepted}
        if not self.accepted:
            raise ConfigError("the site gate needs at least one --accept-app: the app this site reviewed")
        host, port = split_address(self.listen, "--listen")
        if not is_loopback(host):
            raise ConfigError(f"--listen {self.listen}: the gate must listen on loopback (127.0.0.1), where only this "
                              "site's SuperNode reaches it; the SuperNode runs on the same machine")
        split_address(self.superlink, "--superlink")
        ca = Path(self.root_certificates).expanduser()
        if not ca.is_file():
            raise ConfigError(f"--root-certificates {ca} does not exist: give the federation's ca.crt")
        context = ssl.create_default_context(cafile=str(ca))
        self._client = httpx.Client(base_url=f"https://{self.superlink}", verify=context, timeout=600.0,
                                    limits=httpx.Limits(max_keepalive_connections=8))
        self._lock = threading.Lock()
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                gate._handle(self)

            def do_GET(self):  # noqa: N802
                self._refuse_other()

            do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815

            def _refuse_other(self):
                gate._reply(self, 403, b"fedal site gate: only the Fleet API's POST requests pass\n", "text/plain")

            def log_message(self, fmt, *args):  # requests are logged by the gate, not on stderr
                LOG.debug("%s %s", self.address_string(), fmt % args)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self.ca_path, cert, key = gate_certificates(self.tls_dir)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    # ------------------------------------------------------------- the checks
    def _refuse_run(self, run_id: int, fab_hash: str) -> None:
        with self._lock:
            first = run_id not in self.refused
            self.refused[run_id] = fab_hash
        if first:
            LOG.warning("refused run %d: its app %s is not one this site accepts (%s); its code is not fetched and its "
                        "messages do not reach the SuperNode", run_id, fab_hash or "(no hash)",
                        ", ".join(sorted(self.accepted)))

    def _request_run(self, path: str, body: bytes) -> int | None:
        """The run id a request names (None for requests without one)."""
        from flwr.proto import fab_pb2, message_pb2

        kinds = {"pull-object": message_pb2.PullObjectRequest, "push-object": message_pb2.PushObjectRequest,
                 "confirm-message-received": message_pb2.ConfirmMessageReceivedRequest,
                 "get-fab": fab_pb2.GetFabRequest}
        kind = kinds.get(path[len(FLEET):])
        if kind is None:
            return None
        request = kind()
        request.ParseFromString(body)
        return int(request.run_id)

    def _pushed_runs(self, body: bytes) -> set[int]:
        from flwr.proto import fleet_pb2

        request = fleet_pb2.PushMessagesRequest()
        request.ParseFromString(body)
        return {int(m.metadata.run_id) for m in request.messages_list}

    def _check_request(self, path: str, body: bytes) -> str | None:
        """Why this request must not pass (None: it may)."""
        if not path.startswith(FLEET) or "?" in path:
            return f"{path} is not a Fleet API endpoint"
        name = path[len(FLEET):]
        if name == "get-fab":
            from flwr.proto import fab_pb2

            request = fab_pb2.GetFabRequest()
            request.ParseFromString(body)
            if request.hash_str not in self.accepted:
                self._refuse_run(int(request.run_id), request.hash_str)
                return f"app {request.hash_str} is not accepted at this site"
        runs = self._pushed_runs(body) if name == "push-messages" else {self._request_run(path, body)}
        refused = sorted(r for r in runs if r is not None and r in self.refused)
        if refused:
            return f"run {refused[0]} runs an app this site does not accept"
        return None

    def _check_response(self, path: str, body: bytes) -> tuple[bytes, str | None]:
        """The response to pass on (messages of refused runs taken out) and why it must not pass, if so."""
        name = path[len(FLEET):]
        if name == "get-run":
            from flwr.proto import run_pb2

            response = run_pb2.GetRunResponse()
            response.ParseFromString(body)
            run_id, fab_hash = int(response.run.run_id), response.run.fab_hash
            if fab_hash not in self.accepted:
                self._refuse_run(run_id, fab_hash)
                return body, f"run {run_id} runs app {fab_hash}, not an app this site accepts"
            with self._lock:
                new = run_id not in self.allowed
                self.allowed[run_id] = fab_hash
            if new:
                LOG.info("run %d: app %s accepted", run_id, fab_hash)
        elif name == "get-fab":
            from flwr.proto import fab_pb2

            response = fab_pb2.GetFabResponse()
            response.ParseFromString(body)
            got = hashlib.sha256(response.fab.content).hexdigest()
            if got not in self.accepted or got != response.fab.hash_str:
                LOG.warning("refused a FAB that claims hash %s but hashes to %s", response.fab.hash_str, got)
                return body, f"the FAB sent hashes to {got}, not an accepted app"
        elif name == "pull-messages" and self.refused:
            from flwr.proto import fleet_pb2

            response = fleet_pb2.PullMessagesResponse()
            response.ParseFromString(body)
            keep = [i for i, m in enumerate(response.messages_list) if int(m.metadata.run_id) not in self.refused]
            if len(keep) < len(response.messages_list):
                trees = list(response.message_object_trees)
                messages = [response.messages_list[i] for i in keep]
                kept_trees = [trees[i] for i in keep] if len(trees) == len(response.messages_list) else trees
                del response.messages_list[:]
                del response.message_object_trees[:]
                response.messages_list.extend(messages)
                response.message_object_trees.extend(kept_trees)
                body = response.SerializeToString()
        return body, None

    # ------------------------------------------------------------- forwarding
    def _reply(self, handler, status: int, body: bytes, content_type: str, headers=()) -> None:
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _refusal(self, handler, why: str) -> None:
        body = json.dumps({"code": "FEDAL_SITE_GATE", "message": f"fedal site gate: {why}"}).encode()
        self._reply(handler, 403, body, "application/json")

    def _handle(self, handler) -> None:
        import httpx

        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path
        try:
            why = self._check_request(path, body)
        except Exception as exc:  # noqa: BLE001 - a body the gate cannot read does not pass
            why = f"unreadable {path} request ({type(exc).__name__})"
        if why:
            LOG.info("refused %s: %s", path, why)
            return self._refusal(handler, why)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _DROP_REQUEST}
        try:
            upstream = self._client.post(path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            LOG.warning("the coordinator at %s did not answer %s: %s", self.superlink, path, exc)
            return self._reply(handler, 502, f"fedal site gate: the coordinator did not answer: {exc}\n".encode(),
                               "text/plain")
        out = upstream.content
        if upstream.status_code == 200:
            try:
                out, why = self._check_response(path, out)
            except Exception as exc:  # noqa: BLE001
                out, why = out, f"unreadable {path} response ({type(exc).__name__})"
            if why:
                return self._refusal(handler, why)
        passed = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE | {"content-type"}]
        self._reply(handler, upstream.status_code, out, upstream.headers.get("content-type", "application/protobuf"),
                    passed)

    # ------------------------------------------------------------- running
    def start(self) -> "SiteGate":
        self._thread = threading.Thread(target=self._server.serve_forever, name="site-gate", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> "SiteGate":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------- ``fedal gate``
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal gate`` to ``parser``."""
    parser.add_argument("--superlink", required=True, help="the coordinator's Fleet address host:port (its gateway)")
    parser.add_argument("--root-certificates", required=True, help="the federation's ca.crt")
    parser.add_argument("--accept-app", action="append", required=True, metavar="DIR|FILE.fab|HASH",
                        help="an app this site runs: the reviewed checkout, its .fab or its hash (repeatable)")
    parser.add_argument("--listen", default="127.0.0.1:9095",
                        help="loopback host:port for the SuperNode's --superlink (default 127.0.0.1:9095)")
    parser.add_argument("--tls-dir", default="gate-tls",
                        help="the gate's own certificate, made there once (default ./gate-tls): give the SuperNode "
                             "--root-certificates TLS_DIR/gate-ca.crt")


def run(args: argparse.Namespace) -> int:
    """``fedal gate``: serve until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedal gate: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    gate = SiteGate(args.superlink, Path(args.root_certificates), set(args.accept_app), args.listen,
                    Path(args.tls_dir))
    print(f"site gate on {gate.address} -> {args.superlink}; apps accepted: {', '.join(sorted(gate.accepted))}\n"
          f"start the SuperNode with --superlink {gate.address} --root-certificates {gate.ca_path}", flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gate.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        return 130
    finally:
        gate.stop()
    return 0
