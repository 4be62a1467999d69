#!/usr/bin/env python3
"""Run fedal on Flower's Deployment Engine on this machine: TLS, authenticated SuperNodes.

    .venv/bin/python deploy/run_local_deployment.py --sites 2 --rounds 3 --workdir runs/deploy

Steps, each printed as the command a site administrator would type:

1. a private CA and the SuperLink's certificate (``deploy/make_certs.sh``);
2. one data file per site (``fedal split``): each SuperNode reads only its own;
3. an ECDSA key pair per site (``ssh-keygen -t ecdsa -b 384``);
4. ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
5. ``flwr supernode register <site>.pub`` for every site: only these keys may connect;
6. ``flower-supernode`` per site with its private key and its ``--node-config``
   (``client-id``, ``data-path``, ``state-dir``, ``oracle``);
7. ``flwr run . <connection> --run-config <toml>`` and wait until the run finishes;
8. stop every process (process groups: SuperExec and ClientApp children too), also on
   failure or Ctrl-C.

Everything is written under ``--workdir``: ``certs/``, ``keys/``, ``sites/``, ``state/``
(the sites' SQLite databases), ``server/`` (results.json, checkpoint), ``logs/`` and
``flwr/`` (the CLI's connection config; ``FLWR_HOME`` points there, not at ``~/.flwr``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedal.config import FederationConfig, absolute_paths, parse_assignments
from fedal.exceptions import FedalError
from fedal.federation import check_federation
from fedal.fileio import toml_value

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "deploy") not in sys.path:  # fleet_gateway.py beside this script, however this one was loaded
    sys.path.insert(0, str(REPO_ROOT / "deploy"))
CONNECTION = "fedal-local"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec


class DeploymentError(RuntimeError):
    """A step of the deployment failed (the message says which and where its log is)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def last_error(log: str) -> str | None:
    """The last exception a Python traceback in ``log`` ended with, as one plain line (``DataFileError: data set
    ...``; ``fedal.exceptions.`` and the like dropped), or None when the log holds no traceback.

    Flower writes the traceback of an exception in a ServerApp to the run's log (``flwr log``) and of one in a
    ClientApp to its SuperNode's log."""
    error, in_traceback = None, False
    for line in ANSI.sub("", log).splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            name, sep, message = line.partition(": ")
            error = f"{name.rsplit('.', 1)[-1]}{sep}{message}".strip()
            in_traceback = False
    return error


