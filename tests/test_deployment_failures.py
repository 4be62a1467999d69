"""A failed deployment says why: the ServerApp's own error (Flower keeps its log: ``flwr log``) and each site's
ClientApp error come first in what the helper prints, and paths mean what the user typed.

Before, ``deploy/run_local_deployment.py --data-dir ../shared/data ...`` printed ``ended as finished:failed`` and
the SuperLink's start-up lines: the relative path had gone into the run config as typed, and the ServerApp, in the
SuperLink's folder, did not find the data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from federation_helpers import require_deployment_tools

from tests.test_deployment import _deploy_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "run_local_deployment.py"


@pytest.fixture(scope="module")
def deploy():
    return _deploy_module()


#: what `flwr log RUN_ID --show` printed for a ServerApp that refused its output-dir (colours and all)
SERVERAPP_LOG = """Using SuperLink: fedal-local (127.0.0.1:46649)
\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/flwr/server/run_serverapp.py", line 60, in run
    server_app(grid=grid, context=context)
  File "/home/flwr/apps/fedal.fedal.0.1.0.6717ba31/server/app.py", line 162, in run_federation
    raise ConfigError(f"output-dir {recorder.out} holds another run's results; set resume = true to continue it, "
fedal.exceptions.ConfigError: output-dir /srv/run holds another run's results; set resume = true to continue it
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.
"""


def test_the_last_error_of_a_log_is_its_last_tracebacks_exception_in_plain_words(deploy):
    assert deploy.last_error(SERVERAPP_LOG) == ("ConfigError: output-dir /srv/run holds another run's results; "
                                                "set resume = true to continue it")
    two = SERVERAPP_LOG.replace("ConfigError: output-dir", "DataFileError: first") + SERVERAPP_LOG
    assert deploy.last_error(two).startswith("ConfigError: output-dir")
    assert deploy.last_error("INFO: all fine\nERROR: Exit Code: 201\n") is None


@pytest.mark.deployment
@pytest.mark.slow
def test_the_helper_resolves_a_relative_data_dir_and_prints_the_serverapps_refusal_first(deploy, data_dir, tmp_path):
    """The issue's command, from another folder, with a relative --data-dir, into a workdir that holds a run: the
    data is found (the ServerApp loads it before it looks at output-dir), and the refusal is what it prints first."""
    require_deployment_tools(deploy)
    workdir = tmp_path / "deploy"
    (workdir / "server").mkdir(parents=True)
    (workdir / "server" / "results.json").write_text('{"rounds": []}')
    typed_in = tmp_path / "elsewhere"
    typed_in.mkdir()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("FEDAL_DATA_DIR", None)  # the data must come from the --data-dir as typed
    done = subprocess.run([sys.executable, str(SCRIPT), "--sites", "2", "--rounds", "1", "--dataset", "bloodmnist",
                           "--data-dir", os.path.relpath(data_dir, typed_in), "--set", "max-train=600",
                           "--workdir", os.path.relpath(workdir, typed_in)],
                          cwd=typed_in, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    first = done.stderr.strip().splitlines()[:3]
    assert first[0].startswith("deployment failed: run ") and first[0].endswith("ended as finished:failed."), first
    assert first[1].startswith("The ServerApp's error: ConfigError: output-dir ") and \
        "holds another run's results" in first[1], first
    assert first[2].startswith("Full logs: the ServerApp's in ") and str(workdir / "logs" / "serverapp-") in first[2]
    sent = (workdir / "run-config.toml").read_text()
    assert f'data-dir = "{data_dir.resolve()}"' in sent  # absolute before it was sent
    assert json.loads((workdir / "server" / "results.json").read_text()) == {"rounds": []}  # left alone
    assert "holds another run's results" in next((workdir / "logs").glob("serverapp-*.log")).read_text()


@pytest.mark.deployment
@pytest.mark.slow
def test_sites_that_cannot_read_their_data_are_named_with_their_error_and_where_the_path_was_read(deploy, tmp_path):
    """Both sites' node configs name a relative data-path that is not in their SuperNode's folder: every site fails
    every round, and the report gives the ServerApp's error (with the sites' reasons) and each site's own."""
    require_deployment_tools(deploy)
    dep = deploy.LocalDeployment(tmp_path / "deploy", sites=2, verbose=False,
                                 run_config={"dataset": "digits", "rounds": 1, "round-timeout": 60.0})
    try:
        dep.prepare()
        dep.start_superlink()
        for site in dep.site_list:
            dep.register(site)
            site.data_path = Path(site.data_path.name)  # site-0.npz: relative, and not in the SuperNode's folder
            dep.start_supernode(site)
        run_id = dep.submit()
        with pytest.raises(deploy.DeploymentError) as info:
            dep.wait(run_id, 1, timeout=300)
    finally:
        dep.stop()
    lines = str(info.value).splitlines()
    assert lines[0] == f"run {run_id} ended as finished:failed.", lines
    assert lines[1].startswith("The ServerApp's error: FederationFailed: every client failed every round"), lines
    read_as = f"(relative, so read as {dep.workdir}/site-"
    assert f"the clients said: DataFileError: site data file site-0.npz {read_as}0.npz" in lines[1], lines
    for site, line in zip(dep.site_list, lines[2:4]):
        assert line.startswith(f"Site {site.client_id}'s ClientApp error: DataFileError: site data file "
                               f"site-{site.client_id}.npz {read_as}{site.client_id}.npz"), lines
    assert lines[4].startswith("Full logs: ")
