"""Data loaders: bundled sets, the real MedMNIST / MNIST files, and every malformed file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedal.data import DATA_DIR_ENV, available_datasets, load_dataset, load_npz
from fedal.exceptions import ConfigError, DataFileError


def check_common(ds, n_classes: int) -> None:
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == np.float32 and np.isfinite(X).all()
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == np.int64 and y.ndim == 1
        assert y.min() == 0 and y.max() == n_classes - 1
    assert len(ds.X_train) == len(ds.y_train) and len(ds.X_test) == len(ds.y_test)
    assert ds.n_classes == n_classes and len(ds.class_names) == n_classes
    assert ds.input_shape == ds.X_train.shape[1:] == ds.X_test.shape[1:]


def write_medmnist(path, n=(40, 10), shape=(28, 28), n_classes=3, seed=0, **override) -> None:
    """A small file in the official MedMNIST layout (labels (N, 1), uint8 images)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, size in zip(("train", "val", "test"), (n[0], n[1], n[1])):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(size, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(size) % n_classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(override)
    np.savez_compressed(path, **arrays)


# ----------------------------------------------------------------------- bundled
def test_digits():
    ds = load_dataset("digits")
    check_common(ds, 10)
    assert ds.input_shape == (64,) and ds.kind == "table"
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0


def test_breast_cancer_is_standardised_with_training_statistics():
    ds = load_dataset("Breast_Cancer ")  # names are case and space tolerant
    check_common(ds, 2)
    assert ds.input_shape == (30,) and len(ds.y_train) + len(ds.y_test) == 569
    assert np.allclose(ds.X_train.mean(0), 0, atol=1e-4) and np.allclose(ds.X_train.std(0), 1, atol=1e-3)
    assert not np.allclose(ds.X_test.mean(0), 0, atol=1e-4)  # test set not re-standardised on itself


def test_bundled_split_is_seeded():
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.y_train, b.y_train) and np.array_equal(a.X_test, b.X_test)
    assert not np.array_equal(a.X_test, c.X_test)


def test_unknown_name_lists_the_data_sets():
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10")
    for name in available_datasets():
        assert name in str(info.value)
    assert set(available_datasets()) >= {"digits", "breast_cancer", "bloodmnist", "pneumoniamnist", "mnist"}


# ------------------------------------------------------------------ real data files
@pytest.fixture(scope="module")
def bloodmnist(data_dir):
    return load_dataset("bloodmnist", data_dir)


def test_bloodmnist(bloodmnist):
    ds = bloodmnist
    check_common(ds, 8)
    assert ds.X_train.shape == (11959, 3, 28, 28) and len(ds.y_test) == 3421
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0 and ds.kind == "image"
    assert np.bincount(ds.y_train).tolist() == [852, 2181, 1085, 2026, 849, 993, 2330, 1643]
    assert ds.class_names[7] == "platelet"


def test_pneumoniamnist_name_finds_the_balanced_file(data_dir):
    ds = load_dataset("pneumoniamnist", data_dir)
    check_common(ds, 2)
    assert ds.name == "pneumoniamnist"
    assert ds.X_train.shape == (2428, 1, 28, 28) and len(ds.y_test) == 468
    assert np.bincount(ds.y_train).tolist() == [1214, 1214]
    assert ds.class_names == ["normal", "pneumonia"]
    assert 0.0 <= ds.X_train.min() and ds.X_train.max() <= 1.0


def test_mnist(data_dir):
    ds = load_dataset("mnist", data_dir, max_test=1000)
    check_common(ds, 10)
    assert ds.X_train.shape == (60000, 1, 28, 28) and ds.X_test.shape == (1000, 1, 28, 28)
    assert ds.X_train.max() == 1.0


def test_data_dir_from_environment(data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert len(load_dataset("pneumoniamnist").y_train) == 2428
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))  # the argument wins over the environment
    assert len(load_dataset("pneumoniamnist", data_dir).y_train) == 2428
    with pytest.raises(DataFileError, match=str(tmp_path)):
        load_dataset("pneumoniamnist")


def test_npz_path(data_dir, tmp_path, monkeypatch):
    ds = load_dataset(str(data_dir / "pneumoniamnist_balanced.npz"))
    assert ds.n_classes == 2 and ds.name == "pneumoniamnist"
    # a relative .npz name is also looked up in the data directory
    write_medmnist(tmp_path / "mine.npz")
    monkeypatch.chdir(data_dir)
    assert load_dataset("mine.npz", tmp_path).n_classes == 3


