"""``fedal simulate``: a whole federation on one machine, on Flower's Simulation Engine.

Every setting of :class:`~fedal.config.FederationConfig` is a flag (``--round-budget``)
and a key of the ``--config`` TOML file; flags win over the file, the file over the
defaults. Writes ``results.json``, ``results.csv``, ``curve.png`` and a checkpoint to
``--output-dir``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from fedal.config import PLACEMENT_SETTINGS, FederationConfig
from fedal.exceptions import ConfigError
from fedal.fileio import writable_folder


def _field_help() -> dict[str, str]:
    doc = FederationConfig.__doc__ or ""
    out = {}
    for match in re.finditer(r"^    (\w+) : \w+\n((?:        .*\n)+)", doc, re.M):
        out[match.group(1)] = " ".join(line.strip() for line in match.group(2).splitlines())
    return out


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FederationConfig()
    helps = _field_help()
    p.add_argument("--config", default=None, help="TOML file of settings (flat keys or a [fedal] table)")
    for f in fields(FederationConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f"{helps.get(f.name, '')} (default: {default!r})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=type(default).__name__.upper(), help=text)
    p.add_argument("--baseline", default=None, metavar="STRATEGY",
                   help="also run the same federation with this strategy (e.g. random) and plot both curves")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def config_from_args(args: argparse.Namespace) -> FederationConfig:
    """Defaults <- config file <- flags, validated."""
    base = FederationConfig.from_toml(args.config) if args.config else FederationConfig()
    flags = {name: getattr(args, name) for name in FederationConfig.field_names() if getattr(args, name, None) is not None}
    return FederationConfig.from_mapping(flags, base=base)


#: settings a resumed run may change (everything else must be what the checkpoint's run had)
RESUMABLE = ("rounds", "resume", "overwrite", "round-timeout", "min-clients", "min-reply-fraction", "max-failed-rounds",
             "after-stop", *PLACEMENT_SETTINGS)


def previous_run(cfg: FederationConfig) -> list[str]:
    """What of another run is in ``cfg``'s output folder (results, checkpoint, client databases)."""
    out = Path(cfg.output_dir)
    found = [name for name in ("results.json", "checkpoint/state.json") if (out / name).is_file()]
    if any(p.is_file() for p in cfg.client_state_dir.glob("client-*.db")):
        found.append(f"client databases in {cfg.client_state_dir}")
    return found


def _prepare_output(cfg: FederationConfig) -> Path:
    """Check that the run may use ``cfg.output_dir`` (and write there) and clear a run it replaces; before Ray
    starts."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder; give a folder (it is created if needed)")
    if cfg.resume:
        state = out / "checkpoint" / "state.json"
        if not state.is_file():
            raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume to start a new run")
        saved = json.loads(state.read_text())["results"]["config"]
        now = json.loads(json.dumps(cfg.to_run_config()))
        changed = [k for k in now if k not in RESUMABLE and k in saved and saved[k] != now[k]]
        if changed:
            listed = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed[:6])
            raise ConfigError(f"--resume continues the run in {out}, but these settings differ from it: {listed}; "
                              "give the run's own settings (only rounds, round-timeout, min-clients, min-reply-fraction, "
                              "max-failed-rounds, after-stop and where it runs: ray-address, actor-* may change), or "
                              "start a new run without --resume")
        _check_writable(cfg)
        return out
    found = previous_run(cfg)
    if found and not cfg.overwrite:
        raise ConfigError(f"{out} holds another run ({', '.join(found)}); pass --resume to continue it, "
                          "--overwrite to replace it, or --output-dir for a new folder")
    _check_writable(cfg)  # before anything of the run it replaces is removed
    for name in ("results.json", "results.csv", "curve.png"):
        if (out / name).is_file():
            (out / name).unlink()
    if (out / "checkpoint").is_dir():
        for name in ("model.npz", "server.npz", "state.json"):
            (out / "checkpoint" / name).unlink(missing_ok=True)
    # remove only the previous run's client databases: the state folder may be one the user
    # also keeps other files in (``--output-dir .`` from the repo root has ./clients = the package)
    # a site's ledger, and the global model kept beside it with the record of the site's reply to it
    for pattern in ("client-*.db*", "client-*.global.npz", "client-*.reply.json"):
        for path in cfg.client_state_dir.glob(pattern):
            if path.is_file():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_writable(cfg: FederationConfig) -> None:
    """:class:`~fedal.exceptions.OutputError` now, if the run could not write its results or its clients' databases."""
    writable_folder(cfg.output_dir, what=f"--output-dir {cfg.output_dir}")
    writable_folder(cfg.client_state_dir, what=f"--state-dir {cfg.client_state_dir}" if cfg.state_dir else
                    f"the clients' state folder {cfg.client_state_dir} (--output-dir)")