@dataclass
class Site:
    """One SuperNode: its id, files and process."""

    client_id: int
    data_path: Path
    state_dir: Path
    key: Path  # private key; the public one is key + ".pub"
    oracle: str = "simulated"
    port: int = 0
    process: subprocess.Popen | None = None
    node_id: int | None = None
    gate: subprocess.Popen | None = None  # its `fedal gate`, when the deployment pins the app
    gate_port: int = 0
    extra: str = ""  # more node config, e.g. 'label-wait=10 offline-after=15'

    def node_config(self) -> str:
        return (f'client-id={self.client_id} data-path="{self.data_path}" state-dir="{self.state_dir}" '
                f'oracle="{self.oracle}"' + (f" {self.extra}" if self.extra else ""))


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (use as a context manager: ``__exit__`` stops all).

    Parameters
    ----------
    workdir : path
        Where certificates, keys, data, state and logs go.
    sites : int
        Number of SuperNodes.
    run_config : dict
        fedal settings (kebab-case) for the run, e.g. ``{"rounds": 2, "dataset": "digits"}``.
    oracle : str
        Node config ``oracle`` of every site (``simulated`` needs the labels in the site files).
    site_formats : tuple of str
        What each site holds, in turn: ``npz`` (a ``fedal split`` file), ``png`` (a folder of PNG files in class
        subfolders) or ``dicom`` (DICOM files with a labels.csv); e.g. ``("png", "dicom")`` for two hospitals.
    verbose : bool
        Print each command before running it.
    """

    workdir: Path
    sites: int = 2
    run_config: dict = field(default_factory=dict)
    oracle: str = "simulated"
    site_formats: tuple = ("npz",)
    verbose: bool = True
    superlink_port: int = 0  # the SuperLink, on loopback: the coordinator's flwr CLI and ServerApp only
    gateway: bool = True  # the sites reach the SuperLink through deploy/fleet_gateway.py (the Fleet API only)
    pin_app: bool = True  # each site runs `fedal gate` accepting only this checkout's app (clients/gate.py)
    fleet_port: int = 0  # the gateway's port: the sites' address of the coordinator
    processes: list[subprocess.Popen] = field(default_factory=list)
    site_list: list[Site] = field(default_factory=list)
    output_dir: Path | None = None  # of the last run submitted

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        for sub in ("certs", "keys", "sites", "state", "server", "logs", "flwr"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.superlink_port = self.superlink_port or free_port()
        self.fleet_port = (self.fleet_port or free_port()) if self.gateway else self.superlink_port
        self.accepted_app: str | None = None  # the app hash the site gates accept
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                    "FLWR_HOME": str(self.workdir / "flwr")}
        self.env.pop("COLUMNS", None)

    # ------------------------------------------------------------- helpers
    @property
    def address(self) -> str:
        """The SuperLink's own address (the Control API: the coordinator's ``flwr`` CLI)."""
        return f"127.0.0.1:{self.superlink_port}"

    @property
    def fleet_address(self) -> str:
        """The address the sites are given: the gateway's (or the SuperLink's, without one)."""
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "certs" / "ca.crt"

    def _show(self, cmd: list[str]) -> None:
        if self.verbose:
            print("$ " + shlex.join(str(c) for c in cmd), flush=True)

    def run_cmd(self, cmd: list[str], *, timeout: float = 120, env: dict | None = None, show: bool = True) -> str:
        """Run a command to completion (printed first, unless ``show`` is false); return its stdout or raise
        DeploymentError with its output."""
        if show:
            self._show(cmd)
        done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env, cwd=REPO_ROOT)
        if done.returncode != 0:
            raise DeploymentError(f"{shlex.join(str(c) for c in cmd)} exited with {done.returncode}:\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start a long-running process in its own process group, logging to logs/<name>.log.

        Each process gets its own ``FLWR_HOME`` (where a SuperNode unpacks the app), as
        on separate machines.
        """
        self._show(cmd)
        env = {**self.env, "FLWR_HOME": str(self.workdir / "flwr-home" / name)}
        log = open(self.workdir / "logs" / f"{name}.log", "wb")
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=self.workdir, start_new_session=True)
        log.close()
        proc.log_path = self.workdir / "logs" / f"{name}.log"  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def log_tail(self, proc: subprocess.Popen, n: int = 3000) -> str:
        return Path(proc.log_path).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]

    @staticmethod
    def _log_size(proc: subprocess.Popen | None) -> int:
        try:
            return Path(proc.log_path).stat().st_size  # type: ignore[union-attr, attr-defined]
        except (AttributeError, OSError):
            return 0

    def server_log(self, run_id: int) -> Path:
        """The run's ServerApp log (``flwr log RUN_ID --show``: Flower keeps it at the SuperLink), written to
        ``logs/serverapp-<run id>.log``; its path."""
        path = self.workdir / "logs" / f"serverapp-{run_id}.log"
        try:
            text = self.run_cmd([BIN / "flwr", "log", run_id, CONNECTION, "--show"], timeout=60)
        except (DeploymentError, subprocess.TimeoutExpired) as exc:
            text = f"`flwr log {run_id}` failed: {exc}"
        path.write_text(ANSI.sub("", text))
        return path

    def failure_report(self, run_id: int, what: str) -> str:
        """Why run ``run_id`` failed, in plain words first: the ServerApp's own error, then each site's ClientApp
        error in this run (from its SuperNode's log), then where the whole logs are."""
        log = self.server_log(run_id)
        error = last_error(log.read_text(errors="replace"))
        lines = [f"run {run_id} {what}.", f"The ServerApp's error: {error}" if error else
                 "The ServerApp's log shows no error."]
        marks = getattr(self, "log_marks", {})
        for site in self.site_list:
            if site.process is None:
                continue
            with open(site.process.log_path, "rb") as fh:  # type: ignore[attr-defined]
                fh.seek(marks.get(site.client_id, 0))
                site_error = last_error(fh.read().decode(errors="replace"))
            if site_error:
                lines.append(f"Site {site.client_id}'s ClientApp error: {site_error}")
        lines.append(f"Full logs: the ServerApp's in {log} (Flower keeps it at the SuperLink: `flwr log {run_id} {CONNECTION} "
                     f"--show`), the SuperLink's in {self.superlink.log_path}, each site's SuperNode's in "  # type: ignore[attr-defined]
                     f"{self.workdir / 'logs'}/supernode-<client id>.log")
        return "\n".join(lines)

    # --------------------------------------------------------------- steps
    def prepare(self) -> None:
        """Certificates, one data file and one key pair per site, the CLI's connection."""
        from fedal.config import FederationConfig
        from fedal.sitedata import split_site

        self.run_cmd(["bash", REPO_ROOT / "deploy" / "make_certs.sh", self.workdir / "certs"])
        cfg = FederationConfig.from_mapping({**self.fedal_settings(), "output-dir": str(self.workdir / "server")})
        if self.verbose:
            print(f"$ fedal split --dataset {cfg.dataset} --clients {cfg.clients} --out {self.workdir / 'sites'}",
                  flush=True)
        formats = [self.site_formats[cid % len(self.site_formats)] for cid in range(cfg.clients)]
        paths = [split_site(cfg, cid, self.workdir / "sites", fmt, include_labels=self.oracle == "simulated")
                 for cid, fmt in enumerate(formats)]
        for cid, path in enumerate(paths):
            key = self.workdir / "keys" / f"site-{cid}"
            self.make_key(key)
            self.site_list.append(Site(cid, path, self.workdir / "state" / f"site-{cid}", key, self.oracle, free_port()))
        (self.workdir / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.ca}"\n')

    def make_key(self, path: Path) -> Path:
        """An ECDSA P-384 key pair (``path`` and ``path.pub``) for a SuperNode."""
        for p in (path, path.with_name(path.name + ".pub")):
            p.unlink(missing_ok=True)
        self.run_cmd(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-C", path.name, "-f", path])
        return path

    def fedal_settings(self) -> dict:
        """The run's fedal settings, with every path absolute (the ServerApp reads them in the SuperLink's
        working directory, the workdir): :func:`fedal.config.absolute_paths`."""
        return absolute_paths({"clients": self.sites, "min-clients": self.sites, **self.run_config})

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink with TLS and SuperNode authentication on loopback; wait until it serves TLS; then
        the gateway in front of it (unless ``gateway`` is off)."""
        certs = self.workdir / "certs"
        self.superlink = self.spawn("superlink", [
            BIN / "flower-superlink", "--ssl-ca-certfile", certs / "ca.crt", "--ssl-certfile", certs / "server.crt",
            "--ssl-keyfile", certs / "server.key", "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", self.superlink_port, "--database", self.workdir / "superlink.db",
            "--disable-runtime-dependency-installation",
        ])
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise DeploymentError(f"flower-superlink exited with {self.superlink.returncode}:\n"
                                      f"{self.log_tail(self.superlink)}")
            try:
                with socket.create_connection(("127.0.0.1", self.superlink_port), timeout=2) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                        break
            except (OSError, ssl.SSLError):
                time.sleep(0.5)
        else:
            raise DeploymentError(f"the SuperLink did not accept TLS connections within {timeout} s:\n"
                                  f"{self.log_tail(self.superlink)}")
        if self.gateway:
            self.start_gateway()

    def start_gateway(self) -> None:
        """nginx on the sites' address, forwarding the Fleet API only to the SuperLink (deploy/fleet_gateway.py)."""
        from fleet_gateway import FleetGateway, GatewayError

        certs = self.workdir / "certs"
        gateway = FleetGateway(self.fleet_address, self.address, certs / "server.crt", certs / "server.key",
                               certs / "ca.crt", self.workdir / "gateway")
        self._show(gateway.command())
        try:
            proc = gateway.start()
        except GatewayError as exc:
            raise DeploymentError(f"the gateway did not start: {exc}") from exc
        proc.log_path = gateway.log_path  # type: ignore[attr-defined]
        self.processes.append(proc)
        self.gateway_process = gateway

    def gate_tls(self, site: Site) -> Path:
        return self.workdir / "gates" / f"site-{site.client_id}"

    def start_gate(self, site: Site, timeout: float = 60) -> subprocess.Popen:
        """The site's gate (``fedal gate``), accepting only this checkout's app; its SuperNode connects through it."""
        if self.accepted_app is None:
            from clients.gate import app_hash

            self.accepted_app = app_hash(REPO_ROOT)  # the FAB `flwr run .` builds from this checkout
        site.gate_port = site.gate_port or free_port()
        proc = self.spawn(f"gate-{site.client_id}", [
            BIN / "fedal", "gate", "--superlink", self.fleet_address, "--root-certificates", self.ca,
            "--accept-app", self.accepted_app, "--listen", f"127.0.0.1:{site.gate_port}",
            "--tls-dir", self.gate_tls(site)])
        site.gate = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeploymentError(f"site {site.client_id}'s gate exited with {proc.returncode}:\n{self.log_tail(proc)}")
            try:
                socket.create_connection(("127.0.0.1", site.gate_port), timeout=1).close()
                return proc
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"site {site.client_id}'s gate did not listen within {timeout:.0f} s:\n{self.log_tail(proc)}")

    def register(self, site: Site) -> int:
        """``flwr supernode register``: allow this site's public key; return its node id."""
        out = self.run_cmd([BIN / "flwr", "supernode", "register", f"{site.key}.pub", CONNECTION, "--format", "json"])
        reply = json.loads(out[out.index("{"):])
        if not reply.get("success"):
            raise DeploymentError(f"registering {site.key}.pub failed: {reply}")
        site.node_id = int(reply["node-id"])
        return site.node_id

    def start_supernode(self, site: Site, name: str | None = None, max_wait: float = 60) -> subprocess.Popen:
        """Start one SuperNode with its key and node config: through its gate (TLS on loopback with the gate's own
        CA; the gate speaks TLS to the coordinator), or straight to the coordinator's address without one."""
        if self.pin_app and site.gate is None:
            self.start_gate(site)
        link = (["--superlink", f"127.0.0.1:{site.gate_port}", "--root-certificates", self.gate_tls(site) / "gate-ca.crt"]
                if self.pin_app else
                ["--superlink", self.fleet_address, "--root-certificates", self.ca])
        site.process = self.spawn(name or f"supernode-{site.client_id}", [
            BIN / "flower-supernode", *link,
            "--auth-supernode-private-key", site.key, "--node-config", site.node_config(),
            "--port", site.port, "--max-wait-time", max_wait,
        ])
        return site.process

    def node_statuses(self) -> dict[int, str]:
        """Node id -> status (``registered``, ``online``, ``offline``, ...) of every SuperNode the SuperLink
        knows (``flwr supernode list``)."""
        out = self.run_cmd([BIN / "flwr", "supernode", "list", CONNECTION, "--format", "json"], show=False)
        reply = json.loads(out[out.index("{"):])
        return {int(n["node-id"]): n["status"] for n in reply.get("nodes", [])}

    def wait_online(self, sites: list[Site] | None = None, timeout: float = 180) -> None:
        """Wait until the SuperLink reports every site's SuperNode online, so the run's first round has them all
        (the ServerApp waits only seconds for its nodes, less than a SuperNode may take on a busy machine). A site
        whose process ended, or one still not online after ``timeout`` seconds, is named with its log."""
        sites = self.site_list if sites is None else sites
        deadline = time.monotonic() + timeout
        while True:
            for site in sites:
                if site.process is not None and site.process.poll() is not None:
                    raise DeploymentError(f"site {site.client_id}'s SuperNode exited (code {site.process.returncode}) "
                                          f"before it came online; its log:\n{self.log_tail(site.process)}")
            statuses = self.node_statuses()
            waiting = [site for site in sites if statuses.get(site.node_id) != "online"]
            if not waiting:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"site {s.client_id} ({statuses.get(s.node_id, 'unknown')})" for s in waiting)
                raise DeploymentError(f"{names} not online at the SuperLink after {timeout:.0f} s; the first "
                                      f"one's log:\n{self.log_tail(waiting[0].process) if waiting[0].process else ''}")
            time.sleep(1.0)

    def submit(self, **settings) -> int:
        """``flwr run`` the fedal app in this repository (with more fedal ``settings``, kebab-case, which may name
        another ``output-dir``); return the run id."""
        overrides = absolute_paths({**self.fedal_settings(), "output-dir": str(self.workdir / "server"), **settings})
        self.output_dir = Path(overrides["output-dir"])
        self.log_marks = {s.client_id: self._log_size(s.process) for s in self.site_list}
        path = self.workdir / "run-config.toml"
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in overrides.items()))
        out = self.run_cmd([BIN / "flwr", "run", REPO_ROOT, CONNECTION, "--run-config", path, "--format", "json"])
        reply = json.loads(out[out.index("{"):])
        if not reply.get("success"):
            raise DeploymentError(f"flwr run failed: {reply}")
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> str:
        out = self.run_cmd([BIN / "flwr", "ls", CONNECTION, "--run-id", run_id, "--format", "json"], show=False)
        reply = json.loads(out[out.index("{"):])
        return str(reply["runs"][0]["status"])

    def results(self) -> dict | None:
        path = (self.output_dir or self.workdir / "server") / "results.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait(self, run_id: int, rounds: int, timeout: float = 600, status_every: float = 10) -> dict:
        """Wait until the run finished; return results.json. Raises DeploymentError on failure or timeout, its
        message led by the ServerApp's own error (:meth:`failure_report`)."""
        start = time.monotonic()
        last_status = start
        while time.monotonic() - start < timeout:
            time.sleep(1)
            gateway = getattr(self, "gateway_process", None)
            for proc in [self.superlink, gateway and gateway.process, *(s.process for s in self.site_list),
                         *(s.gate for s in self.site_list)]:
                if proc is not None and proc.poll() is not None:
                    raise DeploymentError(f"{proc.args[0]} exited with {proc.returncode} during the run:\n"
                                          f"{self.log_tail(proc)}")
            results = self.results()
            done = results is not None and len(results.get("rounds", [])) >= rounds
            if done or time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    if status != "finished:completed":
                        raise DeploymentError(self.failure_report(run_id, f"ended as {status}"))
                    return self.results() or {}
        raise DeploymentError(self.failure_report(run_id, f"did not finish within {timeout:.0f} s"))

    def stop(self) -> None:
        """Stop every process this deployment started (and their children), SIGKILL after 10 s."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (SuperExec, ClientApp processes)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=5)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_all(self) -> None:
        """prepare, SuperLink, gateway, register every site, gates and SuperNodes, and wait until every one is
        online."""
        self.prepare()
        self.start_superlink()
        for site in self.site_list:
            self.register(site)
        for site in self.site_list:
            self.start_supernode(site)
        self.wait_online()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2, help="number of SuperNodes (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--dataset", default="digits", help="data set name or .npz (default digits)")
    parser.add_argument("--data-dir", default="", help="folder of .npz data sets")
    parser.add_argument("--oracle", default="simulated", choices=("simulated", "web", "file"),
                        help="who labels at the sites (web/file: use `fedal label` / `fedal exchange` meanwhile)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other fedal setting, e.g. --set round-budget=20 (repeatable)")
    parser.add_argument("--workdir", default=None, help="where everything is written (default: a new temp folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run")
    parser.add_argument("--site-format", default="npz", choices=("npz", "png", "dicom", "mixed"),
                        help="what each site holds: a fedal split file (npz), a folder of PNG files in class "
                             "subfolders, of DICOM files with a labels.csv, or mixed (site 0 PNG, site 1 DICOM, ...)")
    parser.add_argument("--no-gateway", action="store_true",
                        help="sites reach the SuperLink itself, Control API included (measurements only)")
    parser.add_argument("--no-pin", action="store_true",
                        help="no site gate: the SuperNodes run any app the coordinator submits (measurements only)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through `with`: stop every process
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedal-deploy-"))
    try:  # checked (and typed) as every fedal setting is, before anything starts; paths as typed, from here
        given = absolute_paths({"rounds": args.rounds, "dataset": args.dataset, "data-dir": args.data_dir,
                                **parse_assignments(args.set)})
        cfg = FederationConfig.from_mapping({"clients": args.sites, "min-clients": args.sites, **given})
        check_federation(cfg)
    except FedalError as exc:
        print(f"run_local_deployment: {exc}", file=sys.stderr)
        return 2
    typed = cfg.to_run_config()
    settings = {key.replace("_", "-"): typed[key.replace("_", "-")] for key in given}
    print(f"working in {workdir}", flush=True)
    formats = ("png", "dicom") if args.site_format == "mixed" else (args.site_format,)
    with LocalDeployment(workdir, sites=args.sites, run_config=settings, oracle=args.oracle, site_formats=formats,
                         gateway=not args.no_gateway, pin_app=not args.no_pin) as dep:
        try:
            dep.start_all()
            run_id = dep.submit()
            print(f"run {run_id} submitted; waiting (logs in {workdir / 'logs'})", flush=True)
            results = dep.wait(run_id, args.rounds, timeout=args.timeout)
        except (DeploymentError, subprocess.TimeoutExpired) as exc:
            print(f"deployment failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; stopping every process", file=sys.stderr)
            return 130
    print("round | labels | accuracy | seconds")
    for row in results.get("rounds", []):
        print(f"{row['round']:>5} | {row['labels']:>6} | {row['accuracy']:.4f}   | {row['seconds']:.1f}")
    for event in results.get("events", []):  # a site that failed a round, a reply refused, ...
        print(f"round {event['round']}: {event['kind']}: {event['detail']}")
    print(f"results: {workdir / 'server' / 'results.json'}; client databases: {workdir / 'state'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
