"""Label Studio as an oracle: pending requests out as Label Studio tasks, its JSON export back in.

For sites whose people already label in Label Studio (the README's "Label Studio" section has every step)::

    fedal exchange export --format label-studio --state-dir S --client-id 0 --data-path site-0.npz \
        --folder R/site-0 --document-root R
    # Label Studio, started with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and
    #   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=R: a project with R/site-0/label_config.xml, a Local Files
    #   source storage at R/site-0/images (not synced), import R/site-0/tasks.json, label, Export -> JSON
    fedal exchange import --state-dir S --client-id 0 --data-path site-0.npz --json export.json

``tasks.json`` is Label Studio's task import format (a list of ``{"data": {...}}``). Each image is a local
file named for its site, round and sample (``site-0-round-3-sample-17.png``) and referenced relative to
the document root Label Studio serves (``/data/local-files/?d=site-0/images/...``), so no image leaves the
machine and several sites can share one Label Studio (Label Studio itself reports its errors to its makers'
Sentry unless started with ``SENTRY_DSN=`` and ``FRONTEND_SENTRY_DSN=`` empty: the README's steps do). Each
task carries its ``site``, ``request_id``, ``sample_id`` and ``round``.

The import reads, for each request, the submitted annotations (not cancelled; drafts are not
submitted). Annotations that disagree are settled by ``disagreement``: ``"ground-truth"`` (default) takes
the class of the annotation marked ground truth in Label Studio and refuses a disagreement without one;
``"majority"`` takes the ground truth, else the class most annotators chose (a tie is refused);
``"refuse"`` refuses every disagreement. A class that differs from the one recorded from an earlier
Label Studio answer is a correction: ``corrections="update"`` (default) changes the label and keeps the
old one in :meth:`fedal.pool.Pool.label_history`; ``"skip"`` reports it and records nothing for it.
Who gave each label (``completed_by``), when (``updated_at``) and Label Studio's task and annotation ids
are kept in :meth:`fedal.pool.Pool.label_origins`.

What the export cannot mean is refused, all or nothing, with one line per problem: a malformed file,
a class or control that is not fedal's, a request of another site or database, a disagreement left
unsettled, and tasks fedal did not create (a synced storage adds them) unless ``skip_foreign``. What
is only out of date is reported and skipped without blocking the rest: an annotation of a request that
expired meanwhile, a skipped correction, or a label first given elsewhere (the labeling page, a CSV)
that Label Studio contradicts.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from clients.exchange import IMAGES_DIR, MAX_LISTED_PROBLEMS, ExchangeError, request_problem
from clients.images import sample_png
from fedal.data import LocalData
from fedal.exceptions import InvalidLabelError
from fedal.fileio import atomic_write
from fedal.pool import PENDING, Pool

TASKS_JSON, NEW_TASKS_JSON, LABEL_CONFIG = "tasks.json", "new-tasks.json", "label_config.xml"
LAST_EXPORTED_KEY = "label_studio_last_exported_request"  # pool meta: new-tasks.json holds the requests after it
FROM_NAME = "label"  # the Choices control of label_config.xml
LOCAL_FILES_URL = "/data/local-files/?d="
DISAGREEMENT_RULES = ("ground-truth", "majority", "refuse")
CORRECTION_RULES = ("update", "skip")
SOURCE_PREFIX = "label-studio:"
REFERENCE_PREFIX = "Label Studio export "  # how this module's label origins begin


def label_config(data: LocalData) -> str:
    """The Label Studio labeling configuration of a site: its image (or feature text) and one choice per class."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in data.class_names)
    view = ('  <Image name="image" value="$image" zoom="true" zoomControl="true"/>' if data.kind == "image"
            else '  <Text name="image" value="$features"/>')
    return (f"<View>\n{view}\n  <Choices name=\"{FROM_NAME}\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n"
            f"{choices}\n  </Choices>\n</View>\n")


@dataclass(frozen=True)
class TaskExport:
    """What :func:`export_tasks` wrote and the Label Studio set-up that serves it.

    ``tasks`` (``tasks.json``: every pending request, for a new project), ``new_tasks`` (``new-tasks.json``:
    the pending requests no earlier export wrote, for the project that holds those), ``config``
    (``label_config.xml``), ``n_tasks``, ``n_new``; for image sites
    ``document_root`` (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``) and ``storage_path`` (the Local Files
    storage to add to the project), else None.
    """

    tasks: Path
    new_tasks: Path
    config: Path
    n_tasks: int
    n_new: int
    document_root: Path | None
    storage_path: Path | None


