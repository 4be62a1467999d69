"""A site's ClientApp profiles every message it handles when ``$FEDAL_PROFILE_DIR`` is set (clients.profiling),
and nothing otherwise. The federation runs in process (the bare loop of simulations.bench.loop)."""
from __future__ import annotations

import json
import pstats
import time

from fedal.config import FederationConfig


def _run(tmp_path, name):
    from simulations.bench.loop import run_in_loop

    cfg = FederationConfig(dataset="digits", clients=2, min_clients=2, rounds=2, initial_labels=10, round_budget=20,
                           output_dir=str(tmp_path / name))
    run_in_loop(cfg)


def test_every_message_is_profiled_and_timed_when_asked(tmp_path, monkeypatch):
    from clients.profiling import PROFILE_ENV, process_started_at

    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile"))
    before = time.time()
    _run(tmp_path, "run")
    calls = [json.loads(line) for line in (tmp_path / "profile" / "calls.jsonl").read_text().splitlines()]
    # identify (round 1 asks each node which client it is), then train and evaluate per client and round
    assert sorted((c["type"], c["round"]) for c in calls if c["type"] != "query.identify") == [
        ("evaluate", 1), ("evaluate", 1), ("evaluate", 2), ("evaluate", 2),
        ("train", 1), ("train", 1), ("train", 2), ("train", 2)]
    for call in calls:
        assert call["process_started"] <= call["call_started"] and before <= call["call_started"] <= time.time()
        assert 0 < call["call_seconds"] < 60
    assert abs(process_started_at() - calls[0]["process_started"]) < 1e-6  # this process handled them all
    stats = pstats.Stats(*map(str, (tmp_path / "profile").glob("client-*.prof")))
    trains = [v[1] for (path, _, name), v in stats.stats.items() if path.endswith("clients/app.py") and name == "train"]
    assert trains == [4]


def test_nothing_is_measured_without_the_variable(tmp_path, monkeypatch):
    from clients.profiling import PROFILE_ENV

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    _run(tmp_path, "run")
    assert not list(tmp_path.rglob("calls.jsonl")) and not list(tmp_path.rglob("*.prof"))
