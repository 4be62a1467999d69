"""Faults and bad input: the federation keeps going, loses no label, and refuses bad input cleanly.

Marker ``faults``. Two real federations on Flower's Simulation Engine (digits, 2-3
clients) with faults injected by a test ClientApp (:mod:`faults_helpers`: Flower mods in
front of ``clients.app``'s own functions, driven by a fault plan file), plus in-process
checks of the strategy, the DP wrapper, the client site and the ``fedal simulate``
command. At the end pytest prints one line::

    faults: injected=N finished=N labels_lost=N together=N lying=N actors_killed=N aggregated_short=N

``injected``: faults that fired (in the Ray workers' fault log, or in the test itself);
``finished``: scenarios that ran to their end despite their fault (a federation that
finished all its rounds, a client round that completed, a command that refused bad input
with its error and exit status); ``labels_lost``: labels (and pending requests) a client
had recorded before a fault and no longer had after it; ``together``: rounds in which several
sites failed at once; ``lying``: replies whose report could not be true (refused); ``actors_killed``:
simulation actors killed under a client (replaced); ``aggregated_short``: rounds aggregated from fewer
usable replies than the run allows (the tests assert it stays 0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import (
    RECORD_FLAG,
    FaultyOracle,
    db_labels,
    db_states,
    fault_client_app,
    injected,
    model_digest,
    snapshot_path,
    write_plan,
)

from clients.node import NodeConfig
from fedal.config import FederationConfig
from fedal.flower import protocol
from fedal.messages import TrainInstruction

pytestmark = pytest.mark.faults
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the summary
@dataclasses.dataclass
class Tally:
    injected: int = 0
    finished: int = 0
    labels_lost: int = 0
    together: int = 0
    lying: int = 0
    actors_killed: int = 0
    aggregated_short: int = 0

    def line(self) -> str:
        return (f"faults: injected={self.injected} finished={self.finished} labels_lost={self.labels_lost} "
                f"together={self.together} lying={self.lying} actors_killed={self.actors_killed} "
                f"aggregated_short={self.aggregated_short}")


TALLY = Tally()


class _SummaryPlugin:
    """Prints the tally in pytest's terminal summary (also under ``-q``)."""

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(TALLY.line())


@pytest.fixture(scope="session", autouse=True)
def fault_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("fedal-fault-summary"):
        manager.register(_SummaryPlugin(), "fedal-fault-summary")
    return TALLY


def count_lost(before: dict, after_labels: dict[int, int], after_states: dict | None = None) -> int:
    """Labels in ``before`` (a snapshot) missing or changed after, plus pending requests gone."""
    lost = [i for i, y in before.get("labels", {}).items() if after_labels.get(int(i)) != int(y)]
    gone = []
    if after_states is not None:
        kept = set(after_states["pending"]) | set(after_states["labeled"])
        gone = [i for i in before.get("pending", []) if int(i) not in kept]
    return len(lost) + len(gone)


def small_cfg(output_dir, **overrides) -> FederationConfig:
    """A federation of seconds: digits, IID, tiny local training."""
    settings = dict(dataset="digits", partition="iid", initial_labels=8, round_budget=12, local_epochs=1,
                    min_local_steps=20, min_clients=2, seed=0, output_dir=str(output_dir))
    settings.update(overrides)
    return FederationConfig(**settings)


