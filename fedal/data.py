"""Data sets: scikit-learn's bundled ones, MedMNIST-layout ``.npz`` files and ``mnist.npz``.

Every loader returns a :class:`Dataset` with float32 inputs ready for the models
(images as NCHW scaled to [0, 1], tables standardised with training statistics) and
int64 labels ``0 .. n_classes - 1``. Files are looked up in a data directory given by
argument, else the ``FEDAL_DATA_DIR`` environment variable, else ``./data``. Nothing
is downloaded: a missing or malformed file raises :class:`DataFileError` naming the
file and how to get it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedal.exceptions import ConfigError, DataFileError
from fedal.fileio import read_npz, shown_path

DATA_DIR_ENV = "FEDAL_DATA_DIR"

MEDMNIST_CLASSES = {
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocyte",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "pneumoniamnist": ["normal", "pneumonia"],
}
# name -> file names tried in order in the data directory
FILES = {
    "bloodmnist": ["bloodmnist.npz"],
    "pneumoniamnist": ["pneumoniamnist.npz", "pneumoniamnist_balanced.npz"],
    "mnist": ["mnist.npz"],
}
BUNDLED = ("digits", "breast_cancer")


@dataclass
class Dataset:
    """A train / test split with metadata.

    Attributes
    ----------
    name : str
        Data set name.
    X_train, y_train, X_test, y_test : numpy.ndarray
        float32 inputs and int64 labels.
    n_classes : int
        Number of classes.
    class_names : list of str
        Human-readable class names (used by the labeling page and reports).
    kind : str
        ``"image"`` (NCHW) or ``"table"``.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    class_names: list[str] = field(default_factory=list)
    kind: str = "table"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(3, 28, 28)`` or ``(64,)``."""
        return tuple(self.X_train.shape[1:])


@dataclass
class LocalData:
    """One client's data: its pool (with simulated ground truth) and a local test set.

    Attributes: ``client_id``; ``X_pool``, ``y_pool`` (inputs and ground truth of the pool,
    ``-1`` where unknown); ``X_test``, ``y_test`` (local test set); ``n_classes``;
    ``class_names``; ``kind`` ("image" or "table"); ``view`` (a folder site's ``sample id -> uint8 (C, S, S)``
    image at a size a person reads, from the site's own file: :meth:`fedal.imagefolder.ImageFolder.display`;
    None = the pool's row as the model sees it).
    """

    client_id: int
    X_pool: np.ndarray
    y_pool: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    class_names: list[str]
    kind: str
    view: object = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.X_pool.shape[1:])


def available_datasets() -> list[str]:
    """Names :func:`load_dataset` accepts (besides a path to an ``.npz`` file)."""
    return sorted([*BUNDLED, *FILES])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$FEDAL_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                 max_train: int | None = None, max_test: int | None = None,
                 n_classes: int | None = None) -> Dataset:
    """Load a data set by name (see :func:`available_datasets`) or by ``.npz`` path.

    Parameters
    ----------
    name : str
        ``digits``, ``breast_cancer``, ``bloodmnist``, ``pneumoniamnist``, ``mnist`` or a
        path to a MedMNIST-layout / mnist-layout ``.npz`` file. Names are matched without
        case; a path is used as given (its case kept).
    data_dir : path, optional
        Where the ``.npz`` files are; default ``$FEDAL_DATA_DIR`` or ``./data``.
    seed : int
        Seed for the split of bundled sets and for subsampling.
    max_train, max_test : int, optional
        Keep a seeded, class-stratified subsample of at most this many samples.
    n_classes : int, optional
        Declared number of classes of an ``.npz`` file (see :func:`load_npz`).
    """
    # Only a data set's name is matched without case; a path keeps its case (/home/Ana/...).
    given = name.strip()
    key = given.lower()
    if key in BUNDLED:
        ds = _load_bundled(key, seed)
    elif key in FILES:
        ds = load_npz(_find_file(key, data_dir), name=key, n_classes=n_classes)
    elif key.endswith(".npz"):
        path = _find_file(given, data_dir)
        ds = load_npz(path, name=path.stem, n_classes=n_classes)
    else:
        raise ConfigError(
            f"unknown data set {name!r}; choose one of {available_datasets()} or pass a path to an .npz file"
        )
    if max_train is not None:
        ds.X_train, ds.y_train = _stratified_subsample(ds.X_train, ds.y_train, max_train, seed)
    if max_test is not None:
        ds.X_test, ds.y_test = _stratified_subsample(ds.X_test, ds.y_test, max_test, seed + 1)
    return ds


def _find_file(key: str, data_dir) -> Path:
    """A named set's file in the data directory, or the file a path (case kept) names."""
    if key.lower().endswith(".npz"):
        path = Path(key).expanduser()
        if not path.is_absolute() and not path.exists():
            path = resolve_data_dir(data_dir) / path
        if not path.is_file():
            raise DataFileError(f"data file {shown_path(path)} does not exist; check the path")
        return path
    folder = resolve_data_dir(data_dir)
    for fname in FILES[key]:
        if (folder / fname).is_file():
            return folder / fname
    how = ("download it from https://medmnist.com (MedMNIST v2, 28x28 .npz)" if key != "mnist"
           else "get mnist.npz (keys x_train, y_train, x_test, y_test)")
    raise DataFileError(
        f"data set {key!r} needs {' or '.join(FILES[key])} in {shown_path(folder)}, which is not there; "
        f"{how} and put it in that folder, or point --data-dir / ${DATA_DIR_ENV} at the folder that has it"
    )


def load_npz(path: str | os.PathLike, name: str | None = None, *, n_classes: int | None = None) -> Dataset:
    """Load a MedMNIST-layout (``{train,val,test}_{images,labels}``) or mnist-layout
    (``x_train, y_train, x_test, y_test``) ``.npz`` file, validating every array.

    Labels must be ``0 .. K-1`` with every class present in the training split (or below a
    declared ``n_classes``), the test split must hold no class the training split lacks, and
    images must be finite.

    Parameters
    ----------
    path : path
        The ``.npz`` file.
    name : str, optional
        Data set name (picks the class names); default the file's stem.
    n_classes : int, optional
        The number of classes, when some may be absent from the file (labels must be below it).
    """
    path = Path(path)
    arrays = read_npz(path, what="data file")
    if {"train_images", "train_labels", "test_images", "test_labels"} <= set(arrays):
        keys = ("train_images", "train_labels", "test_images", "test_labels")
    elif {"x_train", "y_train", "x_test", "y_test"} <= set(arrays):
        keys = ("x_train", "y_train", "x_test", "y_test")
    else:
        raise DataFileError(
            f"data file {path} has arrays {sorted(arrays)}; expected the MedMNIST layout "
            "(train_images, train_labels, test_images, test_labels) or the mnist layout "
            "(x_train, y_train, x_test, y_test)"
        )
    Xtr, ytr = _images(arrays[keys[0]], path, keys[0]), _labels(arrays[keys[1]], path, keys[1])
    Xte, yte = _images(arrays[keys[2]], path, keys[2]), _labels(arrays[keys[3]], path, keys[3])
    for X, y, what in ((Xtr, ytr, "train"), (Xte, yte, "test")):
        if len(X) != len(y):
            raise DataFileError(f"data file {path}: {what} has {len(X)} images but {len(y)} labels")
        if len(y) == 0:
            raise DataFileError(f"data file {path}: the {what} split is empty; the file is incomplete, download it again")
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise DataFileError(f"data file {path}: train images {Xtr.shape[1:]} and test images {Xte.shape[1:]} differ")
    n_classes = check_classes(ytr, yte, path, keys[1], keys[3], n_classes)
    name = name or path.stem
    base = name.replace("_balanced", "")
    names = MEDMNIST_CLASSES.get(base.lower(), [str(c) for c in range(n_classes)])
    if len(names) != n_classes:
        names = [str(c) for c in range(n_classes)]
    return Dataset(base, Xtr, ytr, Xte, yte, n_classes, names, kind="image")


def check_classes(y_train: np.ndarray, y_test: np.ndarray, path, train_key: str, test_key: str,
                  n_classes: int | None = None) -> int:
    """The number of classes of a file's labels, after checking they can be classes.

    Parameters
    ----------
    y_train, y_test : arrays of int
        The labels of the two splits.
    path : path
        The file (for the messages).
    train_key, test_key : str
        The arrays' names in the file.
    n_classes : int, optional
        A declared number of classes (labels must lie below it; classes may be absent).

    Raises
    ------
    DataFileError
        Naming what is wrong and the fix.
    """
    present = np.unique(y_train)
    if n_classes is not None:
        too_big = np.unique(np.concatenate([y_train, y_test]))
        too_big = too_big[too_big >= n_classes]
        if len(too_big):
            raise DataFileError(f"data file {path}: labels {too_big[:5].tolist()} are not below the declared "
                                f"n-classes {n_classes}")
        return int(n_classes)
    count = int(present.max()) + 1
    if count > len(present):  # some class below the largest label never occurs (counted, not listed: no range built)
        raise DataFileError(
            f"data file {path}: {train_key} uses class ids up to {count - 1} but {count - len(present)} of them never "
            f"occur (e.g. {_absent(present)}); labels must be 0..K-1 with every class present "
            f"({len(present)} distinct labels here). Fix the labels, or declare the number of classes with "
            "--n-classes if some are absent on purpose")
    unseen = np.setdiff1d(np.unique(y_test), present)
    if len(unseen):
        raise DataFileError(f"data file {path}: {test_key} holds classes {unseen[:5].tolist()} that {train_key} lacks; "
                            "no model can learn them. Remove them from the test split, or declare --n-classes")
    return count


def _absent(present: np.ndarray, most: int = 5) -> list[int]:
    """The first ``most`` non-negative integers missing from the sorted unique ``present``, without building
    the range up to its largest value (a label of 10**9 must not cost gigabytes)."""
    out, expected = [], 0
    for value in present.tolist():
        while expected < value and len(out) < most:
            out.append(expected)
            expected += 1
        if len(out) >= most:
            break
        expected = value + 1
    return out


def _images(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    else:
        raise DataFileError(
            f"data file {path}: {key} has shape {a.shape}; expected (N, H, W) or (N, H, W, 1|3) images"
        )
    if min(a.shape[-2:]) < 8:
        raise DataFileError(
            f"data file {path}: {key} images are {a.shape[-2]}x{a.shape[-1]}; fedal takes images of at least 8x8 "
            "(the run's input-size brings them all to one size)"
        )
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a).reshape(len(a), -1).all(axis=1)
        if bad.any():
            raise DataFileError(f"data file {path}: {int(bad.sum())} image(s) of {key} hold NaN or Inf (the first is "
                                f"image {int(np.argmax(bad))}); fix or drop them")
    scale = 255.0 if a.dtype == np.uint8 or a.max() > 1.0 else 1.0
    return np.ascontiguousarray(a, dtype=np.float32) / np.float32(scale)


class UnitImages:
    """uint8 images (a memory map of a folder site's cache) that read as float32 in [0, 1] when indexed: a pool of
    10,000 images of 128 x 128 x 3 holds 492 MB (on disk, paged in as read) instead of 2 GB of floats.

    Indexing (``X[rows]``, ``X[a:b]``) gives float32 arrays divided by 255, as a uint8 ``.npz`` is read;
    ``np.asarray(X)`` converts it all (what only a whole-array computation needs). :func:`fedal.features.fingerprint`
    and the image descriptors go through it in chunks.

    Parameters
    ----------
    raw : numpy.ndarray
        uint8 images ``(N, C, H, W)``.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray) -> None:
        if raw.dtype != np.uint8 or raw.ndim != 4:
            raise ValueError(f"UnitImages holds uint8 images (N, C, H, W), got {raw.dtype} {raw.shape}")
        self.raw = raw

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, C, H, W)``."""
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        """4."""
        return 4

    @property
    def size(self) -> int:
        """Values in all (as an array's)."""
        return int(self.raw.size)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index) -> np.ndarray:
        part = np.asarray(self.raw[index])
        out = np.empty(part.shape, np.float32)
        np.divide(part, np.float32(255), out=out, dtype=np.float32)
        return out

    def take(self, rows) -> "UnitImages":
        """The images at ``rows``, still uint8 (read as floats when indexed)."""
        return UnitImages(np.asarray(self.raw[np.asarray(rows, dtype=np.int64)]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def resize_images(X: np.ndarray, size: int, policy: str = "pad") -> np.ndarray:
    """Images ``X`` (float32 NCHW in [0, 1]) brought to ``size`` x ``size`` by ``policy``: ``pad`` scales the
    longer side to ``size`` and pads with black, centred; ``crop`` scales the shorter side and keeps the centre.
    Bilinear with antialiasing (torch); ``X`` itself when it already has the size."""
    X = np.asarray(X, np.float32)
    if X.ndim != 4:
        raise ValueError(f"resize_images takes images (N, C, H, W), got shape {X.shape}")
    h, w = X.shape[-2:]
    if (h, w) == (size, size):
        return X
    import torch
    import torch.nn.functional as F

    scale = (size / max(h, w)) if policy == "pad" else (size / min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((len(X), X.shape[1], size, size), np.float32)
    for start in range(0, len(X), 512):  # bounded memory: 512 images at a time
        t = torch.from_numpy(np.ascontiguousarray(X[start:start + 512]))
        r = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1).numpy()
        if policy == "pad":
            top, left = (size - nh) // 2, (size - nw) // 2
            out[start:start + 512, :, top:top + nh, left:left + nw] = r
        else:
            top, left = (nh - size) // 2, (nw - size) // 2
            out[start:start + 512] = r[:, :, top:top + size, left:left + size]
    return out


def _labels(a: np.ndarray, path: Path, key: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataFileError(f"data file {path}: {key} has shape {a.shape}; expected (N,) or (N, 1) class labels")
    if not np.issubdtype(a.dtype, np.integer) or (len(a) and a.min() < 0):
        raise DataFileError(f"data file {path}: {key} must hold non-negative integer class labels")
    return a.astype(np.int64)


def _load_bundled(key: str, seed: int) -> Dataset:
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    if key == "digits":
        raw = datasets.load_digits()
        X, names = raw.data.astype(np.float32) / 16.0, [str(c) for c in range(10)]
    else:
        raw = datasets.load_breast_cancer()
        X, names = raw.data.astype(np.float32), list(raw.target_names)
    Xtr, Xte, ytr, yte = train_test_split(X, raw.target.astype(np.int64), test_size=0.25,
                                          random_state=seed, stratify=raw.target)
    if key == "breast_cancer":  # standardise with training statistics only
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return Dataset(key, Xtr.astype(np.float32), ytr, Xte.astype(np.float32), yte, len(names), names, kind="table")


def _stratified_subsample(X: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 1:
        raise ConfigError(f"subsample size must be >= 1, got {n}")
    if n >= len(y):
        return X, y
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    # take each class in proportion, rounding by a stable sort on the within-class rank
    ranks = np.empty(len(y))
    for c in np.unique(y):
        members = order[y[order] == c]
        ranks[members] = np.arange(len(members)) / len(members)
    keep = np.sort(order[np.argsort(ranks[order], kind="stable")[:n]])
    return X[keep], y[keep]
