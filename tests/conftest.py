"""Shared fixtures.

``data_dir`` is the folder with the real data files (``bloodmnist.npz``,
``pneumoniamnist_balanced.npz``, ``mnist.npz``): ``$FEDAL_DATA_DIR``, else
``<repo>/../shared/data``. Tests that need it are skipped with the reason when the
files are missing, except under CI (``$CI`` set), where a missing file is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# set at import, before any test module imports Flower, numpy or torch
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
# the tests train tiny models: one thread each is faster than contending for a few cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("bloodmnist.npz", "pneumoniamnist_balanced.npz", "mnist.npz")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding the real data files (see the module docstring)."""
    folder = Path(os.environ.get("FEDAL_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        reason = (
            f"data files {missing} are not in {folder}; put them there or set FEDAL_DATA_DIR "
            "to the folder that has them (see shared/data/README.md)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


@pytest.fixture
def flower_task(monkeypatch):
    """The task identity Flower gives a ServerApp process (Messages need it), for in-process tests."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 0)


def pytest_terminal_summary(terminalreporter):
    """Say loudly at the end when the browser tests or the live Label Studio test could not run (no Chromium, no
    Label Studio on this machine)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if any("test_labelstudio_live" in getattr(report, "nodeid", "") for report in skipped):
        terminalreporter.write_line(
            "NOTE: the round trip against a real Label Studio was skipped: export "
            'FEDAL_LABEL_STUDIO="$(bash .ci/install-label-studio.sh)" (its own cached venv) and run it again',
            yellow=True, bold=True)
    if any("test_browser" in getattr(report, "nodeid", "") for report in skipped):
        terminalreporter.write_line(
            "NOTE: the labeling page's browser tests were skipped: install Chromium and its driver "
            "(Debian: sudo apt-get install chromium chromium-driver, or bash .ci/install-system.sh) and run make test again",
            yellow=True, bold=True)
