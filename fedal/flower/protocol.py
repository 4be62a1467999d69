"""Everything that crosses the network between a client and the server.

This file is what a privacy review reads (with :mod:`fedal.messages`, the fields of the
instruction and of the report).

Server -> client, one message per node and round:

* ``train``: ``arrays`` (the global model) and ``config`` with the keys of
  :class:`~fedal.messages.TrainInstruction` (``server-round``, ``query-budget``;
  ``proximal-mu`` with FedProx; ``offline-budget`` when the run grants one) and, with
  client-side differential privacy, Flower's clipping-norm key; with ``pipeline = "head"``
  also ``global-stats``, the summed class statistics the global head was solved from (the
  same keys as a site's reply; they tell no more than the head: its means, counts and
  covariance), so a site that loses the server can add its new labels to them exactly;
* ``evaluate``: ``arrays`` (the global model) and ``config`` with ``server-round``;
* ``query.client_id``: nothing; asked only of a node the server has not heard from yet,
  before it is given a label budget.

Client -> server:

* to ``train``: ``arrays`` and ``metrics`` with exactly the scalars of
  :class:`~fedal.messages.TrainReport`. The arrays are the model weights (the global
  model's own keys and shapes) with ``pipeline = "network"``, and with ``pipeline =
  "head"`` the class statistics of the site's labeled samples (``stats.counts``,
  ``stats.sums``, ``stats.scatter``) and of its self-trained pool samples (``pseudo.*``):
  per-class counts, sums of feature vectors and the sum of their outer products
  (:class:`fedal.heads.ClassStatistics`; what they reveal is in PRIVACY.md); with ``pipeline =
  "handover"`` both, named ``head/stats.*``, ``head/pseudo.*`` and ``net/<weight>``, and the
  ``serving`` flag as received;
* to ``evaluate``: ``metrics`` with :data:`EVAL_METRICS` (with ``pipeline = "handover"`` also the
  local test accuracy of the head and of the network: :data:`server.handover.EVAL_METRICS`);
* to ``query.client_id``: ``metrics`` with ``client-id``.

With ``secure-aggregation = true`` a round's training is Flower's SecAgg+ protocol instead
(:mod:`server.secure`, :mod:`clients.secure`): four train messages per site (setup, key sharing, the
masking stage, unmasking). The masking stage carries the train message above; its reply holds no
array, only the masked fixed-point vector of the arrays (:mod:`fedal.secure`) and the same report
scalars, in the clear, in Flower's legacy ``fitres`` records; the other stages hold the protocol's
public keys and encrypted key shares.

Every metric is an aggregate count or mean over the client's data. No raw input, no
sample id and no per-sample label is ever put in a message (but a class statistic of a
single sample is that sample's feature vector: see PRIVACY.md): the builders below take only
scalars and a model state, and ``tests/test_privacy_audit.py`` checks every reply the
ClientApp sends against these lists. The server reads every key it receives.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedal.messages import INSTRUCTION_KEYS, REPORT_KEYS, TrainInstruction, TrainReport

__all__ = ["TrainInstruction", "TrainReport", "check_update", "eval_reply", "global_stats_of", "metrics_problem", "identify_message",
           "identify_reply",
           "model_record", "report_of", "reply_problem", "state_from_record", "train_reply", "with_budget"]

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
#: server -> client, head pipeline: the summed statistics of the last aggregation (an ArrayRecord)
GLOBAL_STATS = "global-stats"
WEIGHT_KEY = "num-examples"  # Flower strategies weight updates by this metric

# server -> client (the fields of fedal.messages.TrainInstruction)
SERVER_ROUND, QUERY_BUDGET, PROXIMAL_MU, LR_FACTOR, OFFLINE_BUDGET, DP_INCLUDED, DP_RELEASE = (
    INSTRUCTION_KEYS[k] for k in ("server_round", "query_budget", "proximal_mu", "lr_factor", "offline_budget",
                                  "dp_included", "dp_release"))
# client-side DP: the norm each client clips its update to (Flower's own key, set by fedal's DP wrapper)
DP_CLIPPING_NORM = KEY_CLIPPING_NORM
#: the query a node answers with its client id (message type ``query.client_id``)
IDENTIFY = "client_id"
CLIENT_ID = "client-id"

# client -> server: aggregate scalars only
TRAIN_METRICS = tuple(REPORT_KEYS.values())
EVAL_METRICS = (WEIGHT_KEY, CLIENT_ID, "eval-loss", "eval-acc")
IDENTIFY_METRICS = (CLIENT_ID,)


def model_record(state: "OrderedDict[str, np.ndarray]") -> ArrayRecord:
    """Model weights as an ArrayRecord (keys and shapes of the model's state dict, in its order; the same arrays
    Flower makes of a torch state dict, built from numpy: a site that sends statistics never imports torch)."""
    return ArrayRecord(OrderedDict((k, Array(np.asarray(v))) for k, v in state.items()))


def global_stats_of(content: RecordDict) -> "OrderedDict[str, np.ndarray] | None":
    """The summed statistics a head-pipeline train message's records ``content`` carry (:data:`GLOBAL_STATS`), or
    None."""
    return state_from_record(content[GLOBAL_STATS]) if GLOBAL_STATS in content else None


def state_from_record(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """Model weights from the ArrayRecord ``record`` as numpy arrays."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def train_reply(msg: Message, state, report: TrainReport) -> Message:
    """The only reply a client sends to the train message ``msg``: weights ``state`` and ``report``."""
    return Message(RecordDict({ARRAYS: model_record(state), METRICS: MetricRecord(report.to_metrics())}),
                   reply_to=msg)


