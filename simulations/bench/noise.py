"""Benchmark: how label noise and sites of mixed reliability change what active learning saves.

The same ``fedal compare`` (one preset, its strategies and seeds) is run once per oracle setting:
no noise, uniform noise of 10% and 30%, neighbouring-class noise of 30%, sites of mixed reliability
(half the sites answer 60% wrong), and the same noisy settings with a noise-robust measure: a second
reading (another reader of the same site, as noisy as the first) wherever the first answer disagrees
with a global model at least ``--verify-threshold`` confident. Each setting's runs go to
``<runs>/<setting>``; finished runs are reused, so an interrupted benchmark continues.

Writes ``simulations/results/bench_noise.{md,json}``: per setting and strategy the final accuracy,
AULC, the paired AULC difference to random and the saving against random (labels to reach random's
final accuracy under the *same* oracle), and the second readings the measure asked for.

    .venv/bin/python -m simulations.bench.noise --preset simulations/presets/bloodmnist_a01_noisy.toml
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from simulations.bench.common import ROOT, machine_info, portable

#: oracle settings: slug -> (description, federation settings); "{clients}" sizes client-noise
SETTINGS = {
    "clean": ("no noise", {"noise-rate": 0.0}),
    "uniform-10": ("uniform noise 10%", {"noise-rate": 0.1}),
    "uniform-30": ("uniform noise 30%", {"noise-rate": 0.3}),
    "neighbour-30": ("neighbouring-class noise 30%", {"noise-rate": 0.3, "noise-kind": "neighbour"}),
    "mixed-sites": ("mixed sites: half clean, half 60% wrong", {"client-noise": "mixed:0.6"}),
    "uniform-30-review": ("uniform noise 30% + second readings", {"noise-rate": 0.3, "verify-threshold": "{v}"}),
    "mixed-sites-review": ("mixed sites + second readings", {"client-noise": "mixed:0.6", "verify-threshold": "{v}"}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=str(ROOT / "simulations" / "presets" / "bloodmnist_a01_noisy.toml"))
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--strategies", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the preset's)")
    p.add_argument("--verify-threshold", type=float, default=0.9,
                   help="confidence above which a disagreeing answer gets a second reading (default 0.9)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a federation setting for every run (e.g. rounds=3)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "noise"), help="where each setting's comparison goes")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"), help="where bench_noise.{md,json} go")
    p.add_argument("--name", default="bench_noise", help="file name of the results (default bench_noise)")
    return p.parse_args(argv)


def setting_overrides(slug: str, clients: int, verify_threshold: float) -> list[str]:
    """The ``KEY=VALUE`` overrides of one oracle setting for a federation of ``clients`` sites."""
    out = []
    for key, value in SETTINGS[slug][1].items():
        if value == "mixed:0.6":  # the first half of the sites clean, the second half unreliable
            value = ",".join("0" if c < clients // 2 else "0.6" for c in range(clients))
        elif value == "{v}":
            value = verify_threshold
        out.append(f"{key}={value}")
    return out


def main(argv=None) -> dict:
    from fedal.config import FederationConfig, parse_assignments
    from simulations.compare import load_preset, run_compare

    args = parse_args(argv)
    slugs = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in slugs if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    base, _ = load_preset(args.preset)
    base = FederationConfig.from_mapping(parse_assignments(args.overrides), base=base)
    results: dict = {"args": portable(vars(args)), "machine": machine_info(), "settings": {}}
    started = time.perf_counter()
    for slug in slugs:
        out = Path(args.runs) / slug
        overrides = args.overrides + setting_overrides(slug, base.clients, args.verify_threshold)
        cmd = argparse.Namespace(preset=args.preset, strategies=args.strategies, seeds=args.seeds,
                                 output_dir=str(out), overrides=overrides, centralized="none", rerun=False,
                                 verbose=False)
        print(f"== {slug}: {SETTINGS[slug][0]} ({' '.join(overrides)})", flush=True)
        t0 = time.perf_counter()
        code = run_compare(cmd)
        if code != 0:
            raise SystemExit(f"fedal compare failed for setting {slug} (exit {code}); see {out}")
        compare = json.loads((out / "compare.json").read_text())
        results["settings"][slug] = {"description": SETTINGS[slug][0], "overrides": overrides,
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     "summary": {name: {k: row.get(k) for k in (
                                         "final_mean", "final_std", "aulc_mean", "aulc_vs_random_mean",
                                         "aulc_vs_random_std", "seeds_aulc_above_random", "saving_pct", "seeds",
                                         "kpi")} for name, row in compare["summary"].items()}}
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(results, argv if argv is not None else sys.argv[1:]) + "\n")
    print(markdown(results, argv if argv is not None else sys.argv[1:]))
    return results


def markdown(results: dict, argv: list[str]) -> str:
    """The benchmark's table: one row per setting x strategy."""
    lines = [f"Command: `python -m simulations.bench.noise {' '.join(argv)}`", "",
             "Per oracle setting (mean over seeds): final accuracy, AULC, AULC - random paired by seed, the saving "
             "against random under the same oracle (labels to reach random's final accuracy), random's final accuracy "
             "against the clean setting's, and the second readings asked (mean per run; each is one more answer).", "",
             "| setting | strategy | final accuracy | AULC | AULC - random (paired) | saving vs random | "
             "random vs clean | second readings |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    clean = results["settings"].get("clean", {}).get("summary", {}).get("random", {}).get("final_mean")
    for slug, setting in results["settings"].items():
        rows = setting["summary"]
        for name, r in sorted(rows.items(), key=lambda kv: (kv[0] != "random", -(kv[1]["aulc_mean"] or 0))):
            paired = ("-" if name == "random" else f"{100 * r['aulc_vs_random_mean']:+.1f} +- "
                      f"{100 * r['aulc_vs_random_std']:.1f} pt ({r['seeds_aulc_above_random']}/{r['seeds']})")
            saving = "-" if r["saving_pct"] is None or name == "random" else f"{r['saving_pct']:+.1f}%"
            vs_clean = (f"{100 * (r['final_mean'] - clean):+.1f} pt" if name == "random" and clean is not None
                        and slug != "clean" else "")
            reviews = (r.get("kpi") or {}).get("labels_reviewed")
            lines.append(f"| {setting['description']} | {name} | {r['final_mean']:.4f} +- {r['final_std']:.4f} | "
                         f"{r['aulc_mean']:.4f} | {paired} | {saving} | {vs_clean} | "
                         f"{'-' if not reviews else f'{reviews:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
