"""Scale benchmark of the query strategies.

(a) Selection: pick ``--budget`` samples from a pool of ``--pool-size`` x ``--dim`` float32
    embeddings (seeded Gaussian mixture, 10-class softmax probabilities) with coreset,
    badge, density and typiclust. Each strategy runs in a fresh subprocess so its peak
    resident memory is its own: extra RSS = peak (VmHWM, reset via /proc/self/clear_refs)
    minus RSS before the query; a second run under tracemalloc gives numpy's traced peak.
(b) Scoring: entropy / margin / least-confidence queries through ``fedal.models.TorchClassifier``
    wrapping ``SmallCNN`` on BloodMNIST images tiled to ``--cnn-samples``, against the bare
    forward pass of the same module (``torch.inference_mode``, same batch size).

Usage::

    python simulations/bench/strategies.py            # full: 100,000 x 128, budget 1,000; 50,000 images
    python simulations/bench/strategies.py --quick    # small, a few seconds

Results go to ``simulations/results/bench_strategies.{json,md}`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from simulations.bench.common import machine_info, portable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SELECTION_STRATEGIES = ("coreset", "badge", "density", "typiclust")
SCORING_STRATEGIES = ("entropy", "margin", "least_confidence")
N_CLASSES = 10


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class LinearSoftmaxView:
    """Model view whose embeddings are the inputs and probabilities a fixed linear softmax."""

    n_classes = N_CLASSES

    def __init__(self, dim: int, seed: int) -> None:
        self.w = np.random.default_rng(seed).normal(size=(dim, N_CLASSES)).astype(np.float32) * 0.3

    def forward(self, X):
        z = X @ self.w
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        return z / z.sum(axis=1, keepdims=True), X


def mixture(n: int, dim: int, seed: int, n_components: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(n_components, dim)).astype(np.float32)
    x = rng.standard_normal(size=(n, dim), dtype=np.float32)
    x += means[rng.integers(n_components, size=n)]
    return x


def run_selection_worker(name: str, pool_size: int, dim: int, budget: int, n_labeled: int, seed: int) -> dict:
    """One strategy in this (fresh) process: time, extra peak RSS, traced numpy peak."""
    from fedal.strategies import QueryContext, get_strategy

    pool = mixture(pool_size, dim, seed)
    # typiclust is a cold start: it gets an empty labeled set (budget clusters)
    labeled = mixture(n_labeled, dim, seed + 1) if n_labeled and name != "typiclust" else None
    model = None if name == "typiclust" else LinearSoftmaxView(dim, seed)

    def context():
        ctx = QueryContext(ids=np.arange(pool_size), X=pool, model=model, labeled_X=labeled)
        if model is not None:  # the model's forward pass is not the strategy's cost
            ctx.probs(), ctx.labeled_embeddings()
        return ctx

    ctx = context()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = proc_status_kb("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    chosen = get_strategy(name).query(ctx, budget, seed=seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rss_extra_mb = (proc_status_kb("VmHWM") - rss_before) / 1024

    ctx = context()
    tracemalloc.start()
    again = get_strategy(name).query(ctx, budget, seed=seed)
    traced_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {
        "strategy": name, "pool_size": pool_size, "dim": dim, "budget": budget, "n_labeled": n_labeled,
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "peak_rss_extra_mb": round(rss_extra_mb, 1),
        "traced_peak_mb": round(traced_peak_mb, 1), "distinct": int(len(np.unique(chosen))),
        "deterministic": bool(np.array_equal(chosen, again)),
    }


def bench_selection(args) -> list[dict]:
    rows = []
    for name in SELECTION_STRATEGIES:
        cmd = [sys.executable, __file__, "--worker", name, "--pool-size", str(args.pool_size), "--dim", str(args.dim),
               "--budget", str(args.budget), "--n-labeled", str(args.n_labeled), "--seed", str(args.seed)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {name:<10} {rows[-1]['seconds']:8.2f} s wall {rows[-1]['cpu_seconds']:8.2f} s CPU "
              f"{rows[-1]['peak_rss_extra_mb']:8.1f} MB", flush=True)
    return rows


def load_images(path: Path, n: int) -> tuple[np.ndarray, str]:
    """BloodMNIST images (all splits) tiled/cut to ``n``, NCHW float32 in [0, 1]."""
    if path.exists():
        with np.load(path) as data:
            images = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
        source = f"BloodMNIST ({len(images)} images) tiled to {n}"
    else:
        images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8)
        source = f"random uint8 images ({path} not found)"
    images = images[np.arange(n) % len(images)]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0, source


def bench_scoring(args) -> dict:
    import torch

    from fedal.models import SmallCNN, TorchClassifier
    from fedal.strategies import QueryContext, get_strategy

    X, source = load_images(Path(args.data), args.cnn_samples)
    model = TorchClassifier(lambda: SmallCNN(3, 8), 8, epochs=1, predict_batch_size=args.batch_size, seed=args.seed)
    model.fit(X[:1000], np.arange(1000) % 8)  # trained weights; timings do not depend on them
    module = model.module.eval()

    def bare_forward() -> None:
        with torch.inference_mode():
            for start in range(0, len(X), args.batch_size):
                module(torch.from_numpy(X[start : start + args.batch_size]))

    def timed(fn) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    ids = np.arange(len(X))
    runs = {"bare_forward": bare_forward} | {
        name: (lambda s=get_strategy(name): s.query(QueryContext(ids=ids, X=X, model=model), args.budget, seed=0))
        for name in SCORING_STRATEGIES
    }
    names = list(runs)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    bare_forward()  # warm-up
    for r in range(args.repeats):  # interleaved, order rotated, so drift and order effects hit every row alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(runs[name]))
    wall = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
    cpu = {k: float(np.median([t[1] for t in v])) for k, v in times.items()}
    return {
        "data": source, "n_samples": len(X), "batch_size": args.batch_size, "budget": args.budget,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "median_wall_seconds": {k: round(v, 3) for k, v in wall.items()},
        "median_cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "all_wall_cpu_seconds": {k: [[round(w, 3), round(c, 3)] for w, c in v] for k, v in times.items()},
        "wall_ratio_to_bare_forward": {k: round(wall[k] / wall["bare_forward"], 3) for k in SCORING_STRATEGIES},
        "cpu_ratio_to_bare_forward": {k: round(cpu[k] / cpu["bare_forward"], 3) for k in SCORING_STRATEGIES},
    }



def write_markdown(path: Path, results: dict) -> None:
    m, s = results["machine"], results["scoring"]
    lines = [
        "# Strategy benchmark", "",
        f"Command: `{results['command']}`", "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']}, scikit-learn {m['sklearn']}, {m['platform']}. Load average (1/5/15 min) "
        f"at start {results['load_average_1_5_15min']['start']}, at end {results['load_average_1_5_15min']['end']} "
        f"(other jobs shared the {m['nproc']} CPUs when above ~{m['nproc']}).", "",
        f"## (a) Selection: {results['args']['budget']:,} from {results['args']['pool_size']:,} x "
        f"{results['args']['dim']} float32 embeddings", "",
        f"Core-set starts from {results['args']['n_labeled']:,} labeled centres; BADGE and density use "
        f"{N_CLASSES}-class probabilities; typiclust clusters the embeddings (model-free cold start: empty "
        "labeled set, `budget` clusters). Extra memory: peak "
        "RSS during the query minus RSS before it (fresh process per strategy); traced: tracemalloc peak "
        "(numpy allocations). Target: < 1 GB extra.", "",
        "| strategy | wall (s) | CPU (s) | peak extra RSS (MB) | tracemalloc peak (MB) | distinct | deterministic |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r['strategy']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_extra_mb']:.1f} "
              f"| {r['traced_peak_mb']:.1f} | {r['distinct']} | {r['deterministic']} |" for r in results["selection"]]
    lines += [
        "", f"## (b) Uncertainty scoring vs bare forward pass ({s['data']})", "",
        f"`TorchClassifier(SmallCNN)`, batch size {s['batch_size']}, budget {s['budget']}, "
        f"{s['torch_threads']} torch threads, medians of {s['repeats']} interleaved runs each (order rotated). "
        "A query = the adapter's forward (probabilities + embeddings) + scoring + top-k. Target ratio <= 1.2. "
        "CPU time is the process's user + system time over all its threads: the fairer measure when other "
        "jobs share the machine (see the load averages above).", "",
        "| what | wall (s) | CPU (s) | wall ratio | CPU ratio |", "|---|---:|---:|---:|---:|",
        f"| bare forward (`torch.inference_mode`) | {s['median_wall_seconds']['bare_forward']:.2f} "
        f"| {s['median_cpu_seconds']['bare_forward']:.2f} | 1.00 | 1.00 |",
    ]
    lines += [f"| {k} query | {s['median_wall_seconds'][k]:.2f} | {s['median_cpu_seconds'][k]:.2f} "
              f"| {s['wall_ratio_to_bare_forward'][k]:.2f} | {s['cpu_ratio_to_bare_forward'][k]:.2f} |"
              for k in SCORING_STRATEGIES]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (10,000 x 64 pool, 5,000 images)")
    parser.add_argument("--pool-size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1_000)
    parser.add_argument("--n-labeled", type=int, default=1_000, help="labeled centres for core-set")
    parser.add_argument("--cnn-samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bloodmnist.npz"))
    parser.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    parser.add_argument("--worker", choices=SELECTION_STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = run_selection_worker(args.worker, args.pool_size, args.dim, args.budget, args.n_labeled, args.seed)
        print(json.dumps(row))
        return
    if args.quick:
        args.pool_size, args.dim, args.budget, args.n_labeled, args.cnn_samples = 10_000, 64, 100, 100, 5_000
    load_before = os.getloadavg()
    print(f"(a) selecting {args.budget} from {args.pool_size} x {args.dim}", flush=True)
    selection = bench_selection(args)
    print(f"(b) scoring {args.cnn_samples} images", flush=True)
    scoring = bench_scoring(args)
    print("  wall ratios", scoring["wall_ratio_to_bare_forward"], "CPU ratios", scoring["cpu_ratio_to_bare_forward"])
    results = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
               "machine": machine_info(), "args": portable({k: v for k, v in vars(args).items() if k != "worker"}),
               "load_average_1_5_15min": {"start": [round(x, 2) for x in load_before],
                                          "end": [round(x, 2) for x in os.getloadavg()]},
               "selection": selection, "scoring": scoring}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_strategies.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out / "bench_strategies.md", results)
    print(f"wrote {out / 'bench_strategies.md'}")


if __name__ == "__main__":
    main()
