"""``flwr run`` runs the same app offline (``deploy/flwr_run_local.py``), and the
SuperLink it needs is gone afterwards."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "deploy" / "flwr_run_local.py"


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the script; on timeout send SIGTERM first so that it stops its SuperLink."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"flwr_run_local.py did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{entry.name}: {cmd[:200]}")
    return found


@pytest.mark.slow
def test_flwr_run_completes_writes_results_and_stops_the_superlink(tmp_path):
    out = tmp_path / "run"
    result = run_script("--run-config", f"rounds=2 clients=3 min-clients=3 round-budget=20 output-dir='{out}'")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert re.search(r"run \d+ status finished:completed", result.stdout), log[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["config"]["clients"] == 3
    assert set(results["rounds"][-1]["clients"]) == {"0", "1", "2"}  # num-supernodes = clients
    assert sum(c["budget"] for c in results["rounds"][-1]["clients"].values()) == 20
    # the SuperLink, its SuperExec and the simulation are gone, and so is the private Flower home
    port = int(re.search(r"SuperLink on 127\.0\.0\.1:(\d+)", result.stdout).group(1))
    home = re.search(r"FLWR_HOME=(\S+)", result.stdout).group(1)
    assert "SuperLink stopped" in result.stdout
    assert processes_mentioning(home) == []
    assert processes_mentioning(f"127.0.0.1:{port}") == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nobody listens there any more
    assert not Path(home).exists()


@pytest.mark.slow
def test_a_run_over_another_runs_folder_fails_and_leaves_it_alone(tmp_path):
    """After `make demo`, flwr run with the default output-dir reused the demo's client databases, failed
    on every client and still said `finished:completed` with exit 0, overwriting the demo's results."""
    out = tmp_path / "latest"
    out.mkdir()
    (out / "results.json").write_text('{"demo": "results"}')
    result = run_script("--run-config", f"rounds=2 clients=2 min-clients=2 output-dir='{out}'")
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "finished:completed" not in result.stdout
    assert "holds another run's results" in log, log[-3000:]
    assert (out / "results.json").read_text() == '{"demo": "results"}'


def test_supernode_count_must_match_the_runs_clients():
    result = run_script("--num-supernodes", "2", "--run-config", "clients=3", timeout=120)
    assert result.returncode == 2
    assert "--num-supernodes 2 differs from the run's clients (3)" in result.stderr
    assert "SuperLink on" not in result.stdout  # refused before anything was started


def test_app_folder_without_pyproject_is_refused(tmp_path):
    result = run_script(str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "has no pyproject.toml" in result.stderr


def test_a_run_config_value_flwr_cannot_read_is_named_without_a_traceback():
    result = run_script("--run-config", "rounds=abc", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--run-config 'rounds=abc' cannot be read: the value of rounds ('abc') is neither a number" in result.stderr
    assert "Traceback" not in result.stderr and "SuperLink on" not in result.stdout
