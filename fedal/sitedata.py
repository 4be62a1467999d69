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

import csv
import io
import os
from pathlib import Path

import numpy as np

from fedal.config import FederationConfig
from fedal.data import LocalData, UnitImages, _images
from fedal.exceptions import ConfigError, DataFileError
from fedal.federation import KNOWN_CHANNELS, client_data, run_side
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


def load_site(path: str | os.PathLike, client_id: int = 0, state_dir: str | os.PathLike | None = None) -> LocalData:
    """Read a site file written by :func:`save_site` (or by hand, see the module docstring), or a folder site's
    data as the site last read it (:func:`load_recorded_site`).

    Parameters
    ----------
    path : path
        The site's ``.npz`` file, or its folder of images.
    client_id : int
        The site's client id (recorded in the returned data).
    state_dir : path, optional
        A folder site: the SuperNode's state-dir, where its records are.

    Raises
    ------
    DataFileError
        If the file is missing, unreadable or its arrays do not fit together.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if state_dir is None:
            raise ConfigError(f"{path} is a folder of images: its site's records are in the SuperNode's state-dir; "
                              "give it (--state-dir)")
        return load_recorded_site(path, state_dir, client_id)
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


#: what ``fedal split`` writes per site: one ``.npz``, or a folder of PNG or DICOM files (:func:`save_site_folder`)
SPLIT_FORMATS = ("npz", "png", "dicom")


def split_sites(cfg: FederationConfig, out_dir: str | os.PathLike, *, include_labels: bool = True,
                fmt: str = "npz") -> list[Path]:
    """Write ``site-<id>.npz`` (or the folder ``site-<id>/``) for every client of ``cfg``, cut as the simulation
    cuts it.

    Parameters
    ----------
    cfg : FederationConfig
        Data set, partition, number of clients, local test fraction and seed.
    out_dir : path
        Output folder.
    include_labels : bool
        Keep pool ground truth (for simulated oracles); see :func:`save_site`.
    fmt : str
        One of :data:`SPLIT_FORMATS`.
    """
    return [split_site(cfg, cid, out_dir, fmt, include_labels=include_labels) for cid in range(cfg.clients)]


def split_site(cfg: FederationConfig, client_id: int, out_dir: str | os.PathLike, fmt: str = "npz", *,
               include_labels: bool = True) -> Path:
    """Write client ``client_id``'s share of ``cfg`` into ``out_dir`` as ``fmt``: ``site-<id>.npz`` or the folder
    ``site-<id>/`` (:func:`save_site_folder`); return the path.

    Parameters
    ----------
    cfg : FederationConfig
        The federation (as :func:`split_sites`).
    client_id : int
        The client.
    out_dir : path
        Output folder.
    fmt : str
        One of :data:`SPLIT_FORMATS`.
    include_labels : bool
        Keep the pool's ground truth (for simulated oracles).
    """
    if fmt not in SPLIT_FORMATS:
        raise ConfigError(f"the split format must be one of {SPLIT_FORMATS}, got {fmt!r}")
    out = Path(out_dir)
    if fmt != "npz":
        return save_site_folder(out / f"site-{client_id}", client_data(cfg, client_id), fmt=fmt,
                                include_labels=include_labels)
    return save_site(out / f"site-{client_id}.npz", client_data(cfg, client_id), include_labels=include_labels)


def save_site_folder(out: str | os.PathLike, data: LocalData, *, fmt: str = "png", include_labels: bool = True,
                     csv_labels: bool = False) -> Path:
    """Write one site's images as files, as a hospital would hold them: ``<out>/pool`` and ``<out>/test``.

    PNG: the pool in class subfolders (``pool/<class>/<n>.png``, the ImageFolder convention) with
    ``include_labels``, else flat (``pool/<n>.png``); the test set always in class subfolders. DICOM: 16-bit
    MONOCHROME2 (grey, stored as ``v x 257`` with the window that maps it back to ``v``) or 8-bit RGB Secondary
    Capture files ``<n>.dcm``, the labels in ``labels.csv`` (path,label by class name). Reading the folder at the
    same size gives back the same pixels (:mod:`fedal.imagefolder`). Returns ``out``.

    Parameters
    ----------
    out : path
        The site's folder (made; must not hold files already).
    data : LocalData
        The site's images (float32 NCHW in [0, 1]) and labels.
    fmt : {"png", "dicom"}
        The files' format.
    include_labels : bool
        Write the pool's labels (class subfolders, or the CSV); the test set's are always written.
    csv_labels : bool
        PNG: the files flat in each folder, in the data's order, the labels in ``labels.csv`` (as for DICOM).
    """
    if data.kind != "image":
        raise ConfigError(f"only images can be written as files; this site's data are {data.kind} rows")
    if fmt not in ("png", "dicom"):
        raise ConfigError(f"a site folder is written as png or dicom, not {fmt!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} holds files already; give an empty or new folder")
    for part, X, y, labeled in (("pool", data.X_pool, data.y_pool, include_labels), ("test", data.X_test, data.y_test,
                                                                                     True)):
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, (image, label) in enumerate(zip(X, y)):
            pixels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
            name = data.class_names[int(label)] if labeled and label >= 0 else None
            if fmt == "png":
                rel = f"{name}/{n:06d}.png" if name is not None and not csv_labels else f"{n:06d}.png"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                _write_png(folder / rel, pixels)
            else:
                rel = f"{n:06d}.dcm"
                _write_dicom(folder / rel, pixels)
            if name is not None and (fmt == "dicom" or csv_labels):
                rows.append((rel, name))
        if rows:
            with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["path", "label"])
                writer.writerows(rows)
    return out


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    image.save(path, format="PNG")


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A Secondary Capture DICOM file of ``pixels`` (uint8, C x H x W), explicit VR little endian."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
    ds.PixelRepresentation = 0
    if pixels.shape[0] == 1:  # 16-bit grey, windowed back to 0..255
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.WindowCenter, ds.WindowWidth = 32768, 65536
        ds.PixelData = (pixels[0].astype(np.uint16) * 257).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.ascontiguousarray(pixels.transpose(1, 2, 0)).tobytes()
    ds.save_as(path, enforce_file_format=True)


def run_layout(cfg: FederationConfig) -> tuple[list[str], int, int]:
    """The class names, channels and input side of the run ``cfg``'s images: what a folder site reads its files as
    (the data sets fedal knows by name need no file on the site; any other is read for its layout).

    Parameters
    ----------
    cfg : FederationConfig
        The run (its ``dataset`` and ``input-size``).
    """
    from fedal.data import MEDMNIST_CLASSES

    if cfg.dataset in KNOWN_CHANNELS:
        names = MEDMNIST_CLASSES.get(cfg.dataset) or [str(i) for i in range(10)]
        return list(names), KNOWN_CHANNELS[cfg.dataset], run_side(cfg)
    ds = federation_dataset(cfg)
    if ds.kind != "image":
        raise DataFileError(f"a site's folder of images needs a run of images; the run's data set {cfg.dataset!r} "
                            "holds table rows: point data-path at a site file (fedal split) instead")
    return list(ds.class_names), int(ds.input_shape[0]), int(ds.input_shape[-1])


def load_folder_site(cfg: FederationConfig, folder, state_dir, client_id: int = 0, *, labels_csv: str = "",
                     test_path: str = "", scan: bool = True):
    """A folder site's data: its pool and local test set read from its own image files (:mod:`fedal.imagefolder`),
    with the ids of the samples whose file is gone and what each scan found.

    Parameters
    ----------
    cfg : FederationConfig
        The run (classes, channels, ``input-size``, ``resize-policy``).
    folder : path
        The site's image folder (node config ``data-path``).
    state_dir : path
        The site's state folder (the records and the image cache).
    client_id : int
        The site's client id.
    labels_csv : str
        The CSV of labels already given ("" = ``labels.csv`` in the folder, if any).
    test_path : str
        A folder of labeled images as the local test set ("" = none).
    scan : bool
        Read the folder for new, changed and gone files first (False: the records as the site last saw them, for
        the labeling page and the file exchange beside a running site).

    Returns
    -------
    (LocalData, numpy.ndarray, list of ScanReport)
        The data (the pool's rows are the sample ids; ``y_pool`` holds the labels already given, -1 elsewhere),
        the gone ids, and the scans (pool, then test set; empty with ``scan=False``).
    """
    from fedal.imagefolder import ImageFolder

    names, channels, side = run_layout(cfg)
    opts = dict(size=side, channels=channels, policy=cfg.resize_policy, class_names=names)
    reports = []
    with ImageFolder(folder, state_dir, client_id, labels_csv=labels_csv or None, **opts) as pool:
        if scan:
            reports.append(pool.scan())
        X_pool, y_pool, gone = UnitImages(pool.images()), pool.labels(), pool.gone_ids()
    view = _Display(folder, state_dir, client_id, opts)
    if len(X_pool) == 0:
        raise DataFileError(f"the site's folder {folder} holds no image fedal can read"
                            + (": " + "; ".join(reports[0].lines()[1:]) if reports else "")
                            + "; put PNG, JPEG, TIFF, BMP or DICOM files in it")
    X_test, y_test = X_pool[:0], np.zeros(0, np.int64)
    if test_path:
        with ImageFolder(test_path, state_dir, client_id, part="test", **opts) as test:
            if scan:
                reports.append(test.scan())
            keep = np.setdiff1d(np.flatnonzero(test.labels() >= 0), test.gone_ids())
            X_test, y_test = UnitImages(test.images())[keep], test.labels()[keep]
    return (LocalData(int(client_id), X_pool, y_pool, X_test, y_test, len(names), names, "image", view=view), gone,
            reports)


class _Display:
    """A folder site's images as people see them (:meth:`fedal.imagefolder.ImageFolder.display`), opening the
    records for each image (the labeling page serves from threads; the records are SQLite)."""

    def __init__(self, folder, state_dir, client_id: int, opts: dict) -> None:
        self.args, self.opts = (folder, state_dir, client_id), opts

    def __call__(self, sample_id: int) -> np.ndarray:
        from fedal.imagefolder import ImageFolder

        with ImageFolder(*self.args, **self.opts) as folder:
            return folder.display(sample_id)


def load_recorded_site(path, state_dir, client_id: int = 0) -> LocalData:
    """A folder site's data as its site last read it (no file read anew): for the labeling page and the file
    exchange beside a running site (:meth:`fedal.imagefolder.ImageFolder.recorded`).

    Parameters
    ----------
    path : path
        The site's folder (the node config's ``data-path``), checked against the records.
    state_dir : path
        The SuperNode's state-dir.
    client_id : int
        The SuperNode's client-id.
    """
    from fedal.imagefolder import ImageFolder

    with ImageFolder.recorded(state_dir, client_id) as pool:
        given = Path(path).expanduser().resolve()
        if given not in (pool.root.resolve(), pool.root.resolve().parent):
            raise ConfigError(f"the site's records in {state_dir} are of the folder {pool.root}, not {path}: give the "
                              "data-path and state-dir of the same SuperNode")
        opts = dict(size=pool.size, channels=pool.channels, policy=pool.policy, class_names=pool.class_names)
        X_pool, y_pool, root = UnitImages(pool.images()), pool.labels(), pool.root
    names = opts["class_names"]
    return LocalData(int(client_id), X_pool, y_pool, X_pool[:0], np.zeros(0, np.int64), len(names), names, "image",
                     view=_Display(root, state_dir, client_id, opts))


def at_run_size(cfg: FederationConfig, data: LocalData) -> LocalData:
    """A site's ``data`` with its images at the run's input size (``input-size``, else 28 for the data sets fedal
    knows by name), by the run's ``resize-policy``; tables and images already at the size as they are.

    Parameters
    ----------
    cfg : FederationConfig
        The run.
    data : LocalData
        The site's data (a ``.npz`` may hold images of another size).
    """
    side = run_side(cfg)
    if data.kind != "image" or not side or data.input_shape[-2:] == (side, side):
        return data
    if cfg.dataset in KNOWN_CHANNELS and data.input_shape[0] != KNOWN_CHANNELS[cfg.dataset]:
        raise DataFileError(f"this site's images have {data.input_shape[0]} channel(s); the run's data set "
                            f"{cfg.dataset} has {KNOWN_CHANNELS[cfg.dataset]}: write the site's data with those")
    from dataclasses import replace

    from fedal.data import resize_images

    return replace(data, X_pool=resize_images(data.X_pool, side, cfg.resize_policy),
                   X_test=resize_images(data.X_test, side, cfg.resize_policy) if len(data.X_test) else
                   np.zeros((0, data.input_shape[0], side, side), np.float32))
