"""Benchmark: framework overhead of a federation on the Simulation Engine vs a bare loop.

Runs the same federation twice:

1. ``fedal`` on Flower's Simulation Engine (:func:`simulations.engine.run_in_simulation`:
   Ray actors, messages, the ServerApp's strategy, results and checkpoints), once with one
   actor (``--cpus 1``, the same single core as the loop) and once with one actor per core;
2. a bare Python loop doing the same computation in one process: for every round and
   client a :class:`~clients.site.ClientSite` (same data, pool database, queries and local
   training), FedAvg as a weighted mean of the numpy weights, the same client and server
   evaluations.

Prints the wall times and the overhead ratio (simulation / loop) and writes
``simulations/results/bench_overhead.{md,json}``. Both paths label the same samples,
so their final label counts must agree (checked).

    .venv/bin/python -m simulations.bench.overhead
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from simulations.bench.common import SHARED_DATA_DIR, federation_settings, portable

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

DEFAULTS = {"dataset": "bloodmnist", "data-dir": str(SHARED_DATA_DIR),
            "max-train": 2000, "clients": 5, "partition": "dirichlet", "alpha": 0.5, "strategy": "entropy",
            "initial-labels": 10, "round-budget": 50, "rounds": 4, "local-epochs": 2, "min-local-steps": 20,
            "min-clients": 5}


def bare_loop(cfg) -> tuple[float, list[dict]]:
    """The federation's computation without Flower: returns (seconds, rows)."""
    import torch

    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.budget import BudgetCoordinator
    from fedal.federation import federation_dataset
    from fedal.messages import TrainInstruction
    from fedal.models import model_for

    torch.set_num_threads(1)  # as each simulated client (clients/app.py)
    t0 = time.perf_counter()
    ds = federation_dataset(cfg)
    server_model = model_for(cfg, ds.input_shape, ds.n_classes, seed=cfg.seed)
    state = server_model.get_state()
    coordinator = BudgetCoordinator(cfg.budget_policy, cfg.round_budget, cfg.client_cap)
    nodes = [NodeConfig(client_id=c) for c in range(cfg.clients)]
    rows = []
    for server_round in range(1, cfg.rounds + 1):
        t_round = time.perf_counter()
        budgets = (coordinator.allocate_to(server_round, range(cfg.clients)) if cfg.is_query_round(server_round)
                   else {c: 0 for c in range(cfg.clients)})
        states, weights, labels = [], [], 0
        for c in range(cfg.clients):
            site = ClientSite(cfg, nodes[c])
            new_state, report = site.train(state, TrainInstruction(server_round, int(budgets[c])))
            site.close()
            coordinator.report(c, report.unlabeled_left, report.mean_uncertainty)
            if cfg.is_query_round(server_round):
                coordinator.record_spent(server_round, c, report.queries_used)
            states.append(new_state)
            weights.append(report.num_examples)
            labels += report.num_examples
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        state = {k: sum(wi * s[k] for wi, s in zip(w, states)).astype(states[0][k].dtype) for k in state}
        for c in range(cfg.clients):
            site = ClientSite(cfg, nodes[c])
            site.evaluate(state)
            site.close()
        server_model.set_state(state)
        _, acc = server_model.evaluate(ds.X_test, ds.y_test)
        rows.append({"round": server_round, "labels": labels, "accuracy": acc,
                     "seconds": time.perf_counter() - t_round})
    return time.perf_counter() - t0, rows


def simulation(cfg, cpus: int) -> tuple[float, list[dict]]:
    """The federation on the Simulation Engine with ``cpus`` actors: (seconds, rounds)."""
    from simulations.engine import run_in_simulation

    t0 = time.perf_counter()
    run_in_simulation(cfg, cpus=cpus)
    seconds = time.perf_counter() - t0
    return seconds, json.loads((Path(cfg.output_dir) / "results.json").read_text())["rounds"]


def main(argv: list[str] | None = None) -> int:
    from fedal.config import FederationConfig

    settings, output_dir = federation_settings(argv, __doc__.splitlines()[0], DEFAULTS)
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-overhead-"))
    try:
        results = {}
        for name, cpus in (("simulation, 1 actor", 1), (f"simulation, {os.cpu_count()} actors", os.cpu_count())):
            cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work / f"sim{cpus}")})
            seconds, rounds = simulation(cfg, cpus)
            results[name] = {"seconds": seconds, "labels": rounds[-1]["labels"], "accuracy": rounds[-1]["accuracy"],
                             "round_seconds": [r["seconds"] for r in rounds]}
            print(f"{name}: {seconds:.1f} s", flush=True)
        cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work / "loop")})
        seconds, rows = bare_loop(cfg)
        results["bare loop, 1 process"] = {"seconds": seconds, "labels": rows[-1]["labels"],
                                           "accuracy": rows[-1]["accuracy"],
                                           "round_seconds": [r["seconds"] for r in rows]}
        print(f"bare loop: {seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loop = results["bare loop, 1 process"]["seconds"]
    lines = [f"Settings: {portable(settings)}", "",
             "| path | wall s | ratio vs bare loop | steady rounds s (2..R) | ratio, steady rounds | final labels | final accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    loop_steady = sum(results["bare loop, 1 process"]["round_seconds"][1:])
    for name, r in results.items():
        steady = sum(r["round_seconds"][1:])
        r["ratio"] = r["seconds"] / loop
        r["steady_ratio"] = steady / loop_steady
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['ratio']:.2f}x | {steady:.1f} | {r['steady_ratio']:.2f}x | "
                     f"{r['labels']} | {r['accuracy']:.4f} |")
    labels = {r["labels"] for r in results.values()}
    lines += ["", "same labels in every path: " + ("yes" if len(labels) == 1 else f"NO ({sorted(labels)})")]
    text = "\n".join(lines)
    print(text)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_overhead.md").write_text(text + "\n")
    (out / "bench_overhead.json").write_text(json.dumps({"settings": portable(settings), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
