"""Benchmark: how far FedAvg trails pooled training on the *same* labels (no active learning).

Active learning chooses which samples get labels; the federation then has to learn from
them. This script takes the query strategy out: every client of a preset's federation
gets the same number of random labels from its own pool, and the same model is trained

* federated: FedAvg (or FedProx) rounds, each client training locally with the preset's
  settings (:meth:`fedal.models.TorchClassifier.fit`, the code the clients run), the
  server taking the example-weighted mean of the weights;
* centralized: the same labels pooled, one warm-started fit per round with the same
  settings (what ``fedal compare``'s centralized reference does);

and prints the test accuracy of both after each round, for one or more training variants.
The difference at equal labels is the part of the federated-vs-centralized gap that no
query strategy can close. Writes ``simulations/results/bench_fl_gap.{md,json}`` (``--name``
changes the file name).

    .venv/bin/python -m simulations.bench.fl_gap --preset simulations/presets/bloodmnist_a01.toml \\
        --labels-per-client 35 --rounds 20 --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from simulations.bench.common import ROOT, machine_info, portable

#: training variants: name -> federation settings that differ from the preset
VARIANTS = {
    "preset": {},
    "fewer local steps (min 10)": {"min-local-steps": 10},
    "fedprox mu 0.1": {"proximal-mu": 0.1},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=str(ROOT / "simulations" / "presets" / "bloodmnist_a01.toml"))
    p.add_argument("--labels-per-client", type=int, default=35, help="random labels each client holds")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--report-rounds", default="1,2,5,10,20", help="rounds shown in the table")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    p.add_argument("--name", default="bench_fl_gap",
                   help="file name (without .md/.json) of the results, e.g. bench_fl_gap_pneumoniamnist")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    args.report_rounds = [r for r in (int(x) for x in args.report_rounds.split(",")) if 1 <= r <= args.rounds]
    return args


def labeled_sets(cfg, per_client: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's random labeled set (at most its pool)."""
    from fedal.federation import client_data

    rng = np.random.default_rng(seed)
    sets = []
    for c in range(cfg.clients):
        d = client_data(cfg, c)
        pick = rng.choice(len(d.y_pool), min(per_client, len(d.y_pool)), replace=False)
        sets.append((d.X_pool[pick], d.y_pool[pick]))
    return sets


def federated_curve(cfg, sets, rounds: int, ds) -> list[float]:
    """Test accuracy of the FedAvg (FedProx with ``cfg.proximal_mu``) model after each round."""
    from fedal.models import model_for
    from fedal.seeds import client_seed

    server = model_for(cfg, ds.input_shape, ds.n_classes, seed=cfg.seed)
    clients = [model_for(cfg, ds.input_shape, ds.n_classes, seed=client_seed(cfg.seed, c)) for c in range(len(sets))]
    curve = []
    for _ in range(rounds):
        state = server.get_state()
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in state.items()}
        n = 0
        for model, (X, y) in zip(clients, sets):
            model.set_state(state)
            model.fit(X, y, proximal_mu=cfg.proximal_mu)
            for k, v in model.get_state().items():
                total[k] += v * len(y)
            n += len(y)
        server.set_state({k: (v / n).astype(state[k].dtype) for k, v in total.items()})
        curve.append(server.evaluate(ds.X_test, ds.y_test)[1])
    return curve


def centralized_curve(cfg, sets, rounds: int, ds) -> list[float]:
    """Test accuracy after each of ``rounds`` warm-started fits on the pooled labels."""
    from fedal.models import model_for

    X = np.concatenate([s[0] for s in sets])
    y = np.concatenate([s[1] for s in sets])
    model = model_for(cfg, ds.input_shape, ds.n_classes, seed=cfg.seed)
    curve = []
    for _ in range(rounds):
        model.fit(X, y)
        curve.append(model.evaluate(ds.X_test, ds.y_test)[1])
    return curve


def table(results: dict) -> str:
    shown = results["report_rounds"]
    lines = [f"Mean test accuracy over seeds {results['seeds']} after round r "
             f"(up to {results['labels_per_client']} random labels per client; labels in all, per seed: "
             f"{', '.join(map(str, results['total_labels']))}).", "",
             "| training | " + " | ".join(f"r={r}" for r in shown) + " | gap to centralized at r=" + f"{shown[-1]} |",
             "|---|" + "---:|" * (len(shown) + 1)]
    central = np.mean(results["curves"]["centralized"], axis=0)
    for name, curves in results["curves"].items():
        mean = np.mean(curves, axis=0)
        gap = 100 * (mean[shown[-1] - 1] - central[shown[-1] - 1])
        lines.append(f"| {name} | " + " | ".join(f"{mean[r - 1]:.3f}" for r in shown)
                     + (" | - |" if name == "centralized" else f" | {gap:+.1f} pt |"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    import torch

    from fedal.config import FederationConfig
    from fedal.federation import federation_dataset
    from simulations.compare import load_preset

    torch.set_num_threads(1)
    args = parse_args(argv)
    base, _ = load_preset(args.preset)
    curves: dict[str, list[list[float]]] = {"centralized": []}
    seconds: dict[str, float] = {}
    total_labels = []
    for seed in args.seeds:
        cfg = FederationConfig.from_mapping({"seed": seed}, base=base)
        ds = federation_dataset(cfg)
        sets = labeled_sets(cfg, args.labels_per_client, seed)
        total_labels.append(sum(len(s[1]) for s in sets))
        t0 = time.perf_counter()
        curves["centralized"].append(centralized_curve(cfg, sets, args.rounds, ds))
        seconds[f"centralized-seed{seed}"] = round(time.perf_counter() - t0, 1)
        for name in args.variants:
            vcfg = FederationConfig.from_mapping(VARIANTS[name], base=cfg)
            t0 = time.perf_counter()
            curves.setdefault(name, []).append(federated_curve(vcfg, sets, args.rounds, ds))
            seconds[f"{name}-seed{seed}"] = round(time.perf_counter() - t0, 1)
            print(f"seed {seed} {name}: final {curves[name][-1][-1]:.4f} "
                  f"(centralized {curves['centralized'][-1][-1]:.4f}), {seconds[f'{name}-seed{seed}']:.0f} s", flush=True)
    results = {"command": "python -m simulations.bench.fl_gap " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info(), "args": portable({k: v for k, v in vars(args).items()}),
               "variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds,
               "labels_per_client": args.labels_per_client, "total_labels": total_labels,
               "report_rounds": args.report_rounds, "curves": curves, "seconds": seconds}
    text = table(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(f"Command: `{results['command']}`\n\n{text}\n")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return results


if __name__ == "__main__":
    main()