def test_npz_path_keeps_its_case(tmp_path, monkeypatch):
    """Only a bundled data set's name is matched without case: a path is a path (issue 21.1)."""
    folder = tmp_path / "Ana" / "MedMNIST"
    folder.mkdir(parents=True)
    write_medmnist(folder / "BloodMNIST.npz", n_classes=8)
    # absolute path with capitals in the folder and the file name
    ds = load_dataset(str(folder / "BloodMNIST.npz"))
    assert ds.n_classes == 8 and ds.class_names[0] == "basophil"  # the class names are still found
    # relative name looked up in a data directory whose path has capitals
    assert load_dataset("BloodMNIST.npz", folder).n_classes == 8
    monkeypatch.chdir(tmp_path)
    assert load_dataset("Ana/MedMNIST/BloodMNIST.npz").n_classes == 8
    # a named set in a folder with capitals, the name in any case
    named = tmp_path / "Data Sets"
    named.mkdir()
    write_medmnist(named / "bloodmnist.npz", n_classes=8)
    assert load_dataset(" BloodMNIST ", named).name == "bloodmnist"
    # the message names the path as typed
    with pytest.raises(DataFileError, match="Ana/MedMNIST/Missing.npz does not exist"):
        load_dataset(str(folder / "Missing.npz"))


# ------------------------------------------------------------------ generated files
def test_generated_medmnist_layout(tmp_path):
    write_medmnist(tmp_path / "toy.npz", n_classes=4)
    ds = load_npz(tmp_path / "toy.npz")
    check_common(ds, 4)
    assert ds.input_shape == (1, 28, 28) and ds.name == "toy"
    assert 0.0 <= ds.X_train.min() and ds.X_train.max() <= 1.0


def test_channels_last_rgb_is_transposed(tmp_path):
    write_medmnist(tmp_path / "rgb.npz", shape=(28, 28, 3))
    ds = load_npz(tmp_path / "rgb.npz")
    assert ds.input_shape == (3, 28, 28)
    raw = np.load(tmp_path / "rgb.npz")["train_images"]
    assert np.allclose(ds.X_train[5, 2], raw[5, :, :, 2] / 255.0)  # channel 2 of image 5


def test_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
             y_train=np.arange(30) % 10, x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
             y_test=np.arange(10))
    ds = load_npz(tmp_path / "m.npz")
    check_common(ds, 10)
    assert ds.input_shape == (1, 28, 28)


def test_missing_file_names_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(DataFileError) as info:
        load_dataset("bloodmnist", tmp_path)
    message = str(info.value)
    assert "bloodmnist.npz" in message and str(tmp_path) in message
    assert "medmnist.com" in message and DATA_DIR_ENV in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DataFileError, match="mnist.npz"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataFileError, match="nothere.npz"):
        load_dataset(str(tmp_path / "nothere.npz"))


@pytest.mark.parametrize("keep", [0.5, 0.99])
@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_file(tmp_path, keep, compressed):
    full = tmp_path / "full.npz"
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
              "train_labels": np.zeros((200, 1), np.uint8),
              "test_images": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
              "test_labels": np.ones((50, 1), np.uint8)}
    (np.savez_compressed if compressed else np.savez)(full, **arrays)
    data = full.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataFileError, match="truncated") as info:
        load_npz(cut)
    assert "cut.npz" in str(info.value)


def test_truncated_real_file(data_dir, tmp_path):
    data = (data_dir / "pneumoniamnist_balanced.npz").read_bytes()
    (tmp_path / "pneumoniamnist.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match="truncated"):
        load_dataset("pneumoniamnist", tmp_path)


def test_not_a_zip_file(tmp_path):
    (tmp_path / "junk.npz").write_text("not numpy at all")
    with pytest.raises(DataFileError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")


def test_wrong_keys(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataFileError, match="train_images") as info:
        load_npz(tmp_path / "k.npz")
    assert "x_train" in str(info.value) and "'images'" in str(info.value)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"train_images": np.zeros((40, 6, 6), np.uint8)}, "at least 8x8"),
        ({"train_images": np.zeros((40, 28, 28, 5), np.uint8)}, "shape"),
        ({"train_images": np.zeros((40, 784), np.uint8)}, "shape"),
        ({"test_labels": -np.ones((10, 1), np.int64)}, "non-negative"),
        ({"train_labels": np.full((40, 1), 0.5)}, "integer"),
        ({"train_labels": np.zeros((40, 2), np.int64)}, "shape"),
        ({"train_labels": np.zeros((39, 1), np.int64)}, "40 images but 39 labels"),
        ({"test_images": np.zeros((10, 28, 28, 3), np.uint8)}, "differ"),
    ],
    ids=["6x6", "5-channels", "flat", "negative-labels", "float-labels", "2d-labels", "count-mismatch",
         "channel-mismatch"],
)
def test_malformed_arrays_are_named(tmp_path, override, match):
    write_medmnist(tmp_path / "bad.npz", **override)
    with pytest.raises(DataFileError, match=match) as info:
        load_npz(tmp_path / "bad.npz")
    assert "bad.npz" in str(info.value)


