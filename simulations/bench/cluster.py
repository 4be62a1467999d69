"""Benchmark: a simulation on a Ray cluster of one node against two nodes on the same machine.

The same federation runs three ways, each in a fresh Python process timed from its start to its end:

* **local Ray**: as ``fedal simulate`` runs it today, a Ray of the run's own with one client actor per core;
* **cluster of 1 node**: a Ray cluster started beforehand (``ray.cluster_utils``: a head node as processes of its
  own, with every core), joined through ``ray-address``;
* **cluster of 2 nodes**: a head and a worker node on this machine, half the cores each, one client actor per node.

Both clusters have the machine's cores, so the figures are what joining a cluster and spreading the actors over
nodes cost, not a speed-up. All three compute the same federation: their accuracies must agree to the last bit
(checked). An untimed one-round run first fills the feature cache that the timed runs read; ``--repeats`` runs
the paths in turn, forward then backward, so that a load that changes over time weighs on each alike. The
federation is the 50 -> 1,000 hand-over preset (``bloodmnist_a01_handover.toml``), shortened with
``--set rounds=N`` where the whole run does not fit (301 rounds take about 25 minutes on 2 cores).
Writes ``simulations/results/bench_cluster.{md,json}``.

    .venv/bin/python -m simulations.bench.cluster --set rounds=33
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.bench.common import ROOT, SHARED_DATA_DIR, command_line, machine_info, portable, save_result

PRESET = "simulations/presets/bloodmnist_a01_handover.toml"
PATHS = ("local Ray", "cluster of 1 node", "cluster of 2 nodes")
#: what the benchmark says where it could not measure on a GPU
NO_GPU = ("not measured: this machine has no GPU (torch.cuda.is_available() is False) and no GPU machine was "
          "available to this run")


def preset_settings(overrides: dict) -> dict:
    """The preset's settings with ``overrides`` (``--set``), data from ``../shared/data``, strategy random, seed 0."""
    from simulations.compare import load_preset

    base, _ = load_preset(str(ROOT / PRESET))
    return {**base.to_run_config(), "strategy": "random", "seed": 0, "data-dir": str(SHARED_DATA_DIR), **overrides}


def child(settings: dict, out: Path) -> dict:
    """One run in this process: its seconds, per-round seconds and accuracies."""
    from fedal.config import FederationConfig
    from simulations.engine import run_in_simulation

    cfg = FederationConfig.from_mapping({**settings, "output-dir": str(out / "run"), "overwrite": True})
    t0 = time.perf_counter()
    run_in_simulation(cfg)
    seconds = time.perf_counter() - t0
    rows = json.loads((out / "run" / "results.json").read_text())["rounds"]
    return {"run_seconds": seconds, "accuracy": [r["accuracy"] for r in rows], "labels": rows[-1]["labels"],
            "round_seconds": [r["seconds"] for r in rows]}


