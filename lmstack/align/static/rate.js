// The rating page: token login, one comparison at a time, click or keyboard (A/B/T/N).
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("lmstack-rater-token") || "";
let current = null;
let busy = false;

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + token, "Content-Type": "application/json" };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (body.error && body.error.message) || body.detail || response.statusText;
    throw Object.assign(new Error(message), { status: response.status });
  }
  return body;
}

function show(data) {
  $("who").textContent = "rater: " + data.rater;
  $("progress").textContent = `${data.progress.rated} / ${data.progress.assigned} rated`;
  const criteria = $("criteria");
  criteria.replaceChildren(...data.criteria.map((c) => {
    const li = document.createElement("li");
    li.textContent = `${c.name} (${c.weight}%): ${c.question}`;
    return li;
  }));
  current = data.comparison;
  $("login").hidden = true;
  if (!current) { $("rating").hidden = true; $("done").hidden = false; return; }
  $("done").hidden = true;
  $("rating").hidden = false;
  $("prompt").replaceChildren(...current.messages.filter((m) => m.role !== "system").map((m) => {
    const div = document.createElement("div");
    const role = document.createElement("span");
    role.className = "turn-role";
    role.textContent = m.role === "user" ? "User" : "Assistant";
    div.append(role, document.createTextNode(m.content));
    return div;
  }));
  $("a").textContent = current.a;
  $("b").textContent = current.b;
  $("note").value = "";
  $("rating").dataset.comparison = current.id;
}

async function load() {
  try {
    show(await api("/rate/api/next"));
    $("login-error").textContent = "";
  } catch (err) {
    $("login").hidden = false;
    $("rating").hidden = true;
    $("login-error").textContent = err.message;
    if (err.status === 401 || err.status === 403) sessionStorage.removeItem("lmstack-rater-token");
  }
}

async function choose(choice) {
  if (!current || busy) return;
  busy = true;
  $("status").textContent = "saving…";
  try {
    const note = $("note").value.trim() || null;
    await api("/rate/api/ratings", {
      method: "POST",
      body: JSON.stringify({ comparison_id: current.id, choice, note }),
    });
    $("status").textContent = `saved: ${choice} for ${current.id}`;
    await load();
  } catch (err) {
    $("status").textContent = "not saved: " + err.message;
  } finally {
    busy = false;
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("lmstack-rater-token", token);
  load();
});
document.querySelectorAll("#choices button").forEach((b) =>
  b.addEventListener("click", () => choose(b.dataset.choice)));
document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT") {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  const keys = { a: "A", b: "B", t: "tie", n: "neither", 1: "A", 2: "B" };
  const choice = keys[event.key.toLowerCase()];
  if (choice) { event.preventDefault(); choose(choice); }
});
if (token) load();
