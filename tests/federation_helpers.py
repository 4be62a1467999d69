"""Shared pieces of the federation tests: a small run, a reply-capturing ClientApp, the audit.

The end-to-end and privacy tests look at the same simulation (3 clients, 3 rounds of
``digits``): :func:`audited_run` runs it once per pytest process with a ClientApp that
has :func:`capture_mod` in front of ``clients.app``'s own train / evaluate functions.
Replies are built inside Ray worker processes, so the mod writes a description of each
one (record names and kinds, array keys/shapes/dtypes, metric names/types/values) to a
JSON file in the folder named by ``$FEDAL_CAPTURE_DIR``.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

CAPTURE_ENV = "FEDAL_CAPTURE_DIR"
#: sizes of one raw input of the data sets fedal ships with: digits, 28x28 grey, 28x28 RGB
SAMPLE_SIZES = {64, 28 * 28, 3 * 28 * 28}


def small_config(output_dir, **overrides):
    """A federation that finishes in seconds: digits, 3 clients, 3 rounds."""
    from fedal.config import FederationConfig

    settings = dict(dataset="digits", clients=3, min_clients=3, rounds=3, partition="dirichlet", alpha=0.5,
                    initial_labels=10, round_budget=30, strategy="entropy", seed=0, output_dir=str(output_dir))
    settings.update(overrides)
    return FederationConfig(**settings)


# ----------------------------------------------------------------------- capture
def describe_content(content: RecordDict) -> dict:
    """JSON-able description of everything in a message's content."""
    records = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            entries = {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()}
        elif isinstance(record, MetricRecord):
            entries = {k: {"type": type(v).__name__, "value": v} for k, v in record.items()}
        elif isinstance(record, ConfigRecord):
            entries = {k: {"type": type(v).__name__, "value": v if not isinstance(v, bytes) else v.hex()}
                       for k, v in record.items()}
        else:
            entries = {"repr": repr(record)[:200]}
        records[name] = {"kind": type(record).__name__, "entries": entries}
    return records


def capture_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: pass the message on, write a description of the reply, return it unchanged."""
    reply = call_next(msg, context)
    folder = os.environ.get(CAPTURE_ENV)
    if folder:
        desc = {
            "message_type": msg.metadata.message_type,
            "node_config": {k: v for k, v in context.node_config.items() if isinstance(v, (int, float, str))},
            "error": reply.error.reason if reply.has_error() else None,
            "records": describe_content(reply.content) if reply.has_content() else {},
        }
        path = Path(folder) / f"reply-{uuid.uuid4().hex}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(desc))
        os.replace(tmp, path)
    return reply


def capturing_client_app():
    """``clients.app``'s train / evaluate functions behind :func:`capture_mod`."""
    import sys

    from ray import cloudpickle

    from clients import app as client_module

    # Ray ships the app to its workers by pickle; this test module is not importable there
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return client_module.client_app(mods=[capture_mod])


