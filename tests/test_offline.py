"""A site that keeps labeling while its server is away (issue 23), without the Flower stack: the offline
requests in the database, the budgets on the wire and in the coordinator, the stored global model, the
``fedal site`` loop (spend within the grant, nothing asked twice, a restart in the middle, the head copy
exactly the global sums plus the new labels) and the labeling page's link status.

The same parts under Flower's Deployment Engine, with a SuperNode cut off: tests/test_deployment.py.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from clients.node import NodeConfig
from clients.offline import OfflineSite, ServerContact
from clients.site import ClientSite
from fedal.budget import BudgetCoordinator
from fedal.exceptions import ConfigError, DataFileError, ProtocolError
from fedal.heads import ClassStatistics
from fedal.messages import TrainInstruction, TrainReport
from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS, HeadClassifier
from fedal.offline import DEFAULT_OFFLINE_AFTER_S, DEFAULT_OFFLINE_MAX_HOURS, GlobalSnapshot, snapshot_path, standing
from fedal.pool import Pool
from server.book import RoundBook
from simulations import cli
from tests.site_helpers import make_site, site_config

RUN_ID = 7


# ------------------------------------------------------------------ the database
def test_offline_requests_count_against_their_grant_and_are_reported_once():
    pool = Pool(3, size=20)
    pool.request([0, 1], round=2)                      # an ordinary request of round 2
    pool.request([2, 3, 4], round=None, offline_grant=2)
    pool.request([5], offline_grant=4)
    assert [r["sample_id"] for r in pool.offline_requests()] == [2, 3, 4, 5]
    assert pool.offline_spent(grant_round=2) == 3 and pool.offline_spent() == 4
    pool.answer({2: 1}, source="web")
    pool.release([3], status="skipped")                # "unsure" spent the reader's time: it counts
    pool.release([4], status="expired")                # an expired request gives its budget back
    assert pool.offline_spent(grant_round=2) == 2
    assert pool.report_offline(5) == 3                 # 2, 3 and 5; reported in round 5's reply
    assert pool.report_offline(5) == 3                 # round 5 re-delivered: the same again
    assert pool.report_offline(6) == 0                 # nothing new since
    pool.request([6], offline_grant=6)
    assert pool.report_offline(7) == 1


# ------------------------------------------------------------------ the wire
def test_the_offline_grant_is_an_optional_instruction_key_and_the_spend_a_report_field():
    assert TrainInstruction.from_config({"server-round": 3, "query-budget": 4}).offline_budget == 0
    assert TrainInstruction.from_config({"server-round": 3, "query-budget": 4, "offline-budget": 9}).offline_budget == 9
    with pytest.raises(ProtocolError, match="offline-budget is -1"):
        TrainInstruction(3, 4, offline_budget=-1)
    report = TrainReport(5, 0, 2, 2, 10, 0, 0.5, 0.1, offline_spent=3)
    assert report.to_metrics()["offline-spent"] == 3
    assert TrainReport.from_metrics(report.to_metrics()).offline_spent == 3


def test_the_coordinator_takes_offline_labels_from_the_site_s_next_shares_only():
    coord = BudgetCoordinator("uniform", round_budget=20)
    coord.record_offline(3, 1, 14)
    assert coord.allocate(4, {0: _stats(), 1: _stats()}) == {0: 10, 1: 0}  # not handed to client 0: spent already
    assert coord.allocate(5, {0: _stats(), 1: _stats()}) == {0: 10, 1: 6}  # 4 of the 14 left to take
    assert [r.offline_deducted for r in coord.ledger if r.client == 1] == [10, 4]
    assert coord.allocate(6, {0: _stats(), 1: _stats()}) == {0: 10, 1: 10}
    coord.record_offline(6, 0, 3)
    again = BudgetCoordinator("uniform", round_budget=20)
    again.load_state_dict(json.loads(json.dumps(coord.state_dict())))  # a resumed server owes the same
    assert again.debt == {0: 3} and [(r.round, r.client, r.spent) for r in again.offline] == [(3, 1, 14), (6, 0, 3)]
    with pytest.raises(ConfigError, match="expected an integer >= 0"):
        coord.record_offline(7, 0, -2)


def _stats():
    from fedal.budget import ClientStats

    return ClientStats(unlabeled=100, uncertainty=0.5)


def test_the_book_grants_offline_budgets_and_counts_no_more_than_it_granted():
    book = RoundBook(BudgetCoordinator("uniform", round_budget=10), offline_budget=6)
    book.identify(100, 0)
    book.identify(101, 1)
    book.open_round(2, [100, 101], query=True)
    assert book.offline_grant(2, 100) == book.offline_grant(2, 101) == 6
    assert book.offline_grant(2, 999) == 0  # a node that has not said which client it is: no grant
    book.record_report(2, 100, _report(0, offline=0))
    book.record_report(2, 101, _report(1, offline=0))
    book.open_round(3, [100], query=True)     # client 1 is away from round 3 on
    book.record_report(3, 100, _report(0, offline=0))
    book.open_round(4, [100, 101], query=True)
    book.record_report(4, 101, _report(1, offline=9))  # says 9, but it was granted 6 before this round
    assert any(e.kind == "rejected" and "granted 6" in e.reason for e in book.rounds[4].events)
    assert book.coordinator.debt == {1: 6}
    assert book.clients_row(4)["1"]["offline_spent"] == 9 and book.clients_row(4)["1"]["offline_budget"] == 6
    last = RoundBook(BudgetCoordinator("uniform", round_budget=10), offline_budget=6, rounds=5)
    last.identify(100, 0)
    last.open_round(4, [100], query=True)
    last.open_round(5, [100], query=True)
    assert (last.offline_grant(4, 100), last.offline_grant(5, 100)) == (6, 0)  # no later reply could report it
    book.stopped = {"criterion": "plateau"}
    book.open_round(5, [100, 101], query=False)
    assert book.offline_grant(5, 100) == 0  # a run that stopped asking grants nothing


def _report(client: int, *, offline: int) -> TrainReport:
    return TrainReport(10, client, 0, 0, 50, 0, 0.5, 0.1, offline_spent=offline)


def test_node_config_offline_settings_are_checked():
    node = NodeConfig.from_mapping({"client-id": 0})
    assert (node.offline_after, node.offline_max_hours, node.offline_budget, node.suggest) == (
        DEFAULT_OFFLINE_AFTER_S, DEFAULT_OFFLINE_MAX_HOURS, None, False)
    assert NodeConfig.from_mapping({"client-id": 0, "suggest": "true", "offline-budget": 4}).offline_budget == 4
    for key, value, match in (("offline-after", -1, "offline-after must be >= 0"),
                              ("offline-max-hours", 0, "offline-max-hours must be > 0"),
                              ("offline-budget", 2.5, "offline-budget must be an integer"),
                              ("suggest", "maybe", "suggest must be true or false")):
        with pytest.raises(ConfigError, match=match):
            NodeConfig.from_mapping({"client-id": 0, key: value})


# ------------------------------------------------------------------ a site, rounds by hand
class Federation:
    """Two digits sites with simulated oracles and a server that sums their statistics, as
    :class:`server.head.StatisticsAggregation` does; each round goes through the ClientApp's steps
    (:class:`ServerContact` around :meth:`ClientSite.train`)."""

    def __init__(self, tmp_path, *, offline_budget=12, **node):
        self.cfg = site_config(tmp_path, offline_budget=offline_budget, pseudo_label_threshold=0.0,
                               strategy="margin")
        self.nodes = [make_site(tmp_path, self.cfg, cid, oracle="simulated", labels=True, **node) for cid in (0, 1)]
        self.model = None
        self.state, self.stats = None, None

    def round(self, server_round: int, clients=(0, 1), budget: int = 4) -> dict[int, TrainReport]:
        replies, reports = [], {}
        for cid in clients:
            node = NodeConfig.from_mapping(self.nodes[cid])
            site = ClientSite(self.cfg, node)
            if self.model is None:
                self.model = HeadClassifier(site.data.n_classes, site.X_pool.shape[1], shrinkage=None)
                self.state = self.model.get_state()
            instruction = TrainInstruction(server_round, budget if server_round > 1 else 0,
                                           offline_budget=self.cfg.offline_budget)
            contact = ServerContact(site, self.cfg, node, run_id=RUN_ID, run_config=self.cfg.to_run_config(),
                                    node_config=self.nodes[cid], global_state=self.state, global_stats=self.stats,
                                    instruction=instruction)
            arrays, report = site.train(self.state, instruction)
            reports[cid] = contact.report(report)
            site.close()
            replies.append(arrays)
        labeled = sum((ClassStatistics.from_arrays(a, LABELED_STATS) for a in replies[1:]),
                      ClassStatistics.from_arrays(replies[0], LABELED_STATS))
        pseudo = sum((ClassStatistics.from_arrays(a, PSEUDO_STATS) for a in replies[1:]),
                     ClassStatistics.from_arrays(replies[0], PSEUDO_STATS))
        self.model.fit_statistics(labeled, pseudo)
        self.state = self.model.get_state()
        self.stats = {**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)}
        return reports


def later(seconds: float = DEFAULT_OFFLINE_AFTER_S + 1) -> float:
    return time.time() + seconds


def test_the_global_model_is_kept_beside_the_ledger_with_its_round_and_grant(tmp_path):
    fed = Federation(tmp_path)
    fed.round(1)
    fed.round(2)
    snap = GlobalSnapshot.load(snapshot_path(tmp_path / "state", 1))
    assert (snap.run_id, snap.server_round, snap.offline_budget) == (RUN_ID, 2, 12)
    assert set(snap.global_stats) == {f"{p}.{k}" for p in (LABELED_STATS, PSEUDO_STATS) for k in ("counts", "sums",
                                                                                                   "scatter")}
    light = GlobalSnapshot.load(snapshot_path(tmp_path / "state", 1), models=False)  # what a train message reads
    assert (light.run_id, light.server_round, light.replied, light.state, light.global_stats) == (RUN_ID, 2, True, {},
                                                                                                 None)
    np.testing.assert_array_equal(light.sent_ids, snap.sent_ids)
    np.testing.assert_array_equal(light.included_ids, snap.included_ids)
    # its initial labels were in the sums of round 1, but for the classes with one label (min-class-count 2)
    first = ClientSite(fed.cfg, NodeConfig.from_mapping(fed.nodes[1]))
    ids, labels = first.pool.labels()
    first.close()
    assert 0 < len(snap.included_ids) <= 6 and set(snap.included_ids.tolist()) <= set(ids.tolist())
    sent_classes = np.bincount(labels[np.isin(ids, snap.included_ids)])
    assert np.all((sent_classes == 0) | (sent_classes >= 2))
    assert snap.node_config["data-path"] == fed.nodes[1]["data-path"]
    assert not list((tmp_path / "state").glob(".*.tmp"))  # written through a temporary file, replaced whole
    with pytest.raises(ProtocolError, match="older than round 2"):  # a message kept at the SuperLink meanwhile
        fed.round(1, clients=(1,))


def test_the_reply_is_recorded_beside_the_model_without_writing_the_model_again(tmp_path):
    from fedal.offline import reply_path

    fed = Federation(tmp_path)
    fed.round(1)
    node = NodeConfig.from_mapping(fed.nodes[1])
    path = snapshot_path(tmp_path / "state", 1)
    site = ClientSite(fed.cfg, node)
    contact = ServerContact(site, fed.cfg, node, run_id=RUN_ID, run_config=fed.cfg.to_run_config(),
                            node_config=fed.nodes[1], global_state=fed.state, global_stats=fed.stats,
                            instruction=TrainInstruction(2, 4, offline_budget=5))
    arrived = GlobalSnapshot.load(path)  # kept as soon as it came: not replied yet, the last reply's record is old
    assert (arrived.server_round, arrived.replied, len(arrived.sent_ids)) == (2, False, 0)
    written = path.stat().st_mtime_ns, path.stat().st_ino
    _, report = site.train(fed.state, TrainInstruction(2, 4, offline_budget=5))
    contact.report(report)
    site.close()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == written  # the model was written once
    replied = GlobalSnapshot.load(path)
    assert replied.replied and len(replied.sent_ids) > 0
    np.testing.assert_array_equal(replied.sent_ids, json.loads(reply_path(path).read_text())["sent_ids"])
    for key, value in replied.state.items():
        np.testing.assert_array_equal(value, arrived.state[key])
    reply_path(path).write_text("{not json")
    with pytest.raises(DataFileError, match=r"reply record .*cannot be read.*delete .*reply.json"):
        GlobalSnapshot.load(path, models=False)
    fed.round(3, clients=(1,))  # a train message takes an unreadable record as no reply, and writes a new one
    assert GlobalSnapshot.load(path).replied


def test_offline_site_asks_within_its_grant_nothing_twice_and_survives_a_restart(tmp_path):
    fed = Federation(tmp_path, offline_budget=12)
    fed.round(1)
    fed.round(2)
    state = tmp_path / "state"
    loop = OfflineSite(state, 1, batch=5)
    assert loop.step()["state"] == "connected"  # the server spoke a moment ago: nothing asked
    pool = loop.site.pool
    assert pool.offline_spent() == 0
    labeled_before = pool.counts()["labeled"]
    first = loop.step(now=later())
    assert (first["state"], first["asked"], first["spent"], first["left"]) == ("offline", 5, 5, 7)
    loop.close()  # the process is stopped in the middle ...
    again = OfflineSite(state, 1, batch=5)  # ... and started anew: it goes on from the database
    steps = [again.step(now=later()) for _ in range(4)]
    assert [s["asked"] for s in steps] == [5, 2, 0, 0] and steps[-1]["state"] == "spent"
    pool = again.site.pool
    offline = pool.offline_requests()
    assert len(offline) == 12 == pool.offline_spent(grant_round=2)
    asked = [r["sample_id"] for r in pool.requests()]
    assert len(asked) == len(set(asked))  # nothing asked twice
    assert pool.counts()["labeled"] == labeled_before + 12
    shown = standing(pool, now=later())
    assert (shown["connected"], shown["offline_budget"], shown["offline_left"], shown["answers_waiting"]) == (
        False, 12, 0, 12)
    again.close()
    # the server is back: the next round trains on every label and reports the offline spend once
    reports = fed.round(3)
    assert reports[1].offline_spent == 12 and reports[0].offline_spent == 0
    assert reports[1].num_examples == labeled_before + 12 + reports[1].queries_used
    assert fed.round(4)[1].offline_spent == 0


def test_the_head_copy_is_the_global_sums_plus_the_new_labels_exactly(tmp_path):
    fed = Federation(tmp_path, offline_budget=8)
    fed.round(1)
    fed.round(2)
    fed.round(3)
    loop = OfflineSite(tmp_path / "state", 1, batch=8)
    loop.step(now=later())
    site = loop.site
    # what the server would solve if site 0 stood still and site 1 sent every label it has now
    sums = ClassStatistics.empty(site.data.n_classes, site.X_pool.shape[1])
    for cid in (0, 1):
        other = ClientSite(fed.cfg, NodeConfig.from_mapping(fed.nodes[cid]))
        X, y = other.learner.labeled_data()
        if cid == 0:  # the sums site 1 holds are round 2's (they came with round 3): site 0's labels sent then
            snap = GlobalSnapshot.load(snapshot_path(tmp_path / "state", 0))
            keep = np.isin(other.pool.labels()[0], snap.included_ids)
            assert 0 < keep.sum() < len(keep)
            X, y = X[keep], y[keep]
        sums = sums + ClassStatistics.from_samples(X, y, site.data.n_classes)
        other.close()
    expected = HeadClassifier(site.data.n_classes, site.X_pool.shape[1])
    expected.fit_statistics(sums)
    got = site.model.get_state()
    for key, value in expected.get_state().items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-9, err_msg=key)
    loop.close()


def test_an_expired_site_asks_nothing_and_a_file_site_exports_its_offline_requests(tmp_path):
    fed = Federation(tmp_path, offline_budget=6, **{"offline-max-hours": 1})
    fed.round(1)
    fed.round(2)
    loop = OfflineSite(tmp_path / "state", 1)
    out = loop.step(now=later(2 * 3600))
    assert (out["state"], out["asked"]) == ("expired", 0)
    loop.close()
    fed.nodes[1]["oracle"] = "file"  # people answer by file while the server is away
    fed.nodes[1]["offline-max-hours"] = 72
    fed.round(3)
    loop = OfflineSite(tmp_path / "state", 1, batch=3)
    out = loop.step(now=later())
    assert (out["state"], out["asked"], out["waiting"]) == ("offline", 3, 3)
    csv = (tmp_path / "state" / "exchange-1" / "requests.csv").read_text().splitlines()
    assert len(csv) - 1 >= 3
    loop.close()


def _offline_site_with_suggestions(tmp_path):
    """Site 1 of a federation, web oracle with suggestions on, after one offline step: (federation, loop, data)."""
    from fedal.sitedata import load_site

    fed = Federation(tmp_path, offline_budget=4)
    fed.round(1)
    fed.round(2)
    fed.nodes[1].update({"oracle": "web", "suggest": True})
    fed.round(3)
    loop = OfflineSite(tmp_path / "state", 1, batch=4)
    loop.step(now=later())
    return fed, loop, load_site(fed.nodes[1]["data-path"], 1)


def test_suggestions_reach_the_labeling_page_only_where_the_site_turned_them_on(tmp_path):
    from clients.labeling import LabelingService

    fed, loop, data = _offline_site_with_suggestions(tmp_path)
    page = LabelingService(loop.site.pool, data).state()
    offline = [p for p in page["pending"] if p["offline"]]
    assert len(offline) == 4 and all(0 <= p["suggestion"]["confidence"] <= 1 for p in offline)
    assert page["link"]["offline_left"] == 0 and page["link"]["offline_budget"] == 4
    loop.close()


def test_fedal_site_without_a_stored_model_says_what_to_do(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    assert cli.main(["site", "--state-dir", str(tmp_path / "state"), "--client-id", "3", "--once"]) == 2
    err = capsys.readouterr().err
    assert "no stored global model" in err and "take part in one round first" in err
    assert cli.main(["site", "--state-dir", str(tmp_path), "--client-id", "0", "--every", "0"]) == 2
    assert "--every must be a number of seconds > 0" in capsys.readouterr().err


def test_a_message_older_than_the_round_timeout_is_refused_and_a_new_one_kept_at_once(tmp_path):
    from clients.offline import stale_problem

    cfg = site_config(tmp_path, round_timeout=60.0)
    stale_problem(cfg, 3, time.time() - 30)  # the server still waits for it
    with pytest.raises(ProtocolError, match="longer than the run's round-timeout"):
        stale_problem(cfg, 3, time.time() - 61)
    fed = Federation(tmp_path)
    fed.round(1)
    node = NodeConfig.from_mapping(fed.nodes[1])
    site = ClientSite(fed.cfg, node)
    ServerContact(site, fed.cfg, node, run_id=RUN_ID, run_config=fed.cfg.to_run_config(), node_config=fed.nodes[1],
                  global_state=fed.state, global_stats=fed.stats, instruction=TrainInstruction(2, 4, offline_budget=5),
                  sent_at=time.time())
    # the site is cut off before it replies: the model of the message is kept all the same
    snap = GlobalSnapshot.load(snapshot_path(tmp_path / "state", 1))
    assert (snap.server_round, snap.replied, snap.offline_budget, len(snap.sent_ids)) == (2, False, 5, 0)
    assert standing(site.pool)["connected"] and not standing(site.pool, now=later())["connected"]
    assert (standing(site.pool)["offline_budget"], standing(site.pool)["offline_left"]) == (5, 5)
    site.close()


def test_fedal_site_once_says_where_the_site_stands(tmp_path, capsys):
    fed = Federation(tmp_path)
    fed.round(1)
    fed.round(2)
    assert cli.main(["site", "--state-dir", str(tmp_path / "state"), "--client-id", "1", "--once"]) == 0
    assert "connected (model of round 2)" in capsys.readouterr().out


def _train_by_hand(cfg, raw: dict, state: dict, stats: dict | None, server_round: int) -> dict:
    """One train message to the site of node config ``raw`` as the ClientApp handles it (3 labels to ask from
    round 2, an offline grant of 4); returns the reply's arrays."""
    node = NodeConfig.from_mapping(raw)
    site = ClientSite(cfg, node)
    instruction = TrainInstruction(server_round, 3 if server_round > 1 else 0, offline_budget=4)
    contact = ServerContact(site, cfg, node, run_id=RUN_ID, run_config=cfg.to_run_config(), node_config=raw,
                            global_state=state, global_stats=stats, instruction=instruction)
    arrays, report = site.train(state, instruction)
    contact.report(report)
    site.close()
    return arrays


