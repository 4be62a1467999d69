"""Run the fedal app with ``flwr run`` on a local simulation SuperLink, then stop it.

``flwr run .`` (Flower 1.41) submits the app to a SuperLink. With the stock ``local``
connection it starts a detached ``flower-superlink --simulation`` on port 39091 that
keeps running after the run. This script does the same work but owns the SuperLink:

1. a private, temporary Flower home (``$FLWR_HOME``; ``~/.flwr`` is left alone) whose
   ``config.toml`` holds one connection, ``fedal-local``, to ``127.0.0.1:<port>``;
2. ``flower-superlink --insecure --simulation`` on that port (a free one by default),
   started in the app folder, so the default ``output-dir`` (``runs/latest``) lands under it;
   paths given in ``--run-config`` are made absolute first, against the folder this script
   was started in, where they were typed;
3. ``flwr run <app> fedal-local --run-config <the overrides, checked> --federation-config "num-supernodes=N
   client-resources-num-cpus=1" --stream``, which prints the run's log and returns when
   the run ends (N = the run's ``clients``: each simulated SuperNode is one client);
4. ``flwr ls fedal-local --run-id <id> --format json`` for the final status;
5. the SuperLink and every process it started (SuperExec, ``flwr-simulation``, Ray)
   are stopped, by process id, whatever happened.

Nothing is fetched from the network: runtime dependency installation is switched off
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``) and the app runs with the packages
of this virtual environment. Exit status 0 only when the run finished successfully.

Example::

    .venv/bin/python deploy/flwr_run_local.py --run-config "rounds=3 clients=3 min-clients=3"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

from run_local_deployment import CONNECTION, free_port, last_error  # a sibling script: this folder is on sys.path

from fedal.config import FederationConfig, absolute_paths
from fedal.exceptions import ConfigError, FedalError
from fedal.fileio import toml_value


def run_config_overrides(overrides: list[str]) -> dict:
    """The ``--run-config`` overrides (``"key=value ..."`` strings or one TOML file, as ``flwr run`` reads them) as
    one dict, with every path made absolute against the current directory, where the user typed them: the run's
    processes work in the app folder (:func:`fedal.config.absolute_paths`)."""
    import click
    from flwr.common.config import parse_config_args

    if len(overrides) == 1 and overrides[0].endswith(".toml"):
        overrides = [str(Path(overrides[0]).expanduser().resolve())]
    try:
        parsed = parse_config_args(overrides)
    except click.ClickException as exc:  # Flower's own message names no pair: find the one it cannot read
        raise ConfigError(f"--run-config {' '.join(overrides)!r} cannot be read: {_bad_pair(overrides) or exc.message}"
                          ) from None
    return absolute_paths(parsed)


def _bad_pair(overrides: list[str]) -> str | None:
    """What is wrong with the first ``key=value`` of ``overrides`` that is not one (as ``flwr run`` reads them)."""
    import shlex

    for text in overrides:
        if text.endswith(".toml"):
            return None
        try:
            pairs = shlex.split(text)
        except ValueError as exc:
            return f"{exc} (a quote is not closed)"
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                return f"{pair!r} is not key=value"
            try:
                tomllib.loads(f"v = {value}")
            except tomllib.TOMLDecodeError:
                return (f"the value of {key} ({value!r}) is neither a number, nor true/false, nor a string in quotes; "
                        f"write e.g. rounds=3 or dataset=\"digits\" (inside the shell's quotes: "
                        f"--run-config 'rounds=3 dataset=\"digits\"')")
    return None


def run_config_clients(app: Path, overrides: dict) -> int:
    """``clients`` of the run: the overrides' value, else the app's default."""
    values = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return int({**values, **overrides}["clients"])


def write_flower_config(home: Path, port: int) -> None:
    """A Flower configuration with one connection to our SuperLink (no auto-started one)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(proc: subprocess.Popen, grace: float = 15.0) -> list[int]:
    """Stop the SuperLink and everything it started; return the ids still alive (none)."""
    if proc.poll() is None:
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    else:
        tree = []
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
        deadline = time.monotonic() + 5
    return [p for p in tree if alive(p)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("app", nargs="?", default=".", help="Flower app folder (default: .)")
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help="run-config overrides, e.g. \"rounds=3 clients=3\" (repeatable)")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="simulated SuperNodes (default: the run's clients)")
    parser.add_argument("--port", type=int, default=0, help="SuperLink HTTP port (default: a free one)")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="Ray CPUs per simulated client (Flower's default is 2: one client at a time on 2 cores)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is given up")
    args = parser.parse_args(argv)

    app = Path(args.app).resolve()
    if not (app / "pyproject.toml").is_file():
        parser.error(f"{app} has no pyproject.toml; give the folder of the Flower app")
    try:  # the fedal settings are checked here, before anything starts
        overrides = run_config_overrides(args.run_config)
        FederationConfig.from_run_config(overrides)
    except (FedalError, ValueError, OSError) as exc:
        parser.error(str(exc))
    clients = run_config_clients(app, overrides)
    supernodes = args.num_supernodes or clients
    if supernodes != clients:
        parser.error(f"--num-supernodes {supernodes} differs from the run's clients ({clients}); every simulated "
                     "SuperNode is one client: set both to the same number")
    port = args.port or free_port()
    bin_dir = Path(sys.executable).parent
    home = Path(tempfile.mkdtemp(prefix="fedal-flwr-home-"))
    write_flower_config(home, port)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = home / "superlink.log"
    superlink_cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                     "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                     "--log-file", str(log)]
    run_cmd = [str(bin_dir / "flwr"), "run", str(app), CONNECTION, "--stream",
               "--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus={args.cpus_per_client}"]
    if overrides:
        (home / "run-config.toml").write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in overrides.items()))
        run_cmd += ["--run-config", str(home / "run-config.toml")]

    # SIGTERM (e.g. from a test's timeout) must still stop the SuperLink
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"flwr_run_local: SuperLink on 127.0.0.1:{port}, FLWR_HOME={home}", flush=True)
    superlink = subprocess.Popen(superlink_cmd, cwd=app, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    status = None
    run = None
    try:
        wait_healthy(port, superlink, log)
        print("flwr_run_local: $ " + " ".join(run_cmd[1:]), flush=True)
        run = subprocess.Popen(run_cmd, cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(args.timeout, run.kill)  # a silent hang must end too
        watchdog.start()
        run_id = None
        streamed = []
        for line in run.stdout:  # pass the stream through, remembering the run id
            sys.stdout.write(line)
            sys.stdout.flush()
            streamed.append(line)
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = match.group(1)
        run.wait()
        watchdog.cancel()
        if run_id is None:
            print(f"flwr_run_local: flwr run failed (exit {run.returncode}) before a run started", file=sys.stderr)
            return 1
        status = run_status(bin_dir, app, env, run_id)
        print(f"flwr_run_local: run {run_id} status {status}", flush=True)
        if status != "finished:completed" and (error := last_error("".join(streamed))):
            print(f"flwr_run_local: the ServerApp's error: {error}", file=sys.stderr)
        if not status.startswith("finished"):
            print(f"flwr_run_local: the run did not finish within {args.timeout:.0f} s", file=sys.stderr)
    except RuntimeError as exc:
        print(f"flwr_run_local: {exc}", file=sys.stderr)
        return 1
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        left = stop(superlink)
        if left:
            print(f"flwr_run_local: processes {left} did not stop", file=sys.stderr)
        if status != "finished:completed" and log.is_file():
            print(f"flwr_run_local: last lines of the SuperLink log:\n{tail(log)}", file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)
        print("flwr_run_local: SuperLink stopped", flush=True)
    return 0 if status == "finished:completed" else 1


def run_status(bin_dir: Path, app: Path, env: dict, run_id: str) -> str:
    """The run's status as ``flwr ls`` reports it (``finished:completed`` on success)."""
    out = subprocess.run([str(bin_dir / "flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                         cwd=app, env=env, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[:200]} {out.stderr.strip()[:200]})"


if __name__ == "__main__":
    sys.exit(main())