def read_captures(folder) -> list[dict]:
    """Every reply description written to ``folder``."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("reply-*.json"))]


# ------------------------------------------------------------------------- audit
def audit_reply(desc: dict, model_shapes: dict[str, tuple], sample_sizes=SAMPLE_SIZES, eval_metrics=None) -> list[str]:
    """Why a reply breaks the privacy contract of :mod:`fedal.flower.protocol` (empty = fine); ``eval_metrics``:
    what an evaluation reply holds (default :data:`fedal.flower.protocol.EVAL_METRICS`)."""
    from fedal.flower import protocol

    problems = []
    kind = desc["message_type"]
    records = desc["records"]
    if desc.get("error"):
        return [f"{kind} reply is an error: {desc['error']}"]
    expected = {"train": {protocol.ARRAYS: "ArrayRecord", protocol.METRICS: "MetricRecord"},
                "evaluate": {protocol.METRICS: "MetricRecord"},
                f"query.{protocol.IDENTIFY}": {protocol.METRICS: "MetricRecord"}}.get(kind)
    if expected is None:
        return [f"unexpected message type {kind!r}"]
    got = {name: rec["kind"] for name, rec in records.items()}
    if got != expected:
        problems.append(f"{kind} reply records {got}, expected exactly {expected}")
    for name, rec in records.items():
        if rec["kind"] == "ConfigRecord":
            problems.append(f"{kind} reply carries a ConfigRecord {name!r}")
        if rec["kind"] == "ArrayRecord":
            shapes = {k: tuple(e["shape"]) for k, e in rec["entries"].items()}
            if shapes != {k: tuple(v) for k, v in model_shapes.items()}:
                problems.append(f"arrays {shapes} are not the model's state dict {model_shapes}")
            for key, shape in shapes.items():
                size = 1
                for d in shape:
                    size *= d
                genuine = tuple(model_shapes.get(key, ())) == shape
                if size in sample_sizes and not genuine:
                    problems.append(f"array {key!r} of shape {shape} has the size of a data sample")
        if rec["kind"] == "MetricRecord":
            wanted = {"train": protocol.TRAIN_METRICS, "evaluate": eval_metrics or protocol.EVAL_METRICS}.get(kind,
                                                                                            protocol.IDENTIFY_METRICS)
            if list(rec["entries"]) != list(wanted):
                problems.append(f"{kind} metrics {list(rec['entries'])}, expected exactly {list(wanted)}")
            for key, entry in rec["entries"].items():
                if entry["type"] not in ("int", "float"):
                    problems.append(f"metric {key!r} is a {entry['type']} ({str(entry['value'])[:60]}), not a scalar")
    return problems


# ------------------------------------------------------------------- shared run
@functools.lru_cache(maxsize=1)
def audited_run() -> tuple:
    """``(cfg, results, captures)`` of one small simulation through the capturing ClientApp.

    Run once per pytest process (the end-to-end and privacy tests both read it).
    """
    from simulations.engine import run_in_simulation

    root = Path(tempfile.mkdtemp(prefix="fedal-e2e-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    capture = root / "captures"
    capture.mkdir()
    cfg = small_config(root / "run")
    old = os.environ.get(CAPTURE_ENV)
    os.environ[CAPTURE_ENV] = str(capture)  # inherited by the Ray workers started below
    try:
        run_in_simulation(cfg, cpus=2, client_app=capturing_client_app())
    finally:
        if old is None:
            os.environ.pop(CAPTURE_ENV, None)
        else:
            os.environ[CAPTURE_ENV] = old
    results = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    return cfg, results, read_captures(capture)


def client_db_summary(db_path) -> dict:
    """What a client's SQLite pool holds: label count, per-round budgets and requests."""
    db = sqlite3.connect(str(db_path))
    try:
        labels = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        budgets = {r: (a, s) for r, a, s in db.execute("SELECT round, assigned, spent FROM budgets")}
        requests = dict(db.execute("SELECT round, COUNT(*) FROM requests GROUP BY round"))
    finally:
        db.close()
    return {"labels": labels, "budgets": budgets, "requests": requests}


