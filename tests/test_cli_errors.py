"""The ``fedal`` command refuses what it cannot do with a message and exit status 2, never a traceback, and before the
work it would lose: output folders it cannot write, flags that cannot be served (issue 32, item 4).

Tests run as root here, which writes into a folder whatever its mode: an unwritable place is a path below a regular
file (or ``/proc``), which no one can write to; the ``chmod`` case runs only for other users.
"""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from clients.labeling import LabelingServer
from simulations import cli
from tests.site_helpers import web_site_after_round1

SMALL_RUN = ["--dataset", "digits", "--clients", "2", "--min-clients", "2", "--rounds", "1"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run ``fedal argv``; check exit status 2, no traceback, and each ``expected`` text in its message."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedal {argv[0]}: error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Nothing may start the federation: the command must have stopped before."""
    def started(*args, **kwargs):
        raise AssertionError("the run started before its output folder (or --baseline) was checked")

    monkeypatch.setattr("simulations.engine.SimulationRuntime", started)


def test_simulate_output_dir_naming_a_file_is_refused(capsys, a_file, no_ray):
    refused(capsys, ["simulate", *SMALL_RUN, "--output-dir", str(a_file)], f"--output-dir {a_file} is a file, not a folder")


def test_simulate_output_dir_that_cannot_be_written_is_refused_before_the_run(capsys, a_file, no_ray):
    refused(capsys, ["simulate", *SMALL_RUN, "--output-dir", str(a_file / "run")],
            f"cannot write into {a_file / 'run'}: {a_file} is a file, not a folder")


@pytest.mark.skipif(AS_ROOT, reason="root writes into a read-only folder: the test would not test anything")
def test_simulate_into_a_read_only_folder_is_refused(capsys, tmp_path, no_ray):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused(capsys, ["simulate", *SMALL_RUN, "--output-dir", str(folder / "run")], "permission denied")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_simulate_baseline_that_is_no_strategy_is_refused_before_the_main_run(capsys, tmp_path, no_ray):
    refused(capsys, ["simulate", *SMALL_RUN, "--output-dir", str(tmp_path / "run"), "--baseline", "nosuch"],
            "--baseline nosuch: unknown strategy 'nosuch'; choose one of")
    assert not (tmp_path / "run").exists()


def test_split_into_a_folder_that_cannot_be_written_is_refused(capsys, a_file):
    refused(capsys, ["split", "--dataset", "digits", "--clients", "2", "--out", str(a_file / "sites")],
            f"--out {a_file / 'sites'}: cannot write into", "is a file, not a folder")


def test_exchange_export_into_a_folder_that_cannot_be_written_is_refused(capsys, tmp_path, a_file):
    node = web_site_after_round1(tmp_path)
    refused(capsys, ["exchange", "export", "--state-dir", node["state-dir"], "--client-id", "0", "--data-path",
                     node["data-path"], "--folder", str(a_file / "out")], f"--folder {a_file / 'out'}: cannot write into")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one can create a file")
def test_local_out_into_a_folder_no_one_can_write_is_refused_before_the_run(capsys, monkeypatch):
    def ran(*args, **kwargs):
        raise AssertionError("fedal local ran before checking that --out can be written")

    monkeypatch.setattr("fedal.local.run_curve", ran)
    refused(capsys, ["local", "--steps", "0", "--out", "/proc/fedal-local.json"], "--out /proc/fedal-local.json: cannot write into /proc")


@pytest.fixture
def label_flags(tmp_path) -> list[str]:
    """``fedal label`` flags of a site that has pending requests; serving is refused in the tests below."""
    node = web_site_after_round1(tmp_path)
    return ["label", "--state-dir", node["state-dir"], "--client-id", "0", "--data-path", node["data-path"]]


@pytest.fixture
def no_serving(monkeypatch):
    def served(self, *args, **kwargs):
        raise AssertionError("the page was served: the bad flag went through")

    monkeypatch.setattr(LabelingServer, "serve_forever", served)


def test_label_port_out_of_range_is_refused(capsys, label_flags, no_serving):
    refused(capsys, [*label_flags, "--port", "99999"], "--port must be a port number in 0..65535 (0 = a free one), got 99999")


def test_label_missing_certificate_is_refused(capsys, label_flags, no_serving, tmp_path):
    missing = tmp_path / "cert.pem"
    refused(capsys, [*label_flags, "--ssl-certfile", str(missing)], f"--ssl-certfile {missing} does not exist")


def test_label_certificate_that_is_not_one_is_refused(capsys, label_flags, no_serving, tmp_path):
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    refused(capsys, [*label_flags, "--ssl-certfile", str(bad)], f"--ssl-certfile {bad} cannot be used")


def test_label_port_in_use_is_refused(capsys, label_flags, no_serving):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused(capsys, [*label_flags, "--port", str(port)], f"port {port} on 127.0.0.1 is in use",
                "--port 0 for a free one")
