"""The labeling page in headless Chromium: a person labels by clicking and by keyboard,
the answers are in the site database, and the next round trains on them.

Uses Debian's ``chromium`` (``.ci/install-system.sh``) driven by the ``playwright``
Python package; ``playwright install`` is never needed. Skipped when either is missing,
except under CI (``$CI`` set), where that is a failure.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from site_helpers import global_state, http, make_site, serving, site_config

from clients.labeling import open_labeling
from clients.node import NodeConfig
from clients.site import ClientSite
from fedal.messages import TrainInstruction

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, closed (with its processes) whatever happens."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed: pip install -e '.[dev]'")
    if not shutil.which(CHROMIUM):
        _missing(f"{CHROMIUM} is missing: run .ci/install-system.sh (apt-get install chromium)")
    manager = sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except BaseException:
        manager.stop()
        raise
    try:
        yield chromium
    finally:
        chromium.close()
        manager.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    tab.problems = []  # script errors and Content-Security-Policy violations
    tab.on("pageerror", lambda exc: tab.problems.append(str(exc)))
    tab.on("console", lambda msg: msg.type == "error" and not msg.text.startswith("Failed to load resource")
           and tab.problems.append(msg.text))
    try:
        yield tab
    finally:
        context.close()


def wait_until(tab, expression: str, arg=None, timeout: float = 15.0) -> None:
    """Poll a JS function of ``arg`` until it returns true.

    ``page.evaluate`` runs over the DevTools protocol; Playwright's own ``wait_for_function``
    polls with ``eval`` inside the page, which the page's Content-Security-Policy forbids
    (and must keep forbidding, so the test does not bypass it).
    """
    deadline = time.monotonic() + timeout
    while not tab.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression} (arg {arg!r}); "
                                 f"message: {tab.inner_text('#message')!r}")
        time.sleep(0.05)


def shown(tab, not_this: int | None = None) -> int:
    """The sample id on screen (waiting until it is not ``not_this``)."""
    wait_until(tab, "(old) => { const v = document.getElementById('sample').dataset.sampleId;"
                    " return v !== undefined && v !== '' && v !== String(old); }", not_this)
    return int(tab.get_attribute("#sample", "data-sample-id"))


def saved(tab, sample_id: int) -> None:
    wait_until(tab, "(sid) => document.getElementById('message').textContent.startsWith(`Saved: sample ${sid} `)",
               sample_id)


def site_asking_first_labels(tmp_path, **settings):
    """A web-oracle site whose round 1 asked people for its initial set: ``(cfg, node, site, model, report)``
    (``model``: the untrained global state round 1 was sent; the site is closed again)."""
    cfg = site_config(tmp_path, **settings)
    node = make_site(tmp_path, cfg, oracle="web")  # a real site's file: no pool labels in it
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    model = global_state(site)
    try:
        _, report = site.train(model, TrainInstruction(1, 0))
    finally:
        site.close()
    return cfg, node, site, model, report


def test_label_by_click_and_keyboard_then_train_on_it(tmp_path, data_dir, page):
    cfg, node, site, state, report = site_asking_first_labels(tmp_path, dataset="bloodmnist",
                                                              data_dir=str(data_dir), max_train=300, batch_size=16)
    assert report.num_examples == 0 and report.pending == 6
    names = site.data.class_names

    with serving(open_labeling(node["state-dir"], 0, node["data-path"], labeler="tester")) as server:
        pool = server.service.pool
        page.goto(server.url)
        page.wait_for_selector("#class-7")
        assert page.inner_text("#class-2") == f"3 {names[2]}"
        # 1: click a class button; the picture is the sample's own 28x28 image, upscaled
        first = shown(page)
        wait_until(page, "() => document.getElementById('sample-image').naturalWidth === 112")
        page.click("#class-2")
        saved(page, first)
        # 2: keyboard: "5" is the fifth class (index 4)
        second = shown(page, first)
        page.keyboard.press("5")
        saved(page, second)
        # 3: skip ("s") shows another sample and writes nothing
        skipped = shown(page, second)
        page.keyboard.press("s")
        unsure = shown(page, skipped)
        assert pool.state_of(skipped) == "pending"
        # 4: unsure (button) hands the sample back to the pool
        page.click("#unsure")
        wait_until(page, "() => document.getElementById('message').textContent.includes('handed back as unsure')")
        # 5: "0" means class 10, which bloodmnist (8 classes) does not have: nothing happens; "8" is class 7
        third = shown(page, unsure)
        page.keyboard.press("0")
        page.keyboard.press("8")
        saved(page, third)
        wait_until(page, "() => document.getElementById('progress').textContent.startsWith("
                         "'First labels: 3 of 6 answered, 1 unsure')")
        # 6: someone else answered the sample on screen meanwhile: the page says so instead of overwriting
        fourth = shown(page, third)
        server.service.answer(fourth, 6)
        page.click("#class-1")
        page.wait_for_selector("#message.error")
        assert "already labeled" in page.inner_text("#message")
        assert page.problems == []

        records = {r["id"]: r for r in pool.label_records()}
        assert {i: r["label"] for i, r in records.items()} == {first: 2, second: 4, third: 7, fourth: 6}
        assert {records[i]["source"] for i in (first, second, third)} == {"web:tester"}
        assert {r["round"] for r in records.values()} == {0}
        assert pool.state_of(unsure) == "unlabeled"
        assert pool.state_of(skipped) == "pending"
        status, payload = http(server.url.split("?")[0] + "api/state", token=server.token)
        assert status == 200 and [p["sample_id"] for p in payload["pending"]] == [skipped]

    # the next round's ClientApp trains on exactly these answers
    site = ClientSite(cfg, NodeConfig.from_mapping(node))
    fitted = {}
    original = site.learner.labeled_data

    def capture():  # what the round trains on (network) or sums up (head)
        X, y = original()
        fitted["X"], fitted["y"] = X.copy(), y.copy()
        return X, y

    site.learner.labeled_data = capture
    try:
        _, report = site.train(state, TrainInstruction(2, 4))
    finally:
        site.close()
    ids = sorted(records)
    assert report.num_examples == 4
    np.testing.assert_array_equal(fitted["y"], [records[i]["label"] for i in ids])
    np.testing.assert_array_equal(fitted["X"], site.X_pool[ids])  # the model's inputs of those samples
    assert report.queries_used == 4 and report.pending == 1 + 4  # the skipped one still waits, plus round 2's


def test_table_rows_and_the_zero_key(tmp_path, page):
    """A table site (digits, 10 classes): the sample shows as a feature row; "0" answers class 10."""
    _, node, site, _, _ = site_asking_first_labels(tmp_path)
    with serving(open_labeling(node["state-dir"], 0, node["data-path"])) as server:
        page.goto(server.url)
        sample = shown(page)
        cells = page.locator("#sample-features td").all_inner_texts()
        np.testing.assert_allclose([float(c) for c in cells], site.data.X_pool[sample], atol=1e-4)
        page.keyboard.press("0")
        saved(page, sample)
        assert server.service.pool.label_records()[0]["label"] == 9
        assert page.problems == []
        # a wrong token shows nothing
        bad = page.context.new_page()
        response = bad.goto(server.url.split("?")[0] + "?token=" + "A" * 32)
        assert response.status == 403
        bad.close()


def test_undo_change_zoom_and_reference_examples(tmp_path, data_dir, page):
    """A person who labels all day: takes back the last answer (Backspace), corrects an earlier one in the
    list of last answers, zooms (Z), and compares with examples of each class from the site's own labels."""
    _, node, _, _, _ = site_asking_first_labels(tmp_path, dataset="bloodmnist", data_dir=str(data_dir),
                                                max_train=300, batch_size=16)
    shot = os.environ.get("FEDAL_SCREENSHOT")  # where to save a picture of the page (the README's)
    with serving(open_labeling(node["state-dir"], 0, node["data-path"], labeler="tester")) as server:
        pool = server.service.pool
        page.set_viewport_size({"width": 900, "height": 1100})
        page.goto(server.url)
        page.wait_for_selector("#class-7")
        first = shown(page)
        page.keyboard.press("3")
        saved(page, first)
        second = shown(page, first)
        page.keyboard.press("5")
        saved(page, second)
        wait_until(page, "(sid) => document.querySelector('#recent li')?.dataset.sampleId === String(sid)", second)
        # the examples show each class the site has labels of, the others say they have none yet
        wait_until(page, "() => document.querySelectorAll('#examples img.thumb').length === 2")
        assert "no label yet" in page.inner_text("#examples figure[data-label='0']")
        # Backspace takes the last answer back: the same sample is on screen again, pending, no new request
        requests_before = len(pool.requests())
        page.keyboard.press("Backspace")
        wait_until(page, "() => document.getElementById('message').textContent.includes('taken back')")
        assert shown(page) == second and pool.state_of(second) == "pending"
        assert len(pool.requests()) == requests_before
        page.keyboard.press("6")
        saved(page, second)
        # correct the first answer from the list: class index 2 -> 1
        wait_until(page, "(sid) => document.querySelectorAll('#recent li').length === 2", None)
        page.select_option(f"#recent li[data-sample-id='{first}'] select", "1")
        wait_until(page, "() => document.getElementById('message').textContent.startsWith('Changed:')")
        # Z zooms the image to twice its size and back
        page.keyboard.press("z")
        assert page.evaluate("() => document.getElementById('sample-image').getBoundingClientRect().width") > 400
        if shot:
            page.screenshot(path=shot, full_page=True)
        page.keyboard.press("z")
        assert page.evaluate("() => document.getElementById('sample-image').getBoundingClientRect().width") < 300
        assert "First labels" in page.inner_text("#progress") and "one of the first labels" in page.inner_text(
            "#sample-info")
        assert page.problems == []
        labels = {r["id"]: r["label"] for r in pool.label_records()}
        assert labels == {first: 1, second: 5}