def test_a_network_site_fine_tunes_its_copy_of_the_stored_weights_on_every_label(tmp_path):
    from fedal.models import model_for

    cfg = site_config(tmp_path, pipeline="network", offline_budget=4, local_epochs=1, min_local_steps=2)
    raw = make_site(tmp_path, cfg, 0, oracle="simulated", labels=True)
    node = NodeConfig.from_mapping(raw)
    site = ClientSite(cfg, node)
    state = model_for(cfg, site.X_pool.shape[1:], site.data.n_classes, seed=cfg.seed).get_state()
    site.close()
    for server_round in (1, 2):  # the site's own weights come back as the next global model
        state = _train_by_hand(cfg, raw, state, None, server_round)
    loop = OfflineSite(tmp_path / "state", 0, batch=4)
    out = loop.step(now=later())
    assert (out["state"], out["asked"], out["spent"]) == ("offline", 4, 4)
    stored = GlobalSnapshot.load(snapshot_path(tmp_path / "state", 0)).state
    copy = loop.site.model.get_state()
    assert any(not np.array_equal(copy[k], stored[k]) for k in stored)  # trained on the labels, not the stored one
    assert loop.step(now=later())["state"] == "spent"
    loop.close()


def test_a_handover_site_adds_its_labels_to_the_stored_sums_and_fine_tunes_its_network(tmp_path):
    """pipeline = handover: the copy's head is the stored sums plus the labels given offline, exactly; its network
    is the stored one fine-tuned on every label; the flag of which one serves is kept."""
    from fedal.models import model_for
    from fedal.models.handover_adapter import HEAD_PREFIX, NET_PREFIX, prefixed, unprefixed

    cfg = site_config(tmp_path, pipeline="handover", offline_budget=4, pseudo_label_threshold=0.0, local_epochs=1,
                      min_local_steps=2)
    raw = make_site(tmp_path, cfg, 0, oracle="simulated", labels=True)
    node = NodeConfig.from_mapping(raw)
    site = ClientSite(cfg, node)
    server = model_for(cfg, site.X_pool.shape[1:], site.data.n_classes, seed=cfg.seed, raw_shape=site.data.input_shape)
    site.close()
    state, stats = server.get_state(), None
    for server_round in (1, 2):  # a server of this one site: the head of its sums, its network as it came back
        arrays = _train_by_hand(cfg, raw, state, stats, server_round)
        head = unprefixed(arrays, HEAD_PREFIX)
        labeled, pseudo = (ClassStatistics.from_arrays(head, p) for p in (LABELED_STATS, PSEUDO_STATS))
        server.head.fit_statistics(labeled, pseudo)
        server.net.set_state(unprefixed(arrays, NET_PREFIX))
        state, stats = server.get_state(), {**labeled.to_arrays(LABELED_STATS), **pseudo.to_arrays(PSEUDO_STATS)}
    loop = OfflineSite(tmp_path / "state", 0, batch=4)
    out = loop.step(now=later())
    assert (out["state"], out["asked"], out["spent"]) == ("offline", 4, 4)
    copy, pool = loop.site.model, loop.site.pool
    ids, labels = pool.labels()
    features = copy.features(loop.site.X_pool[loop.site.learner.rows(ids)])
    expected = HeadClassifier(loop.site.data.n_classes, copy.head.dim)
    expected.fit_statistics(ClassStatistics.from_samples(features, labels, loop.site.data.n_classes))
    got = copy.get_state()
    for key, value in prefixed(expected.get_state(), HEAD_PREFIX).items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-9, err_msg=key)
    assert any(not np.array_equal(got[k], state[k]) for k in state if k.startswith(NET_PREFIX))
    assert copy.serving == "head"
    loop.close()


