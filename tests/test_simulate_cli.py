"""``fedal simulate`` as a user runs it: bad input is refused before anything is written;
``--config`` works and flags win over it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    (["--secure-aggregation"], "rows of 64 values in [0, 1] have norms up to 8"),  # digits' raw rows: no bound
    (["--secure-aggregation", "--aggregation", "krum", "--pipeline", "network"], "needs every site's update"),
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


# ------------------------------------------------------------------ issue 21.11, 21.12
def test_the_command_to_run_again_is_the_one_invoked(monkeypatch, tmp_path):
    import types

    from simulations import cli

    script = tmp_path / ".venv" / "bin" / "fedal"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    plain = types.ModuleType("__main__")  # a console script's __main__ has no spec
    monkeypatch.setitem(sys.modules, "__main__", plain)
    monkeypatch.setattr(sys, "argv", [".venv/bin/fedal", "simulate"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv is not activated
    assert cli.invoked_as() == ".venv/bin/fedal"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # activated: `fedal` is this script
    assert cli.invoked_as() == "fedal"
    runner = types.ModuleType("__main__")
    runner.__spec__ = cli.__spec__  # python -m simulations.cli
    monkeypatch.setitem(sys.modules, "__main__", runner)
    assert cli.invoked_as() == f"{sys.executable} -m simulations.cli"


@pytest.mark.parametrize("done, words", [
    (2, ["stopped at once (second Ctrl-C)", "holds round 2 of 40", "Continue with:\n  fedal simulate "
         "--clients 2 --rounds 40 --output-dir {out} --resume\n"]),
    (0, ["before any round finished: there is nothing to resume", "--output-dir {out} --overwrite\n"]),
])
def test_a_second_ctrl_c_prints_how_to_continue(tmp_path, monkeypatch, capsys, done, words):
    """Issue 21.11: the second Ctrl-C stops at once and still says what the checkpoint holds and how to go on."""
    from simulations import simulate
    from simulations.cli import main

    out = tmp_path / "out"

    def second_ctrl_c(cfg, runtime):
        if done:
            (out / "checkpoint").mkdir(parents=True)
            (out / "checkpoint" / "state.json").write_text(json.dumps({"round": done}))
        raise KeyboardInterrupt

    monkeypatch.setattr(simulate, "_run_with_progress", second_ctrl_c)
    assert main(["simulate", "--clients", "2", "--rounds", "40", "--output-dir", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    for w in words:
        assert w.format(out=out) in err, err


def test_simulate_says_when_verify_threshold_cannot_make_second_readings(tmp_path, monkeypatch, capsys):
    """Issue 21.12: --verify-threshold with an uncertainty strategy is said to make almost no second reading."""
    from simulations import simulate
    from simulations.cli import main

    monkeypatch.setattr(simulate, "_run_with_progress", lambda cfg, runtime: True)
    main(["simulate", "--strategy", "margin", "--verify-threshold", "0.9", "--output-dir", str(tmp_path / "a")])
    assert "note: verify-threshold 0.9: strategy margin picks the samples the model is least sure of" in (
        capsys.readouterr().out)
    main(["simulate", "--strategy", "random", "--verify-threshold", "0.9", "--output-dir", str(tmp_path / "b")])
    assert "note:" not in capsys.readouterr().out


# ------------------------------------------------------------------ issue 21.8
def _ended_checkpoint(out: Path, **settings):
    """A checkpoint of a run that stopped asking for labels after round 4 (budget spent) and ended."""
    from fedal.config import FederationConfig

    cfg = FederationConfig(clients=2, min_clients=2, rounds=10, stop_when="budget", total_budget=100,
                           after_stop="end", output_dir=str(out), **settings)
    stopped = {"criterion": "label budget of 100 spent", "round": 4, "labels": 100, "query_rounds_skipped": 6,
               "labels_saved": 0}
    (out / "checkpoint").mkdir(parents=True)
    rounds = [{"round": r, "labels": 25 * r} for r in range(1, 5)]
    (out / "checkpoint" / "state.json").write_text(json.dumps(
        {"round": 4, "results": {"config": cfg.to_run_config(), "rounds": rounds}, "stopped": stopped}))
    (out / "results.json").write_text(json.dumps({"config": cfg.to_run_config(), "rounds": rounds}))
    return ["--clients", "2", "--min-clients", "2", "--rounds", "10", "--stop-when", "budget", "--total-budget",
            "100", "--output-dir", str(out), "--resume"]


def test_resuming_a_run_that_ended_on_its_stopping_rule_runs_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from simulations import simulate
    from simulations.cli import main

    out = tmp_path / "out"
    flags = _ended_checkpoint(out)
    before = (out / "results.json").read_text()
    monkeypatch.setattr(simulate, "_run_with_progress", lambda cfg, runtime: pytest.fail("a round was run"))
    assert main(["simulate", *flags, "--after-stop", "end"]) == 0
    said = capsys.readouterr().out
    assert "stopped asking for labels after round 4: label budget of 100 spent (100 labels)" in said
    assert "there is nothing to resume" in said and "--after-stop continue" in said
    assert "after 10 rounds" not in said and (out / "results.json").read_text() == before
    # --after-stop may change on resume: continue trains the remaining rounds, and says why they ask nothing
    ran = []
    monkeypatch.setattr(simulate, "_run_with_progress", lambda cfg, runtime: ran.append(cfg) or True)
    assert main(["simulate", *flags, "--after-stop", "continue"]) == 130  # (the fake run is "interrupted")
    assert ran and ran[0].after_stop == "continue"
    assert "the remaining rounds up to 10 train without queries" in capsys.readouterr().out


def test_the_server_app_resumes_an_ended_run_to_nothing(tmp_path):
    """`flwr run` with resume = true: the ServerApp returns before asking any node for anything."""
    import dataclasses

    from fedal.config import FederationConfig
    from server.app import run_federation
    from server.book import RoundBook
    from server.results import RunRecorder

    out = tmp_path / "out"
    cfg = FederationConfig(clients=2, min_clients=2, rounds=10, stop_when="budget", total_budget=100,
                           after_stop="end", output_dir=str(out))
    recorder = RunRecorder(out, cfg.to_run_config())
    from fedal.budget import BudgetCoordinator
    from server.privacy import PrivacySettings

    book = RoundBook(BudgetCoordinator("uniform", 10, 0), PrivacySettings.from_config(cfg))
    book.stopped = {"criterion": "label budget of 100 spent", "round": 4, "labels": 100, "query_rounds_skipped": 6,
                    "labels_saved": 0}
    for r in range(1, 5):
        recorder.add_round({"round": r, "labels": 25 * r, "accuracy": 0.5, "loss": 1.0, "clients": {}},
                           checkpoint=({"w": np.zeros(2, np.float32)}, book.state_dict()))

    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the ended run used the grid ({name})")

    result = run_federation(NoGrid(), dataclasses.replace(cfg, resume=True))
    assert [r["round"] for r in result.rounds] == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_issue_command_resumed_after_its_run_ended_does_nothing(tmp_path):
    """Issue 21.8 as reported: --stop-when budget --after-stop end, then the same command with --resume."""
    out = tmp_path / "out"
    flags = ["simulate", "--clients", "2", "--min-clients", "2", "--rounds", "10", "--round-budget", "20",
             "--initial-labels", "10", "--stop-when", "budget", "--total-budget", "60", "--after-stop", "end",
             "--output-dir", str(out)]
    first = fedal(*flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "the run ended there" in first.stdout and "after 3 rounds" in first.stdout
    before = (out / "results.json").read_text()
    again = fedal(*flags, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped asking for labels after round 3: label budget of 60 spent (60 labels)" in again.stdout
    assert "there is nothing to resume" in again.stdout and "after 10 rounds" not in again.stdout
    assert (out / "results.json").read_text() == before


def test_curve_png_is_drawn_at_most_every_plot_every_s_and_when_the_run_ends(tmp_path, monkeypatch):
    """Drawing the plot costs more than a round of the head pipeline: a run draws it when it is due and at
    its end (``RunRecorder.finish``), while results.json and results.csv follow every round."""
    from server import results
    from server.results import RunRecorder

    clock = [100.0]
    monkeypatch.setattr(results.time, "monotonic", lambda: clock[0])
    recorder = RunRecorder(tmp_path, {"strategy": "entropy"}, plot_every_s=30.0)
    row = {"loss": 1.0, "accuracy": 0.5, "clients": {}}
    recorder.add_round({**row, "round": 1, "labels": 10})
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "curve.png").exists()
    clock[0] += 31
    recorder.add_round({**row, "round": 2, "labels": 20})
    drawn = (tmp_path / "curve.png").stat().st_mtime_ns
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    recorder.add_round({**row, "round": 3, "labels": 30})
    assert (tmp_path / "curve.png").stat().st_mtime_ns == drawn  # not due yet
    assert json.loads((tmp_path / "results.json").read_text())["rounds"][-1]["round"] == 3
    (tmp_path / "curve.png").unlink()
    recorder.finish()
    assert (tmp_path / "curve.png").is_file()
    (tmp_path / "curve.png").unlink()
    recorder.finish()  # nothing new since: not drawn again
    assert not (tmp_path / "curve.png").exists()
