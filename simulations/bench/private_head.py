"""Accuracy of the private head pipeline against epsilon, and what the private setting costs a round.

Runs the 50 -> 1,000 labels federation of ``simulations/presets/bloodmnist_a01_long.toml`` (BloodMNIST, 10
sites, Dirichlet alpha = 0.1, 5 initial labels per site, 50 labels per round, 20 rounds; random queries, split
evenly) under secure aggregation, in one process with fedal's own parts (:func:`simulations.attacks.observe`:
each site's ``ClientSite`` with its own noise, its secure encoding summed as SecAgg+ unmasks it, the server's
``StatisticsAggregation``), for each epsilon (per labeled sample, whole run, delta 1e-5) and seed, against the
run without privacy (the head pipeline's defaults, self-training on) and the private pipeline without noise
(what its design costs before any noise). Prints a table of the global head's test accuracy at 250, 500 and
the last round's labels (mean and spread over the seeds) and the seconds per round, and writes
``simulations/results/bench_private_head.{md,json}``.

Usage::

    python -m simulations.bench.private_head                  # epsilon 1, 3, 8; seeds 0, 1, 2
    python -m simulations.bench.private_head --epsilons 8 --seeds 0
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from simulations.bench.common import ROOT, SHARED_DATA_DIR, command_line, machine_info, portable, save_result

BASE = {"dataset": "bloodmnist", "data-dir": str(SHARED_DATA_DIR), "max-train": 0, "clients": 10, "min-clients": 10,
        "partition": "dirichlet", "alpha": 0.1, "initial-strategy": "random", "initial-labels": 5, "round-budget": 50,
        "query-every": 1, "strategy": "random", "secure-aggregation": True}
#: the descriptors' norms are 3.9 to 4.2 (5th to 99th percentile): clipping at 4.2 keeps them
CLIP = 4.2
ROUNDS = 20
AT = (5, 10, 20)  # the rounds whose accuracy the table shows: 250, 500 and 990 labels


def settings_of(label: str) -> dict:
    if label == "not private":
        return {}
    if label == "private, no noise":
        return {"head-clip-norm": CLIP, "head-dp-noise": 1e-6}
    return {"head-clip-norm": CLIP, "head-dp-epsilon": float(label.split()[-1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    args = p.parse_args(argv)
    from simulations.attacks import observe

    labels = ["not private", "private, no noise", *[f"epsilon {e:g}" for e in args.epsilons]]
    at = [r for r in AT if r <= args.rounds] or [args.rounds]
    rows = []
    for label in labels:
        runs = []
        for seed in args.seeds:
            work = Path(tempfile.mkdtemp(prefix="fedal-bench-private-"))
            t0 = time.perf_counter()
            obs = observe({**BASE, **settings_of(label), "seed": seed}, args.rounds, work=work, evaluate=True)
            runs.append({"seed": seed, "seconds_per_round": (time.perf_counter() - t0) / args.rounds,
                         "accuracy": {str(r): obs.accuracy[r] for r in sorted(obs.accuracy)},
                         "labels": {str(r): obs.labels[r] for r in sorted(obs.labels)}})
            print(f"{label}, seed {seed}: " + ", ".join(f"{obs.labels[r]} labels {obs.accuracy[r]:.3f}" for r in at),
                  flush=True)
        rows.append({"setting": label, "runs": runs})
    record = {"command": command_line("simulations.bench.private_head", argv), "settings": portable(BASE), "clip": CLIP,
              "rounds": args.rounds, "seeds": args.seeds, "machine": machine_info(), "rows": rows}
    save_result(args.out, "bench_private_head", record, table(record, at))
    return 0


def table(record: dict, at: list[int]) -> str:
    """The accuracy at the rounds ``at`` (mean +- spread over the seeds) and seconds per round of each setting."""
    first = record["rows"][0]["runs"]
    head = " | ".join(f"round {r} ({min(run['labels'][str(r)] for run in first)}-"
                      f"{max(run['labels'][str(r)] for run in first)} labels)" for r in at)
    lines = [f"Private head pipeline, BloodMNIST alpha=0.1, 10 sites, secure aggregation, random queries, "
             f"seeds {record['seeds']} (`{record['command']}`)", "",
             f"| setting | {head} | s / round |", "|---|" + "---:|" * (len(at) + 1)]
    for row in record["rows"]:
        cells = []
        for r in at:
            values = [run["accuracy"][str(r)] for run in row["runs"]]
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f}")
        seconds = statistics.mean(run["seconds_per_round"] for run in row["runs"])
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + f" | {seconds:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
