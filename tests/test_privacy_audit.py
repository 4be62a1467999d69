"""Privacy audit: every reply a ClientApp sends in a real simulation holds only model
weights and the aggregate scalars :mod:`fedal.flower.protocol` lists.

The replies are captured inside the Ray workers by a Flower mod (see
``federation_helpers.capture_mod``); the same audit is shown to flag replies that
smuggle sample ids, raw inputs or a config record.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from federation_helpers import SAMPLE_SIZES, audit_reply, audited_run, describe_content
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict

from fedal.federation import federation_dataset
from fedal.flower import protocol
from fedal.models import build_model


def reply_shapes(cfg) -> dict[str, tuple]:
    """What a train reply's arrays are: the network's weights, or the head pipeline's statistics."""
    from fedal.features import featurizer_for
    from fedal.models import HeadClassifier

    ds = federation_dataset(cfg)
    if cfg.pipeline == "head":
        featurizer = featurizer_for(cfg.features, ds.input_shape, cfg.pipeline)
        return HeadClassifier.statistics_shapes(ds.n_classes, featurizer.dim(ds.input_shape))
    return {k: tuple(v.shape) for k, v in build_model(ds.input_shape, ds.n_classes, seed=0).get_state().items()}


# --------------------------------------------------------------- the real run
@pytest.mark.slow
def test_every_reply_of_a_real_simulation_passes_the_audit():
    cfg, results, captures = audited_run()
    shapes = reply_shapes(cfg)
    train = [c for c in captures if c["message_type"] == "train"]
    evaluate = [c for c in captures if c["message_type"] == "evaluate"]
    # every client answered every train and evaluate message of every round, and each was seen
    assert len(train) == cfg.clients * cfg.rounds
    assert len(evaluate) == cfg.clients * cfg.rounds
    assert len(captures) == len(train) + len(evaluate)
    assert sorted(c["node_config"]["partition-id"] for c in train) == sorted(list(range(cfg.clients)) * cfg.rounds)
    problems = [p for c in captures for p in audit_reply(c, shapes)]
    assert problems == []


@pytest.mark.slow
def test_captured_replies_are_what_the_server_recorded():
    cfg, results, captures = audited_run()
    train = [c for c in captures if c["message_type"] == "train"]
    # every scalar a client sends is read by the server and kept in the results, under these names
    kept_as = {"client-id": None, "queries-used": "queried", "num-examples": "labeled", "labels-added": "labels_added",
               "pending": "pending", "unlabeled-left": "unlabeled", "mean-uncertainty": "mean_uncertainty",
               "train-loss": "train_loss", "auto-labeled": "auto_labeled", "auto-labeled-correct": "auto_correct",
               "requests-made": "requests_made", "requests-answered": "requests_answered",
               "answer-seconds": "answer_seconds", "batch-diversity": "batch_diversity", "label-entropy": "label_entropy",
               "labels-reviewed": "labels_reviewed", "offline-spent": "offline_spent",
               "dp-releases": "dp_releases"}
    assert sorted(kept_as) == sorted(protocol.TRAIN_METRICS)

    def sent(entry):
        return None if entry["value"] == -1 else entry["value"]  # -1 = not measured / unknown

    reported = sorted(tuple(sent(c["records"]["metrics"]["entries"][k]) for k in kept_as) for c in train)
    recorded = sorted((int(cid), *(e[name] for name in list(kept_as.values())[1:]))
                      for row in results["rounds"] for cid, e in row["clients"].items())
    assert len(reported) == len(recorded)
    for got, kept in zip(reported, recorded):
        assert [g is None for g in got] == [k is None for k in kept], (got, kept)
        assert [g for g in got if g is not None] == pytest.approx([k for k in kept if k is not None]), (got, kept)
    for c in train:
        dtypes = {e["dtype"] for e in c["records"]["arrays"]["entries"].values()}
        assert dtypes == ({"float64"} if cfg.pipeline == "head" else {"float32"})


# -------------------------------------------------- the audit itself can fail
@pytest.fixture
def shapes():
    return {k: tuple(v.shape) for k, v in build_model((64,), 10, seed=0).get_state().items()}


def honest_train_content(shapes, **extra_metrics) -> RecordDict:
    state = OrderedDict((k, np.zeros(s, np.float32)) for k, s in shapes.items())
    report = protocol.TrainReport(num_examples=20, client_id=1, queries_used=10, labels_added=10,
                                  unlabeled_left=300, pending=0, mean_uncertainty=0.4, train_loss=0.9)
    metrics = MetricRecord(report.to_metrics())
    for key, value in extra_metrics.items():
        metrics[key] = value
    return RecordDict({protocol.ARRAYS: protocol.model_record(state), protocol.METRICS: metrics})


def desc(content: RecordDict, kind: str = "train") -> dict:
    return {"message_type": kind, "error": None, "records": describe_content(content)}


def test_audit_passes_the_protocol_builders_output(shapes):
    assert audit_reply(desc(honest_train_content(shapes)), shapes) == []
    metrics = MetricRecord({protocol.WEIGHT_KEY: 5, "client-id": 0, "eval-loss": 0.3, "eval-acc": 0.9})
    assert audit_reply(desc(RecordDict({protocol.METRICS: metrics}), "evaluate"), shapes) == []


def test_audit_flags_a_list_of_sample_ids_in_the_metrics(shapes):
    content = honest_train_content(shapes, **{"labeled-ids": [3, 17, 42, 99]})
    problems = audit_reply(desc(content), shapes)
    assert any("labeled-ids" in p and "not a scalar" in p for p in problems), problems
    assert any("expected exactly" in p for p in problems), problems


def test_audit_flags_a_raw_sample_hidden_in_the_arrays(shapes):
    content = honest_train_content(shapes)
    content[protocol.ARRAYS]["x0"] = Array(np.random.default_rng(0).random(64).astype(np.float32))
    problems = audit_reply(desc(content), shapes)
    assert any("'x0'" in p and "size of a data sample" in p for p in problems), problems


@pytest.mark.parametrize("size", sorted(SAMPLE_SIZES))
def test_audit_flags_an_image_sized_array_even_under_a_model_key(shapes, size):
    content = honest_train_content(shapes)
    key = next(iter(shapes))
    content[protocol.ARRAYS][key] = Array(np.zeros(size, np.float32))  # right key, wrong shape
    problems = audit_reply(desc(content), shapes)
    assert any("size of a data sample" in p for p in problems), problems


def test_audit_flags_a_config_record_and_extra_records(shapes):
    content = honest_train_content(shapes)
    content["config"] = ConfigRecord({"labels": "0,3,3,1"})
    problems = audit_reply(desc(content), shapes)
    assert any("ConfigRecord" in p for p in problems), problems
    ev = RecordDict({protocol.METRICS: MetricRecord({protocol.WEIGHT_KEY: 5, "client-id": 0, "eval-loss": 0.3,
                                                     "eval-acc": 0.9, "per-sample-correct": [1, 0, 1]})})
    problems = audit_reply(desc(ev, "evaluate"), shapes)
    assert any("per-sample-correct" in p for p in problems), problems


def test_audit_flags_a_missing_model_or_metrics(shapes):
    only_metrics = RecordDict({protocol.METRICS: honest_train_content(shapes)[protocol.METRICS]})
    assert audit_reply(desc(only_metrics), shapes)
    partial = honest_train_content(shapes)
    del partial[protocol.ARRAYS][next(iter(shapes))]
    assert any("not the model's state dict" in p for p in audit_reply(desc(partial), shapes))
