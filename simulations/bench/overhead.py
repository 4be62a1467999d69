"""Benchmark: what Flower's Simulation Engine costs on top of the federation's own computation.

Each federation below runs three ways, each in a fresh Python process timed from its start to its
end (imports, data, Ray, everything):

* **simulation**: ``fedal``'s ServerApp and ClientApp on Flower's Simulation Engine, as ``fedal
  simulate`` runs them (Ray and one client actor per core started and stopped for the run), with 1
  actor (one core for the clients, as the loop) and with one actor per core;
* **simulation, kept runtime**: two runs of the same federation in one
  :class:`~simulations.engine.SimulationRuntime`, as ``fedal compare`` runs its strategies and seeds; the
  second run's seconds are what every run of a comparison but its first costs;
* **bare loop**: the same ServerApp code and ClientApp in one process (:mod:`simulations.bench.loop`):
  every message handed straight to the ClientApp, no Ray, no actors, no polling, one core.

All paths compute the same federation: their accuracies must agree to the last bit (checked).
Writes ``simulations/results/bench_overhead.{md,json}``.

    .venv/bin/python -m simulations.bench.overhead                 # both federations below
    .venv/bin/python -m simulations.bench.overhead --runs network  # one of them
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

#: the federations measured: a run of the main preset (the head pipeline, 11 short rounds), and the
#: network pipeline's run this benchmark measured until December 2026 (SmallCNN, 2 local epochs of >= 20 steps)
RUNS = {
    "head": {"preset": "simulations/presets/bloodmnist_a01.toml", "settings": {"strategy": "margin", "seed": 0}},
    "network": {"preset": None, "settings": {
        "pipeline": "network", "dataset": "bloodmnist", "max-train": 2000, "clients": 5, "partition": "dirichlet",
        "alpha": 0.5, "strategy": "entropy", "initial-labels": 10, "round-budget": 50, "rounds": 4, "local-epochs": 2,
        "min-local-steps": 20, "min-clients": 5}},
}
PATHS = ("bare loop", "simulation (1 actor)", "simulation", "simulation (kept runtime)")


def run_settings(name: str) -> dict:
    """The settings of the federation ``name`` of :data:`RUNS` (its preset's, then its own), data from ``../shared``."""
    from simulations.compare import load_preset

    spec = RUNS[name]
    base, _ = load_preset(str(ROOT / spec["preset"])) if spec["preset"] else (None, {})
    settings = base.to_run_config() if base is not None else {}
    return {**settings, **spec["settings"], "data-dir": str(SHARED_DATA_DIR)}


def child(path: str, settings: dict, out: Path) -> dict:
    """One path, in this process: the seconds of each run and its results."""
    from fedal.config import FederationConfig

    cfg = FederationConfig.from_mapping({**settings, "output-dir": str(out / "a"), "overwrite": True})
    seconds = []
    if path == "bare loop":
        from threadpoolctl import threadpool_limits

        from simulations.bench.loop import run_in_loop

        with threadpool_limits(1):  # one core, as each simulated client
            t0 = time.perf_counter()
            run_in_loop(cfg)
            seconds.append(time.perf_counter() - t0)
    elif path == "simulation (kept runtime)":
        from simulations.engine import SimulationRuntime

        with SimulationRuntime() as runtime:
            for run in ("a", "b"):
                t0 = time.perf_counter()
                runtime.run(cfg.replace(output_dir=str(out / run)))
                seconds.append(time.perf_counter() - t0)
    else:  # as `fedal simulate` runs it: Ray and the actors started and stopped with the run
        from simulations.engine import run_in_simulation

        t0 = time.perf_counter()
        run_in_simulation(cfg, cpus=1 if path == "simulation (1 actor)" else None)
        seconds.append(time.perf_counter() - t0)
    results = json.loads((out / "a" / "results.json").read_text())
    return {"run_seconds": seconds, "accuracy": [r["accuracy"] for r in results["rounds"]],
            "labels": results["rounds"][-1]["labels"]}


def measure(path: str, settings: dict, work: Path) -> dict:
    """Run ``path`` in a fresh process; its wall time (start to end) and what it reported."""
    out = work / path.replace(" ", "-").replace("(", "").replace(")", "")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps(settings))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simulations.bench.overhead", "--child", path, "--work", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{done.stderr[-3000:]}")
    return {"wall_seconds": wall, **json.loads((out / "child.json").read_text())}


def table(record: dict) -> str:
    lines = [f"`{record['command']}` ({record['machine']['nproc']} cores, {record['machine']['cpu']})", "",
             "| federation | path | wall s (process) | vs bare loop | run s (in the process) | run vs bare loop | "
             "final labels | final accuracy | same accuracies as the loop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, paths in record["runs"].items():
        loop = paths["bare loop"]
        for path, r in paths.items():
            run = r["run_seconds"][-1]
            lines.append(f"| {name} | {path} | {r['wall_seconds']:.1f} | {r['wall_seconds'] / loop['wall_seconds']:.2f}x | "
                         f"{run:.1f} | {run / loop['run_seconds'][-1]:.2f}x | {r['labels']} | {r['accuracy'][-1]:.4f} | "
                         + ("yes" if r["accuracy"] == loop["accuracy"] else "**no**") + " |")
    lines += ["", "wall s: the process from start to end (imports, data, Ray, the run, Ray stopped). run s: the run "
              "itself inside the process; for the kept runtime, the second of two runs (what each run of `fedal "
              "compare` after its first costs). Bare loop: the same ServerApp code and ClientApp in one process, one "
              "core. 1 actor: the clients on one core, as the loop; without: one actor per core."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"federations to measure, of {', '.join(RUNS)}")
    p.add_argument("--paths", default=",".join(PATHS), help=f"paths to measure, of {', '.join(PATHS)}")
    p.add_argument("--output-dir", default=str(ROOT / "simulations" / "results"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one path in this (fresh) process
        work = Path(args.work)
        record = child(args.child, json.loads((work / "settings.json").read_text()), work)
        (work / "child.json").write_text(json.dumps(record))
        return 0
    names, paths = [s.strip() for s in args.runs.split(",")], [s.strip() for s in args.paths.split(",")]
    unknown = sorted(set(names) - set(RUNS)) + sorted(set(paths) - set(PATHS))
    if unknown or "bare loop" not in paths:
        p.error(f"unknown runs or paths {unknown}; the paths must include 'bare loop'")
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-overhead-"))
    record = {"command": command_line("simulations.bench.overhead", argv), "machine": machine_info(), "runs": {},
              "settings": {}}
    try:
        for name in names:
            settings = run_settings(name)
            record["settings"][name] = portable(settings)
            record["runs"][name] = {}
            for path in paths:
                r = measure(path, settings, work / name)
                record["runs"][name][path] = r
                print(f"{name}: {path}: {r['wall_seconds']:.1f} s (run {r['run_seconds'][-1]:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_result(args.output_dir, "bench_overhead", record, table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
