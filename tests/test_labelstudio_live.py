"""The Label Studio round trip against a real Label Studio on loopback (skipped where it is not installed, except
under CI, where that is a failure: ``.ci/run`` installs it).

Label Studio pins Django and much else, so it lives in its own virtual environment: ``bash
.ci/install-label-studio.sh`` builds one (every package pinned, cached) and prints its ``label-studio`` executable;
point ``FEDAL_LABEL_STUDIO`` at it, or have ``label-studio`` on PATH. Label Studio runs with its Sentry error reports,
usage data and version check off (:func:`label_studio_env`). The test starts it on 127.0.0.1 with a fresh
data folder, makes a project from fedal's ``label_config.xml`` with a Local Files storage, imports
``tasks.json`` (a file upload, as people do), checks that an image is served, annotates through the REST API,
exports JSON (checking that the exports ``tests/labelstudio_helpers.py`` makes up have no field it lacks), imports
it with ``fedal exchange import``, corrects an annotation and imports again.
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
from labelstudio_helpers import annotation, ls_task

from simulations import cli

EXECUTABLE = os.environ.get("FEDAL_LABEL_STUDIO") or shutil.which("label-studio")
MISSING = ("Label Studio is not installed: `bash .ci/install-label-studio.sh` (or pip install label-studio in its own "
           "venv) and set FEDAL_LABEL_STUDIO to its label-studio executable")
if EXECUTABLE and not os.access(EXECUTABLE, os.X_OK):
    MISSING, EXECUTABLE = f"FEDAL_LABEL_STUDIO={EXECUTABLE} is not an executable file", None
# CI (.ci/run installs it) must run this test: there a missing Label Studio is a failure, elsewhere a skip
pytestmark = pytest.mark.skipif(not EXECUTABLE and not os.environ.get("CI"), reason=MISSING)
#: seconds Label Studio may take to answer its API after it was started (its first start migrates a new database:
#: about 35 s on 2 idle cores)
START_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def label_studio_env(document_root, data_dir) -> dict:
    """The environment Label Studio runs in here: Local Files serving from ``document_root``, its database in
    ``data_dir``, and nothing sent off the machine. Label Studio reports errors to its own Sentry unless
    ``SENTRY_DSN`` and ``FRONTEND_SENTRY_DSN`` are empty, sends usage data unless ``COLLECT_ANALYTICS`` is false
    and asks PyPI for its latest version unless ``LATEST_VERSION_CHECK`` is false (HumanSignal/label-studio#6430;
    its settings read ``LABEL_STUDIO_<name>`` and ``HEARTEX_<name>`` before ``<name>``, so those are dropped)."""
    quiet = {"SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false"}
    env = {k: v for k, v in os.environ.items()
           if not any(k == prefix + name for prefix in ("LABEL_STUDIO_", "HEARTEX_") for name in quiet)}
    env.update(quiet)
    env.update({"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
                # where it looks before it reads --data-dir (else it makes ~/.local/share/label-studio)
                "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)})
    return env


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

    def upload(self, path: str, file) -> object:
        """POST ``file`` as a multipart form upload (what Import -> Upload Files sends)."""
        boundary = secrets.token_hex(16)
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
                "Content-Type: application/json\r\n\r\n")
        body = head.encode() + file.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(self.url + path, data=body, method="POST", headers={
            "Authorization": f"Token {self.token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


@pytest.fixture
def label_studio(tmp_path):
    if not EXECUTABLE:
        pytest.fail(MISSING + " (under CI this test must run)")
    root, data_dir = tmp_path / "files", tmp_path / "ls-data"
    root.mkdir()
    port, token = free_port(), secrets.token_hex(20)
    env = label_studio_env(root, data_dir)
    log = open(tmp_path / "label-studio.log", "wb")
    process = subprocess.Popen([EXECUTABLE, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                str(port), "--data-dir", str(data_dir), "--username", "ana@site.example",
                                "--password", secrets.token_hex(8), "--user-token", token,
                                "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LabelStudio(f"http://127.0.0.1:{port}", token)
    try:
        started = time.monotonic()
        while True:
            try:
                server.call("GET", "/api/projects")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() - started > START_TIMEOUT:
                    log.flush()
                    why = (f"exited with {process.returncode}" if process.poll() is not None
                           else f"did not answer within {START_TIMEOUT} s")
                    tail = (tmp_path / "label-studio.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"Label Studio {why}; {tmp_path / 'label-studio.log'} ends:\n{tail}")
                time.sleep(1)
        print(f"\nLabel Studio answered {time.monotonic() - started:.0f} s after its start")
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
    server.upload(f"/api/projects/{project['id']}/import", folder / "tasks.json")  # as people import it: a file
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
    # the exports the other tests make up (tests/labelstudio_helpers.py) have no field this Label Studio lacks
    real = json.loads(export.read_text())
    made_up = ls_task(1, {}, [annotation("class 2", annotation_id=1, task_id=1)])
    real_annotation = next(t for t in real if t["annotations"])["annotations"][0]
    assert set(made_up) <= set(real[0]), sorted(set(made_up) - set(real[0]))
    assert set(made_up["annotations"][0]) <= set(real_annotation), \
        sorted(set(made_up["annotations"][0]) - set(real_annotation))
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