def baseline_config(cfg: FederationConfig, baseline: str) -> FederationConfig:
    """The run of ``--baseline``: ``cfg`` with the ``baseline`` strategy, in ``<output-dir>/baseline-<name>``
    (:class:`ConfigError` for a strategy name that is not registered, before the main run)."""
    try:
        return cfg.replace(strategy=baseline, strategy_options="", output_dir=str(Path(cfg.output_dir) /
                           f"baseline-{baseline}"), state_dir="", resume=False, overwrite=True)
    except ConfigError as exc:
        raise ConfigError(f"--baseline {baseline}: {exc}") from None


def stopped_before(cfg: FederationConfig) -> dict | None:
    """With ``--resume``: the stopping record of the checkpointed run if a criterion already fired (which,
    after which round, at how many labels), else None."""
    state = Path(cfg.output_dir) / "checkpoint" / "state.json"
    if not cfg.resume or not state.is_file():
        return None
    return json.loads(state.read_text()).get("stopped")


def summary_table(rounds: list[dict]) -> str:
    """Markdown table of the run, one line per round, with its KPIs (:func:`server.app.round_kpis`):
    labels per accuracy point since round 1, the batch's diversity against random, the labels' class
    balance and the self-trained pool samples."""
    lines = ["| round | labels | queried | accuracy | labels/pt | batch diversity | class balance | self-trained | "
             "clients |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rounds:
        queried = sum(c["queried"] for c in r["clients"].values())
        kpi = r.get("kpi", {})
        auto = sum(c.get("auto_labeled", 0) for c in r["clients"].values())
        lines.append(f"| {r['round']} | {r['labels']} | {queried} | {r['accuracy']:.4f} | "
                     f"{cell(kpi.get('queries_per_point'), '.1f')} | {cell(kpi.get('batch_diversity'), '.2f')} | "
                     f"{cell(kpi.get('label_entropy'), '.2f')} | {auto} | {len(r['clients'])} |")
    return "\n".join(lines)


def budget_lines(rounds: list[dict]) -> list[str]:
    """A line for each round that asked fewer labels than its budget sent, or that was not aggregated."""
    lines = []
    for r in rounds:
        sent, asked = r.get("budget_sent", 0), sum(c["queried"] for c in r["clients"].values())
        lost = sent - sum(c["budget"] for c in r["clients"].values())  # sent to sites whose report did not come
        if asked < sent:
            lines.append(f"round {r['round']}: asked {asked} of the {sent} labels its budget sent"
                         + (f"; {lost} went to sites that failed and are carried to the next query round" if lost
                            else " (the sites' pools had no more to ask)"))
        if r.get("aggregated") is False:
            lines.append(f"round {r['round']}: not aggregated: the model of the round before stayed (see its event)")
    return lines


def run_simulate(args: argparse.Namespace) -> int:
    from fedal.federation import check_federation, partition_table

    cfg = config_from_args(args)
    if args.baseline:  # a typo must not wait for the end of the main run
        baseline_config(cfg, args.baseline)
    # every check that can fail runs before the output folder is touched or Ray starts
    ds = check_federation(cfg)
    table = partition_table(cfg)
    out = _prepare_output(cfg)
    if (stopped := stopped_before(cfg)) is not None:
        said = (f"the run in {out} stopped asking for labels after round {stopped['round']}: {stopped['criterion']} "
                f"({stopped['labels']} labels)")
        if cfg.after_stop == "end":
            print(f"fedal simulate: {said}, and ended there (--after-stop end): there is nothing to resume; its "
                  f"results are in {out / 'results.json'}. To train the remaining rounds without queries, resume "
                  "with --after-stop continue")
            return 0
        print(f"fedal simulate: {said}; resuming with --after-stop continue: the remaining rounds up to "
              f"{cfg.rounds} train without queries")
    print(f"fedal simulate: {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} test, {ds.n_classes} classes), "
          f"{cfg.clients} clients, {cfg.partition}"
          + (f"(alpha={cfg.alpha})" if cfg.partition == "dirichlet" else "")
          + f", strategy {cfg.strategy}, budget {cfg.round_budget}/round ({cfg.budget_policy}), "
          f"{cfg.rounds} rounds, "
          + {"head": "head pipeline (fixed features, summed LDA statistics)",
             "handover": f"handover pipeline (the head, then the network once better; {cfg.aggregation})"}.get(
              cfg.pipeline, f"network pipeline ({cfg.aggregation})"))
    if note := cfg.verify_note():
        print(f"note: {note}")
    print("per-client class counts (training pool + local test):")
    print(table)
    from simulations.engine import SimulationRuntime

    with SimulationRuntime(verbose=args.verbose) as runtime:  # the baseline's run reuses Ray and the actors
        return _run_and_report(args, cfg, out, runtime)


def _run_and_report(args: argparse.Namespace, cfg: FederationConfig, out: Path, runtime) -> int:
    """Run the federation (and the baseline) in ``runtime``; print the table of rounds; return the exit code."""
    start = time.perf_counter()
    try:
        stopped = _run_with_progress(cfg, runtime)
    except KeyboardInterrupt:  # the second Ctrl-C: stopped at once, within the round under way
        return _interrupted(args, cfg, out, at_once=True)
    elapsed = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {"rounds": []}
    rounds = results["rounds"]
    if stopped:
        return _interrupted(args, cfg, out, at_once=False)
    ended = bool(rounds) and bool(rounds[-1].get("stopped")) and cfg.after_stop == "end"
    done = rounds[-1]["round"] if rounds else 0  # with eval-every > 1 not every round has a row
    if done < cfg.rounds and not ended:
        print(f"fedal simulate: only {done} of {cfg.rounds} rounds finished; see {out}", file=sys.stderr)
        return 1
    print(summary_table(rounds))
    last = rounds[-1]
    print(f"final: {last['labels']} labels, accuracy {last['accuracy']:.4f} after {last['round']} rounds "
          f"in {elapsed:.1f} s")
    for event in results.get("events", []):
        print(f"  round {event['round']}: {event['kind']} {event['detail']}")
    for line in budget_lines(rounds):
        print(line)
    for r in rounds:
        if r.get("stopped"):
            s = r["stopped"]
            print(f"stopped asking for labels after round {s['round']}: {s['criterion']} ({s['labels']} labels; "
                  f"{s['labels_saved']} labels of {s['query_rounds_skipped']} more query rounds not asked"
                  + ("; the run ended there)" if cfg.after_stop == "end" else ")"))
    if args.baseline:
        return _run_baseline(cfg, args.baseline, rounds, runtime)
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'curve.png'}")
    return 0


