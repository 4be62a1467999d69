"""Only the coordinator acts on the federation, and a site runs only the app it accepted (a real deployment).

The attack of issue 37, as an outsider or a site would try it: with nothing but the federation's public ``ca.crt``
and the address the sites are given, run ``flwr ls``, ``flwr supernode list``, ``flwr supernode register``,
``flwr stop`` and ``flwr run`` against a running federation. The coordinator's gateway (nginx, the Fleet API only,
``deploy/fleet_gateway.py``) refuses each, and the run goes on and finishes with every label. Then the coordinator
itself submits another app: each site's gate (``fedal gate``, pinned to the reviewed checkout) refuses it, its code
never runs at the site. And what is left of the surface: every port a site opens is on loopback, every key is
owner-only.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from federation_helpers import require_deployment_tools, wait_for
from test_deployment import _deploy_module

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4
RUN_CONFIG = {"dataset": "digits", "rounds": ROUNDS, "initial-labels": 10, "round-budget": 20, "seed": 0,
              "round-timeout": 300.0}
OUTSIDER = "outsider"


@pytest.fixture(scope="module")
def deploy():
    return _deploy_module()


@pytest.fixture(scope="module")
def deployment(deploy, tmp_path_factory):
    """SuperLink on loopback, the gateway on the sites' address, two sites each behind its gate; stopped whatever
    the tests do."""
    require_deployment_tools(deploy)
    with deploy.LocalDeployment(tmp_path_factory.mktemp("secured"), sites=2, run_config=RUN_CONFIG,
                                verbose=False) as dep:  # stopped on leaving, whatever the tests do
        dep.start_all()
        yield dep


def _outsider_home(dep, folder: Path) -> dict:
    """A fresh ``FLWR_HOME`` that knows what every site knows: the sites' address and the public ca.crt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "{OUTSIDER}"\n\n[superlink.{OUTSIDER}]\n'
                                        f'address = "{dep.fleet_address}"\nroot-certificates = "{dep.ca}"\n')
    return {**dep.env, "FLWR_HOME": str(folder)}


def _succeeded(done: subprocess.CompletedProcess) -> bool:
    """Did a ``flwr ... --format json`` command do what it was asked?"""
    if done.returncode != 0:
        return False
    try:
        return bool(json.loads(done.stdout[done.stdout.index("{"):]).get("success"))
    except ValueError:
        return False


def _evil_app(folder: Path) -> Path:
    """A Flower app that is not the one the sites reviewed: its ClientApp writes down the site's data path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "evilapp"
        version = "1.0.0"
        dependencies = ["flwr"]

        [tool.hatch.build.targets.wheel]
        packages = ["."]

        [tool.flwr.app]
        publisher = "someone"

        [tool.flwr.app.components]
        serverapp = "evilapp:server"
        clientapp = "evilapp:client"

        [tool.flwr.app.config]
        marker = ""
        wait = 30.0
        """))
    (folder / "evilapp.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp

        server = ServerApp()
        client = ClientApp()


        @server.main()
        def main(grid: Grid, context: Context) -> None:
            nodes = list(grid.get_node_ids())
            asks = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query")
                    for n in nodes]
            replies = list(grid.send_and_receive(asks, timeout=float(context.run_config["wait"])))
            print(f"evil app: {len(nodes)} nodes, {sum(r.has_content() for r in replies)} replies with content")


        @client.query()
        def steal(msg: Message, context: Context) -> Message:
            Path(context.run_config["marker"]).mkdir(parents=True, exist_ok=True)
            (Path(context.run_config["marker"]) / f"node-{context.node_id}").write_text(
                str(context.node_config.get("data-path")))
            return Message(RecordDict({"c": ConfigRecord({"stolen": 1})}), reply_to=msg)
        """))
    return folder


def _listening(port: int) -> set[str]:
    """The local addresses a TCP socket of this machine listens on at ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            host_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(host_hex)
            if v6:  # four 32-bit words, each little-endian
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, raw))
            else:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
    return found


def _loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1") or address.startswith("127.") or address == "::ffff:127.0.0.1"