def test_backspace_after_a_reload_takes_back_only_this_labelers_answer(tmp_path, page):
    """Two people label one site on two pages; bob answered last. Alice reloads her page: her list shows
    her answers only, Backspace takes back her answer (not bob's), and a second Backspace does nothing."""
    _, node, _, _, _ = site_asking_first_labels(tmp_path)
    alice = open_labeling(node["state-dir"], 0, node["data-path"], labeler="alice")
    bob = open_labeling(node["state-dir"], 0, node["data-path"], labeler="bob")
    with serving(alice), serving(bob):
        pool = alice.service.pool
        page.goto(alice.url)
        mine = shown(page)
        page.keyboard.press("1")
        saved(page, mine)
        theirs = next(int(i) for i in pool.pending_ids() if i != mine)
        assert http(bob.url.split("?")[0] + "api/answer", token=bob.token,
                    body={"sample_id": theirs, "label": 2})[0] == 200
        page.reload()
        wait_until(page, "(sid) => document.querySelector('#recent li')?.dataset.sampleId === String(sid)", mine)
        assert page.locator("#recent li").count() == 1
        page.keyboard.press("Backspace")
        wait_until(page, "() => document.getElementById('message').textContent.includes('taken back')")
        assert pool.state_of(mine) == "pending" and pool.state_of(theirs) == "labeled"
        wait_until(page, "() => document.getElementById('undo').disabled")
        page.keyboard.press("Backspace")  # nothing of alice's left to take back
        time.sleep(0.5)
        assert pool.state_of(theirs) == "labeled" and page.problems == []


