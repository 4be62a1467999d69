"""Per-site data files: each deployed client holds only its own samples.

In a simulation every client process cuts its share out of the whole data set
(:func:`fedal.federation.client_data`). In a deployment a site has its own files and
nothing else, so ``fedal split`` writes one ``.npz`` per site, cut exactly as the
simulation cuts it, and a SuperNode is pointed at its file with
``--node-config 'data-path="site-0.npz"'``.

A site file holds:

``x_pool``
    Inputs of the local pool, images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``
    (uint8 0..255 or float 0..1), or table rows ``(N, F)``.
``y_pool`` (optional)
    Ground truth of the pool, only for a simulated oracle; ``-1`` = unknown. A real site
    has no labels here: people give them on the labeling page or by file exchange.
``x_test``, ``y_test`` (optional)
    A small labeled local test set.
``class_names``
    One name per class; their number is the number of classes.
``kind``
    ``"image"`` or ``"table"``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from fedal.config import FederationConfig
from fedal.data import LocalData, _images
from fedal.exceptions import DataFileError
from fedal.federation import client_data
from fedal.fileio import atomic_write, read_npz

SITE_KEYS = ("x_pool", "y_pool", "x_test", "y_test", "class_names", "kind")


def save_site(path: str | os.PathLike, data: LocalData, *, include_labels: bool = True) -> Path:
    """Write one site's data to ``path`` (``.npz``), atomically.

    Parameters
    ----------
    path : path
        Output file.
    data : LocalData
        The site's pool and local test set.
    include_labels : bool
        Keep the pool's ground truth (needed by a simulated oracle); ``False`` writes a
        file like a real site's, whose pool labels come from people.
    """
    arrays = {
        "x_pool": data.X_pool, "x_test": data.X_test, "y_test": data.y_test.astype(np.int64),
        "class_names": np.asarray(data.class_names, dtype=str), "kind": np.asarray(data.kind),
    }
    if include_labels:
        arrays["y_pool"] = data.y_pool.astype(np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write(path, buf.getvalue())


def load_site(path: str | os.PathLike, client_id: int = 0) -> LocalData:
    """Read a site file written by :func:`save_site` (or by hand, see the module docstring).

    Parameters
    ----------
    path : path
        The site's ``.npz`` file.
    client_id : int
        The site's client id (recorded in the returned data).

    Raises
    ------
    DataFileError
        If the file is missing, unreadable or its arrays do not fit together.
    """
    path = Path(path).expanduser()
    arrays = read_npz(path, what="site data file",
                      missing_hint="write it with `fedal split` or fix data-path in the node config",
                      damaged_hint="write it again")
    if "x_pool" not in arrays or "class_names" not in arrays:
        raise DataFileError(
            f"site data file {path} has arrays {sorted(arrays)}; it needs at least x_pool and class_names "
            "(see fedal/sitedata.py)"
        )
    names = [str(n) for n in arrays["class_names"].reshape(-1)]
    n_classes = len(names)
    if n_classes < 2:
        raise DataFileError(f"site data file {path}: class_names lists {n_classes} class; a classifier needs >= 2")
    kind = str(arrays["kind"]) if "kind" in arrays else ("image" if arrays["x_pool"].ndim >= 3 else "table")
    if kind not in ("image", "table"):
        raise DataFileError(f"site data file {path}: kind must be 'image' or 'table', got {kind!r}")
    X_pool = _inputs(arrays["x_pool"], kind, path, "x_pool")
    y_pool = _site_labels(arrays.get("y_pool"), len(X_pool), n_classes, path, "y_pool", allow_unknown=True)
    if "x_test" in arrays:
        X_test = _inputs(arrays["x_test"], kind, path, "x_test")
        y_test = _site_labels(arrays.get("y_test"), len(X_test), n_classes, path, "y_test", allow_unknown=False)
        if X_test.shape[1:] != X_pool.shape[1:]:
            raise DataFileError(f"site data file {path}: x_test rows {X_test.shape[1:]} differ from x_pool rows {X_pool.shape[1:]}")
    else:
        X_test, y_test = X_pool[:0], np.zeros(0, np.int64)
    if len(X_pool) == 0:
        raise DataFileError(f"site data file {path}: x_pool is empty; a site needs samples to label")
    return LocalData(int(client_id), X_pool, y_pool, X_test, y_test, n_classes, names, kind)


def _inputs(a: np.ndarray, kind: str, path: Path, key: str) -> np.ndarray:
    if kind == "image":
        if a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(0, 2, 3, 1)  # NCHW -> NHWC, the layout _images expects
        return _images(a, path, key)  # float32 NCHW in [0, 1]
    if a.ndim != 2:
        raise DataFileError(f"site data file {path}: {key} has shape {a.shape}; table rows must be (N, features)")
    if not np.issubdtype(a.dtype, np.number):
        raise DataFileError(f"site data file {path}: {key} must be numeric, got {a.dtype}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise DataFileError(f"site data file {path}: {int(bad.sum())} row(s) of {key} hold NaN or Inf (the first is "
                            f"row {int(np.argmax(bad))}); fix or drop them")
    return np.ascontiguousarray(a, dtype=np.float32)


def _site_labels(a, n: int, n_classes: int, path: Path, key: str, *, allow_unknown: bool) -> np.ndarray:
    if a is None:
        if not allow_unknown:
            raise DataFileError(f"site data file {path}: has x_test but no y_test; a test set needs its labels")
        return np.full(n, -1, np.int64)
    a = np.asarray(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1 or len(a) != n:
        raise DataFileError(f"site data file {path}: {key} has shape {a.shape}; expected ({n},)")
    if not np.issubdtype(a.dtype, np.integer):
        raise DataFileError(f"site data file {path}: {key} must hold integer classes, got {a.dtype}")
    low = -1 if allow_unknown else 0
    if len(a) and (a.min() < low or a.max() >= n_classes):
        raise DataFileError(
            f"site data file {path}: {key} holds classes outside {low}..{n_classes - 1} "
            f"({len(a)} values, min {a.min()}, max {a.max()}); -1 marks an unknown label"
        )
    return a.astype(np.int64)


def split_sites(cfg: FederationConfig, out_dir: str | os.PathLike, *, include_labels: bool = True) -> list[Path]:
    """Write ``site-<id>.npz`` for every client of ``cfg``, cut as the simulation cuts it.

    Parameters
    ----------
    cfg : FederationConfig
        Data set, partition, number of clients, local test fraction and seed.
    out_dir : path
        Output folder.
    include_labels : bool
        Keep pool ground truth (for simulated oracles); see :func:`save_site`.
    """
    out = Path(out_dir)
    return [save_site(out / f"site-{cid}.npz", client_data(cfg, cid), include_labels=include_labels)
            for cid in range(cfg.clients)]
