// The labeling page: shows one pending query at a time and sends the answer.
// Every call carries the page's token in the X-Fedal-Token header.
"use strict";

const token = new URLSearchParams(window.location.search).get("token") || "";
let state = null;        // last /api/state
let current = null;      // the request on screen
let skipped = [];        // sample ids put back to the end of the queue (this page only)
let busy = false;
let lastAnswered = null;  // what Undo takes back: the server's choice among this page's own last answers

const $ = (id) => document.getElementById(id);

function keyOf(index) {  // class 0 -> "1", ..., class 8 -> "9", class 9 -> "0"
  return index < 9 ? String(index + 1) : index === 9 ? "0" : "";
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "X-Fedal-Token": token, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  let payload = {};
  try { payload = await response.json(); } catch (e) { payload = { error: response.statusText }; }
  if (!response.ok) throw new Error(payload.error || `HTTP ${response.status}`);
  return payload;
}

function say(text, kind) {
  const el = $("message");
  el.textContent = text;
  el.className = kind || "";
}

function pickNext() {
  const pending = state ? state.pending : [];
  const fresh = pending.filter((p) => !skipped.includes(p.sample_id));
  if (fresh.length) return fresh[0];
  for (const id of skipped) {  // only skipped ones left: cycle through them
    const again = pending.find((p) => p.sample_id === id);
    if (again) return again;
  }
  return null;
}

function roundName(round) {  // plain words: the first labels, then query rounds
  if (round === null || round === undefined) return "an earlier request";
  return round === 0 ? "First labels" : `Query round ${round}`;
}

function thumb(item, alt) {  // a small picture of a labeled sample, or its row for table data
  if (item.image) {
    const img = document.createElement("img");
    img.src = `${item.image}?token=${encodeURIComponent(token)}`;
    img.alt = alt;
    img.className = "thumb";
    return img;
  }
  const span = document.createElement("span");
  span.className = "row";
  span.textContent = item.features.slice(0, 8).join(" ") + (item.features.length > 8 ? " ..." : "");
  return span;
}

async function renderRecent() {
  const { recent, undo: target } = await call("GET", "api/recent");
  const list = $("recent");
  list.replaceChildren();
  $("recent-box").hidden = recent.length === 0;
  recent.forEach((r) => {
    const li = document.createElement("li");
    li.dataset.sampleId = String(r.sample_id);
    const select = document.createElement("select");
    select.setAttribute("aria-label", `class of sample ${r.sample_id}`);
    state.classes.forEach((name, index) => {
      const option = document.createElement("option");
      option.value = String(index);
      option.textContent = name;
      option.selected = index === r.label;
      select.append(option);
    });
    select.addEventListener("change", () => change(r.sample_id, Number(select.value)));
    li.append(thumb(r, `sample ${r.sample_id}`), ` sample ${r.sample_id}: `, select);
    if (r.changed_by) li.append(` (changed by ${r.changed_by})`);
    list.append(li);
  });
  lastAnswered = target;  // null: nothing of this page's to take back (older answers are changed in the list)
  $("undo").disabled = target === null;
}

async function renderExamples() {
  const { examples } = await call("GET", "api/examples");
  const box = $("examples");
  box.replaceChildren();
  const any = examples.some((e) => e.samples.length);
  $("examples-box").hidden = !any || state.kind !== "image";
  examples.forEach((e) => {
    const figure = document.createElement("figure");
    figure.dataset.label = String(e.label);
    const caption = document.createElement("figcaption");
    caption.textContent = e.samples.length ? e.class : `${e.class} (no label yet)`;
    e.samples.forEach((item) => figure.append(thumb(item, `${e.class} example`)));
    figure.append(caption);
    box.append(figure);
  });
}

function renderProgress() {
  const p = state.progress;
  const c = state.counts;
  let text = `${state.pending.length} waiting for an answer · ${c.labeled} labeled in total`;
  let share = 0;
  if (p) {
    const done = p.answered + p.skipped;
    text = `${roundName(p.round)}: ${p.answered} of ${p.budget} answered` +
      (p.skipped ? `, ${p.skipped} unsure` : "") + (p.expired ? `, ${p.expired} expired` : "") + " · " + text;
    share = p.budget > 0 ? Math.min(1, done / p.budget) : 0;
  }
  $("progress").textContent = text;
  $("bar-fill").style.width = `${Math.round(share * 100)}%`;
  renderLink();
}

function renderLink() {  // connected or offline since when, offline budget left, answers waiting to be sent
  const l = state.link;
  const el = $("link");
  if (!l) { el.textContent = ""; return; }
  const when = (t) => new Date(t * 1000).toLocaleString();
  let text;
  if (l.last_contact === null) text = "Not yet in touch with the server";
  else if (l.connected) text = `Connected to the server (last message ${when(l.last_contact)})`;
  else text = `Offline since ${when(l.offline_since)}` + (l.expired ? " (too long: no new questions)" : "");
  if (l.clock_problem) text += ` (${l.clock_problem})`;  // the site's clock was set back
  text += ` · offline budget: ${l.offline_left} of ${l.offline_budget} left`;
  const n = l.answers_waiting;
  text += n ? ` · ${n} answer${n === 1 ? "" : "s"} waiting to be sent` : " · no answers waiting to be sent";
  el.textContent = text;
  el.className = l.connected ? "" : "offline";
}

function renderButtons() {
  const box = $("class-buttons");
  if (box.childElementCount === state.classes.length) return;
  box.replaceChildren();
  state.classes.forEach((name, index) => {
    const b = document.createElement("button");
    b.type = "button";
    b.id = `class-${index}`;
    b.dataset.label = String(index);
    const key = keyOf(index);
    b.title = key ? `${name} (key ${key})` : name;
    if (key) {
      const k = document.createElement("kbd");
      k.textContent = key;
      b.append(k, " ");
    }
    b.append(name);
    b.addEventListener("click", () => answer(index));
    box.append(b);
  });
}