# ------------------------------------------------------------- a strategy in process
class NodeGrid:
    """The part of Flower's Grid a strategy's ``configure_train`` reads: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def train_replies(strategy, state, updates, server_round=1):
    """``(messages, replies)``: the strategy's train messages for the nodes of ``updates`` (node -> (state,
    labels)) and a reply of each node with its state and a report of that many labels (client id node - 1)."""
    from fedal.flower import protocol

    messages = list(strategy.configure_train(server_round, protocol.model_record(state), ConfigRecord(),
                                             NodeGrid(sorted(updates))))
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        update, n = updates[node]
        report = protocol.TrainReport(num_examples=n, client_id=node - 1, queries_used=0, labels_added=0,
                                      unlabeled_left=10, pending=0, mean_uncertainty=0.5, train_loss=1.0)
        out.append(protocol.train_reply(msg, update, report))
    return messages, out


def require_deployment_tools(deploy) -> None:
    """Skip (fail under CI) a deployment test when openssl, ssh-keygen, nginx (the coordinator's gateway) or Flower's
    executables are missing."""
    import pytest

    missing = [tool for tool in ("openssl", "ssh-keygen") if not shutil.which(tool)]
    missing += [] if Path(shutil.which("nginx") or "/usr/sbin/nginx").is_file() else ["nginx"]
    missing += [tool for tool in ("flower-superlink", "flower-supernode", "flwr") if not (deploy.BIN / tool).exists()]
    if missing:
        reason = f"{missing} not found: run .ci/install-system.sh and install fedal into the venv"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


# ------------------------------------------------------ waiting for events, not for time
#: seconds a deployment test waits for an event (a node online, a round recorded, a line in a log) before it fails:
#: generous, because a busy machine (CI, other jobs beside it) makes every step slower; a test never sleeps for a
#: fixed time and then asserts, it waits for the event and fails with what it waited for
EVENT_TIMEOUT = 300.0


def wait_for(what: str, predicate, dep, procs=(), timeout: float = EVENT_TIMEOUT, poll: float = 0.2):
    """Wait until ``predicate()`` is true (return its value); fail (AssertionError naming ``what``, with the SuperLink
    log) when ``timeout`` seconds pass or when the SuperLink of ``dep`` or one of ``procs`` exits meanwhile
    (``dep`` None: watch only ``procs``)."""
    deadline = time.monotonic() + timeout
    watched = ([] if dep is None else [dep.superlink]) + list(procs)
    while True:
        value = predicate()
        if value:
            return value
        for proc in watched:
            if proc.poll() is not None:
                log = Path(proc.log_path).read_text(errors="replace")[-3000:] if hasattr(proc, "log_path") else ""
                raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            log = "" if dep is None else "; SuperLink log:\n" + dep.log_tail(dep.superlink)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{log}")
        time.sleep(poll)


def node_statuses(dep) -> dict[int, str]:
    """Node id -> status of every SuperNode the SuperLink knows (``flwr supernode list``)."""
    return dep.node_statuses()


def wait_nodes(dep, sites, status: str = "online", timeout: float = EVENT_TIMEOUT) -> None:
    """Wait until the SuperLink reports every site of ``sites`` (registered: ``site.node_id`` known) as ``status``:
    e.g. every SuperNode connected before a run is submitted, so the ServerApp's first round has them all (it waits
    only a few seconds for the run's nodes, less than a SuperNode may take to start on a busy machine)."""
    want = {site.node_id for site in sites}
    procs = [site.process for site in sites if site.process is not None and status == "online"]
    wait_for(f"SuperNode(s) {sorted(want)} to be {status} at the SuperLink",
             lambda: all(node_statuses(dep).get(node) == status for node in want), dep, procs, timeout, poll=1.0)


# ------------------------------------------------------------ secure aggregation
#: what each SecAgg+ stage's reply may hold, as the server receives it: record -> its keys
SECURE_REPLY_RECORDS = {
    "setup": {"secaggplus_configs": {"pk1", "pk2"}},
    "share_keys": {"secaggplus_configs": {"dsts", "ctxts"}},
    "collect_masked_vectors": {"secaggplus_configs": {"masked_params"}, "fitres.parameters": set(),
                               "fitres.num_examples": {"num_examples"}, "fitres.metrics": None,
                               "fitres.status": {"code", "message"}},
    "unmask": {"secaggplus_configs": {"nids", "shares"}},
}
CLEAR_ENV = "FEDAL_CLEAR_DIR"


def clear_capture_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod between the SecAgg+ mod and the train function: keep the site's clear fixed-point limbs
    (what the server must never see) in ``$FEDAL_CLEAR_DIR``, one ``.npz`` per client and round."""
    import numpy as np

    from fedal.flower import protocol

    reply = call_next(msg, context)
    folder = os.environ.get(CLEAR_ENV)
    if folder and reply.has_content() and "fitres.parameters" in reply.content:
        client = int(context.node_config.get("partition-id", context.node_config.get("client-id", -1)))
        server_round = int(msg.content[protocol.CONFIG][protocol.SERVER_ROUND])
        limbs = [a.numpy() for a in reply.content["fitres.parameters"].values()]
        np.savez(Path(folder) / f"clear-c{client}-r{server_round}.npz", *limbs)
    return reply


def secure_capturing_client_app():
    """``clients.app`` with :func:`clear_capture_mod` in front of its train function (inside the SecAgg+ mod)."""
    import sys

    from ray import cloudpickle

    from clients import app as client_module

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return client_module.client_app(train_mods=[clear_capture_mod])


def payloads(content: RecordDict) -> list[bytes]:
    """Every byte string a message's records hold (arrays' data, bytes and lists of bytes in configs)."""
    out = []
    for record in content.values():
        if isinstance(record, ArrayRecord):
            out += [a.data for a in record.values()]
        elif isinstance(record, ConfigRecord):
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                out += [v for v in values if isinstance(v, bytes)]
    return out


def audit_secure_reply(stage: str, content: RecordDict, clear: list) -> list[str]:
    """Why a SecAgg+ reply the server received breaks secure aggregation (empty = fine): records or keys other than
    the protocol's, an array left in the clear, report metrics other than the report's, or any of the sites'
    ``clear`` arrays (their fixed-point limbs, their statistics) in its bytes, as they are or as Flower's
    quantiser would write them unmasked."""
    import numpy as np
    from flwr.common import bytes_to_ndarray

    from fedal.flower import protocol
    from fedal.secure import CLIPPING_RANGE

    problems = []
    allowed = SECURE_REPLY_RECORDS.get(stage)
    if allowed is None:
        return [f"unknown secure aggregation stage {stage!r}"]
    if sorted(content.keys()) != sorted(allowed):
        problems.append(f"{stage} reply records {sorted(content.keys())}, expected {sorted(allowed)}")
    for name, record in content.items():
        keys = allowed.get(name)
        if name == "fitres.metrics":
            keys = set(protocol.TRAIN_METRICS)
        if keys is not None and set(record.keys()) != keys:
            problems.append(f"{stage} reply record {name!r} holds {sorted(record.keys())}, expected {sorted(keys)}")
        if isinstance(record, ArrayRecord) and len(record):
            problems.append(f"{stage} reply record {name!r} carries {len(record)} arrays in the clear")
    blobs = payloads(content)
    for arr in clear:
        arr = np.asarray(arr)
        forms = {arr.astype(np.float64).tobytes(), arr.astype(np.float32).tobytes()}
        if np.all(arr == np.rint(arr)) and np.all(np.abs(arr) <= CLIPPING_RANGE):  # limbs: as quantised, unmasked
            forms |= {(arr + CLIPPING_RANGE).astype(np.int64).tobytes(), (arr + CLIPPING_RANGE).astype(np.int32).tobytes()}
        if arr.size >= 4 and any(form in blob for form in forms for blob in blobs):
            problems.append(f"a site's clear array of {arr.size} values reached the server in the {stage} stage")
    if stage == "collect_masked_vectors" and "secaggplus_configs" in content:
        for blob in content["secaggplus_configs"].get("masked_params", []):
            masked = bytes_to_ndarray(blob)
            for arr in clear:
                arr = np.asarray(arr)
                if masked.shape == arr.shape and arr.size >= 4 and np.mean(masked == arr + CLIPPING_RANGE) > 0.01:
                    problems.append(f"a masked vector of the {stage} stage equals a site's clear limbs in "
                                    f"{np.mean(masked == arr + CLIPPING_RANGE):.0%} of its entries: it is not masked")
    return problems
