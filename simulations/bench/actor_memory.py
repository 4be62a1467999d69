"""Benchmark: the memory of a simulation's client actors, per preset, against fedal's estimate.

Each preset runs for ``--rounds`` rounds (default 2; the data sets, partitions and pools' features are
built in the first) on Flower's Simulation Engine, as ``fedal simulate`` runs it, while a thread reads the
proportional set size (``Pss`` of ``/proc/<pid>/smaps_rollup``: shared pages split among the processes that
share them) of every Ray client actor every 0.2 s. Printed and written to
``simulations/results/bench_actor_memory.{md,json}``: the peak of one actor, of all actors together, and the
estimate :func:`simulations.engine.actor_memory_estimate` makes before a run (which ``fedal simulate`` and
``fedal compare`` check against the machine's available memory).

    .venv/bin/python -m simulations.bench.actor_memory [--presets digits_tiny bloodmnist_a01 ...] [--rounds 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from simulations.bench.common import ROOT, SHARED_DATA_DIR, machine_info

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

PRESETS = ["digits_tiny", "pneumoniamnist_a01", "bloodmnist_a01", "bloodmnist_a01_network", "bloodmnist_a01_handover",
           "mnist_a01"]
ACTOR_NAME = b"ray::ClientAppActor"


def _pss_bytes(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _parent(pid: str) -> str | None:
    try:  # the field after the command's closing parenthesis: state, then the parent's pid
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def _descends_from(pid: str, root: str) -> bool:
    seen = 0
    while pid not in (None, "0", "1") and seen < 64:
        if pid == root:
            return True
        pid, seen = _parent(pid), seen + 1
    return False


def actor_pids(root: int | None = None) -> list[str]:
    """The process ids of the Ray client actors started under process ``root`` (default: this one; Ray's
    raylet, the actors' parent, is the driver's child), not another run's on the same machine."""
    root_s = str(os.getpid() if root is None else root)
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(ACTOR_NAME) and _descends_from(entry.name, root_s):
                    out.append(entry.name)
            except OSError:
                continue
    return out


class Sampler(threading.Thread):
    """Peak Pss of one actor and of all actors together while it runs."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.peak_actor = self.peak_total = 0
        self.actors_seen: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            sizes = {pid: _pss_bytes(pid) for pid in actor_pids()}
            self.actors_seen |= set(sizes)
            if sizes:
                self.peak_actor = max(self.peak_actor, max(sizes.values()))
                self.peak_total = max(self.peak_total, sum(sizes.values()))
            self.stop.wait(self.every_s)


def measure(preset: str, rounds: int, cpus: int) -> dict:
    from simulations.compare import load_preset
    from simulations.engine import actor_memory_estimate, run_in_simulation

    cfg, options = load_preset(ROOT / "simulations" / "presets" / f"{preset}.toml")
    seed = int((options.get("seeds") or [cfg.seed])[0])  # a seed the preset's partition can be drawn with
    with tempfile.TemporaryDirectory(prefix="fedal-mem-") as out:
        data_dir = cfg.data_dir if not cfg.data_dir or Path(cfg.data_dir).is_absolute() else str(SHARED_DATA_DIR)
        cfg = dataclasses.replace(cfg, rounds=rounds, output_dir=out, data_dir=data_dir, eval_every=1, seed=seed,
                                  overwrite=True).validate()
        sampler = Sampler()
        sampler.start()
        start = time.perf_counter()
        try:
            run_in_simulation(cfg, cpus=cpus)
        finally:
            sampler.stop.set()
            sampler.join()
    estimate = actor_memory_estimate(cfg)
    return {"preset": preset, "pipeline": cfg.pipeline, "dataset": cfg.dataset, "clients": cfg.clients,
            "rounds": rounds, "actors": len(sampler.actors_seen), "peak_actor_mib": round(sampler.peak_actor / 2**20),
            "peak_all_actors_mib": round(sampler.peak_total / 2**20), "estimate_actor_mib": round(estimate / 2**20),
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| preset | pipeline | clients | actors | peak of one actor (MiB) | peak of all actors (MiB) | "
             "estimate per actor (MiB) | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['pipeline']} | {r['clients']} | {r['actors']} | {r['peak_actor_mib']} | "
              f"{r['peak_all_actors_mib']} | {r['estimate_actor_mib']} | {r['seconds']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=None, help="client actors (default: all cores)")
    p.add_argument("--output-dir", default=str(ROOT / "simulations" / "results"))
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets:
        rows.append(measure(preset, args.rounds, args.cpus))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_actor_memory.md").write_text(
        "# Memory of the simulation's client actors\n\n`.venv/bin/python -m simulations.bench.actor_memory`\n\n"
        + text + "\n")
    (out / "bench_actor_memory.json").write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
