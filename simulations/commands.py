"""The ``fedal`` subcommands that run the core on its own: ``local``, ``strategies``, ``split``.

Flags and printing live here, above the library; the work is done by :mod:`fedal.local`,
:mod:`fedal.strategies` and :mod:`fedal.sitedata`, imported when a command runs.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from fedal.fileio import atomic_write, writable_folder
from fedal.oracle import NOISE_KINDS


# ------------------------------------------------------------------ fedal local
def add_local_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fedal local`` flags to the parser ``p``."""
    from fedal.data import available_datasets

    p.add_argument("--dataset", default="digits", help=f"one of {available_datasets()} or an .npz path (default digits)")
    p.add_argument("--data-dir", default=None, help="folder with the .npz files (default $FEDAL_DATA_DIR or ./data)")
    p.add_argument("--strategy", default="entropy", help="query strategy (see `fedal strategies`)")
    p.add_argument("--baseline", default="random", help="strategy to compare against (default random)")
    p.add_argument("--initial", type=int, default=20, help="initial labeled set size (default 20)")
    p.add_argument("--budget", type=int, default=20, help="labels per query step (default 20)")
    p.add_argument("--steps", type=int, default=10, help="query steps (default 10)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per step (default 30)")
    p.add_argument("--max-train", type=int, default=None, help="subsample the training pool")
    p.add_argument("--noise", type=float, default=0.0, help="simulated oracle label-noise rate")
    p.add_argument("--noise-kind", default="uniform", choices=NOISE_KINDS,
                   help="uniform: any wrong class; neighbour: class y-1 or y+1 (default uniform)")
    p.add_argument("--unsure", type=float, default=0.0,
                   help="share of samples the simulated oracle answers 'unsure' (not asked again)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-when", default="", help="stop early when one of these holds: plateau, uncertainty, budget")
    p.add_argument("--stop-patience", type=int, default=3, help="steps without gain before plateau fires (default 3)")
    p.add_argument("--stop-min-delta", type=float, default=0.005, help="accuracy gain that counts for plateau")
    p.add_argument("--stop-uncertainty", type=float, default=0.1, help="mean pool uncertainty below which it stops")
    p.add_argument("--total-budget", type=int, default=0,
                   help="labels in all, the --initial set included (so at least --initial); the curve stops when "
                        "they are spent, with or without --stop-when budget (default 0 = no cap)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the curves, the settings and why each curve stopped to this JSON file "
                        "(an existing folder, or a path ending in /, gets local.json inside it)")


