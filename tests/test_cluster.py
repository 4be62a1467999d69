"""Simulations on a Ray cluster (``ray-address``, ``actor-*``): the engine's Ray settings, the actor pool's size on
the nodes, and a real two-node cluster on this machine (a head and a worker node, each a set of Ray processes
of its own, from ``ray.cluster_utils``), across which a federation runs, and whose worker node dies mid-run."""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError

GIB = 2**30
#: seconds the actor on the worker node holds its round-2 message, long enough for the test to crash the node
HOLD_S = 8.0
#: a node is declared dead after about period x threshold ms without an answer (Ray's default: 5 x 3 s)
FAST_HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                      "health_check_failure_threshold": 4}


def _node(cpu=1.0, gpu=0.0, memory=4 * GIB, alive=True) -> dict:
    resources = {"CPU": cpu, "memory": memory, **({"GPU": gpu} if gpu else {})}
    return {"Alive": alive, "Resources": resources if alive else {}}


# ---------------------------------------------------------------------------------- settings, no Ray started
def test_a_local_ray_is_started_with_the_cores_and_no_gpu_as_before(monkeypatch):
    from simulations.engine import backend_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = backend_config(2)
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == 2 and config["init_args"]["num_gpus"] == 0
    assert config["init_args"]["address"] == "local"


def test_ray_address_joins_a_cluster_without_claiming_its_resources(monkeypatch):
    from simulations.engine import backend_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = FederationConfig(ray_address="10.0.0.5:6379", actor_cpus=2, actor_gpus=0.5, actor_memory_gib=1.5)
    config = backend_config(2, cfg)
    assert config["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in config["init_args"] and "num_gpus" not in config["init_args"]  # Ray refuses them there
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5, "memory": int(1.5 * GIB)}


def test_the_ray_address_variable_is_honoured_and_local_overrides_it(monkeypatch):
    from simulations.engine import backend_config, ray_address

    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert ray_address(FederationConfig()) == "head:6379"
    assert backend_config(2, FederationConfig())["init_args"]["address"] == "head:6379"
    assert ray_address(FederationConfig(ray_address="other:1234")) == "other:1234"  # the setting wins
    local = backend_config(2, FederationConfig(ray_address="local"))["init_args"]
    assert local["address"] == "local" and local["num_cpus"] == 2


def test_a_gpu_actor_lets_a_local_ray_find_the_gpus(monkeypatch):
    from simulations.engine import backend_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert backend_config(2, FederationConfig(actor_gpus=1))["init_args"]["num_gpus"] is None  # Ray detects them


def test_on_a_cluster_the_actors_get_absolute_paths_from_the_drivers_folder(monkeypatch, tmp_path):
    from simulations.engine import placed

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = FederationConfig(output_dir="runs/a", data_dir="data", state_dir="")
    assert placed(cfg) is cfg  # one machine: the actors work in this folder
    moved = placed(cfg.replace(ray_address="auto"))
    assert moved.output_dir == str(tmp_path / "runs" / "a") and moved.data_dir == str(tmp_path / "data")
    assert moved.state_dir == "" and moved.ray_address == "auto"


def test_the_pool_holds_what_each_live_node_holds_memory_and_gpus_counted():
    from simulations.engine import actor_capacity

    one_cpu = {"num_cpus": 1.0, "num_gpus": 0.0}
    assert actor_capacity([_node(2), _node(1)], one_cpu) == 3
    assert actor_capacity([_node(2), _node(1, alive=False)], one_cpu) == 2  # a node that left holds none
    assert actor_capacity([_node(4, memory=3 * GIB)], {**one_cpu, "memory": GIB}) == 3  # memory, not the 4 CPUs
    gpu = {"num_cpus": 1.0, "num_gpus": 0.5}
    assert actor_capacity([_node(8, gpu=1), _node(8)], gpu) == 2  # two actors share the GPU; a CPU node holds none
    assert actor_capacity([_node(0.999999999)], one_cpu) == 1  # Ray's fractional bookkeeping
    assert actor_capacity([_node(8)], gpu) == 0


def test_a_cluster_without_room_for_one_actor_is_refused_with_what_it_holds():
    from simulations.engine import no_room_message

    text = no_room_message([_node(2)], {"num_cpus": 1.0, "num_gpus": 1.0})
    assert "actor-gpus 1" in text and "CPU 2, GPU 0" in text and "lower these settings" in text


def test_fedal_compare_takes_the_ray_address_flag():
    import argparse

    from simulations.compare import add_compare_arguments, compare_settings

    p = argparse.ArgumentParser()
    add_compare_arguments(p)
    args = p.parse_args(["--ray-address", "auto", "--set", "rounds=2"])
    assert compare_settings(args, FederationConfig()).ray_address == "auto"
    with pytest.raises(ConfigError, match="ray-address must be"):
        compare_settings(p.parse_args(["--ray-address", "nowhere"]), FederationConfig())


