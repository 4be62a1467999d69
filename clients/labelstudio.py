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


def _choice(task: dict, position: int) -> tuple[str, str | None]:
    """``(label text, problem)`` of a task: "" when unanswered."""
    kept = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    picks = set()
    for annotation in kept:
        for result in annotation.get("result") or []:
            if result.get("from_name") == FROM_NAME and result.get("type") == "choices":
                picks.update(result.get("value", {}).get("choices") or [])
    if len(picks) > 1:
        return "", f"task {position}: annotators chose {sorted(picks)}; settle on one class in Label Studio"
    return (next(iter(picks)) if picks else ""), None


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
    try:
        tasks = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ExchangeError(f"Label Studio export {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExchangeError(f"{path} is not a Label Studio JSON export ({exc}); use Export -> JSON") from None
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
