"""``fedal compare``: label efficiency of several query strategies on one federation.

Every strategy runs on the same federation (same data, partition, initial labeled sets
and training seeds for a given seed) through the real Simulation Engine, once per
strategy x seed, each run in its own folder ``<output-dir>/runs/<strategy>-seed<k>``.
A centralized active learner (all clients' pools pooled, no federation, same initial
labels and the same total budget per query round) is the reference.

Writes ``compare.json`` (per-seed curves and every number), ``compare.md`` (the
table) and ``compare.png`` (accuracy vs labels, mean and +-1 std over seeds) to
``--output-dir``. Finished runs whose settings did not change are reused, so an
interrupted comparison continues where it stopped (``--rerun`` starts afresh).

Metrics, per strategy:

* final accuracy (mean +- std over seeds) at the final label count;
* AULC: area under the accuracy-vs-labels curve divided by the label range (the
  mean accuracy over the budget, in [0, 1]);
* labels to reach random's final accuracy: first crossing of the seed-mean curve,
  linearly interpolated between rounds ("not reached" if never), and the saving vs
  random's final label count in %; when random's own curve does not rise (it starts at
  or above its final accuracy) the table says the saving is meaningless;
* AULC - random (paired): each seed's AULC minus random's AULC on the same seed (same
  partition and initial labels), mean +- std over seeds and how many seeds are above
  random: the seed-to-seed spread of the federation itself cancels in the difference;
* the gap to centralized AL: final accuracy minus the centralized final accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedal.config import (PLACEMENT_SETTINGS, FederationConfig, canonical_name, format_options, parse_assignments,
                          parse_options)
from fedal.exceptions import ConfigError
from fedal.fileio import read_toml

COMPARE_KEYS = ("strategies", "seeds", "centralized", "strategy-options")
DEFAULT_STRATEGIES = ("random", "entropy")


# ------------------------------------------------------------------ metrics
def aulc(labels: Any, accuracy: Any) -> float:
    """Area under the learning curve divided by the label range (trapezoids), in [0, 1].

    Parameters
    ----------
    labels, accuracy : sequences of float, same length >= 1
        The curve, labels increasing.
    """
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"labels and accuracy must be 1-d and of equal length, got {x.shape} and {y.shape}")
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) / 2.0 * np.diff(x)) / (x[-1] - x[0]))


def labels_to_reach(labels: Any, accuracy: Any, target: float) -> float | None:
    """Labels at which the curve first reaches ``target``, linearly interpolated between the
    two rounds around the crossing; None if it never does.

    Parameters
    ----------
    labels, accuracy : sequences of float, same length
    target : float
    """
    x, y = np.asarray(labels, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    hit = np.flatnonzero(y >= target)
    if len(hit) == 0:
        return None
    i = int(hit[0])
    if i == 0:
        return float(x[0])
    frac = (target - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def summarize(curves: dict[str, list[tuple[list, list]]], baseline: str = "random",
              reference: tuple[str, list[tuple[list, list]]] | None = None) -> dict[str, dict]:
    """Per-strategy numbers from per-seed curves ``{name: [(labels, accuracy), ...]}``.

    Curves of one strategy must have the same number of rounds. ``baseline`` (random)
    sets the target accuracy (its seed-mean final accuracy) and the label count the
    saving is measured against. ``reference`` = ``(name, curves)`` of centralized AL.

    Returns
    -------
    dict
        ``{name: {labels, mean, std, final_mean, final_std, aulc_mean, aulc_std,
        labels_to_target, saving_pct, seeds_reaching, aulc_vs_random_mean, aulc_vs_random_std,
        seeds_aulc_above_random, gap_to_reference}}``; the ``aulc_vs_random`` numbers pair
        each run with random's run of the same seed (``reference`` runs included).
    """
    if baseline not in curves:
        raise ConfigError(f"the comparison needs the baseline strategy {baseline!r}; add it to --strategies")
    out: dict[str, dict] = {}
    every = dict(curves)
    if reference is not None:
        every[reference[0]] = reference[1]
    for name, runs in every.items():
        if not runs:
            continue
        lengths = {len(r[0]) for r in runs}
        if len(lengths) != 1:
            raise ValueError(f"runs of {name} have different numbers of rounds {sorted(lengths)}")
        labels = np.mean([r[0] for r in runs], axis=0)
        acc = np.asarray([r[1] for r in runs], dtype=np.float64)
        areas = [aulc(r[0], r[1]) for r in runs]
        out[name] = {"seeds": len(runs), "labels": labels.tolist(), "mean": acc.mean(axis=0).tolist(),
                     "std": acc.std(axis=0).tolist(), "final_mean": float(acc[:, -1].mean()),
                     "final_std": float(acc[:, -1].std()), "aulc_mean": float(np.mean(areas)),
                     "aulc_std": float(np.std(areas))}
    base = out[baseline]
    target, base_labels = base["final_mean"], base["labels"][-1]
    base_runs = curves[baseline]
    for name, row in out.items():
        need = labels_to_reach(row["labels"], row["mean"], target)
        row["target_accuracy"] = target
        row["labels_to_target"] = need
        row["saving_pct"] = None if need is None else 100.0 * (1.0 - need / base_labels)
        runs = every[name]
        per_seed = [labels_to_reach(r[0], r[1], b[1][-1]) for r, b in zip(runs, base_runs)]
        row["labels_to_target_per_seed"] = per_seed
        row["seeds_reaching"] = sum(v is not None for v in per_seed)
        # paired by seed (same partition and initial labels): is the strategy's curve above random's?
        diffs = [aulc(*r) - aulc(*b) for r, b in zip(runs, base_runs)]
        row["aulc_vs_random_mean"] = float(np.mean(diffs))
        row["aulc_vs_random_std"] = float(np.std(diffs))
        row["seeds_aulc_above_random"] = sum(d > 0 for d in diffs)
        if reference is not None and reference[0] in out:
            row["gap_to_reference"] = row["final_mean"] - out[reference[0]]["final_mean"]
        row["savings_by_budget"] = savings_by_budget(row["labels"], row["mean"], base["labels"], base["mean"])
    return out


def savings_by_budget(labels, accuracy, base_labels, base_accuracy) -> list[dict]:
    """At every label count ``b`` of the baseline's (mean) curve: the labels this curve needs to reach the
    baseline's accuracy at ``b``, and the saving ``1 - need / b`` in % (None where it never does).

    Parameters
    ----------
    labels, accuracy : sequences of float
        The strategy's mean curve.
    base_labels, base_accuracy : sequences of float
        The baseline's (random's) mean curve.
    """
    out = []
    last = dict(zip(base_labels, base_accuracy))  # several rows at one label count (eval-every): the last trained
    for b, target in last.items():
        need = labels_to_reach(labels, accuracy, target)
        out.append({"budget": float(b), "target": float(target), "labels": need,
                    "saving_pct": None if need is None or b <= 0 else 100.0 * (1.0 - need / b)})
    return out


def markdown_table(summary: dict[str, dict], baseline: str = "random") -> str:
    """The comparison as a markdown table, best AULC first."""
    target = summary[baseline]["target_accuracy"]
    lines = [f"Target = random's final accuracy {target:.4f} at {summary[baseline]['labels'][-1]:.0f} labels.", "",
             "| strategy | seeds | final labels | final accuracy | AULC | AULC - random (paired) | labels to target | "
             "saving vs random | seeds reaching | vs centralized |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["aulc_mean"]):
        need = "not reached" if r["labels_to_target"] is None else f"{r['labels_to_target']:.0f}"
        saving = "-" if r["saving_pct"] is None else f"{r['saving_pct']:+.1f}%"
        gap = r.get("gap_to_reference")
        lines.append(
            f"| {name} | {r['seeds']} | {r['labels'][-1]:.0f} | {r['final_mean']:.4f} +- {r['final_std']:.4f} | "
            f"{r['aulc_mean']:.4f} +- {r['aulc_std']:.4f} | {100 * r['aulc_vs_random_mean']:+.1f} +- "
            f"{100 * r['aulc_vs_random_std']:.1f} pt ({r['seeds_aulc_above_random']}/{r['seeds']} above) | {need} | {saving} | {r['seeds_reaching']}/{r['seeds']} | "
            + ("-" if gap is None else f"{100 * gap:+.1f} pt") + " |")
    budgets = [s["budget"] for s in summary[baseline]["savings_by_budget"]]
    lines += ["", "Saving at every budget: labels each curve needs to reach random's mean accuracy at that budget, as a "
              "saving against the budget (negative: more labels; - : never reached). Random's own row is not 0 where "
              "its curve dips or flattens: what a strategy saves is what it saves beyond that row.", "",
              "| strategy | " + " | ".join(f"{b:.0f}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["aulc_mean"]):
        cells = ["-" if s["saving_pct"] is None else f"{s['saving_pct']:+.0f}%" for s in r["savings_by_budget"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if baseline_is_flat(summary[baseline]):
        lines += ["", f"Random's mean curve starts at or above its final accuracy ({target:.4f}): every strategy "
                  "'reaches' the target at the first label count, so labels to target and the saving say "
                  "nothing here. Compare the curves and the paired AULC instead."]
    return "\n".join(lines)


def baseline_is_flat(row: dict) -> bool:
    """True when the baseline reaches its own final accuracy at its first label count
    (its curve did not rise), which makes the label saving meaningless."""
    need = row.get("labels_to_target")
    return need is not None and need <= row["labels"][0]


# -------------------------------------------------------------- KPIs
KPI_NAMES = ("queries_per_point", "oracle_answered", "batch_diversity", "label_entropy", "labels_reviewed")


def run_kpis(rounds: list[dict]) -> dict:
    """One run's KPIs: its last round's (labels per point, answered share, label balance) and the mean batch
    diversity over its query rounds."""
    last = rounds[-1].get("kpi", {})
    diversity = [r["kpi"]["batch_diversity"] for r in rounds if r.get("kpi", {}).get("batch_diversity") is not None]
    return {**{k: last.get(k) for k in KPI_NAMES}, "batch_diversity": float(np.mean(diversity)) if diversity else None}


def mean_kpis(runs: list[dict]) -> dict:
    """The mean over runs of each KPI (None where no run measured it)."""
    out = {}
    for key in KPI_NAMES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def kpi_table(summary: dict[str, dict]) -> str:
    """The KPIs per strategy (mean over seeds) as a markdown table."""
    reviews = any((r.get("kpi", {}).get("labels_reviewed") or 0) > 0 for r in summary.values())
    lines = ["KPIs (mean over seeds): labels per accuracy point gained since round 1 (final round), share of requests "
             "answered, diversity of the queried batches against random batches of the same size (mean over query "
             "rounds; 1 = random), class balance of the labels (normalised entropy of each site's labels)"
             + (", second readings asked over the run (each one more answer of a reader)." if reviews else "."), "",
             "| strategy | labels / point | answered | batch diversity | class balance |"
             + (" second readings |" if reviews else ""), "|---|---:|---:|---:|---:|" + ("---:|" if reviews else "")]
    for name, r in sorted(summary.items(), key=lambda kv: -kv[1]["aulc_mean"]):
        if "kpi" not in r:
            continue
        k = r["kpi"]
        fmt = {key: "-" if k.get(key) is None else f"{k[key]:.2f}" for key in KPI_NAMES}
        row = (f"| {name} | {fmt['queries_per_point']} | {fmt['oracle_answered']} | {fmt['batch_diversity']} | "
               f"{fmt['label_entropy']} |")
        if reviews:
            row += " - |" if k.get("labels_reviewed") is None else f" {k['labels_reviewed']:.1f} |"
        lines.append(row)
    return "\n".join(lines)


# -------------------------------------------------------------- centralized
def initial_labeled_ids(cfg: FederationConfig) -> list[np.ndarray]:
    """The pool ids each client of the run ``cfg`` labels first, as its ClientSite picks them.

    The same cold-start strategy and the same seed as the client's learner (its first
    query, :mod:`fedal.seeds`), so the centralized reference starts where the federation does.
    """
    from fedal.seeds import client_seed, query_seed
    from fedal.strategies import QueryContext

    cold = cfg.cold_start_strategy()
    picks = []
    for c, X in enumerate(client_inputs(cfg)):
        n = len(X)
        ctx = QueryContext(np.arange(n), X, labeled_X=X[:0])
        picks.append(cold.query(ctx, min(cfg.initial_labels, n), seed=query_seed(client_seed(cfg.seed, c), 0)))
    return picks


def client_inputs(cfg: FederationConfig) -> list[np.ndarray]:
    """What each client's model sees of its pool (its features, or the inputs as they are)."""
    from fedal.features import featurizer_for, model_inputs
    from fedal.federation import client_data, federation_dataset

    featurizer = featurizer_for(cfg.features, federation_dataset(cfg).input_shape, cfg.pipeline)
    return [model_inputs(featurizer, client_data(cfg, c).X_pool) for c in range(cfg.clients)]