# ------------------------------------------------------------------ issue 32, item 4: the offline site's faults
def test_two_overlapping_site_steps_never_spend_more_than_the_grant(tmp_path):
    """Two `fedal site` steps on one state folder, the second choosing its requests while the first writes its own:
    the grant is counted in the transaction that writes the requests, so together they ask for 12, not 24."""
    fed = Federation(tmp_path, offline_budget=12)
    fed.round(1)
    fed.round(2)
    first, second = OfflineSite(tmp_path / "state", 1, batch=12), OfflineSite(tmp_path / "state", 1, batch=12)
    first._open()
    query = first.site.learner.query

    def overlapped(*args, **kwargs):  # the other step runs between this one's budget check and its writes
        assert second.step(now=later())["asked"] == 12
        return query(*args, **kwargs)

    first.site.learner.query = overlapped
    out = first.step(now=later())
    pool = first.site.pool
    assert pool.offline_spent(grant_round=2) == 12 == len(pool.offline_requests())
    assert (out["asked"], out["spent"], out["state"]) == (0, 12, "offline")
    asked = [r["sample_id"] for r in pool.requests()]
    assert len(asked) == len(set(asked))
    first.close()
    second.close()


def test_a_second_fedal_site_loop_on_one_state_dir_is_refused_naming_the_first(tmp_path, capsys):
    import os

    from clients.offline import site_lock

    fed = Federation(tmp_path)
    fed.round(1)
    argv = ["site", "--state-dir", str(tmp_path / "state"), "--client-id", "1", "--once"]
    with site_lock(tmp_path / "state", 1):  # a loop that runs (its lock, held by this process)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"another `fedal site` (pid {os.getpid()}) already runs for client 1" in err and "Traceback" not in err
    assert cli.main(argv) == 0  # released when its holder ends
    assert "connected (model of round 1)" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["offline-after", "offline-max-hours", "label-wait", "query-timeout"])
