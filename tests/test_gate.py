"""The site gate's checks, message by message (tests/test_deployment_security.py runs it in a real deployment)."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.proto import fab_pb2, fleet_pb2, message_pb2, run_pb2

from clients.gate import SiteGate, app_hash, gate_certificates
from fedal.exceptions import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOOD, BAD = "a" * 64, "b" * 64


@pytest.fixture
def gate(tmp_path):
    ca, _, _ = gate_certificates(tmp_path / "tls")  # any CA file will do: nothing is sent upstream here
    g = SiteGate("127.0.0.1:1", ca, {GOOD}, "127.0.0.1:0", tmp_path / "tls")
    yield g
    g.stop()


def _run(run_id: int, fab_hash: str) -> bytes:
    return run_pb2.GetRunResponse(run=run_pb2.Run(run_id=run_id, fab_hash=fab_hash)).SerializeToString()


def _pulled(*run_ids: int) -> bytes:
    response = fleet_pb2.PullMessagesResponse()
    for i, run_id in enumerate(run_ids):
        m = response.messages_list.add()
        m.metadata.run_id, m.metadata.message_id = run_id, f"m{i}"
        response.message_object_trees.add().object_id = f"m{i}"
    return response.SerializeToString()


def test_a_run_of_another_app_is_refused_and_its_messages_never_reach_the_supernode(gate):
    assert gate._check_response("/v1/fleet/get-run", _run(1, GOOD))[1] is None
    body, why = gate._check_response("/v1/fleet/get-run", _run(2, BAD))
    assert why and "run 2" in why and gate.refused == {2: BAD} and gate.allowed == {1: GOOD}
    body, why = gate._check_response("/v1/fleet/pull-messages", _pulled(1, 2, 1))
    left = fleet_pb2.PullMessagesResponse.FromString(body)
    assert why is None and [m.metadata.run_id for m in left.messages_list] == [1, 1]
    assert [t.object_id for t in left.message_object_trees] == ["m0", "m2"]
    for path, request in [("pull-object", message_pb2.PullObjectRequest(run_id=2)),
                          ("push-object", message_pb2.PushObjectRequest(run_id=2)),
                          ("confirm-message-received", message_pb2.ConfirmMessageReceivedRequest(run_id=2))]:
        assert "run 2" in gate._check_request(f"/v1/fleet/{path}", request.SerializeToString())
        assert gate._check_request(f"/v1/fleet/{path}", type(request)(run_id=1).SerializeToString()) is None
    push = fleet_pb2.PushMessagesRequest()
    push.messages_list.add().metadata.run_id = 2
    assert gate._check_request("/v1/fleet/push-messages", push.SerializeToString())


def test_only_an_accepted_fab_is_fetched_and_it_must_hash_to_what_it_claims(gate):
    asked = fab_pb2.GetFabRequest(hash_str=BAD, run_id=3).SerializeToString()
    assert "not accepted" in gate._check_request("/v1/fleet/get-fab", asked) and 3 in gate.refused
    content = b"the reviewed app"
    accepted = SiteGate.__new__(SiteGate)
    accepted.accepted = {hashlib.sha256(content).hexdigest()}
    good = fab_pb2.GetFabResponse(fab=fab_pb2.Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content))
    assert SiteGate._check_response(accepted, "/v1/fleet/get-fab", good.SerializeToString())[1] is None
    swapped = fab_pb2.GetFabResponse(fab=fab_pb2.Fab(hash_str=hashlib.sha256(content).hexdigest(), content=b"other"))
    assert SiteGate._check_response(accepted, "/v1/fleet/get-fab", swapped.SerializeToString())[1]


def test_paths_outside_the_fleet_api_do_not_pass(gate):
    for path in ("/v1/control/start-run", "/v1/runtime/pull-app-inputs", "/docs", "/v1/fleet/pull-messages?x=1"):
        assert gate._check_request(path, b"")


def test_the_app_hash_is_the_one_flower_builds_and_the_gate_stays_on_loopback(tmp_path):
    built = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(REPO)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
    assert app_hash(REPO) == app_hash(fab) == app_hash(hashlib.sha256(fab.read_bytes()).hexdigest().upper())
    assert fab.name.split(".")[-2] == app_hash(fab)[:8]  # the prefix `flwr build` prints in the file's name
    with pytest.raises(ConfigError, match="neither"):
        app_hash("abc")
    with pytest.raises(ConfigError, match="pyproject.toml"):
        app_hash(tmp_path)
    ca, _, key = gate_certificates(tmp_path / "tls")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with pytest.raises(ConfigError, match="loopback"):
        SiteGate("127.0.0.1:1", ca, {GOOD}, "0.0.0.0:0", tmp_path / "tls")
    with pytest.raises(ConfigError, match="at least one"):
        SiteGate("127.0.0.1:1", ca, set(), "127.0.0.1:0", tmp_path / "tls")
