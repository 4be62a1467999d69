"""The labeling page over HTTP (no browser): token on every route, answers durable before
the reply, invalid answers refused with a message, loopback only unless allowed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
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

from clients.labeling import LabelingServer, LabelingService, open_labeling
from clients.node import NodeConfig
from clients.site import ClientSite, open_site_pool
from fedal.exceptions import ConfigError
from fedal.messages import TrainInstruction
from fedal.pool import Pool
from fedal.sitedata import load_site


@pytest.fixture
def site(tmp_path):
    """A digits site whose round 1 asked for its initial set (6 pending requests, people label)."""
    return web_site_after_round1(tmp_path)


@pytest.fixture
def page(site):
    server = open_labeling(site["state-dir"], 0, site["data-path"], labeler="alice")
    with serving(server):
        yield server


def base(server) -> str:
    return server.url.split("?")[0]


def test_every_route_needs_the_token(page):
    pending = http(base(page) + "api/state", token=page.token)[1]["pending"]
    sid = pending[0]["sample_id"]
    routes = ["", "static/labeling.js", "static/labeling.css", "api/state", f"api/image/{sid}.png"]
    for route in routes:
        assert http(base(page) + route)[0] == 403, route
        assert http(base(page) + route + "?token=wrong")[0] == 403, route
        assert http(base(page) + route + "?token=" + page.token[:-1])[0] == 403, route
        assert http(base(page) + route, token=page.token)[0] != 403, route
    # a POST must carry the token in its header: a token in the URL is not enough (CSRF)
    status, _ = http(base(page) + "api/answer?token=" + page.token, body={"sample_id": sid, "label": 1})
    assert status == 403
    status, payload = http(base(page) + "api/answer", token="x" * 32, body={"sample_id": sid, "label": 1})
    assert status == 403 and "token" in payload["error"]
    with open_site_pool(page.service.pool.path.parent, 0, page.service.data, create=False) as pool:
        assert pool.counts()["labeled"] == 0


def test_page_and_security_headers(page):
    status, html = http(page.url)
    assert status == 200 and b"<title>fedal" in html and page.token.encode() in html
    with urllib.request.urlopen(page.url) as resp:
        req_headers = resp.headers
    assert "script-src 'self'" in req_headers["Content-Security-Policy"]
    assert req_headers["Referrer-Policy"] == "no-referrer" and req_headers["Cache-Control"] == "no-store"


def test_answer_is_in_the_database_when_the_reply_arrives(page, site):
    state = http(base(page) + "api/state", token=page.token)[1]
    assert state["kind"] == "table" and state["classes"] == [str(c) for c in range(10)]
    assert state["progress"] == {"round": 0, "budget": 6, "asked": 6, "pending": 6, "answered": 0, "expired": 0,
                                 "skipped": 0}
    first = state["pending"][0]
    data = load_site(site["data-path"])
    np.testing.assert_allclose(first["features"], data.X_pool[first["sample_id"]], atol=1e-4)
    status, reply = http(base(page) + "api/answer", token=page.token, body={"sample_id": first["sample_id"], "label": 7})
    assert status == 200 and reply["recorded"] and reply["class"] == "7"
    # a second connection to the database (another process would see the same) has it already
    with Pool(10, size=len(data.y_pool), path=Path(site["state-dir"]) / "client-0.db") as other:
        [record] = other.label_records()
    assert (record["id"], record["label"], record["source"], record["round"]) == (first["sample_id"], 7, "web:alice", 0)
    state = http(base(page) + "api/state", token=page.token)[1]
    assert state["progress"]["answered"] == 1 and len(state["pending"]) == 5


@pytest.mark.parametrize("body, status, message", [
    ({"label": 1}, 400, "sample_id must be an integer"),
    ({"sample_id": "3", "label": 1}, 400, "sample_id must be an integer"),
    ({"sample_id": None, "label": 1}, 400, "sample_id must be an integer"),
    ({"sample_id": 0, "label": 10}, 400, "outside the 10 known classes"),
    ({"sample_id": 0, "label": -1}, 400, "outside the 10 known classes"),
    ({"sample_id": 0, "label": 2.5}, 400, "label must be an integer class 0..9"),
    ({"sample_id": 0, "label": True}, 400, "label must be an integer class 0..9"),
    ({"sample_id": 0, "label": "cat"}, 400, "label must be an integer class 0..9"),
    ({"sample_id": 99999, "label": 1}, 400, "must be a sample of this site"),
    ({"sample_id": 10**30, "label": 1}, 400, "must be a sample of this site"),  # was an OverflowError in SQLite
])
def test_invalid_answers_get_400_with_a_message(page, body, status, message):
    pending = http(base(page) + "api/state", token=page.token)[1]["pending"]
    if body.get("sample_id") == 0:
        body = dict(body, sample_id=pending[0]["sample_id"])
    got, reply = http(base(page) + "api/answer", token=page.token, body=body)
    assert got == status and message in reply["error"]
    assert http(base(page) + "api/state", token=page.token)[1]["counts"]["labeled"] == 0


def test_malformed_bodies_and_stale_samples(page):
    pending = http(base(page) + "api/state", token=page.token)[1]["pending"]
    assert http(base(page) + "api/answer", token=page.token, body=b"not json")[0] == 400
    assert http(base(page) + "api/answer", token=page.token, body=b"[1, 2]")[0] == 400
    assert http(base(page) + "api/nothing", token=page.token, body={"sample_id": 1})[0] == 404
    sid = pending[0]["sample_id"]
    assert http(base(page) + "api/answer", token=page.token, body={"sample_id": sid, "label": 1})[0] == 200
    status, reply = http(base(page) + "api/answer", token=page.token, body={"sample_id": sid, "label": 2})
    assert status == 409 and "already labeled" in reply["error"]
    unlabeled = next(i for i in range(100) if i not in {p["sample_id"] for p in pending})
    status, reply = http(base(page) + "api/answer", token=page.token, body={"sample_id": unlabeled, "label": 2})
    assert status == 409 and "not waiting for a label" in reply["error"]


def test_deeply_nested_json_is_a_400_not_a_dropped_connection(page):
    status, reply = http(base(page) + "api/answer", token=page.token, body=b"[" * 4000)
    assert status == 400 and "not JSON" in reply["error"]


def test_twenty_people_answering_one_sample_at_once_get_one_200_and_409s_no_reset(page):
    import threading

    sid = http(base(page) + "api/state", token=page.token)[1]["pending"][0]["sample_id"]
    statuses, barrier = [], threading.Barrier(20)

    def answer(label):
        barrier.wait()
        try:
            statuses.append(http(base(page) + "api/answer", token=page.token, body={"sample_id": sid, "label": label})[0])
        except OSError as exc:  # a reset connection
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=answer, args=(i % 10,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses, key=str) == [200] + [409] * 19


def test_two_pages_on_one_database_answer_a_sample_once_and_the_second_gets_409(site):
    first = open_labeling(site["state-dir"], 0, site["data-path"], labeler="a")
    second = open_labeling(site["state-dir"], 0, site["data-path"], labeler="b")
    with serving(first), serving(second):
        sid = http(base(first) + "api/state", token=first.token)[1]["pending"][0]["sample_id"]
        # the second page checked the sample while it was pending, then the first page answered it
        second.service._pending_request(sid)
        assert http(base(first) + "api/answer", token=first.token, body={"sample_id": sid, "label": 1})[0] == 200
        original = second.service._pending_request
        second.service._pending_request = lambda s: {"round": 0}  # the race: its check passed before
        status, reply = http(base(second) + "api/answer", token=second.token, body={"sample_id": sid, "label": 2})
        second.service._pending_request = original
        assert status == 409 and "another page" in reply["error"]


def test_unsure_hands_the_sample_back(page):
    sid = http(base(page) + "api/state", token=page.token)[1]["pending"][0]["sample_id"]
    status, _ = http(base(page) + "api/unsure", token=page.token, body={"sample_id": sid})
    assert status == 200
    pool = page.service.pool
    assert pool.state_of(sid) == "unlabeled"
    [req] = [r for r in pool.requests() if r["sample_id"] == sid]
    assert req["status"] == "skipped" and req["note"] == "unsure (web:alice)"


def test_images_are_served_only_for_pending_and_labeled_samples(tmp_path):
    rng = np.random.default_rng(0)
    from fedal.data import LocalData

    X = rng.random((5, 1, 28, 28), dtype=np.float32)
    data = LocalData(0, X, np.full(5, -1), X[:0], np.zeros(0, np.int64), 2, ["normal", "pneumonia"], "image")
    pool = Pool(2, size=5, path=tmp_path / "client-0.db")
    pool.request([2], round=1)
    with serving(LabelingServer(LabelingService(pool, data))) as server:
        status, png = http(base(server) + "api/image/2.png", token=server.token)
        assert status == 200 and png.startswith(b"\x89PNG")
        assert http(base(server) + "api/image/3.png", token=server.token)[0] == 404  # not asked about
        assert http(base(server) + "api/image/77.png", token=server.token)[0] == 404
        pool.add_labeled({4: 1}, source="initial")  # a labeled one: a reference example, an answer to check
        assert http(base(server) + "api/image/4.png", token=server.token)[0] == 200
        state = http(base(server) + "api/state", token=server.token)[1]
        assert state["pending"][0]["image"] == "api/image/2.png"


def test_non_loopback_host_is_refused_unless_allowed(tmp_path):
    data_pool = Pool(2, size=3)
    from fedal.data import LocalData

    data = LocalData(0, np.zeros((3, 4), np.float32), np.full(3, -1), np.zeros((0, 4), np.float32),
                     np.zeros(0, np.int64), 2, ["a", "b"], "table")
    service = LabelingService(data_pool, data)
    for host in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(ConfigError, match="--allow-remote"):
            LabelingServer(service, host=host)
    with pytest.raises(ConfigError, match="--token"):
        LabelingServer(service, token="short")
    server = LabelingServer(service, host="localhost")
    server.server_close()


def test_fedal_label_command_prints_a_working_address(site):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.cli", "label", "--state-dir", site["state-dir"],
                             "--client-id", "0", "--data-path", site["data-path"], "--labeler", "bob"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([A-Za-z0-9_-]{32})", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        url, token = match.groups()
        status, state = http(url + "api/state", token=token)
        assert status == 200 and state["labeler"] == "web:bob" and len(state["pending"]) == 6
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    # a remote host without --allow-remote: a clear error and exit status 2
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "label", "--state-dir", site["state-dir"],
                           "--client-id", "0", "--data-path", site["data-path"], "--host", "0.0.0.0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "--allow-remote" in done.stderr


def test_unanswered_requests_expire_and_their_samples_return(tmp_path):
    """query-timeout (node config overrides the run's): what people did not answer in time is
    released; what they answered counts; the page refuses an answer to an expired request."""
    cfg = site_config(tmp_path, query_timeout=3600.0)
    node = make_site(tmp_path, cfg, oracle="web", **{"query-timeout": 1.0})
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    state = global_state(site)
    try:
        site.train(state, TrainInstruction(1, 0))
        asked = site.pool.pending_ids().tolist()
        deadlines = {r["deadline"] - r["created_at"] for r in site.pool.requests()}
        assert len(asked) == 6 and all(abs(d - 1.0) < 1e-6 for d in deadlines)
    finally:
        site.close()
    with serving(open_labeling(node["state-dir"], 0, node["data-path"])) as server:
        base = server.url.split("?")[0]
        for sid in asked[:2]:
            assert http(base + "api/answer", token=server.token, body={"sample_id": sid, "label": 1})[0] == 200
        time.sleep(1.2)
        site = ClientSite(cfg, NodeConfig.from_mapping(node))
        try:
            _, report = site.train(state, TrainInstruction(2, 3))
            expired = site.pool.requests("expired")
            assert sorted(r["sample_id"] for r in expired) == sorted(asked[2:])
            assert {r["note"] for r in expired} == {"deadline passed"}
            assert report.num_examples == 2 and report.pending == 3 and report.queries_used == 3
            still_pending = set(site.pool.pending_ids().tolist())
            back = set(site.pool.unlabeled_ids().tolist()) | still_pending  # candidates again (or re-asked)
            assert set(asked[2:]) <= back
        finally:
            site.close()
        gone = next(s for s in asked[2:] if s not in still_pending)  # 4 expired, 3 new queries
        status, reply = http(base + "api/answer", token=server.token, body={"sample_id": gone, "label": 1})
        assert status == 409 and "expired" in reply["error"]


def test_answers_given_on_the_page_can_be_checked_taken_back_and_changed(page, site):
    url, token = base(page), page.token
    pending = [p["sample_id"] for p in http(url + "api/state", token=token)[1]["pending"]]
    first, second = pending[:2]
    http(url + "api/answer", token=token, body={"sample_id": first, "label": 3})
    http(url + "api/answer", token=token, body={"sample_id": second, "label": 5})
    recent = http(url + "api/recent", token=token)[1]["recent"]
    assert [(r["sample_id"], r["label"], r["source"]) for r in recent] == [(second, 5, "web:alice"),
                                                                        (first, 3, "web:alice")]
    assert recent[0]["features"]  # digits are table rows: the page shows the row
    # undo: the sample waits again, without a new request
    status, body = http(url + "api/undo", token=token, body={"sample_id": second})
    assert status == 200 and body == {"reopened": True, "sample_id": second}
    state = http(url + "api/state", token=token)[1]
    assert second in [p["sample_id"] for p in state["pending"]] and state["progress"]["asked"] == 6
    assert http(url + "api/undo", token=token, body={"sample_id": second})[0] == 409  # nothing to take back
    # change: the label is corrected in place
    status, body = http(url + "api/change", token=token, body={"sample_id": first, "label": 4})
    assert status == 200 and body["label"] == 4 and body["before"] == "3"
    assert http(url + "api/change", token=token, body={"sample_id": first, "label": 99})[0] == 400
    assert http(url + "api/change", token=token, body={"sample_id": second, "label": 1})[0] == 409
    pool = open_site_pool(site["state-dir"], 0, load_site(site["data-path"], 0))
    assert dict(zip(*map(list, pool.labels()))) == {first: 4} and pool.state_of(second) == "pending"
    other = int(pool.unlabeled_ids()[0])
    pool.add_labeled({other: 2}, source="initial")
    pool.close()
    assert http(url + "api/undo", token=token, body={"sample_id": other})[0] == 409  # not given on the page
    examples = http(url + "api/examples", token=token)[1]["examples"]
    assert len(examples) == 10
    assert [s["sample_id"] for s in examples[4]["samples"]] == [first]
    assert [s["sample_id"] for s in examples[2]["samples"]] == [other]


# ------------------------------------------------- issue 21: history, undo scope, races
def _answer(server, sid, label):
    status, reply = http(base(server) + "api/answer", token=server.token, body={"sample_id": sid, "label": label})
    assert status == 200, reply
    return reply


def test_a_change_keeps_who_labeled_first_and_never_opens_an_undo(page, site):
    """A label imported from a file cannot be undone; changing it (even to the same class) on the page
    records who changed it, keeps who gave it, and still cannot be undone (issue 21.2)."""
    url, token = base(page), page.token
    sid = http(url + "api/state", token=token)[1]["pending"][0]["sample_id"]
    with open_site_pool(site["state-dir"], 0, load_site(site["data-path"], 0)) as other:
        other.answer({sid: 2}, source="file:filled.csv", round=0)
    status, reply = http(url + "api/undo", token=token, body={"sample_id": sid})
    assert status == 409 and "file:filled.csv" in reply["error"] and "change it" in reply["error"]
    status, reply = http(url + "api/change", token=token, body={"sample_id": sid, "label": 2})  # the same class
    assert status == 200 and reply["changed"] is False
    status, reply = http(url + "api/undo", token=token, body={"sample_id": sid})
    assert status == 409 and "file:filled.csv" in reply["error"]
    status, reply = http(url + "api/change", token=token, body={"sample_id": sid, "label": 4})
    assert status == 200 and reply["changed"] is True and reply["before"] == "2"
    assert http(url + "api/undo", token=token, body={"sample_id": sid})[0] == 409
    with open_site_pool(site["state-dir"], 0, load_site(site["data-path"], 0)) as other:
        [record] = [r for r in other.label_records() if r["id"] == sid]
        history = other.label_history(sid)
        assert other.state_of(sid) == "labeled"
    assert (record["label"], record["source"]) == (4, "file:filled.csv")  # who gave it first stays
    assert [(h["action"], h["before"], h["label"], h["given_by"], h["by"]) for h in history] == [
        ("change", 2, 4, "file:filled.csv", "web:alice")]


def test_undo_takes_back_only_this_pages_own_last_answers(site):
    """Undo and the list of last answers belong to the labeler who answered, and undo reaches back at most
    the last 10 answers given on this page (issue 21.3)."""
    with open_site_pool(site["state-dir"], 0, load_site(site["data-path"], 0)) as pool:
        pool.request(pool.unlabeled_ids()[:10].tolist(), round=1)  # 16 pending in all
    alice = open_labeling(site["state-dir"], 0, site["data-path"], labeler="alice")
    bob = open_labeling(site["state-dir"], 0, site["data-path"], labeler="bob")
    with serving(alice), serving(bob):
        pending = [p["sample_id"] for p in http(base(alice) + "api/state", token=alice.token)[1]["pending"]]
        mine, theirs = pending[:12], pending[12]
        for sid in mine:
            _answer(alice, sid, 1)
        _answer(bob, theirs, 2)  # the newest answer on the site is bob's
        recent = http(base(alice) + "api/recent", token=alice.token)[1]
        assert recent["undo"] == mine[-1]  # Backspace on alice's page takes back alice's last answer
        assert [r["sample_id"] for r in recent["recent"]] == mine[::-1][:10]  # bob's answer is not in the list
        status, reply = http(base(alice) + "api/undo", token=alice.token, body={"sample_id": theirs})
        assert status == 409 and "web:bob" in reply["error"]
        # Backspace again and again: the last 10 answers of this page come back, then it stops
        for sid in mine[::-1][:10]:
            status, reply = http(base(alice) + "api/undo", token=alice.token, body={"sample_id": sid})
            assert status == 200, reply
        assert http(base(alice) + "api/recent", token=alice.token)[1]["undo"] is None
        status, reply = http(base(alice) + "api/undo", token=alice.token, body={"sample_id": mine[1]})
        assert status == 409 and "last 10 answers" in reply["error"] and "change it" in reply["error"]
        # bob's page takes back bob's answer
        assert http(base(bob) + "api/recent", token=bob.token)[1]["undo"] == theirs
        assert http(base(bob) + "api/undo", token=bob.token, body={"sample_id": theirs})[0] == 200
    # a page started later (same labeler) lists the answers to correct but undoes none of them
    again = open_labeling(site["state-dir"], 0, site["data-path"], labeler="alice")
    with serving(again):
        recent = http(base(again) + "api/recent", token=again.token)[1]
        assert [r["sample_id"] for r in recent["recent"]] == mine[:2][::-1] and recent["undo"] is None
        status, reply = http(base(again) + "api/undo", token=again.token, body={"sample_id": mine[1]})
        assert status == 409 and "change it" in reply["error"]


def test_a_change_or_undo_racing_another_process_gets_409_and_loses_nothing(page, site):
    """A change whose sample was taken back a moment ago elsewhere, and an undo whose label was corrected a
    moment ago elsewhere, answer 409 with what happened; out-of-range changes do not talk of requests (21.4)."""
    url, token = base(page), page.token
    first, second = [p["sample_id"] for p in http(url + "api/state", token=token)[1]["pending"][:2]]
    _answer(page, first, 3)
    _answer(page, second, 5)
    status, reply = http(url + "api/change", token=token, body={"sample_id": first, "label": 99})
    assert status == 400 and "outside the 10 known classes" in reply["error"]
    assert "pending" not in reply["error"] and "stays 3" in reply["error"]
    service, data = page.service, load_site(site["data-path"], 0)
    change_label, reopen = service.pool.change_label, service.pool.reopen

    def change_after_an_undo_elsewhere(sample_id, label, **kw):
        with open_site_pool(site["state-dir"], 0, data) as other:
            other.reopen(sample_id)
        return change_label(sample_id, label, **kw)

    service.pool.change_label = change_after_an_undo_elsewhere
    status, reply = http(url + "api/change", token=token, body={"sample_id": first, "label": 4})
    service.pool.change_label = change_label
    assert status == 409 and "a moment ago" in reply["error"] and "waits for an answer" in reply["error"]

    def undo_after_a_change_elsewhere(sample_id, **kw):
        with open_site_pool(site["state-dir"], 0, data) as other:
            other.change_label(sample_id, 7, source="web:bob")
        return reopen(sample_id, **kw)

    service.pool.reopen = undo_after_a_change_elsewhere
    status, reply = http(url + "api/undo", token=token, body={"sample_id": second})
    service.pool.reopen = reopen
    assert status == 409 and "web:bob" in reply["error"]
    with open_site_pool(site["state-dir"], 0, data) as other:  # bob's correction is kept
        assert other.state_of(second) == "labeled" and dict(zip(*map(list, other.labels())))[second] == 7
