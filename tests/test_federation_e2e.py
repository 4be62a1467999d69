"""A real federation on Flower's Simulation Engine: learning, budgets, result files, client databases.

The run is ``federation_helpers.audited_run`` (3 clients, 3 rounds of digits, shared with the
privacy audit). ``budget-policy = pool`` with FedProx runs through ``fedal simulate`` in
``test_simulate_cli.py`` (one Ray start fewer).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from federation_helpers import audited_run, client_db_summary

from fedal.federation import client_data

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run():
    return audited_run()


def test_results_json_has_config_and_one_row_per_round(run):
    cfg, results, _ = run
    assert results["config"] == cfg.to_run_config()
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    for row in results["rounds"]:
        assert {"round", "labels", "accuracy", "clients"} <= set(row)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert set(row["clients"]) == {"0", "1", "2"}
        for entry in row["clients"].values():
            counts = {"budget", "queried", "labeled", "labels_added", "pending", "unlabeled", "auto_labeled",
                      "requests_made", "requests_answered", "labels_reviewed", "offline_budget", "offline_spent",
                      "offline_deducted", "dp_releases"}
            assert set(entry) == counts | {"mean_uncertainty", "train_loss", "auto_correct", "answer_seconds",
                                           "batch_diversity", "label_entropy"}
            assert all(isinstance(entry[k], int) for k in counts)
            assert entry["train_loss"] is None or entry["train_loss"] >= 0
            assert entry["mean_uncertainty"] is None or 0 <= entry["mean_uncertainty"] <= 1
        assert row["labels"] == sum(c["labeled"] for c in row["clients"].values())
    assert results.get("events", []) == []  # no failed or rejected client


def test_global_model_learns(run):
    _, results, _ = run
    rounds = results["rounds"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[-1]["labels"] > rounds[0]["labels"]


def test_budgets_are_split_exactly_and_never_overspent(run):
    cfg, results, _ = run
    for row in results["rounds"]:
        clients = row["clients"].values()
        for c in clients:
            assert 0 <= c["queried"] <= c["budget"], row
        if cfg.is_query_round(row["round"]):
            assert sum(c["budget"] for c in clients) == cfg.round_budget, row
            assert sum(c["queried"] for c in clients) == cfg.round_budget, row  # pools are large enough
        else:
            assert all(c["budget"] == 0 for c in clients), row
    first = results["rounds"][0]
    assert all(c["labeled"] == cfg.initial_labels for c in first["clients"].values())


def test_labels_grow_by_what_was_queried(run):
    _, results, _ = run
    rounds = results["rounds"]
    for prev, cur in zip(rounds, rounds[1:]):
        for cid, c in cur["clients"].items():
            assert c["labeled"] == prev["clients"][cid]["labeled"] + c["queried"]


def test_csv_and_curve_are_written(run):
    cfg, results, _ = run
    out = Path(cfg.output_dir)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert [int(r["labels"]) for r in rows] == [r["labels"] for r in results["rounds"]]
    assert [round(float(r["accuracy"]), 4) for r in rows] == [round(r["accuracy"], 4) for r in results["rounds"]]
    assert (out / "curve.png").read_bytes()[:8] == PNG_MAGIC
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["round"] == 3
    assert (out / "checkpoint" / "model.npz").is_file()


def test_client_databases_hold_exactly_the_reported_labels(run):
    cfg, results, _ = run
    last = results["rounds"][-1]["clients"]
    dbs = sorted(cfg.client_state_dir.glob("client-*.db"))
    assert [p.name for p in dbs] == ["client-0.db", "client-1.db", "client-2.db"]
    total = 0
    for cid in range(cfg.clients):
        db = client_db_summary(cfg.client_state_dir / f"client-{cid}.db")
        assert db["labels"] == last[str(cid)]["labeled"]
        total += db["labels"]
        assert db["requests"].get(0) == cfg.initial_labels  # the initial set, asked once
        for row in results["rounds"]:
            reported = row["clients"][str(cid)]
            assigned, spent = db["budgets"][row["round"]]
            assert (assigned, spent) == (reported["budget"], reported["queried"])
            assert db["requests"].get(row["round"], 0) == reported["queried"]
        assert db["labels"] <= len(client_data(cfg, cid).y_pool)
    assert total == results["rounds"][-1]["labels"]

