"""Label Studio: pending requests out as tasks, its JSON export back in, and every way that export can go wrong."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from labelstudio_helpers import annotation, label_studio_export, ls_task, served_file

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
    tasks = export_tasks(pool, data, tmp_path / "ls").tasks
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


# ------------------------------------------------------------ a team's Label Studio (issue 25)
def test_images_resolve_under_a_shared_document_root_by_label_studio_rules(tmp_path):
    """Two sites export under one document root; every image URL is served by Label Studio's own rules."""
    root = tmp_path / "label studio files"  # a space: the URLs are quoted
    root.mkdir()
    served = {}
    for client_id in (0, 1):
        data = image_site()
        data.client_id = client_id
        with Pool(data.n_classes, size=12, path=tmp_path / f"c{client_id}.db") as pool:
            pool.request([3, 5], round=2)
            pool.request([1], round=3)
            out = export_tasks(pool, data, root / f"site-{client_id}", document_root=root)
            assert out.document_root == root.resolve() and out.storage_path == (root / f"site-{client_id}" / "images").resolve()
            for task in json.loads(out.tasks.read_text()):
                file = served_file(task["data"]["image"], root, [out.storage_path])
                assert file is not None, task["data"]["image"]
                assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                served[task["data"]["image"]] = (client_id, task["data"]["sample_id"], file.name)
    assert len(served) == 6 and len({name for _, _, name in served.values()}) == 6  # unique across sites
    assert sorted(name for c, _, name in served.values() if c == 1) == [
        "site-1-round-2-sample-3.png", "site-1-round-2-sample-5.png", "site-1-round-3-sample-1.png"]
    # without the storage Label Studio answers 404, and with the root at the export folder's parent (the old
    # URLs, relative to the export folder) too
    url = next(iter(served))
    assert served_file(url, root, []) is None
    assert served_file(url.replace("site-0/", ""), root, [root / "site-0" / "images"]) is None


def test_the_export_folder_must_be_under_the_document_root(tmp_path):
    data = image_site()
    (tmp_path / "b").mkdir()
    with Pool(data.n_classes, size=12) as pool:
        pool.request([3])
        with pytest.raises(ExchangeError, match="is not inside the document root"):
            export_tasks(pool, data, tmp_path / "a", document_root=tmp_path / "b")
        out = export_tasks(pool, data, tmp_path / "a")  # default: the folder is the root
        assert json.loads(out.tasks.read_text())[0]["data"]["image"] == "/data/local-files/?d=images/site-0-sample-3.png"
        assert served_file(json.loads(out.tasks.read_text())[0]["data"]["image"], tmp_path / "a", [out.storage_path])


def test_images_of_answered_requests_stay_for_reviewers(site, tmp_path):
    pool, data, tasks = site
    images = tmp_path / "ls" / "images"
    pool.answer({3: 1}, source="web:ana")
    pool.release([5], status="expired")
    export_tasks(pool, data, tmp_path / "ls")
    assert sorted(p.name for p in images.iterdir()) == [
        "site-0-round-2-sample-3.png", "site-0-round-2-sample-7.png", "site-0-round-3-sample-1.png"]
    assert [t["data"]["sample_id"] for t in json.loads(tasks.read_text())] == [7, 1]


def corrected(tasks, sample: int, first: str, then: str, **kw) -> tuple[list, list]:
    """Two exports of the same project: ``sample`` annotated ``first``, then its annotation edited to ``then``."""
    rid = request_of(tasks, sample)
    before = label_studio_export(tasks, {rid: first}, **kw)
    after = json.loads(json.dumps(before))
    task = next(t for t in after if t["data"]["request_id"] == rid)
    task["annotations"][0]["result"][0]["value"]["choices"] = [then]
    task["annotations"][0].update(updated_by=7, updated_at="2026-12-02T08:00:00.000000Z")
    return before, after


