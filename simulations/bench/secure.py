"""Secure aggregation on a preset: the same accuracy per round, its overhead, a site dropping out.

Runs one strategy and seed of a preset (default: BloodMNIST alpha = 0.1, margin, seed 0) on Flower's
Simulation Engine four ways, one after the other on the same machine:

* ``clear, min-class-count 1``: every class statistic sent in the clear (fedal before the minimum count);
* ``clear (default)``: the default minimum count (a class's labeled statistics only with 2 labels);
* ``secure``: ``secure-aggregation = true`` (Flower's SecAgg+; the server sees the sums only);
* ``secure, site drops``: the same, with client ``--drop-client`` killed in round ``--drop-round`` after
  it shared its keys (in the masking stage): the others' shares unmask the round.

Prints a table (accuracy per round, the largest difference to the clear run, seconds per round) and
writes ``simulations/results/bench_secure.{json,md}`` with the command and the machine.

Usage::

    python -m simulations.bench.secure
    python -m simulations.bench.secure --preset simulations/presets/bloodmnist_a01_network.toml --rounds 6
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

from simulations.bench.common import ROOT, command_line, machine_info, portable, save_result

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
DROP_ENV = "FEDAL_BENCH_DROP"  # "<client>:<round>": the site that dies in the masking stage


class InjectedDropout(RuntimeError):
    """The benchmark's site dying after it shared its keys."""


def drop_mod(msg, context, call_next):
    """Flower mod in front of the train function (inside the SecAgg+ mod): kill the planned site in the planned
    round, after its training, before it sends its masked vector."""
    from clients.node import NodeConfig
    from fedal.flower import protocol

    reply = call_next(msg, context)
    plan = os.environ.get(DROP_ENV, "")
    if plan:
        client, server_round = (int(v) for v in plan.split(":"))
        if (NodeConfig.from_mapping(dict(context.node_config)).client_id == client
                and int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND]) == server_round):
            raise InjectedDropout(f"benchmark: client {client} dropped out in round {server_round}")
    return reply


def dropping_client_app():
    """``clients.app`` with :func:`drop_mod` in front of its train function."""
    from ray import cloudpickle

    from clients import app as client_module

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return client_module.client_app(train_mods=[drop_mod])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=str(ROOT / "simulations" / "presets" / "bloodmnist_a01.toml"))
    p.add_argument("--strategy", default="margin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=0, help="rounds (0 = the preset's)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--drop-client", type=int, default=3)
    p.add_argument("--drop-round", type=int, default=6)
    p.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all cores)")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"), help="where bench_secure.{json,md} go")
    return p.parse_args(argv)


def run_one(name: str, settings: dict, work: Path, cpus: int | None, drop: str = "") -> dict:
    from fedal.config import FederationConfig
    from simulations.engine import run_in_simulation

    cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work / name.replace(" ", "-").replace(",", ""))})
    os.environ[DROP_ENV] = drop
    t0 = time.perf_counter()
    try:
        run_in_simulation(cfg, cpus=cpus, client_app=dropping_client_app() if drop else None)
    finally:
        os.environ.pop(DROP_ENV, None)
    seconds = time.perf_counter() - t0
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    rounds = results["rounds"]
    return {"name": name, "seconds": round(seconds, 1),
            "round_seconds": [r["seconds"] for r in rounds], "labels": [r["labels"] for r in rounds],
            "accuracy": [r["accuracy"] for r in rounds], "clients": [len(r["clients"]) for r in rounds],
            "events": results.get("events", [])}


def main(argv=None) -> int:
    from simulations.compare import load_preset

    args = parse_args(argv)
    preset, _ = load_preset(args.preset)
    settings = dict(preset.to_run_config())
    settings.update({"strategy": args.strategy, "seed": args.seed, "data-dir": args.data_dir, "overwrite": True})
    if args.rounds:
        settings["rounds"] = args.rounds
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-secure-"))
    runs = []
    try:
        variants = [("clear, min-class-count 1", {"min-class-count": 1}, ""),
                    ("clear (default)", {}, ""),
                    ("secure", {"secure-aggregation": True}, ""),
                    ("secure, site drops", {"secure-aggregation": True}, f"{args.drop_client}:{args.drop_round}")]
        for name, extra, drop in variants:
            runs.append(run_one(name, {**settings, **extra}, work, args.cpus, drop))
            print(f"{name}: {runs[-1]['seconds']} s, final accuracy {runs[-1]['accuracy'][-1]:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    for run in runs:
        run["max_abs_diff_to_first"] = max(abs(a - b) for a, b in zip(run["accuracy"], base["accuracy"]))
    record = {"command": command_line("simulations.bench.secure", argv), "preset": portable({"p": args.preset})["p"],
              "strategy": args.strategy, "seed": args.seed, "drop": f"client {args.drop_client} in round {args.drop_round}",
              "machine": machine_info(), "runs": runs}
    save_result(args.out, "bench_secure", record, table(record))
    return 0


def table(record: dict) -> str:
    runs = record["runs"]
    lines = [f"# Secure aggregation: {Path(record['preset']).name}, {record['strategy']}, seed {record['seed']}", "",
             f"`{record['command']}` ({record['machine']['nproc']} cores, {record['machine']['cpu']})", "",
             "| round | labels | " + " | ".join(r["name"] for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for i, labels in enumerate(runs[0]["labels"]):
        cells = [f"{r['accuracy'][i]:.4f}" + ("" if r["clients"][i] == runs[0]["clients"][i]
                                              else f" ({r['clients'][i]} sites)") for r in runs]
        lines.append(f"| {i + 1} | {labels} | " + " | ".join(cells) + " |")
    lines += ["| max. difference to the first |  | " + " | ".join(f"{r['max_abs_diff_to_first']:.4f}" for r in runs)
              + " |",
              "| seconds (whole run) |  | " + " | ".join(f"{r['seconds']:.0f}" for r in runs) + " |",
              "| mean seconds per round |  | " + " | ".join(
                  f"{sum(r['round_seconds']) / len(r['round_seconds']):.1f}" for r in runs) + " |", ""]
    for run in runs:
        for event in run["events"]:
            lines.append(f"- {run['name']}, round {event['round']}: {event['detail']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