def pooled_oracle(cfg: FederationConfig, parts: list, *, reviewer: bool = False):
    """The oracle of the pooled clients' samples (client 0's pool first, then client 1's, ...): each sample is
    answered by its own site's simulated reader (``reviewer``: its second reader), with the noise it has in
    the federation, so the centralized reference gets the same answers the sites get."""
    from fedal.federation import simulated_oracle
    from fedal.oracle import ShardedOracle

    return ShardedOracle([simulated_oracle(cfg, c, p.y_pool, p.n_classes, reviewer=reviewer)
                          for c, p in enumerate(parts)], [len(p.y_pool) for p in parts])


def centralized_run(cfg: FederationConfig) -> list[dict]:
    """Active learning on the union of the clients' pools, no federation.

    Same initial labeled set as the federation (each client's initial pick reproduced
    with its own seed; with ``pipeline = "handover"`` the reference is its network's), ``round_budget`` labels per query round, one warm-started fit of
    ``local_epochs`` per round (with ``local-steps`` and a server optimiser: the federation's steps on
    batches of all clients' size, :class:`fedal.serveropt.ServerOptimiser`), evaluated on the server's
    test set. Returns one row ``{round, labels, accuracy}`` per evaluated round (``eval-every``).
    """
    import torch

    from fedal.serveropt import SERVER_OPTIMISERS, ServerOptimiser
    from fedal.features import featurizer_for, model_inputs
    from fedal.federation import client_data, federation_dataset
    from fedal.learner import ActiveLearner
    from fedal.models import model_for
    from fedal.oracle import VerifyingOracle
    from fedal.pool import Pool
    from fedal.seeds import reinit_seed

    torch.set_num_threads(1)
    picked = initial_labeled_ids(cfg)  # as the sites pick them, from what their models see
    if cfg.pipeline == "handover":  # one pooled site has no local test sets to hand over on: its network
        cfg = FederationConfig.from_mapping({"pipeline": "network"}, base=cfg)
    ds = federation_dataset(cfg)
    parts = [client_data(cfg, c) for c in range(cfg.clients)]
    inputs = client_inputs(cfg)
    X = np.concatenate(inputs)
    y = np.concatenate([p.y_pool for p in parts])
    X_test = model_inputs(featurizer_for(cfg.features, ds.input_shape, cfg.pipeline), ds.X_test)
    offsets = np.cumsum([0] + [len(p.y_pool) for p in parts])
    initial = [offset + ids for offset, ids in zip(offsets, picked)]
    pool = Pool(ds.n_classes, size=len(y))
    oracle = pooled_oracle(cfg, parts)
    # a run of few local steps with a server optimiser (the network recipe): the pooled reference takes the same
    # steps on batches as large as the federation's (batch-size x clients) with the same server optimiser
    one_site = cfg.pipeline == "network" and cfg.local_steps > 0 and cfg.aggregation in SERVER_OPTIMISERS
    if one_site:
        cfg_model = FederationConfig.from_mapping({"batch-size": cfg.batch_size * cfg.clients}, base=cfg)
        model = model_for(cfg_model, X.shape[1:], ds.n_classes, seed=cfg.seed)
        optimiser = ServerOptimiser(cfg, model.buffer_keys())
    else:
        model = model_for(cfg, X.shape[1:], ds.n_classes, seed=cfg.seed)
    if cfg.verify_threshold > 0:
        second = pooled_oracle(cfg, parts, reviewer=True)

        def confident(ids):
            if not learner.model_ready:
                return None
            probs, _ = model.forward(X[np.asarray(ids, dtype=np.int64)])
            return probs.argmax(axis=1), probs.max(axis=1)

        oracle = VerifyingOracle(oracle, second, confident, cfg.verify_threshold)
    learner = ActiveLearner(model, cfg.query_strategy(), X, pool, oracle, cold_start=cfg.cold_start_strategy(),
                            seed=cfg.seed, X_eval=X_test, y_eval=ds.y_test)
    pool.request(np.concatenate(initial), round=0)
    rows = []
    for server_round in range(1, cfg.rounds + 1):
        if cfg.is_query_round(server_round) and cfg.round_budget > 0 and pool.counts()["unlabeled"] > 0:
            if cfg.reinit:
                model.reset(seed=reinit_seed(cfg.seed, server_round))
            learner.query(min(cfg.round_budget, pool.counts()["unlabeled"]), round=server_round)
        learner.teach(round=server_round)
        if one_site:
            state = model.get_state()
            learner.fit(lr=cfg.lr * optimiser.client_lr_factor(server_round))
            model.set_state(optimiser.step(state, model.get_state(), server_round))
        else:
            learner.fit()
        if not cfg.is_eval_round(server_round):
            continue
        _, acc = learner.evaluate()
        rows.append({"round": server_round, "labels": pool.counts()["labeled"], "accuracy": acc})
    pool.close()
    return rows


