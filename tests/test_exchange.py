"""File exchange: pending queries out as PNG + CSV, the filled CSV back in, all or nothing."""
from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from site_helpers import global_state, make_site, site_config

from clients.exchange import ExchangeError, export_requests, import_answers
from clients.node import NodeConfig
from clients.site import ClientSite
from fedal.data import LocalData
from fedal.messages import TrainInstruction
from fedal.pool import Pool
from simulations import cli


def image_site(n: int = 12, n_classes: int = 4) -> LocalData:
    rng = np.random.default_rng(0)
    X = rng.random((n, 3, 28, 28), dtype=np.float32)
    return LocalData(0, X, np.full(n, -1), X[:0], np.zeros(0, np.int64), n_classes,
                     [f"class {c}" for c in range(n_classes)], "image")


@pytest.fixture
def pool_with_requests(tmp_path):
    data = image_site()
    pool = Pool(data.n_classes, size=len(data.y_pool), path=tmp_path / "client-0.db")
    pool.request([3, 5, 7], round=2)
    pool.request([1], round=3)
    yield pool, data
    pool.close()


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_export_writes_one_row_and_one_png_per_pending_request(pool_with_requests, tmp_path):
    pool, data = pool_with_requests
    path = export_requests(pool, data, tmp_path / "x")
    rows = read_rows(path)
    assert [(int(r["sample_id"]), r["round"], r["label"]) for r in rows] == [(3, "2", ""), (5, "2", ""), (7, "2", ""),
                                                                             (1, "3", "")]
    for row in rows:
        png = (tmp_path / "x" / row["image"]).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "x" / rows[0]["image"])
    assert img.shape == (112, 112, 3)  # 28x28 upscaled 4x, RGB
    np.testing.assert_allclose(img[::4, ::4], data.X_pool[3].transpose(1, 2, 0), atol=1 / 255 + 1e-6)
    assert read_rows(tmp_path / "x" / "classes.csv")[1] == {"label": "1", "name": "class 1"}


def test_import_records_filled_rows_and_leaves_blank_ones_pending(pool_with_requests, tmp_path):
    pool, data = pool_with_requests
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    rows[0]["label"], rows[3]["label"] = "2", "0"
    result = import_answers(pool, write_rows(tmp_path / "filled.csv", rows))
    assert (result.recorded, result.unanswered, result.repeated) == (2, 2, 0)
    records = {r["id"]: r for r in pool.label_records()}
    assert records[3]["label"] == 2 and records[3]["round"] == 2 and records[3]["source"] == "file:filled.csv"
    assert records[1]["label"] == 0 and records[1]["round"] == 3
    assert sorted(pool.pending_ids().tolist()) == [5, 7]
    # the same file again records nothing new and raises nothing
    again = import_answers(pool, tmp_path / "filled.csv")
    assert (again.recorded, again.repeated) == (0, 2)
    # the next export lists only what is still pending, and drops the answered images
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    assert [int(r["sample_id"]) for r in rows] == [5, 7]
    assert sorted(p.name for p in (tmp_path / "x" / "images").iterdir()) == ["sample-5.png", "sample-7.png"]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_separated_file_from_a_spreadsheet_is_read(pool_with_requests, tmp_path, sep):
    pool, data = pool_with_requests
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    rows[0]["label"] = "2"
    path = tmp_path / "excel.csv"
    with open(path, "w", newline="") as fh:  # as Excel writes CSV in locales with a decimal comma
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    assert import_answers(pool, path).recorded == 1
    assert pool.label_records()[0]["label"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[0].update(label="9"), "outside the 4 known classes"),
    (lambda rows: rows[0].update(label="two"), "is not an integer class"),
    (lambda rows: rows[0].update(label="1.5"), "is not an integer class"),
    (lambda rows: rows[0].update(request_id="999", label="1"), "request 999 is not a request of this client"),
    (lambda rows: rows[0].update(request_id="x", label="1"), "request_id 'x' is not an integer"),
    (lambda rows: rows[0].update(sample_id="5", label="1"), "asked about sample 3, not 5"),
    (lambda rows: rows.append(dict(rows[1], label="1")), "request 2 appears again (first on line 3)"),
])
def test_a_bad_row_rejects_the_whole_file(pool_with_requests, tmp_path, edit, message):
    pool, data = pool_with_requests
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    for row in rows[1:]:
        row["label"] = "1"  # valid answers that must not be recorded either
    edit(rows)
    with pytest.raises(ExchangeError, match="nothing was recorded") as info:
        import_answers(pool, write_rows(tmp_path / "filled.csv", rows))
    assert message in str(info.value)
    assert "line " in str(info.value)
    assert pool.counts()["labeled"] == 0 and len(pool.pending_ids()) == 4


def test_every_problem_is_listed_with_its_line(pool_with_requests, tmp_path):
    pool, data = pool_with_requests
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    rows[0]["label"], rows[1]["label"], rows[2]["label"] = "7", "-1", "x"
    with pytest.raises(ExchangeError) as info:
        import_answers(pool, write_rows(tmp_path / "filled.csv", rows))
    text = str(info.value)
    assert "3 problem(s)" in text and "line 2:" in text and "line 3:" in text and "line 4:" in text


