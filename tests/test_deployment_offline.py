"""A site cut off from the federation keeps labeling (issue 23), on Flower's Deployment Engine.

A SuperLink with TLS and SuperNode authentication and two registered SuperNodes, as in
``tests/test_deployment.py``; the run is submitted once both are online. At each site people answer on
its labeling page (a real ``LabelingServer`` on 127.0.0.1, answered over HTTP); site 1 also runs
``fedal site`` beside its SuperNode. In round 2, while site 1's people have the round's requests in
front of them, site 1's SuperNode is stopped: the federation goes on with site 0, while site 1's
``fedal site`` asks for labels on its own within the offline budget (``offline-budget``) and its people
answer them. Half-way, that process is killed (SIGKILL) and started again. Then the SuperNode comes
back, and the next round uses every label given meanwhile.

Nothing here depends on how fast the machine is: every step waits for an event (a node online at the
SuperLink, requests in a site's database, a row in results.json, a line in a log, a look at a page)
with a generous deadline, never for a fixed time. The people make the order of events certain where
the story needs it: the ClientApps wait for their answers (``label-wait`` longer than any step), so
site 1's round-2 requests are still unanswered when its SuperNode stops; site 1's people answer no
offline request before the first ``fedal site`` is killed, so it dies with exactly ``--batch`` of them
waiting; and site 0's people hold round 4's requests until site 1's SuperNode is online again, so the
run cannot end before site 1 rejoins (in round 5, with round 6 after it). The assertions are what
fedal guarantees: no label lost or asked twice, the offline spend within the grant and reported
once, the debt taken from later shares, the global head as if site 1 had never left.

One run serves both tests (a deployment round costs 10-40 s here): the first checks the ledger, the
budgets, the labels and the global head after the rejoin round; the second the restart of the site
process in the middle of its offline spell. Every process is stopped afterwards, also when a test
fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from federation_helpers import EVENT_TIMEOUT, node_statuses, require_deployment_tools, wait_for, wait_nodes

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
#: the round whose requests site 0's people hold until site 1's SuperNode is back online
HOLD = 4
#: seconds a ClientApp waits for its people's answers (``label-wait``): longer than any step of the test, so the
#: rounds wait for the people (the test) and not the other way round; site 1's returning SuperNode waits 0
LABEL_WAIT = 300
RUN_CONFIG = {"dataset": "digits", "rounds": ROUNDS, "initial-labels": 10, "round-budget": 16, "min-clients": 1,
              "offline-budget": GRANT, "pseudo-label-threshold": 0.0, "strategy": "margin",
              "round-timeout": LABEL_WAIT + 300.0,  # a timeout, not a pace: longer than a held round
              "seed": 0, "min-class-count": 1}  # every label in the sums: the server's head is the pooled one
#: seconds without a message after which site 1 counts as offline and `fedal site` asks on its own
OFFLINE_AFTER = 20
BATCH = 4


class Labeler(threading.Thread):
    """A person at a site's labeling page: answers what it shows with the ground truth of the site file, up to
    ``per_look`` answers a look, one look every ``pause`` seconds, except the requests ``holds(item)`` keeps back
    (asked again at each look)."""

    def __init__(self, url: str, token: str, truth: np.ndarray, *, holds=lambda item: False, per_look: int = 1,
                 pause: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.base, self.token, self.truth, self.holds, self.per_look, self.pause = url, token, truth, holds, \
            per_look, pause
        self.stop = threading.Event()
        self.answered: dict[int, int] = {}  # sample id -> label, as the page acknowledged it
        self.seen: list[tuple[float, dict]] = []  # (time just before the look, the page's link status)
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            looked_at = time.time()
            status, state = http(self.base + "api/state", token=self.token)
            if status != 200:
                self.errors.append(f"state: {status} {state}")
                time.sleep(0.5)
                continue
            self.seen.append((looked_at, state["link"]))
            todo = [p for p in state["pending"] if not self.holds(p)]
            for item in todo[:self.per_look]:
                sid = item["sample_id"]
                status, reply = http(self.base + "api/answer", token=self.token,
                                     body={"sample_id": sid, "label": int(self.truth[sid])})
                if status == 200:
                    self.answered[sid] = int(self.truth[sid])
                elif status != 409:  # 409: expired or answered a moment ago (not here: no timeout, one page)
                    self.errors.append(f"answer {sid}: {status} {reply}")
            time.sleep(self.pause)

    def looked_after(self, moment: float) -> bool:
        """Whether the page was looked at after ``moment`` (time.time())."""
        return any(t > moment for t, _ in self.seen)


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:  # the SuperExec / ClientApp children too
        time.sleep(0.2)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def _db(site) -> Pool:
    data = load_site(site.data_path, site.client_id)
    return Pool(data.n_classes, size=len(data.y_pool), path=site.state_dir / f"client-{site.client_id}.db")


def _pending_rounds(site) -> set:
    """The rounds of the requests waiting for an answer in the site's database."""
    if not (site.state_dir / f"client-{site.client_id}.db").is_file():
        return set()
    with _db(site) as pool:
        return {r["round"] for r in pool.requests("pending")}


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


