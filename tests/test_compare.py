"""``fedal compare``: the label-efficiency metrics, the presets and a tiny end-to-end run
on the Simulation Engine (digits, 2 strategies x 2 seeds x 2 rounds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from simulations.cli import main
from simulations.compare import (
    aulc,
    centralized_run,
    labels_to_reach,
    load_preset,
    markdown_table,
    summarize,
)

PRESETS = Path(__file__).resolve().parents[1] / "simulations" / "presets"


def test_aulc_is_the_mean_accuracy_over_the_label_range():
    assert aulc([0, 10, 20], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert aulc([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx((5 + 20) / 30)
    assert aulc([7], [0.3]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        aulc([0, 1], [0.5])


def test_labels_to_reach_interpolates_the_first_crossing():
    assert labels_to_reach([100, 200, 300], [0.5, 0.7, 0.9], 0.6) == pytest.approx(150)
    assert labels_to_reach([100, 200, 300], [0.5, 0.9, 0.7], 0.8) == pytest.approx(175)  # first crossing
    assert labels_to_reach([100, 200], [0.8, 0.9], 0.7) == 100
    assert labels_to_reach([100, 200], [0.5, 0.6], 0.7) is None


def test_summary_saving_and_reference_gap():
    curves = {"random": [([100, 200, 300], [0.5, 0.6, 0.7]), ([100, 200, 300], [0.5, 0.6, 0.7])],
              "smart": [([100, 200, 300], [0.5, 0.8, 0.9]), ([100, 200, 300], [0.5, 0.8, 0.9])],
              "bad": [([100, 200, 300], [0.4, 0.5, 0.6]), ([100, 200, 300], [0.4, 0.5, 0.6])]}
    ref = ("centralized-smart", [([100, 200, 300], [0.6, 0.9, 0.95])])
    s = summarize(curves, reference=ref)
    assert s["random"]["target_accuracy"] == pytest.approx(0.7)
    assert s["smart"]["labels_to_target"] == pytest.approx(100 + 100 * (0.2 / 0.3))
    assert s["smart"]["saving_pct"] == pytest.approx(100 * (1 - s["smart"]["labels_to_target"] / 300))
    assert s["bad"]["labels_to_target"] is None and s["bad"]["seeds_reaching"] == 0
    assert s["smart"]["gap_to_reference"] == pytest.approx(0.9 - 0.95)
    # paired by seed: smart's area minus random's area, the same in both seeds
    assert s["smart"]["aulc_vs_random_mean"] == pytest.approx(0.15) and s["smart"]["aulc_vs_random_std"] == pytest.approx(0)
    assert s["smart"]["seeds_aulc_above_random"] == 2 and s["bad"]["seeds_aulc_above_random"] == 0
    assert s["random"]["aulc_vs_random_mean"] == 0 and s["random"]["seeds_aulc_above_random"] == 0
    table = markdown_table(s)
    assert "| +15.0 +- 0.0 pt (2/2 above) |" in table
    assert "not reached" in table and table.index("centralized-smart") < table.index("| random")
    assert "say nothing here" not in table  # random's curve rose
    with pytest.raises(ConfigError, match="random"):
        summarize({"smart": curves["smart"]})


def test_a_flat_random_curve_is_flagged_not_reported_as_a_saving():
    # random stuck at chance (a constant predictor): every curve "reaches" 0.5 at once
    curves = {"random": [([40, 80, 120], [0.5, 0.5, 0.5])], "entropy": [([40, 80, 120], [0.5, 0.6, 0.55])]}
    s = summarize(curves)
    assert s["entropy"]["labels_to_target"] == 40
    assert "saving say nothing here" in markdown_table(s)


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.toml")))
def test_presets_load(preset):
    cfg, options = load_preset(str(PRESETS / preset))
    assert isinstance(cfg, FederationConfig)
    assert "random" in options["strategies"] and len(options["seeds"]) >= 2
    if preset != "digits_tiny.toml":
        assert cfg.clients == 10 and cfg.partition == "dirichlet" and cfg.alpha in (0.1, 100.0)
        assert len(options["seeds"]) >= 3


def test_bad_preset_and_flags_are_explained(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[fedal]\ndataset = "digits"\n[compare]\nstrategy = ["random"]\n')
    with pytest.raises(ConfigError, match="unknown \\[compare\\] keys"):
        load_preset(str(bad))
    assert main(["compare", "--preset", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", "--strategies", "entropy,margin", "--output-dir", str(tmp_path)]) == 2
    assert "must include 'random'" in capsys.readouterr().err
    assert main(["compare", "--strategies", "random,nope", "--output-dir", str(tmp_path)]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


def test_centralized_reference_starts_from_the_federation_initial_labels():
    cfg = FederationConfig(dataset="digits", clients=3, initial_labels=5, round_budget=20, rounds=3,
                           local_epochs=1, min_local_steps=5, strategy="entropy")
    rows = centralized_run(cfg)
    assert [r["labels"] for r in rows] == [15, 35, 55]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


@pytest.mark.parametrize("initial_strategy", ["random", "typiclust"])
def test_the_centralized_initial_set_is_what_each_client_site_labels_in_round_one(tmp_path, initial_strategy):
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.messages import TrainInstruction
    from simulations.compare import initial_labeled_ids

    cfg = FederationConfig(dataset="digits", clients=3, initial_labels=6, initial_strategy=initial_strategy,
                           local_epochs=1, min_local_steps=1, output_dir=str(tmp_path), seed=4)
    expected = initial_labeled_ids(cfg)
    for client in range(cfg.clients):
        site = ClientSite(cfg, NodeConfig.from_mapping({"partition-id": client}))
        try:
            state = site.model.get_state()
            site.train(state, TrainInstruction(1, 0))
            assert sorted(site.pool.labeled_ids().tolist()) == sorted(expected[client].tolist())
        finally:
            site.close()


def test_compare_gives_each_strategy_its_own_options(tmp_path):
    from simulations.compare import run_config

    base = FederationConfig(dataset="digits", strategy="bald", strategy_options="n_samples=5")
    options = {"typiclust": "k_neighbors=3"}
    assert run_config(base, "bald", 0, tmp_path, options).query_strategy().n_samples == 5  # the base's own
    assert run_config(base, "typiclust", 0, tmp_path, options).query_strategy().k_neighbors == 3
    assert run_config(base, "random", 0, tmp_path, options).strategy_options == ""  # bald's are not random's


def test_tiny_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--preset", str(PRESETS / "digits_tiny.toml"), "--output-dir", str(out)]
    assert main(args) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["strategies"] == ["random", "entropy"] and result["seeds"] == [0, 1]
    for name in ("random", "entropy"):
        assert len(result["runs"][name]) == 2
        for seed in (0, 1):
            run = json.loads((out / "runs" / f"{name}-seed{seed}" / "results.json").read_text())
            assert run["config"]["strategy"] == name and run["config"]["seed"] == seed
            assert [r["labels"] for r in run["rounds"]] == [30, 60]
    # same federation for every strategy: round 1 (initial labels + training) is identical per seed
    for seed in (0, 1):
        assert result["runs"]["random"][seed]["accuracy"][0] == result["runs"]["entropy"][seed]["accuracy"][0]
    assert result["centralized"]["name"] == "centralized-entropy"
    assert set(result["summary"]) == {"random", "entropy", "centralized-entropy"}
    md = (out / "compare.md").read_text()
    assert "saving vs random" in md and "centralized-entropy" in md
    assert "Saving at every budget" in md and "| strategy | labels / point | answered |" in md
    kpi = result["summary"]["entropy"]["kpi"]
    assert kpi["oracle_answered"] == 1.0 and 0 < kpi["label_entropy"] <= 1  # a simulated oracle answers all
    png = (out / "compare.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) < 200_000
    # a second call reuses the finished runs
    capsys.readouterr()
    assert main(args + ["--centralized", "none"]) == 0
    assert capsys.readouterr().out.count("reused") == 4


def test_savings_by_budget_has_one_entry_per_label_count_the_last_trained():
    from simulations.compare import savings_by_budget

    # eval-every gives two rows at 145 labels (before the next query and at an eval-every round): one column
    rows = savings_by_budget([50, 145, 145, 240], [0.5, 0.6, 0.7, 0.8], [50, 145, 145, 240], [0.5, 0.6, 0.7, 0.8])
    assert [r["budget"] for r in rows] == [50, 145, 240]
    assert rows[1]["target"] == 0.7


def test_ctrl_c_stops_a_comparison_after_the_round_under_way_and_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import simulations.engine
    from server import app as server_app

    ran = []

    class Runtime:  # the Simulation Engine's runtime, without Ray: the first run gets a Ctrl-C in its round
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, cfg):
            ran.append(cfg.strategy)
            os.kill(os.getpid(), signal.SIGINT)  # the handler sets the flag; the server stops after the round
            assert server_app.STOP_REQUESTED.is_set()

    monkeypatch.setattr(simulations.engine, "SimulationRuntime", Runtime)
    previous = signal.getsignal(signal.SIGINT)
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", str(PRESETS / "digits_tiny.toml"), "--output-dir", str(out)]) == 130
    assert ran == ["random"]  # no run started after it
    err = capsys.readouterr().err
    assert "stopping after the round under way" in err
    assert "stopped after the round under way in run random seed 0 (0 of" in err and "the same command goes on" in err
    assert signal.getsignal(signal.SIGINT) is previous  # Ctrl-C is the shell's again
    assert not server_app.STOP_REQUESTED.is_set()  # a later run in this process is not stopped before round 1
