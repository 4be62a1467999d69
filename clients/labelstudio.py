"""Label Studio as an oracle: pending requests out as Label Studio tasks, its JSON export back in.

For sites whose people already label in Label Studio::

    fedal exchange export --format label-studio --state-dir S --client-id 0 --data-path site-0.npz --folder X
    # Label Studio: start it with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
    #   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=X, create a project with X/label_config.xml,
    #   import X/tasks.json, label, then Export -> JSON
    fedal exchange import --state-dir S --client-id 0 --data-path site-0.npz --json export.json

``tasks.json`` is Label Studio's task import format (a list of ``{"data": {...}}``); each
image is referenced as a local file (``/data/local-files/?d=images/sample-<id>.png``), so
nothing leaves the machine. Each task carries its ``request_id`` and ``sample_id``; the
import reads the choice of each task's annotation (the last one not cancelled) and goes
through the same checks and the same all-or-nothing rule as the CSV exchange
(:func:`clients.exchange.record_rows`). A task without annotation stays pending; annotators
who disagree on a task are a problem to resolve in Label Studio first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from xml.sax.saxutils import quoteattr

from clients.exchange import IMAGES_DIR, ExchangeError, ImportResult, export_requests, record_rows
from fedal.data import LocalData
from fedal.fileio import atomic_write
from fedal.pool import Pool

TASKS_JSON, LABEL_CONFIG = "tasks.json", "label_config.xml"
FROM_NAME = "label"  # the Choices control of label_config.xml


def label_config(data: LocalData) -> str:
    """The Label Studio labeling configuration of a site: its image (or feature text) and one choice per class."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in data.class_names)
    view = ('  <Image name="image" value="$image" zoom="true" zoomControl="true"/>' if data.kind == "image"
            else '  <Text name="image" value="$features"/>')
    return (f"<View>\n{view}\n  <Choices name=\"{FROM_NAME}\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n"
            f"{choices}\n  </Choices>\n</View>\n")


def export_tasks(pool: Pool, data: LocalData, folder: str | os.PathLike) -> Path:
    """Write the pending requests as Label Studio tasks: ``tasks.json``, ``label_config.xml`` and the PNGs.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    data : LocalData
        The client's data.
    folder : path
        Output folder (Label Studio's local-files document root).
    """
    folder = Path(folder)
    export_requests(pool, data, folder)  # the PNGs (and the CSV, for who prefers it)
    tasks = []
    for req in pool.requests("pending"):
        sid = int(req["sample_id"])
        item = {"request_id": int(req["request_id"]), "sample_id": sid, "round": req["round"]}
        if data.kind == "image":
            item["image"] = f"/data/local-files/?d={IMAGES_DIR}/sample-{sid}.png"
        else:
            item["features"] = ", ".join(f"{v:.6g}" for v in data.X_pool[sid])
        tasks.append({"data": item})
    atomic_write(folder / LABEL_CONFIG, label_config(data))
    return atomic_write(folder / TASKS_JSON, json.dumps(tasks, indent=1))


CONTROL = f'<Choices name="{FROM_NAME}" toName="image" choice="single">'
_FLAGS = {True: True, False: False, "true": True, "false": False}  # 1 and 0 are True and False here


class _Malformed(Exception):
    """One thing in a task that is not what Label Studio's Export -> JSON writes (the message names it)."""


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _items(holder: dict, key: str, what: str) -> list:
    """``holder[key]`` as a list (absent or null: empty), or _Malformed naming what it is."""
    value = holder.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Malformed(f"{what}'{key}' is a {_kind(value)}, not a list")
    return value


def _flag(annotation: dict, key: str, where: str) -> bool:
    """A yes/no field (``was_cancelled``, ``ground_truth``): a boolean, or "true"/"false" as some tools write it."""
    value = annotation.get(key)
    if value is None:
        return False
    if isinstance(value, str):
        value = value.strip().lower()
    if isinstance(value, (bool, int, str)) and value in _FLAGS:
        return _FLAGS[value]
    raise _Malformed(f"{where}: '{key}' is {annotation[key]!r}; Label Studio writes true or false")