def image_name(client_id: int, round: int | None, sample_id: int) -> str:
    """The file name of a request's image: unique per site, round and sample (sites may share a folder)."""
    return f"site-{client_id}-{'' if round is None else f'round-{round}-'}sample-{sample_id}.png"


def local_files_url(file: Path, document_root: Path) -> str:
    """The URL Label Studio serves ``file`` at: its path relative to the document root, URL-quoted."""
    return LOCAL_FILES_URL + quote(file.relative_to(document_root).as_posix(), safe="/")


def export_tasks(pool: Pool, data: LocalData, folder: str | os.PathLike, *,
                 document_root: str | os.PathLike | None = None) -> TaskExport:
    """Write the pending requests as Label Studio tasks: ``tasks.json``, ``label_config.xml`` and the PNGs.

    Images of answered requests stay (reviewers correct labels in Label Studio); images of requests that
    went back to the pool are removed.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    data : LocalData
        The client's data.
    folder : path
        Output folder (created); the images go to ``<folder>/images``.
    document_root : path, optional
        The folder Label Studio serves local files from (its ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``):
        ``folder`` or a folder above it. Default ``folder``.

    Raises
    ------
    ExchangeError
        If ``folder`` is not inside ``document_root``.
    """
    folder = Path(folder).expanduser().resolve()
    root = folder if document_root is None else Path(document_root).expanduser().resolve()
    images = folder / IMAGES_DIR
    is_image = data.kind == "image"
    if is_image:
        if document_root is not None and not root.is_dir():
            raise ExchangeError(f"the document root {root} is not a folder; name the folder Label Studio serves "
                                "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
        if not folder.is_relative_to(root):
            raise ExchangeError(f"the export folder {folder} is not inside the document root {root}: Label Studio "
                                "serves only files under its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; export into a "
                                "folder under it, or name the root it is started with")
    (images if is_image else folder).mkdir(parents=True, exist_ok=True)
    exported_before = int(pool.get_meta(LAST_EXPORTED_KEY, "0"))
    tasks, keep = [], set()
    for req in pool.requests():
        sid, status = int(req["sample_id"]), req["status"]
        name = image_name(data.client_id, req["round"], sid)
        if status == "answered":
            keep.add(name)
        if status != PENDING:
            continue
        item = {"site": data.client_id, "request_id": int(req["request_id"]), "sample_id": sid,
                "round": req["round"]}
        if is_image:
            keep.add(name)
            if not (images / name).exists():
                atomic_write(images / name, sample_png(data, sid))
            item["image"] = local_files_url(images / name, root)
        else:
            item["features"] = ", ".join(f"{v:.6g}" for v in data.X_pool[sid])
        tasks.append({"data": item})
    for stale in images.glob(f"site-{data.client_id}-*.png") if is_image else ():
        if stale.name not in keep:
            stale.unlink()
    config = atomic_write(folder / LABEL_CONFIG, label_config(data))
    path = atomic_write(folder / TASKS_JSON, json.dumps(tasks, indent=1))
    new = [t for t in tasks if t["data"]["request_id"] > exported_before]
    new_path = atomic_write(folder / NEW_TASKS_JSON, json.dumps(new, indent=1))
    if tasks:
        pool.set_meta(LAST_EXPORTED_KEY, max(exported_before, max(t["data"]["request_id"] for t in tasks)))
    return TaskExport(path, new_path, config, len(tasks), len(new), root if is_image else None,
                      images if is_image else None)


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


@dataclass(frozen=True)
class Annotation:
    """One submitted annotation of a task, as fedal reads it."""

    choice: str | None       # the class name chosen; None when nothing was chosen
    given_by: str             # Label Studio's completed_by, as a name ("user 3" or an e-mail)
    changed_by: str           # who saved it last (updated_by), the corrector of a reviewed annotation
    ground_truth: bool
    reference: str            # "task 12, annotation 1203"
    given_at: str | None      # updated_at (else created_at), as Label Studio wrote it


@dataclass
class LabelStudioImport:
    """What an import did.

    ``recorded`` new labels; ``corrected`` labels changed (history kept); ``unanswered`` requests of the
    export without a submitted annotation; ``repeated`` answers already recorded; ``foreign`` tasks fedal
    did not create, skipped; ``skipped`` one line per annotation reported and not recorded; ``changes``
    one line per correction; ``pending`` requests still pending in the client's ledger afterwards, of which
    ``not_in_export`` have no task in this export (drafts and untouched tasks are not exported by default).
    """

    recorded: int = 0
    corrected: int = 0
    unanswered: int = 0
    repeated: int = 0
    foreign: int = 0
    skipped: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    pending: int = 0
    not_in_export: int = 0


def _person(value: object) -> str | None:
    """A Label Studio user (``completed_by``, ``updated_by``: an id, or an object with id and e-mail) as a name."""
    if isinstance(value, dict):
        full = " ".join(str(value.get(k) or "").strip() for k in ("first_name", "last_name")).strip()
        return str(value.get("email") or full or (f"user {value['id']}" if "id" in value else "")) or None
    if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip():
        return f"user {value}" if _int_field(value) is not None else str(value)
    return None


def _task_name(task: dict, position: int) -> str:
    task_id = task.get("id")
    return (f"task {task_id}" if isinstance(task_id, int) and not isinstance(task_id, bool)
            else f"the task at position {position}")


def _annotations(task: dict, name: str) -> list[Annotation]:
    """The submitted (not cancelled) annotations of a task, or _Malformed."""
    out = []
    for n, item in enumerate(_items(task, "annotations", f"{name}: "), start=1):
        where = f"{name}, annotation {item.get('id', n) if isinstance(item, dict) else n}"
        if not isinstance(item, dict):
            raise _Malformed(f"{name}: annotation {n} is a {_kind(item)}, not an object")
        if _flag(item, "was_cancelled", where):
            continue
        picks = list(dict.fromkeys(_picks(item, where)))
        if len(picks) > 1:
            raise _Malformed(f"{where}: one annotation chose {picks}; fedal's control takes one class per task "
                             '(choice="single" in its label_config.xml)')
        given_by = _person(item.get("completed_by")) or "an unknown annotator"
        out.append(Annotation(picks[0] if picks else None, given_by, _person(item.get("updated_by")) or given_by,
                              _flag(item, "ground_truth", where), where,
                              str(item.get("updated_at") or item.get("created_at") or "") or None))
    return out


def _settle(annotations: list[Annotation], rule: str, name: str) -> tuple[list[Annotation], str | None]:
    """``(the annotations giving the task's class, problem)``; no annotations when nothing was chosen."""
    chosen = [a for a in annotations if a.choice is not None]
    classes = Counter(a.choice for a in chosen)
    if len(classes) <= 1:
        return chosen, None
    listed = ", ".join(f"{a.given_by}: {a.choice!r}" for a in chosen)
    truths = {a.choice for a in chosen if a.ground_truth}
    if rule != "refuse" and len(truths) == 1:
        truth = truths.pop()
        return [a for a in chosen if a.ground_truth and a.choice == truth], None
    if rule == "majority" and len(truths) == 0:
        (top, n), (_, second) = classes.most_common(2)
        if n > second:
            return [a for a in chosen if a.choice == top], None
    why = ("several annotations marked ground truth disagree" if len(truths) > 1 else
           "a tie and no annotation is marked ground truth" if rule == "majority" else
           "no annotation is marked ground truth" if rule == "ground-truth" else "disagreement is refused")
    if rule == "refuse":  # ground truth settles nothing under this rule
        fix = ("settle on one class in Label Studio (change or delete the annotations that disagree), or import with "
               "--disagreement ground-truth (the annotation marked ground truth decides) or --disagreement majority")
    else:
        fix = ("mark one annotation as ground truth in Label Studio, or settle on one class"
               + ("" if rule == "majority" else ", or import with --disagreement majority"))
    return [], f"{name}: annotators chose {sorted(classes)} ({listed}); {why}: {fix}"


def _int_field(value: object) -> int | None:
    """An id fedal wrote (an integer, or a string of plain ASCII digits 0-9), else None: ``str.isdigit`` and ``int``
    also take superscripts, other scripts' digits ("١" is 1) and signs, none of which fedal writes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip(), flags=re.ASCII):
        return int(value.strip())
    return None


def _timestamp(text: str | None) -> datetime | None:
    """Label Studio's ``updated_at`` / ``created_at`` (ISO 8601, e.g. ``2026-12-01T10:00:00.123456Z``) as an aware
    datetime (UTC when it names no zone); None when absent; :class:`ValueError` when it is not a timestamp."""
    if text is None or not str(text).strip():
        return None
    when = datetime.fromisoformat(str(text).strip())
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _is_timestamp(text: str | None) -> bool:
    """Whether ``text`` is absent or a timestamp :func:`_timestamp` reads."""
    try:
        _timestamp(text)
    except ValueError:
        return False
    return True


def _stored_timestamp(text: str | None) -> datetime | None:
    """A ``given_at`` fedal stored earlier, or None where it is absent or cannot be read (then no order is known)."""
    try:
        return _timestamp(text)
    except ValueError:
        return None


def import_export(pool: Pool, data: LocalData, json_path: str | os.PathLike, *,
                  disagreement: str = "ground-truth", corrections: str = "update", skip_foreign: bool = False,
                  source: str | None = None) -> LabelStudioImport:
    """Record the annotations of a Label Studio JSON export: every new label and correction, or none.

    Parameters
    ----------
    pool : Pool
        The client's pool.
    data : LocalData
        The client's data (class names: Label Studio answers with them).
    json_path : path
        Label Studio's export (Export -> JSON): a list of tasks with ``data`` and ``annotations``.
    disagreement : {"ground-truth", "majority", "refuse"}
        How annotations that disagree on a task are settled (see the module docstring).
    corrections : {"update", "skip"}
        What a class that differs from an earlier Label Studio answer does: change the label (its history
        kept) or be reported and skipped.
    skip_foreign : bool
        Skip tasks fedal did not create (no ``request_id``, e.g. added by a storage sync) instead of refusing.
    source : str, optional
        Stored with every label instead of ``"label-studio:<annotator>"`` (the annotator is kept in the
        label's origin either way).

    Raises
    ------
    ExchangeError
        Listing every problem; nothing was recorded.
    """
    if disagreement not in DISAGREEMENT_RULES:
        raise ExchangeError(f"disagreement must be one of {DISAGREEMENT_RULES}, got {disagreement!r}")
    if corrections not in CORRECTION_RULES:
        raise ExchangeError(f"corrections must be one of {CORRECTION_RULES}, got {corrections!r}")
    path = Path(json_path)
    tasks = _read_export(path)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise ExchangeError(f"{path} is not a Label Studio JSON export: expected a list of tasks with 'data' "
                            "(Export -> JSON, not JSON-MIN or CSV)")
    out, problems = LabelStudioImport(), []
    by_request: dict[int, tuple[int, str, list[Annotation]]] = {}  # request -> (sample, task names, annotations)
    for position, task in enumerate(tasks, start=1):
        name, item = _task_name(task, position), task["data"]
        if item.get("request_id") in (None, "") and item.get("sample_id") in (None, ""):
            if skip_foreign:
                out.foreign += 1
            else:
                problems.append(f"{name} was not created by fedal: its data {sorted(item)} has no request_id "
                                "(a synced storage adds such tasks); delete it in Label Studio and do not sync the "
                                "storage, or import the rest with --skip-foreign-tasks")
            continue
        request_id, sample_id = _int_field(item.get("request_id")), _int_field(item.get("sample_id"))
        if request_id is None or sample_id is None:
            bad = "request_id" if request_id is None else "sample_id"
            problems.append(f"{name}: {bad} {item.get(bad)!r} is not an integer; do not edit the task data")
            continue
        if "site" in item and _int_field(item["site"]) != data.client_id:
            problems.append(f"{name} was exported for site {item['site']!r}, not site {data.client_id}; import it "
                            "with that site's --client-id, --state-dir and --data-path")
            continue
        try:
            annotations = _annotations(task, name)
        except _Malformed as exc:
            problems.append(str(exc) if "label_config.xml" in str(exc) or "Export -> JSON" in str(exc)
                            else f"{exc} (not what Label Studio's Export -> JSON writes)")
            continue
        if request_id in by_request:  # tasks.json imported twice: the same request in two tasks
            first_sample, names, earlier = by_request[request_id]
            if first_sample != sample_id:
                problems.append(f"{name}: request {request_id} is on {names} with sample {first_sample}, here with "
                                f"{sample_id}; do not edit the task data")
                continue
            by_request[request_id] = (sample_id, f"{names} and {name}", earlier + annotations)
        else:
            by_request[request_id] = (sample_id, name, annotations)
    requests = {int(r["request_id"]): r for r in pool.requests()}
    labels = {r["id"]: r for r in pool.label_records()}
    index = {n: i for i, n in enumerate(data.class_names)}
    answers: dict[str, dict[int, int]] = {}  # source -> {sample: class}
    rounds, changes, origins = {}, [], []
    for request_id, (sample_id, name, annotations) in by_request.items():
        problem = request_problem(requests, request_id, sample_id, "the project made", "the task data")
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        req = requests[request_id]
        giving, problem = _settle(annotations, disagreement, name)
        if problem:
            problems.append(problem)
            continue
        if not giving:
            out.unanswered += req["status"] == PENDING
            continue
        text = giving[0].choice
        if text not in index:
            problems.append(f"{name}: class {text!r} is not one of this site's classes {list(data.class_names)}; "
                            f"use the {LABEL_CONFIG} fedal wrote")
            continue
        label, who = index[text], ", ".join(dict.fromkeys(a.given_by for a in giving))
        label_source = source or SOURCE_PREFIX + who
        unreadable = [a for a in giving if not _is_timestamp(a.given_at)]
        if unreadable:  # stored, it would be compared with every later answer's time: refused, this task only
            bad = unreadable[0]
            out.skipped.append(f"{bad.reference}: its updated_at (else created_at) {bad.given_at!r} is not a timestamp (Label Studio "
                               "writes ISO 8601, e.g. 2026-12-01T10:00:00.000000Z): not recorded; export again from "
                               "Label Studio without editing the file")
            continue
        saved = [(_timestamp(a.given_at), a.given_at) for a in giving if _timestamp(a.given_at) is not None]
        given_at, given_str = max(saved, key=lambda t: t[0]) if saved else (None, None)  # the newest of them
        origin = {"sample_id": sample_id, "label": label, "given_by": who, "given_at": given_str,
                  "reference": f"{REFERENCE_PREFIX}{path.name}: {'; '.join(a.reference for a in giving)}"}
        status = req["status"]
        if status == PENDING:
            answers.setdefault(label_source, {})[sample_id] = label
            rounds[sample_id] = req["round"]
            origins.append({**origin, "source": label_source})
            continue
        if status != "answered":
            out.skipped.append(f"{name}: request {request_id} was {status} ({req['note'] or 'closed'}) before it was "
                               "annotated and its sample went back to the pool; not recorded (delete the task in "
                               "Label Studio)")
            continue
        current = labels.get(sample_id)
        if current is None or current["label"] == label:
            out.repeated += 1
            continue
        before, before_at = _last_label_studio_answer(pool, current)
        if before == label:  # Label Studio says what it said before; someone changed the label in fedal since
            out.repeated += 1
            continue
        was = f"class {current['label']} ({data.class_names[current['label']]!r})"
        if before is None:
            out.skipped.append(f"{name}: request {request_id} was answered {was} by {current['source']}, not in "
                               f"Label Studio, which says {text!r}: kept {was}; change it on the labeling page if "
                               "Label Studio is right")
            continue
        recorded_at = _stored_timestamp(before_at)
        if recorded_at is not None and given_at is not None and given_at < recorded_at:
            out.skipped.append(f"{name}: this export's annotation of request {request_id} ({text!r}, saved "
                               f"{origin['given_at']}) is older than the one recorded (saved {before_at}): not changed; "
                               "import the newest export")
            continue
        if corrections == "skip":
            out.skipped.append(f"{name}: Label Studio now says {text!r} for request {request_id}, recorded as {was}: "
                               "not changed (--corrections skip); import with --corrections update to apply it")
            continue
        by = source or SOURCE_PREFIX + ", ".join(dict.fromkeys(a.changed_by for a in giving))
        changes.append((sample_id, label, by))
        origins.append({**origin, "source": by})
        out.changes.append(f"{name}: request {request_id} (sample {sample_id}) changed from {was} to class {label} "
                           f"({text!r}) by {by.removeprefix(SOURCE_PREFIX)}")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise ExchangeError(f"{path}: {len(problems)} problem(s), nothing was recorded; fix them and import again:\n  "
                            f"{listed}{more}")
    try:
        with pool.transaction():
            for label_source, given in answers.items():
                out.recorded += pool.answer(given, source=label_source, round=rounds)
            for sample_id, label, by in changes:
                pool.change_label(sample_id, label, source=by)
            pool.add_label_origins(origins)
    except InvalidLabelError as exc:  # the pool has fewer classes than the data file names: a wrong data path
        raise ExchangeError(f"{path}: {exc}; nothing was recorded") from None
    out.corrected = len(changes)
    pending = {int(r["request_id"]) for r in pool.requests(PENDING)}
    out.pending, out.not_in_export = len(pending), len(pending - set(by_request))
    return out


def _last_label_studio_answer(pool: Pool, current: dict) -> tuple[int | None, str | None]:
    """``(class, saved at)`` Label Studio last gave this sample; None if its label came from elsewhere."""
    given = [o for o in pool.label_origins(current["id"]) if o["reference"].startswith(REFERENCE_PREFIX)]
    if given:
        return int(given[-1]["label"]), given[-1]["given_at"]
    if not str(current["source"]).startswith(SOURCE_PREFIX):  # recorded before fedal kept origins
        return None, None
    history = pool.label_history(current["id"])
    return (int(history[0]["before"]) if history else int(current["label"])), None
