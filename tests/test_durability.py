"""A client process killed with SIGKILL between asking for labels and getting them loses
nothing: the requests, the answers people gave and the round's budget are all on disk,
and the re-delivered round neither asks twice nor forgets an answer."""
from __future__ import annotations

import dataclasses

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from site_helpers import (
    global_state,
    http,
    make_site,
    serving,
    site_config,
    web_site_after_round1,
)

from clients.labeling import open_labeling
from clients.node import NodeConfig
from clients.site import ClientSite
from fedal.config import FederationConfig
from fedal.messages import TrainInstruction

TESTS = Path(__file__).resolve().parent

# Runs one ClientSite round in a child process; FEDAL_KILL_AFTER_REQUEST=1 makes it SIGKILL
# itself right after its label requests are committed (before any answer is recorded).
CHILD = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
from site_helpers import global_state
from clients.site import ClientSite
from fedal.config import FederationConfig
from clients.node import NodeConfig
from fedal.messages import TrainInstruction
cfg = FederationConfig.from_mapping(json.loads(sys.argv[1]))
node = json.loads(sys.argv[2])
rounds = json.loads(sys.argv[3])
site = ClientSite(cfg, NodeConfig.from_mapping(node))
for server_round, budget, kill in rounds:
    if kill:
        request = site.pool.request
        def request_then_die(*args, **kwargs):
            request(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        site.pool.request = request_then_die
    print("ROUND", server_round, flush=True)
    site.train(global_state(site), TrainInstruction(server_round, budget))
print("DONE", flush=True)
"""


def child(cfg: FederationConfig, node: dict, rounds: list[tuple[int, int, bool]]) -> subprocess.Popen:
    code = CHILD.format(tests=str(TESTS))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_run_config()), json.dumps(node),
                             json.dumps(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for the child (SIGKILL its process group after ``timeout``); ``(status, stdout, stderr)``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, out, err


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def db_rows(path: Path, sql: str) -> list[tuple]:
    """Read the client database from outside, read-only (as an auditor would)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def pending_count(path: Path) -> int:
    try:
        return db_rows(path, "SELECT COUNT(*) FROM requests WHERE status = 'pending'")[0][0]
    except sqlite3.OperationalError:  # not made yet, or its schema not yet committed
        return 0


@pytest.mark.parametrize("kill_round, budget", [(1, 0), (2, 5)])
def test_killed_right_after_requesting_a_round_is_not_asked_twice(tmp_path, kill_round, budget):
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="simulated", labels=True)
    rounds = [(1, 0, kill_round == 1)] + ([(2, budget, True)] if kill_round == 2 else [])
    code, out, err = finish(child(cfg, node, rounds))
    assert code == -signal.SIGKILL, err
    db = Path(node["state-dir"]) / "client-0.db"
    asked = cfg.initial_labels if kill_round == 1 else budget
    pending = db_rows(db, f"SELECT COUNT(*) FROM requests WHERE round = {0 if kill_round == 1 else 2} AND status = 'pending'")
    assert pending == [(asked,)]  # the requests were committed before the kill
    labels_before = db_rows(db, "SELECT COUNT(*) FROM labels")[0][0]
    assert labels_before == (0 if kill_round == 1 else cfg.initial_labels)

    # Flower re-delivers the round to a fresh process: it takes up the pending requests
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    try:
        _, report = site.train(global_state(site), TrainInstruction(kill_round, budget))
    finally:
        site.close()
    n_requests = db_rows(db, "SELECT COUNT(*) FROM requests")[0][0]
    assert n_requests == cfg.initial_labels + (budget if kill_round == 2 else 0)  # nothing asked twice
    assert report.queries_used == budget and report.pending == 0
    assert report.num_examples == labels_before + asked


def test_killed_while_waiting_for_people_keeps_their_answers(tmp_path):
    """The ClientApp waits for answers (label-wait); a person answers two on the page; the
    process is SIGKILLed; the answers, the open requests and nothing else are on disk."""
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="web", **{"label-wait": 600})
    db = Path(node["state-dir"]) / "client-0.db"
    proc = child(cfg, node, [(1, 0, False)])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            if pending_count(db) == 6:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the client never asked for its initial labels")
        with serving(open_labeling(node["state-dir"], 0, node["data-path"], labeler="nurse")) as server:
            base = server.url.split("?")[0]
            pending = http(base + "api/state", token=server.token)[1]["pending"]
            answered = {pending[0]["sample_id"]: 3, pending[1]["sample_id"]: 8}
            for sid, label in answered.items():
                assert http(base + "api/answer", token=server.token, body={"sample_id": sid, "label": label})[0] == 200
        assert proc.poll() is None  # still waiting for the other four
    finally:
        kill(proc)
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err
    assert dict(db_rows(db, "SELECT sample_id, label FROM labels")) == answered
    assert db_rows(db, "SELECT COUNT(*) FROM requests WHERE status = 'pending'") == [(4,)]

    # the round again, in a new process (every class statistic sent: one label of a class is enough here)
    site = ClientSite(dataclasses.replace(cfg, min_class_count=1), NodeConfig.from_mapping({**node, "label-wait": 0}))
    fitted = {}
    original = site.learner.labeled_data

    def capture():  # what the round trains on (network) or sums up (head)
        X, y = original()
        fitted["y"] = y.copy()
        return X, y

    site.learner.labeled_data = capture
    try:
        arrays, report = site.train(global_state(site), TrainInstruction(1, 0))
    finally:
        site.close()
    assert report.num_examples == 2 and report.pending == 4
    assert sorted(fitted["y"].tolist()) == [3, 8]
    assert [int(c) for c in np.flatnonzero(arrays["stats.counts"])] == [3, 8]  # the head pipeline's statistics
    assert db_rows(db, "SELECT COUNT(*) FROM requests") == [(6,)]  # the initial set was not asked again


def test_labeling_page_killed_after_acknowledging_loses_nothing(tmp_path):
    node = web_site_after_round1(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "label", "--state-dir", node["state-dir"],
                             "--client-id", "0", "--data-path", node["data-path"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
                            start_new_session=True)
    try:
        match = re.search(r"(http://\S+/)\?token=(\S+)", proc.stdout.readline())
        assert match, proc.stderr.read() if proc.poll() is not None else "no address printed"
        base, token = match.groups()
        pending = [p["sample_id"] for p in http(base + "api/state", token=token)[1]["pending"]]
        acknowledged = {}
        for label, sid in enumerate(pending[:3]):
            status, reply = http(base + "api/answer", token=token, body={"sample_id": sid, "label": label})
            assert status == 200 and reply["recorded"]
            acknowledged[sid] = label
    finally:
        kill(proc)  # no clean shutdown, no checkpoint of the WAL
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    db = Path(node["state-dir"]) / "client-0.db"
    assert dict(db_rows(db, "SELECT sample_id, label FROM labels")) == acknowledged
    assert db_rows(db, "SELECT COUNT(*) FROM requests WHERE status = 'answered'") == [(3,)]
