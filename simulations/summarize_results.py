"""One table across several ``fedal compare`` results: which strategy did best where.

Reads each ``compare.json`` given (a file or the folder holding it; by default every
``simulations/results/*/compare.json``), recomputes the numbers from the stored
per-seed curves with :func:`simulations.compare.summarize` (so results written before a
metric was added get it too), and prints one row per comparison::

    python -m simulations.summarize_results simulations/results/bloodmnist_a01 \\
        simulations/results/mnist_a01 --output simulations/results/summary.md

``--against DIR`` instead pairs every strategy of the given comparisons with *another*
comparison's random runs, seed by seed: how a changed setting (a budget policy, say)
does against the original uniform-random baseline::

    python -m simulations.summarize_results --against simulations/results/bloodmnist_a01 \\
        simulations/results/bloodmnist_a01_pool_policy

The "best" strategy of a comparison is the federated strategy (not random, not the
centralized reference) with the largest mean AULC gain over random. The gain is shown
paired by seed (std of the per-seed differences and how many seeds are above random),
which cancels the federation's seed-to-seed spread, so a gain carried by one lucky seed
shows as such. Its label saving and its gap to centralized AL are shown beside it, and
the largest saving of any strategy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedal.exceptions import ConfigError
from simulations.compare import baseline_is_flat, summarize

RESULTS = Path(__file__).resolve().parent / "results"


def load_comparison(path: Path) -> dict:
    """``compare.json`` at ``path`` (or inside the folder ``path``), checked."""
    file = path / "compare.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; pass a compare.json or the folder fedal compare wrote")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc}); rerun fedal compare to rewrite it") from None
    missing = [k for k in ("settings", "runs") if k not in data]
    if missing or "random" not in data.get("runs", {}):
        raise ConfigError(f"{file} is not a fedal compare result (missing {missing or ['runs.random']})")
    data["_name"] = file.parent.name
    return data


def comparison_row(data: dict) -> dict:
    """The cross-comparison numbers of one ``compare.json``."""
    curves = {name: [(r["labels"], r["accuracy"]) for r in runs] for name, runs in data["runs"].items() if runs}
    reference = None
    if data.get("centralized"):
        reference = (data["centralized"]["name"], [(r["labels"], r["accuracy"]) for r in data["centralized"]["runs"]])
    summary = summarize(curves, reference=reference)
    federated = [name for name in curves if name != "random"]
    if not federated:
        raise ConfigError(f"{data['_name']}: only random was run; nothing to compare against it")
    best = max(federated, key=lambda n: summary[n]["aulc_vs_random_mean"])
    savers = [n for n in federated if summary[n]["saving_pct"] is not None]
    top_saver = max(savers, key=lambda n: summary[n]["saving_pct"]) if savers else None
    s = data["settings"]
    rand, row = summary["random"], summary[best]
    return {
        "comparison": data["_name"], "dataset": s["dataset"],
        "alpha": s["alpha"] if s.get("partition") == "dirichlet" else None,
        "seeds": rand["seeds"], "labels": (round(rand["labels"][0]), round(rand["labels"][-1])),
        "random_final": rand["final_mean"], "best": best, "best_final": row["final_mean"],
        "best_aulc_vs_random": (row["aulc_vs_random_mean"], row["aulc_vs_random_std"],
                                row["seeds_aulc_above_random"]),
        "best_saving_pct": row["saving_pct"], "random_flat": baseline_is_flat(rand),
        "top_saver": top_saver, "top_saving_pct": None if top_saver is None else summary[top_saver]["saving_pct"],
        "centralized": None if reference is None else reference[0],
        "centralized_final": None if reference is None else summary[reference[0]]["final_mean"],
        "best_gap_to_centralized": row.get("gap_to_reference"),
    }


def against_rows(data: dict, baseline: dict) -> list[dict]:
    """Each strategy of ``data`` paired seed by seed with the random runs of ``baseline``.

    Both must have the same seeds and start and end at the same label counts (the same
    preset with one setting changed, or another pipeline on the same label schedule: AULC
    is normalised by the label range, labels to a target are interpolated)."""
    seeds, base_seeds = data.get("seeds"), baseline.get("seeds")
    if seeds != base_seeds:
        raise ConfigError(f"{data['_name']} has seeds {seeds} but {baseline['_name']} has {base_seeds}; "
                          "pair comparisons run with the same --seeds")
    base_key = f"{baseline['_name']}/random"  # the baseline of summarize(): target and pairing
    curves = {name: [(r["labels"], r["accuracy"]) for r in runs] for name, runs in data["runs"].items() if runs}
    curves[base_key] = [(r["labels"], r["accuracy"]) for r in baseline["runs"]["random"]]
    for name, runs in curves.items():
        if any((r[0][0], r[0][-1]) != (b[0][0], b[0][-1]) for r, b in zip(runs, curves[base_key])):
            raise ConfigError(f"{data['_name']}/{name} does not start and end at the label counts of "
                              f"{base_key}; pair runs of the same budget")
    summary = summarize(curves, baseline=base_key)
    return [{"comparison": data["_name"], "strategy": name, "seeds": row["seeds"], "final": row["final_mean"],
             "aulc_vs_base": (row["aulc_vs_random_mean"], row["aulc_vs_random_std"], row["seeds_aulc_above_random"]),
             "target": row["target_accuracy"], "labels_to_target": row["labels_to_target"],
             "saving_pct": row["saving_pct"]}
            for name, row in summary.items() if name != base_key]


def against_markdown(rows: list[dict], baseline: str) -> str:
    lines = [f"Paired with the random runs of {baseline} (final accuracy {rows[0]['target']:.4f}).", "",
             f"| comparison | strategy | final accuracy | AULC - {baseline} random (paired) | labels to its final accuracy | saving |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        m, sd, above = r["aulc_vs_base"]
        need = "not reached" if r["labels_to_target"] is None else f"{r['labels_to_target']:.0f}"
        lines.append(f"| {r['comparison']} | {r['strategy']} | {r['final']:.3f} | {100 * m:+.1f} +- {100 * sd:.1f} pt "
                     f"({above}/{r['seeds']}) | {need} | {'-' if need == 'not reached' else _pct(r['saving_pct'])} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "not reached" if value is None else f"{value:+.1f}%"


def markdown(rows: list[dict]) -> str:
    lines = ["| comparison | data, alpha | seeds | labels | random final | best AL strategy (AULC) | its final | "
             "AULC - random, paired | its saving | largest saving | centralized final | best vs centralized |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        m, sd, above = r["best_aulc_vs_random"]
        alpha = "" if r["alpha"] is None else f", {r['alpha']:g}"
        top = "-" if r["top_saver"] is None else f"{r['top_saver']} {_pct(r['top_saving_pct'])}"
        saving = _pct(r["best_saving_pct"])
        if r["random_flat"]:  # random's curve never rose: every curve "reaches" its final accuracy at once
            saving = top = "n/a (random flat)"
        central = "-" if r["centralized_final"] is None else f"{r['centralized_final']:.3f} ({r['centralized']})"
        gap = "-" if r["best_gap_to_centralized"] is None else f"{100 * r['best_gap_to_centralized']:+.1f} pt"
        lines.append(
            f"| {r['comparison']} | {r['dataset']}{alpha} | {r['seeds']} | {r['labels'][0]} -> {r['labels'][1]} | "
            f"{r['random_final']:.3f} | {r['best']} | {r['best_final']:.3f} | {100 * m:+.1f} +- {100 * sd:.1f} pt "
            f"({above}/{r['seeds']}) | {saving} | {top} | {central} | {gap} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.summarize_results", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="compare.json files or folders (default: simulations/results/*/)")
    p.add_argument("--output", help="also write the table to this markdown file")
    p.add_argument("--against", metavar="DIR",
                   help="pair every strategy of the given comparisons with this comparison's random runs")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths] or sorted(f.parent for f in RESULTS.glob("*/compare.json"))
    if not paths:
        print(f"no compare.json under {RESULTS}; pass the folders fedal compare wrote", file=sys.stderr)
        return 1
    try:
        if args.against:
            base = load_comparison(Path(args.against))
            rows = [row for x in paths for row in against_rows(load_comparison(x), base)]
            table = against_markdown(rows, base["_name"])
        else:
            table = markdown([comparison_row(load_comparison(x)) for x in paths])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