def _interrupted(args: argparse.Namespace, cfg: FederationConfig, out: Path, *, at_once: bool) -> int:
    """Say where a Ctrl-C left the run and the command that continues it, as it was invoked; return 130."""
    state = out / "checkpoint" / "state.json"
    done = json.loads(state.read_text())["round"] if state.is_file() else 0
    typed = [a for a in getattr(args, "argv", ["simulate"]) if a not in ("--overwrite", "--resume")]
    again = " ".join([getattr(args, "prog", "fedal"), *(shlex.quote(a) for a in typed)])
    if done == 0:
        how = "stopped at once (second Ctrl-C)" if at_once else "interrupted"
        print(f"fedal simulate: {how} before any round finished: there is nothing to resume. Start again "
              f"with:\n  {again} --overwrite", file=sys.stderr)
        return 130
    if at_once:
        said = f"stopped at once (second Ctrl-C); the checkpoint in {out} holds round {done} of {cfg.rounds}"
    else:
        said = f"interrupted after round {done} of {cfg.rounds}; the checkpoint in {out} holds it"
    print(f"fedal simulate: {said}. Continue with:\n  {again} --resume", file=sys.stderr)
    return 130


def _run_baseline(cfg: FederationConfig, baseline: str, rounds: list[dict], runtime) -> int:
    """The same federation with the ``baseline`` strategy, in ``<output-dir>/baseline-<name>``; both
    curves go to ``<output-dir>/curve.png``."""
    from server.results import plot_curves, run_title

    base = baseline_config(cfg, baseline)
    _prepare_output(base)
    print(f"baseline: the same federation with strategy {base.strategy}")
    try:
        if _run_with_progress(base, runtime):
            return 130
    except KeyboardInterrupt:  # the second Ctrl-C: the main run's results stay as they are
        print(f"fedal simulate: the baseline was stopped at once; the run's results are in {cfg.output_dir}",
              file=sys.stderr)
        return 130
    other = json.loads((Path(base.output_dir) / "results.json").read_text())["rounds"]
    if len(other) < base.rounds:
        print(f"fedal simulate: the baseline finished only {len(other)} rounds; see {base.output_dir}", file=sys.stderr)
        return 1
    print(f"baseline {base.strategy}: {other[-1]['labels']} labels, accuracy {other[-1]['accuracy']:.4f}")
    path = Path(cfg.output_dir) / "curve.png"
    plot_curves({cfg.strategy: rounds, base.strategy: other}, path, title=run_title(cfg.to_run_config()))
    print(f"wrote {path} ({cfg.strategy} next to {base.strategy})")
    return 0


