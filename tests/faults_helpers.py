"""Test-only fault injection for the fault suite (``tests/test_faults.py``).

Nothing here is imported by fedal, clients or server: faults enter through a test
ClientApp that runs ``clients.app``'s own train / evaluate functions behind
:func:`fault_mod`. The mod reads a *fault plan*, ``<output_dir>/faults.json``
(``{"<client id>": {"<round>": "<fault>"}}``), that the test writes before the run;
Ray workers read it from disk, so no state has to travel with the pickled app.

Faults (of a train message):

``crash``
    the client does its whole round (queries, oracle answers written to its database,
    training), snapshots its labels, then raises instead of replying;
``straggle:<seconds>``
    sleeps that long, then handles the message normally (its reply comes too late);
``inf`` / ``nan`` / ``wrong-shapes`` / ``wrong-keys`` / ``extra-metric`` / ``no-arrays``
    the reply's update is corrupted after an honest round;
``oracle-error`` / ``oracle-timeout`` / ``oracle-noise``
    the site's oracle raises OracleError / TimeoutError, or answers garbage;
``crash-in-oracle``
    the process dies while asking the oracle: requests are recorded as pending, no
    answer is, no reply is sent (the labels and pending ids are snapshotted first).
``kill-actor``
    the client's whole process (the Ray actor) is killed with SIGKILL before it handles the
    message, as Ray's memory monitor kills one; it fires once per client and round, so the
    message handed to a new actor is handled;
``lie:<metric>=<value>``
    an honest round, then the reply's report metric says ``value`` (a lying or buggy site).

Faults of a secure-aggregation stage (:func:`stage_fault_mod`, in front of the secure mod):
``crash-in:<stage>`` (the site fails that stage: ``setup``, ``share_keys``, ...) and
``short-masked-vector`` (its masked vector is one element short).

Every fault that fires appends one line to ``<output_dir>/faults-log.jsonl``. With a file
``<output_dir>/record-received``, every client also writes the digest of the model it
was sent each round (``received-c<client>-r<round>.txt``).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord


PLAN_FILE, LOG_FILE, RECORD_FLAG = "faults.json", "faults-log.jsonl", "record-received"
CORRUPTIONS = ("inf", "nan", "wrong-shapes", "wrong-keys", "extra-metric", "no-arrays")
ORACLE_FAULTS = ("oracle-error", "oracle-timeout", "oracle-noise", "crash-in-oracle")


class InjectedCrash(RuntimeError):
    """The injected death of a client process."""


# ------------------------------------------------------------------------ plans
def write_plan(output_dir, plan: dict[int, dict[int, str]]) -> None:
    """Write the fault plan ``{client: {round: fault}}`` where the run's workers look."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps({str(c): {str(r): f for r, f in rounds.items()}
                                             for c, rounds in plan.items()}))


def planned_fault(output_dir, client: int, server_round: int) -> str | None:
    path = Path(output_dir) / PLAN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(str(client), {}).get(str(server_round))


def injected(output_dir) -> list[dict]:
    """Every fault that fired in a run, in order."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(output_dir, **entry) -> None:
    line = json.dumps({**entry, "time": time.time()}) + "\n"
    with open(Path(output_dir) / LOG_FILE, "a") as f:  # one short O_APPEND write per fault
        f.write(line)


def snapshot_path(output_dir, client: int, server_round: int) -> Path:
    return Path(output_dir) / f"snapshot-c{client}-r{server_round}.json"


def db_labels(db_path) -> dict[int, int]:
    """``{sample id: label}`` of a client database (read-only)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return {int(i): int(y) for i, y in db.execute("SELECT sample_id, label FROM labels")}
    finally:
        db.close()


def db_states(db_path) -> dict[str, list[int]]:
    """Sample ids per state (unlabeled / pending / labeled) of a client database."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        out = {"unlabeled": [], "pending": [], "labeled": []}
        for i, state in db.execute("SELECT id, state FROM samples ORDER BY id"):
            out[state].append(int(i))
        return out
    finally:
        db.close()


def model_digest(state: dict) -> str:
    """SHA-256 of a model's weights, by sorted key (float32 bytes)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key], dtype=np.float32).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- oracles
class FaultyOracle:
    """Wraps a site's oracle; fails the way ``kind`` says (see the module docstring)."""

    def __init__(self, inner, kind: str, on_crash=None) -> None:
        self.inner, self.kind, self.on_crash = inner, kind, on_crash
        self.name = f"faulty({kind})"

    def label(self, ids):
        from fedal.exceptions import OracleError

        if self.kind == "oracle-error":
            raise OracleError("injected: the labeling service answered 503")
        if self.kind == "oracle-timeout":
            raise TimeoutError("injected: no answer within 30 s")
        if self.kind == "crash-in-oracle":
            if self.on_crash is not None:
                self.on_crash()
            raise InjectedCrash("injected: the client process died while waiting for its oracle")
        # noise: out-of-range classes, non-integers, ids nobody asked for; one valid answer
        # (None is not garbage: it is fedal.oracle.UNSURE, "I cannot tell")
        ids = [int(i) for i in ids]
        truth = self.inner.label(ids[:1])
        garbage = {i: v for i, v in zip(ids[1:], (99, -1, "cat", 2.5, "", True) * len(ids))}
        return {**truth, **garbage, 10 ** 9: 0, "x": 1}


