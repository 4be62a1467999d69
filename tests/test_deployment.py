"""fedal on Flower's Deployment Engine, on 127.0.0.1: a SuperLink with TLS and SuperNode
authentication, two registered SuperNodes each holding only its own data file, a run
submitted with ``flwr run`` once both are online at the SuperLink; an unregistered SuperNode is
refused; every process is stopped afterwards, also when a test fails (process groups, fixture
finalizer). The tests wait for events (a node online, a run finished, a process gone) with generous
deadlines, never for a fixed time: a busy machine only makes them slower.

Uses ``deploy/run_local_deployment.py`` (what the deployment guide runs) and needs
``openssl`` and ``ssh-keygen`` (``.ci/install-system.sh``).
"""
from __future__ import annotations

import importlib.util
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation_helpers import EVENT_TIMEOUT, require_deployment_tools, wait_for

from fedal.config import FederationConfig
from fedal.federation import federation_dataset
from fedal.models import build_model
from fedal.pool import Pool
from fedal.sitedata import load_site

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2
RUN_CONFIG = {"dataset": "digits", "rounds": ROUNDS, "initial-labels": 10, "round-budget": 20, "local-epochs": 1,
              "min-local-steps": 20, "round-timeout": 300.0, "seed": 0}  # a timeout, not a pace: generous


def _deploy_module():
    spec = importlib.util.spec_from_file_location("run_local_deployment", REPO / "deploy" / "run_local_deployment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deploy():
    return _deploy_module()


@pytest.fixture(scope="module")
def deployment(deploy, tmp_path_factory):
    """SuperLink + two registered SuperNodes; stopped (process groups) whatever the tests do."""
    require_deployment_tools(deploy)
    with deploy.LocalDeployment(tmp_path_factory.mktemp("deployment"), sites=2, run_config=RUN_CONFIG,
                                verbose=False) as dep:  # stopped on leaving, whatever the tests do
        dep.start_all()
        yield dep


def test_two_sites_train_over_tls_and_the_global_model_improves(deployment):
    started = time.monotonic()
    run_id = deployment.submit()
    results = deployment.wait(run_id, ROUNDS, timeout=600)
    elapsed = time.monotonic() - started
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:  # both sites answered every round
        assert sorted(row["clients"]) == ["0", "1"], row
    assert rounds[1]["labels"] > rounds[0]["labels"] == 2 * RUN_CONFIG["initial-labels"]
    cfg = FederationConfig.from_mapping({**RUN_CONFIG, "clients": 2, "min-clients": 2})
    data = federation_dataset(cfg)
    _, untrained = build_model(data.input_shape, data.n_classes, seed=cfg.seed).evaluate(data.X_test, data.y_test)
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"]
    assert rounds[1]["accuracy"] > untrained + 0.05
    # each site's labels are in its own database, and its data file holds only its own share
    for site in deployment.site_list:
        db = site.state_dir / f"client-{site.client_id}.db"
        assert db.is_file()
        reported = rounds[1]["clients"][str(site.client_id)]["labeled"]
        own = load_site(site.data_path, site.client_id)
        with Pool(own.n_classes, size=len(own.y_pool), path=db) as pool:
            assert pool.counts()["labeled"] == reported > RUN_CONFIG["initial-labels"]
    sizes = [len(load_site(s.data_path).y_pool) + len(load_site(s.data_path).y_test) for s in deployment.site_list]
    assert sum(sizes) == len(data.y_train)
    print(f"\n{ROUNDS} rounds in {elapsed:.1f} s (submit to finish); server seconds per round: "
          f"{[r['seconds'] for r in rounds]}")


def test_superlink_speaks_only_tls_with_the_private_ca(deployment):
    address = ("127.0.0.1", deployment.superlink_port)
    with socket.create_connection(address, timeout=60) as raw:  # timeouts, not paces: a busy machine answers late
        with ssl.create_default_context(cafile=str(deployment.ca)).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(address, timeout=60) as raw:  # the system's CAs do not vouch for it
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(address, timeout=60) as raw:  # plain HTTP gets no HTTP answer
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        raw.settimeout(5)  # whatever comes (or nothing, here or later) is no HTTP 2xx
        try:
            reply = raw.recv(64)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            reply = b""
        assert not reply.startswith(b"HTTP/1.1 2")


def test_unregistered_supernode_is_refused(deploy, deployment):
    key = deployment.make_key(deployment.workdir / "keys" / "intruder")
    first = deployment.site_list[0]
    intruder = deploy.Site(7, first.data_path, deployment.workdir / "state" / "intruder", key, port=deploy.free_port())
    proc = deployment.start_supernode(intruder, name="intruder", max_wait=30)
    try:
        proc.wait(timeout=EVENT_TIMEOUT)  # it gives up once refused, or after its 30 s of retries at most
    except subprocess.TimeoutExpired:
        pytest.fail("the unregistered SuperNode kept running:\n" + deployment.log_tail(proc))
    log = deployment.log_tail(proc)
    assert proc.returncode != 0 and "Failed to activate SuperNode" in log, log
    assert not intruder.state_dir.exists()  # it never got a message to handle


def test_stop_ends_every_process(deployment):
    groups = [p.pid for p in deployment.processes]
    assert any(p.poll() is None for p in deployment.processes)
    deployment.stop()
    # no leader and no child (SuperExec, ClientApp) left in any group, once the kernel has reaped what stop() killed
    wait_for("every process group to end", lambda: not any(group_alive(pgid) for pgid in groups), None, timeout=60)


def group_alive(pgid: int) -> bool:
    """True if a process of group ``pgid`` is alive (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