@contextlib.contextmanager
def stop_on_ctrl_c(command: str):
    """While inside: the first Ctrl-C asks the server to stop after the round under way
    (:data:`server.app.STOP_REQUESTED`; that round is not recorded, the checkpoint holds the last finished one),
    a second one raises :class:`KeyboardInterrupt` at once. ``command`` names the command in the message.

    Yields an event of its own that stays set after the block if Ctrl-C came; the server's flag is cleared on the
    way out, so a later run in the same process (a test session, a notebook) is not stopped before its first round."""
    import signal
    import threading

    from server import app as server_app

    asked = threading.Event()

    def interrupt(signum, frame):
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        server_app.STOP_REQUESTED.set()
        print(f"\n{command}: stopping after the round under way (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    server_app.STOP_REQUESTED.clear()
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)
        server_app.STOP_REQUESTED.clear()


def _run_with_progress(cfg: FederationConfig, runtime) -> bool:
    """Run the federation in ``runtime`` (a :class:`~simulations.engine.SimulationRuntime`) with a progress bar;
    return True if Ctrl-C stopped it early (:func:`stop_on_ctrl_c`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from server import app as server_app

    progress = Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)
    with stop_on_ctrl_c("fedal simulate") as stop, progress:
        task = progress.add_task("starting Ray..." if runtime.runs == 0 else "starting...", total=cfg.rounds)

        def on_round(row: dict) -> None:
            progress.update(task, completed=row["round"],
                            description=f"labels {row['labels']:>5d}  accuracy {row['accuracy']:.3f}")

        server_app.ROUND_HOOKS.append(on_round)
        try:
            runtime.run(cfg)
        finally:
            server_app.ROUND_HOOKS.remove(on_round)
        return stop.is_set()