def _rounds_done(dep) -> int:
    """Rows in results.json (0 before it exists, or while it is being replaced)."""
    return len((dep.results() or {}).get("rounds", []))


def _log_lines(dep, proc) -> list[str]:
    return dep.log_tail(proc, 100_000).strip().splitlines()


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """The whole story of the module docstring, once; what the tests check is returned."""
    deploy = _deploy_module()
    require_deployment_tools(deploy)
    dep = deploy.LocalDeployment(tmp_path_factory.mktemp("offline"), sites=2, run_config=RUN_CONFIG, verbose=False)
    pages, people = [], []
    story: dict = {"dep": dep}
    try:
        dep.prepare()  # the site files keep their ground truth: the people answer with it
        site0, site1 = dep.site_list
        site0.oracle, site0.extra = "web", f"label-wait={LABEL_WAIT}"
        site1.oracle, site1.extra = "web", f"label-wait={LABEL_WAIT} offline-after={OFFLINE_AFTER}"
        dep.start_superlink()
        for site in dep.site_list:
            dep.register(site)
        for site in dep.site_list:
            dep.start_supernode(site)
        wait_nodes(dep, dep.site_list)  # both online: both are in round 1 (the ServerApp waits only 15 s for them)
        started = time.monotonic()
        run_id = dep.submit()

        # the people of both sites; site 1's hold round 2 until the cut and the offline requests until the restart,
        # site 0's hold round HOLD until site 1 is back
        cut, restarted, back = threading.Event(), threading.Event(), threading.Event()
        holds = {0: lambda item: item["round"] == HOLD and not back.is_set(),
                 1: lambda item: ((item["offline"] and not restarted.is_set())
                                  or (item["round"] == 2 and not cut.is_set()))}
        for site in dep.site_list:
            wait_for(f"site {site.client_id}'s database",
                     lambda site=site: (site.state_dir / f"client-{site.client_id}.db").is_file(), dep, [site.process])
            page = open_labeling(site.state_dir, site.client_id, site.data_path, labeler=f"ward-{site.client_id}")
            pages.append(page)
            threading.Thread(target=page.serve_forever, daemon=True).start()
            person = Labeler(page.url.split("?")[0], page.token, load_site(site.data_path).y_pool,
                             holds=holds[site.client_id], per_look=1 if site.client_id else 100)
            people.append(person)
            person.start()
        people0, people1 = people
        wait_for("round 1", lambda: _rounds_done(dep) >= 1, dep, [site0.process, site1.process])

        # round 2: its requests are on site 1's page, nobody answers them (its ClientApp waits): the link goes down
        wait_for("site 1's round-2 requests", lambda: 2 in _pending_rounds(site1), dep, [site1.process])
        asked_at = time.time()
        wait_for("site 1's page looked at with them", lambda: people1.looked_after(asked_at), dep, [site1.process])
        _stop_group(site1.process, signal.SIGTERM)
        story["asked_at"], story["cut_at"] = asked_at, time.time()
        cut.set()  # its people go on: the round-2 requests, then (after the restart) what `fedal site` asks
        loop_cmd = [sys.executable, "-m", "simulations.cli", "site", "--state-dir", site1.state_dir, "--client-id",
                    "1", "--every", "1", "--batch", str(BATCH)]
        loop = dep.spawn("site-1-loop", loop_cmd)  # beside the SuperNode; from the cut, so that no slow round
        # before it (site 1 silent for offline-after seconds while connected) can start an offline spell of its own

        # offline: `fedal site` asks on its own; nobody answers its requests yet, so it keeps --batch of them waiting;
        # killed then, and started again
        wait_for("`fedal site` to ask on its own",
                 lambda: _offline_counts(site1)[0] >= BATCH and any("asking on its own" in line
                                                                    for line in _log_lines(dep, loop)), dep, [loop])
        _stop_group(loop, signal.SIGKILL)
        story["spent_at_kill"] = _offline_counts(site1)[0]
        story["restart_at"] = time.time()
        story["loop1_log"] = dep.log_tail(loop, 100_000)
        loop2 = dep.spawn("site-1-loop-again", loop_cmd)
        restarted.set()
        wait_for("the offline grant to be spent and answered", lambda: _offline_counts(site1) == (GRANT, 0), dep,
                 [loop2])
        spent_at = time.time()
        wait_for("site 1's page looked at with the grant used up", lambda: people1.looked_after(spent_at), dep, [loop2])
        # the federation went on without site 1: round 3 recorded, round HOLD under way (its train messages sent, to
        # site 0 only), held by site 0's people until site 1 is back
        wait_for("round 3", lambda: _rounds_done(dep) >= 3, dep, [loop2, site0.process])
        wait_for(f"site 0's round-{HOLD} requests", lambda: HOLD in _pending_rounds(site0), dep, [loop2, site0.process])
        people1.stop.set()  # every answer of the offline spell is in; nobody answers the next rounds' requests
        people1.join(timeout=30)
        story["rejoin_at"] = time.time()
        wait_for("the SuperLink to count site 1 as gone", lambda: node_statuses(dep).get(site1.node_id) != "online",
                 dep, [loop2], poll=1.0)
        site1.extra = f"label-wait=0 offline-after={OFFLINE_AFTER}"  # nobody answers now: no waiting
        dep.start_supernode(site1, name="supernode-1-back")
        wait_nodes(dep, [site1])
        back.set()  # site 0's people answer round HOLD: the next round has site 1
        story["results"] = dep.wait(run_id, ROUNDS, timeout=EVENT_TIMEOUT + LABEL_WAIT)
        story["seconds"] = time.monotonic() - started
        # the run is over: once the server has been silent for offline-after seconds, `fedal site` acts on the last
        # grant, the last round's, which was nothing
        wait_for("`fedal site` to act on the last round's grant (nothing)",
                 lambda: "0 of 0 offline labels used" in (_log_lines(dep, loop2) or [""])[-1], dep, [loop2])
        story["loop2_log"] = dep.log_tail(loop2, 100_000)
        story["people"] = people
        story["checkpoint"] = RunRecorder(dep.workdir / "server", {}).load_checkpoint()
        yield story
    finally:
        for person in people:
            person.stop.set()
        for page in pages:
            page.shutdown()
            page.server_close()
            page.service.pool.close()
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
    # the order of events (not the machine's speed) makes these rounds: both sites online before the run, site 1 cut
    # while its round-2 ClientApp waited for answers, back only after round HOLD's messages went out, and round HOLD
    # held until it was online again
    assert online[0] == 1 and away == list(range(2, HOLD + 1)), online
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
    people0, people1 = offline_run["people"]
    assert people0.errors == [] and people1.errors == []
    assert all(labels.get(sid) == label for sid, label in people1.answered.items())
    with _db(site0) as pool:  # site 0's people too: every answer is a label
        labels0 = dict(zip(*(a.tolist() for a in pool.labels())))
    assert people0.answered and all(labels0.get(sid) == label for sid, label in people0.answered.items())
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
    # it was killed half-way through the grant (with --batch requests waiting, never more: nobody had answered
    # them), and the second process spent the rest, never more
    assert offline_run["spent_at_kill"] == BATCH < GRANT
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
    # (before: looks between the round-2 requests and the cut; during: looks after `fedal site` first asked on its
    # own, which it does only once the site counts as offline, until the SuperNode came back)
    seen = offline_run["people"][1].seen
    before = [link for t, link in seen if offline_run["asked_at"] < t < offline_run["cut_at"]]
    offline_from = min(r["created_at"] for r in spell)
    during = [link for t, link in seen if offline_from < t < offline_run["rejoin_at"]]
    assert before and all(link["connected"] for link in before)
    assert during and all(not link["connected"] and link["offline_since"] < offline_run["cut_at"] for link in during)
    assert {link["offline_budget"] for link in during} == {GRANT}
    lefts = [link["offline_left"] for link in during]
    assert lefts == sorted(lefts, reverse=True) and lefts[-1] == 0
    assert during[-1]["answers_waiting"] >= GRANT