def test_an_offline_site_s_page_says_where_it_stands_and_shows_suggestions(tmp_path, page):
    """Issue 23: cut off from the server, the page says since when, the offline budget left and the answers
    waiting to be sent; with ``suggest = true`` it shows the site model's class and confidence."""
    from test_offline import Federation

    from clients.offline import OfflineSite

    fed = Federation(tmp_path, offline_budget=3, **{"offline-after": 1})
    fed.round(1)
    fed.round(2)
    fed.nodes[1].update({"oracle": "web", "suggest": True})
    fed.round(3)
    time.sleep(1.5)  # the server says nothing for longer than offline-after
    loop = OfflineSite(tmp_path / "state", 1, batch=3)
    try:
        assert loop.step()["asked"] == 3
    finally:
        loop.close()
    with serving(open_labeling(fed.nodes[1]["state-dir"], 1, fed.nodes[1]["data-path"])) as server:
        page.goto(server.url)
        wait_until(page, "() => document.getElementById('link').textContent.startsWith('Offline since')")
        link = page.inner_text("#link")
        assert "offline budget: 0 of 3 left" in link and "no answers waiting to be sent" in link
        wait_until(page, "() => !document.getElementById('suggestion').hidden")
        assert page.inner_text("#suggestion").startswith("Model suggests: ")
        sample = shown(page)
        page.keyboard.press("1")
        saved(page, sample)
        wait_until(page, "() => document.getElementById('link').textContent.includes('1 answer waiting to be sent')")
        assert page.problems == []