# -------------------------------------------------------------------- runs
def run_config(base: FederationConfig, strategy: str, seed: int, out: Path,
               strategy_options: dict[str, str] | None = None) -> FederationConfig:
    """The settings of one strategy x seed run.

    Parameters
    ----------
    base : FederationConfig
        The comparison's federation.
    strategy : str
        The run's query strategy.
    seed : int
        The run's seed.
    out : Path
        The comparison's folder (the run goes to ``runs/<strategy>-seed<seed>``).
    strategy_options : dict, optional
        Strategy name -> its options (``[compare.strategy-options]``); a strategy not named
        there keeps the base's options if it is the base's strategy, else none.
    """
    options = (strategy_options or {}).get(strategy, base.strategy_options if strategy == base.strategy else "")
    return base.replace(strategy=strategy, strategy_options=options, seed=seed,
                        output_dir=str(out / "runs" / f"{strategy}-seed{seed}"), state_dir="", resume=False,
                        overwrite=True)  # its own run folder: an unfinished run there is redone


def finished_rounds(cfg: FederationConfig) -> list[dict] | None:
    """The rounds of an earlier run with exactly these settings (where it ran aside: ``ray-address``, ``actor-*``),
    if it finished."""
    path = Path(cfg.output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    rows = results.get("rounds") or []
    def computed(config) -> dict:
        return {k: v for k, v in (config or {}).items() if k not in PLACEMENT_SETTINGS}

    from simulations.engine import placed

    if (computed(results.get("config")) != computed(json.loads(json.dumps(placed(cfg).to_run_config()))) or not rows
            or rows[-1]["round"] != cfg.rounds):
        return None  # another run's settings, or unfinished (with eval-every > 1 not every round has a row)
    return results["rounds"]


def load_preset(path: str | None) -> tuple[FederationConfig, dict]:
    """``(settings, compare options)`` from the preset TOML at ``path``: a ``[fedal]`` table of
    FederationConfig settings and a ``[compare]`` table (strategies, seeds, centralized, and a
    ``strategy-options`` table: strategy name -> its options)."""
    if path is None:
        return FederationConfig(), {}
    if not Path(path).exists():
        raise ConfigError(f"preset {path} does not exist; see simulations/presets/ for the shipped ones")
    data = read_toml(path, what="preset")
    options = data.get("compare", {})
    unknown = sorted(set(options) - set(COMPARE_KEYS))
    if unknown:
        raise ConfigError(f"unknown [compare] keys {unknown} in {path}; known: {', '.join(COMPARE_KEYS)}")
    return FederationConfig.from_mapping(data.get("fedal", {k: v for k, v in data.items() if k != "compare"})), options


def _names(text: str | list, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list")
    return items


def _seeds(text: str | list) -> list[int]:
    try:
        seeds = [int(s) for s in _names(text, "seeds")]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has duplicates: {seeds}")
    return seeds


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="TOML preset: [fedal] settings + [compare] strategies/seeds")
    p.add_argument("--strategies", default=None, help="comma-separated strategies (must include random)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--output-dir", default=None, help="where runs and compare.{json,md,png} go (default runs/compare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a federation setting of the preset, e.g. --set rounds=4 (repeatable)")
    p.add_argument("--centralized", default=None,
                   help="strategy of the centralized reference: a name, 'best' (best AULC, default) or 'none'")
    p.add_argument("--rerun", action="store_true", help="rerun finished runs instead of reusing them")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="run the client actors on this Ray cluster: auto (the one `ray start` started here) or the "
                        "head's HOST:PORT (default: $RAY_ADDRESS, else a Ray of this machine); as --set ray-address=")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def compare_settings(args: argparse.Namespace, base: FederationConfig) -> FederationConfig:
    """The comparison's settings: the preset's ``base`` with ``args``' ``--set`` overrides and ``--ray-address``."""
    overrides = parse_assignments(args.overrides)
    if getattr(args, "ray_address", None) is not None:  # callers that build their own arguments may leave it out
        overrides["ray-address"] = args.ray_address
    return FederationConfig.from_mapping(overrides, base=base)


