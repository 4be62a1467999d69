"""The pool's bookkeeping: states, validation, durability and the budget ledger."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fedal.exceptions import ConfigError, InvalidLabelError, UnknownSampleError
from fedal.pool import Pool


@pytest.fixture
def pool():
    with Pool(3, size=6) as p:
        yield p


def snapshot(p: Pool) -> dict:
    """Everything a user could observe about a pool."""
    ids, labels = p.labels()
    return {
        "ids": p.ids.tolist(),
        "labels": dict(zip(ids.tolist(), labels.tolist())),
        "pending": p.pending_ids().tolist(),
        "unlabeled": p.unlabeled_ids().tolist(),
        "requests": p.requests(),
        "records": p.label_records(),
        "budgets": p.budgets(),
    }


# ------------------------------------------------------------------- ids and states
def test_non_contiguous_ids_are_kept_and_addressable():
    with Pool(3, ids=[105, 7, 42, 9000]) as p:
        assert p.ids.tolist() == [7, 42, 105, 9000]
        assert len(p) == 4
        p.request([42, 9000])
        p.answer({42: 2, 9000: 0}, source="test")
        ids, labels = p.labels()
        assert dict(zip(ids.tolist(), labels.tolist())) == {42: 2, 9000: 0}
        assert p.unlabeled_ids().tolist() == [7, 105]
        assert p.state_of(105) == "unlabeled"
        with pytest.raises(UnknownSampleError):
            p.request([0])  # row 0 is not an id of this pool


def test_duplicate_ids_and_missing_size_are_rejected():
    with pytest.raises(ConfigError, match="unique"):
        Pool(3, ids=[1, 2, 2])
    with pytest.raises(ConfigError, match="ids or size"):
        Pool(3)
    with pytest.raises(ConfigError, match="n_classes"):
        Pool(1, size=4)


def test_state_transitions(pool):
    assert pool.counts() == {"unlabeled": 6, "pending": 0, "labeled": 0}
    pool.request([1, 2, 3], round=0)
    assert pool.pending_ids().tolist() == [1, 2, 3]
    assert [pool.state_of(i) for i in (0, 1)] == ["unlabeled", "pending"]

    assert pool.answer({1: 0, 2: 1}, source="test", round=0) == 2
    assert pool.counts() == {"unlabeled": 3, "pending": 1, "labeled": 2}
    assert pool.labeled_ids().tolist() == [1, 2]

    assert pool.release([3], status="skipped", note="user skipped") == 1
    assert pool.state_of(3) == "unlabeled"
    by_sample = {r["sample_id"]: r for r in pool.requests()}
    assert by_sample[1]["status"] == "answered" and by_sample[1]["closed_at"] is not None
    assert by_sample[3]["status"] == "skipped" and by_sample[3]["note"] == "user skipped"

    # the next request of a released sample is a new request
    pool.request([3])
    assert [r["status"] for r in pool.requests() if r["sample_id"] == 3] == ["skipped", "pending"]


@pytest.mark.parametrize(
    "action",
    [
        lambda p: p.request([1]),  # already labeled
        lambda p: p.request([0]),  # already pending
        lambda p: p.answer({2: 0}, source="test"),  # never asked
        lambda p: p.answer({1: 0}, source="test"),  # labeled: no relabeling through answer
        lambda p: p.release([2]),  # not pending
    ],
    ids=["request-labeled", "request-pending", "answer-unlabeled", "answer-labeled", "release-unlabeled"],
)
def test_wrong_state_is_refused_and_changes_nothing(pool, action):
    pool.request([0, 1])
    pool.answer({1: 2}, source="test")
    before = snapshot(pool)
    with pytest.raises(ConfigError, match="cannot"):
        action(pool)
    assert snapshot(pool) == before


def test_request_ids_must_be_distinct(pool):
    with pytest.raises(ConfigError, match="distinct"):
        pool.request([1, 1])
    assert pool.counts()["pending"] == 0


def test_release_status_is_validated(pool):
    pool.request([0])
    with pytest.raises(ConfigError, match="expired"):
        pool.release([0], status="answered")
    assert pool.state_of(0) == "pending"


def test_large_batches_past_sqlite_variable_limit():
    with Pool(4, size=2500) as p:
        p.request(range(2000))
        assert p.answer({i: i % 4 for i in range(2000)}, source="bulk") == 2000
        assert p.counts() == {"unlabeled": 500, "pending": 0, "labeled": 2000}


# ----------------------------------------------------------------- label validation
@pytest.mark.parametrize(
    "label",
    [3, -1, 10**12, True, np.bool_(False), 1.5, math.nan, math.inf, "1", None, [1]],
    ids=["n_classes", "negative", "huge", "bool", "np-bool", "non-integer-float", "nan", "inf", "str", "None",
         "list"],
)
def test_invalid_label_is_rejected_and_request_stays_pending(pool, label):
    pool.request([0])
    with pytest.raises(InvalidLabelError, match=r"0\.\.2"):  # names the valid range
        pool.answer({0: label}, source="test")
    assert pool.state_of(0) == "pending"
    assert pool.labels()[0].size == 0
    assert [r["status"] for r in pool.requests()] == ["pending"]


@pytest.mark.parametrize("label, expected", [(2.0, 2), (np.int64(1), 1), (np.float32(0.0), 0), (np.uint8(2), 2)])
def test_integer_valued_labels_are_accepted_as_int(pool, label, expected):
    pool.request([0])
    pool.answer({0: label}, source="test")
    assert pool.labels()[1].tolist() == [expected]
    assert type(pool.label_records()[0]["label"]) is int


def test_one_bad_label_in_a_batch_writes_nothing(pool):
    pool.request([0, 1, 2])
    before = snapshot(pool)
    with pytest.raises(InvalidLabelError):
        pool.answer({0: 1, 1: 7, 2: 0}, source="test")
    assert snapshot(pool) == before


def test_one_unknown_id_in_a_batch_writes_nothing(pool):
    pool.request([0, 1])
    before = snapshot(pool)
    with pytest.raises(UnknownSampleError, match="99"):
        pool.answer({0: 1, 99: 0, 1: 2}, source="test")
    assert snapshot(pool) == before


@pytest.mark.parametrize(
    "action",
    [
        lambda p: p.request([99]),
        lambda p: p.answer({99: 0}, source="t"),
        lambda p: p.release([99]),
        lambda p: p.add_labeled({99: 0}, source="t"),
        lambda p: p.state_of(99),
    ],
    ids=["request", "answer", "release", "add_labeled", "state_of"],
)
def test_unknown_id_errors_name_the_id(pool, action):
    with pytest.raises(UnknownSampleError, match="99") as info:
        action(pool)
    assert isinstance(info.value, KeyError)  # callers may catch it as a missing key
    assert pool.counts() == {"unlabeled": 6, "pending": 0, "labeled": 0}


# -------------------------------------------------------------------- add_labeled
def test_add_labeled_records_an_initial_set(pool):
    assert pool.add_labeled({4: 1, 5: 2}, source="initial", round=-1) == 2
    assert pool.labeled_ids().tolist() == [4, 5]
    assert [(r["label"], r["source"], r["round"]) for r in pool.label_records()] == [(1, "initial", -1),
                                                                                   (2, "initial", -1)]
    assert [r["status"] for r in pool.requests()] == ["answered", "answered"]


def test_add_labeled_with_a_bad_label_leaves_every_sample_unlabeled(pool):
    with pytest.raises(InvalidLabelError):
        pool.add_labeled({4: 1, 5: 3}, source="initial")
    assert pool.counts() == {"unlabeled": 6, "pending": 0, "labeled": 0}
    assert pool.requests() == []


def test_label_records_have_source_time_and_round(pool):
    t0 = time.time()
    pool.add_labeled({0: 1}, source="initial")
    pool.request([3], round=4)
    pool.answer({3: 2}, source="web:alice", round=4)
    t1 = time.time()
    records = {r["id"]: r for r in pool.label_records()}
    assert records[0]["source"] == "initial" and records[0]["round"] is None
    assert records[3] == {"id": 3, "label": 2, "source": "web:alice", "labeled_at": records[3]["labeled_at"],
                          "round": 4}
    assert all(t0 <= r["labeled_at"] <= t1 for r in records.values())


# ----------------------------------------------------------------- expiry, budgets
def test_expire_overdue_returns_samples_to_the_pool(pool):
    start = time.time()
    pool.request([1, 2], round=0, timeout_s=10)
    pool.request([3], round=0)  # no deadline: never expires
    assert pool.expire_overdue(now=start + 5) == []
    assert pool.expire_overdue(now=start + 11) == [1, 2]
    assert pool.pending_ids().tolist() == [3]
    assert {1, 2} <= set(pool.unlabeled_ids().tolist())
    expired = pool.requests(status="expired")
    assert [r["sample_id"] for r in expired] == [1, 2]
    assert all(r["note"] == "deadline passed" for r in expired)
    # the budget they held can be spent again: they can be requested and answered anew
    pool.request([1])
    pool.answer({1: 0}, source="test")
    assert pool.state_of(1) == "labeled"
    assert pool.expire_overdue(now=start + 1e6) == []  # the answered request does not expire


def test_expire_overdue_leaves_answered_requests_alone(pool):
    start = time.time()
    pool.request([0, 1], timeout_s=1)
    pool.answer({0: 2}, source="test")
    assert pool.expire_overdue(now=start + 2) == [1]
    assert pool.state_of(0) == "labeled"


def test_budget_ledger(pool):
    assert pool.budgets() == []
    pool.set_budget(2, 10)
    pool.set_budget(1, 5)
    pool.spend_budget(1, 4)
    pool.set_budget(2, 12)  # a re-assignment replaces, it does not add
    pool.spend_budget(3, 1)  # spending in a round with no assignment records assigned 0
    assert pool.budgets() == [
        {"round": 1, "assigned": 5, "spent": 4},
        {"round": 2, "assigned": 12, "spent": 0},
        {"round": 3, "assigned": 0, "spent": 1},
    ]


def test_meta(pool):
    assert pool.get_meta("last_round") is None
    assert pool.get_meta("last_round", "-1") == "-1"
    pool.set_meta("last_round", 3)
    pool.set_meta("last_round", 4)
    assert pool.get_meta("last_round") == "4"


# --------------------------------------------------------------------- durability
IDS = [3, 10, 11, 50, 51, 52, 99]


def test_file_pool_survives_close_and_reopen(tmp_path):
    path = tmp_path / "state" / "pool.sqlite"  # parent folder is created
    with Pool(4, ids=IDS, path=path) as p:
        p.add_labeled({3: 0}, source="initial")
        p.request([10, 11, 50], round=1, timeout_s=60)
        p.answer({10: 3}, source="simulated", round=1)
        p.release([50], status="skipped")
        p.set_budget(1, 3)
        p.spend_budget(1, 3)
        p.set_meta("last_round", 1)
        before = snapshot(p)
    with Pool(4, ids=reversed(IDS), path=path) as p:  # order of the ids does not matter
        assert snapshot(p) == before
        assert p.get_meta("last_round") == "1"
        assert p.pending_ids().tolist() == [11]
        p.answer({11: 1}, source="simulated", round=2)  # work goes on where it stopped
    with Pool(4, ids=IDS, path=path) as p:
        assert p.labels()[0].tolist() == [3, 10, 11]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_classes": 4, "ids": IDS[:-1]}, "differs"),
        ({"n_classes": 4, "ids": [*IDS[:-1], 100]}, "differs"),
        ({"n_classes": 5, "ids": IDS}, "classes"),
    ],
    ids=["fewer-ids", "other-ids", "n_classes"],
)
def test_reopen_with_other_data_names_the_fix(tmp_path, kwargs, match):
    path = tmp_path / "pool.sqlite"
    with Pool(4, ids=IDS, path=path) as p:
        p.add_labeled({3: 1}, source="initial")
    with pytest.raises(ConfigError, match=match) as info:
        Pool(path=path, **kwargs)
    assert "new state directory" in str(info.value)
    with Pool(4, ids=IDS, path=path) as p:  # the refused reopen changed nothing
        assert p.labels()[0].tolist() == [3] and len(p) == len(IDS)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from fedal.pool import Pool

    pool = Pool(3, size=10, path=sys.argv[1])
    pool.request([4, 5, 6], round=0)
    pool.answer({4: 2, 5: 0}, source="person")
    os.kill(os.getpid(), signal.SIGKILL)  # right after answer() returned: no close, no exit handlers
    """
)


