"""Secure aggregation on Flower's Deployment Engine: TLS, SuperNode authentication and SecAgg+.

Two registered SuperNodes whose node config says ``secure-only = true`` (each refuses a train message
that does not come with the SecAgg+ protocol): a run with ``secure-aggregation = true`` trains and
improves; a run without it gets nothing from them. Runs are submitted once both SuperNodes are online at the
SuperLink, and the test waits for events (a run finished or failed) with generous deadlines, never for a fixed
time. Every process is stopped afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
from federation_helpers import require_deployment_tools

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2
#: digits rows hold 64 values in [0, 1]: their norm is at most 8, the sites clip to it
RUN_CONFIG = {"dataset": "digits", "rounds": ROUNDS, "initial-labels": 10, "round-budget": 20,
              "round-timeout": 300.0, "seed": 0, "head-clip-norm": 8.0}  # a timeout, not a pace: generous


@pytest.fixture(scope="module")
def deploy():
    spec = importlib.util.spec_from_file_location("run_local_deployment_secure",
                                                  REPO / "deploy" / "run_local_deployment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deployment(deploy, tmp_path_factory):
    """SuperLink + two registered secure-only SuperNodes; stopped whatever the tests do."""
    require_deployment_tools(deploy)
    dep = deploy.LocalDeployment(tmp_path_factory.mktemp("deployment-secure"), sites=2, run_config=RUN_CONFIG,
                                 verbose=False)
    try:
        dep.prepare()
        for site in dep.site_list:
            site.extra = "secure-only=true"
        dep.start_superlink()
        for site in dep.site_list:
            dep.register(site)
        for site in dep.site_list:
            dep.start_supernode(site)
        dep.wait_online()  # both connected: each run's first round has both (the ServerApp waits 15 s)
        yield dep
    finally:
        dep.stop()


def test_secure_aggregation_over_tls_trains_and_the_sites_refuse_a_clear_run(deploy, deployment):
    started = time.monotonic()
    run_id = deployment.submit(**{"secure-aggregation": True})
    results = deployment.wait(run_id, ROUNDS, timeout=600)
    elapsed = time.monotonic() - started
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for row in rounds:  # both sites in every round's sum
        assert sorted(row["clients"]) == ["0", "1"], row
    assert rounds[1]["labels"] > rounds[0]["labels"] == 2 * RUN_CONFIG["initial-labels"]
    assert rounds[1]["accuracy"] > rounds[0]["accuracy"]
    assert not results.get("events"), results.get("events")
    print(f"\nsecure: {ROUNDS} rounds in {elapsed:.1f} s (submit to finish); server seconds per round: "
          f"{[r['seconds'] for r in rounds]}")
    # the same sites, a run that asks for their updates in the clear: they refuse, nothing is aggregated
    clear_dir = deployment.workdir / "server-clear"
    run_id = deployment.submit(**{"rounds": 1, "output-dir": str(clear_dir)})
    with pytest.raises(deploy.DeploymentError, match="ended as finished:"):  # it failed; a timeout would say so
        deployment.wait(run_id, 1, timeout=600)
    partial = json.loads((clear_dir / "results.json").read_text())
    assert all(r["labels"] == 0 and not r["clients"] for r in partial["rounds"]), partial["rounds"]
    refusals = [e for e in partial["events"] if "secure-only = true" in e["detail"]]
    assert len(refusals) == 2, partial["events"]  # both sites, and nothing else was asked of them