def _picks(annotation: dict, where: str) -> list[str]:
    """The class names one annotation chose, from the results of fedal's Choices control."""
    picks = []
    for n, result in enumerate(_items(annotation, "result", f"{where}: "), start=1):
        if not isinstance(result, dict):
            raise _Malformed(f"{where}: result {n} is a {_kind(result)}, not an object")
        name, kind = result.get("from_name"), result.get("type")
        if name != FROM_NAME or kind != "choices":
            raise _Malformed(
                f"{where}: a result of control {name!r} (type {kind!r}); fedal reads only the control "
                f"{CONTROL} of the label_config.xml it wrote: create the project with that file "
                "(Settings -> Labeling Interface -> Code) and annotate again")
        value = result.get("value")
        if not isinstance(value, dict):
            raise _Malformed(f"{where}: 'value' is {'null' if value is None else 'a ' + _kind(value)}, not an object "
                             "with 'choices'")
        choices = value.get("choices")
        if isinstance(choices, str):
            raise _Malformed(f"{where}: 'choices' is the string {choices!r}, not a list of class names "
                             f"(Label Studio writes [{choices!r}]); export with Export -> JSON, do not edit the file")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise _Malformed(f"{where}: 'choices' must be a list of class names, got {choices!r:.80}")
        picks.extend(choices)
    return picks


def _choice(task: dict, position: int) -> tuple[str, str | None]:
    """``(label text, problem)`` of a task: "" when unanswered."""
    where = f"task {position}"
    try:
        picks = set()
        for n, annotation in enumerate(_items(task, "annotations", f"{where}: "), start=1):
            if not isinstance(annotation, dict):
                raise _Malformed(f"{where}: annotation {n} is a {_kind(annotation)}, not an object")
            if not _flag(annotation, "was_cancelled", f"{where}, annotation {n}"):
                picks.update(_picks(annotation, f"{where}, annotation {n}"))
    except _Malformed as exc:
        return "", f"{exc} (not what Label Studio's Export -> JSON writes)"
    if len(picks) > 1:
        return "", f"{where}: annotators chose {sorted(picks)}; settle on one class in Label Studio"
    return (next(iter(picks)) if picks else ""), None


def _read_export(path: Path) -> object:
    """The parsed JSON of ``path``, or ExchangeError saying why it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ExchangeError(f"Label Studio export {path} does not exist") from None
    except IsADirectoryError:
        raise ExchangeError(f"Label Studio export {path} is a folder, not a file; give the .json file that "
                            "Export -> JSON downloaded") from None
    except UnicodeDecodeError:
        raise ExchangeError(f"{path} is not a Label Studio JSON export (not UTF-8 text); use Export -> JSON") from None
    except OSError as exc:
        raise ExchangeError(f"cannot read the Label Studio export {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ExchangeError(f"{path} is not a Label Studio JSON export: its JSON is nested too deeply; "
                            "use the file Export -> JSON downloaded") from None
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python converts
        raise ExchangeError(f"{path} is not a Label Studio JSON export ({exc}); use Export -> JSON") from None


def import_export(pool: Pool, data: LocalData, json_path: str | os.PathLike, *,
                  source: str | None = None) -> ImportResult:
    """Record the annotations of a Label Studio JSON export, all or nothing.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    data : LocalData
        The client's data (class names: Label Studio answers with them).
    json_path : path
        Label Studio's export (Export -> JSON): a list of tasks with ``data`` and ``annotations``.
    source : str, optional
        Stored with every label; default ``"label-studio:<file name>"``.

    Raises
    ------
    ExchangeError
        Listing every problem; nothing was recorded.
    """
    path = Path(json_path)
    tasks = _read_export(path)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise ExchangeError(f"{path} is not a Label Studio JSON export: expected a list of tasks with 'data' "
                            "(Export -> JSON, not JSON-MIN or CSV)")
    index = {name: str(i) for i, name in enumerate(data.class_names)}
    rows, problems = [], []
    for position, task in enumerate(tasks, start=1):
        text, problem = _choice(task, position)
        if problem:
            problems.append(problem)
            continue
        if text and text not in index:
            problems.append(f"task {position}: class {text!r} is not one of this site's classes "
                            f"{list(data.class_names)}; use the label_config.xml fedal wrote")
            continue
        rows.append((position, {"request_id": str(task["data"].get("request_id", "")),
                                "sample_id": str(task["data"].get("sample_id", "")),
                                "label": index.get(text, "")}))
    if problems:
        raise ExchangeError(f"{path}: {len(problems)} problem(s), nothing was recorded; fix them and import again:\n  "
                            + "\n  ".join(problems))
    return record_rows(pool, rows, path, source or f"label-studio:{path.name}", where="task")