def db_rows(db_path, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# ============================================================ 1. chaos federation
ROUND_TIMEOUT = 45.0  # above round 1's cold start of the Ray actors on a loaded 2-core machine
STRAGGLE = ROUND_TIMEOUT + 10
CHAOS_PLAN = {
    0: {2: "oracle-error", 3: "crash-in-oracle"},
    1: {2: "crash", 4: f"straggle:{STRAGGLE:g}"},
    2: {1: "inf", 2: "nan", 3: "wrong-shapes", 4: "wrong-keys", 5: "extra-metric"},
}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    """3 clients, 5 rounds, with every client misbehaving in some round (see CHAOS_PLAN)."""
    from simulations.engine import run_in_simulation

    out = tmp_path_factory.mktemp("chaos")
    # one fault per client and round, but two sites misbehave in most rounds: min-clients 1 lets the one
    # usable reply through (the sites failing together are section 8's, under min-clients 2)
    cfg = small_cfg(out, clients=3, rounds=5, round_timeout=ROUND_TIMEOUT, min_clients=1)
    write_plan(out, CHAOS_PLAN)
    run_in_simulation(cfg, cpus=2, client_app=fault_client_app())
    results = json.loads((out / "results.json").read_text())
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    fired = injected(out)
    TALLY.injected += len(fired)
    if [r["round"] for r in results["rounds"]] == list(range(1, cfg.rounds + 1)):
        TALLY.finished += 1
    return dict(cfg=cfg, out=out, results=results, state=state, fired=fired,
                rows={r["round"]: r for r in results["rounds"]}, events=results["events"])


def test_a_run_in_which_every_client_failed_every_round_fails_and_says_why(tmp_path):
    from simulations.engine import run_in_simulation

    cfg = small_cfg(tmp_path / "out", clients=2, rounds=2, round_timeout=ROUND_TIMEOUT)
    write_plan(cfg.output_dir, {c: {r: "crash" for r in (1, 2)} for c in range(2)})
    TALLY.injected += 4
    with pytest.raises(RuntimeError, match=r"every client failed every round.*died in round 1"):
        run_in_simulation(cfg, cpus=2, client_app=fault_client_app())
    TALLY.finished += 1


def test_a_run_refuses_an_output_folder_holding_another_run(tmp_path, capsys):
    from simulations.cli import main

    out = tmp_path / "out"
    (out / "clients").mkdir(parents=True)
    (out / "results.json").write_text('{"rounds": []}')
    (out / "clients" / "client-0.db").write_bytes(b"another run's labels")
    before = _tree(out)
    TALLY.injected += 1
    assert main(["simulate", "--output-dir", str(out), "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    assert _tree(out) == before  # nothing of the other run was touched
    TALLY.finished += 1


def test_resume_with_other_settings_is_refused_before_ray_starts(tmp_path, capsys):
    from simulations.cli import main

    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    cfg = small_cfg(out)
    (out / "checkpoint" / "state.json").write_text(json.dumps({"round": 1, "results": {"config": cfg.to_run_config()}}))
    start = time.perf_counter()
    assert main(["simulate", "--output-dir", str(out), "--resume", "--alpha", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "alpha 0.5 -> 0.3" in err and time.perf_counter() - start < 20


def test_every_planned_fault_fired_and_all_rounds_finished(chaos):
    fired = {(f["client"], f["round"], f["fault"]) for f in chaos["fired"]}
    planned = {(c, r, f) for c, rounds in CHAOS_PLAN.items() for r, f in rounds.items()}
    assert fired == planned
    assert sorted(chaos["rows"]) == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["accuracy"]) for r in chaos["rows"].values())


def test_crashed_client_is_left_out_and_the_round_completes_with_the_others(chaos):
    r2 = chaos["rows"][2]
    assert set(r2["clients"]) == {"0", "2"}  # client 1 crashed before replying
    failed = [e for e in chaos["events"] if e["round"] == 2 and e["kind"] == "failed"]
    assert len(failed) == 1 and failed[0]["detail"].startswith("client 1 (node ")
    assert "injected: client 1 died in round 2" in failed[0]["detail"]  # the client's own error, short
    assert "Traceback" not in failed[0]["detail"]


def test_failed_clients_budget_is_carried_to_the_next_round(chaos):
    cfg, ledger = chaos["cfg"], chaos["state"]["budget"]["ledger"]
    by_round: dict[int, list[dict]] = {}
    for row in ledger:
        by_round.setdefault(row["round"], []).append(row)
    assert sorted(by_round) == [2, 3, 4, 5]  # round 1 labels the initial sets, no budget
    failed_r2 = [r for r in by_round[2] if r["status"] == "failed"]
    assert [r["client"] for r in failed_r2] == [1]  # the ledger names clients by their client id
    assert sum(r["assigned"] for r in by_round[2]) == cfg.round_budget
    for rnd in (3, 4, 5):
        carried = sum(r["assigned"] for r in by_round[rnd - 1] if r["status"] == "failed")
        assert carried > 0, f"round {rnd - 1} had a failed client"
        assert sum(r["assigned"] for r in by_round[rnd]) == cfg.round_budget + carried
    # the clients that answered spent exactly what they were given
    assert all(r["spent"] == r["assigned"] for rows in by_round.values() for r in rows if r["status"] == "spent")


def test_crashed_client_resumes_from_its_own_database_with_no_label_lost(chaos):
    out, cfg = chaos["out"], chaos["cfg"]
    snap = json.loads(snapshot_path(out, 1, 2).read_text())
    db = cfg.client_state_dir / "client-1.db"
    final = db_labels(db)
    lost = count_lost(snap, final)
    TALLY.labels_lost += lost
    assert lost == 0
    budgets = {r: (a, s) for r, a, s in db_rows(db, "SELECT round, assigned, spent FROM budgets")}
    # the crash came after its round-2 labels were written: they are in the snapshot
    assert len(snap["labels"]) == cfg.initial_labels + budgets[2][1]
    # round 3 went on from that database (no fresh initial set, no lost round-2 labels)
    r3 = chaos["rows"][3]["clients"]["1"]
    assert r3["labeled"] == len(snap["labels"]) + r3["queried"]
    # (round 4's message is still asleep when the run ends: count the rounds before it)
    early = db_rows(db, "SELECT COUNT(*) FROM labels WHERE round <= 3")[0][0]
    assert early == cfg.initial_labels + budgets[2][1] + budgets[3][1]


def test_straggler_is_left_out_of_its_round_and_not_waited_for(chaos):
    r4, r5 = chaos["rows"][4], chaos["rows"][5]
    assert "1" not in r4["clients"]
    failed = [e for e in chaos["events"] if e["round"] == 4 and e["kind"] == "failed"]
    assert len(failed) == 1 and failed[0]["detail"].startswith("client 1 (node ")
    assert "no reply before the round timeout" in failed[0]["detail"]
    # the server waited for the round timeout, not for the straggler's reply
    assert ROUND_TIMEOUT - 1 <= r4["seconds"] < STRAGGLE
    assert "1" in r5["clients"]  # and it is back the round after
    assert r5["seconds"] < ROUND_TIMEOUT


def test_oracle_failures_leave_requests_pending_until_an_answer_comes(chaos):
    out, cfg, rows = chaos["out"], chaos["cfg"], chaos["rows"]
    db = cfg.client_state_dir / "client-0.db"
    # round 2: the oracle raised OracleError; the client still trained and replied
    r2 = rows[2]["clients"]["0"]
    assert r2["queried"] == r2["budget"] > 0 and r2["labeled"] == cfg.initial_labels
    # round 3: the process died while asking; its round-2 and round-3 requests were pending
    snap = json.loads(snapshot_path(out, 0, 3).read_text())
    asked = dict(db_rows(db, "SELECT sample_id, round FROM requests WHERE round IN (2, 3)"))
    assert sorted(snap["pending"]) == sorted(asked)
    # round 4: the oracle is back and answers every one of them; nothing pending, expired or lost
    statuses = db_rows(db, "SELECT status, COUNT(*) FROM requests GROUP BY status")
    assert dict(statuses) == {"answered": len(db_labels(db))}
    answered_in = dict(db_rows(db, "SELECT sample_id, round FROM labels WHERE sample_id IN (%s)"
                                   % ",".join(str(i) for i in asked)))
    assert set(answered_in.values()) == {4}
    lost = count_lost(snap, db_labels(db), db_states(db))
    TALLY.labels_lost += lost
    assert lost == 0


def test_corrupted_updates_are_rejected_logged_with_the_client_and_not_aggregated(chaos):
    rejected = {e["round"]: e["detail"] for e in chaos["events"] if e["kind"] == "rejected"}
    expected = {1: "holds NaN or Inf", 2: "holds NaN or Inf", 3: "has shape", 4: "wrong keys", 5: "'sneaky'"}
    assert sorted(rejected) == sorted(expected)
    for rnd, fragment in expected.items():
        assert rejected[rnd].startswith("client 2 (node ") and fragment in rejected[rnd], rejected[rnd]
    with np.load(chaos["out"] / "checkpoint" / "model.npz") as weights:
        assert all(np.isfinite(weights[k]).all() for k in weights.files)
    assert chaos["rows"][5]["accuracy"] > 0.5  # 10 classes: a poisoned model sits near 0.1


# ===================================================== 2. server restart (resume)
class ServerKilled(RuntimeError):
    """The injected death of the server process."""


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    """2 clients, 4 rounds with DP; the server dies after round 2 and is restarted with resume."""
    from server import app as server_app
    from simulations.engine import run_in_simulation

    out = tmp_path_factory.mktemp("restart")
    cfg = small_cfg(out, clients=2, rounds=4, round_timeout=120.0, dp_clipping_norm=1.0, dp_noise_multiplier=1.0,
                    pipeline="network")
    (out / RECORD_FLAG).touch()

    def server_dies(row):
        if row["round"] == 2:
            raise ServerKilled("injected: server killed after round 2")

    server_app.ROUND_HOOKS.append(server_dies)
    try:
        with pytest.raises(Exception) as died:
            run_in_simulation(cfg, cpus=2, client_app=fault_client_app())
    finally:
        server_app.ROUND_HOOKS.remove(server_dies)
    TALLY.injected += 1
    dbs = [cfg.client_state_dir / f"client-{c}.db" for c in range(cfg.clients)]
    from server.results import RunRecorder

    checkpoint_digest = model_digest(RunRecorder(out, {}).load_checkpoint()[1])
    before = dict(results=json.loads((out / "results.json").read_text()),
                  state=json.loads((out / "checkpoint" / "state.json").read_text()),
                  labels=[db_labels(db) for db in dbs],
                  budgets=[db_rows(db, "SELECT round, assigned, spent FROM budgets ORDER BY round") for db in dbs])
    run_in_simulation(dataclasses.replace(cfg, resume=True), cpus=2, client_app=fault_client_app())
    after = dict(results=json.loads((out / "results.json").read_text()),
                 state=json.loads((out / "checkpoint" / "state.json").read_text()),
                 labels=[db_labels(db) for db in dbs],
                 budgets=[db_rows(db, "SELECT round, assigned, spent FROM budgets ORDER BY round") for db in dbs])
    if len(after["results"]["rounds"]) == cfg.rounds:
        TALLY.finished += 1
    return dict(cfg=cfg, out=out, died=died.value, before=before, after=after, checkpoint_digest=checkpoint_digest)


def test_server_death_leaves_a_checkpoint_of_the_last_round(restart):
    assert "injected: server killed after round 2" in str(restart["died"])
    before = restart["before"]
    assert [r["round"] for r in before["results"]["rounds"]] == [1, 2]
    assert before["state"]["round"] == 2


def test_resume_continues_to_the_last_round_with_the_earlier_rounds_kept(restart):
    before, after = restart["before"], restart["after"]
    assert [r["round"] for r in after["results"]["rounds"]] == [1, 2, 3, 4]
    assert after["results"]["rounds"][:2] == before["results"]["rounds"]
    assert after["state"]["round"] == 4


def test_resume_starts_from_the_checkpointed_model(restart):
    out, cfg = restart["out"], restart["cfg"]
    for client in range(cfg.clients):
        received = (out / f"received-c{client}-r3.txt").read_text()
        assert received == restart["checkpoint_digest"], f"client {client} got another model in round 3"


def test_resume_continues_the_budget_ledger(restart):
    cfg = restart["cfg"]
    old, new = restart["before"]["state"]["budget"]["ledger"], restart["after"]["state"]["budget"]["ledger"]
    assert new[: len(old)] == old  # round 2's rows kept as they were
    rounds = sorted({r["round"] for r in new})
    assert rounds == [2, 3, 4]
    for rnd in (3, 4):
        assert sum(r["assigned"] for r in new if r["round"] == rnd) == cfg.round_budget


def test_resume_continues_the_client_databases_with_no_label_lost(restart):
    cfg, before, after = restart["cfg"], restart["before"], restart["after"]
    for client in range(cfg.clients):
        lost = count_lost({"labels": before["labels"][client]}, after["labels"][client])
        TALLY.labels_lost += lost
        assert lost == 0
        assert after["budgets"][client][: len(before["budgets"][client])] == before["budgets"][client]
        spent = {r: s for r, _, s in after["budgets"][client]}
        assert sorted(spent) == [1, 2, 3, 4] and spent[1] == 0  # round 1: initial labels only
        assert len(after["labels"][client]) == len(before["labels"][client]) + spent[3] + spent[4]


def test_resume_continues_the_privacy_accounting(restart):
    cfg, rows = restart["cfg"], restart["after"]["results"]["rounds"]
    assert [r["privacy"]["releases"] for r in rows] == [1, 2, 3, 4]
    accountant = _accountant([cfg.dp_noise_multiplier] * 4)  # both clients aggregated every round
    assert rows[-1]["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(cfg.dp_delta), rel=1e-9)
    assert rows[-1]["privacy"]["delta"] == cfg.dp_delta


# ================================================= 3. aggregation, in process
class FakeGrid:
    """All :meth:`Strategy.configure_train` asks of a Grid."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _digits_model():
    from fedal.federation import federation_dataset
    from fedal.models import build_model

    ds = federation_dataset(FederationConfig(dataset="digits"))
    return build_model(ds.input_shape, ds.n_classes, seed=0)


def _digits_reference():
    return _digits_model().get_state()


def _report(client: int, n: int = 20) -> protocol.TrainReport:
    return protocol.TrainReport(num_examples=n, client_id=client, queries_used=0, labels_added=0,
                                unlabeled_left=100, pending=0, mean_uncertainty=0.5, train_loss=1.0)


def _strategy(tmp_path, **overrides):
    from fedal.budget import BudgetCoordinator
    from server.book import RoundBook
    from server.privacy import PrivacySettings
    from server.strategy import make_strategy

    cfg = FederationConfig(**{**dict(dataset="digits", clients=5, min_clients=2, output_dir=str(tmp_path),
                                     pipeline="network"), **overrides})
    reference = _digits_reference()
    book = RoundBook(BudgetCoordinator(cfg.budget_policy, cfg.round_budget), PrivacySettings.from_config(cfg))
    strategy = make_strategy(cfg, book, _digits_model())
    return cfg, strategy, reference


def _events(strategy, server_round: int, kind: str) -> dict[int, str]:
    """node -> reason of the round's events of ``kind``."""
    return {e.node: e.reason for e in strategy.book.rounds[server_round].events if e.kind == kind}


def _round(strategy, reference, updates: dict[int, dict], server_round: int = 1) -> dict:
    """Send round ``server_round`` to the nodes of ``updates`` and answer with them
    ({node: state, or an Exception for an error reply}); return {node: reply}."""
    from flwr.app import ConfigRecord, Error, Message

    messages = list(strategy.configure_train(server_round, protocol.model_record(reference),
                                             ConfigRecord(), FakeGrid(sorted(updates))))
    replies = {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        update = updates[node]
        if isinstance(update, Exception):
            replies[node] = Message(Error(code=0, reason=str(update)), reply_to=msg)
        else:
            replies[node] = protocol.train_reply(msg, update, _report(node - 1))
    return dict(sorted(replies.items()))


def _flat(state: dict) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in sorted(state)])


@pytest.mark.parametrize("aggregation", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_aggregations_construct_run_and_resist_a_poisoned_finite_update(flower_task, tmp_path, aggregation):
    _, strategy, ref = _strategy(tmp_path, aggregation=aggregation)
    rng = np.random.default_rng(0)
    honest = {n: {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in ref.items()} for n in range(1, 5)}
    poisoned = {k: v + 50.0 for k, v in ref.items()}  # finite: check_update cannot tell
    replies = _round(strategy, ref, {**honest, 5: poisoned})
    TALLY.injected += 1
    arrays, metrics = strategy.aggregate_train(1, list(replies.values()))
    assert arrays is not None and metrics["clients"] >= 1
    agg = _flat(protocol.state_from_record(arrays))
    honest_mean = np.mean([_flat(s) for s in honest.values()], axis=0)
    assert np.abs(agg - honest_mean).max() < 0.1  # fedavg would be 10 off (50 / 5)
    assert set(strategy.book.rounds[1].reports) == {0, 1, 2, 3, 4}  # by client id (node n is client n - 1)
    TALLY.finished += 1


def test_fedavg_is_not_robust_to_that_update(flower_task, tmp_path):
    """The contrast that shows the robust test above can fail."""
    _, strategy, ref = _strategy(tmp_path, aggregation="fedavg")
    updates = {n: {k: v.copy() for k, v in ref.items()} for n in range(1, 5)}
    updates[5] = {k: v + 50.0 for k, v in ref.items()}
    replies = _round(strategy, ref, updates)
    arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    shift = _flat(protocol.state_from_record(arrays)) - _flat(ref)
    assert np.allclose(shift, 10.0, atol=1e-3)


def test_malformed_replies_are_rejected_without_stopping_the_round(flower_task, tmp_path):
    from flwr.app import ConfigRecord, MetricRecord

    _, strategy, ref = _strategy(tmp_path, aggregation="krum")
    updates = {n: {k: v.copy() for k, v in ref.items()} for n in range(1, 6)}
    updates[1] = RuntimeError("client process died")
    replies = _round(strategy, ref, updates)
    replies[2].content[protocol.ARRAYS] = protocol.model_record(  # same keys, another order: accepted
        dict(reversed(list(protocol.state_from_record(replies[2].content[protocol.ARRAYS]).items()))))
    del replies[3].content[protocol.ARRAYS]
    replies[4].content["extra"] = ConfigRecord({"sample-ids": "1,2,3"})
    replies[5].content[protocol.METRICS] = MetricRecord({**dict(replies[5].content[protocol.METRICS]),
                                                         "num-examples": 0})
    TALLY.injected += 4
    arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    failed, rejected = _events(strategy, 1, "failed"), _events(strategy, 1, "rejected")
    assert set(failed) == {1} and "client process died" in failed[1]
    assert "records" in rejected[3] and "records" in rejected[4]
    assert 4 in strategy.book.rounds[1].reports and 5 not in rejected  # no labels yet: reported, not aggregated
    assert 2 not in rejected and arrays is not None  # Krum pairs arrays by position: order fixed
    assert np.allclose(_flat(protocol.state_from_record(arrays)), _flat(ref))
    TALLY.finished += 1


def test_a_round_with_no_usable_update_keeps_the_model(flower_task, tmp_path):
    _, strategy, ref = _strategy(tmp_path)
    replies = _round(strategy, ref, {n: RuntimeError("down") for n in range(1, 6)})
    assert strategy.aggregate_train(1, list(replies.values())) == (None, None)
    assert strategy.aggregate_evaluate(1, []) is None


# ======================================================= 4. differential privacy
# epsilon of Gaussian releases, from Google's dp-accounting 0.6.0 RdpAccountant
# (add-or-remove-one, no amplification): (noise multipliers, delta) -> epsilon
DP_REFERENCE = [
    ([1.0], 1e-5, 4.728507067217623),
    ([1.0] * 4, 1e-5, 10.725509696418232),
    ([0.5] * 6, 1e-5, 34.12663110385034),
    ([2.0] * 10, 1e-6, 8.84687435850794),
    ([0.8, 1.2, 1.0], 1e-5, 9.467245539746509),
    ([5.0] * 100, 1e-5, 10.725509696418221),
]


def _accountant(multipliers, delta: float = 1e-5):
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from server.privacy import GaussianAccountant, privacy_config

    accountant = GaussianAccountant(privacy_config(delta, 10))
    for sigma in multipliers:
        accountant.compose(GaussianPrivacyEvent(sigma, 10, 10))
    return accountant


@pytest.mark.parametrize("multipliers, delta, epsilon", DP_REFERENCE)
def test_accountant_matches_googles_dp_accounting(multipliers, delta, epsilon):
    from server.privacy import GaussianAccountant

    accountant = _accountant(multipliers, delta)
    assert accountant.get_epsilon(delta) == pytest.approx(epsilon, rel=1e-9)
    spent = accountant.get_privacy_spent()  # Flower's result type, at the configured delta
    assert (spent.epsilon, spent.delta, spent.num_releases) == (accountant.get_epsilon(delta), delta, len(multipliers))
    assert accountant.get_delta(spent.epsilon) == pytest.approx(delta, rel=1e-6)  # the same conversion, inverted
    restored = GaussianAccountant(accountant.config)
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.get_epsilon(delta) == accountant.get_epsilon(delta)


def test_accountant_follows_flowers_protocol_and_refuses_a_noiseless_release():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        PrivacyAccountant,
    )

    accountant = _accountant([])
    assert accountant.get_epsilon(1e-5) == 0.0 and accountant.num_releases == 0
    for name in [n for n in vars(PrivacyAccountant) if not n.startswith("_")]:
        assert callable(getattr(accountant, name)) or isinstance(getattr(type(accountant), name), property), name
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        GaussianPrivacyEvent(0.0, 10, 10)
    event = GaussianPrivacyEvent(1.0, 10, 10)
    assert not accountant.would_exceed(event, max_epsilon=10.0) and accountant.would_exceed(event, max_epsilon=1.0)


def test_dp_is_a_wrapper_configured_in_its_constructor_and_evaluation_keeps_its_weights(flower_task, tmp_path):
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from server.dp import PrivateAggregation
    from server.strategy import BudgetedStrategy

    _, strategy, ref = _strategy(tmp_path, dp_clipping_norm=1.0, dp_noise_multiplier=1.0)
    assert isinstance(strategy, BudgetedStrategy) and isinstance(strategy.inner, PrivateAggregation)
    assert isinstance(strategy.inner.inner, FedAvg) and strategy.inner.accountant is strategy.book.accountant
    # evaluation keeps its own weights (the number of test samples)
    messages = strategy.configure_evaluate(1, protocol.model_record(ref), ConfigRecord(), FakeGrid(range(1, 6)))
    replies = [protocol.eval_reply(m, num_examples=10 * (i + 1), client_id=i, loss=1.0, accuracy=0.1 * (i + 1))
               for i, m in enumerate(messages)]
    metrics = strategy.aggregate_evaluate(1, replies)
    weights = [10 * (i + 1) for i in range(5)]
    assert metrics["eval-acc"] == pytest.approx(sum(w * w / 100 for w in weights) / sum(weights))


def test_server_side_clipping_bounds_each_update_and_noise_has_the_calibrated_scale(flower_task, tmp_path):

    clip, sigma = 0.5, 2.0
    rng = np.random.default_rng(1)
    ref = _digits_reference()
    updates = {n: {k: v + rng.normal(0, 1.0, v.shape).astype(v.dtype) for k, v in ref.items()} for n in range(1, 6)}
    # clipping only: the mean of updates each clipped to norm 0.5
    _, strategy, _ = _strategy(tmp_path, dp_clipping_norm=clip, dp_noise_multiplier=0.0)
    replies = _round(strategy, ref, {n: {k: v.copy() for k, v in u.items()} for n, u in updates.items()})
    arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    clipped_mean = _flat(protocol.state_from_record(arrays)) - _flat(ref)
    expected = np.mean([(_flat(u) - _flat(ref)) * min(1, clip / np.linalg.norm(_flat(u) - _flat(ref)))
                        for u in updates.values()], axis=0)
    assert np.allclose(clipped_mean, expected, atol=1e-5)
    assert strategy.book.privacy_report()["epsilon"] is None  # no noise, no guarantee
    # with noise, one of the 5 sampled clients failing: std sigma*C/5, accounted as sigma*4/5
    _, strategy, _ = _strategy(tmp_path, dp_clipping_norm=clip, dp_noise_multiplier=sigma)
    replies = _round(strategy, ref, {**{n: {k: v.copy() for k, v in u.items()} for n, u in updates.items()},
                                     3: RuntimeError("down")})
    arrays, _ = strategy.aggregate_train(1, list(replies.values()))
    kept = [u for n, u in updates.items() if n != 3]
    clean = np.mean([(_flat(u) - _flat(ref)) * min(1, clip / np.linalg.norm(_flat(u) - _flat(ref))) for u in kept],
                    axis=0)
    noise = _flat(protocol.state_from_record(arrays)) - _flat(ref) - clean
    assert noise.std() == pytest.approx(sigma * clip / 5, rel=0.05)
    report = strategy.book.privacy_report()
    accountant = _accountant([sigma * 4 / 5])
    assert report["releases"] == 1 and report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))


def test_dp_with_a_robust_aggregation_reports_no_epsilon(flower_task, tmp_path):
    _, strategy, ref = _strategy(tmp_path, aggregation="fedmedian", dp_clipping_norm=1.0, dp_noise_multiplier=1.0)
    replies = _round(strategy, ref, {n: {k: v.copy() for k, v in ref.items()} for n in range(1, 6)})
    assert strategy.aggregate_train(1, list(replies.values()))[0] is not None
    report = strategy.book.privacy_report()
    assert report["epsilon"] is None and "fedmedian" in report["note"]


def test_client_side_clipping_through_the_real_client_app(flower_task, tmp_path):
    """dp-mode = client: the ClientApp clips before replying; the server refuses an unclipped update."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from clients.app import app as client_app

    clip = 0.05
    cfg, strategy, ref = _strategy(tmp_path, clients=2, dp_clipping_norm=clip, dp_noise_multiplier=0.0,
                                   dp_mode="client", local_epochs=1, min_local_steps=10)
    messages = list(strategy.configure_train(1, protocol.model_record(ref), _config_record(), FakeGrid([1, 2])))
    assert all(m.content[protocol.CONFIG][KEY_CLIPPING_NORM] == clip for m in messages)
    replies = []
    for i, msg in enumerate(messages):
        context = Context(run_id=0, node_id=msg.metadata.dst_node_id, state=RecordDict(),
                          node_config={"partition-id": i, "state-dir": str(tmp_path / "clients")},
                          run_config=cfg.to_run_config())
        replies.append(client_app(msg, context))
    for reply in replies:
        assert not reply.has_error(), reply.error
        delta = _flat(protocol.state_from_record(reply.content[protocol.ARRAYS])) - _flat(ref)
        assert np.linalg.norm(delta) <= clip * (1 + 1e-4)
    # a client that does not clip: its update is refused and logged, the other one is used
    cheat = protocol.state_from_record(replies[1].content[protocol.ARRAYS])
    replies[1].content[protocol.ARRAYS] = protocol.model_record({k: v + 1.0 for k, v in cheat.items()})
    TALLY.injected += 1
    arrays, _ = strategy.aggregate_train(1, replies)
    node = replies[1].metadata.src_node_id
    assert "did not clip" in _events(strategy, 1, "rejected")[node]
    assert np.allclose(_flat(protocol.state_from_record(arrays)),
                       _flat(protocol.state_from_record(replies[0].content[protocol.ARRAYS])), atol=1e-6)
    TALLY.finished += 1


def _config_record():
    from flwr.app import ConfigRecord

    return ConfigRecord()


# ============================================================ 5. oracles at a site
@pytest.fixture
def site(tmp_path):
    from clients.site import ClientSite

    def make(**overrides):
        cfg = small_cfg(tmp_path, clients=3, **overrides)
        return ClientSite(cfg, NodeConfig.from_mapping({"partition-id": 0, "state-dir": str(tmp_path / "clients")}))

    return make


@pytest.mark.parametrize("kind", ["oracle-error", "oracle-timeout"])
def test_an_oracle_that_fails_leaves_requests_pending_and_the_round_completes(site, kind):
    s = site()
    try:
        s.train(s.model.get_state(), TrainInstruction(1, 0))
        labels_before = dict(zip(*map(list, s.pool.labels())))
        s.learner.oracle = FaultyOracle(s.oracle, kind)
        TALLY.injected += 1
        with pytest.warns(UserWarning, match="did not answer"):
            _, report = s.train(s.model.get_state(), TrainInstruction(2, 5))
        assert (report.queries_used, report.labels_added, report.pending) == (5, 0, 5)
        TALLY.finished += 1
        s.learner.oracle = s.oracle  # the oracle is back: the pending requests are answered first
        _, report = s.train(s.model.get_state(), TrainInstruction(3, 3))
        assert (report.labels_added, report.pending) == (5 + 3, 0)
        after = dict(zip(*map(list, s.pool.labels())))
        lost = count_lost({"labels": {str(k): v for k, v in labels_before.items()}}, after)
        TALLY.labels_lost += lost
        assert lost == 0
    finally:
        s.close()


def test_an_oracle_answering_garbage_records_only_valid_answers(site):
    s = site()
    try:
        s.train(s.model.get_state(), TrainInstruction(1, 0))
        s.learner.oracle = FaultyOracle(s.oracle, "oracle-noise")
        TALLY.injected += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, report = s.train(s.model.get_state(), TrainInstruction(2, 6))
        assert (report.labels_added, report.pending) == (1, 5)  # one true answer; the rest stay pending
        messages = " | ".join(str(w.message) for w in caught)
        for fragment in ("outside the", "not a class index", "no pending request"):
            assert fragment in messages
        labels = s.pool.label_records()
        assert all(0 <= r["label"] < 10 for r in labels)
        TALLY.finished += 1
    finally:
        s.close()


def test_requests_expire_after_the_query_timeout_and_go_back_to_the_pool(site):
    s = site(query_timeout=0.05)
    try:
        s.train(s.model.get_state(), TrainInstruction(1, 0))
        s.learner.oracle = FaultyOracle(s.oracle, "oracle-timeout")
        TALLY.injected += 1
        with pytest.warns(UserWarning):
            s.train(s.model.get_state(), TrainInstruction(2, 4))
        asked = {r["sample_id"] for r in s.pool.requests("pending")}
        assert len(asked) == 4 and all(r["deadline"] is not None for r in s.pool.requests("pending"))
        time.sleep(0.1)
        s.learner.oracle = s.oracle
        _, report = s.train(s.model.get_state(), TrainInstruction(3, 2))
        expired = {r["sample_id"] for r in s.pool.requests("expired")}
        assert expired == asked  # released at the start of round 3, not answered late
        assert (report.labels_added, report.pending) == (2, 0)
        TALLY.finished += 1
    finally:
        s.close()


def test_a_negative_budget_from_the_server_is_refused_by_the_client():
    from fedal.exceptions import ProtocolError

    with pytest.raises(ProtocolError, match="negative query budget"):
        TrainInstruction.from_config({protocol.SERVER_ROUND: 2, protocol.QUERY_BUDGET: -3})
    with pytest.raises(ProtocolError, match="no 'query-budget'"):  # a missing budget is not a budget of 0
        TrainInstruction.from_config({protocol.SERVER_ROUND: 2})
    with pytest.raises(ProtocolError, match="not an integer"):
        TrainInstruction.from_config({protocol.SERVER_ROUND: 2, protocol.QUERY_BUDGET: 2.5})


# ============================================================== 6. bad input
def _write_npz(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(train_images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8),
                  train_labels=rng.integers(0, 3, (60, 1)),
                  test_images=rng.integers(0, 255, (12, 28, 28), dtype=np.uint8),
                  test_labels=rng.integers(0, 3, (12, 1)))
    arrays.update(changes)
    for key in [k for k, v in arrays.items() if v is None]:
        del arrays[key]
    np.savez(path, **arrays)
    return path


def _bad_inputs(folder: Path) -> dict[str, tuple[list[str], str]]:
    good = _write_npz(folder / "good.npz")
    truncated = folder / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    toml = folder / "broken.toml"
    toml.write_text("clients = = 3\n")
    return {
        "missing data file": (["--dataset", str(folder / "missing.npz")], "does not exist"),
        "truncated data file": (["--dataset", str(truncated)], "is truncated or not a valid .npz"),
        "malformed data file": (["--dataset", str(_write_npz(folder / "keys.npz", train_images=None,
                                                             images=np.zeros((60, 28, 28), np.uint8)))],
                                "expected the MedMNIST layout"),
        "wrong image shape": (["--dataset", str(_write_npz(folder / "shape.npz",
                                                           train_images=np.zeros((60, 6, 6), np.uint8),
                                                           test_images=np.zeros((12, 6, 6), np.uint8)))],
                              "images of at least 8x8"),
        "labels out of range": (["--dataset", str(_write_npz(folder / "neg.npz",
                                                             train_labels=np.full((60, 1), -1)))],
                                "non-negative integer class labels"),
        "one huge label": (["--dataset", str(_write_npz(folder / "huge.npz", train_labels=np.r_[
            np.arange(59) % 3, [100000]][:, None]))], "99997 of them never occur"),
        "test classes missing from training": (["--dataset", str(_write_npz(folder / "unseen.npz", train_labels=np.r_[
            np.arange(60) % 2][:, None], test_labels=np.r_[np.arange(12) % 3][:, None]))], "classes [2] that"),
        "a NaN pixel": (["--dataset", str(_write_npz(folder / "nan.npz", train_images=np.where(
            np.arange(60 * 28 * 28).reshape(60, 28, 28) == 5 * 784 + 3, np.nan, 0.5)))], "image 5"),
        "non-integer labels": (["--dataset", str(_write_npz(folder / "float.npz",
                                                            train_labels=np.full((60, 1), 0.5)))],
                               "non-negative integer class labels"),
        "empty training split": (["--dataset", str(_write_npz(folder / "empty.npz",
                                                              train_images=np.zeros((0, 28, 28), np.uint8),
                                                              train_labels=np.zeros((0, 1), int)))],
                                 "the train split is empty"),
        "empty client pool": (["--partition", "iid", "--clients", "300", "--local-test-fraction", "0.9",
                               "--initial-labels", "1"], "has an empty pool"),
        "initial labels larger than a pool": (["--dataset", str(good), "--clients", "3", "--initial-labels", "50"],
                                              "lower --initial-labels"),
        "budget larger than the pool": (["--round-budget", "5000"], "lower --round-budget to at most"),
        "negative budget": (["--round-budget", "-5"], "round-budget must be >= 0"),
        "unknown strategy": (["--strategy", "nope"], "unknown strategy 'nope'; choose one of"),
        "wrong type": (["--clients", "three"], "setting clients must be an int"),
        "out-of-range value": (["--min-clients", "9"], "min-clients must be between 1 and clients"),
        "noise without clipping": (["--dp-noise-multiplier", "1"], "needs dp-clipping-norm > 0"),
        "unknown dp mode": (["--dp-mode", "local"], "dp-mode must be one of"),
        "broken config file": (["--config", str(toml)], "is not valid TOML"),
        "resume without checkpoint": (["--resume"], "no checkpoint"),
        "infinite alpha": (["--alpha", "inf"], "alpha must be a finite number > 0"),
    }


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input")
    cases = _bad_inputs(folder)
    assert sorted(cases) == sorted(BAD_CASES)
    return folder, cases


BAD_CASES = (
    "missing data file", "truncated data file", "malformed data file", "wrong image shape", "labels out of range",
    "one huge label", "test classes missing from training", "a NaN pixel",
    "non-integer labels", "empty training split", "empty client pool", "initial labels larger than a pool",
    "budget larger than the pool", "negative budget", "unknown strategy", "wrong type", "out-of-range value",
    "noise without clipping", "unknown dp mode", "broken config file", "resume without checkpoint", "infinite alpha",
)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_with_the_problem_and_fix_and_nothing_written(case, bad_input_dir, capsys):
    from simulations.cli import main

    folder, cases = bad_input_dir
    args, fragment = cases[case]
    out = folder / "out" / case.replace(" ", "-")
    (out / "checkpoint").mkdir(parents=True)  # a previous run's files must survive a refused command
    (out / "results.json").write_text('{"rounds": []}')
    (out / "clients").mkdir()
    (out / "clients" / "client-0.db").write_bytes(b"previous labels")
    before = _tree(out)
    TALLY.injected += 1
    status = main(["simulate", *args, "--output-dir", str(out), "--rounds", "1"])
    err = capsys.readouterr().err
    assert status == 2
    assert "fedal simulate: error:" in err and fragment in err, err
    assert "Traceback" not in err
    assert _tree(out) == before
    TALLY.finished += 1


def test_the_installed_command_exits_non_zero_on_bad_input(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--round-budget", "-1",
                           "--output-dir", str(out)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    TALLY.injected += 1
    assert proc.returncode == 2
    assert "round-budget must be >= 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    TALLY.finished += 1


def test_updates_are_aggregated_in_client_order_whatever_order_they_arrive(flower_task, tmp_path):
    # replies arrive in the order clients finish; summing them in that order made reruns of the
    # same seed differ in the last bits, and training amplified that to points of accuracy
    results = []
    for order in ([1, 2, 3, 4, 5], [5, 3, 1, 4, 2], [2, 5, 4, 1, 3]):
        _, strategy, ref = _strategy(tmp_path / "-".join(map(str, order)))
        rng = np.random.default_rng(0)  # the same updates each time
        updates = {n: {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in ref.items()}
                   for n in range(1, 6)}
        replies = _round(strategy, ref, updates)
        good = strategy.screen(1, [replies[n] for n in order])
        assert [strategy.book.client_of(m.metadata.src_node_id) for m in good] == [0, 1, 2, 3, 4]
        _, strategy, ref = _strategy(tmp_path / ("agg-" + "-".join(map(str, order))))
        replies = _round(strategy, ref, updates)
        arrays, _ = strategy.aggregate_train(1, [replies[n] for n in order])
        results.append(_flat(protocol.state_from_record(arrays)))
    assert all(np.array_equal(results[0], r) for r in results[1:])


# ============================================== 7. SIGKILL of the whole command, then --resume
def _budget_rows(db_path) -> dict[int, tuple[int, int]]:
    return {r: (a, s) for r, a, s in db_rows(db_path, "SELECT round, assigned, spent FROM budgets")}


@pytest.mark.slow
def test_a_killed_simulation_resumes_without_overspending_and_its_files_agree(tmp_path):
    """SIGKILL of `fedal simulate` (and everything it started) mid-run, then --resume: results never
    ahead of the checkpoint, no round asks more labels than its budget, every spend within its share."""
    import os
    import signal

    out = tmp_path / "run"
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", "3", "--min-clients", "3",
            "--rounds", "6", "--round-budget", "50", "--initial-labels", "10", "--output-dir", str(out)]
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["round"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        TALLY.injected += 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    checkpointed = json.loads(state.read_text())["round"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rounds"]) <= checkpointed  # the results never claim a round the checkpoint lacks
    resumed = subprocess.run(args + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5, 6]
    ledger = json.loads(state.read_text())["budget"]["ledger"]
    for row in ledger:
        assert row["spent"] is None or row["spent"] <= row["assigned"], row
    by_round: dict[int, int] = {}
    for row in ledger:
        by_round[row["round"]] = by_round.get(row["round"], 0) + row["assigned"]
    assert all(total == 50 for total in by_round.values()), by_round  # no failure: no carry, exactly the budget
    for r in results["rounds"]:
        for c in r["clients"].values():
            assert c["queried"] <= c["budget"], r  # the re-run round asked nothing twice
    for client in range(3):
        for server_round, (assigned, spent) in _budget_rows(out / "clients" / f"client-{client}.db").items():
            assert spent is None or spent <= assigned, (client, server_round, assigned, spent)
    TALLY.finished += 1


def _group_processes(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pgid=,stat=,cmd="], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")]


def _wait_gone(pgid: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _group_processes(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _start(args, out):
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["round"] >= 2:
            return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run did not reach round 2")


@pytest.mark.slow
def test_ctrl_c_stops_within_seconds_leaves_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path):
    import os
    import signal

    out = tmp_path / "run"
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", "3", "--min-clients", "3",
            "--rounds", "40", "--output-dir", str(out)]
    proc = _start(args, out)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    TALLY.injected += 1
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Ctrl-C did not stop fedal simulate within 60 s")
    err = proc.stderr.read()
    assert code == 130 and time.monotonic() - t0 < 30, err[-2000:]
    assert "--resume" in err and "interrupted after round" in err
    assert _wait_gone(proc.pid) == []  # no Ray process outlives it
    done = json.loads((out / "checkpoint" / "state.json").read_text())["round"]
    assert len(json.loads((out / "results.json").read_text())["rounds"]) == done
    resumed = subprocess.run([*args[:-4], "--rounds", str(done + 2), "--output-dir", str(out), "--resume"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == list(range(1, done + 3))
    TALLY.finished += 1


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_prints_the_resume_command_as_invoked(tmp_path):
    """Issue 21.11: Ctrl-C twice still says how to continue, with the command as it was started (here
    ``python -m simulations.cli``, not a bare ``fedal`` that is not on PATH), and that command resumes."""
    import os
    import shlex
    import signal

    out = tmp_path / "run"
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", "2", "--min-clients", "2",
            "--rounds", "40", "--output-dir", str(out)]
    proc = _start(args, out)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # the second one: stop at once
    TALLY.injected += 1
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a second Ctrl-C did not stop fedal simulate within 60 s")
    err = proc.stderr.read()
    assert code == 130, err[-2000:]
    done = json.loads((out / "checkpoint" / "state.json").read_text())["round"]
    assert f"holds round {done}" in err and "Continue with:" in err, err[-2000:]
    again = shlex.split(err.split("Continue with:\n", 1)[1].splitlines()[0])
    assert again[:3] == [sys.executable, "-m", "simulations.cli"] and again[-1] == "--resume"
    assert _wait_gone(proc.pid) == []
    again[again.index("--rounds") + 1] = str(done + 1)
    resumed = subprocess.run(again, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == list(range(1, done + 2))
    TALLY.finished += 1


@pytest.mark.slow
def test_ray_processes_of_a_killed_run_are_stopped_by_the_next_one(tmp_path, monkeypatch):
    import os
    import signal

    from simulations.engine import clean_orphaned_ray

    monkeypatch.setenv("FEDAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "simulations.cli", "simulate", "--clients", "2", "--rounds", "40",
                   "--output-dir", str(out)], out)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: nothing of its own cleanup runs
    proc.wait(30)
    TALLY.injected += 1
    time.sleep(2)
    orphans = _group_processes(proc.pid)
    assert any("ray" in line for line in orphans)  # what the issue saw: Ray agents outliving the run
    stopped = clean_orphaned_ray(tmp_path / "cache" / "ray-drivers")
    assert stopped and _wait_gone(proc.pid, 15) == []
    assert clean_orphaned_ray(tmp_path / "cache" / "ray-drivers") == []  # the marker is gone too
    TALLY.finished += 1


# ================================== 8. sites failing together, lying sites, killed actors
def _short_rounds(results: dict, cfg: FederationConfig) -> list[int]:
    """Rounds of ``results`` aggregated from fewer usable replies than ``cfg`` allows (must be none)."""
    return [r["round"] for r in results["rounds"] if r.get("aggregated") and len(r["clients"]) < cfg.min_clients]


def _lying_strategy(tmp_path, **overrides):
    """A network strategy whose book checks the reports against what it granted (as the ServerApp's does)."""
    from fedal.budget import BudgetCoordinator
    from server.book import RoundBook
    from server.privacy import PrivacySettings
    from server.strategy import make_strategy

    cfg = FederationConfig(**{**dict(dataset="digits", clients=4, min_clients=2, output_dir=str(tmp_path),
                                     pipeline="network", initial_labels=10, round_budget=20), **overrides})
    book = RoundBook(BudgetCoordinator(cfg.budget_policy, cfg.round_budget), PrivacySettings.from_config(cfg),
                     initial_labels=cfg.initial_labels, offline_budget=cfg.offline_budget)
    return cfg, make_strategy(cfg, book, _digits_model()), _digits_reference()


LIES = [  # (metric, value, what the refusal names)
    ("num-examples", -5, "num-examples is -5"),
    ("num-examples", 10**9, "1000000000 labeled"),
    ("unlabeled-left", 10**12, "unlabeled-left is 1000000000000"),
    ("queries-used", -3, "queries-used is -3"),
    ("queries-used", 7, "7 labels asked in round 1, but its budget was 0"),
    ("pending", -100000, "pending is -100000"),
    ("offline-spent", -4, "offline-spent is -4"),
    ("requests-answered", 50, "requests-answered (50) is more than requests-made"),
    ("mean-uncertainty", 3.5, "mean-uncertainty is 3.5"),
]


@pytest.mark.parametrize("metric, value, named", LIES, ids=[f"{m}={v}" for m, v, _ in LIES])
def test_a_lying_reply_is_refused_with_an_event_naming_the_site_and_the_round_goes_on(flower_task, tmp_path,
                                                                                         metric, value, named):
    from flwr.app import MetricRecord

    _, strategy, ref = _lying_strategy(tmp_path)
    rng = np.random.default_rng(0)
    updates = {n: {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in ref.items()} for n in range(1, 5)}
    replies = _round(strategy, ref, {n: u for n, u in updates.items()})
    for msg in replies.values():  # an honest site of round 1 holds its initial set
        metrics = dict(msg.content[protocol.METRICS])
        msg.content[protocol.METRICS] = MetricRecord({**metrics, "num-examples": 10})
    liar = replies[3]
    liar.content[protocol.METRICS] = MetricRecord({**dict(liar.content[protocol.METRICS]), metric: value})
    TALLY.injected += 1
    arrays, metrics = strategy.aggregate_train(1, list(replies.values()))  # no exception: the ServerApp goes on
    rejected = _events(strategy, 1, "rejected")
    assert set(rejected) == {3} and named in rejected[3], rejected
    assert strategy.book.rounds[1].problem_of(2).client == 2  # the event names client 2 (node 3)
    assert set(strategy.book.rounds[1].reports) == {0, 1, 3}  # its report counts nowhere
    honest = np.mean([_flat(updates[n]) for n in (1, 2, 4)], axis=0)
    assert np.allclose(_flat(protocol.state_from_record(arrays)), honest, atol=1e-5)  # FedAvg of the others
    assert metrics["clients"] == 3 and metrics["pending"] >= 0
    TALLY.lying += 1
    TALLY.finished += 1


def test_a_pending_lie_cannot_lift_the_total_budget(flower_task, tmp_path):
    """A pending of -100000 made the last query round's limit (total-budget - labeled - pending) huge."""
    from flwr.app import MetricRecord

    cfg, strategy, ref = _lying_strategy(tmp_path, total_budget=60, clients=2)
    replies = _round(strategy, ref, {1: dict(ref), 2: dict(ref)})
    for node, msg in replies.items():
        pending = -100000 if node == 2 else 0
        msg.content[protocol.METRICS] = MetricRecord({**dict(msg.content[protocol.METRICS]), "num-examples": 10,
                                                      "pending": pending})
    TALLY.injected += 1
    strategy.aggregate_train(1, list(replies.values()))
    book = strategy.book
    pending = sum(r.pending for r in book.rounds[1].reports.values())
    assert pending == 0 and sum(book.labeled.values()) == 10  # the liar's report is not in the book
    TALLY.lying += 1


def test_a_round_with_fewer_usable_replies_than_min_clients_keeps_the_model(flower_task, tmp_path):
    _, strategy, ref = _lying_strategy(tmp_path, clients=5, min_clients=3)
    moved = {k: v + 1.0 for k, v in ref.items()}
    replies = _round(strategy, ref, {1: moved, 2: moved, 3: RuntimeError("out of memory"),
                                     4: RuntimeError("out of memory"), 5: RuntimeError("out of memory")})
    for msg in replies.values():
        if not msg.has_error():
            msg.content[protocol.METRICS] = MetricRecord_with(msg, **{"num-examples": 10})
    TALLY.injected += 3
    TALLY.together += 1
    arrays, metrics = strategy.aggregate_train(1, list(replies.values()))
    assert arrays is None and metrics["clients"] == 2  # the model stays; the two reports count (their labels)
    rlog = strategy.book.rounds[1]
    assert not rlog.aggregated
    said = [e.describe() for e in rlog.events if e.kind == "not-aggregated"]
    assert said and "2 usable replies of the 5 node(s) sampled; the run needs 3 (min-clients 3" in said[0], said
    TALLY.finished += 1


def test_min_reply_fraction_asks_for_a_share_of_the_sampled_sites(flower_task, tmp_path):
    _, strategy, ref = _lying_strategy(tmp_path, clients=4, min_clients=2, min_reply_fraction=1.0)
    replies = _round(strategy, ref, {1: dict(ref), 2: dict(ref), 3: dict(ref), 4: RuntimeError("gone")})
    for msg in replies.values():
        if not msg.has_error():
            msg.content[protocol.METRICS] = MetricRecord_with(msg, **{"num-examples": 10})
    assert strategy.aggregate_train(1, list(replies.values()))[0] is None
    assert "the run needs 4" in strategy.book.rounds[1].events[-1].reason


def MetricRecord_with(msg, **values):
    from flwr.app import MetricRecord

    return MetricRecord({**dict(msg.content[protocol.METRICS]), **values})


def _head_reply(client: int, X, y, n_classes: int, round_: int = 1):
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    from fedal.heads import ClassStatistics
    from fedal.models.head_adapter import LABELED_STATS, PSEUDO_STATS

    stats = {**ClassStatistics.from_samples(X, y, n_classes).to_arrays(LABELED_STATS),
             **ClassStatistics.empty(n_classes, X.shape[1]).to_arrays(PSEUDO_STATS)}
    return Message(RecordDict({protocol.ARRAYS: protocol.model_record(stats),
                               protocol.METRICS: MetricRecord({protocol.CLIENT_ID: client})}),
                   dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_site_missing_from_a_head_round_keeps_its_classes_in_the_head(flower_task):
    """Head pipeline, in the clear: one of three sites, each holding its own classes, replies; the head is solved
    from its new statistics and the others' last ones, not from its classes alone (0.80 -> 0.34 seen)."""
    from fedal.heads import ClassStatistics
    from fedal.models import HeadClassifier
    from server.head import StatisticsAggregation

    rng = np.random.default_rng(0)
    n_classes, dim = 3, 4
    model = HeadClassifier(n_classes, dim)
    heads = StatisticsAggregation(None, model)
    data = {c: (rng.normal(c * 3, 1, (20, dim)), np.full(20, c)) for c in range(n_classes)}  # site c holds class c
    heads.aggregate_train(1, [_head_reply(c, *data[c], n_classes) for c in range(n_classes)])
    X0, y0 = np.concatenate([data[0][0], rng.normal(0, 1, (5, dim))]), np.full(25, 0)
    TALLY.injected += 2
    TALLY.together += 1
    heads.aggregate_train(2, [_head_reply(0, X0, y0, n_classes)])  # sites 1 and 2 did not reply
    assert heads.carried == [1, 2]
    X_all = np.concatenate([X0, data[1][0], data[2][0]])
    y_all = np.concatenate([y0, data[1][1], data[2][1]])
    pooled = ClassStatistics.from_samples(X_all, y_all, n_classes)
    got = ClassStatistics.from_arrays(protocol.state_from_record(heads.global_stats), "stats")
    assert np.allclose(got.counts, pooled.counts) and np.allclose(got.sums, pooled.sums)
    assert (model.predict(X_all) == y_all).mean() > 0.9  # every class is still in the head
    kept = StatisticsAggregation(None, HeadClassifier(n_classes, dim))  # and across a resume (the checkpoint)
    kept.load_state_arrays(heads.state_arrays())
    assert sorted(kept.site_stats) == [0, 1, 2]
    assert np.allclose(kept.site_stats[1][0].sums, heads.site_stats[1][0].sums)
    TALLY.finished += 1


@pytest.fixture(scope="module")
def together(tmp_path_factory):
    """3 clients, 5 rounds, min-clients 2: two sites fail together in round 2, client 0's actor is killed in
    round 3, client 2 lies in round 4."""
    from simulations.engine import run_in_simulation

    out = tmp_path_factory.mktemp("together")
    cfg = small_cfg(out, clients=3, rounds=5, round_timeout=ROUND_TIMEOUT)
    write_plan(out, {1: {2: "crash"}, 2: {2: "crash", 4: "lie:pending=-100000"}, 0: {3: "kill-actor"}})
    run_in_simulation(cfg, cpus=2, client_app=fault_client_app())
    results = json.loads((out / "results.json").read_text())
    fired = injected(out)
    TALLY.injected += len({(f["client"], f["round"], f["fault"]) for f in fired})
    TALLY.together += 1
    TALLY.actors_killed += int(any(f["fault"] == "kill-actor" for f in fired))
    TALLY.aggregated_short += len(_short_rounds(results, cfg))
    if [r["round"] for r in results["rounds"]] == list(range(1, cfg.rounds + 1)):
        TALLY.finished += 1
    return dict(cfg=cfg, out=out, results=results, fired=fired, rows={r["round"]: r for r in results["rounds"]},
                events=results["events"])


@pytest.mark.slow
def test_sites_failing_together_leave_the_model_of_the_round_before(together):
    rows = together["rows"]
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[2]["aggregated"] is False and sorted(rows[2]["clients"]) == ["0"]
    assert rows[2]["accuracy"] == rows[1]["accuracy"]  # the global model stayed
    said = [e["detail"] for e in together["events"] if e["round"] == 2 and e["kind"] == "not-aggregated"]
    assert said and "1 usable reply of the 3 node(s) sampled; the run needs 2" in said[0]
    assert _short_rounds(together["results"], together["cfg"]) == []
    # their budgets were carried: round 3 sends what round 2's failed sites did not spend
    assert rows[3]["budget_sent"] >= together["cfg"].round_budget


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_its_client_takes_part(together):
    kills = [f for f in together["fired"] if f["fault"] == "kill-actor"]
    assert len(kills) == 2  # the kill, then the same message on a new actor
    assert sorted(together["rows"][3]["clients"]) == ["0", "1", "2"] and together["rows"][3]["aggregated"]
    assert sorted(together["rows"][5]["clients"]) == ["0", "1", "2"]  # and every later round has everyone


@pytest.mark.slow
def test_a_lying_site_in_a_federation_is_refused_and_the_run_goes_on(together):
    events = [e for e in together["events"] if e["round"] == 4 and e["kind"] == "rejected"]
    assert any("client 2" in e["detail"] and "pending is -100000" in e["detail"] for e in events), events
    assert sorted(together["rows"][4]["clients"]) == ["0", "1"] and together["rows"][4]["aggregated"]
    assert together["rows"][5]["pending"] >= 0
    TALLY.lying += 1


@pytest.mark.slow
def test_a_run_that_cannot_go_on_stops_with_a_resume_command_and_resumes(tmp_path):
    from simulations.engine import run_in_simulation

    cfg = small_cfg(tmp_path / "out", clients=2, rounds=5, round_timeout=ROUND_TIMEOUT, max_failed_rounds=2)
    write_plan(cfg.output_dir, {c: {r: "crash" for r in (2, 3)} for c in range(2)})
    TALLY.injected += 4
    TALLY.together += 2
    with pytest.raises(RuntimeError, match=r"no round could be aggregated in the last 2 rounds \(2-3; "
                                           r"max-failed-rounds = 2\).*died in round 3.*holds round 2.*--resume"):
        run_in_simulation(cfg, cpus=2, client_app=fault_client_app())
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    write_plan(cfg.output_dir, {})  # the sites are back
    run_in_simulation(dataclasses.replace(cfg, resume=True), cpus=2, client_app=fault_client_app())
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4, 5]
    assert all(r["aggregated"] for r in results["rounds"] if r["round"] >= 3)
    TALLY.aggregated_short += len(_short_rounds(results, cfg))
    TALLY.finished += 1


def test_the_budget_of_sites_that_failed_the_last_query_round_is_asked_in_the_next_round():
    """A query round that lost sites' labels (852 of 1,000 seen) makes them up in the round after, even when
    the schedule has no query round left: the carried labels alone, to the sites that are there."""
    from fedal.budget import BudgetCoordinator
    from server.book import RoundBook

    book = RoundBook(BudgetCoordinator("uniform", round_budget=30), initial_labels=10)
    for node, client in ((11, 0), (12, 1), (13, 2)):
        book.identify(node, client)
    sent = book.open_round(5, [11, 12, 13], query=True)
    assert sorted(sent.values()) == [10, 10, 10]
    book.record_report(5, 11, _report(0, n=10))
    book.record_report(5, 12, dataclasses.replace(_report(1, n=10), queries_used=10))
    book.fail(5, 13, "out of memory")
    book.close_round(5)
    TALLY.injected += 1
    assert book.makeup_due()
    again = book.open_round(6, [11, 12, 13], query=False, makeup=True)
    assert sum(again.values()) == 10  # what client 2 did not spend; not another round's budget
    assert not book.makeup_due()
    assert book.open_round(7, [11, 12, 13], query=False) == {11: 0, 12: 0, 13: 0}
    TALLY.finished += 1