# ------------------------------------------------------------------------------------ a real two-node cluster
def record_node(msg, context, call_next):
    """Flower train mod: write which Ray node ran this client's round (``nodes.jsonl`` in the run's output-dir);
    on the node named in ``hold-node.txt``, hold round 2's message :data:`HOLD_S` seconds first (the test crashes
    that node meanwhile)."""
    import ray

    from fedal.flower import protocol

    out = Path(context.run_config["output-dir"])
    node = ray.get_runtime_context().get_node_id()
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    with open(out / "nodes.jsonl", "a") as f:
        f.write(json.dumps({"client": int(context.node_config["partition-id"]), "round": server_round,
                            "node": node}) + "\n")
    hold = out / "hold-node.txt"
    if server_round == 2 and hold.is_file() and hold.read_text().strip() == node:
        (out / "held").touch()
        time.sleep(HOLD_S)
    return call_next(msg, context)


def _ran_on(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "nodes.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def two_nodes():
    """A Ray cluster of two nodes on this machine, one CPU each, in a temp folder of its own; stopped after the
    test whatever happened (only the processes it started)."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="fedal-ray-", dir="/tmp")  # short: Ray's socket paths live inside it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp,
                                                            "_system_config": FAST_HEALTH_CHECKS})
    try:
        worker = cluster.add_node(num_cpus=1, temp_dir=temp)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _cluster_cfg(out: Path, address: str, **settings) -> FederationConfig:
    return FederationConfig(**{**dict(dataset="digits", partition="iid", clients=4, min_clients=2, rounds=2,
                                      initial_labels=8, round_budget=12, round_timeout=120, seed=0,
                                      output_dir=str(out), ray_address=address), **settings})


@pytest.mark.slow
def test_a_federation_runs_its_client_actors_on_both_nodes_of_a_cluster(two_nodes, tmp_path):
    from ray import cloudpickle

    from clients.app import client_app
    from simulations.engine import SimulationRuntime

    cluster, worker = two_nodes
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import the tests
    cfg = _cluster_cfg(tmp_path / "run", cluster.address)
    (tmp_path / "run").mkdir()
    with SimulationRuntime() as runtime:
        runtime.run(cfg, client_app=client_app(train_mods=[record_node]))
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [sorted(r["clients"]) for r in rows] == [["0", "1", "2", "3"]] * 2 and rows[-1]["accuracy"] > 0.3
    nodes = {r["node"] for r in _ran_on(tmp_path / "run")}
    assert nodes == {cluster.head_node.node_id, worker.node_id}  # both nodes ran clients


@pytest.mark.slow
def test_a_worker_node_that_crashes_mid_run_is_survived_with_the_head_nodes_actor(two_nodes, tmp_path):
    from ray import cloudpickle

    from clients.app import client_app
    from simulations.engine import SimulationRuntime

    cluster, worker = two_nodes
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "crash"
    out.mkdir()
    (out / "hold-node.txt").write_text(worker.node_id)
    cfg = _cluster_cfg(out, cluster.address, rounds=3)
    crashed = threading.Event()

    def crash_when_held():
        deadline = time.monotonic() + 300
        while not (out / "held").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if (out / "held").exists():
            cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: the raylet and its actor go at once
            crashed.set()

    killer = threading.Thread(target=crash_when_held, daemon=True)
    killer.start()
    with SimulationRuntime() as runtime:
        runtime.run(cfg, client_app=client_app(train_mods=[record_node]))
        assert runtime.actors_lost == 1 and runtime.actors_replaced == 0  # the head had no room for a second one
    killer.join(timeout=10)
    assert crashed.is_set()
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    # every client took part in every round: the held message went to the head node's actor
    assert all(sorted(r["clients"]) == ["0", "1", "2", "3"] and r["aggregated"] for r in rows)
    ran = _ran_on(out)
    assert {r["node"] for r in ran if r["round"] == 1} == {cluster.head_node.node_id, worker.node_id}
    assert {r["node"] for r in ran if r["round"] == 3} == {cluster.head_node.node_id}


# ------------------------------------------------------------------------------------------------ the benchmark
def test_the_cluster_benchmark_refuses_a_bad_setting_before_any_run(capsys):
    from simulations.bench.cluster import main

    with pytest.raises(SystemExit):
        main(["--set", "rounds=0"])
    assert "rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--paths", "cluster of 2 nodes"])  # the local Ray is what the others are measured against


def test_the_cluster_benchmark_table_flags_runs_that_computed_something_else():
    from simulations.bench.cluster import NO_GPU, table

    run = {"wall_seconds": 10.0, "run_seconds": 8.0, "labels": 145, "accuracy": [0.5, 0.6]}
    record = {"command": "python -m simulations.bench.cluster", "machine": {"nproc": 2, "cpu": "cpu"},
              "settings": {"rounds": 2}, "gpu": NO_GPU,
              "runs": {"local Ray": [run, {**run, "wall_seconds": 14.0}],
                       "cluster of 2 nodes": [{**run, "wall_seconds": 12.0, "accuracy": [0.5, 0.7]}, run]}}
    text = table(record)
    assert "| local Ray | 10.0, 14.0 | 12.0 | 1.00x |" in text
    assert "| cluster of 2 nodes | 12.0, 10.0 | 11.0 | 0.92x |" in text and "**no**" in text
    assert "shortened" in text and "not measured" in text