# ---------------------------------------------------------------------- the app
def _corrupt(reply: Message, kind: str) -> Message:
    from fedal.flower import protocol

    arrays = reply.content[protocol.ARRAYS]
    items = {k: arrays[k].numpy().copy() for k in arrays.keys()}
    first = next(iter(items))
    if kind in ("inf", "nan"):
        items[first].flat[0] = np.inf if kind == "inf" else np.nan
    elif kind == "wrong-shapes":
        items[first] = np.zeros(tuple(s + 1 for s in items[first].shape), items[first].dtype)
    elif kind == "wrong-keys":
        items["injected." + first] = items.pop(first)
    if kind == "extra-metric":
        metrics = reply.content[protocol.METRICS]
        reply.content[protocol.METRICS] = MetricRecord({**dict(metrics), "sneaky": 1.0})
    elif kind == "no-arrays":
        del reply.content[protocol.ARRAYS]
    else:
        reply.content[protocol.ARRAYS] = ArrayRecord({k: Array(v) for k, v in items.items()})
    return reply


def _train_with_faulty_oracle(msg: Message, context: Context, kind: str, out: Path, client: int,
                              server_round: int) -> Message:
    """``clients.app.train`` with the site's oracle swapped for a :class:`FaultyOracle`."""
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.config import FederationConfig
    from fedal.flower import protocol
    from fedal.messages import TrainInstruction

    cfg = FederationConfig.from_run_config(dict(context.run_config))
    instruction = TrainInstruction.from_config(dict(msg.content[protocol.CONFIG]))
    assert instruction.server_round == server_round
    site = ClientSite(cfg, NodeConfig.from_mapping(dict(context.node_config)))

    def snapshot():
        ids, labels = site.pool.labels()
        snapshot_path(out, client, server_round).write_text(json.dumps({
            "labels": {str(i): int(y) for i, y in zip(ids, labels)},
            "pending": [int(i) for i in site.pool.pending_ids()]}))

    site.learner.oracle = FaultyOracle(site.oracle, kind, on_crash=snapshot)
    try:
        state, report = site.train(protocol.state_from_record(msg.content[protocol.ARRAYS]), instruction)
    finally:
        site.close()
    return protocol.train_reply(msg, state, report)


def fault_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: inject the planned fault of this client and round (train messages only)."""
    from clients.node import NodeConfig
    from fedal.config import FederationConfig
    from fedal.flower import protocol

    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    client = NodeConfig.from_mapping(dict(context.node_config)).client_id
    server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
    out = Path(cfg.output_dir)
    if (out / RECORD_FLAG).exists():  # what model this client was sent (resume checks)
        arrays = msg.content[protocol.ARRAYS]
        digest = model_digest({k: arrays[k].numpy() for k in arrays.keys()})
        (out / f"received-c{client}-r{server_round}.txt").write_text(digest)
    fault = planned_fault(out, client, server_round)
    if fault is None:
        return call_next(msg, context)
    _log(out, client=client, round=server_round, fault=fault, pid=os.getpid())
    if fault.startswith("straggle:"):
        time.sleep(float(fault.split(":", 1)[1]))
        return call_next(msg, context)
    if fault in ORACLE_FAULTS:
        return _train_with_faulty_oracle(msg, context, fault, out, client, server_round)
    if fault.startswith(("crash-in:", "short-masked")):  # stage_fault_mod's
        return call_next(msg, context)
    if fault == "kill-actor":
        import signal

        if sum(1 for f in injected(out) if (f["client"], f["round"], f["fault"]) == (client, server_round, fault)) <= 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the first time only: a new actor handles the message
        return call_next(msg, context)
    reply = call_next(msg, context)
    if fault.startswith("lie:"):
        key, value = fault[4:].split("=", 1)
        metrics = dict(reply.content[protocol.METRICS])
        metrics[key] = float(value) if "." in value or "e" in value else int(value)
        reply.content[protocol.METRICS] = MetricRecord(metrics)
        return reply
    if fault == "crash":
        state_dir = Path(str(context.node_config.get("state-dir") or cfg.client_state_dir))
        snapshot_path(out, client, server_round).write_text(json.dumps({
            "labels": {str(i): y for i, y in db_labels(state_dir / f"client-{client}.db").items()},
            "pending": db_states(state_dir / f"client-{client}.db")["pending"]}))
        raise InjectedCrash(f"injected: client {client} died in round {server_round} before replying")
    if fault in CORRUPTIONS:
        return _corrupt(reply, fault)
    raise ValueError(f"unknown fault {fault!r} in the plan")


def stage_fault_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod in front of the secure-aggregation mod: a planned ``crash-in:<stage>`` fails that stage of the
    protocol; ``short-masked-vector`` cuts the last element off the site's masked vector."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from clients.node import NodeConfig
    from fedal.config import FederationConfig

    if msg.metadata.message_type != "train" or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    client = NodeConfig.from_mapping(dict(context.node_config)).client_id
    server_round = int(msg.metadata.group_id)
    out = Path(cfg.output_dir)
    fault = planned_fault(out, client, server_round)
    if fault == f"crash-in:{stage}":
        _log(out, client=client, round=server_round, fault=fault, pid=os.getpid())
        raise InjectedCrash(f"injected: client {client} died in the {stage} stage of round {server_round}")
    reply = call_next(msg, context)
    if fault == "short-masked-vector" and stage == "collect_masked_vectors" and not reply.has_error():
        _log(out, client=client, round=server_round, fault=fault, pid=os.getpid())
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        vectors = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
        vectors[-1] = vectors[-1][:-1]
        record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(v) for v in vectors]
    return reply


def fault_client_app():
    """``clients.app``'s train (behind its secure aggregation and DP clipping mods) and evaluate, with
    :func:`fault_mod` in front of the train function: under secure aggregation a fault fires in the masking
    stage, after the site shared its keys (the drop-out SecAgg+ recovers from)."""
    from ray import cloudpickle

    from clients import app as client_module

    # Ray ships the app to its workers by pickle; this test module is not importable there
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return client_module.client_app(train_mods=[fault_mod], mods=[stage_fault_mod])
