"""The ``fedal`` command: ``strategies`` and ``local``, and its errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedal.data import available_datasets
from fedal.strategies import available_strategies
from simulations.cli import COMMANDS, main

FEDAL = Path(sys.executable).with_name("fedal")  # the console script installed next to this Python
QUICK = ["--steps", "2", "--budget", "10", "--initial", "10", "--epochs", "5"]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_strategies_lists_every_registered_name(capsys):
    code, out, _ = run_main(capsys, "strategies")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == available_strategies()
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines())  # each with its description


@pytest.mark.skipif(not FEDAL.exists(), reason=f"no installed `fedal` script at {FEDAL} (pip install -e .)")
def test_installed_command_runs():
    proc = subprocess.run([str(FEDAL), "strategies"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "entropy" in proc.stdout and "random" in proc.stdout


def test_local_prints_a_table_with_both_strategies(capsys, tmp_path):
    code, out, err = run_main(capsys, "local", *QUICK, "--out", str(tmp_path))
    assert code == 0, err
    lines = out.splitlines()
    header = lines.index("| labels | entropy acc | random acc |")
    rows = [line for line in lines[header + 2:] if line.startswith("|")]
    assert [int(r.split("|")[1]) for r in rows] == [10, 20, 30]  # initial set, then 2 steps of 10
    for row in rows:
        accs = [float(cell) for cell in row.strip("|").split("|")[1:]]
        assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    saved = json.loads((tmp_path / "local.json").read_text())
    assert set(saved["curves"]) == {"entropy", "random"} and saved["config"]["budget"] == 10
    assert [r["labeled"] for r in saved["curves"]["entropy"]] == [10, 20, 30]


def test_local_baseline_same_as_strategy_runs_once(capsys):
    code, out, _ = run_main(capsys, "local", *QUICK[:2], "--budget", "5", "--initial", "5", "--epochs", "1",
                            "--strategy", "random", "--max-train", "100")
    assert code == 0
    assert "| labels | random acc |" in out


@pytest.mark.parametrize("flag, value, match", [
    ("--budget", "0", "--budget must be >= 1, got 0"),
    ("--initial", "-3", "--initial must be >= 1"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--steps", "-1", "--steps must be >= 0"),
    ("--noise", "1.5", "noise_rate must be in"),
    ("--max-train", "0", "subsample size must be >= 1"),
])
def test_bad_values_exit_2_with_a_message(capsys, flag, value, match):
    code, _, err = run_main(capsys, "local", *QUICK, flag, value)
    assert code == 2
    assert "fedal local: error:" in err and match in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--budget", "ten"], ["--seed", "1.5"], ["--no-such-flag"]])
def test_unparsable_flags_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(["local", *argv])
    assert info.value.code == 2
    assert "usage: fedal local" in capsys.readouterr().err


def test_unknown_dataset_lists_the_data_sets(capsys):
    code, _, err = run_main(capsys, "local", "--dataset", "cifar10")
    assert code == 2 and "cifar10" in err
    for name in available_datasets():
        assert name in err


@pytest.mark.parametrize("flag", ["--strategy", "--baseline"])
def test_unknown_strategy_lists_the_strategies_before_any_work(capsys, flag):
    code, out, err = run_main(capsys, "local", flag, "entrop")
    assert code == 2 and "'entrop'" in err
    for name in available_strategies():
        assert re.search(rf"\b{name}\b", err)
    assert out == ""  # failed before loading data or training


def test_unknown_command_lists_the_commands(capsys):
    code, _, err = run_main(capsys, "labl")
    assert code == 2
    for name in COMMANDS:
        assert name in err


def test_help(capsys):
    code, out, _ = run_main(capsys)
    assert code == 0 and "local" in out and "strategies" in out


def test_local_stops_when_a_criterion_fires(capsys):
    code, out, err = run_main(capsys, "local", *QUICK[:2], "--steps", "6", "--budget", "10", "--initial", "10",
                              "--epochs", "2", "--total-budget", "30", "--stop-when", "budget")
    assert code == 0, err
    assert out.count("stopped early: label budget of 30 spent") == 2
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [10, 20, 30]
    code, _, err = run_main(capsys, "local", "--stop-when", "never")
    assert code == 2 and "unknown stopping criterion 'never'" in err


def _strict(text: str):
    """JSON as other tools read it: NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("flags, match", [
    (["--total-budget", "10"], "--total-budget 10 is below the initial labeled set (--initial 20)"),
    (["--total-budget", "10", "--stop-when", "budget"], "the initial labels count toward it"),
    (["--total-budget", "4", "--initial", "5", "--stop-when", "plateau"], "--total-budget 4 is below"),
])
def test_local_total_budget_below_the_initial_set_is_refused(capsys, flags, match):
    """Issue 21.9: a budget the initial set alone overspends is refused before any work."""
    code, out, err = run_main(capsys, "local", *flags)
    assert code == 2 and "fedal local: error:" in err and match in err, err
    assert out == ""


def test_local_total_budget_alone_caps_the_labels(capsys):
    """--total-budget is the labels in all, initial set included, even without --stop-when budget."""
    code, out, err = run_main(capsys, "local", *QUICK[:2], "--steps", "6", "--budget", "10", "--initial", "10",
                              "--epochs", "2", "--total-budget", "25", "--max-train", "300")
    assert code == 0, err
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [10, 20, 25]
    assert out.count("stopped early: label budget of 25 spent") == 2


def test_local_out_names_the_file_and_writes_strict_json_with_the_stop_reason(capsys, tmp_path):
    """Issue 21.10: --out x.json is that file (not a folder), strict JSON, with why each curve stopped."""
    target = tmp_path / "runs" / "x.json"
    code, out, err = run_main(capsys, "local", *QUICK, "--max-train", "300", "--total-budget", "20",
                              "--out", str(target))
    assert code == 0, err
    assert target.is_file() and f"wrote {target}" in out
    saved = _strict(target.read_text())
    assert saved["stopped"] == {"entropy": "label budget of 20 spent", "random": "label budget of 20 spent"}
    assert saved["curves"]["entropy"][0]["mean_uncertainty"] is None  # NaN before the first model: null
    assert saved["config"]["total_budget"] == 20 and not {"argv", "prog"} & set(saved["config"])
    # an existing folder, or a path ending in a separator, gets local.json inside it
    code, _, err = run_main(capsys, "local", *QUICK, "--max-train", "300", "--out", str(tmp_path / "folder") + "/")
    assert code == 0, err
    assert _strict((tmp_path / "folder" / "local.json").read_text())["stopped"] == {"entropy": None, "random": None}