def test_a_correction_in_label_studio_updates_the_label_with_its_history(site, tmp_path):
    pool, data, tasks = site
    before, after = corrected(tasks, 7, "class 1", "class 3")
    assert import_export(pool, data, write(tmp_path, before)).recorded == 1
    result = import_export(pool, data, write(tmp_path, after))
    assert (result.recorded, result.corrected, result.repeated) == (0, 1, 0)
    assert "changed from class 1 ('class 1') to class 3 ('class 3') by user 7" in result.changes[0]
    record = {r["id"]: r for r in pool.label_records()}[7]
    assert (record["label"], record["source"]) == (3, "label-studio:user 1")  # who gave it first stays
    change, = pool.label_history(7)
    assert (change["before"], change["label"], change["given_by"], change["by"]) == (
        1, 3, "label-studio:user 1", "label-studio:user 7")
    assert [o["label"] for o in pool.label_origins(7)] == [1, 3]
    again = import_export(pool, data, write(tmp_path, after))  # each later export holds the correction again
    assert (again.corrected, again.repeated) == (0, 1)


def test_corrections_skip_reports_without_blocking_the_rest(site, tmp_path):
    pool, data, tasks = site
    before, after = corrected(tasks, 7, "class 1", "class 3")
    import_export(pool, data, write(tmp_path, before))
    after[0]["annotations"] = [annotation("class 2", annotation_id=900, task_id=after[0]["id"])]  # sample 3: new
    result = import_export(pool, data, write(tmp_path, after), corrections="skip")
    assert (result.recorded, result.corrected) == (1, 0)
    assert "not changed (--corrections skip)" in result.skipped[0]
    assert {r["id"]: r["label"] for r in pool.label_records()} == {3: 2, 7: 1}


def test_a_change_made_in_fedal_is_not_reverted_by_the_next_export(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 7): "class 1"})
    import_export(pool, data, write(tmp_path, export))
    pool.change_label(7, 2, source="web:ana")  # corrected on the labeling page
    result = import_export(pool, data, write(tmp_path, export))
    assert (result.corrected, result.repeated) == (0, 1)
    assert pool.labels()[1].tolist() == [2]


def test_a_label_given_elsewhere_is_kept_and_the_contradiction_reported(site, tmp_path):
    pool, data, tasks = site
    pool.answer({7: 0}, source="web:ana")
    result = import_export(pool, data, write(tmp_path, label_studio_export(tasks, {request_of(tasks, 7): "class 1",
                                                                                   request_of(tasks, 3): "class 2"})))
    assert result.recorded == 1 and "answered class 0 ('class 0') by web:ana, not in Label Studio" in result.skipped[0]
    assert {r["id"]: r["label"] for r in pool.label_records()} == {3: 2, 7: 0}


def disagreeing(tasks, sample: int, names: list[str], truth: int | None = None) -> list[dict]:
    export = label_studio_export(tasks, {request_of(tasks, sample): names})
    for task in export:
        for n, ann in enumerate(task["annotations"]):
            ann["ground_truth"] = n == truth
    return export


@pytest.mark.parametrize("names, truth, rule, expected", [
    (["class 1", "class 2"], 1, "ground-truth", 2),
    (["class 1", "class 2"], 1, "majority", 2),
    (["class 1", "class 2", "class 2"], None, "majority", 2),
    (["class 1", "class 1", "class 2"], 2, "majority", 2),  # a ground truth outweighs a majority
    (["class 1", "class 2"], None, "ground-truth", "no annotation is marked ground truth"),
    (["class 1", "class 2"], None, "majority", "a tie and no annotation is marked ground truth"),
    (["class 1", "class 2"], 1, "refuse", "disagreement is refused"),
    (["class 2", "class 2"], None, "refuse", 2),
])
def test_disagreement_rules(site, tmp_path, names, truth, rule, expected):
    pool, data, tasks = site
    path = write(tmp_path, disagreeing(tasks, 5, names, truth))
    if isinstance(expected, str):
        with pytest.raises(ExchangeError, match=re.escape(expected)):
            import_export(pool, data, path, disagreement=rule)
        assert pool.counts()["labeled"] == 0
    else:
        import_export(pool, data, path, disagreement=rule)
        assert {r["id"]: r["label"] for r in pool.label_records()} == {5: expected}