def report_of(reply: Message) -> TrainReport:
    """The :class:`TrainReport` of a train reply (checked first with :func:`reply_problem`)."""
    return TrainReport.from_metrics(dict(reply.content[METRICS]))


def eval_reply(msg: Message, *, num_examples: int, client_id: int, loss: float, accuracy: float,
               each: dict[str, float] | None = None) -> Message:
    """The only reply a client sends to the evaluate message ``msg``: ``num_examples``,
    ``client_id``, ``loss`` and ``accuracy`` of the global model on its local test set (and, with
    ``pipeline = "handover"``, ``each`` model's accuracy: ``eval-acc-head``, ``eval-acc-network``)."""
    metrics = MetricRecord({WEIGHT_KEY: int(num_examples), CLIENT_ID: int(client_id),
                            "eval-loss": _finite(loss), "eval-acc": _finite(accuracy),
                            **{k: _finite(v) for k, v in (each or {}).items()}})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def identify_message(node_id: int) -> Message:
    """The question node ``node_id`` answers with its client id (it carries nothing)."""
    return Message(RecordDict(), message_type=f"query.{IDENTIFY}", dst_node_id=int(node_id))


def identify_reply(msg: Message, client_id: int) -> Message:
    """A client's answer to the :func:`identify_message` ``msg``: its ``client_id``, nothing else."""
    return Message(RecordDict({METRICS: MetricRecord({CLIENT_ID: int(client_id)})}), reply_to=msg)


def with_budget(msg: Message, query_budget: int, lr_factor: float = 1.0, offline_budget: int = 0) -> Message:
    """A copy of a Flower strategy's train message ``msg`` that gives its node ``query_budget`` labels (and the
    round's ``lr_factor`` of the local learning rate, and ``offline_budget`` labels it may ask for on its own if
    the server becomes unreachable).

    Flower strategies send one shared ``RecordDict`` to every node; a per-node budget
    needs a fresh ``ConfigRecord`` per message. The strategy's own config keys are kept
    (``server-round``; ``proximal-mu`` from FedProx; the clipping norm from the DP
    wrapper): together they are a :class:`TrainInstruction`.
    """
    content = msg.content
    config = {**(dict(content[CONFIG]) if CONFIG in content else {}), QUERY_BUDGET: int(query_budget)}
    if lr_factor != 1.0:  # the round's share of the learning rate (lr-schedule); absent = 1
        config[LR_FACTOR] = float(lr_factor)
    if offline_budget:  # absent = 0: no labels asked while the server is away
        config[OFFLINE_BUDGET] = int(offline_budget)
    records = {key: content[key] for key in content if key != CONFIG}
    records[CONFIG] = ConfigRecord(config)
    return Message(RecordDict(records), message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)


def reply_problem(content: RecordDict, metric_keys: tuple[str, ...], *, arrays: bool) -> str | None:
    """Why a reply's records ``content`` are not what this protocol defines, or None.

    Exactly one ``metrics`` MetricRecord with the keys ``metric_keys``, all finite
    scalars, and (``arrays``) one ``arrays`` ArrayRecord.
    """
    expected = {METRICS: MetricRecord, **({ARRAYS: ArrayRecord} if arrays else {})}
    names = sorted(content.keys())
    if names != sorted(expected):
        return f"records {names}, expected {sorted(expected)}"
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            return f"record {name!r} is a {type(content[name]).__name__}, expected a {kind.__name__}"
    return metrics_problem(content[METRICS], metric_keys)


def metrics_problem(metrics, metric_keys: tuple[str, ...]) -> str | None:
    """Why the scalars ``metrics`` (a MetricRecord, or the clear report of a secure round) are not exactly
    ``metric_keys``, all finite numbers; or None."""
    if sorted(metrics.keys()) != sorted(metric_keys):
        return f"metrics {sorted(metrics.keys())}, expected {sorted(metric_keys)}"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key!r} is {value!r}, not a finite number"
    return None


def check_update(record: ArrayRecord, reference: dict[str, tuple[int, ...]]) -> str | None:
    """Why the update ``record`` must not be aggregated (keys or shapes differ from ``reference``,
    NaN/Inf), or None."""
    keys = list(record.keys())
    if set(keys) != set(reference):
        missing, extra = sorted(set(reference) - set(keys)), sorted(set(keys) - set(reference))
        return f"wrong keys (missing {missing[:5]}, unexpected {extra[:5]})"
    for key in keys:
        arr = record[key].numpy()
        if tuple(arr.shape) != tuple(reference[key]):
            return f"array {key!r} has shape {tuple(arr.shape)}, expected {tuple(reference[key])}"
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            return f"array {key!r} holds NaN or Inf"
    return None


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else -1.0  # Flower metrics must be finite; -1 = "not measured"
