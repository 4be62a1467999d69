"""Files on the device and the server: written atomically, read with errors that name the fix.

One home for what every writer and reader of fedal needs: a write that a kill at any
moment leaves either the old or the new version of (never half a file), ``.npz``
archives read without pickle, TOML read with its problems named, and TOML values
written back.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedal.exceptions import ConfigError, DataFileError, OutputError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and ``os.replace``.

    Parameters
    ----------
    path : path
        Target file (its folder is created).
    data : bytes or str
        Content; text is written as UTF-8.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {_why(exc, path)}; give a folder this user can write "
                          "to") from None
    return path


def writable_folder(folder: str | os.PathLike, *, what: str) -> Path:
    """``folder``, created if needed, after checking that a file can be written in it (by writing one and removing
    it: permissions, a read-only mount and a file where the folder should be all show, even to root).

    Parameters
    ----------
    folder : path
        The folder a command will write into.
    what : str
        How the user gave it, for the message (``"--output-dir runs/a"``).

    Raises
    ------
    OutputError
        Naming the folder, the reason and the fix, before any work is done.
    """
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedal-write-check-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what}: cannot write into {folder}: {_why(exc, folder)}; give a folder this "
                          "user can write to") from None
    return folder


def _why(exc: OSError, path: Path) -> str:
    """What ``exc`` means for writing at ``path``, in words (a file in the way is named)."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (the folder is not writable for this user)"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space left on the disk"
    return exc.strerror or str(exc)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` for a message: as given, and for a relative one where it was looked for. A process reads a relative
    path from its own working directory, which for a deployment's ServerApp or ClientApp is where its SuperLink or
    SuperNode was started, not where the user typed the path."""
    path = Path(path)
    if path.is_absolute():
        return str(path)
    return (f"{path} (relative, so read as {os.path.normpath(Path.cwd() / path)} from this process's working "
            f"directory {Path.cwd()}; give an absolute path)")


def read_npz(path: str | os.PathLike, *, what: str = "data file", missing_hint: str = "check the path",
             damaged_hint: str = "download it again", keys=None) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file at ``path`` (no pickle), or those named in ``keys``.

    Parameters
    ----------
    path : path
        The archive.
    keys : iterable of str, optional
        Read only these arrays (those the archive has), not the others.
    what : str
        What the file is, for the messages ("site data file").
    missing_hint, damaged_hint : str
        The fix named when the file is missing / truncated or not an archive.

    Raises
    ------
    DataFileError
        Naming the file, the problem and the fix.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if path.stat().st_size and head != b"PK\x03\x04":  # np.load would call anything else "pickled data"
            raise DataFileError(f"{what} {path} is not a .npz archive (it does not begin as a zip file: damaged, or "
                                f"another kind of file); {damaged_hint}")
        with np.load(path, allow_pickle=False) as archive:
            wanted = archive.files if keys is None else [key for key in keys if key in archive.files]
            return {key: archive[key] for key in wanted}
    except DataFileError:
        raise
    except FileNotFoundError:
        raise DataFileError(f"{what} {shown_path(path)} does not exist; {missing_hint}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataFileError(f"{what} {path} is truncated or not a valid .npz ({exc}); {damaged_hint}") from None


def read_toml(path: str | os.PathLike, *, what: str = "config file") -> dict[str, Any]:
    """The TOML document at ``path`` as a dict; ``what`` names the file in the messages ("preset").

    Raises
    ------
    ConfigError
        When the file is missing, is not UTF-8 text, or is not valid TOML (with the line).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {shown_path(path)} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give the .toml file in it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start} cannot be read); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def toml_value(value: bool | int | float | str) -> str:
    """``value`` written as a TOML scalar (strings as basic strings, escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(ch if ch >= " " or ch == "\t" else f"\\u{ord(ch):04x}" for ch in text) + '"'