def test_expired_and_already_answered_requests_are_refused(pool_with_requests, tmp_path):
    pool, data = pool_with_requests
    rows = read_rows(export_requests(pool, data, tmp_path / "x"))
    pool.release([5], status="expired", note="deadline passed")
    pool.answer({7: 3}, source="web:alice", round=2)
    rows[1]["label"], rows[2]["label"] = "1", "1"
    with pytest.raises(ExchangeError) as info:
        import_answers(pool, write_rows(tmp_path / "filled.csv", rows))
    assert "was expired (deadline passed)" in str(info.value) and "export again" in str(info.value)
    assert "already answered (class 3 from web:alice)" in str(info.value)


def test_missing_columns_and_missing_file_are_clear(pool_with_requests, tmp_path):
    pool, _ = pool_with_requests
    (tmp_path / "bad.csv").write_text("id,answer\n1,2\n")
    with pytest.raises(ExchangeError, match=r"lacks the column\(s\) \['request_id', 'sample_id', 'label'\]"):
        import_answers(pool, tmp_path / "bad.csv")
    with pytest.raises(ExchangeError, match="does not exist"):
        import_answers(pool, tmp_path / "nope.csv")


def test_table_rows_are_exported_as_feature_columns(tmp_path):
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="file")
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    try:
        site.train(global_state(site), TrainInstruction(1, 0))
        rows = read_rows(Path(node["state-dir"]) / "exchange-0" / "requests.csv")
        assert len(rows) == cfg.initial_labels
        sid = int(rows[0]["sample_id"])
        np.testing.assert_allclose([float(rows[0][f"x{j}"]) for j in range(64)], site.data.X_pool[sid], atol=1e-5)
    finally:
        site.close()


def test_file_oracle_imports_the_inbox_on_the_next_round(tmp_path):
    """oracle="file": round 1 exports the initial set; a person drops the filled CSV in
    inbox/; round 2 imports it and trains on it; a bad file is moved aside with its errors."""
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="file")
    folder = Path(node["state-dir"]) / "exchange-0"
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    state = global_state(site)
    try:
        _, report = site.train(state, TrainInstruction(1, 0))
        assert report.num_examples == 0 and report.pending == cfg.initial_labels
    finally:
        site.close()
    rows = read_rows(folder / "requests.csv")
    bad = [dict(r, label="42") for r in rows]
    write_rows(folder / "inbox" / "bad.csv", bad)
    for row in rows[:4]:
        row["label"] = "5"
    write_rows(folder / "inbox" / "answers.csv", rows)
    old = time.time() - 60  # written a minute ago: settled
    for p in (folder / "inbox").iterdir():
        os.utime(p, (old, old))
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    try:
        with pytest.warns(UserWarning, match="answer file rejected"):
            _, report = site.train(state, TrainInstruction(2, 3))
        assert report.num_examples == 4
        assert sorted(site.pool.labels()[1].tolist()) == [5, 5, 5, 5]
    finally:
        site.close()
    assert [p.name.split("-", 2)[-1] for p in (folder / "imported").iterdir()] == ["answers.csv"]
    rejected = sorted(p.name for p in (folder / "rejected").iterdir())
    assert rejected[0].endswith("bad.csv") and rejected[1].endswith("bad.csv.errors.txt")
    assert len(read_rows(folder / "requests.csv")) == cfg.initial_labels - 4 + 3  # still pending + round 2's


def test_fedal_exchange_command(tmp_path, capsys):
    cfg = site_config(tmp_path)
    node = make_site(tmp_path, cfg, oracle="web")
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    site.train(global_state(site), TrainInstruction(1, 0))
    site.close()
    common = ["--state-dir", node["state-dir"], "--client-id", "0", "--data-path", node["data-path"]]
    assert cli.main(["exchange", "export", *common, "--folder", str(tmp_path / "x")]) == 0
    assert "6 pending request(s) written" in capsys.readouterr().out
    rows = read_rows(tmp_path / "x" / "requests.csv")
    rows[0]["label"] = "12"
    write_rows(tmp_path / "x" / "requests.csv", rows)
    assert cli.main(["exchange", "import", *common, "--csv", str(tmp_path / "x" / "requests.csv")]) == 2
    assert "outside the 10 known classes" in capsys.readouterr().err
    rows[0]["label"] = "4"
    write_rows(tmp_path / "x" / "requests.csv", rows)
    assert cli.main(["exchange", "import", *common, "--csv", str(tmp_path / "x" / "requests.csv"),
                     "--labeler", "bob"]) == 0
    assert "recorded 1 label(s); 5 row(s) left blank stay pending" in capsys.readouterr().out
    # a wrong state dir is named, not silently turned into a new empty database
    assert cli.main(["exchange", "export", "--state-dir", str(tmp_path / "elsewhere"), "--client-id", "0",
                     "--data-path", node["data-path"], "--folder", str(tmp_path / "y")]) == 2
    assert "there is no client database" in capsys.readouterr().err
