"""Shared pieces of the site tests (exchange, labeling page, browser, durability).

A *site* here is what a deployed SuperNode holds: its own data file (written by
:func:`fedal.sitedata.split_sites`), a state directory with its SQLite pool, and the
node config that points at both.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from clients.node import NodeConfig
from fedal.config import FederationConfig
from fedal.messages import TrainInstruction
from fedal.models import model_for
from fedal.sitedata import split_sites


def site_config(tmp_path: Path, **overrides) -> FederationConfig:
    """A small federation of ``digits`` (bundled: no data file needed), fast to train."""
    settings = dict(dataset="digits", clients=2, min_clients=2, rounds=3, initial_labels=6, round_budget=8,
                    local_epochs=1, min_local_steps=5, seed=0, output_dir=str(tmp_path / "server"))
    settings.update(overrides)
    return FederationConfig(**settings)


def make_site(tmp_path: Path, cfg: FederationConfig, client_id: int = 0, *, oracle: str = "web",
              labels: bool = False, **node) -> dict:
    """Write the site files of ``cfg`` and return client ``client_id``'s node config."""
    paths = split_sites(cfg, tmp_path / "sites", include_labels=labels)
    return {"client-id": client_id, "data-path": str(paths[client_id]), "state-dir": str(tmp_path / "state"),
            "oracle": oracle, **node}


def global_state(site) -> dict:
    """An untrained global model of the site's run (what round 1 sends)."""
    return model_for(site.cfg, site.X_pool.shape[1:], site.data.n_classes, seed=site.cfg.seed).get_state()


def web_site_after_round1(tmp_path: Path) -> dict:
    """Node config of a digits site with a web oracle whose round 1 asked for its initial
    set (6 pending requests, waiting for people)."""
    from clients.site import ClientSite

    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="web")
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    site.train(global_state(site), TrainInstruction(1, 0))
    site.close()
    return node


@contextmanager
def serving(server):
    """Serve a LabelingServer in a thread; shut it down and close its pool afterwards."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.service.pool.close()
        thread.join(timeout=10)


def http(url: str, *, token: str | None = None, body: dict | bytes | None = None, timeout: float = 10):
    """``(status, payload)`` of a GET (``body`` None) or POST; the token goes in the header."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Fedal-Token"] = token
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, (json.loads(raw) if ctype.startswith("application/json") else raw)
