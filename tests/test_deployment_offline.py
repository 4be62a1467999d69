"""A site cut off from the federation keeps labeling (issue 23), on Flower's Deployment Engine.

A SuperLink with TLS and SuperNode authentication and two registered SuperNodes, as in
``tests/test_deployment.py``. Site 1's people answer on its labeling page (a real
``LabelingServer`` on 127.0.0.1, answered over HTTP) and the site runs ``fedal site`` beside
its SuperNode. In round 2, while its people have the round's requests in front of them, site
1's SuperNode is stopped: the federation goes on with site 0 for three rounds, while site 1's
``fedal site`` asks for labels on its own within the offline budget (``offline-budget``) and
its people answer them. Half-way, that process is killed (SIGKILL) and started again. Then
the SuperNode comes back, and the next round uses every label given meanwhile.

One run serves both tests (a deployment round costs 15-40 s here): the first checks the
ledger, the budgets, the labels and the global head after the rejoin round; the second the
restart of the site process in the middle of its offline spell. Every process is stopped
afterwards, also when a test fails.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from federation_helpers import require_deployment_tools

from clients.labeling import open_labeling
from clients.node import NodeConfig
from clients.site import ClientSite
from fedal.config import FederationConfig
from fedal.heads import ClassStatistics
from fedal.models.head_adapter import HeadClassifier
from fedal.pool import Pool
from fedal.sitedata import load_site
from server.results import RunRecorder
from tests.site_helpers import http
from tests.test_deployment import _deploy_module, group_alive

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

ROUNDS = 6
GRANT = 12
RUN_CONFIG = {"dataset": "digits", "rounds": ROUNDS, "initial-labels": 10, "round-budget": 16, "min-clients": 1,
              "offline-budget": GRANT, "pseudo-label-threshold": 0.0, "strategy": "margin", "round-timeout": 120.0,
              "seed": 0, "min-class-count": 1}  # every label in the sums: the server's head is the pooled one
#: seconds without a message after which site 1 acts on its own (longer than the gaps between its messages)
OFFLINE_AFTER = 20
BATCH = 4


class Labeler(threading.Thread):
    """A person at site 1's labeling page: answers what it shows with the ground truth of the site file, one
    answer every ``pause`` seconds, except the requests of round ``hold`` until :attr:`release` is set."""

    def __init__(self, url: str, token: str, truth: np.ndarray, *, hold: int, pause: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.base, self.token, self.truth, self.hold, self.pause = url, token, truth, hold, pause
        self.release, self.stop = threading.Event(), threading.Event()
        self.answered: dict[int, int] = {}  # sample id -> label, as the page acknowledged it
        self.seen: list[tuple[float, dict]] = []  # (time, the page's link status)
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            status, state = http(self.base + "api/state", token=self.token)
            if status != 200:
                self.errors.append(f"state: {status} {state}")
                time.sleep(0.5)
                continue
            self.seen.append((time.time(), state["link"]))
            todo = [p for p in state["pending"] if p["round"] != self.hold or self.release.is_set()]
            for item in todo[:1]:
                sid = item["sample_id"]
                status, reply = http(self.base + "api/answer", token=self.token,
                                     body={"sample_id": sid, "label": int(self.truth[sid])})
                if status == 200:
                    self.answered[sid] = int(self.truth[sid])
                elif status != 409:  # 409: expired or answered a moment ago (not here: no timeout, one page)
                    self.errors.append(f"answer {sid}: {status} {reply}")
            time.sleep(self.pause)


def _wait(what: str, predicate, timeout: float, dep, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in [dep.superlink, *procs]:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}:\n"
                                     f"{dep.log_tail(proc)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; SuperLink log:\n{dep.log_tail(dep.superlink)}")


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:  # the SuperExec / ClientApp children too
        time.sleep(0.2)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def _db(site) -> Pool:
    data = load_site(site.data_path, site.client_id)
    return Pool(data.n_classes, size=len(data.y_pool), path=site.state_dir / f"client-{site.client_id}.db")


def _offline_counts(site) -> tuple[int, int]:
    """(offline requests that spent budget, of those still waiting for an answer) in site 1's database."""
    path = site.state_dir / f"client-{site.client_id}.db"
    if not path.is_file():
        return 0, 0
    with _db(site) as pool:
        rows = pool.offline_requests()
    return pool_spent(rows), sum(r["status"] == "pending" for r in rows)


