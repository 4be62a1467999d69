"""Label Studio: pending requests out as tasks, its JSON export back in, and every way that export can go wrong."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from labelstudio_helpers import annotation, label_studio_export, ls_task

from clients.exchange import ExchangeError
from clients.labelstudio import export_tasks, import_export
from fedal.data import LocalData
from fedal.pool import Pool
from fedal.sitedata import save_site
from simulations import cli


def image_site(n: int = 12, n_classes: int = 4) -> LocalData:
    rng = np.random.default_rng(0)
    X = rng.random((n, 3, 28, 28), dtype=np.float32)
    return LocalData(0, X, np.full(n, -1), X[:2], np.zeros(2, np.int64), n_classes,
                     [f"class {c}" for c in range(n_classes)], "image")


@pytest.fixture
def site(tmp_path):
    """A pool with four pending requests (samples 3, 5, 7 in round 2; 1 in round 3) exported as tasks."""
    data = image_site()
    save_site(tmp_path / "site-0.npz", data, include_labels=False)
    pool = Pool(data.n_classes, size=len(data.y_pool), path=tmp_path / "state" / "client-0.db")
    pool.request([3, 5, 7], round=2)
    pool.request([1], round=3)
    tasks = export_tasks(pool, data, tmp_path / "ls")
    yield pool, data, tasks
    pool.close()


def request_of(tasks, sample_id: int) -> int:
    return next(t["data"]["request_id"] for t in json.loads(tasks.read_text()) if t["data"]["sample_id"] == sample_id)


def write(tmp_path, content) -> object:
    path = tmp_path / "export.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_label_studio_round_trip(site, tmp_path):
    pool, data, tasks = site
    exported = json.loads(tasks.read_text())
    assert [t["data"]["sample_id"] for t in exported] == [3, 5, 7, 1]
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    assert '<Choice value="class 2"/>' in config and 'name="label"' in config
    answers = {request_of(tasks, 3): "class 2", request_of(tasks, 1): "class 0",
               request_of(tasks, 5): "cancelled"}  # 7: not annotated yet
    path = write(tmp_path, label_studio_export(tasks, answers))
    result = import_export(pool, data, path)
    assert (result.recorded, result.unanswered, result.repeated) == (2, 2, 0)
    records = {r["id"]: r for r in pool.label_records()}
    assert records[3]["label"] == 2 and records[1]["label"] == 0
    assert sorted(pool.pending_ids().tolist()) == [5, 7]
    assert import_export(pool, data, path).repeated == 2  # the same export again records nothing new


@pytest.mark.parametrize("answers, message", [
    ({"first": "class 9"}, "class 'class 9' is not one of this site's classes"),
    ({"first": ["class 1", "class 2"]}, "annotators chose ['class 1', 'class 2']"),
])
def test_a_bad_label_studio_export_records_nothing(site, tmp_path, answers, message):
    pool, data, tasks = site
    first, second = (t["data"]["request_id"] for t in json.loads(tasks.read_text())[:2])
    path = write(tmp_path, label_studio_export(tasks, {first: answers["first"], second: "class 1"}))
    with pytest.raises(ExchangeError, match=re.escape(message)):
        import_export(pool, data, path)
    assert pool.counts()["labeled"] == 0  # all or nothing: the good task was not recorded either
    path.write_text('{"not": "a list"}')
    with pytest.raises(ExchangeError, match="expected a list of tasks"):
        import_export(pool, data, path)


# ------------------------------------------------ malformed exports (issue 21, items 5-7)
def one_task(tasks, **changes) -> list[dict]:
    """The export of the first task annotated "class 1", with ``changes`` made to its pieces."""
    export = label_studio_export(tasks, {json.loads(tasks.read_text())[0]["data"]["request_id"]: "class 1"})[:1]
    task = export[0]
    ann = task["annotations"][0]
    result = ann["result"][0]
    for key, value in changes.items():
        where, _, field = key.partition("__")
        {"task": task, "annotation": ann, "result": result, "value": result["value"]}[where][field] = value
    return export


MALFORMED = {  # what the file holds -> what the message must say
    "annotations is a dict": (dict(task__annotations={"id": 1}), "'annotations' is a dict, not a list"),
    "an annotation is a string": (dict(task__annotations=["class 1"]), "annotation 1 is a str, not an object"),
    "result is a dict": (dict(annotation__result={"type": "choices"}), "'result' is a dict, not a list"),
    "a result is a number": (dict(annotation__result=[3]), "result 1 is a int, not an object"),
    "value is a list": (dict(result__value=["class 1"]), "'value' is a list, not an object"),
    "value is null": (dict(result__value=None), "'value' is null, not an object"),
    "choices nested in a list": (dict(value__choices=[["class 1"]]), "'choices' must be a list of class names"),
    "choices holds an object": (dict(value__choices=[{}]), "'choices' must be a list of class names"),
    "choices is a string": (dict(value__choices="class 1"),
                            "'choices' is the string 'class 1', not a list of class names"),
    "data is a list": (dict(task__data=[1, 2]), "expected a list of tasks with 'data'"),
    "was_cancelled is a word": (dict(annotation__was_cancelled="maybe"), "'was_cancelled' is 'maybe'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_export_is_named_not_a_traceback(site, tmp_path, case):
    pool, data, tasks = site
    changes, message = MALFORMED[case]
    with pytest.raises(ExchangeError, match=re.escape(message)) as err:
        import_export(pool, data, write(tmp_path, one_task(tasks, **changes)))
    assert "Export -> JSON" in str(err.value) or "label_config.xml" in str(err.value) or "expected" in str(err.value)
    assert pool.counts()["labeled"] == 0


@pytest.mark.parametrize("content, message", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('[{"data": {"request_id": ' + "9" * 5000 + "}}]", "is not a Label Studio JSON export"),
    ("\udcff", "is not a Label Studio JSON export"),
])
def test_unreadable_json_is_named(site, tmp_path, content, message):
    pool, data, _ = site
    path = tmp_path / "export.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ExchangeError, match=message):
        import_export(pool, data, path)


def test_a_folder_or_missing_file_is_named(site, tmp_path):
    pool, data, _ = site
    with pytest.raises(ExchangeError, match="is a folder, not a file"):
        import_export(pool, data, tmp_path)
    with pytest.raises(ExchangeError, match="does not exist"):
        import_export(pool, data, tmp_path / "nothing.json")


def fedal_import(tmp_path, *extra) -> int:
    return cli.main(["exchange", "import", "--state-dir", str(tmp_path / "state"), "--client-id", "0",
                     "--data-path", str(tmp_path / "site-0.npz"), *extra])


@pytest.mark.parametrize("case", ["an annotation is a string", "value is null", "choices holds an object"])
def test_fedal_exchange_import_answers_rc_2_without_traceback(site, tmp_path, capsys, case):
    pool, data, tasks = site
    path = write(tmp_path, one_task(tasks, **MALFORMED[case][0]))
    assert fedal_import(tmp_path, "--json", str(path)) == 2
    err = capsys.readouterr().err
    assert MALFORMED[case][1] in err and "Traceback" not in err
    (tmp_path / "deep.json").write_text("[" * 200_000)
    assert fedal_import(tmp_path, "--json", str(tmp_path / "deep.json")) == 2
    assert fedal_import(tmp_path, "--json", str(tmp_path)) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    (dict(result__from_name="diagnosis"), "a result of control 'diagnosis' (type 'choices')"),
    (dict(result__type="labels"), "a result of control 'label' (type 'labels')"),
])
def test_an_unknown_control_is_refused_with_the_config_fedal_wrote(site, tmp_path, changes, message):
    pool, data, tasks = site
    with pytest.raises(ExchangeError, match=re.escape(message)) as err:
        import_export(pool, data, write(tmp_path, one_task(tasks, **changes)))
    assert '<Choices name="label" toName="image"' in str(err.value) and "label_config.xml" in str(err.value)
    assert pool.counts()["labeled"] == 0


def test_all_annotated_but_nothing_readable_is_refused(site, tmp_path):
    """Ten annotated tasks whose results fedal cannot read must not say "10 without annotation"."""
    pool, data, tasks = site
    export = label_studio_export(tasks, {t["data"]["request_id"]: "class 1" for t in json.loads(tasks.read_text())})
    for task in export:
        task["annotations"][0]["result"][0]["from_name"] = "choice"
    with pytest.raises(ExchangeError, match=r"4 problem\(s\)"):
        import_export(pool, data, write(tmp_path, export))


@pytest.mark.parametrize("flag, cancelled", [("false", False), ("False", False), (False, False), (0, False),
                                             ("true", True), (True, True), (1, True)])
def test_was_cancelled_as_a_string(site, tmp_path, flag, cancelled):
    pool, data, tasks = site
    result = import_export(pool, data, write(tmp_path, one_task(tasks, annotation__was_cancelled=flag)))
    assert (result.recorded, pool.counts()["labeled"]) == ((0, 0) if cancelled else (1, 1))
