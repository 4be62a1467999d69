"""A deployment round against the same round as a bare loop in one process.

Starts a local deployment (``deploy/run_local_deployment.py``: a SuperLink with TLS and node
authentication, ``--sites`` registered SuperNodes, each with its own data file), runs ``--rounds``
rounds of digits with the head pipeline, once in the clear and once with ``secure-aggregation = true``,
and runs the same rounds on the same site files as a bare loop (``ClientSite.train`` and
``ClientSite.evaluate`` per site, the statistics summed in numpy). Prints the seconds per round of each
and writes ``simulations/results/bench_deployment_round.{md,json}``.

With ``--profile`` every SuperNode's ClientApp records each message it handles (``$FEDAL_PROFILE_DIR``,
:mod:`clients.profiling`): the table then says, per message type, how long a ClientApp process took from
its start to the call (process start and imports) and the call itself, against the round's seconds (the
rest is Flower's polling), and lists the functions the clear run's calls spent most time in.

Usage::

    python -m simulations.bench.deployment_round            # 2 sites, 3 rounds
    python -m simulations.bench.deployment_round --profile  # and where a message's seconds go
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from simulations.bench.common import ROOT, command_line, machine_info, save_result

#: digits rows hold 64 values in [0, 1]: their norm is at most 8 (secure aggregation needs the bound)
RUN_CONFIG = {"dataset": "digits", "initial-labels": 10, "round-budget": 20, "round-timeout": 120.0, "seed": 0,
              "head-clip-norm": 8.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="record each ClientApp call (clients.profiling)")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    return p.parse_args(argv)


def _deploy_module():
    spec = importlib.util.spec_from_file_location("run_local_deployment", ROOT / "deploy" / "run_local_deployment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bare_loop(settings: dict, data_paths: list[Path], work: Path) -> list[float]:
    """Seconds of each round of the federation run in one process (fresh state, the same site files)."""
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.config import FederationConfig
    from fedal.heads import ClassStatistics
    from fedal.messages import TrainInstruction
    from fedal.models import model_for
    from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS

    cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work / "bare-server")})
    nodes = [NodeConfig.from_mapping({"client-id": c, "data-path": str(p), "state-dir": str(work / f"bare-{c}"),
                                      "oracle": "simulated"}) for c, p in enumerate(data_paths)]
    first = ClientSite(cfg, nodes[0])
    server = model_for(cfg, first.X_pool.shape[1:], first.data.n_classes, seed=cfg.seed, raw_shape=first.data.input_shape)
    first.close()
    state, seconds = server.get_state(), []
    budget = cfg.round_budget // len(nodes)
    for server_round in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        labeled = pseudo = None
        for node in nodes:
            site = ClientSite(cfg, node)
            arrays, _ = site.train(state, TrainInstruction(server_round, budget if server_round > 1 else 0))
            site.close()
            lab, pse = ClassStatistics.from_arrays(arrays, LABELED_STATS), ClassStatistics.from_arrays(arrays, PSEUDO_STATS)
            labeled, pseudo = (lab, pse) if labeled is None else (labeled + lab, pseudo + pse)
        server.fit_statistics(labeled, pseudo)
        state = server.get_state()
        for node in nodes:
            site = ClientSite(cfg, node)
            site.evaluate(state)
            site.close()
        seconds.append(round(time.perf_counter() - t0, 3))
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    deploy = _deploy_module()
    work = Path(tempfile.mkdtemp(prefix="fedal-bench-round-"))
    settings = {**RUN_CONFIG, "rounds": args.rounds}
    rows, windows = [], {}
    if args.profile:  # the SuperNodes, and the ClientApp processes they start, inherit it
        from clients.profiling import PROFILE_ENV

        os.environ[PROFILE_ENV] = str(work / "profile")
    with deploy.LocalDeployment(work / "deployment", sites=args.sites, run_config=settings, verbose=False) as dep:
        dep.start_all()
        for name, extra in (("deployment", {}), ("deployment, secure aggregation", {"secure-aggregation": True})):
            t0, started = time.monotonic(), time.time()
            run_id = dep.submit(**{**extra, "output-dir": str(work / name.replace(" ", "-").replace(",", ""))})
            results = dep.wait(run_id, args.rounds, timeout=1800)
            rows.append({"path": name, "round_seconds": [r["seconds"] for r in results["rounds"]],
                         "wall_seconds": round(time.monotonic() - t0, 1),
                         "accuracy": [r["accuracy"] for r in results["rounds"]]})
            windows[name] = (started, time.time())
        data_paths = [s.data_path for s in dep.site_list]
        bare = bare_loop({**settings, "clients": args.sites, "min-clients": args.sites}, data_paths, work)
    rows.insert(0, {"path": "bare loop, one process", "round_seconds": bare, "wall_seconds": round(sum(bare), 1),
                    "accuracy": None})
    base = sum(bare) / len(bare)
    for row in rows:
        mean = sum(row["round_seconds"]) / len(row["round_seconds"])
        row["mean_round_seconds"] = round(mean, 3)
        row["ratio_vs_bare_loop"] = round(mean / base, 1)
    record = {"command": command_line("simulations.bench.deployment_round", argv), "sites": args.sites,
              "rounds": args.rounds, "settings": settings, "machine": machine_info(), "rows": rows}
    if args.profile:
        record["profile"] = message_profile(work / "profile", windows)
        os.environ.pop(PROFILE_ENV, None)
    save_result(args.out, "bench_deployment_round", record, table(record))
    return 0


def message_profile(folder: Path, windows: dict[str, tuple[float, float]], top: int = 15) -> dict:
    """Per run and message type: the ClientApp processes' seconds from their start to the call and in the call
    (``calls.jsonl`` of :mod:`clients.profiling`); the clear run's calls' functions with the most time."""
    import json
    import pstats

    from simulations.bench.profile import top_functions

    calls = [json.loads(line) for line in (folder / "calls.jsonl").read_text().splitlines()]
    out = {"runs": {}, "top": []}
    for run, (start, end) in windows.items():
        mine = [c for c in calls if start <= c["call_started"] <= end]
        kinds: dict[str, list[dict]] = {}
        for c in mine:
            kinds.setdefault(c["type"], []).append(c)
        out["runs"][run] = {kind: {
            "calls": len(cs), "processes": len({c["pid"] for c in cs}),
            "start_to_call_s": round(sum(c["call_started"] - c["process_started"] for c in cs) / len(cs), 3),
            "call_s": round(sum(c["call_seconds"] for c in cs) / len(cs), 3)} for kind, cs in sorted(kinds.items())}
        if run == "deployment":
            files = [folder / f"client-{pid}.prof" for pid in sorted({c["pid"] for c in mine})]
            out["top"] = top_functions(pstats.Stats(*map(str, files)), top)
    return out


def table(record: dict) -> str:
    lines = [f"# A deployment round: {record['sites']} sites, digits, head pipeline, {record['rounds']} rounds", "",
             f"`{record['command']}` ({record['machine']['nproc']} cores, {record['machine']['cpu']})", "",
             "| path | seconds per round | mean | vs the bare loop |", "|---|---|---:|---:|"]
    for row in record["rows"]:
        lines.append(f"| {row['path']} | {', '.join(f'{s:.2f}' for s in row['round_seconds'])} | "
                     f"{row['mean_round_seconds']:.2f} | {row['ratio_vs_bare_loop']:.1f}x |")
    if "profile" in record:
        lines += ["", "## Where a message's seconds go (`--profile`: clients.profiling in every ClientApp process)", "",
                  "| run | message | calls | ClientApp processes | process start to call (s, mean) | call (s, mean) |",
                  "|---|---|---:|---:|---:|---:|"]
        for run, kinds in record["profile"]["runs"].items():
            for kind, k in kinds.items():
                lines.append(f"| {run} | {kind} | {k['calls']} | {k['processes']} | {k['start_to_call_s']:.3f} | "
                             f"{k['call_s']:.3f} |")
        lines += ["", "The clear run's calls, merged (cProfile):", "", "| function | calls | cumulative s | own s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| `{f['function']}` | {f['calls']} | {f['cumulative_s']:.3f} | {f['own_s']:.3f} |"
                  for f in record["profile"]["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
