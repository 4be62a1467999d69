"""Flower's Simulation Engine kept up between federations (``simulations.engine.SimulationRuntime``, what
``fedal compare`` and ``fedal simulate --baseline`` run in), and the bare loop the overhead benchmark
measures it against (``simulations.bench.loop``): all three compute the same federation, to the last bit."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from fedal.config import FederationConfig

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, name: str, **settings) -> FederationConfig:
    return FederationConfig(**{**dict(dataset="digits", clients=3, min_clients=3, rounds=3, initial_labels=10,
                                      round_budget=30, output_dir=str(tmp_path / name)), **settings})


def _curve(cfg: FederationConfig) -> list:
    """What a run computed, round by round: labels, the server's and the sites' accuracy, each client's labels."""
    rows = json.loads((Path(cfg.output_dir) / "results.json").read_text())["rounds"]
    return [(r["labels"], r["accuracy"], r["client_accuracy"], {c: v["labeled"] for c, v in r["clients"].items()})
            for r in rows]


def _moved(cfg: FederationConfig, name: str) -> FederationConfig:
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).parent / name))


def test_runs_sharing_a_runtime_equal_fresh_runs_and_the_bare_loop(tmp_path):
    import ray

    from simulations.bench.loop import run_in_loop
    from simulations.engine import SimulationRuntime, run_in_simulation

    head = _cfg(tmp_path, "head")
    network = _cfg(tmp_path, "network", pipeline="network", strategy="margin", local_epochs=1, min_local_steps=5)
    with SimulationRuntime(cpus=2) as runtime:
        for cfg in (head, network, _moved(head, "head-again")):
            runtime.run(cfg)
        assert (runtime.runs, runtime.pools_built) == (3, 1)  # one actor pool served the three runs
    assert not ray.is_initialized()  # the block's end stopped Ray
    assert _curve(head)[-1][0] == 3 * 10 + 2 * 30 and _curve(head)[-1][1] > 0.5
    assert _curve(_moved(head, "head-again")) == _curve(head)
    run_in_simulation(_moved(head, "fresh"), cpus=2)  # Ray and actors of its own
    assert _curve(_moved(head, "fresh")) == _curve(head)
    for cfg in (head, network):
        run_in_loop(_moved(cfg, cfg.pipeline + "-loop"))
        assert _curve(_moved(cfg, cfg.pipeline + "-loop")) == _curve(cfg), cfg.pipeline


def exit_in_round_one(msg, context, call_next):
    """Flower mod: client 1's process dies in its first train message (as a killed or crashed ClientApp)."""
    from fedal.flower import protocol

    if int(context.node_config["partition-id"]) == 1 and int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND]) == 1:
        os._exit(1)
    return call_next(msg, context)


def test_a_dead_actor_is_replaced_before_the_next_run(tmp_path):
    from ray import cloudpickle

    from clients.app import client_app
    from simulations.engine import SimulationRuntime

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import the tests
    crashing, after = _cfg(tmp_path, "crash", rounds=1, min_clients=1), _cfg(tmp_path, "after", rounds=2)
    with SimulationRuntime(cpus=2) as runtime:
        try:
            runtime.run(crashing, client_app=client_app(train_mods=[exit_in_round_one]))
        except RuntimeError:
            pass  # whether the crashed run fails or goes on without client 1 is the engine's business
        runtime.run(after)
        # the dead actor was replaced: inside the crashed run (a new actor took its message), or by a new pool
        assert runtime.actors_replaced + (runtime.pools_built - 1) >= 1
    assert [len(r[3]) for r in _curve(after)] == [3, 3]  # every client took part in both rounds


def test_a_runtime_refuses_a_second_one_and_a_run_outside_it(tmp_path):
    from simulations.engine import SimulationRuntime

    runtime = SimulationRuntime()
    with pytest.raises(RuntimeError, match="needs the runtime open"):
        runtime.run(_cfg(tmp_path, "x"))
    with runtime:
        with pytest.raises(RuntimeError, match="already open"):
            with SimulationRuntime():
                pass
    from flwr.server.superlink.fleet.vce.backend import raybackend

    assert raybackend.RayBackend.__name__ == "RayBackend"  # Flower's own backend is back
