"""Accuracy against differential-privacy noise on BloodMNIST.

Runs the same federation (BloodMNIST, ``--clients`` clients, ``--max-train`` training
images, ``--rounds`` rounds, entropy queries) on Flower's Simulation Engine once without
DP, once with clipping only, and once per ``--noise`` multiplier with server-side
clipping at ``--clip`` and central Gaussian noise (:mod:`server.dp`). With ``--secure``
every run is under secure aggregation (SecAgg+) and the DP runs are distributed: each site
clips its update and adds its Skellam share of the noise before masking
(:class:`fedal.dp.UpdateNoise`). Prints a table of final accuracy and the privacy spent
(epsilon at ``--delta``), and writes ``simulations/results/bench_dp.{json,md}``
(``bench_dp_secure`` with ``--secure``) with the command and the machine.

Usage::

    python simulations/bench/dp.py                       # 5 clients, 3000 images, 6 rounds, noise 0.5 and 1.0
    python simulations/bench/dp.py --noise 0.01 0.1 0.5 1.0 --clip 5
    python -m simulations.bench.dp --secure --noise 0.01 0.1 0.5 1.0 --clip 5

The noise in these runs is seeded (``numpy.random.seed(--seed)`` before each run) so the
table can be reproduced; a real deployment must not seed it. The sites' shares under
``--secure`` come from the operating system's entropy, as in a deployment: not seeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simulations.bench.common import machine_info, portable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="folder with bloodmnist.npz")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--initial-labels", type=int, default=20)
    p.add_argument("--round-budget", type=int, default=100)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--min-local-steps", type=int, default=30)
    p.add_argument("--clip", type=float, default=5.0, help="dp-clipping-norm of every DP run")
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0], help="dp-noise-multiplier values")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure", action="store_true",
                   help="every run under secure aggregation; DP noise added by the sites before masking")
    p.add_argument("--secure-threshold", type=float, default=0.6, help="secure-threshold of the --secure runs")
    p.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all cores)")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"), help="where bench_dp.{json,md} go")
    return p.parse_args(argv)



def run_one(name: str, args: argparse.Namespace, work: Path, clip: float, noise: float) -> dict:
    """One federation; returns its accuracy curve and privacy report."""
    from fedal.config import FederationConfig
    from simulations.engine import run_in_simulation

    out = work / name
    cfg = FederationConfig(dataset="bloodmnist", pipeline="network", data_dir=args.data_dir, max_train=args.max_train,
                           clients=args.clients, min_clients=args.clients, partition="iid", strategy="entropy",
                           initial_labels=args.initial_labels, round_budget=args.round_budget,
                           rounds=args.rounds, local_epochs=args.local_epochs,
                           min_local_steps=args.min_local_steps, seed=args.seed, output_dir=str(out),
                           dp_clipping_norm=clip, dp_noise_multiplier=noise, dp_delta=args.delta,
                           dp_mode="client" if args.secure else "server", secure_aggregation=args.secure,
                           secure_threshold=args.secure_threshold)
    np.random.seed(args.seed)  # Flower draws the DP noise from numpy's global generator
    start = time.perf_counter()
    run_in_simulation(cfg, cpus=args.cpus)
    seconds = time.perf_counter() - start
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    last = rounds[-1]
    privacy = last.get("privacy")
    return {"name": name, "clip": clip, "noise": noise, "seconds": round(seconds, 1),
            "accuracy": [round(r["accuracy"], 4) for r in rounds], "labels": [r["labels"] for r in rounds],
            "final_accuracy": round(last["accuracy"], 4), "best_accuracy": round(max(r["accuracy"] for r in rounds), 4),
            "epsilon": None if not privacy else privacy["epsilon"], "privacy": privacy}


def majority_class_accuracy(data_dir: str) -> float:
    """Test accuracy of always answering BloodMNIST's most frequent test class."""
    from fedal.data import load_dataset

    counts = np.bincount(load_dataset("bloodmnist", data_dir).y_test)
    return round(float(counts.max() / counts.sum()), 4)