def run_local(args: argparse.Namespace) -> int:
    """Run ``fedal local`` with the parsed ``args``; print the table, return 0."""
    from fedal.data import load_dataset
    from fedal.local import format_table, run_curve
    from fedal.stopping import criteria_from
    from fedal.strategies import get_strategy

    for flag in ("initial", "budget", "steps", "epochs"):
        least = 0 if flag == "steps" else 1
        if getattr(args, flag) < least:
            raise ConfigError(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    for name in (args.strategy, args.baseline):  # fail on a typo before minutes of training
        get_strategy(name)
    if args.total_budget < 0:
        raise ConfigError(f"--total-budget must be >= 0 (0 = no cap), got {args.total_budget}")
    if 0 < args.total_budget < args.initial:
        raise ConfigError(f"--total-budget {args.total_budget} is below the initial labeled set (--initial "
                          f"{args.initial}), and the initial labels count toward it; give --total-budget >= "
                          f"{args.initial}, or a smaller --initial")
    names = args.stop_when
    if args.total_budget and "budget" not in [n.strip() for n in names.split(",")]:
        names = ",".join(n for n in (names, "budget") if n)  # a total budget is a cap of its own
    stopping = criteria_from(names, patience=args.stop_patience, min_delta=args.stop_min_delta,
                             uncertainty=args.stop_uncertainty, total_budget=args.total_budget)
    out = _local_out_path(args.out) if args.out else None
    dataset = load_dataset(args.dataset, args.data_dir, seed=args.seed, max_train=args.max_train)
    print(f"on-device active learning: {dataset.name}, {len(dataset.y_train)} pool samples, "
          f"{dataset.n_classes} classes; initial {args.initial}, {args.steps} steps of {args.budget}")
    curves, stopped = {}, {}
    for name in dict.fromkeys([args.strategy, args.baseline]):
        start = time.perf_counter()
        curves[name], reason = run_curve(dataset, name, initial=args.initial, budget=args.budget, steps=args.steps,
                                         seed=args.seed, epochs=args.epochs, noise_rate=args.noise, noise_kind=args.noise_kind,
                                         unsure_rate=args.unsure, stopping=stopping)
        stopped[name] = reason
        print(f"  {name}: {time.perf_counter() - start:.1f} s" + (f"; stopped early: {reason}" if reason else ""))
    shortest = min(len(c) for c in curves.values())  # a criterion may stop one curve before the other
    print(format_table({name: c[:shortest] for name, c in curves.items()}))
    if out is not None:
        settings = {k: v for k, v in vars(args).items() if k not in ("argv", "prog")}  # how it was typed: not a setting
        atomic_write(out, json.dumps(_finite({"config": settings, "stopped": stopped,
                                              "curves": {k: [asdict(r) for r in v] for k, v in curves.items()}}),
                                     indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    return 0


def _local_out_path(given: str) -> Path:
    """The file ``--out`` names: the path itself, or ``local.json`` in an existing folder / one ending in /."""
    path = Path(given).expanduser()
    if path.is_dir() or given.endswith(("/", "\\")):
        path = path / "local.json"
    folder = next(p for p in path.parents if p.exists())  # checked now, not after minutes of training
    if not folder.is_dir():
        raise ConfigError(f"--out {given}: {folder} is a file, not a folder; give another path")
    if path.is_dir():
        raise ConfigError(f"--out {given}: {path} is a folder; give a file name, or the folder with a / at the end")
    writable_folder(path.parent, what=f"--out {given}")  # a read-only folder fails now, not after the whole run
    return path


def _finite(value):
    """``value`` with NaN and infinities as None (null): results files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------ fedal strategies
def add_strategies_arguments(p: argparse.ArgumentParser) -> None:
    """``fedal strategies`` takes no flags; ``p`` is left as it is."""


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring ``doc``, its lines joined and its reST markup dropped.

    A sentence ends at a full stop followed by a capital letter or the end of the first
    paragraph (so "eq. 2" and "et al." inside parentheses do not cut it).
    """
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n", 1)[0].splitlines())
    paragraph = re.sub(r":\w+:`~?([^`]+)`", r"\1", paragraph).replace("``", "")
    match = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(?=\s+[A-Z]|\s*$)", paragraph)
    return paragraph[: match.start() + 1] if match else paragraph


def run_strategies(args: argparse.Namespace) -> int:
    """Print every registered strategy name with the first sentence of its docstring (``args`` unused)."""
    from fedal.strategies import available_strategies, strategy_class

    for name in available_strategies():
        print(f"{name:20s} {first_sentence(strategy_class(name).__doc__ or '')}")
    return 0


# ------------------------------------------------------------------ fedal split
SPLIT_FIELDS = ("dataset", "data_dir", "max_train", "clients", "partition", "alpha", "classes_per_client",
                "local_test_fraction", "seed")


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal split`` to ``parser``."""
    defaults = FederationConfig()
    for name in SPLIT_FIELDS:
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"as in fedal simulate (default {value!r})")
    parser.add_argument("--config", help="TOML file with settings (flags override it)")
    parser.add_argument("--out", required=True, help="folder for site-<id>.npz (or the folders site-<id>/)")
    parser.add_argument("--format", default="npz", choices=("npz", "png", "dicom"),
                        help="npz: one file per site; png / dicom: a folder of image files per site, as a hospital "
                             "holds them (site-<id>/pool, site-<id>/test; labels in class subfolders or labels.csv)")
    parser.add_argument("--no-labels", action="store_true",
                        help="leave the pool labels out (sites whose people label; no simulated oracle)")


def run_split(args: argparse.Namespace) -> int:
    """Write the site files for the parsed ``args`` and print what each holds."""
    import numpy as np

    from fedal.sitedata import load_site, split_sites

    cfg = FederationConfig.from_toml(args.config) if args.config else FederationConfig()
    given = {k: getattr(args, k) for k in SPLIT_FIELDS if getattr(args, k) is not None}
    if given.get("clients", cfg.min_clients) < cfg.min_clients:
        given["min_clients"] = given["clients"]  # the split does not care how many must answer a round
    if given:
        cfg = FederationConfig.from_mapping(given, base=cfg)
    writable_folder(args.out, what=f"--out {args.out}")
    paths = split_sites(cfg, args.out, include_labels=not args.no_labels, fmt=args.format)
    if args.format != "npz":
        for path in paths:
            pool = sum(1 for p in (path / "pool").rglob("*") if p.suffix in (".png", ".dcm"))
            test = sum(1 for p in (path / "test").rglob("*") if p.suffix in (".png", ".dcm"))
            print(f"{path}: {pool} pool images, {test} local test images ({args.format}); a SuperNode reads it with "
                  f"--node-config 'data-path=\"{path / 'pool'}\" test-path=\"{path / 'test'}\"'")
        return 0
    for cid, path in enumerate(paths):
        site = load_site(path, cid)
        counts = np.bincount(site.y_pool[site.y_pool >= 0], minlength=site.n_classes)
        classes = "pool labels left out" if args.no_labels else f"pool classes {counts.tolist()}"
        print(f"{path}: {len(site.y_pool)} pool samples, {len(site.y_test)} local test samples, {classes}")
    return 0


# ------------------------------------------------------------------ fedal scan
def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal scan`` to ``parser``."""
    parser.add_argument("--data-path", required=True, help="the site's folder of images (the node config's data-path)")
    parser.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (the records and the image cache)")
    parser.add_argument("--client-id", type=int, default=0, help="the SuperNode's client-id (default 0)")
    parser.add_argument("--labels-csv", default="", help="the CSV (path,label) of labels already given "
                        "(default <data-path>/labels.csv)")
    parser.add_argument("--test-path", default="", help="a folder of labeled images as the local test set")
    parser.add_argument("--config", help="the run's TOML settings (dataset, input-size, resize-policy)")
    defaults = FederationConfig()
    parser.add_argument("--dataset", default=None, help=f"the run's data set: its classes (default {defaults.dataset!r})")
    parser.add_argument("--input-size", type=int, default=None, help="the run's input size (default: the data set's)")
    parser.add_argument("--resize-policy", default=None, choices=("pad", "crop"), help="default pad")


def run_scan(args: argparse.Namespace) -> int:
    """Read the folder of the parsed ``args`` as its site will (new and changed files only) and print what it found:
    files read, refused with their reasons, classes, sizes, labels already given."""
    from clients.node import NodeConfig
    from fedal.sitedata import load_folder_site

    cfg = FederationConfig.from_toml(args.config) if args.config else FederationConfig()
    given = {k: getattr(args, k) for k in ("dataset", "input_size", "resize_policy") if getattr(args, k) is not None}
    if given:
        cfg = FederationConfig.from_mapping(given, base=cfg)
    node = NodeConfig.from_mapping({"client-id": args.client_id, "data-path": args.data_path,
                                    "labels-csv": args.labels_csv, "test-path": args.test_path})
    if not node.folder:
        raise ConfigError(f"--data-path {args.data_path} is not a folder; fedal scan reads a site's folder of images")
    pool, test = node.site_folders()
    data, gone, reports = load_folder_site(cfg, pool, args.state_dir, args.client_id, labels_csv=args.labels_csv,
                                           test_path=test)
    for report in reports:
        print("\n".join(report.lines(most_refused=10 ** 6)))
    size = data.input_shape
    print(f"pool: {len(data.y_pool) - len(gone)} samples ({len(gone)} gone) at {size[1]}x{size[2]}x{size[0]} "
          f"({cfg.resize_policy}), {int((data.y_pool >= 0).sum())} with a label; local test set: {len(data.y_test)}")
    return 0
