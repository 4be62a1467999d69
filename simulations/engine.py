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
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from server.app import app as server_app

    if client_app is None:
        from clients.app import app as client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
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
    if not getattr(result, "success", True):
        raise RuntimeError("the federation failed; run again with --verbose to see Flower's log")
