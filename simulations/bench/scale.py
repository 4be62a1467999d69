"""Benchmark: a 1,000-client federation on the Simulation Engine (2 cores on the reference machine).

Runs ``fedal`` with 1,000 clients on all of MNIST's 60,000 training images (Dirichlet alpha = 0.5:
about 60 images a client, 48 in its pool) for 3 rounds, the head pipeline, and reports the wall time
(total and per round), how many clients reported each round, and the peak memory: the largest sum of
resident set sizes over this process and every descendant (Ray's GCS, raylet and the client actors),
sampled every 0.25 s from ``/proc``. The sum counts shared pages once per process, so it is an upper
bound. Writes ``simulations/results/bench_scale.{md,json}``.

    .venv/bin/python -m simulations.bench.scale
    .venv/bin/python -m simulations.bench.scale --set clients=100 --set min-clients=100   # another size
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from simulations.bench.common import SHARED_DATA_DIR, command_line, federation_settings, machine_info, portable, save_result

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

DEFAULTS = {"dataset": "mnist", "data-dir": str(SHARED_DATA_DIR),
            "max-train": 60000, "clients": 1000, "partition": "dirichlet", "alpha": 0.5, "strategy": "entropy",
            "initial-labels": 5, "round-budget": 500, "rounds": 3, "min-clients": 1000}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_bytes(root: int) -> tuple[int, int]:
    """``(sum of RSS in bytes, number of processes)`` of ``root`` and all its descendants."""
    tree, total, count, todo = _children(), 0, 0, [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
            count += 1
        except OSError:
            pass
        todo.extend(tree.get(pid, []))
    return total, count


class PeakMemory:
    """Samples :func:`tree_rss_bytes` of this process in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self.peak_procs = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, procs = tree_rss_bytes(os.getpid())
            if rss > self.peak:
                self.peak, self.peak_procs = rss, procs
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    from fedal.config import FederationConfig
    from fedal.federation import client_parts
    from simulations.engine import run_in_simulation

    settings, output_dir = federation_settings(argv, __doc__.splitlines()[0], DEFAULTS)
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-scale-"))
    try:
        cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work)})
        sizes = [len(p) for p in client_parts(cfg)]
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            run_in_simulation(cfg)
        seconds = time.perf_counter() - t0
        results = json.loads((work / "results.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rounds = results["rounds"]
    row = {"clients": cfg.clients, "cores": os.cpu_count(), "rounds": len(rounds), "wall_seconds": seconds,
           "round_seconds": [r["seconds"] for r in rounds], "clients_reporting": [len(r["clients"]) for r in rounds],
           "peak_rss_mib": mem.peak / 2**20, "processes_at_peak": mem.peak_procs,
           "samples_per_client": [min(sizes), int(sum(sizes) / len(sizes)), max(sizes)],
           "final_labels": rounds[-1]["labels"], "final_accuracy": rounds[-1]["accuracy"],
           "events": len(results.get("events", []))}
    lost = [cfg.clients - n for n in row["clients_reporting"]]
    text = "\n".join([
        f"`{command_line('simulations.bench.scale', argv)}` ({row['cores']} cores)", "",
        f"Settings: {portable(settings)}", "",
        "| clients | cores | rounds | wall s | s per round (1..R) | clients reporting | clients lost | peak RSS (MiB, "
        "process tree) | processes | samples/client (min/mean/max) | final labels | final accuracy | events |",
        "|---:|---:|---:|---:|---|---|---|---:|---:|---|---:|---:|---:|",
        f"| {row['clients']} | {row['cores']} | {row['rounds']} | {seconds:.1f} | "
        f"{', '.join(f'{s:.1f}' for s in row['round_seconds'])} | {', '.join(map(str, row['clients_reporting']))} | "
        f"{', '.join(map(str, lost))} | {row['peak_rss_mib']:.0f} | {row['processes_at_peak']} | "
        f"{'/'.join(map(str, row['samples_per_client']))} | {row['final_labels']} | {row['final_accuracy']:.4f} | "
        f"{row['events']} |"])
    save_result(output_dir, "bench_scale", {"command": command_line("simulations.bench.scale", argv),
                                            "machine": machine_info(), "settings": portable(settings), "result": row},
                text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
