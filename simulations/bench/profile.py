"""Profile one simulated run: where its wall time goes, and the ServerApp's and the clients' CPU time.

Runs one federation on Flower's Simulation Engine, as ``fedal simulate`` does (Ray and the client actors
started and stopped for it), and writes three tables to ``simulations/results/<name>.md`` (and ``.json``):

1. **timeline**: the wall seconds from the start of the run to Ray being up, the first round (the actors
   load the ClientApp, the data and the features), the other rounds, and from the last round to the end
   (the engine's threads stopping, Ray stopped);
2. **ServerApp** (cProfile of its thread): the functions with the most cumulative time, ``send_and_receive``
   being the time it waited for the clients;
3. **ClientApp** (cProfile of every message any actor handled, :mod:`clients.profiling`, merged): the same.

cProfile slows Python-heavy code down (about 1.5x here): read the tables as shares, and the timeline's
rounds as an upper bound. Usage::

    python -m simulations.bench.profile --preset simulations/presets/bloodmnist_a01.toml --set strategy=margin
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from simulations.bench.common import ROOT, SHARED_DATA_DIR, command_line, machine_info, portable, save_result


def _short_path(path: str) -> str:
    """A source file's name without this machine's folders: inside the repository, a package, or Python's library."""
    if "site-packages/" in path:
        return path.split("site-packages/")[-1]
    if Path(path).resolve().is_relative_to(ROOT):
        return os.path.relpath(Path(path).resolve(), ROOT)
    parts = Path(path).parts
    ours = [i for i, part in enumerate(parts) if part in ("fedal", "clients", "server", "simulations")]
    if ours:  # the project's code installed elsewhere (a deployment's app folder)
        return "/".join(parts[ours[-1]:])
    python = [i for i, part in enumerate(parts) if part.startswith("python3")]
    return "/".join(parts[python[-1]:]) if python else Path(path).name


def top_functions(stats: pstats.Stats, n: int) -> list[dict]:
    """The ``n`` functions with the most cumulative time (Python's import machinery left out)."""
    rows = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        if "importlib" in path or path == "~" and name.startswith("<built-in method builtins.exec"):
            continue
        short = _short_path(path)
        rows.append({"function": f"{short}:{line}({name})" if path != "~" else name, "calls": calls,
                     "cumulative_s": round(cumtime, 3), "own_s": round(tottime, 3)})
    rows.sort(key=lambda r: -r["cumulative_s"])
    return rows[:n]