def test_two_ground_truths_that_disagree_are_refused(site, tmp_path):
    pool, data, tasks = site
    export = disagreeing(tasks, 5, ["class 1", "class 2"])
    for ann in export[1]["annotations"]:
        ann["ground_truth"] = "true"
    with pytest.raises(ExchangeError, match="several annotations marked ground truth disagree"):
        import_export(pool, data, write(tmp_path, export), disagreement="majority")


def test_who_labeled_and_when_are_kept(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): ["class 2", "class 2"], request_of(tasks, 1): "class 0"})
    export[3]["annotations"][0]["completed_by"] = {"id": 4, "email": "ana@hospital.example", "first_name": "Ana",
                                                   "last_name": ""}
    import_export(pool, data, write(tmp_path, export))
    records = {r["id"]: r["source"] for r in pool.label_records()}
    assert records == {3: "label-studio:user 1, user 2", 1: "label-studio:ana@hospital.example"}
    origin, = pool.label_origins(3)
    assert origin["given_by"] == "user 1, user 2" and origin["given_at"] == "2026-12-01T10:00:00.000000Z"
    assert origin["reference"] == "Label Studio export export.json: task 1, annotation 101; task 1, annotation 102"


def test_tasks_fedal_did_not_create_are_named_by_label_studio_id(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): "class 2"}, first_task_id=40)
    synced = ls_task(57, {"image": "/data/local-files/?d=images/site-0-round-2-sample-3.png"},
                     [annotation("class 1", annotation_id=5701, task_id=57)])
    export.insert(1, synced)
    path = write(tmp_path, export)
    with pytest.raises(ExchangeError, match=r"task 57 was not created by fedal: its data \['image'\] has no "
                                            r"request_id .*--skip-foreign-tasks"):
        import_export(pool, data, path)
    result = import_export(pool, data, path, skip_foreign=True)
    assert (result.recorded, result.foreign) == (1, 1)


def test_problems_name_label_studio_task_ids_not_positions(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 5): "class 9"}, first_task_id=40)
    with pytest.raises(ExchangeError, match="task 41: class 'class 9'"):
        import_export(pool, data, write(tmp_path, export))


def test_the_same_request_in_two_tasks_is_read_as_one(site, tmp_path):
    """tasks.json imported twice into the project: two tasks per request; their annotations count together."""
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): "class 2"})
    twice = export + label_studio_export(tasks, {request_of(tasks, 3): "class 2"}, first_task_id=5)
    assert import_export(pool, data, write(tmp_path, twice)).recorded == 1
    twice[4]["annotations"][0]["result"][0]["value"]["choices"] = ["class 1"]
    pool.reopen(3)
    with pytest.raises(ExchangeError, match=r"task 1 and task 5: annotators chose \['class 1', 'class 2'\]"):
        import_export(pool, data, write(tmp_path, twice))


def test_tasks_of_another_site_are_refused(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): "class 2"})
    export[0]["data"]["site"] = 1
    with pytest.raises(ExchangeError, match="task 1 was exported for site 1, not site 0"):
        import_export(pool, data, write(tmp_path, export))


def test_an_annotation_of_an_expired_request_is_reported_not_blocking(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 5): "class 1", request_of(tasks, 3): "class 2"})
    pool.release([5], status="expired", note="deadline passed")
    result = import_export(pool, data, write(tmp_path, export))
    assert result.recorded == 1 and "was expired (deadline passed) before it was annotated" in result.skipped[0]


def ls_round_trip_export(tasks) -> list[dict]:
    """A project as a team leaves it: sample 3 annotated twice with a ground truth, sample 5 corrected by a
    reviewer after the first import, sample 7 only a draft, sample 1 untouched (left out of the export), and an
    image-only task a storage sync added."""
    export = label_studio_export(tasks, {request_of(tasks, 3): ["class 1", "class 2"], request_of(tasks, 5): "class 0"},
                                 first_task_id=11)
    export[0]["annotations"][1]["ground_truth"] = True
    draft = ls_task(13, json.loads(tasks.read_text())[2]["data"], [],
                    drafts=[{"id": 3, "user": "ana@hospital.example", "result": [], "created_at": "2026-12-01T11:00:00Z"}])
    synced = ls_task(31, {"image": "/data/local-files/?d=images/site-0-round-2-sample-3.png"}, [])
    return [export[0], export[1], synced, draft]


