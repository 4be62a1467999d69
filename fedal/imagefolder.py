"""A site's own image files as its pool: a folder (PNG, JPEG, TIFF, BMP, DICOM), scanned, cached, growing.

A hospital points its SuperNode at a folder (node config ``data-path`` = the folder) instead of a ``.npz``.
:class:`ImageFolder` walks it recursively and reads every image file (:func:`fedal.imagefiles.read_image`: at
the run's ``input-size``, ``resize-policy`` and channel count). What it keeps, all in the site's state folder:

``client-<id>.<part>.files.db`` (SQLite)
    One row per sample: its id, the file's path relative to the folder, its content digest (SHA-256), size,
    modification time, original width and height, whether it is still there, and the label the folder gives
    it; one row per refused file with the reason. Sample ids are assigned in the order files are first seen
    and never change: a restart, a rename or a move keeps them (the digest identifies the content).
``client-<id>.<part>.images-<S>x<S>x<C>-<policy>.u8``
    The images at the input size as uint8, row = sample id (``S * S * C`` bytes each): 10,000 images of
    128 x 128 x 3 are 492 MB on disk, read as a memory map.

At each open (every message in a deployment, ``fedal site``), only files whose size or modification time
changed are read again: a new file joins the pool with a new id; a file whose content changed is a new
sample (its old id is marked gone); a file that disappeared is marked gone (never asked for; a label it
has stays); a file that comes back with the same content gets its old id back. A file that cannot be read
is refused by name with the reason (:class:`fedal.imagefiles.ImageRefused`) and tried again only when it
changes; nothing is dropped silently (:class:`ScanReport` says what was found).

Labels that exist already come from class subfolders (the ImageFolder convention: ``<folder>/<class>/...``,
the class by name, case-insensitive, or by index) or from a CSV (``labels.csv`` in the folder, or the node
config's ``labels-csv``) with the columns ``path,label`` (path relative to the folder, label a class name or
index). They are the pool's known labels: a simulated oracle answers from them, and a site with a real
oracle starts its labeled set with them (:class:`clients.site.ClientSite`). No path, name or DICOM tag leaves
the site: the records stay in the state folder, and what is sent is computed from the pixels.
"""
from __future__ import annotations

import csv
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedal.exceptions import ConfigError, DataFileError

#: the CSV of known labels read from the folder's root when the node config names none
LABELS_CSV = "labels.csv"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    present INTEGER NOT NULL,
    label INTEGER
);
CREATE INDEX IF NOT EXISTS files_path ON files (path);
CREATE TABLE IF NOT EXISTS copies (
    path TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    of_id INTEGER NOT NULL REFERENCES files (id)
);
CREATE TABLE IF NOT EXISTS refused (
    path TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass
class ScanReport:
    """What one scan of a folder found (printed before anything runs: :meth:`lines`).

    Attributes: ``folder``; ``files`` (image files seen now); ``read`` (files read this scan: new or changed);
    ``joined`` (new samples), ``changed`` (files whose content changed: new samples), ``gone`` (samples whose file
    left, in all), ``back`` (files that came back); ``refused`` (path -> reason, all files refused now);
    ``skipped`` (files that are not images: count by suffix); ``classes`` (known labels per class name);
    ``duplicates`` (files holding the pixels of another: one sample); ``unlabeled`` (present samples without a
    known label); ``sizes`` (original width x height -> count); ``seconds``.
    """

    folder: str
    files: int = 0
    read: int = 0
    joined: int = 0
    changed: int = 0
    gone: int = 0
    back: int = 0
    duplicates: int = 0
    refused: dict[str, str] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    classes: dict[str, int] = field(default_factory=dict)
    unlabeled: int = 0
    sizes: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def lines(self, most_refused: int = 20) -> list[str]:
        """The report as lines of text, at most ``most_refused`` refused files named (then a count)."""
        out = [f"{self.folder}: {self.files} image file(s), {self.read} read in {self.seconds:.1f} s "
               f"({self.joined} new, {self.changed} changed, {self.back} back, {self.gone} gone in all)"]
        if self.duplicates:
            out.append(f"  {self.duplicates} file(s) hold the same pixels as another: one sample each")
        labeled = sum(self.classes.values())
        out.append(f"  labels already given: {labeled}" + (
            " (" + ", ".join(f"{k} {v}" for k, v in self.classes.items()) + ")" if labeled else "")
            + f"; without a label: {self.unlabeled}")
        if self.sizes:
            common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(5))
            out.append(f"  original sizes: {common}" + (f" and {len(self.sizes) - 5} more" if len(self.sizes) > 5
                                                          else ""))
        if self.skipped:
            out.append("  not images, skipped: " + ", ".join(f"{k or '(no suffix)'} {v}"
                                                           for k, v in self.skipped.most_common()))
        if self.refused:
            out.append(f"  refused: {len(self.refused)} file(s)")
            for path, reason in sorted(self.refused.items())[:most_refused]:
                out.append(f"    {path}: {reason}")
            if len(self.refused) > most_refused:
                out.append(f"    ... and {len(self.refused) - most_refused} more (fedal site scan lists them all)")
        return out