def _stopped(name: str, seed: int, before: int, total: int, out: Path, *, at_once: bool) -> int:
    """Say where a comparison stopped by Ctrl-C, and how to go on; the exit code (130)."""
    how = "at once, within its round" if at_once else "after the round under way"
    print(f"fedal compare: stopped {how} in run {name} seed {seed} ({before} of {total} runs before it are in {out}); "
          "the same command goes on: finished runs are reused, the stopped one starts again", file=sys.stderr)
    return 130


def run_compare(args: argparse.Namespace) -> int:
    from fedal.strategies import available_strategies
    from simulations.engine import SimulationRuntime
    from simulations.simulate import _prepare_output, stop_on_ctrl_c

    base, options = load_preset(args.preset)
    base = compare_settings(args, base)
    given_data_dir = base.data_dir  # recorded as given: compare.json names no machine's folders
    if base.data_dir and not Path(base.data_dir).is_absolute():  # client processes may run elsewhere
        base = FederationConfig.from_mapping({"data_dir": str(Path(base.data_dir).resolve())}, base=base)
    strategies = _names(args.strategies or options.get("strategies") or ",".join(DEFAULT_STRATEGIES), "strategies")
    seeds = _seeds(args.seeds or options.get("seeds") or "0,1,2")
    for name in strategies:
        if name.replace("-", "_") not in available_strategies():
            raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(available_strategies())}")
    if "random" not in strategies:
        raise ConfigError("--strategies must include 'random': savings are measured against it")
    centralized = str(args.centralized or options.get("centralized", "best"))
    per_strategy = {canonical_name(k): format_options(parse_options(v, f"strategy-options.{k}"))
                    for k, v in options.get("strategy-options", {}).items()}
    for name in strategies:  # a bad option fails here, not in every client process
        run_config(base, name, 0, Path("."), per_strategy).query_strategy()
    from fedal.federation import client_parts, federation_dataset

    for seed in seeds:  # a partition that cannot be drawn fails here, not in every client process
        probe = FederationConfig.from_mapping({"seed": seed}, base=base)
        federation_dataset(probe)
        try:
            client_parts(probe)
        except ConfigError as exc:
            raise ConfigError(f"seed {seed}: {exc} (or pick other --seeds)") from None
    out = Path(args.output_dir or "runs/compare")
    out.mkdir(parents=True, exist_ok=True)

    print(f"fedal compare: {base.dataset}, {base.clients} clients, {base.partition}"
          + (f"(alpha={base.alpha})" if base.partition == "dirichlet" else "")
          + f", {base.rounds} rounds, budget {base.round_budget}/round; strategies {', '.join(strategies)}; "
          f"seeds {seeds}; {len(strategies) * len(seeds)} runs -> {out}")
    for name in strategies:
        if note := run_config(base, name, 0, Path("."), per_strategy).verify_note():
            print(f"note: {note}")
    by_seed: dict[str, dict[int, tuple[list, list]]] = {s: {} for s in strategies}
    kpis: dict[str, dict[int, dict]] = {s: {} for s in strategies}  # each run's last-round KPIs
    timings, failed = {}, []
    todo = [(seed, name) for seed in seeds for name in strategies]
    with SimulationRuntime(verbose=args.verbose) as runtime:  # Ray and the client actors start once for all runs
        for done, (seed, name) in enumerate(todo):
            cfg = run_config(base, name, seed, out, per_strategy)
            rounds = None if args.rerun else finished_rounds(cfg)
            t0 = time.perf_counter()
            if rounds is None:
                _prepare_output(cfg)
                try:
                    with stop_on_ctrl_c("fedal compare") as stop:
                        runtime.run(cfg)
                except RuntimeError as exc:
                    failed.append(f"{name} seed {seed}: {exc}")
                except KeyboardInterrupt:  # the second Ctrl-C
                    return _stopped(name, seed, done, len(todo), out, at_once=True)
                if stop.is_set():
                    return _stopped(name, seed, done, len(todo), out, at_once=False)
                rounds = finished_rounds(cfg)
                if rounds is None:
                    failed.append(f"{name} seed {seed}: did not finish {cfg.rounds} rounds (see {cfg.output_dir})")
                    continue
                status = "ran"
            else:
                status = "reused"
            timings[f"{name}-seed{seed}"] = round(time.perf_counter() - t0, 1)
            by_seed[name][seed] = ([r["labels"] for r in rounds], [r["accuracy"] for r in rounds])
            kpis[name][seed] = run_kpis(rounds)
            print(f"  {name:>14s} seed {seed}: {rounds[-1]['labels']} labels, accuracy "
                  f"{rounds[-1]['accuracy']:.4f} ({status}, {timings[f'{name}-seed{seed}']:.0f} s)", flush=True)
    # per-seed comparisons pair runs by seed: keep the seeds every strategy finished
    complete = [seed for seed in seeds if all(seed in by_seed[name] for name in strategies)]
    if len(complete) < len(seeds):
        print(f"fedal compare: comparing seeds {complete} only; the others have failed runs", file=sys.stderr)
    seeds = complete
    curves = {name: [by_seed[name][seed] for seed in seeds] for name in strategies}
    if not curves["random"]:
        print("fedal compare: no seed finished a run of every strategy; nothing to compare", file=sys.stderr)
        for line in failed:
            print("  " + line, file=sys.stderr)
        return 1

    reference = None
    if centralized != "none":
        if centralized == "best":
            pre = summarize({k: v for k, v in curves.items() if v})
            centralized = max((k for k in pre if k != "random"), key=lambda k: pre[k]["aulc_mean"], default="random")
        t0 = time.perf_counter()
        ref_runs = []
        for seed in seeds:
            rows = centralized_run(run_config(base, centralized, seed, out, per_strategy))
            ref_runs.append(([r["labels"] for r in rows], [r["accuracy"] for r in rows]))
        reference = (f"centralized-{centralized}", ref_runs)
        timings[reference[0]] = round(time.perf_counter() - t0, 1)
        print(f"  centralized {centralized}: final accuracy {np.mean([r[1][-1] for r in ref_runs]):.4f} "
              f"({timings[reference[0]]:.0f} s)")

    summary = summarize({k: v for k, v in curves.items() if v}, reference=reference)
    for name in strategies:  # mean over the compared seeds of each run's KPIs
        summary[name]["kpi"] = mean_kpis([kpis[name][seed] for seed in seeds])
    table = markdown_table(summary) + "\n\n" + kpi_table(summary)
    record = FederationConfig.from_mapping({"data_dir": given_data_dir}, base=base)
    write_outputs(out, record, strategies, seeds, curves, reference, summary, table, timings, failed)
    print(table)
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    for line in failed:
        print("  failed: " + line, file=sys.stderr)
    return 1 if failed else 0