def profile_run(settings: dict, work: Path, top: int) -> dict:
    """Run the federation ``settings`` once under the profilers; the record of the tables."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    import server.app as server_app
    from clients.profiling import PROFILE_ENV
    from fedal.config import FederationConfig
    from simulations.engine import run_in_simulation

    marks: dict[str, float] = {}
    rounds: list[float] = []
    flower_backend = raybackend.RayBackend

    class TimedBackend(flower_backend):  # when Ray is up
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            marks.setdefault("ray_up", time.perf_counter())

    server_profile = cProfile.Profile()
    run_federation = server_app.run_federation

    def profiled(*args, **kwargs):  # in the ServerApp's thread
        server_profile.enable()
        try:
            return run_federation(*args, **kwargs)
        finally:
            server_profile.disable()

    def on_round(row):
        rounds.append(time.perf_counter())

    cfg = FederationConfig.from_mapping({**settings, "output-dir": str(work / "run"), "overwrite": True})
    os.environ[PROFILE_ENV] = str(work)  # before Ray starts: its workers inherit it
    raybackend.RayBackend, server_app.run_federation = TimedBackend, profiled
    server_app.ROUND_HOOKS.append(on_round)
    try:
        marks["start"] = time.perf_counter()
        run_in_simulation(cfg)  # its ClientApp profiles every call into $FEDAL_PROFILE_DIR (clients.profiling)
        marks["end"] = time.perf_counter()
    finally:
        raybackend.RayBackend, server_app.run_federation = flower_backend, run_federation
        server_app.ROUND_HOOKS.remove(on_round)
        os.environ.pop(PROFILE_ENV, None)
    start = marks["start"]
    steady = [b - a for a, b in zip(rounds, rounds[1:])]
    timeline = [
        {"phase": "start to Ray up (Flower's backend: ray.init)", "seconds": marks["ray_up"] - start},
        {"phase": "Ray up to the end of round 1 (actors load the ClientApp, data, features)",
         "seconds": rounds[0] - marks["ray_up"]},
        {"phase": f"rounds 2-{len(rounds)} ({len(steady)} rounds, {sum(steady) / max(len(steady), 1):.2f} s each)",
         "seconds": sum(steady)},
        {"phase": "last round to the end (the engine's threads stop, Ray stopped)", "seconds": marks["end"] - rounds[-1]},
    ]
    server_stats = pstats.Stats(server_profile, stream=io.StringIO())
    client_files = sorted(work.glob("client-*.prof"))
    client_stats = pstats.Stats(*map(str, client_files), stream=io.StringIO())
    results = json.loads((work / "run" / "results.json").read_text())
    return {"timeline": [{**t, "seconds": round(t["seconds"], 2)} for t in timeline],
            "total_seconds": round(marks["end"] - start, 2), "actors": len(client_files),
            "final_accuracy": results["rounds"][-1]["accuracy"], "final_labels": results["rounds"][-1]["labels"],
            "server_cpu_s": round(server_stats.total_tt, 2), "clients_cpu_s": round(client_stats.total_tt, 2),
            "server_top": top_functions(server_stats, top), "client_top": top_functions(client_stats, top)}


def table(record: dict) -> str:
    r = record["profile"]
    lines = [f"# Profile of one simulated run: {record['title']}", "",
             f"`{record['command']}` ({record['machine']['nproc']} cores, {record['machine']['cpu']}); "
             f"{r['final_labels']} labels, accuracy {r['final_accuracy']:.4f}", "",
             "## Timeline (wall seconds)", "", "| phase | s |", "|---|---:|"]
    lines += [f"| {t['phase']} | {t['seconds']:.2f} |" for t in r["timeline"]]
    lines += [f"| **whole run** | **{r['total_seconds']:.2f}** |", ""]
    for key, title, total in (("server_top", "ServerApp thread", r["server_cpu_s"]),
                              ("client_top", f"ClientApp calls ({r['actors']} actors, merged)", r["clients_cpu_s"])):
        lines += [f"## {title}: cProfile, {total:.2f} s in all", "",
                  "| function | calls | cumulative s | own s |", "|---|---:|---:|---:|"]
        lines += [f"| `{f['function']}` | {f['calls']} | {f['cumulative_s']:.3f} | {f['own_s']:.3f} |" for f in r[key]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fedal.config import FederationConfig, parse_assignments
    from simulations.compare import load_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="simulations/presets/bloodmnist_a01.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top", type=int, default=25, help="functions listed per table")
    p.add_argument("--name", default="profile_bloodmnist_a01", help="result files' name")
    p.add_argument("--output-dir", default=str(ROOT / "simulations" / "results"))
    args = p.parse_args(argv)
    base, _ = load_preset(str(ROOT / args.preset) if not Path(args.preset).is_absolute() else args.preset)
    cfg = FederationConfig.from_mapping({"data-dir": str(SHARED_DATA_DIR), **parse_assignments(args.overrides)},
                                        base=base)
    settings = cfg.to_run_config()
    work = Path(tempfile.mkdtemp(prefix="fedal-profile-"))
    try:
        profile = profile_run(settings, work, args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = f"{cfg.dataset}, {cfg.clients} clients, {cfg.pipeline} pipeline, {cfg.strategy}, {cfg.rounds} rounds"
    settings.pop("output-dir", None)
    record = {"command": command_line("simulations.bench.profile", argv), "machine": machine_info(), "title": title,
              "settings": portable(settings), "profile": profile}
    save_result(args.output_dir, args.name, record, table(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
