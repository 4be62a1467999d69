"""One site with its own 10,000 image files: the time to read and cache them, and a round's time and peak memory.

The files are BloodMNIST training images (``--data-dir``), enlarged from 28 x 28 to ``--file-size`` pixels
(bicubic) and written as PNG files in class subfolders and as DICOM files (8-bit RGB Secondary Capture), as a
hospital's export would hold them. Then, each in its own process (so that its peak memory is its own):

* ``scan``: a first read of the folder into the site's cache at each ``--sizes`` (PNG; DICOM at the largest),
  and a second scan with nothing new (what every message of a deployment pays);
* ``round``: a site (``clients.site.ClientSite``, a simulated oracle, the labels the files' folders give taken
  as ground truth) opened on the cached folder, one round that asks for the initial labels and one that asks for
  ``--budget`` more and trains, for the head pipeline and the network pipeline (ConvNet, 5 local epochs) at
  each size: seconds of the second round and the process's peak resident memory.

Usage::

    python -m simulations.bench.site_images                      # 10,000 images, sizes 28 64 128
    python -m simulations.bench.site_images --images 2000 --sizes 28 64

Writes ``simulations/results/bench_site_images.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simulations.bench.common import machine_info, portable

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="folder with bloodmnist.npz")
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--file-size", type=int, default=128, help="side of the written files (enlarged from 28)")
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128], help="input sizes of the run")
    p.add_argument("--budget", type=int, default=50, help="labels asked in the measured round")
    p.add_argument("--initial-labels", type=int, default=200)
    p.add_argument("--work", default="", help="folder for the files (default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "simulations" / "results"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ the files
def write_files(args, work: Path) -> dict:
    """Write the PNG and DICOM folders; return their sizes and the seconds it took."""
    from PIL import Image

    from fedal.data import MEDMNIST_CLASSES, load_dataset
    from fedal.sitedata import _write_dicom

    ds = load_dataset("bloodmnist", args.data_dir, seed=0)
    n = min(args.images, len(ds.X_train))
    names = MEDMNIST_CLASSES["bloodmnist"]
    start = time.perf_counter()
    for i in range(n):
        small = np.rint(ds.X_train[i] * 255).astype(np.uint8).transpose(1, 2, 0)
        big = Image.fromarray(small).resize((args.file_size, args.file_size), Image.BICUBIC)
        folder = work / "png" / names[int(ds.y_train[i])]
        folder.mkdir(parents=True, exist_ok=True)
        big.save(folder / f"{i:06d}.png")
        (work / "dicom").mkdir(exist_ok=True)
        _write_dicom(work / "dicom" / f"{i:06d}.dcm", np.asarray(big).transpose(2, 0, 1))
    with open(work / "dicom" / "labels.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{i:06d}.dcm,{names[int(ds.y_train[i])]}\n" for i in range(n)))

    def megabytes(folder):
        return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)

    return {"images": n, "seconds": round(time.perf_counter() - start, 1), "png_mb": megabytes(work / "png"),
            "dicom_mb": megabytes(work / "dicom")}


def _child(argv: list[str]) -> dict:
    """Run one measurement in this process and return it (``--child scan|round ...``)."""
    kind, folder, state, size = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3])
    from fedal.config import FederationConfig

    if kind == "scan":
        from fedal.sitedata import load_folder_site

        cfg = FederationConfig(dataset="bloodmnist", input_size=size)
        start = time.perf_counter()
        _, _, reports = load_folder_site(cfg, folder, state, 0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        _, _, again = load_folder_site(cfg, folder, state, 0)
        second = time.perf_counter() - start
        cache = sum(p.stat().st_size for p in state.glob("*.u8"))
        return {"first_s": round(first, 2), "rescan_s": round(second, 3), "read": reports[0].read,
                "refused": len(reports[0].refused), "rescan_read": again[0].read, "cache_mb": round(cache / 1e6, 1),
                "peak_mb": _peak_mb()}
    pipeline, budget, initial = argv[4], int(argv[5]), int(argv[6])
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.messages import TrainInstruction

    extra = {"network": "convnet", "local_epochs": 5} if pipeline == "network" else {}
    cfg = FederationConfig(dataset="bloodmnist", input_size=size, pipeline=pipeline, clients=2, min_clients=2,
                           initial_labels=initial, round_budget=budget, strategy="margin", **extra)
    node = NodeConfig.from_mapping({"client-id": 0, "data-path": str(folder), "state-dir": str(state),
                                    "oracle": "simulated"})
    times = []
    state_dict = None
    for server_round in (1, 2):
        start = time.perf_counter()
        site = ClientSite(cfg, node)
        try:
            state_dict = state_dict or site.model.get_state()
            arrays, report = site.train(state_dict, TrainInstruction(server_round, budget))
            if pipeline == "network":
                state_dict = arrays
        finally:
            site.close()
        times.append(time.perf_counter() - start)
    return {"round1_s": round(times[0], 1), "round2_s": round(times[1], 1), "labels": report.num_examples,
            "peak_mb": _peak_mb()}


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)


def measure(*argv) -> dict:
    out = subprocess.run([sys.executable, "-m", "simulations.bench.site_images", "--child", *map(str, argv)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{argv}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child)))
        return {}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fedal-bench-images-"))
    results = {"command": "python -m simulations.bench.site_images " + " ".join(sys.argv[1:]),
               "machine": machine_info(), "args": portable({k: v for k, v in vars(args).items() if k != "child"})}
    try:
        print("writing the files ...", flush=True)
        results["files"] = write_files(args, work)
        print(results["files"], flush=True)
        scans = []
        for fmt, sizes in (("png", args.sizes), ("dicom", [max(args.sizes)])):
            for size in sizes:
                state = work / f"state-{fmt}-{size}"
                row = {"format": fmt, "size": size, **measure("scan", work / fmt, state, size)}
                scans.append(row)
                print(row, flush=True)
        results["scans"] = scans
        rounds = []
        for pipeline in ("head", "network"):
            for size in args.sizes:
                state = work / f"state-round-{pipeline}-{size}"
                shutil.copytree(work / f"state-png-{size}", state)  # the cache read once above
                row = {"pipeline": pipeline, "size": size,
                       **measure("round", work / "png", state, size, pipeline, args.budget, args.initial_labels)}
                rounds.append(row)
                print(row, flush=True)
        results["rounds"] = rounds
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_site_images.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench_site_images.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    m, f = results["machine"], results["files"]
    lines = ["# One site's own image files: read, cache, a round (BloodMNIST files)", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']}; load average at the "
             f"start {m['load_average']}.", "",
             f"Files: {f['images']:,} BloodMNIST training images enlarged to {results['args']['file_size']} px, as PNG "
             f"({f['png_mb']} MB, class subfolders) and DICOM ({f['dicom_mb']} MB, 8-bit RGB, labels.csv); written in "
             f"{f['seconds']} s.", "",
             "| files | input size | first read and cache (s) | per file (ms) | rescan, nothing new (s) | cache (MB) | "
             "peak memory (MB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["scans"]:
        lines.append(f"| {r['format']} | {r['size']} | {r['first_s']} | {1000 * r['first_s'] / max(r['read'], 1):.2f} | "
                     f"{r['rescan_s']} | {r['cache_mb']} | {r['peak_mb']:.0f} |")
    lines += ["", f"A round of one site on the cached PNG folder (simulated oracle, {results['args']['initial_labels']} "
              f"initial labels, then {results['args']['budget']} by margin; network: ConvNet, 5 local epochs), each "
              "in its own process:", "",
              "| pipeline | input size | round 1: open, features, initial labels (s) | round 2: score, ask, train (s) | "
              "peak memory (MB) |", "|---|---:|---:|---:|---:|"]
    for r in results["rounds"]:
        lines.append(f"| {r['pipeline']} | {r['size']} | {r['round1_s']} | {r['round2_s']} | {r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
