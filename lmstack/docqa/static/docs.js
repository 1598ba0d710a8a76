// Documents: upload (drag and drop, several files, XHR progress), the library, and questions
// answered with numbered citations that open the cited chunk, plus the prompt budget.
// The docqa app's page script: app.js imports it when the server mounts document Q&A.
import { $, authHeaders, el, errorText, fmt, request, setStatus, streamJSON } from "/static/common.js";
import { stackedBar } from "/static/charts.js";

let askController = null;

async function refreshLibrary() {
  const body = $("#library tbody");
  try {
    const lib = await request("GET", "/v1/docs");
    body.replaceChildren(...lib.documents.map((d) => el("tr", { "data-doc": d.doc_id },
      el("td", {}, d.doc_id), el("td", {}, d.title),
      el("td", { class: "num" }, fmt(d.chunks)), el("td", { class: "num" }, fmt(d.tokens)),
      el("td", {}, el("button", {
        type: "button", class: "danger", "aria-label": `Remove ${d.doc_id}`,
        onclick: () => remove(d.doc_id),
      }, "Remove")))));
    $("#library-caption").textContent = lib.documents.length
      ? `${lib.documents.length} documents, ${fmt(lib.chunks)} chunks, ${fmt(lib.tokens)} tokens`
      : "No documents yet";
  } catch (error) {
    $("#library-caption").textContent = `Cannot read the library: ${error.message}`;
  }
}

async function remove(docId) {
  if (!confirm(`Remove ${docId} and its chunks from the store?`)) return;
  try {
    await request("DELETE", `/v1/docs/${encodeURIComponent(docId)}`);
  } catch (error) {
    setStatus($("#upload-text"), error.message, true);
  }
  refreshLibrary();
}

function describe(report) {
  const parts = [`${report.added.length} added, ${report.replaced.length} replaced, ` +
    `${report.unchanged.length} unchanged: ${fmt(report.chunks)} chunks, ` +
    `${fmt(report.tokens)} tokens in ${report.seconds} s`];
  for (const f of report.failed) parts.push(`error: ${f.error}`);
  for (const s of report.skipped_lines) parts.push(`skipped ${s.path} line ${s.line}`);
  for (const w of report.warnings || []) parts.push(`warning: ${w.warning}`);
  return parts.join("\n");
}

function upload(files) {
  if (!files.length) return;
  const progress = $("#upload-progress");
  const text = $("#upload-text");
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/docs");
  for (const [k, v] of Object.entries(authHeaders(false))) xhr.setRequestHeader(k, v);
  progress.hidden = false;
  progress.value = 0;
  setStatus(text, `uploading ${files.length} file${files.length > 1 ? "s" : ""}…`);
  xhr.upload.addEventListener("progress", (event) => {
    if (!event.lengthComputable) return;
    progress.value = (100 * event.loaded) / event.total;
    if (event.loaded === event.total) setStatus(text, "uploaded; reading, chunking and embedding…");
  });
  xhr.addEventListener("load", () => {
    let data = null;
    try { data = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
    progress.value = 100;
    if (xhr.status === 200) setStatus(text, describe(data), data.failed.length > 0);
    else setStatus(text, errorText(data, xhr.status), true);
    refreshLibrary();
  });
  xhr.addEventListener("error", () => setStatus(text, "the upload failed: connection lost", true));
  xhr.send(form);
}

function openChunk(citation) {
  $("#chunk-title").textContent = `[${citation.n}] ${citation.title || citation.doc_id}`;
  const where = [citation.doc_id];
  if (citation.page !== null && citation.page !== undefined) where.push(`page ${citation.page}`);
  where.push(`chunk ${citation.chunk_id}`);
  if (citation.headings && citation.headings.length) where.push(citation.headings.join(" > "));
  $("#chunk-where").textContent = where.join(" · ");
  $("#chunk-text").textContent = citation.text;
  $("#chunk-dialog").showModal();
}

function citeButton(n, citation) {
  return el("button", {
    type: "button", class: "cite link", "data-cite": n,
    "aria-label": `Source ${n}: ${citation.doc_id}` + (citation.page != null ? `, page ${citation.page}` : ""),
    onclick: () => openChunk(citation),
  }, `[${n}]`);
}

function renderAnswer(result) {
  const box = $("#answer");
  const byNumber = new Map(result.citations.map((c) => [c.n, c]));
  const parts = [];
  let last = 0;
  const pattern = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
  for (const match of result.answer.matchAll(pattern)) {
    parts.push(result.answer.slice(last, match.index));
    for (const n of match[1].split(/\s*,\s*/).map(Number)) {
      parts.push(byNumber.has(n) ? citeButton(n, byNumber.get(n)) : `[${n}]`);
    }
    last = match.index + match[0].length;
  }
  parts.push(result.answer.slice(last));
  box.replaceChildren(...parts);
  $("#citations").replaceChildren(...result.citations.map((c) => el("li", { value: c.n },
    citeButton(c.n, c), " ", c.doc_id, c.page != null ? `, page ${c.page}` : "",
    c.headings && c.headings.length ? ` (${c.headings.slice(-2).join(" > ")})` : "")));
  const b = result.budget;
  $("#budget").replaceChildren(stackedBar([
    { name: "system", value: b.system, color: "#1f4fbf" },
    { name: `chunks (${b.num_chunks})`, value: b.chunks, color: "#2e9e6b" },
    { name: "question", value: b.question, color: "#e0a100" },
    { name: "template", value: b.template, color: "#8a8a8a" },
    { name: "reserve", value: b.reserve, color: "#b03a7a" },
    { name: "unused", value: Math.max(b.unused, 0), color: "#f2f2ee" },
  ], b.window, `Prompt budget: ${fmt(b.total)} of a ${fmt(b.window)}-token window`));
}

async function ask() {
  const status = $("#ask-status");
  const box = $("#answer");
  box.replaceChildren();
  $("#citations").replaceChildren();
  $("#budget").replaceChildren();
  askController = new AbortController();
  $("#ask-send").disabled = true;
  $("#ask-stop").disabled = false;
  setStatus(status, "retrieving and generating…");
  const body = {
    question: $("#ask-question").value,
    strategy: $("#ask-strategy").value,
    top_k: Number($("#ask-top-k").value),
    mode: $("#ask-mode").value,
    stream: true,
  };
  try {
    let text = "";
    for await (const event of streamJSON("/v1/ask", body, askController.signal)) {
      if (event.delta !== undefined) {
        text += event.delta;
        box.textContent = text;
      } else if (event.answer !== undefined) {
        renderAnswer(event);
        const cited = event.citations.length;
        setStatus(status, event.abstained ? "the documents do not answer this" :
          `${cited} source${cited === 1 ? "" : "s"} cited · ${event.calls} model call` +
          `${event.calls === 1 ? "" : "s"} · ${event.seconds} s`);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") setStatus(status, "stopped");
    else setStatus(status, error.message, true);
  }
  askController = null;
  $("#ask-send").disabled = false;
  $("#ask-stop").disabled = true;
}

export function init() {
  const drop = $("#drop");
  const input = $("#doc-files");
  input.addEventListener("change", () => { upload([...input.files]); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
  $("#ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!askController) ask();
  });
  $("#ask-stop").addEventListener("click", () => askController && askController.abort());
  return () => refreshLibrary();
}
