"""Everything that crosses the network between a client and the server.

This file is what a privacy review reads. A client's reply holds exactly:

* ``arrays``: the model weights (the global model's own keys and shapes);
* ``metrics``: the scalars in :data:`TRAIN_METRICS` or :data:`EVAL_METRICS`, all
  aggregate counts or means over the client's data.

No raw input, no sample id and no per-sample label is ever put in a message: the
builders below take only scalars and a model state, and ``tests/test_privacy_audit.py``
checks every reply the ClientApp sends against these lists.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
WEIGHT_KEY = "num-examples"  # Flower strategies weight updates by this metric

# server -> client, per node
SERVER_ROUND, QUERY_BUDGET, QUERY_ROUND, PROXIMAL_MU = "server-round", "query-budget", "query-round", "proximal-mu"
# client-side DP: the norm each client clips its update to (Flower's own key, set by its DP wrapper)
DP_CLIPPING_NORM = KEY_CLIPPING_NORM

# client -> server: aggregate scalars only
TRAIN_METRICS = (
    WEIGHT_KEY,          # labeled samples trained on (the aggregation weight)
    "client-id",         # the client's own index (not a sample id)
    "budget",            # query budget this round, as received
    "queries-used",      # labels requested this round (<= budget)
    "labels-added",      # answers recorded this round
    "unlabeled-left",    # unlabeled pool size after the queries
    "pending",           # requests still waiting for an oracle answer
    "mean-uncertainty",  # mean normalised entropy of the pool under the global model
    "train-loss",        # mean local training loss
)
EVAL_METRICS = (WEIGHT_KEY, "client-id", "eval-loss", "eval-acc")


@dataclass
class TrainReport:
    """The aggregate scalars a client reports after a training round.

    Attributes: ``num_examples`` (labeled samples trained on), ``client_id``, ``budget``,
    ``queries_used``, ``labels_added``, ``unlabeled_left``, ``pending``, ``mean_uncertainty``,
    ``train_loss`` -- see :data:`TRAIN_METRICS`.
    """

    num_examples: int
    client_id: int
    budget: int
    queries_used: int
    labels_added: int
    unlabeled_left: int
    pending: int
    mean_uncertainty: float
    train_loss: float

    def to_record(self) -> MetricRecord:
        """The report as a Flower MetricRecord keyed by :data:`TRAIN_METRICS`."""
        values = {k.replace("-", "_"): k for k in TRAIN_METRICS}
        return MetricRecord({key: _scalar(getattr(self, attr)) for attr, key in values.items()})

    @classmethod
    def from_record(cls, record: MetricRecord) -> "TrainReport":
        """Parse a reply's MetricRecord ``record``; KeyError if a metric is missing."""
        return cls(**{k.replace("-", "_"): record[k] for k in TRAIN_METRICS})


def _scalar(value: float | int) -> float | int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else -1.0  # Flower metrics must be finite; -1 = "not measured"


def model_record(state: "OrderedDict[str, np.ndarray]") -> ArrayRecord:
    """Model weights as an ArrayRecord (keys and shapes of the model's state dict)."""
    import torch

    return ArrayRecord(torch_state_dict=OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in state.items()))


def state_from_record(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    """Model weights from the ArrayRecord ``record`` as numpy arrays."""
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def train_reply(msg: Message, state, report: TrainReport) -> Message:
    """The only reply a client sends to the train message ``msg``: weights ``state`` and ``report``."""
    return Message(RecordDict({ARRAYS: model_record(state), METRICS: report.to_record()}), reply_to=msg)


def eval_reply(msg: Message, *, num_examples: int, client_id: int, loss: float, accuracy: float) -> Message:
    """The only reply a client sends to the evaluate message ``msg``: ``num_examples``,
    ``client_id``, ``loss`` and ``accuracy`` of the global model on its local test set."""
    metrics = MetricRecord({WEIGHT_KEY: int(num_examples), "client-id": int(client_id),
                            "eval-loss": _scalar(loss), "eval-acc": _scalar(accuracy)})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def with_node_config(msg: Message, extra: dict[str, int | float | bool | str]) -> Message:
    """A copy of a strategy's message ``msg`` whose config has the per-node values ``extra`` added.

    Flower strategies send one shared ``RecordDict`` to every node; a per-node budget
    needs a fresh ``ConfigRecord`` per message.
    """
    content = msg.content
    config = ConfigRecord({**dict(content[CONFIG]), **extra}) if CONFIG in content else ConfigRecord(extra)
    records = {key: content[key] for key in content if key != CONFIG}
    records[CONFIG] = config
    return Message(RecordDict(records), message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)


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