function renderSample() {
  current = pickNext();
  showCurrent();
}

function showCurrent() {
  const img = $("sample-image");
  const table = $("sample-features");
  const none = current === null;
  $("empty").hidden = !none;
  document.querySelectorAll("#class-buttons button, #skip, #unsure, #zoom").forEach((b) => { b.disabled = none; });
  $("sample").dataset.sampleId = none ? "" : String(current.sample_id);
  if (none) {
    img.hidden = true;
    table.hidden = true;
    $("sample-info").textContent = "";
    $("suggestion").hidden = true;
    return;
  }
  const due = current.deadline ? ` · answer by ${new Date(current.deadline * 1000).toLocaleString()}` : "";
  const asked = current.round === 0 ? "one of the first labels" : `asked in ${roundName(current.round).toLowerCase()}`;
  const alone = current.offline ? " · asked while the server was away" : "";
  $("sample-info").textContent = `Sample ${current.sample_id} (${asked})${due}${alone}`;
  const hint = $("suggestion");
  hint.hidden = !current.suggestion;
  if (current.suggestion) {  // the site's model, shown only where the site turned suggestions on
    hint.textContent = `Model suggests: ${current.suggestion.class} (${Math.round(current.suggestion.confidence * 100)}% sure)`;
  }
  if (current.image) {
    img.src = `${current.image}?token=${encodeURIComponent(token)}`;
    img.alt = `sample ${current.sample_id}`;
    img.hidden = false;
    table.hidden = true;
  } else {
    const body = table.querySelector("tbody");
    body.replaceChildren();
    const head = document.createElement("tr");
    const row = document.createElement("tr");
    current.features.forEach((v, j) => {
      const th = document.createElement("th");
      th.textContent = `x${j}`;
      const td = document.createElement("td");
      td.textContent = String(v);
      head.append(th);
      row.append(td);
    });
    body.append(head, row);
    table.hidden = false;
    img.hidden = true;
  }
}

async function refresh() {
  state = await call("GET", "api/state");
  renderButtons();
  renderProgress();
  const shown = current ? current.sample_id : null;
  if (shown === null || !state.pending.some((p) => p.sample_id === shown)) renderSample();
  // the lists below the sample must not hold up the next answer
  renderRecent().then(renderExamples).catch((err) => say(err.message, "error"));
}

async function submit(path, body, done) {
  if (busy || !current) return;
  busy = true;
  try {
    const result = await call("POST", path, body);
    skipped = skipped.filter((id) => id !== body.sample_id);
    say(done(result), "ok");
    current = null;
    await refresh();
  } catch (err) {
    say(err.message, "error");
  } finally {
    busy = false;
  }
}

function answer(label) {
  if (!current) return;
  submit("api/answer", { sample_id: current.sample_id, label },
    (r) => { lastAnswered = r.sample_id; return `Saved: sample ${r.sample_id} is ${r.class}.`; });
}

function unsure() {
  if (!current) return;
  submit("api/unsure", { sample_id: current.sample_id },
    (r) => `Sample ${r.sample_id} handed back as unsure.`);
}

async function undo() {
  if (busy || lastAnswered === null) return;
  busy = true;
  try {
    const r = await call("POST", "api/undo", { sample_id: lastAnswered });
    lastAnswered = null;  // the list of last answers says which one is next
    say(`Answer for sample ${r.sample_id} taken back: it is shown again.`, "ok");
    skipped = skipped.filter((id) => id !== r.sample_id);
    await refresh();
    const again = state.pending.find((p) => p.sample_id === r.sample_id);
    if (again) { current = again; showCurrent(); }
  } catch (err) {
    say(err.message, "error");
  } finally {
    busy = false;
  }
}

async function change(sampleId, label) {
  try {
    const r = await call("POST", "api/change", { sample_id: sampleId, label });
    say(r.changed ? `Changed: sample ${r.sample_id} is ${r.class} (was ${r.before}).`
      : `Sample ${r.sample_id} is already ${r.class}.`, "ok");
    await renderRecent();
    await renderExamples();
  } catch (err) {
    say(err.message, "error");
    await renderRecent().catch(() => {});  // show the list as it is now (the select went back)
  }
}

function zoom() {
  $("sample-image").classList.toggle("zoomed");
}

function skip() {
  if (!current || busy) return;
  skipped = skipped.filter((id) => id !== current.sample_id).concat([current.sample_id]);
  say(`Sample ${current.sample_id} skipped for now.`);
  renderSample();
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || !state) return;
  const key = event.key.toLowerCase();
  if (key === "s") { skip(); event.preventDefault(); return; }
  if (key === "u") { unsure(); event.preventDefault(); return; }
  if (key === "z") { zoom(); event.preventDefault(); return; }
  if (key === "backspace") { undo(); event.preventDefault(); return; }
  const index = state.classes.findIndex((_, i) => keyOf(i) === key);
  if (index >= 0) { answer(index); event.preventDefault(); }
});

document.addEventListener("DOMContentLoaded", () => {
  $("skip").addEventListener("click", skip);
  $("unsure").addEventListener("click", unsure);
  $("undo").addEventListener("click", undo);
  $("zoom").addEventListener("click", zoom);
  $("sample-image").addEventListener("click", zoom);
  refresh().catch((err) => say(err.message, "error"));
  setInterval(() => { if (!busy) refresh().catch((err) => say(err.message, "error")); }, 10000);
});