def test_another_image_size_is_brought_to_the_runs(tmp_path):
    from fedal.config import FederationConfig
    from fedal.federation import federation_dataset

    write_medmnist(tmp_path / "bloodmnist.npz", shape=(32, 32, 3))
    assert load_dataset("bloodmnist", tmp_path).input_shape == (3, 32, 32)  # read as it is
    for size, want in ((0, 28), (64, 64)):  # the run's input size: 28 for MedMNIST unless input-size says
        cfg = FederationConfig(dataset="bloodmnist", data_dir=str(tmp_path), input_size=size)
        assert federation_dataset(cfg).input_shape == (3, want, want)


# ---------------------------------------------------------------------- subsampling
def test_max_train_keeps_class_proportions(data_dir, bloodmnist):
    full = bloodmnist
    sub = load_dataset("bloodmnist", data_dir, max_train=500, max_test=200, seed=3)
    assert len(sub.y_train) == 500 and len(sub.y_test) == 200
    full_share = np.bincount(full.y_train, minlength=8) / len(full.y_train)
    sub_share = np.bincount(sub.y_train, minlength=8) / 500
    assert np.abs(sub_share - full_share).max() < 0.005  # within about 2 samples per class
    # a subsample of real rows, with their own labels
    first = sub.X_train[0]
    match = np.flatnonzero((full.X_train == first).all(axis=(1, 2, 3)))
    assert len(match) >= 1 and sub.y_train[0] in full.y_train[match]


def test_max_train_is_seeded():
    a = load_dataset("digits", max_train=100, seed=1)
    b = load_dataset("digits", max_train=100, seed=1)
    c = load_dataset("digits", max_train=100, seed=2)
    assert np.array_equal(a.X_train, b.X_train)
    assert not np.array_equal(a.X_train, c.X_train)
    assert np.bincount(a.y_train, minlength=10).min() >= 9  # every class kept


def test_max_train_above_size_keeps_everything():
    assert len(load_dataset("breast_cancer", max_train=10_000).y_train) == 426


def test_max_train_must_be_positive():
    with pytest.raises(ConfigError, match=">= 1"):
        load_dataset("digits", max_train=0)



# ------------------------------------------------------------- the data_dir fixture
@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("1", "1 error")])
def test_data_dir_fixture_skips_locally_and_fails_under_ci(tmp_path, ci, outcome):
    """Missing data files skip the tests that need them, except under CI where they must be there."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_needs_data.py").write_text("def test_it(data_dir):\n    pass\n")
    env = {**os.environ, DATA_DIR_ENV: str(tmp_path / "empty"), "CI": ci}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert outcome in proc.stdout, proc.stdout
    assert "bloodmnist.npz" in proc.stdout and DATA_DIR_ENV in proc.stdout  # the reason says what to do


def test_class_ids_must_be_a_full_range_unless_a_class_count_is_declared(tmp_path):
    from fedal.data import load_npz
    from fedal.exceptions import DataFileError

    rng = np.random.default_rng(0)
    path = tmp_path / "gap.npz"
    np.savez(path, train_images=rng.integers(0, 255, (30, 28, 28), dtype=np.uint8),
             train_labels=np.array([0, 1, 3] * 10)[:, None],
             test_images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8), test_labels=np.array([0, 1, 3] * 2)[:, None])
    with pytest.raises(DataFileError, match=r"1 of them never occur \(e.g. \[2\]\).*--n-classes"):
        load_npz(path)
    assert load_npz(path, n_classes=4).n_classes == 4
    with pytest.raises(DataFileError, match="not below the declared n-classes 3"):
        load_npz(path, n_classes=3)


def test_a_huge_label_is_refused_without_allocating_a_range_up_to_it(tmp_path):
    """A label of 10**7 in an npz (a typo, a damaged file): check_classes counted the absent classes by building every
    class id up to it (10**9 took 7.45 GiB); now it names them with no memory to speak of."""
    import tracemalloc

    images = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "huge.npz", x_train=images, y_train=np.array([0, 1, 10**7]), x_test=images[:1],
             y_test=np.array([0]))
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError, match=r"up to 10000000 but 9999998 of them never occur \(e\.g\. \[2, 3, 4, 5, 6\]\)"):
            load_npz(tmp_path / "huge.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB to check three labels"