def class_index(value: str, class_names: list[str]) -> int | None:
    """The class of ``class_names`` that ``value`` names (a name, case-insensitive, or an index ``0..K-1``), None
    if none."""
    text = str(value).strip()
    lowered = [n.lower() for n in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.isdigit() and int(text) < len(class_names):
        return int(text)
    return None


class ImageFolder:
    """One folder of a site's images, with its records and cache in the site's state folder.

    Parameters
    ----------
    root : path
        The folder (read recursively; symbolic links to files are followed, to folders not).
    state_dir : path
        The site's state folder (the records and the cache go there).
    client_id : int
        The site's client id (names the files).
    size : int
        The run's input size: every image is brought to ``size`` x ``size``.
    channels : int
        The run's channels (1 or 3).
    policy : str
        ``pad`` or ``crop`` (:data:`fedal.imagefiles.RESIZE_POLICIES`).
    class_names : list of str
        The run's classes (labels from subfolders and the CSV must name one of them).
    labels_csv : path, optional
        The CSV of known labels (default ``labels.csv`` in ``root`` when there is one).
    part : str
        ``pool`` or ``test`` (a site's local test set is a second folder).
    """

    def __init__(self, root, state_dir, client_id: int, *, size: int, channels: int, policy: str,
                 class_names: list[str], labels_csv=None, part: str = "pool") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataFileError(f"the site's image folder {self.root} does not exist or is not a folder; fix "
                                "data-path (or test-path) in the node config")
        self.size, self.channels, self.policy = int(size), int(channels), str(policy)
        self.class_names = [str(c) for c in class_names]
        state = Path(state_dir).expanduser()
        state.mkdir(parents=True, exist_ok=True)
        stem = f"client-{int(client_id)}.{part}"
        self.records = state / f"{stem}.files.db"
        self.cache = state / f"{stem}.images-{self.size}x{self.size}x{self.channels}-{self.policy}.u8"
        csv_path = Path(labels_csv).expanduser() if labels_csv else self.root / LABELS_CSV
        self.labels_csv = csv_path if (labels_csv or csv_path.is_file()) else None
        self._db = sqlite3.connect(str(self.records), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._check_settings()

    @property
    def row_bytes(self) -> int:
        """Bytes of one cached image."""
        return self.size * self.size * self.channels

    def close(self) -> None:
        """Close the records."""
        self._db.close()

    def __enter__(self) -> "ImageFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_settings(self) -> None:
        want = {"classes": "\t".join(self.class_names)}
        stored = dict(self._db.execute("SELECT key, value FROM settings").fetchall())
        if stored and stored.get("classes") != want["classes"]:
            raise ConfigError(f"the records {self.records} were made for the classes {stored.get('classes', '').split(chr(9))}, "
                              f"not this run's {self.class_names}: use another state-dir for another federation")
        # the last settings the folder was read with: the labeling page and the exchange open it with them
        want.update(size=str(self.size), channels=str(self.channels), policy=self.policy, root=str(self.root))
        self._db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", want.items())

    @classmethod
    def recorded(cls, state_dir, client_id: int, part: str = "pool") -> "ImageFolder":
        """The folder of client ``client_id`` as its site last read it (its settings from the records in
        ``state_dir``; ``part`` as in the constructor): for the labeling page and the file exchange, which run
        beside the site and read no file anew."""
        records = Path(state_dir).expanduser() / f"client-{int(client_id)}.{part}.files.db"
        if not records.is_file():
            raise ConfigError(f"there are no records of a folder site {records}: the site reads its folder at its first "
                              "round; give the SuperNode's state-dir and client-id")
        db = sqlite3.connect(str(records))
        try:
            stored = dict(db.execute("SELECT key, value FROM settings").fetchall())
        finally:
            db.close()
        return cls(stored["root"], state_dir, client_id, size=int(stored["size"]), channels=int(stored["channels"]),
                   policy=stored["policy"], class_names=stored["classes"].split("\t"), part=part)

    # ------------------------------------------------------------------ scanning
    def scan(self) -> ScanReport:
        """Bring the records and the cache up to date with the folder; return what was found."""
        start = time.perf_counter()
        report = ScanReport(folder=str(self.root))
        known_labels = self._csv_labels()
        db = self._db
        rows = db.execute("SELECT path, id, digest, bytes, mtime_ns, present, label FROM files").fetchall()
        by_path = {r[0]: r for r in rows}
        by_digest = {r[2]: r for r in rows}
        refused = {r[0]: r for r in db.execute("SELECT path, bytes, mtime_ns, reason FROM refused")}
        copies = {r[0]: r for r in db.execute("SELECT path, bytes, mtime_ns, of_id FROM copies")}
        self._truncate_cache()
        db.execute("BEGIN IMMEDIATE")  # one transaction: a scan of 10,000 unchanged files is one commit, not 10,000
        try:
            self._scan_files(report, known_labels, by_path, by_digest, refused, copies)
        except BaseException:
            db.execute("ROLLBACK")  # the pixels appended past the records are cut at the next open
            raise
        db.execute("COMMIT")
        for label, n in db.execute("SELECT label, COUNT(*) FROM files WHERE present = 1 AND label IS NOT NULL "
                                   "GROUP BY label ORDER BY label"):
            report.classes[self.class_names[label]] = n
        report.unlabeled = db.execute("SELECT COUNT(*) FROM files WHERE present = 1 AND label IS NULL").fetchone()[0]
        report.sizes = Counter({(w, h): n for w, h, n in db.execute(
            "SELECT width, height, COUNT(*) FROM files WHERE present = 1 GROUP BY width, height")})
        report.seconds = time.perf_counter() - start
        return report

    def _scan_files(self, report: ScanReport, known_labels: dict, by_path: dict, by_digest: dict, refused: dict,
                    copies: dict) -> None:
        """The walk of :meth:`scan`, inside its transaction: each file seen, read where new or changed."""
        from fedal.imagefiles import ImageRefused, file_digest, is_image_file, read_image

        db = self._db
        seen_ids: set[int] = set()
        seen_refused: set[str] = set()
        for path in self._walk():
            rel = path.relative_to(self.root).as_posix()
            if self.labels_csv is not None and path == self.labels_csv:
                continue
            try:
                st = path.stat()
            except OSError as e:
                report.refused[rel] = f"cannot be read ({e.strerror})"
                continue
            if not is_image_file(path):
                report.skipped[path.suffix.lower()] += 1
                continue
            report.files += 1
            label = self._label_of(rel, known_labels)
            row = by_path.get(rel)
            if row is not None and row[3] == st.st_size and row[4] == st.st_mtime_ns:
                seen_ids.add(row[1])  # unchanged
                report.back += int(not row[5])
                if not row[5] or row[6] != label:  # back, or a label given (or taken back) in the folder
                    db.execute("UPDATE files SET present = 1, label = ? WHERE id = ?", (label, row[1]))
                continue
            old = refused.get(rel)
            if old is not None and old[1] == st.st_size and old[2] == st.st_mtime_ns:
                report.refused[rel] = old[3]
                seen_refused.add(rel)
                continue
            copy = copies.get(rel)
            if copy is not None and copy[1] == st.st_size and copy[2] == st.st_mtime_ns:
                report.duplicates += 1  # the pixels of another file, unchanged since: nothing to read
                seen_ids.add(copy[3])  # the sample is still in the folder, whichever of its files remains
                continue
            report.read += 1
            try:
                digest = file_digest(path)
                same = by_digest.get(digest)
                if same is not None:  # content known: moved, renamed, restored, or a copy
                    if same[1] in seen_ids:
                        report.duplicates += 1
                        db.execute("INSERT OR REPLACE INTO copies VALUES (?, ?, ?, ?)",
                                   (rel, st.st_size, st.st_mtime_ns, same[1]))
                        continue
                    report.back += int(not same[5])
                    db.execute("UPDATE files SET path = ?, bytes = ?, mtime_ns = ?, present = 1, label = ? "
                               "WHERE id = ?", (rel, st.st_size, st.st_mtime_ns, label, same[1]))
                    seen_ids.add(same[1])
                    continue
                pixels, (width, height) = read_image(path, self.size, self.channels, self.policy), _size_of(path)
            except ImageRefused as e:
                report.refused[rel] = e.reason
                db.execute("INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?)", (rel, st.st_size, st.st_mtime_ns,
                                                                                 e.reason))
                seen_refused.add(rel)
                continue
            except OSError as e:
                report.refused[rel] = f"cannot be read ({e.strerror or e})"
                continue
            new_id = self._append(pixels)
            if row is not None:  # the same path with other content: a new sample, the old one gone
                report.changed += 1
                db.execute("UPDATE files SET path = ? WHERE id = ?", (f"{rel} (before {new_id})", row[1]))
            else:
                report.joined += 1
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                       (new_id, rel, digest, st.st_size, st.st_mtime_ns, width, height, label))
            by_digest[digest] = (rel, new_id, digest, st.st_size, st.st_mtime_ns, 1, label)
            seen_ids.add(new_id)
            refused.pop(rel, None)
            db.execute("DELETE FROM refused WHERE path = ?", (rel,))
        all_ids = [r[0] for r in db.execute("SELECT id FROM files")]
        gone = [i for i in all_ids if i not in seen_ids]
        if gone:
            db.executemany("UPDATE files SET present = 0 WHERE id = ?", ((i,) for i in gone))
        stale = [p for p in refused if p not in seen_refused]
        db.executemany("DELETE FROM refused WHERE path = ?", ((p,) for p in stale))
        report.gone = len(gone)

    def _walk(self):
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath) / name

    def _label_of(self, rel: str, known: dict[str, int]) -> int | None:
        if rel in known:
            return known[rel]
        parts = rel.split("/")
        if len(parts) >= 2:  # <class>/<file> (ImageFolder)
            return class_index(parts[0], self.class_names)
        return None

    def _csv_labels(self) -> dict[str, int]:
        if self.labels_csv is None:
            return {}
        if not self.labels_csv.is_file():
            raise DataFileError(f"the labels CSV {self.labels_csv} does not exist; fix labels-csv in the node config")
        out: dict[str, int] = {}
        with open(self.labels_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= {c.strip().lower() for c in reader.fieldnames}:
                raise DataFileError(f"the labels CSV {self.labels_csv} needs the columns path,label (got "
                                    f"{reader.fieldnames}); one row per labeled image, the path relative to "
                                    f"{self.root}")
            columns = {c.strip().lower(): c for c in reader.fieldnames}
            for line, row in enumerate(reader, start=2):
                path = str(row[columns["path"]] or "").strip().replace("\\", "/")
                value = str(row[columns["label"]] or "").strip()
                if not path and not value:
                    continue
                label = class_index(value, self.class_names)
                if label is None:
                    raise DataFileError(f"the labels CSV {self.labels_csv}, line {line}: {value!r} is not a class of "
                                        f"this run ({', '.join(self.class_names)}, or an index 0..{len(self.class_names) - 1})")
                if not (self.root / path).is_file():
                    raise DataFileError(f"the labels CSV {self.labels_csv}, line {line}: {path!r} is not a file in "
                                        f"{self.root} (paths are relative to the folder)")
                out[path] = label
        return out

    # ------------------------------------------------------------------ the cache
    def _rows_cached(self) -> int:
        return self.cache.stat().st_size // self.row_bytes if self.cache.is_file() else 0

    def _truncate_cache(self) -> None:
        """Cut rows a crash left past the records (the pixels are written before their row is committed)."""
        count = self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        have = self._rows_cached()
        if have > count:
            with open(self.cache, "r+b") as f:
                f.truncate(count * self.row_bytes)
        elif have < count:
            raise DataFileError(f"the image cache {self.cache} holds {have} images, its records {count}: it was "
                                "changed or cut by hand; delete both files (the labels are in the client database) "
                                "and the folder is read again")

    def _append(self, pixels: np.ndarray) -> int:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.shape != (self.channels, self.size, self.size):
            raise ValueError(f"an image of shape {pixels.shape}, not {(self.channels, self.size, self.size)}")
        new_id = self._rows_cached()
        with open(self.cache, "ab") as f:
            f.write(pixels.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return new_id

    # ------------------------------------------------------------------ what the site uses
    def images(self) -> np.ndarray:
        """Every sample's image as uint8 ``(N, C, S, S)``, row = sample id (a memory map of the cache)."""
        n = self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        if n == 0:
            return np.zeros((0, self.channels, self.size, self.size), np.uint8)
        return np.memmap(self.cache, dtype=np.uint8, mode="r", shape=(n, self.channels, self.size, self.size))

    def labels(self) -> np.ndarray:
        """The known label of every sample (-1: none), row = sample id."""
        rows = self._db.execute("SELECT id, label FROM files ORDER BY id").fetchall()
        out = np.full(len(rows), -1, np.int64)
        for i, label in rows:
            if label is not None:
                out[i] = label
        return out

    def display(self, sample_id: int, side: int = 320) -> np.ndarray:
        """Sample ``sample_id`` as people see it on the labeling page: its own file read at ``side`` pixels when it is
        still there unchanged, else the cached image (what the model sees) enlarged; uint8 ``(C, side, side)``."""
        from fedal.imagefiles import ImageRefused, read_image

        row = self._db.execute("SELECT path, bytes, mtime_ns, present FROM files WHERE id = ?",
                               (int(sample_id),)).fetchone()
        if row is None:
            raise KeyError(f"sample {sample_id} is not in the records of {self.root}")
        path = self.root / row[0]
        try:
            st = path.stat()
            if row[3] and st.st_size == row[1] and st.st_mtime_ns == row[2]:
                return read_image(path, side, self.channels, self.policy)
        except (OSError, ImageRefused):
            pass
        small = np.asarray(self.images()[int(sample_id)])
        factor = max(1, side // self.size)
        return small.repeat(factor, axis=1).repeat(factor, axis=2)

    def gone_ids(self) -> np.ndarray:
        """Ids of samples whose file is no longer in the folder."""
        return np.asarray([r[0] for r in self._db.execute("SELECT id FROM files WHERE present = 0 ORDER BY id")],
                          np.int64)


def _size_of(path: Path) -> tuple[int, int]:
    """The original width and height of the image file ``path`` (0, 0 where the header does not say)."""
    from fedal.imagefiles import is_dicom

    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0)
        from PIL import Image

        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except Exception:  # noqa: BLE001 - the size is for the report only; the image itself was read
        return 0, 0
