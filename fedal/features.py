"""Fixed features of the inputs, computed on the device and never sent anywhere.

A closed-form head (:mod:`fedal.heads`) learns from few labels only if the features
already separate the classes. :class:`ImageDescriptors` are classical image
descriptors that need no training and no label: a histogram of oriented gradients
(Dalal & Triggs, CVPR 2005), a uniform local-binary-pattern histogram (Ojala,
Pietikainen & Maenpaa, TPAMI 2002) and per-channel intensity statistics. Each site
computes them for its own pool once (:func:`cached_features` keeps them beside the
site's database); only the head's aggregate statistics leave the site.

:func:`featurizer_for` picks the features of a run: descriptors for images, the raw
rows for tables (``features = "auto"``).
"""
from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fedal.data import UnitImages
from fedal.exceptions import ConfigError
from fedal.fileio import atomic_write

FEATURES = ("auto", "raw", "descriptors")
CACHE_ENV = "FEDAL_CACHE_DIR"
#: most bytes of features :func:`cached_features` keeps in memory (a simulation's client actor serves every run
#: of ``fedal compare`` over the same pools)
MEMORY_CACHE_BYTES = 256 * 2**20
_in_memory: OrderedDict[str, np.ndarray] = OrderedDict()
_in_memory_bytes = 0


class Featurizer(ABC):
    """Maps inputs to fixed feature vectors (no training, no label)."""

    #: recorded with cached features; a change of parameters invalidates the cache
    name: str = "featurizer"

    @abstractmethod
    def transform(self, X: np.ndarray) -> np.ndarray:
        """Features of the inputs ``X`` (n, ...), shape (n, d), float32."""

    def dim(self, input_shape: tuple[int, ...]) -> int:
        """Size of the feature vector of one input of shape ``input_shape``."""
        return int(self.transform(np.zeros((1, *input_shape), np.float32)).shape[1])


class RawFeatures(Featurizer):
    """The inputs themselves, flattened (table rows; or pixels)."""

    name = "raw"

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return X.reshape(len(X), -1)


