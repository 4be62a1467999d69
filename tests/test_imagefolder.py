"""A site's own image files as its pool (fedal.imagefolder, fedal.sitedata's folder loader): the files read at
the run's size, labels from class subfolders or a CSV, refusals by name, pools that grow, ids that stay, and a
Flower simulation from PNG and DICOM folders equal to the one from the arrays."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from fedal.exceptions import DataFileError
from fedal.imagefolder import ImageFolder

CLASSES = ["cat", "dog"]


def _png(path, seed, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _folder(root, state, **kw):
    return ImageFolder(root, state, 0, size=16, channels=3, policy=kw.pop("policy", "pad"), class_names=CLASSES, **kw)


def test_a_folder_is_read_with_its_labels_and_refusals_named(tmp_path):
    root = tmp_path / "site"
    _png(root / "cat" / "a.png", 1)
    _png(root / "Dog" / "b.png", 2, size=(17, 90))  # a class folder by name, any case
    _png(root / "new" / "c.png", 3, mode="L")  # not a class: no label
    _png(root / "1" / "d.png", 4)  # a class by index
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    with _folder(root, tmp_path / "state") as folder:
        report = folder.scan()
        assert (report.files, report.joined, len(report.refused)) == (5, 4, 1)
        assert list(report.refused) == ["broken.png"] and report.refused["broken.png"]
        assert report.skipped == {".txt": 1} and report.classes == {"cat": 1, "dog": 2} and report.unlabeled == 1
        text = "\n".join(report.lines())
        assert "broken.png" in text and "labels already given: 3" in text and "40x30" in text
        images = folder.images()
        assert images.shape == (4, 3, 16, 16) and images.dtype == np.uint8
        assert sorted(folder.labels().tolist()) == [-1, 0, 1, 1]
        grey = images[[i for i, y in enumerate(folder.labels()) if y == -1][0]]
        assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])  # grey to 3 channels
        tall = images[1]  # 17x90 padded: black columns left and right
        assert tall[:, :, 0].max() == 0 and tall[:, :, -1].max() == 0 and tall[:, 8, 8].any()
    with _folder(root, tmp_path / "state") as folder:  # reopened: nothing read again, the refusal remembered
        again = folder.scan()
        assert (again.read, again.joined, list(again.refused)) == (0, 0, ["broken.png"])


def test_the_pool_grows_files_gone_or_changed_keep_every_id_and_nothing_is_read_twice(tmp_path):
    root = tmp_path / "site"
    paths = [_png(root / f"{i}.png", i) for i in range(4)]
    with _folder(root, tmp_path / "state") as folder:
        folder.scan()
        first = folder.images().copy()
    os.remove(paths[0])  # gone
    (root / "moved").mkdir()
    os.replace(paths[1], root / "moved" / "1.png")  # moved: the same content, the same id
    _png(paths[2], 99)  # the same name, other pixels: a new sample, the old one gone
    _png(root / "4.png", 4)  # new
    with _folder(root, tmp_path / "state") as folder:
        report = folder.scan()
        assert (report.joined, report.changed, report.gone) == (1, 1, 2)
        images = folder.images()
        assert len(images) == 6 and np.array_equal(images[:4], first)  # old rows untouched
        assert folder.gone_ids().tolist() == [0, 2]
    _png(paths[0], 0)  # back with its content: its id again
    with _folder(root, tmp_path / "state") as folder:
        report = folder.scan()
        assert report.back == 1 and report.joined == 0 and folder.gone_ids().tolist() == [2]


def test_labels_from_a_csv_and_their_mistakes(tmp_path):
    root = tmp_path / "site"
    for i in range(3):
        _png(root / f"img{i}.png", i)
    (root / "labels.csv").write_text("path,label\nimg0.png,dog\nimg2.png,0\n")
    with _folder(root, tmp_path / "s1") as folder:
        folder.scan()
        assert folder.labels().tolist() == [1, -1, 0]
    (root / "labels.csv").write_text("path,label\nimg0.png,horse\n")
    with pytest.raises(DataFileError, match="'horse' is not a class"), _folder(root, tmp_path / "s2") as folder:
        folder.scan()
    (root / "labels.csv").write_text("path,label\nmissing.png,dog\n")
    with pytest.raises(DataFileError, match="'missing.png' is not a file"), _folder(root, tmp_path / "s3") as folder:
        folder.scan()
    (root / "labels.csv").write_text("file,class\nimg0.png,dog\n")
    with pytest.raises(DataFileError, match="needs the columns path,label"), _folder(root, tmp_path / "s4") as f:
        f.scan()


def test_a_site_with_people_starts_from_the_folders_labels_and_never_asks_a_gone_file(tmp_path):
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.config import FederationConfig

    root = tmp_path / "site"
    for i in range(6):
        _png(root / ("basophil" if i < 2 else "unsorted") / f"{i}.png", i, size=(28, 28))
    node = NodeConfig.from_mapping({"client-id": 0, "data-path": str(root), "state-dir": str(tmp_path / "state"),
                                    "oracle": "file"})
    cfg = FederationConfig.from_mapping({"dataset": "bloodmnist", "clients": 2, "min-clients": 2})
    site = ClientSite(cfg, node)
    try:
        assert site.X_pool.shape[0] == 6 and site.data.input_shape == (3, 28, 28)
        labeled = site.pool.labeled_ids().tolist()
        assert len(labeled) == 2 and {r["source"] for r in site.pool.label_records()} == {"site-folder"}
    finally:
        site.close()
    os.remove(root / "unsorted" / "5.png")
    _png(root / "unsorted" / "6.png", 6, size=(28, 28))
    site = ClientSite(cfg, node)
    try:
        assert len(site.pool.labeled_ids()) == 2  # not added twice
        assert site.pool.gone_ids().tolist() == [5] and 5 not in site.pool.unlabeled_ids()
        assert 6 in site.pool.unlabeled_ids() and site.pool.counts()["unlabeled"] == 4
    finally:
        site.close()


@pytest.mark.slow
def test_a_simulation_from_png_and_dicom_folders_equals_the_one_from_the_arrays(tmp_path, data_dir):
    from fedal.config import FederationConfig
    from fedal.federation import client_data
    from fedal.sitedata import save_site_folder
    from simulations.engine import run_in_simulation

    base = dict(dataset="bloodmnist", data_dir=str(data_dir), clients=3, min_clients=3, max_train=1500, rounds=3,
                initial_labels=10, round_budget=30, strategy="margin", seed=0)
    npz = FederationConfig(**base, output_dir=str(tmp_path / "npz"), state_dir=str(tmp_path / "s-npz"))
    for cid in range(3):
        save_site_folder(tmp_path / "png" / f"site-{cid}", client_data(npz, cid), fmt="png", csv_labels=True)
        save_site_folder(tmp_path / "dcm" / f"site-{cid}", client_data(npz, cid), fmt="dicom")
    curves = {}
    for name, extra in (("npz", {}), ("png", {"site_data": str(tmp_path / "png" / "site-{id}")}),
                        ("dcm", {"site_data": str(tmp_path / "dcm" / "site-{id}")})):
        cfg = FederationConfig(**base, **extra, output_dir=str(tmp_path / name), state_dir=str(tmp_path / f"s-{name}"))
        run_in_simulation(cfg, cpus=2)
        rows = json.loads((tmp_path / name / "results.json").read_text())["rounds"]
        curves[name] = [(r["labels"], r["accuracy"]) for r in rows]
    assert curves["png"] == curves["npz"] and curves["dcm"] == curves["npz"]  # the same pixels: the same run
    assert curves["npz"][-1][1] > 0.5


def test_the_labeling_page_shows_the_sites_own_file_and_no_path_leaves_in_a_reply(tmp_path):
    import struct

    from clients.images import sample_png
    from clients.node import NodeConfig
    from clients.site import ClientSite
    from fedal.config import FederationConfig
    from fedal.messages import TrainInstruction
    from fedal.sitedata import load_site

    root = tmp_path / "secret-ward-7"
    for i in range(8):
        _png(root / ("basophil" if i < 3 else "eosinophil" if i < 5 else "incoming") / f"patient-{i}.png", i,
             size=(200, 160))
    node = NodeConfig.from_mapping({"client-id": 0, "data-path": str(root), "state-dir": str(tmp_path / "state"),
                                    "oracle": "file"})
    cfg = FederationConfig.from_mapping({"dataset": "bloodmnist", "clients": 2, "min-clients": 2, "initial-labels": 2,
                                         "round-budget": 2})
    site = ClientSite(cfg, node)
    try:
        arrays, report = site.train(site.model.get_state(), TrainInstruction(1, 2))
        # what the reply carries: the report's scalars and the arrays' names (their values are numbers)
        sent = repr(report.to_metrics()) + repr(sorted(arrays))
        assert report.pending == 2 and all(np.asarray(v).dtype.kind in "fiub" for v in arrays.values())
        assert "secret" not in sent and "patient" not in sent and "incoming" not in sent
    finally:
        site.close()
    data = load_site(root, 0, tmp_path / "state")  # the labeling page's view: the records, no file read anew
    assert data.X_pool.shape == (8, 3, 28, 28) and sorted(data.y_pool.tolist()).count(-1) == 3
    png = sample_png(data, 0)
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (320, 320)  # the original 200 x 160 file at a size a person reads, not 28 x 28
    with pytest.raises(Exception, match="state-dir"):
        load_site(root, 0)


def test_a_copy_of_a_file_is_one_sample_and_is_not_read_again(tmp_path):
    import shutil

    root = tmp_path / "site"
    shutil.copy(_png(root / "a.png", 1), root / "a-copy.png")
    with _folder(root, tmp_path / "state") as folder:
        first = folder.scan()
        assert (first.files, first.joined, first.duplicates) == (2, 1, 1) and len(folder.images()) == 1
    with _folder(root, tmp_path / "state") as folder:
        again = folder.scan()
        assert (again.read, again.duplicates) == (0, 1)


def test_a_folder_pool_reads_as_floats_only_where_indexed_with_the_same_features_and_fingerprint():
    from fedal.data import UnitImages
    from fedal.features import ImageDescriptors, fingerprint

    raw = np.random.default_rng(0).integers(0, 256, (1500, 3, 28, 28), dtype=np.uint8)
    lazy, full = UnitImages(raw), raw.astype(np.float32) / np.float32(255)
    assert lazy.shape == full.shape and len(lazy) == 1500 and lazy.dtype == np.float32
    assert np.array_equal(lazy[[3, 1, 2]], full[[3, 1, 2]]) and np.array_equal(lazy[10:20], full[10:20])
    assert fingerprint(lazy) == fingerprint(full)  # the features cached for the one are the other's
    small = ImageDescriptors()
    assert np.array_equal(small.transform(lazy), small.transform(full))  # in chunks of 1,024, the same
    # larger inputs: the same cells and the same number of features
    for side in (64, 128):
        big = ImageDescriptors.for_size(side)
        assert big.dim((3, side, side)) == small.dim((3, 28, 28)) == 373


def test_a_grown_pool_computes_features_for_its_new_rows_only(tmp_path, monkeypatch):
    from fedal.data import UnitImages
    from fedal.features import ImageDescriptors, cached_features

    raw = np.random.default_rng(1).integers(0, 256, (60, 3, 28, 28), dtype=np.uint8)
    featurizer, cache = ImageDescriptors(), tmp_path / "features.npz"
    first = cached_features(featurizer, UnitImages(raw[:50]), cache)
    seen = []
    transform = ImageDescriptors.transform
    monkeypatch.setattr(ImageDescriptors, "transform", lambda self, X: seen.append(len(X)) or transform(self, X))
    grown = cached_features(featurizer, UnitImages(raw), cache)
    assert seen == [10] and np.array_equal(grown[:50], first)
    assert np.array_equal(grown, transform(featurizer, raw.astype(np.float32) / np.float32(255)))


def _image_strategies() -> list[str]:
    """The strategies that score images (not those of the closed-form head's features)."""
    from fedal.strategies import available_strategies, get_strategy

    return [n for n in available_strategies() if not get_strategy(n).needs_closed_form]


@pytest.mark.parametrize("name", _image_strategies())
def test_every_strategy_picks_the_same_samples_from_a_uint8_pool_as_from_floats(name):
    from fedal.data import UnitImages
    from fedal.models import build_model
    from fedal.strategies import QueryContext, get_strategy

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (40, 3, 28, 28), dtype=np.uint8)
    full = raw.astype(np.float32) / np.float32(255)
    model = build_model((3, 28, 28), 3, seed=0, epochs=1)
    model.fit(full[:9], np.arange(9) % 3)
    ids = np.arange(9, 40)
    picks = []
    for X in (UnitImages(raw), full):
        taken = X.take(ids) if isinstance(X, UnitImages) else X[ids]
        labeled = X.take(np.arange(9)) if isinstance(X, UnitImages) else X[:9]
        ctx = QueryContext(ids, taken, model=model, labeled_X=labeled)
        picks.append(sorted(get_strategy(name).query(ctx, 5, seed=0).tolist()))
    assert picks[0] == picks[1]
