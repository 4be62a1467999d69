"""File exchange: pending queries out as PNG images + a CSV, answers back in as the filled CSV.

For sites where people label in their own tools (a spreadsheet, a PACS viewer) rather
than on the labeling page::

    fedal exchange export --state-dir S --client-id 0 --data-path site-0.npz --folder X
    # fill the label column of X/requests.csv (class numbers: X/classes.csv)
    fedal exchange import --state-dir S --client-id 0 --data-path site-0.npz --csv X/requests.csv

An import is all or nothing: every row is checked first (unknown or expired request ids,
a sample id that does not match its request, labels that are not integers or not a
class, duplicates) and any problem rejects the whole file with one message per line;
otherwise every label is recorded in one transaction (:meth:`fedal.pool.Pool.answer`).
Rows left with an empty label stay pending. Importing the same file twice records
nothing new. With ``oracle="file"`` in a SuperNode's node config the ClientApp does both
steps itself each round (see :class:`clients.oracles.FileOracle`).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from clients.images import sample_png
from fedal.data import LocalData
from fedal.exceptions import FedalError, InvalidLabelError
from fedal.fileio import atomic_write
from fedal.pool import Pool

REQUESTS_CSV, CLASSES_CSV, IMAGES_DIR = "requests.csv", "classes.csv", "images"
FIXED_COLUMNS = ("request_id", "sample_id", "round", "label")
MAX_LISTED_PROBLEMS = 25


class ExchangeError(FedalError, ValueError):
    """A filled CSV that cannot be imported (nothing of it was recorded)."""


@dataclass
class ImportResult:
    """What an import did: ``recorded`` labels written, ``unanswered`` rows left blank (their
    requests stay pending), ``repeated`` rows already recorded with the same label (a file
    imported twice)."""

    recorded: int
    unanswered: int
    repeated: int


def export_requests(pool: Pool, data: LocalData, folder: str | os.PathLike) -> Path:
    """Write the pending requests to ``folder``: ``requests.csv``, ``classes.csv`` and PNGs.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    data : LocalData
        The client's data (row ``i`` of ``data.X_pool`` is sample id ``i``).
    folder : path
        Output folder (created). Images of samples no longer pending are removed.

    Returns
    -------
    Path
        The requests CSV (a ``label`` column to fill, one row per pending request).
    """
    folder = Path(folder)
    images = folder / IMAGES_DIR
    is_image = data.kind == "image"
    (images if is_image else folder).mkdir(parents=True, exist_ok=True)
    pending = pool.requests("pending")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    n_features = 0 if is_image else int(data.X_pool.shape[1])
    writer.writerow([*FIXED_COLUMNS, *(["image"] if is_image else [f"x{j}" for j in range(n_features)])])
    wanted = set()
    for req in pending:
        sid = int(req["sample_id"])
        row = [req["request_id"], sid, "" if req["round"] is None else req["round"], ""]
        if is_image:
            name = f"sample-{sid}.png"
            wanted.add(name)
            if not (images / name).exists():
                atomic_write(images / name, sample_png(data, sid))
            row.append(f"{IMAGES_DIR}/{name}")
        else:
            row.extend(f"{v:.6g}" for v in data.X_pool[sid])
        writer.writerow(row)
    for stale in images.glob("sample-*.png") if is_image else ():
        if stale.name not in wanted:
            stale.unlink()
    classes = io.StringIO()
    cw = csv.writer(classes, lineterminator="\n")
    cw.writerow(["label", "name"])
    cw.writerows(enumerate(data.class_names))
    atomic_write(folder / CLASSES_CSV, classes.getvalue().encode())
    atomic_write(folder / REQUESTS_CSV, out.getvalue().encode())
    return folder / REQUESTS_CSV


def _int(text: str) -> int:
    text = text.strip()
    if not text or not text.lstrip("+-").isdigit():
        raise ValueError(text)
    return int(text)


def import_answers(pool: Pool, csv_path: str | os.PathLike, *, source: str | None = None) -> ImportResult:
    """Record the labels of a filled requests CSV, all or nothing.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    csv_path : path
        A CSV with at least the columns ``request_id``, ``sample_id`` and ``label``.
    source : str, optional
        Stored with every label; default ``"file:<csv file name>"``.

    Raises
    ------
    ExchangeError
        Listing every problem (with its line); nothing was recorded.
    """
    path = Path(csv_path)
    source = source or f"file:{path.name}"
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets add a BOM
    except FileNotFoundError:
        raise ExchangeError(f"answer file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ExchangeError(f"answer file {path} is not UTF-8 text; save it as CSV (UTF-8)") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=_delimiter(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    label_studio = sorted({"annotation_id", "annotator", "lead_time"} & set(columns))
    if label_studio:
        raise ExchangeError(
            f"{path} is a Label Studio CSV export (it has the column(s) {label_studio}); fedal reads Label Studio's "
            "JSON: Export -> JSON, then import it with --json"
        )
    missing = [c for c in ("request_id", "sample_id", "label") if c not in columns]
    if missing:
        raise ExchangeError(
            f"{path}: the header {columns or '(empty file)'} lacks the column(s) {missing}; "
            f"keep the header of the exported {REQUESTS_CSV}"
        )
    rows = ((reader.line_num, row) for row in reader)
    return record_rows(pool, rows, path, source)


def request_problem(requests: dict, request_id: int, sample_id: int, made: str, ids: str) -> str | None:
    """Why an answer to ``request_id`` about ``sample_id`` cannot be this site's (``requests``: id -> request),
    or None; ``made`` says how the file came to be ("the file was exported"), ``ids`` where the ids are."""
    req = requests.get(request_id)
    if req is None:
        return f"request {request_id} is not a request of this client; was {made} from another site or state directory?"
    if int(req["sample_id"]) != sample_id:
        return f"request {request_id} asked about sample {req['sample_id']}, not {sample_id}; do not edit {ids}"
    return None


def record_rows(pool: Pool, rows, path: Path, source: str, *, where: str = "line") -> ImportResult:
    """Check every ``(position, {request_id, sample_id, label})`` of ``rows`` (texts, as a CSV holds them),
    then record all labels in one transaction, or none: the one rule of every answer file.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    rows : iterable of (int, dict)
        Each answer and where it sits in its file (a line, a task).
    path : Path
        The file (for the messages).
    source : str
        Stored with every label.
    where : str
        What a position is called in the messages ("line", "task").

    Raises
    ------
    ExchangeError
        Listing every problem; nothing was recorded.
    """
    requests = {int(r["request_id"]): r for r in pool.requests()}
    labels = {r["id"]: r for r in pool.label_records()}
    problems: list[str] = []
    answers: dict[int, int] = {}
    rounds: dict[int, int | None] = {}
    seen_request: dict[int, int] = {}
    seen_sample: dict[int, int] = {}
    unanswered = repeated = 0
    for line, row in rows:
        row = {(k or "").strip(): (v or "") for k, v in row.items()}
        raw_label = row.get("label", "").strip()
        try:
            request_id = _int(row.get("request_id", ""))
        except ValueError:
            problems.append(f"{where} {line}: request_id {row.get('request_id')!r} is not an integer")
            continue
        try:
            sample_id = _int(row.get("sample_id", ""))
        except ValueError:
            problems.append(f"{where} {line}: sample_id {row.get('sample_id')!r} is not an integer")
            continue
        if request_id in seen_request:
            problems.append(f"{where} {line}: request {request_id} appears again (first on {where} {seen_request[request_id]}); "
                            "keep one row per request")
            continue
        seen_request[request_id] = line
        if sample_id in seen_sample:
            problems.append(f"{where} {line}: sample {sample_id} appears again (first on {where} {seen_sample[sample_id]}); "
                            "keep one row per sample")
            continue
        seen_sample[sample_id] = line
        problem = request_problem(requests, request_id, sample_id, "the file was exported", "the id columns")
        if problem:
            problems.append(f"{where} {line}: {problem}")
            continue
        req = requests[request_id]
        if not raw_label:
            unanswered += 1
            continue
        try:
            label = pool.check_label(_int(raw_label))
        except InvalidLabelError as exc:  # (a ValueError too: catch it first)
            problems.append(f"{where} {line}: {exc}")
            continue
        except ValueError:
            problems.append(f"{where} {line}: label {raw_label!r} is not an integer class; "
                            f"write a number 0..{pool.n_classes - 1} (see {CLASSES_CSV})")
            continue
        status = req["status"]
        if status == "answered":
            given = labels.get(sample_id)
            if given is not None and given["label"] == label:
                repeated += 1  # the same file imported again
                continue
            problems.append(f"{where} {line}: request {request_id} was already answered "
                            f"(class {None if given is None else given['label']} from {given and given['source']}); "
                            "a recorded label is not overwritten")
            continue
        if status != "pending":
            problems.append(f"{where} {line}: request {request_id} was {status} ({req['note'] or 'closed'}) and its sample "
                            "went back to the pool; export again to get the current requests")
            continue
        answers[sample_id] = label
        rounds[sample_id] = req["round"]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise ExchangeError(f"{path}: {len(problems)} problem(s), nothing was recorded; fix them and import again:\n  "
                            f"{listed}{more}")
    recorded = pool.answer(answers, source=source, round=rounds) if answers else 0
    return ImportResult(recorded, unanswered, repeated)


def _delimiter(text: str) -> str:
    """The CSV's separator: a comma, or the semicolon (or tab) some spreadsheet locales save with,
    told by which one splits the header into the exported columns."""
    header = text.splitlines()[0] if text else ""
    for sep in (",", ";", "\t"):
        if {"request_id", "sample_id", "label"} <= {c.strip() for c in header.split(sep)}:
            return sep
    return ","