def test_fedal_exchange_round_trip_as_a_team_runs_it(site, tmp_path, capsys):
    pool, data, tasks = site
    root = tmp_path / "root"
    root.mkdir()
    common = ["--state-dir", str(tmp_path / "state"), "--client-id", "0", "--data-path", str(tmp_path / "site-0.npz")]
    assert cli.main(["exchange", "export", *common, "--format", "label-studio", "--folder", str(root / "site-0"),
                     "--document-root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root.resolve()}" in printed
    assert f"absolute local path {(root / 'site-0' / 'images').resolve()}" in printed
    tasks = root / "site-0" / "tasks.json"
    export = ls_round_trip_export(tasks)
    path = write(tmp_path, export)
    assert fedal_import(tmp_path, "--json", str(path)) == 2
    assert "task 31 was not created by fedal" in capsys.readouterr().err
    assert fedal_import(tmp_path, "--json", str(path), "--skip-foreign-tasks") == 0
    out = capsys.readouterr().out
    assert "recorded 2 label(s), corrected 0; 0 already recorded; 1 exported task(s) without a submitted annotation" in out
    assert "2 request(s) still pending for this site, 1 of them not in this export" in out
    export[1]["annotations"][0]["result"][0]["value"]["choices"] = ["class 3"]  # a reviewer's correction
    export[1]["annotations"][0]["updated_by"] = 9
    assert fedal_import(tmp_path, "--json", str(write(tmp_path, export)), "--skip-foreign-tasks") == 0
    out = capsys.readouterr().out
    assert "recorded 0 label(s), corrected 1; 1 already recorded" in out
    assert "task 12: request 2 (sample 5) changed from class 0 ('class 0') to class 3 ('class 3') by user 9" in out
    assert {r["id"]: r["label"] for r in pool.label_records()} == {3: 2, 5: 3}


def test_a_label_studio_csv_given_to_csv_is_named(site, tmp_path, capsys):
    path = tmp_path / "project-1.csv"
    path.write_text("annotation_id,annotator,created_at,id,image,label,lead_time,request_id,round,sample_id,site,"
                    "updated_at\n101,1,2026-12-01,1,/data/x.png,class 2,4.2,1,2,3,0,2026-12-01\n")
    assert fedal_import(tmp_path, "--csv", str(path)) == 2
    err = capsys.readouterr().err
    assert "is a Label Studio CSV export" in err and "Export -> JSON, then import it with --json" in err


@pytest.mark.parametrize("action, flag", [("export", "--document-root"), ("import", "--disagreement")])
def test_each_exchange_subcommand_has_its_own_help(capsys, action, flag):
    with pytest.raises(SystemExit) as done:
        cli.main(["exchange", action, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fedal exchange {action}") and flag in out and "--state-dir" in out


def test_new_tasks_holds_only_what_no_earlier_export_wrote(site, tmp_path):
    pool, data, tasks = site  # the fixture exported requests 1-4
    pool.request([9], round=4)
    out = export_tasks(pool, data, tmp_path / "ls")
    assert [t["data"]["sample_id"] for t in json.loads(out.new_tasks.read_text())] == [9]
    assert out.n_tasks == 5 and out.n_new == 1
    assert json.loads(export_tasks(pool, data, tmp_path / "ls").new_tasks.read_text()) == []


def test_an_older_export_does_not_revert_a_correction(site, tmp_path):
    pool, data, tasks = site
    before, after = corrected(tasks, 7, "class 1", "class 3")
    import_export(pool, data, write(tmp_path, before))
    import_export(pool, data, write(tmp_path, after))
    result = import_export(pool, data, write(tmp_path, before))  # yesterday's file, imported by mistake
    assert result.corrected == 0 and "is older than the one recorded" in result.skipped[0]
    assert pool.labels()[1].tolist() == [3]


def test_the_readme_label_studio_section_names_only_flags_that_exist(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Label Studio at a site"):readme.index("## Active learning on one device")]
    helps = ""
    for action in ("export", "import"):
        with pytest.raises(SystemExit):
            cli.main(["exchange", action, "--help"])
        helps += capsys.readouterr().out
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section)) - {"--no-browser", "--internal-host", "--port"}
    assert flags and {f for f in flags if f not in helps} == set()
    for line in ("recorded 2 label(s), corrected 0", "absolute local path", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="):
        assert line in section


# ------------------------------------------------------------------ issue 32, item 4
@pytest.mark.parametrize("bad", ["--1", "+-1", "¹", "١", "-1", " 1 2", "0x3"])
@pytest.mark.parametrize("field", ["request_id", "sample_id"])
def test_ids_that_are_not_plain_ascii_digits_are_refused_for_their_task(site, tmp_path, bad, field):
    """`str.isdigit` and `int` took "¹" (and crashed on it), signs ("--1" crashed) and other scripts' digits ("١" was
    read as 1); fedal writes plain ASCII digits, so anything else is the task data edited."""
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): "class 2", request_of(tasks, 5): "class 1"})
    export[0]["data"][field] = bad
    with pytest.raises(ExchangeError, match=re.escape(f"task 1: {field} {bad!r} is not an integer")) as refused:
        import_export(pool, data, write(tmp_path, export))
    assert "1 problem(s), nothing was recorded" in str(refused.value)
    assert pool.counts()["labeled"] == 0


def test_an_updated_at_that_is_not_a_timestamp_is_refused_for_its_task_only(site, tmp_path):
    pool, data, tasks = site
    export = label_studio_export(tasks, {request_of(tasks, 3): "class 2", request_of(tasks, 5): "class 1"})
    export[0]["annotations"][0]["updated_at"] = "yesterday"
    result = import_export(pool, data, write(tmp_path, export))
    assert result.recorded == 1 and {r["id"]: r["label"] for r in pool.label_records()} == {5: 1}
    assert "task 1, annotation 101: its updated_at (else created_at) 'yesterday' is not a timestamp" in result.skipped[0]
    assert 3 in pool.pending_ids().tolist()


def test_a_stored_time_that_cannot_be_read_or_another_zone_does_not_block_later_corrections(site, tmp_path):
    """Times are compared as times, not as text: an unreadable one an earlier fedal stored orders nothing (it made
    every later correction "older"), and 07:30Z is later than 08:00+01:00."""
    pool, data, tasks = site
    before, after = corrected(tasks, 7, "class 1", "class 3")
    import_export(pool, data, write(tmp_path, before))
    with pool._tx() as db:  # as an earlier fedal stored it
        db.execute("UPDATE label_origins SET given_at = 'yesterday' WHERE sample_id = 7")
    assert import_export(pool, data, write(tmp_path, after)).corrected == 1
    with pool._tx() as db:
        db.execute("UPDATE label_origins SET given_at = '2026-12-02T08:00:00+01:00' WHERE sample_id = 7")
    after[2]["annotations"][0]["result"][0]["value"]["choices"] = ["class 0"]
    after[2]["annotations"][0]["updated_at"] = "2026-12-02T07:30:00Z"
    assert import_export(pool, data, write(tmp_path, after)).corrected == 1
    assert {r["id"]: r["label"] for r in pool.label_records()} == {7: 0}


def test_the_refuse_rule_advises_what_settles_a_disagreement_under_it(site, tmp_path):
    pool, data, tasks = site
    with pytest.raises(ExchangeError) as refused:
        import_export(pool, data, write(tmp_path, disagreeing(tasks, 5, ["class 1", "class 2"], 1)),
                      disagreement="refuse")
    message = str(refused.value)
    assert "disagreement is refused" in message and "ground truth in Label Studio" not in message
    assert "settle on one class in Label Studio" in message and "--disagreement ground-truth" in message