class ImageDescriptors(Featurizer):
    """HOG + uniform LBP histogram + per-channel intensity statistics of images.

    For a 28x28 RGB image with the defaults: 324 HOG values (9 orientations, 7x7-pixel
    cells, 2x2-cell blocks, L2-Hys), 10 LBP bins (8 neighbours, radius 1, on the grey
    image) and 13 values per channel (mean, standard deviation, 10th / 50th / 90th
    percentile, an 8-bin histogram): 373 features.

    Parameters
    ----------
    orientations : int
        HOG orientation bins.
    cell : int
        HOG cell side in pixels.
    block : int
        HOG block side in cells.
    lbp_points, lbp_radius : int
        LBP neighbours and radius.
    bins : int
        Intensity histogram bins per channel.
    """

    def __init__(self, orientations: int = 9, cell: int = 7, block: int = 2, lbp_points: int = 8,
                 lbp_radius: int = 1, bins: int = 8) -> None:
        self.orientations, self.cell, self.block = int(orientations), int(cell), int(block)
        self.lbp_points, self.lbp_radius, self.bins = int(lbp_points), int(lbp_radius), int(bins)
        self.name = (f"descriptors(o={self.orientations},c={self.cell},b={self.block},p={self.lbp_points},"
                     f"r={self.lbp_radius},h={self.bins})")

    @classmethod
    def for_size(cls, side: int) -> "ImageDescriptors":
        """The descriptors of images ``side`` pixels wide: the HOG cell and the LBP radius scaled from 28 x 28's (7
        and 1), so that every input size gives the same 4 x 4 cells and the same number of features."""
        if side <= 28:
            return cls()
        return cls(cell=max(2, round(7 * side / 28)), lbp_radius=max(1, round(side / 28)))

    def max_norm(self, input_shape: tuple[int, ...]) -> float:
        """The largest L2 norm a descriptor of an image of ``input_shape`` with values in [0, 1] can have: each
        L2-Hys HOG block has norm at most 1, the LBP histogram's shares sum to 1, and per channel the mean and
        three percentiles are at most 1, the standard deviation at most 1/2 and the histogram's shares sum to 1."""
        shape = tuple(input_shape)
        channels, (height, width) = (1, shape) if len(shape) == 2 else (shape[0], shape[1:])
        blocks = max(height // self.cell - self.block + 1, 0) * max(width // self.cell - self.block + 1, 0)
        return float(np.sqrt(blocks + 1.0 + channels * (1.0 + 0.25 + 3.0 + 1.0)))

    def transform(self, X: np.ndarray) -> np.ndarray:
        from skimage.feature import hog, local_binary_pattern

        if isinstance(X, UnitImages) and len(X) > 1024:  # a folder's uint8 pool: read 1,024 images at a time
            return np.concatenate([self.transform(X[start:start + 1024]) for start in range(0, len(X), 1024)])
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 3:
            X = X[:, None]
        if X.ndim != 4 or X.shape[1] not in (1, 3):
            raise ConfigError(f"image descriptors need images of shape (n, C, H, W) with C = 1 or 3, got {X.shape}; "
                              "use features = \"raw\" for tables")
        if not len(X):  # no image (a site without a local test set): no row, of the right width
            return np.zeros((0, self.dim(X.shape[1:])), np.float32)
        out = []
        qs = np.array([10, 50, 90])
        for img in X:
            grey = img.mean(axis=0)
            h = hog(grey, orientations=self.orientations, pixels_per_cell=(self.cell, self.cell),
                    cells_per_block=(self.block, self.block), feature_vector=True)
            codes = local_binary_pattern(np.rint(np.clip(grey, 0, 1) * 255).astype(np.uint8), self.lbp_points,
                                         self.lbp_radius, method="uniform")
            lbp = np.bincount(codes.astype(np.int64).ravel(), minlength=self.lbp_points + 2) / codes.size
            channels = []
            for c in img:
                channels += [c.mean(), c.std(), *np.percentile(c, qs),
                             *(np.histogram(c, bins=self.bins, range=(0.0, 1.0))[0] / c.size)]
            out.append(np.concatenate([h, lbp[: self.lbp_points + 2], channels]))
        return np.asarray(out, dtype=np.float32).reshape(len(X), -1)


class WithInputs(Featurizer):
    """Features of ``inner`` followed by the inputs themselves, flattened: the rows of the ``handover``
    pipeline (:class:`fedal.models.HandoverClassifier`), whose head reads the first part and whose
    network the second. :func:`model_inputs` keeps only ``inner``'s features in a cache.

    Parameters
    ----------
    inner : Featurizer
        The head's features.
    """

    def __init__(self, inner: Featurizer) -> None:
        self.inner = inner
        self.name = f"{inner.name}+inputs"

    def transform(self, X: np.ndarray) -> np.ndarray:
        return with_inputs(self.inner.transform(X), X)


def with_inputs(features: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Rows ``[features | X flattened]`` (float32)."""
    X = np.asarray(X, dtype=np.float32)
    return np.hstack([np.asarray(features, dtype=np.float32).reshape(len(X), -1), X.reshape(len(X), -1)])


def featurizer_for(kind: str, input_shape: tuple[int, ...], pipeline: str = "head") -> Featurizer | None:
    """The featurizer named ``kind`` for inputs of shape ``input_shape``; None = the inputs as they are.

    Parameters
    ----------
    kind : {"auto", "raw", "descriptors"}
        ``auto``: with the head pipeline, descriptors for images (C, H, W) and the raw rows for
        tables; with the network pipeline, the inputs as they are (the network learns its features).
    input_shape : tuple of int
        Shape of one input.
    pipeline : {"head", "network", "handover"}
        The run's pipeline; ``handover`` gives the head's features followed by the inputs (:class:`WithInputs`).
    """
    if kind not in FEATURES:
        raise ConfigError(f"features must be one of {FEATURES}, got {kind!r}")
    if pipeline == "handover":
        return WithInputs(featurizer_for(kind, input_shape, "head"))
    is_image = len(input_shape) == 3 and input_shape[0] in (1, 3)
    if kind == "auto":
        kind = ("descriptors" if is_image else "raw") if pipeline == "head" else "none"
    if kind == "descriptors":
        if not is_image:
            raise ConfigError(f"features = \"descriptors\" needs images (C, H, W); these inputs have shape "
                              f"{tuple(input_shape)}: use features = \"raw\"")
        return ImageDescriptors.for_size(min(input_shape[1:]))
    return RawFeatures() if kind == "raw" else None


def fingerprint(X: np.ndarray) -> str:
    """A short digest of the array ``X`` (shape, dtype and bytes): which pool features belong to."""
    digest = hashlib.sha256(repr((X.shape, str(X.dtype))).encode())
    for start in range(0, max(len(X), 1), 1024):  # the same digest as of all bytes at once, without their copy
        digest.update(np.ascontiguousarray(X[start:start + 1024]).tobytes())
    return digest.hexdigest()[:32]


def cached_features(featurizer: Featurizer, X: np.ndarray, path: str | Path | None) -> np.ndarray:
    """``featurizer.transform(X)``, kept at ``path`` (``.npz``) for the next message.

    In deployment every message starts a new ClientApp process: the features of the
    pool are computed once and read back afterwards. The file records the featurizer and
    a fingerprint of ``X``; if either changed, the features are computed again. A process
    that handles many messages (a simulation's client actor) also keeps the last features
    it computed in memory (:data:`MEMORY_CACHE_BYTES`, read-only arrays), so the runs of a
    comparison, which share their pools, compute them once.

    Parameters
    ----------
    featurizer : Featurizer
        What computes the features.
    X : array
        The inputs (a site's pool).
    path : path or None
        Cache file; None: no file.
    """
    if isinstance(featurizer, RawFeatures):
        return featurizer.transform(X)  # nothing to save
    key = f"{featurizer.name}:{fingerprint(X)}"
    before = None  # the features of the pool as it was, when X only added rows to it (a folder site's new files)
    if path is not None and Path(path).is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) == key:
                    return f["features"]
                old, name = f["features"], str(f["key"]).rsplit(":", 1)[0]
                if name == featurizer.name and 0 < len(old) < len(X) and \
                        f"{name}:{fingerprint(_first_rows(X, len(old)))}" == str(f["key"]):
                    before = old
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is recomputed
    features = _in_memory.get(key)
    if features is None and before is not None:  # only the new rows are computed
        features = _remember(key, np.concatenate([before, featurizer.transform(_rows_from(X, len(before)))]))
    elif features is None:
        features = _remember(key, featurizer.transform(X))
    else:
        _in_memory.move_to_end(key)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, key=np.asarray(key), features=features)
        atomic_write(path, buf.getvalue())
    return features


def _first_rows(X, n: int):
    """The first ``n`` rows of ``X``, a folder's uint8 pool kept unread (:class:`fedal.data.UnitImages`)."""
    return UnitImages(X.raw[:n]) if isinstance(X, UnitImages) else X[:n]


def _rows_from(X, n: int):
    """The rows of ``X`` from ``n`` on (as :func:`_first_rows`)."""
    return UnitImages(X.raw[n:]) if isinstance(X, UnitImages) else X[n:]


def _remember(key: str, features: np.ndarray) -> np.ndarray:
    """Keep ``features`` in memory under ``key`` (read-only), the least recently used going first past
    :data:`MEMORY_CACHE_BYTES`."""
    global _in_memory_bytes
    features.setflags(write=False)
    _in_memory[key] = features
    _in_memory_bytes += features.nbytes
    while _in_memory_bytes > MEMORY_CACHE_BYTES and len(_in_memory) > 1:
        _in_memory_bytes -= _in_memory.popitem(last=False)[1].nbytes
    return features


def cache_dir() -> Path:
    """Where a machine keeps features it computed for whole data sets: ``$FEDAL_CACHE_DIR``, else
    ``~/.cache/fedal`` (a site keeps its own pool's features beside its database instead)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedal").expanduser()


def model_inputs(featurizer: Featurizer | None, X: np.ndarray, cache: str | Path | None = None) -> np.ndarray:
    """What the model takes for the inputs ``X``: ``X`` itself without a featurizer, else its
    features (kept in the file ``cache``; default a file of :func:`cache_dir` named by ``X``'s fingerprint)."""
    if featurizer is None:
        return X
    if isinstance(featurizer, WithInputs):  # the cache holds the features; the inputs are at hand
        return with_inputs(model_inputs(featurizer.inner, X, cache), X)
    if cache is None and not isinstance(featurizer, RawFeatures):
        cache = cache_dir() / f"features-{fingerprint(X)}.npz"
    return cached_features(featurizer, X, cache)