def test_outsiders_and_sites_cannot_act_on_the_federation_and_the_run_finishes_with_every_label(
        deploy, deployment, tmp_path):
    dep = deployment
    run_id = dep.submit()
    wait_for("the run to be running", lambda: dep.run_status(run_id) == "running", dep)
    env = _outsider_home(dep, tmp_path / "outsider-flwr")
    flwr = deploy.BIN / "flwr"

    def attempt(*args):
        return subprocess.run([str(flwr), *map(str, args)], capture_output=True, text=True, env=env, timeout=120,
                              cwd=REPO)

    evil_key = dep.make_key(tmp_path / "evil")
    tried = {
        "flwr ls": attempt("ls", OUTSIDER, "--format", "json"),
        "flwr supernode list": attempt("supernode", "list", OUTSIDER, "--format", "json"),
        "flwr supernode register": attempt("supernode", "register", f"{evil_key}.pub", OUTSIDER, "--format", "json"),
        "flwr stop": attempt("stop", run_id, OUTSIDER, "--format", "json"),
        "flwr run": attempt("run", _evil_app(tmp_path / "evil-app"), OUTSIDER, "--format", "json"),
    }
    for what, done in tried.items():
        assert not _succeeded(done), f"{what} from the sites' side succeeded:\n{done.stdout}\n{done.stderr}"
    # each was answered by the gateway, not by the SuperLink: 403 on a Control API path
    access = (dep.workdir / "gateway" / "access.log").read_text()
    for path in ("/v1/control/list-runs", "/v1/control/list-nodes", "/v1/control/register-node",
                 "/v1/control/stop-run", "/v1/control/start-run"):
        assert f'"POST {path}" 403' in access, f"no refused {path} in the gateway's log:\n{access[-3000:]}"
    assert '/v1/control/' not in "".join(line for line in access.splitlines() if '" 200 ' in line)

    # the coordinator's own view: still two nodes, the run still running, then finished with every label
    assert len(dep.node_statuses()) == 2
    results = dep.wait(run_id, ROUNDS, timeout=900)
    rows = results["rounds"]
    assert len(rows) == ROUNDS and all(len(r["clients"]) == 2 for r in rows)
    # every label asked was given: the initial sets, then a round's budget each round after the first
    assert [r["labels"] for r in rows] == [2 * RUN_CONFIG["initial-labels"] + k * RUN_CONFIG["round-budget"]
                                           for k in range(ROUNDS)]
    assert dep.run_status(run_id) == "finished:completed"
    print(f"\nrefused from the sites' side: {', '.join(tried)}; rounds' seconds {[r['seconds'] for r in rows]}")


def test_a_site_that_pinned_the_reviewed_app_does_not_run_another_one(deploy, deployment, tmp_path):
    dep = deployment
    marker = tmp_path / "stolen"
    app = _evil_app(tmp_path / "other-app")
    out = dep.run_cmd([deploy.BIN / "flwr", "run", app, deploy.CONNECTION, "--run-config",
                       f"marker='{marker}' wait=20.0", "--format", "json"], show=False)
    run_id = int(json.loads(out[out.index("{"):])["run-id"])
    for site in dep.site_list:  # each gate says why, at the site
        wait_for(f"site {site.client_id}'s gate to refuse run {run_id}",
                 lambda s=site: f"refused run {run_id}" in Path(s.gate.log_path).read_text(), dep, [site.gate])
    wait_for(f"run {run_id} to end", lambda: dep.run_status(run_id).startswith("finished"), dep)
    assert not marker.exists(), f"the other app ran at a site: {sorted(p.name for p in marker.iterdir())}"
    server_log = dep.server_log(run_id).read_text()
    assert "evil app: 2 nodes, 0 replies with content" in server_log, server_log[-2000:]
    # the app's code was never fetched: no SuperNode unpacked it (the SuperLink's own copy aside)
    unpacked = [p for p in (dep.workdir / "flwr-home").rglob("evilapp.py") if "supernode" in str(p)]
    assert not unpacked and list((dep.workdir / "flwr-home").glob("supernode-*"))
    # and the sites still serve the reviewed app: both online for the next run
    assert all(status == "online" for status in dep.node_statuses().values())


def test_every_port_a_site_opens_is_on_loopback_and_every_key_is_owner_only(deploy, deployment):
    dep = deployment
    for site in dep.site_list:
        for what, port in (("SuperNode runtime port", site.port), ("gate", site.gate_port)):
            addresses = wait_for(f"site {site.client_id}'s {what} to listen", lambda p=port: _listening(p), dep)
            assert all(_loopback(a) for a in addresses), f"site {site.client_id}'s {what} listens on {addresses}"
    assert all(_loopback(a) for a in _listening(dep.superlink_port)), "the SuperLink must be on loopback"
    keys = [dep.workdir / "certs" / "ca.key", dep.workdir / "certs" / "server.key",
            *(site.key for site in dep.site_list), *(dep.gate_tls(site) / "gate.key" for site in dep.site_list)]
    for key in keys:
        mode = stat.S_IMODE(os.stat(key).st_mode)
        assert mode & 0o077 == 0, f"{key} is readable by others: {oct(mode)}"
    # the labeling page: loopback unless a site says otherwise
    site = dep.site_list[0]
    wait_for("site 0's database", lambda: (site.state_dir / "client-0.db").is_file(), dep)
    page = subprocess.Popen([str(deploy.BIN / "fedal"), "label", "--state-dir", site.state_dir, "--client-id", "0",
                             "--data-path", site.data_path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dep.env)
    try:
        line = page.stdout.readline()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert all(_loopback(a) for a in _listening(port)), f"the labeling page listens on {_listening(port)}"
    finally:
        page.terminate()
        page.wait(timeout=30)
    refused = subprocess.run([str(deploy.BIN / "fedal"), "label", "--state-dir", site.state_dir, "--client-id", "0",
                              "--data-path", site.data_path, "--host", "0.0.0.0"], capture_output=True, text=True,
                             env=dep.env, timeout=120)
    assert refused.returncode == 2 and "127.0.0.1" in refused.stderr