@pytest.mark.parametrize("value", ["nan", float("nan")])
def test_nan_node_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"node config {key} must be a number, got nan"):
        NodeConfig.from_mapping({"client-id": 0, key: value})


def test_a_mistyped_state_dir_is_refused_instead_of_waiting_for_ever(tmp_path, capsys, monkeypatch):
    def waited(seconds):
        raise AssertionError("fedal site waited for a state folder that will never appear")

    monkeypatch.setattr("clients.site_command.time.sleep", waited)
    assert cli.main(["site", "--state-dir", str(tmp_path / "nosuch"), "--client-id", "0"]) == 2
    assert f"--state-dir {tmp_path / 'nosuch'} does not exist" in capsys.readouterr().err
    state = tmp_path / "state"
    state.mkdir()
    (state / "client-0.db").write_bytes(b"")
    (state / "client-2.db").write_bytes(b"")
    assert cli.main(["site", "--state-dir", str(state), "--client-id", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds no state of client 1" in err and "it holds the state of client(s) 0, 2: check --client-id" in err
    (tmp_path / "afile").write_text("")
    assert cli.main(["site", "--state-dir", str(tmp_path / "afile"), "--client-id", "0"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_suggestions_leave_the_labeling_page_when_the_site_turns_them_off(tmp_path):
    from clients.labeling import LabelingService
    from clients.node import NODE_KEYS

    fed, loop, data = _offline_site_with_suggestions(tmp_path)
    assert any("suggestion" in p for p in LabelingService(loop.site.pool, data).state()["pending"])
    loop.close()
    fed.nodes[1]["suggest"] = False  # the SuperNode restarted without them: its next message takes them off
    fed.round(4)
    loop = OfflineSite(tmp_path / "state", 1, batch=4)
    loop._open()
    page = LabelingService(loop.site.pool, data).state()
    assert page["pending"] and not any("suggestion" in p for p in page["pending"])
    loop.step(now=later())
    assert not any("suggestion" in p for p in LabelingService(loop.site.pool, data).state()["pending"])
    loop.close()
    # the node table says who computes them
    assert "`fedal site`" in NODE_KEYS["suggest"] and "must run" in NODE_KEYS["suggest"]
    from pathlib import Path

    row = next(line for line in (Path(__file__).parents[1] / "docs" / "DEPLOYMENT.md").read_text().splitlines()
               if line.startswith("| `suggest` |"))
    assert "`fedal site`" in row and "must run" in row


def _rewrite_snapshot(path, *, meta=None, arrays=None, raw: bytes | None = None) -> None:
    if raw is not None:
        path.write_bytes(raw)
        return
    with np.load(path, allow_pickle=False) as f:
        content = {k: f[k] for k in f.files}
    stored = json.loads(str(content["meta"]))
    if meta is not None:
        meta(stored)
        content["meta"] = np.asarray(json.dumps(stored))
    if arrays is not None:
        arrays(content)
    np.savez(path, **content)


def _drop_grant(meta):
    del meta["offline_budget"]


def _text_grant(meta):
    meta["offline_budget"] = "twelve"


def _nan_weights(content):
    key = next(k for k in content if k.startswith("state/") and np.issubdtype(content[k].dtype, np.floating))
    content[key] = np.full_like(content[key], np.nan)


@pytest.mark.parametrize("damage, problem", [
    (dict(meta=_drop_grant), "lacks 'offline_budget' in its 'meta' entry"),
    (dict(meta=_text_grant), "has offline_budget = 'twelve' in its 'meta' entry; expected an offline budget"),
    (dict(arrays=_nan_weights), "NaN or infinite value(s)"),
    (dict(raw=bytes(range(256)) * 4), "is not a .npz archive (it does not begin as a zip file"),
])
def test_a_damaged_stored_global_model_is_named_with_what_is_wrong_and_the_fix(tmp_path, capsys, damage, problem):
    fed = Federation(tmp_path)
    fed.round(1)
    fed.round(2)
    path = snapshot_path(tmp_path / "state", 1)
    _rewrite_snapshot(path, **damage)
    assert cli.main(["site", "--state-dir", str(tmp_path / "state"), "--client-id", "1", "--once"]) == 2
    err = capsys.readouterr().err
    assert problem in err and str(path) in err, err
    assert f"delete {path}: the site's next train message writes it again" in err
    assert "pickled" not in err and "Traceback" not in err
    fed.round(3)  # as it says: the next round writes it again
    assert GlobalSnapshot.load(path).server_round == 3


def test_a_site_clock_hours_ahead_of_the_server_s_takes_every_round_and_still_refuses_a_stale_one(tmp_path):
    """The site's clock is two hours ahead of the server's (round-timeout 60 s): its messages are measured against
    the freshest it had, so each round is taken; one that waited ten minutes at the SuperLink is refused, and the
    message does not blame a SuperLink for what a clock could do."""
    fed = Federation(tmp_path)
    fed.cfg = fed.cfg.replace(round_timeout=60.0)
    fed.round(1)
    node = NodeConfig.from_mapping(fed.nodes[1])

    def deliver(server_round: int, sent_at: float) -> None:
        site = ClientSite(fed.cfg, node)
        try:
            ServerContact(site, fed.cfg, node, run_id=RUN_ID, run_config=fed.cfg.to_run_config(),
                          node_config=fed.nodes[1], global_state=fed.state, global_stats=fed.stats,
                          instruction=TrainInstruction(server_round, 4, offline_budget=5), sent_at=sent_at)
        finally:
            site.close()

    for server_round in (2, 3, 4):
        deliver(server_round, time.time() - 7200)  # the server's clock reads two hours earlier than the site's
    with pytest.raises(ProtocolError, match="waited at the SuperLink") as refused:
        deliver(4, time.time() - 7200 - 600)
    assert "by this site's clock it came 7800 s after its time, the freshest 7200 s after" in str(refused.value)


def test_a_wall_clock_set_forward_or_back_does_not_fake_the_server_s_presence(tmp_path, monkeypatch):
    from clients.offline import note_contact, stale_problem

    pool = Pool(3, size=10)
    node = NodeConfig.from_mapping({"client-id": 0, "offline-after": 900})
    cfg = site_config(tmp_path, round_timeout=60.0)
    stale_problem(cfg, 1, time.time(), pool=pool)  # a fresh message: the clocks agree
    note_contact(pool, node, 1)
    wall, boot = time.time, time.clock_gettime
    # 2000 s pass (by the boot clock) and the wall clock is set back a day: the server is away all the same
    monkeypatch.setattr(time, "clock_gettime", lambda clock: boot(clock) + 2000)
    monkeypatch.setattr(time, "time", lambda: wall() - 86400)
    status = standing(pool)
    assert not status["connected"] and status["clock_problem"] is None
    # set forward an hour instead: a fresh message (made 2000 s after the first, by the server's clock) reads an hour
    # older than it is by the wall clock, and is taken all the same; one made ten minutes before that is not
    monkeypatch.setattr(time, "time", lambda: wall() + 3600)
    stale_problem(cfg, 2, wall() + 2000, pool=pool)
    with pytest.raises(ProtocolError, match="about 600 s before it reached this site"):
        stale_problem(cfg, 2, wall() + 1400, pool=pool)
    pool.close()


def test_a_clock_set_back_while_the_machine_was_off_is_said_not_shown_as_connected():
    from fedal.offline import LAST_CONTACT, LAST_CONTACT_CLOCK

    pool = Pool(3, size=10)
    later_contact = time.time() + 5000  # the last message came at a time the clock now reads as to come
    pool.set_meta(LAST_CONTACT, repr(later_contact))
    pool.set_meta(LAST_CONTACT_CLOCK, json.dumps({"wall": later_contact, "boot": "another boot", "up": 10.0}))
    status = standing(pool)
    assert not status["connected"]
    assert "clock reads 5000 s earlier than at the last message from the server" in status["clock_problem"]
    pool.close()