def test_acknowledged_label_survives_sigkill(tmp_path):
    path = tmp_path / "pool.sqlite"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr
    with Pool(3, size=10, path=path) as p:
        ids, labels = p.labels()
        assert dict(zip(ids.tolist(), labels.tolist())) == {4: 2, 5: 0}
        assert p.pending_ids().tolist() == [6]
        assert {r["sample_id"]: r["status"] for r in p.requests()} == {4: "answered", 5: "answered", 6: "pending"}


def test_a_label_can_be_changed_and_an_answer_taken_back_without_new_budget(tmp_path):
    from fedal.exceptions import SampleStateError

    pool = Pool(3, size=6, path=tmp_path / "p.db")
    pool.add_labeled({0: 1}, source="initial")
    pool.request([2, 3], round=1)
    pool.answer({2: 0, 3: 2}, source="web:ann", round=1)
    assert pool.change_label(2, 1, source="web:bob") == 0
    assert dict(zip(*map(list, pool.labels())))[2] == 1
    # who gave the label first stays with it; the change and who made it are in the history
    assert next(r for r in pool.label_records() if r["id"] == 2)["source"] == "web:ann"
    assert pool.change_label(2, 1, source="web:bob") == 1  # the same class: nothing written
    assert [(h["action"], h["before"], h["label"], h["given_by"], h["by"]) for h in pool.label_history()] == [
        ("change", 0, 1, "web:ann", "web:bob")]
    with pytest.raises(InvalidLabelError, match="the label was not changed"):
        pool.change_label(2, 7, source="web")
    with pytest.raises(SampleStateError, match="'web:bob' corrected it since"):
        pool.reopen(2, by="web:ann", given_by="web:ann")  # ann cannot take back bob's correction
    with pytest.raises(SampleStateError, match="'web:ann' gave it, not 'web:bob'"):
        pool.reopen(3, by="web:bob", given_by="web:bob")
    pool.reopen(3)  # undo: the request waits again, the label is gone, nothing new was asked
    assert pool.label_history(3) == [{**pool.label_history(3)[0], "action": "undo", "before": 2, "label": None,
                                      "given_by": "web:ann", "by": "web:ann"}]
    assert pool.state_of(3) == "pending" and 3 not in pool.labels()[0].tolist()
    asked = [(r["sample_id"], r["status"]) for r in pool.requests() if r["round"] == 1]
    assert asked == [(2, "answered"), (3, "pending")]
    before = len(pool.requests())
    pool.answer({3: 0}, source="web:ann", round=1)
    assert pool.state_of(3) == "labeled" and len(pool.requests()) == before
    with pytest.raises(SampleStateError, match="not labeled"):
        pool.change_label(4, 0, source="web")
    pool.close()
