"""Benchmark: bytes a client sends per round vs the size of the model itself.

Builds the exact reply a client sends after a training round
(:func:`fedal.flower.protocol.train_reply`: the model's ArrayRecord and the aggregate
MetricRecord) and an evaluation reply, serialises them with Flower's own protobuf
serde (what goes on the wire in deployment) and compares with the model's raw weight
bytes (sum of ``nbytes`` of its float32 arrays). Prints a markdown table and writes
``simulations/results/bench_bytes.{md,json}``.

    .venv/bin/python -m simulations.bench.bytes
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

MODELS = {  # name -> (input shape, classes): the models fedal builds for the data sets
    "MLP (digits, 64 features, 10 classes)": ((64,), 10),
    "SmallCNN (PneumoniaMNIST, 1x28x28, 2 classes)": ((1, 28, 28), 2),
    "SmallCNN (MNIST, 1x28x28, 10 classes)": ((1, 28, 28), 10),
    "SmallCNN (BloodMNIST, 3x28x28, 8 classes)": ((3, 28, 28), 8),
}


def measure(input_shape: tuple[int, ...], n_classes: int) -> dict:
    """Sizes, in bytes, of one client's replies for the model fedal builds for this input."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.serde import message_to_proto, metric_record_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from fedal.flower import protocol
    from fedal.models import build_model

    # outside a Flower process nobody set the identity a new Message is stamped with
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    model = build_model(input_shape, n_classes, seed=0)
    state = model.get_state()
    raw = sum(v.nbytes for v in state.values())
    params = sum(v.size for v in state.values())
    incoming = Message(RecordDict({protocol.ARRAYS: protocol.model_record(state),
                                   protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 3, protocol.QUERY_BUDGET: 10})}),
                       dst_node_id=1, message_type="train")
    report = protocol.TrainReport(num_examples=120, client_id=7, queries_used=10, labels_added=10,
                                  unlabeled_left=900, pending=0, mean_uncertainty=0.42, train_loss=0.8)
    reply = protocol.train_reply(incoming, state, report)
    arrays = reply.content[protocol.ARRAYS]
    metrics = reply.content[protocol.METRICS]
    eval_reply = protocol.eval_reply(incoming, num_examples=50, client_id=7, loss=0.7, accuracy=0.8)
    train_wire = message_to_proto(reply).ByteSize()
    return {"params": int(params), "model_bytes": int(raw),
            "array_record_count_bytes": int(arrays.count_bytes()),
            "metric_record_proto_bytes": int(metric_record_to_proto(metrics).ByteSize()),
            "train_reply_proto_bytes": int(train_wire),
            "eval_reply_proto_bytes": int(message_to_proto(eval_reply).ByteSize()),
            "round_upload_bytes": int(train_wire + message_to_proto(eval_reply).ByteSize()),
            "overhead_pct": 100.0 * (train_wire + message_to_proto(eval_reply).ByteSize() - raw) / raw}


def table(rows: dict[str, dict]) -> str:
    lines = ["| model | parameters | model bytes (float32) | train reply (protobuf) | of which metrics | "
             "eval reply | upload per round | overhead vs model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params']:,} | {r['model_bytes']:,} | {r['train_reply_proto_bytes']:,} | "
                     f"{r['metric_record_proto_bytes']:,} | {r['eval_reply_proto_bytes']:,} | "
                     f"{r['round_upload_bytes']:,} | {r['overhead_pct']:+.3f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    rows = {name: measure(shape, c) for name, (shape, c) in MODELS.items()}
    text = table(rows)
    print(text)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bytes.md").write_text(text + "\n")
    (out / "bench_bytes.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
