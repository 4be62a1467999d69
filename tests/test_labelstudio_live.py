"""The Label Studio round trip against a real Label Studio on loopback (optional: skipped where it is not installed).

Label Studio pins Django and much else, so it lives in its own virtual environment
(``python -m venv ls-venv && ls-venv/bin/pip install label-studio``); point ``FEDAL_LABEL_STUDIO`` at its
``label-studio`` executable, or have ``label-studio`` on PATH. The test starts it on 127.0.0.1 with a fresh
data folder, makes a project from fedal's ``label_config.xml`` with a Local Files storage, imports
``tasks.json``, checks that an image is served, annotates through the REST API, exports JSON, imports it
with ``fedal exchange import``, corrects an annotation and imports again.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from simulations import cli

EXECUTABLE = os.environ.get("FEDAL_LABEL_STUDIO") or shutil.which("label-studio")
pytestmark = pytest.mark.skipif(
    not EXECUTABLE, reason="Label Studio is not installed: pip install label-studio in its own venv and set "
                           "FEDAL_LABEL_STUDIO to its label-studio executable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: object = None, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            content = response.read()
        return content if raw else json.loads(content or b"null")


@pytest.fixture
def label_studio(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    port, token = free_port(), secrets.token_hex(20)
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root)}
    log = open(tmp_path / "label-studio.log", "wb")
    process = subprocess.Popen([EXECUTABLE, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                str(port), "--data-dir", str(tmp_path / "ls-data"), "--username", "ana@site.example",
                                "--password", secrets.token_hex(8), "--user-token", token,
                                "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LabelStudio(f"http://127.0.0.1:{port}", token)
    try:
        deadline = time.time() + 180
        while True:
            try:
                server.call("GET", "/api/projects")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"Label Studio did not start; see {tmp_path / 'label-studio.log'}")
                time.sleep(1)
        yield server, root
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_the_round_trip_against_a_real_label_studio(label_studio, tmp_path, capsys):
    import numpy as np

    from fedal.data import LocalData
    from fedal.pool import Pool
    from fedal.sitedata import save_site

    server, root = label_studio
    rng = np.random.default_rng(0)
    X = rng.random((12, 3, 28, 28), dtype=np.float32)
    data = LocalData(0, X, np.full(12, -1), X[:2], np.zeros(2, np.int64), 4, [f"class {c}" for c in range(4)], "image")
    save_site(tmp_path / "site-0.npz", data, include_labels=False)
    with Pool(4, size=12, path=tmp_path / "state" / "client-0.db") as pool:
        pool.request([3, 5, 7], round=2)
    common = ["--state-dir", str(tmp_path / "state"), "--client-id", "0", "--data-path", str(tmp_path / "site-0.npz")]
    folder = root / "site-0"
    assert cli.main(["exchange", "export", *common, "--format", "label-studio", "--folder", str(folder),
                     "--document-root", str(root)]) == 0
    project = server.call("POST", "/api/projects", {"title": "site 0",
                                                    "label_config": (folder / "label_config.xml").read_text()})
    server.call("POST", "/api/storages/localfiles", {"project": project["id"], "title": "images",
                                                     "path": str((folder / "images").resolve()), "use_blob_urls": False})
    server.call("POST", f"/api/projects/{project['id']}/import", json.loads((folder / "tasks.json").read_text()))
    tasks = server.call("GET", f"/api/tasks?project={project['id']}&page_size=100")
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    assert len(tasks) == 3
    image = server.call("GET", tasks[0]["data"]["image"], raw=True)
    assert image[:8] == b"\x89PNG\r\n\x1a\n"  # the document root and storage serve fedal's URL

    def choose(name: str) -> list[dict]:
        return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}]

    by_sample = {t["data"]["sample_id"]: t for t in tasks}
    first = server.call("POST", f"/api/tasks/{by_sample[3]['id']}/annotations", {"result": choose("class 2")})
    server.call("POST", f"/api/tasks/{by_sample[5]['id']}/annotations", {"result": choose("class 1")})
    export = tmp_path / "export.json"
    export.write_bytes(server.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON", raw=True))
    assert cli.main(["exchange", "import", *common, "--json", str(export)]) == 0
    assert "recorded 2 label(s), corrected 0" in capsys.readouterr().out
    server.call("PATCH", f"/api/annotations/{first['id']}", {"result": choose("class 3")})
    export.write_bytes(server.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON", raw=True))
    assert cli.main(["exchange", "import", *common, "--json", str(export)]) == 0
    assert "recorded 0 label(s), corrected 1; 1 already recorded" in capsys.readouterr().out
    with Pool(4, size=12, path=tmp_path / "state" / "client-0.db") as pool:
        assert {r["id"]: r["label"] for r in pool.label_records()} == {3: 3, 5: 1}
        assert pool.label_origins(3)[0]["given_by"] != "an unknown annotator"
        assert pool.requests("pending")[0]["sample_id"] == 7
