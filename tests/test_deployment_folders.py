"""Two hospitals on Flower's Deployment Engine (TLS, SuperNode authentication, the site gates), each reading its
own folder of image files: one of PNG files in class subfolders, one of DICOM files with a labels.csv. The run
uses the hand-over preset's settings (head and ConvNet, one SGD step a round, FedAdam); files put into the folders
while it runs join the pools; no label is lost and no sample is asked twice."""
from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
from federation_helpers import require_deployment_tools
from test_deployment import _deploy_module

from fedal.config import FederationConfig
from fedal.data import MEDMNIST_CLASSES, load_dataset
from fedal.sitedata import _write_dicom, _write_png

pytestmark = [pytest.mark.deployment, pytest.mark.slow]
ROUNDS, NEW = 3, 6
HANDOVER = {"pipeline": "handover", "network": "convnet", "norm": "group", "local-optimizer": "sgd", "lr": 1.0,
            "local-steps": 1, "batch-size": 32, "weight-decay": 0.0005, "aggregation": "fedadam", "server-lr": 0.003,
            "budget-policy": "pool", "initial-strategy": "random"}


def _add_files(site_dirs, data_dir) -> None:
    """NEW more images into each site's folder: BloodMNIST test images, as PNG in their class folder and as DICOM
    with a row in labels.csv."""
    ds = load_dataset("bloodmnist", data_dir, seed=0)
    names = MEDMNIST_CLASSES["bloodmnist"]
    for k in range(NEW):
        pixels = np.rint(ds.X_test[k] * 255).astype(np.uint8)
        label = names[int(ds.y_test[k])]
        folder = site_dirs[0] / "pool" / label
        folder.mkdir(parents=True, exist_ok=True)
        _write_png(folder / f"arrived-{k}.png", pixels)
        _write_dicom(site_dirs[1] / "pool" / f"arrived-{k}.dcm", pixels)
        with open(site_dirs[1] / "pool" / "labels.csv", "a") as f:
            f.write(f"arrived-{k}.dcm,{label}\n")


def test_two_hospitals_run_from_their_own_png_and_dicom_folders_and_new_files_join(tmp_path, data_dir):
    deploy = _deploy_module()
    require_deployment_tools(deploy)
    settings = {**HANDOVER, "dataset": "bloodmnist", "data-dir": str(data_dir), "max-train": 600, "rounds": ROUNDS,
                "initial-labels": 5, "round-budget": 10, "seed": 0, "round-timeout": 300.0}
    FederationConfig.from_mapping({**settings, "clients": 2, "min-clients": 2})  # valid settings
    with deploy.LocalDeployment(tmp_path / "dep", sites=2, run_config=settings, site_formats=("png", "dicom"),
                                verbose=False) as dep:
        dep.start_all()
        site_dirs = [site.data_path for site in dep.site_list]
        assert (site_dirs[0] / "pool").is_dir() and any((site_dirs[1] / "pool").glob("*.dcm"))
        before = [len(list((d / "pool").rglob("*.png"))) + len(list((d / "pool").glob("*.dcm"))) for d in site_dirs]
        run_id = dep.submit()

        added = threading.Event()

        def add_after_round_one():
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not added.is_set():
                results = dep.results()
                if results and len(results.get("rounds", [])) >= 1:
                    _add_files(site_dirs, data_dir)
                    added.set()
                    return
                time.sleep(0.5)

        watcher = threading.Thread(target=add_after_round_one, daemon=True)
        watcher.start()
        results = dep.wait(run_id, ROUNDS, timeout=1200)
        watcher.join(timeout=5)
    assert added.is_set()
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(sorted(r["clients"]) == ["0", "1"] for r in rounds)
    assert rounds[-1]["labels"] > rounds[0]["labels"]  # the sites kept asking and answering
    for site, n in zip(dep.site_list, before):
        with sqlite3.connect(site.state_dir / f"client-{site.client_id}.db") as db:
            samples = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            asked = [r[0] for r in db.execute("SELECT sample_id FROM requests WHERE status != 'expired'")]
            labels = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        assert samples == n + NEW  # the files that arrived joined the pool
        assert len(asked) == len(set(asked))  # nothing asked twice
        assert labels == len(asked)  # every answer kept
        with sqlite3.connect(site.state_dir / f"client-{site.client_id}.pool.files.db") as db:
            assert db.execute("SELECT COUNT(*) FROM files WHERE path LIKE 'arrived-%' OR path LIKE '%/arrived-%'"
                              ).fetchone()[0] == NEW
