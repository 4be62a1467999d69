"""Label Studio exports for the tests, in the shape Label Studio 1.23 writes (Export -> JSON); the live test
(``tests/test_labelstudio_live.py``, against the Label Studio CI installs) checks that every field made up here is in
its real export.

Written from its documented format (https://labelstud.io/guide/export#Label-Studio-JSON-format-of-annotated-tasks)
and from what its export held on a real server: a list of tasks, each with ``id`` (Label Studio's task id),
``data`` (as imported), ``annotations`` (each with ``id``, ``completed_by``, ``was_cancelled``,
``ground_truth``, ``created_at``, ``updated_at``, ``result``), ``drafts`` and ``predictions``.
"""
from __future__ import annotations

import json
from pathlib import Path


def annotation(name: str | None, *, annotation_id: int, task_id: int, user: int = 1, cancelled: bool = False,
               ground_truth: bool = False, updated_at: str = "2026-12-01T10:00:00.000000Z") -> dict:
    """One submitted annotation choosing the class ``name`` (no result when None or cancelled)."""
    result = [] if cancelled or name is None else [{
        "id": f"r{annotation_id}", "type": "choices", "from_name": "label", "to_name": "image",
        "origin": "manual", "value": {"choices": [name]}}]
    return {"id": annotation_id, "completed_by": user, "result": result, "was_cancelled": cancelled,
            "ground_truth": ground_truth, "created_at": "2026-12-01T10:00:00.000000Z", "updated_at": updated_at,
            "draft_created_at": None, "lead_time": 4.2, "prediction": {}, "result_count": len(result),
            "unique_id": f"u{annotation_id}", "import_id": None, "last_action": None, "bulk_created": False,
            "task": task_id, "project": 1, "updated_by": user, "parent_prediction": None,
            "parent_annotation": None, "last_created_by": None}


def label_studio_export(tasks_json: Path, choices: dict[int, object], *, first_task_id: int = 1) -> list[dict]:
    """What Label Studio's Export -> JSON gives for the imported ``tasks_json`` annotated with ``choices``:
    ``{request_id: class name, a list of names (several annotators), or "cancelled"}``. Task ids start at
    ``first_task_id``, as in a project that held other tasks before."""
    out = []
    for task_id, task in enumerate(json.loads(Path(tasks_json).read_text()), start=first_task_id):
        data = task["data"]
        pick = choices.get(data["request_id"])
        names = pick if isinstance(pick, list) else [] if pick is None else [pick]
        annotations = [annotation(None if name == "cancelled" else name, annotation_id=100 * task_id + n,
                                  task_id=task_id, user=n, cancelled=name == "cancelled")
                       for n, name in enumerate(names, start=1)]
        out.append(ls_task(task_id, data, annotations))
    return out


def ls_task(task_id: int, data: dict, annotations: list[dict], drafts: list[dict] | None = None) -> dict:
    """One exported task."""
    return {"id": task_id, "annotations": annotations, "file_upload": "tasks.json", "drafts": drafts or [],
            "predictions": [], "data": data, "meta": {}, "created_at": "2026-12-01T09:00:00.000000Z",
            "updated_at": "2026-12-01T10:00:00.000000Z", "allow_skip": True, "inner_id": task_id,
            "total_annotations": sum(not a["was_cancelled"] for a in annotations),
            "cancelled_annotations": sum(bool(a["was_cancelled"]) for a in annotations),
            "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
            "last_comment_updated_at": None, "project": 1, "updated_by": None, "comment_authors": []}


def served_file(url: str, document_root: Path, storage_paths: list[Path]) -> Path | None:
    """The file Label Studio 1.23 serves for an image ``url``, or None where it answers 404 or 403.

    Its rules (``io_storages/localfiles``): the URL is ``/data/local-files/?d=<path>``; the path is normalised,
    stripped of a leading ``/`` and joined to ``LOCAL_FILES_DOCUMENT_ROOT``, refusing what leaves the root; the
    folder holding the file must start with the path of a Local Files storage of the project; a storage path must
    be an existing folder inside the root and not the root itself.
    """
    import os
    import posixpath
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.path != "/data/local-files/" or "d" not in parse_qs(parts.query):
        return None
    root = os.path.realpath(document_root)
    for storage in storage_paths:  # what Label Studio checks when the storage is added
        storage = os.path.realpath(storage)
        assert storage != root, "Label Studio refuses a storage at the document root itself"
        assert storage.startswith(root + os.sep) and os.path.isdir(storage), "a storage must be a folder under the root"
    relative = posixpath.normpath(parse_qs(parts.query)["d"][0]).lstrip("/")
    full = os.path.realpath(os.path.join(root, relative))
    if not full.startswith(root + os.sep):
        return None  # safe_join refuses it
    folder = os.path.normpath(os.path.dirname(full))
    if not any(folder.startswith(os.path.normpath(os.path.realpath(s))) for s in storage_paths):
        return None
    return Path(full) if os.path.isfile(full) else None