def pool_spent(rows) -> int:
    return sum(r["status"] in ("pending", "answered", "skipped") for r in rows)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The whole story of the module docstring, once; what the tests check is returned."""
    deploy = _deploy_module()
    require_deployment_tools(deploy)
    dep = deploy.LocalDeployment(tmp_path_factory.mktemp("offline"), sites=2, run_config=RUN_CONFIG, verbose=False)
    server = labeler = None
    story: dict = {"dep": dep}
    try:
        dep.prepare()  # the site files keep their ground truth: site 0's oracle is simulated, site 1's the labeler's
        site0, site1 = dep.site_list
        site1.oracle, site1.extra = "web", f"label-wait=5 offline-after={OFFLINE_AFTER}"
        dep.start_superlink()
        for site in dep.site_list:
            dep.register(site)
        for site in dep.site_list:
            dep.start_supernode(site)
        started = time.monotonic()
        run_id = dep.submit()
        _wait("site 1's database", lambda: (site1.state_dir / "client-1.db").is_file(), 120, dep, [site1.process])
        server = open_labeling(site1.state_dir, 1, site1.data_path, labeler="ward")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = server.url.split("?")[0]
        labeler = Labeler(base, server.token, load_site(site1.data_path).y_pool, hold=2)
        labeler.start()
        _wait("round 1", lambda: len((dep.results() or {}).get("rounds", [])) >= 1, 240, dep, [site1.process])
        loop_cmd = [sys.executable, "-m", "simulations.cli", "site", "--state-dir", site1.state_dir, "--client-id",
                    "1", "--every", "1", "--batch", str(BATCH)]
        loop = dep.spawn("site-1-loop", loop_cmd)

        # round 2: its requests are on the page, nobody answered yet: the link goes down
        def round2_asked():
            with _db(site1) as pool:
                return any(r["round"] == 2 for r in pool.requests("pending"))
        _wait("site 1's round-2 requests", round2_asked, 240, dep, [site1.process, loop])
        _stop_group(site1.process, signal.SIGTERM)
        story["cut_at"] = time.time()
        labeler.release.set()  # its people go on: the round-2 requests, then what `fedal site` asks

        # offline: `fedal site` asks on its own; killed half-way through its grant and started again
        _wait("the first offline requests", lambda: _offline_counts(site1)[0] >= BATCH, 180, dep, [loop])
        _stop_group(loop, signal.SIGKILL)
        story["spent_at_kill"] = _offline_counts(site1)[0]
        story["restart_at"] = time.time()
        story["loop1_log"] = dep.log_tail(loop, 100_000)
        loop2 = dep.spawn("site-1-loop-again", loop_cmd)
        _wait("the offline grant to be spent and answered",
              lambda: _offline_counts(site1) == (GRANT, 0), 180, dep, [loop2])
        # back in time for round 5 (a SuperNode takes a few seconds to come up; round 4 starts without it)
        _wait("round 3", lambda: len(dep.results()["rounds"]) >= 3, 240, dep, [loop2])
        # the page has been looked at while the site counted as offline (a fast spell can end before that)
        _wait("the page seen offline", lambda: any(t > story["cut_at"] + OFFLINE_AFTER + 2 for t, _ in labeler.seen),
              60, dep, [loop2])
        labeler.stop.set()  # every answer of the offline spell is in; nobody answers the next round's requests
        labeler.join(timeout=10)
        story["rejoin_at"] = time.time()
        dep.start_supernode(site1, name="supernode-1-back")
        story["results"] = dep.wait(run_id, ROUNDS, timeout=600)
        story["seconds"] = time.monotonic() - started
        time.sleep(OFFLINE_AFTER + 3)  # the run is over: the server is silent, and its last round granted nothing
        story["loop2_log"] = dep.log_tail(loop2, 100_000)
        story["labeler"] = labeler
        story["checkpoint"] = RunRecorder(dep.workdir / "server", {}).load_checkpoint()
        yield story
    finally:
        if labeler is not None:
            labeler.stop.set()
        if server is not None:
            server.shutdown()
            server.server_close()
            server.service.pool.close()
        dep.stop()


def _present(rounds, client: str) -> list[int]:
    return [r["round"] for r in rounds if client in r["clients"]]


def test_a_site_cut_off_for_three_rounds_keeps_labeling_and_rejoins_with_every_label(offline_run):
    dep, rounds = offline_run["dep"], offline_run["results"]["rounds"]
    site0, site1 = dep.site_list
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert _present(rounds, "0") == list(range(1, ROUNDS + 1))
    online = _present(rounds, "1")
    away = [r for r in range(1, ROUNDS + 1) if r not in online]
    assert away and away[0] == 2 and len(away) >= 3 and away == list(range(2, 2 + len(away))), online
    rejoin = min(r for r in online if r > away[-1])
    row = next(r for r in rounds if r["round"] == rejoin)["clients"]["1"]
    with _db(site1) as pool:
        offline = pool.offline_requests()
        requests = pool.requests()
        labels = dict(zip(*(a.tolist() for a in pool.labels())))
        budgets = {b["round"]: b for b in pool.budgets()}
    # the offline spend: all of round 2's grant while away, never more, reported once, in the rejoin round's reply
    # and results.json (a slow round can leave the site silent for offline-after seconds while connected: it then
    # asks against that round's grant, reported with the next reply; the last round grants nothing)
    spent = [r for r in offline if r["status"] in ("pending", "answered", "skipped")]
    assert len(spent) == len(offline)  # no request expired (no query-timeout)
    by_grant = {g: sum(r["grant_round"] == g for r in spent) for g in {r["grant_round"] for r in spent}}
    assert by_grant[2] == GRANT and max(by_grant.values()) <= GRANT and ROUNDS not in by_grant, by_grant
    assert {r["reported_round"] for r in spent if r["grant_round"] == 2} == {rejoin}
    assert row["offline_spent"] == sum(r["reported_round"] == rejoin for r in spent) and row["offline_budget"] == GRANT
    reported = sum(r["clients"].get("1", {}).get("offline_spent", 0) for r in rounds)
    assert reported == sum(r["reported_round"] is not None for r in spent)
    # ... and the budget coordinator takes it from site 1's next shares (what is not taken yet, it still owes)
    _, _, saved = offline_run["checkpoint"]
    debt = {d["client"]: d["labels"] for d in saved["budget"]["debt"]}
    deducted = sum(r["offline_deducted"] for r in saved["budget"]["ledger"] if r["client"] == 1)
    assert deducted + debt.get(1, 0) == reported
    later = [r["clients"]["1"] for r in rounds if r["round"] > rejoin and "1" in r["clients"]]
    assert later and [c["budget"] + c["offline_deducted"] for c in later] == [8] * len(later)  # its share, less debt
    assert sum(c["offline_deducted"] for c in later) == deducted > 0
    assert all(r["offline_deducted"] == 0 for r in saved["budget"]["ledger"] if r["client"] == 0)
    # the site's ledger: no round spent more than it was sent; the rounds it missed spent nothing
    assert all(b["spent"] <= b["assigned"] for b in budgets.values())
    assert all(r not in budgets for r in away if r != 2), budgets
    # labels: nothing asked twice, nothing lost; the rejoin round trained on every label given meanwhile
    asked = [r["sample_id"] for r in requests]
    assert len(asked) == len(set(asked))
    answered = offline_run["labeler"].answered
    assert offline_run["labeler"].errors == []
    assert all(labels.get(sid) == label for sid, label in answered.items())
    cut, back = offline_run["cut_at"], offline_run["rejoin_at"]
    given_offline = [r for r in requests if r["status"] == "answered" and cut < r["closed_at"] < back]
    assert len(given_offline) >= GRANT  # the offline requests and the round-2 ones people had in front of them
    # (nobody answered after it: its own requests of that round wait)
    assert row["labeled"] == rounds[-1]["clients"]["1"]["labeled"] == len(labels)
    # the global head after the last round: the head of both sites' labels pooled, as if site 1 had been online
    _assert_global_head_is_the_pooled_one(dep, offline_run["checkpoint"])
    print(f"\n{ROUNDS} rounds in {offline_run['seconds']:.0f} s; site 1 away in rounds {away}, back in round "
          f"{rejoin}; {len(given_offline)} labels given while away; offline spend {GRANT} of {GRANT}")


def _assert_global_head_is_the_pooled_one(dep, checkpoint) -> None:
    cfg = FederationConfig.from_mapping({**dep.fedal_settings(), "output-dir": str(dep.workdir / "server")})
    sums = None
    for site in dep.site_list:
        node = NodeConfig.from_mapping({"client-id": site.client_id, "data-path": str(site.data_path),
                                        "state-dir": str(site.state_dir), "oracle": "web"})
        own = ClientSite(cfg, node)
        try:
            X, y = own.learner.labeled_data()
            stats = ClassStatistics.from_samples(X, y, own.data.n_classes)
            sums = stats if sums is None else sums + stats
            n_classes, dim = own.data.n_classes, own.X_pool.shape[1]
        finally:
            own.close()
    pooled = HeadClassifier(n_classes, dim)
    pooled.fit_statistics(sums)
    _, state, _ = checkpoint
    for key, value in pooled.get_state().items():
        np.testing.assert_allclose(np.asarray(state[key]), value, rtol=0, atol=1e-9, err_msg=key)


def test_the_site_process_restarted_while_offline_goes_on_from_its_database(offline_run):
    dep = offline_run["dep"]
    site1 = dep.site_list[1]
    # it was killed half-way through the grant, and the second process spent the rest, never more
    assert BATCH <= offline_run["spent_at_kill"] < GRANT
    with _db(site1) as pool:
        offline = pool.offline_requests()
        assert pool._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    restart = offline_run["restart_at"]
    spell = [r for r in offline if r["grant_round"] == 2]
    by_first = [r for r in spell if r["created_at"] < restart]
    by_second = [r for r in spell if r["created_at"] > restart]
    assert len(by_first) == offline_run["spent_at_kill"] and len(by_first) + len(by_second) == GRANT
    assert len({r["sample_id"] for r in offline}) == len(offline)
    assert "asking on its own" in offline_run["loop1_log"]
    assert "offline budget spent" in offline_run["loop2_log"] and f"{GRANT} of {GRANT} offline labels used" in \
        offline_run["loop2_log"]
    lines = offline_run["loop2_log"].strip().splitlines()
    back = next(i for i, line in enumerate(lines) if "connected (model of round" in line)  # it stops asking
    assert any("offline budget spent" in line for line in lines[:back])
    assert "0 of 0 offline labels used" in lines[-1]  # the run is over: its last round granted nothing
    # the labeling page said where the site stood: connected, then offline since its last message, the budget
    # left going down to 0 and answers waiting to be sent
    seen = offline_run["labeler"].seen
    before = [link for t, link in seen if t < offline_run["cut_at"]]
    during = [link for t, link in seen if offline_run["cut_at"] + OFFLINE_AFTER + 2 < t < offline_run["rejoin_at"]]
    assert before and all(link["connected"] for link in before[-3:])
    assert during and all(not link["connected"] and link["offline_since"] < offline_run["cut_at"] for link in during)
    assert {link["offline_budget"] for link in during} == {GRANT}
    lefts = [link["offline_left"] for link in during]
    assert lefts == sorted(lefts, reverse=True) and lefts[-1] == 0
    assert during[-1]["answers_waiting"] >= GRANT
