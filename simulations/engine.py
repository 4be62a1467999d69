"""Run the fedal apps on Flower's Simulation Engine (Ray) from Python.

``flwr run .`` is the way to run the app from its project folder. ``fedal simulate``
needs the same engine with settings chosen on the command line, without starting a
long-lived SuperLink: it writes a one-off Flower app folder whose
``[tool.flwr.app.config]`` holds the run's settings and hands it to the Simulation
Engine, which gives every ServerApp and ClientApp context that run config.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fedal.config import FederationConfig
from fedal.fileio import toml_value

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def app_pyproject(cfg: FederationConfig) -> str:
    """A minimal Flower app ``pyproject.toml`` carrying ``cfg`` as its run config."""
    lines = [
        "[project]", 'name = "fedal-run"', 'version = "0.1.0"', "",
        "[tool.flwr.app]", 'publisher = "fedal"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"', 'clientapp = "clients.app:app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in cfg.to_run_config().items()]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_session(proc: Path, tag: str) -> bool:
    """Whether the process ``proc`` (a /proc entry) belongs to the Ray session whose name ends in ``tag``:
    its command line names the session, or one of its open files lies in it (Ray's agents rename their
    command line to ``ray::...`` but keep their logs open)."""
    try:
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "/ray/session_" in cmd and tag in cmd:
            return True
        for fd in (proc / "fd").iterdir():
            target = os.readlink(fd)
            if "/ray/session_" in target and tag in target:
                return True
    except OSError:
        return False
    return False


def clean_orphaned_ray(registry: Path | None = None) -> list[int]:
    """Stop the Ray processes a killed fedal run left behind; return their process ids.

    Ray names its session after the process that started it (``session_<time>_<pid>``). Each
    simulation records its own pid in ``registry`` (default ``<cache>/ray-drivers``) and removes
    it when it ends; a pid still recorded but no longer running was killed (SIGKILL skips every
    cleanup), and the processes of its Ray session (named on their command line or in their open
    files) are stopped. Ray clusters that fedal did not start are never touched.
    """
    import signal

    from fedal.features import cache_dir

    registry = registry or cache_dir() / "ray-drivers"
    if not registry.is_dir():
        return []
    stopped = []
    for marker in registry.iterdir():
        if not marker.name.isdigit() or _alive(int(marker.name)):
            continue
        tag = f"_{marker.name}/"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _in_session(entry, tag):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    stopped.append(int(entry.name))
                except OSError:
                    pass
        marker.unlink(missing_ok=True)
    if stopped:
        logging.getLogger("fedal").warning("stopped %d Ray processes a killed run left behind", len(stopped))
    return stopped


def backend_config(cpus: int | None = None) -> dict:
    """Ray resources: one CPU per client actor, as many actors as cores (2 on the reference machine)."""
    cpus = cpus or os.cpu_count() or 2
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": True,
                      "include_dashboard": False},
    }


def run_in_simulation(cfg: FederationConfig, *, cpus: int | None = None, verbose: bool = False,
                      client_app=None) -> None:
    """Run the fedal ServerApp and ClientApps for ``cfg`` on the Simulation Engine.

    Parameters
    ----------
    cfg : FederationConfig
        Run settings (also the run config every app receives).
    cpus : int, optional
        CPUs Ray may use (default: all cores).
    verbose : bool
        Show Flower's and Ray's logs.
    client_app : flwr.clientapp.ClientApp, optional
        ClientApp to run instead of ``clients.app:app`` (e.g. one with extra mods, as the
        privacy audit uses to see every reply).

    Raises
    ------
    RuntimeError
        If the ServerApp failed (the Simulation Engine's own error is chained).
    """

    from server.app import app as server_app

    if client_app is None:
        from clients.app import app as client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if cfg.pipeline != "head":  # the ServerApp runs in this process, on one core as each client does
        import torch

        torch.set_num_threads(1)
    from fedal.features import cache_dir

    clean_orphaned_ray()
    marker = cache_dir() / "ray-drivers" / str(os.getpid())  # removed below; left only by a killed run
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        result = _simulate(cfg, cpus, verbose, client_app, server_app)
    finally:
        marker.unlink(missing_ok=True)
    if not getattr(result, "success", True):
        raise RuntimeError("the federation failed; run again with --verbose to see Flower's log")


def _simulate(cfg: FederationConfig, cpus, verbose: bool, client_app, server_app):
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    with tempfile.TemporaryDirectory(prefix="fedal-app-") as app_dir:
        Path(app_dir, "pyproject.toml").write_text(app_pyproject(cfg))
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
        result = _run_simulation(
            num_supernodes=cfg.clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(cpus),
            server_app_context=context,
            app_dir=app_dir,
            is_app=True,
            verbose_logging=verbose,
        )
    return result
