#!/usr/bin/env python3
"""The coordinator's gateway: nginx in front of the SuperLink, forwarding the Fleet API only.

flwr 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr stop``,
``flwr supernode register``) and the ServerApp runtime API on one HTTP(S) port, and the Control API has no
authentication in the open-source release. So the SuperLink listens on loopback, where only the coordinator
reaches it, and the sites reach this gateway instead: TLS with the SuperLink's certificate, the Fleet API's
POST endpoints forwarded to the SuperLink (TLS, certificate checked), and every other path, method or
host answered ``403`` without reaching the SuperLink.

    deploy/fleet_gateway.py --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --certs certs --workdir gateway

runs nginx in the foreground (Ctrl-C stops it); ``--print-config`` prints the nginx configuration instead, for a
site that runs its own nginx. The forwarded paths are read from Flower's own Fleet router, so they follow the
installed flwr version. nginx comes from Debian (``apt-get install nginx-light``).
"""
from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: the nginx binary (Debian's ``nginx-light`` installs /usr/sbin/nginx)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
#: largest request a site may send: a round's reply with the network pipeline's weights, and their objects
MAX_BODY = "1g"
#: seconds a forwarded request may take (a SuperNode's pull of a large model)
PROXY_TIMEOUT_S = 600


class GatewayError(RuntimeError):
    """The gateway could not be configured or started (the message says why and what to do)."""


def fleet_paths() -> list[str]:
    """The Fleet API's endpoints (``/v1/fleet/pull-messages``, ...), as the installed flwr serves them."""
    from flwr.superlink.routers.fleet.router import router

    paths = sorted({route.path for route in router.routes})
    if not paths or not all(path.startswith("/v1/fleet/") for path in paths):
        raise GatewayError(f"flwr's Fleet router lists {paths!r}, not /v1/fleet/ endpoints: this gateway was written "
                           "for flwr 1.41; check the installed version")
    return paths


def split_address(address: str, what: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port), or :class:`GatewayError` naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise GatewayError(f"{what} {address!r} is not host:port (e.g. 0.0.0.0:9092)")
    return host.strip("[]"), int(port)


@dataclass
class FleetGateway:
    """nginx configured to forward only the Fleet API from ``listen`` to the SuperLink at ``superlink``.

    Parameters
    ----------
    listen : str
        ``host:port`` the sites connect to (their SuperNodes' ``--superlink``).
    superlink : str
        The SuperLink's ``host:port``: loopback (or a private interface only the coordinator reaches).
    certfile, keyfile : path
        The certificate the sites see (the SuperLink's, from ``deploy/make_certs.sh``, valid for the name they use).
    cafile : path
        The CA the gateway checks the SuperLink's certificate against.
    workdir : path
        Where the configuration, logs, pid file and nginx's temporary files go.
    superlink_name : str
        Name the SuperLink's certificate is checked for (default ``localhost``).
    """

    listen: str
    superlink: str
    certfile: Path
    keyfile: Path
    cafile: Path
    workdir: Path
    superlink_name: str = "localhost"
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        for name in ("certfile", "keyfile", "cafile"):
            path = Path(getattr(self, name)).expanduser().resolve()
            if not path.is_file():
                raise GatewayError(f"{name} {path} does not exist; deploy/make_certs.sh writes ca.crt, server.crt and "
                                   "server.key")
            setattr(self, name, path)
        self.listen_host, self.listen_port = split_address(self.listen, "--listen")
        self.superlink_host, self.superlink_port = split_address(self.superlink, "--superlink")

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "gateway.log"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def config(self) -> str:
        """The nginx configuration: one TLS server, an exact location per Fleet endpoint, 403 for the rest."""
        w = self.workdir
        listen = f"[{self.listen_host}]:{self.listen_port}" if ":" in self.listen_host else \
            f"{self.listen_host}:{self.listen_port}"
        upstream = f"[{self.superlink_host}]:{self.superlink_port}" if ":" in self.superlink_host else \
            f"{self.superlink_host}:{self.superlink_port}"
        forward = "".join(f"""
        location = {path} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
        }}""" for path in fleet_paths())
        # nginx started as root hands its workers to "nobody", who could not write the temporary files here
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        return f"""# fedal: the Fleet API only, for the sites (deploy/fleet_gateway.py; regenerate, do not edit)
{user}worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/gateway.log notice;
events {{ worker_connections 512; }}

http {{
    log_format fleet '$time_iso8601 $remote_addr "$request_method $uri" $status $request_length $bytes_sent';
    access_log {w}/access.log fleet;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    server_tokens off;
    client_max_body_size {MAX_BODY};
    proxy_read_timeout {PROXY_TIMEOUT_S}s;
    proxy_send_timeout {PROXY_TIMEOUT_S}s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {self.cafile};
    proxy_ssl_name {self.superlink_name};
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;

    upstream superlink {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {self.certfile};
        ssl_certificate_key {self.keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
{forward}

        # the Control API (flwr run / stop / ls / supernode register), the ServerApp runtime API, the docs: not here
        location / {{
            default_type text/plain;
            return 403 "fedal gateway: only the Fleet API is served here; the Control API is for the coordinator\\n";
        }}
    }}
}}
"""

    def write_config(self) -> Path:
        for sub in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        return self.config_path

    def command(self) -> list[str]:
        return [NGINX, "-p", str(self.workdir), "-c", str(self.config_path), "-e", str(self.log_path)]

    def start(self, timeout: float = 30) -> subprocess.Popen:
        """Write the configuration, check it (``nginx -t``), start nginx; return once it serves TLS."""
        if not Path(NGINX).is_file():
            raise GatewayError(f"nginx is not installed ({NGINX} not found): apt-get install nginx-light, or run your "
                               "own reverse proxy with deploy/fleet_gateway.py --print-config")
        self.write_config()
        test = subprocess.run([*self.command(), "-t", "-q"], capture_output=True, text=True)
        if test.returncode != 0:
            raise GatewayError(f"nginx refused the gateway's configuration {self.config_path}:\n"
                               f"{test.stderr.strip()}")
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        context = ssl.create_default_context(cafile=str(self.cafile))
        context.check_hostname = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(f"nginx exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.listen_host, self.listen_port), timeout=2) as raw:
                    with context.wrap_socket(raw):
                        return self.process
            except (OSError, ssl.SSLError):
                time.sleep(0.2)
        raise GatewayError(f"the gateway did not accept TLS on {self.listen} within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGQUIT)  # nginx: graceful stop
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)

    def __enter__(self) -> "FleetGateway":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:9092", help="host:port the sites connect to (default 0.0.0.0:9092)")
    parser.add_argument("--superlink", default="127.0.0.1:9093",
                        help="the SuperLink's loopback host:port (default 127.0.0.1:9093)")
    parser.add_argument("--certs", default="certs", help="folder of ca.crt, server.crt, server.key (deploy/make_certs.sh)")
    parser.add_argument("--workdir", default="gateway", help="configuration, logs and temporary files (default gateway)")
    parser.add_argument("--print-config", action="store_true", help="print the nginx configuration and exit")
    args = parser.parse_args(argv)
    certs = Path(args.certs)
    try:
        gateway = FleetGateway(args.listen, args.superlink, certs / "server.crt", certs / "server.key",
                               certs / "ca.crt", Path(args.workdir))
        if args.print_config:
            print(gateway.config(), end="")
            return 0
        gateway.start()
    except GatewayError as exc:
        print(f"fleet_gateway: {exc}", file=sys.stderr)
        return 2
    print(f"gateway on {args.listen} -> SuperLink {args.superlink} (Fleet API only); config {gateway.config_path}, "
          f"log {gateway.log_path}, requests {gateway.access_log}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return gateway.process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        gateway.stop()


if __name__ == "__main__":
    sys.exit(main())
