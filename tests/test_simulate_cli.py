"""``fedal simulate`` as a user runs it: bad input is refused before anything is written;
``--config`` works and flags win over it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FEDAL = Path(sys.executable).with_name("fedal")  # the venv's console script


def fedal(*args: str, cwd: Path = REPO_ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([str(FEDAL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("flags, words", [
    (["--clients", "0"], "clients must be >= 1, got 0"),
    (["--alpha", "-1"], "alpha must be a finite number > 0"),
    (["--strategy", "nope"], "unknown strategy 'nope'; choose one of"),
    (["--round-budget", "-5"], "round-budget must be >= 0"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--dataset", "bloodmnist", "--data-dir", "{empty}"], "needs bloodmnist.npz in"),
])
def test_bad_values_exit_non_zero_naming_the_problem_and_write_nothing(tmp_path, flags, words):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = fedal("simulate", *[f.format(empty=empty) for f in flags], "--output-dir", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert words in result.stderr
    assert result.stderr.startswith("fedal simulate: error:")
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing written, not even the folder


# the same front door in-process (no interpreter start per case)
@pytest.mark.parametrize("flags, words", [
    (["--clients", "three"], "setting clients must be an int, got 'three'"),
    (["--config", "{tmp}/missing.toml"], "missing.toml does not exist"),
    (["--min-clients", "9", "--clients", "3"], "min-clients must be between 1 and clients (3), got 9"),
    (["--partition", "pathological", "--classes-per-client", "11"], "classes-per-client (11) exceeds the 10 classes"),
    (["--output-dir", ""], "output-dir must not be empty"),
])
def test_more_bad_values_in_process(tmp_path, monkeypatch, capsys, flags, words):
    from simulations.cli import main

    monkeypatch.chdir(tmp_path)  # a relative or empty output dir would land here
    flags = [f.format(tmp=tmp_path) for f in flags]
    if "--output-dir" not in flags:
        flags += ["--output-dir", str(tmp_path / "out")]
    assert main(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert list(tmp_path.iterdir()) == []


def test_unknown_flag_is_an_argparse_error(tmp_path, capsys):
    from simulations.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--round-budgt", "5", "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "unrecognized arguments: --round-budgt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_new_run_removes_only_the_previous_runs_files(tmp_path):
    """Clearing the output folder (--overwrite) must never touch files fedal did not write there."""
    from fedal.config import FederationConfig
    from simulations.simulate import _prepare_output

    out = tmp_path / "out"
    (out / "clients").mkdir(parents=True)
    (out / "checkpoint").mkdir()
    for name in ("results.json", "results.csv", "curve.png", "notes.txt", "clients/client-0.db",
                 "clients/client-0.db-wal", "clients/keep.py", "checkpoint/state.json", "checkpoint/model.npz"):
        (out / name).write_text("x")
    _prepare_output(FederationConfig(output_dir=str(out), overwrite=True))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["clients/keep.py", "notes.txt"]


@pytest.mark.slow
def test_config_file_flags_pool_policy_and_fedprox(tmp_path):
    """``--config`` is read and flags win over it; the run uses ``budget-policy = pool`` and
    FedProx (one federation for both checks: each Ray start costs seconds)."""
    from fedal.config import FederationConfig
    from fedal.federation import client_data

    config = tmp_path / "fed.toml"
    config.write_text('[fedal]\ndataset = "digits"\nclients = 3\nmin-clients = 3\nrounds = 5\n'
                      'round-budget = 30\nbudget-policy = "pool"\npipeline = "network"\naggregation = "fedprox"\n'
                      'proximal-mu = 0.1\nalpha = 0.3\nstrategy = "margin"\n')
    out = tmp_path / "out"
    result = fedal("simulate", "--config", str(config), "--rounds", "2", "--round-budget", "40",
                   "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    # from the flags
    assert (cfg["rounds"], cfg["round-budget"], cfg["output-dir"]) == (2, 40, str(out))
    # from the file
    assert (cfg["clients"], cfg["budget-policy"], cfg["aggregation"], cfg["strategy"]) == (3, "pool", "fedprox", "margin")
    # from the defaults
    assert cfg["local-epochs"] == FederationConfig().local_epochs
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results.get("events", []) == []
    # round 2's budgets follow the unlabeled pools the clients reported after round 1
    budgets = {cid: c["budget"] for cid, c in results["rounds"][1]["clients"].items()}
    assert sum(budgets.values()) == 40
    run_cfg = FederationConfig.from_run_config(cfg)
    left = {str(c): len(client_data(run_cfg, c).y_pool) - run_cfg.initial_labels for c in range(3)}
    assert max(left.values()) > 1.3 * min(left.values())  # skewed enough for the check to mean something
    for cid, budget in budgets.items():
        assert abs(budget - 40 * left[cid] / sum(left.values())) < 1, (budgets, left)
        assert results["rounds"][1]["clients"][cid]["queried"] <= budget
    # what the user sees
    assert "per-client class counts" in result.stdout
    assert ("| round | labels | queried | accuracy | labels/pt | batch diversity | class balance | self-trained | "
            "clients |") in result.stdout
    assert "final:" in result.stdout and str(out / "results.json") in result.stdout
    assert sorted(p.name for p in (out / "clients").iterdir() if p.suffix == ".db") == [
        "client-0.db", "client-1.db", "client-2.db"]


@pytest.mark.slow
def test_federated_stopping_on_a_plateau_keeps_training_without_queries(tmp_path):
    out = tmp_path / "out"
    result = fedal("simulate", "--clients", "3", "--min-clients", "3", "--rounds", "6", "--round-budget", "30",
                   "--stop-when", "plateau", "--stop-patience", "1", "--stop-min-delta", "0.5", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]  # after_stop = continue
    stopped = [r for r in rounds if r.get("stopped")]
    assert len(stopped) == 1 and stopped[0]["round"] == 3  # the second query round cannot gain 50 points
    assert "accuracy plateaued" in stopped[0]["stopped"]["criterion"]
    assert stopped[0]["stopped"]["labels_saved"] == 3 * 30 and stopped[0]["stopped"]["query_rounds_skipped"] == 3
    assert all(sum(c["budget"] for c in r["clients"].values()) == 0 for r in rounds[3:])
    assert rounds[-1]["labels"] == rounds[2]["labels"]


@pytest.mark.slow
def test_a_total_budget_caps_the_last_round_and_ends_the_run(tmp_path):
    out = tmp_path / "out"
    result = fedal("simulate", "--clients", "3", "--min-clients", "3", "--rounds", "8", "--round-budget", "30",
                   "--initial-labels", "10", "--total-budget", "80", "--stop-when", "budget", "--after-stop", "end",
                   "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["labels"] for r in rounds] == [30, 60, 80]  # the third round gets the 20 left, then the run ends
    assert rounds[-1]["stopped"]["criterion"] == "label budget of 80 spent"