def write_outputs(out: Path, base: FederationConfig, strategies, seeds, curves, reference, summary, table,
                  timings, failed) -> None:
    """compare.json, compare.md and compare.png."""
    from fedal.fileio import atomic_write
    from server.results import plot_curves

    settings = base.to_run_config()
    settings.pop("output-dir", None)
    payload = {"settings": settings, "strategies": strategies, "seeds": seeds,
               "runs": {k: [{"labels": l, "accuracy": a} for l, a in v] for k, v in curves.items()},
               "centralized": None if reference is None else
               {"name": reference[0], "runs": [{"labels": l, "accuracy": a} for l, a in reference[1]]},
               "summary": summary, "seconds": timings, "failed": failed}
    atomic_write(out / "compare.json", json.dumps(payload, indent=2))
    title = (f"{base.dataset}, {base.clients} clients, {base.partition}"
             + (f" alpha={base.alpha}" if base.partition == "dirichlet" else "")
             + f", {len(seeds)} seeds (mean +- std)")
    atomic_write(out / "compare.md", f"# fedal compare: {title}\n\n{table}\n")
    mean_rows, bands = {}, {}
    for name, row in summary.items():
        mean_rows[name] = [{"labels": l, "accuracy": a} for l, a in zip(row["labels"], row["mean"])]
        m, s = np.asarray(row["mean"]), np.asarray(row["std"])
        bands[name] = (m - s, m + s)
    plot_curves(mean_rows, out / "compare.png", title=title, bands=bands)