def measure(settings: dict, work: Path, address: str = "") -> dict:
    """Run the federation in a fresh process joining the Ray cluster at ``address`` ("" = a local Ray)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "settings.json").write_text(json.dumps({**settings, "ray-address": address or "local"}))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simulations.bench.cluster", "--child", str(work)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the run on {address or 'a local Ray'} failed:\n{done.stderr[-3000:]}")
    return {"wall_seconds": wall, **json.loads((work / "child.json").read_text())}


def start_cluster(nodes: int, cores: int, temp: str):
    """A Ray cluster of ``nodes`` nodes on this machine sharing ``cores`` CPUs alike, its processes under ``temp``."""
    from ray.cluster_utils import Cluster

    each = max(cores // nodes, 1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": each, "temp_dir": temp})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=each, temp_dir=temp)
    cluster.wait_for_nodes()
    return cluster


def measure_path(path: str, settings: dict, work: Path, cores: int) -> dict:
    """One run of ``path`` (of :data:`PATHS`): a cluster of its nodes started for it and stopped after it."""
    if not path.startswith("cluster"):
        return measure(settings, work / path.replace(" ", "-"))
    temp = tempfile.mkdtemp(prefix="fedal-ray-", dir="/tmp")  # short: Ray's sockets live inside it
    try:
        cluster = start_cluster(int(path.split()[2]), cores, temp)
        try:
            return measure(settings, work / path.replace(" ", "-"), cluster.address)
        finally:
            cluster.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def table(record: dict) -> str:
    rounds = record["settings"]["rounds"]
    lines = [f"`{record['command']}` ({record['machine']['nproc']} cores, {record['machine']['cpu']})", "",
             f"{PRESET}, {rounds} of its 301 rounds, strategy random, seed 0"
             + (" (shortened: the whole run does not fit this benchmark's time)" if rounds < 301 else ""), "",
             "| path | wall s (process), each repeat | mean | vs local Ray | run s / round (mean) | final labels | "
             "final accuracy | same accuracies as local Ray |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]

    def mean(runs, key):
        return sum(r[key] for r in runs) / len(runs)

    local = record["runs"]["local Ray"]
    for path, runs in record["runs"].items():
        same = all(r["accuracy"] == local[0]["accuracy"] for r in runs)
        walls = ", ".join(f"{r['wall_seconds']:.1f}" for r in runs)
        lines.append(f"| {path} | {walls} | "
                     f"{mean(runs, 'wall_seconds'):.1f} | "
                     f"{mean(runs, 'wall_seconds') / mean(local, 'wall_seconds'):.2f}x | "
                     f"{mean(runs, 'run_seconds') / rounds:.2f} | {runs[0]['labels']} | "
                     f"{runs[0]['accuracy'][-1]:.4f} | "
                     + ("yes" if same else "**no**") + " |")
    lines += ["", "wall s: the process from start to end (imports, data, joining or starting Ray, the run); run s: "
              "the run inside it. The repeats run the paths in turn, forward then backward, so that a load that "
              "changes over time weighs on each alike. The clusters were started before the process and hold the "
              "same cores as the local Ray: one machine, so the figure is the cost of the cluster, not a speed-up.",
              "", f"GPU against CPU: {record['gpu']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedal.config import parse_assignments
    from fedal.exceptions import ConfigError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a setting of {PRESET} to change, e.g. --set rounds=33 (repeatable)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"paths to measure, of {', '.join(PATHS)}")
    p.add_argument("--repeats", type=int, default=2, help="times each path runs, in turn (default 2)")
    p.add_argument("--output-dir", default=str(ROOT / "simulations" / "results"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one run in this (fresh) process
        work = Path(args.child)
        (work / "child.json").write_text(json.dumps(child(json.loads((work / "settings.json").read_text()), work)))
        return 0
    try:
        settings = preset_settings(parse_assignments(args.overrides))
        from fedal.config import FederationConfig

        settings = FederationConfig.from_mapping(settings).to_run_config()  # a bad --set fails here, typed
    except ConfigError as exc:
        p.error(str(exc))
    paths = [s.strip() for s in args.paths.split(",")]
    if sorted(set(paths) - set(PATHS)) or "local Ray" not in paths:
        p.error(f"unknown paths {sorted(set(paths) - set(PATHS))}; they must include 'local Ray'")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    import torch

    cores = len(os.sched_getaffinity(0))
    record = {"command": command_line("simulations.bench.cluster", argv), "machine": machine_info(),
              "settings": portable(settings), "runs": {path: [] for path in paths},
              "gpu": NO_GPU if not torch.cuda.is_available() else "not measured by this script"}
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-cluster-"))
    try:
        # untimed: the first run computes the data set's features into the cache that every later run reads
        measure({**settings, "rounds": 1}, work / "warm-up")
        for repeat in range(args.repeats):
            for path in (paths if repeat % 2 == 0 else paths[::-1]):
                r = measure_path(path, settings, work, cores)
                record["runs"][path].append(r)
                print(f"{path} (repeat {repeat + 1}): {r['wall_seconds']:.1f} s (run {r['run_seconds']:.1f} s)",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(args.output_dir, "bench_cluster", record, table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