def table(results: dict) -> str:
    delta = results["args"]["delta"]
    lines = [f"| run | clipping norm | noise multiplier | final accuracy | best accuracy | labels | epsilon (delta={delta:g}) | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        eps = "-" if r["epsilon"] is None else ("inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:.3g}")
        clip = "-" if r["clip"] == 0 else f"{r['clip']:g}"
        lines.append(f"| {r['name']} | {clip} | {r['noise']:g} | {r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} "
                     f"| {r['labels'][-1]} | {eps} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict) -> None:
    m, a = results["machine"], results["args"]
    lines = [
        "# Differential privacy: accuracy against noise (BloodMNIST"
        + (", noise on the sites under secure aggregation)" if a.get("secure") else ")"), "",
        f"Command: `{results['command']}`", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, "
        f"{m['platform']}; load average at the start {m['load_average']} (shared machine: the seconds are noisy).", "",
        f"Federation: BloodMNIST ({a['max_train']} training images, 8 classes), {a['clients']} clients (IID), "
        f"{a['rounds']} rounds, entropy queries, {a['initial_labels']} initial labels per client, "
        f"{a['round_budget']} labels per query round, FedAvg, {a['local_epochs']} local epochs "
        f"(>= {a['min_local_steps']} steps). Every sampled client takes part in every round. {dp_runs(results)} "
        "Accuracy: the global model on the "
        f"BloodMNIST test split (3421 images); always answering the most frequent class scores "
        f"{results['majority_class_accuracy']:.3f}.", "",
        table(results), "",
        "Accuracy per round:", "",
        "| run | " + " | ".join(f"r{i + 1}" for i in range(a["rounds"])) + " |",
        "|---|" + "---:|" * a["rounds"],
    ]
    lines += [f"| {r['name']} | " + " | ".join(f"{x:.3f}" for x in r["accuracy"]) + " |" for r in results["runs"]]
    lines += ["", results["reading"], ""]
    path.write_text("\n".join(lines))


def dp_runs(results: dict) -> str:
    """What the DP runs of ``results`` do, in a sentence or two."""
    a = results["args"]
    if not a.get("secure"):
        return (f"DP runs: server-side clipping of each update to L2 norm {a['clip']:g}, equal-weight mean, Gaussian "
                f"noise of std multiplier x {a['clip']:g} / {a['clients']} on every coordinate of the mean; epsilon from "
                "Renyi DP (client-level, add/remove one client, no sampling amplification).")
    k = results["fewest_sites"]
    return (f"Every run under secure aggregation (Flower's SecAgg+, secure-threshold {a['secure_threshold']:g}: a sum "
            f"holds at least {k} sites). DP runs: each site clips its update to L2 norm {a['clip']:g}, weighs it 1 and "
            f"adds an integer Skellam share of variance (multiplier x {a['clip']:g})^2 / {k - 1} before masking, so that "
            f"any {k - 1} sites' shares make noise of std multiplier x {a['clip']:g} on the sum (the server unmasks a "
            f"sum that is already noisy; with all {a['clients']} sites in it the std is sqrt({a['clients']}/{k - 1}) times "
            "that); epsilon from dp-accounting's Renyi accountant with the Skellam bound (client-level, add/remove one "
            "client, no sampling amplification).")


def reading(results: dict) -> str:
    runs = {r["name"]: r for r in results["runs"]}
    base = runs["no DP"]["final_accuracy"]
    noisy = [r for r in results["runs"] if r["noise"] > 0]
    parts = [f"Without DP the federation reaches {base:.3f}; clipping alone gives "
             f"{runs['clip only']['final_accuracy']:.3f} (the most frequent class alone: "
             f"{results['majority_class_accuracy']:.3f})."]
    for r in noisy:
        parts.append(f"Noise {r['noise']:g} gives {r['final_accuracy']:.3f} at epsilon {r['epsilon']:.3g}.")
    if results["args"].get("secure"):
        parts.append("The sites' noise costs more accuracy than the server's at the same multiplier and epsilon: the "
                     f"shares are sized so that any {results['fewest_sites'] - 1} sites make the whole noise, so a "
                     f"full sum carries {results['args']['clients']}/{results['fewest_sites'] - 1} times its variance; "
                     "in exchange the server never holds an un-noised update or sum.")
    parts.append(
        f"With a handful of clients the noise on the mean (std multiplier x clip / clients on each of the "
        f"model's {results['model_parameters']:,} weights) dwarfs the update itself, so a useful epsilon costs the model; central DP "
        "pays off with hundreds of clients per round, where the same epsilon needs proportionally less noise "
        "per coordinate of the mean.")
    return " ".join(parts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (Path(args.data_dir) / "bloodmnist.npz").is_file():
        sys.exit(f"bench_dp: {Path(args.data_dir) / 'bloodmnist.npz'} not found; pass --data-dir")
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-dp-"))
    plan = [("no DP", 0.0, 0.0), ("clip only", args.clip, 0.0)]
    plan += [(f"noise {s:g}", args.clip, s) for s in args.noise]
    machine = machine_info()
    runs = []
    try:
        for name, clip, noise in plan:
            print(f"bench_dp: {name} (clip {clip:g}, noise {noise:g}) ...", flush=True)
            runs.append(run_one(name.replace(" ", "-"), args, work, clip, noise) | {"name": name})
            r = runs[-1]
            print(f"  accuracy {r['final_accuracy']:.4f}, epsilon {r['epsilon']}, {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
               "machine": machine, "args": portable(vars(args)), "runs": runs}
    from fedal.models import build_model

    results["model_parameters"] = int(sum(v.size for v in build_model((3, 28, 28), 8).get_state().values()))
    results["majority_class_accuracy"] = majority_class_accuracy(args.data_dir)
    from fedal.dp import fewest_in_sum

    results["fewest_sites"] = fewest_in_sum(args.clients, args.secure_threshold) if args.secure else None
    results["reading"] = reading(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_dp_secure" if args.secure else "bench_dp"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out / f"{stem}.md", results)
    print(table(results))
    print(results["reading"])
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return results


if __name__ == "__main__":
    main()
