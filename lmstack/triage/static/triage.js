// Triage: one pasted ticket or a CSV/JSONL file through POST /v1/triage; entities are
// highlighted where they occur in the ticket's text; results download as JSONL.
// The triage app's page script: app.js imports it when the server mounts triage.
import { $, el, postJSON, setStatus } from "/static/common.js";

const EXAMPLE = {
  subject: "Can't access my account after payment",
  body: "Hi, I paid for the premium subscription yesterday (Order #ORD-2024-8891) but I still " +
    "can't access premium features. My username is john.doe@email.com and customer ID is " +
    "CUS-445566. The payment was $99. I need this fixed ASAP as I have a deadline tomorrow. " +
    "This is really frustrating!",
};
const BATCH = 64; // the server's limit of tickets per request
const ENTITY_NAMES = {
  customer_id: "customer ID", order_number: "order number",
  product_name: "product", email: "email",
};
let results = [];

/** The text with each entity value wrapped in <mark> wherever it occurs. */
export function highlighted(text, entities) {
  const spans = [];
  for (const [field, value] of Object.entries(entities || {})) {
    if (!value) continue;
    const lower = text.toLowerCase();
    const needle = value.toLowerCase();
    for (let at = lower.indexOf(needle); at >= 0; at = lower.indexOf(needle, at + needle.length)) {
      spans.push({ start: at, end: at + value.length, field });
    }
  }
  spans.sort((a, b) => a.start - b.start || b.end - a.end);
  const out = [];
  let pos = 0;
  for (const s of spans) {
    if (s.start < pos) continue; // overlaps an earlier, longer mark
    out.push(text.slice(pos, s.start));
    out.push(el("mark", { "data-entity": s.field }, text.slice(s.start, s.end),
      el("span", { class: "tag" }, ENTITY_NAMES[s.field] || s.field)));
    pos = s.end;
  }
  out.push(text.slice(pos));
  return out;
}

function card(ticket, record) {
  const text = ticket.subject ? `Subject: ${ticket.subject}\n${ticket.body}` : ticket.body;
  const entities = Object.entries(record.entities || {}).filter(([, v]) => v);
  const problems = [...(record.errors || [])];
  return el("article", { class: "ticket", "data-valid": String(record.valid) },
    el("div", {},
      el("span", { class: "pill" }, record.category || "no category"),
      el("span", { class: `pill ${record.urgency || ""}` }, `urgency ${record.urgency || "?"}`),
      el("span", { class: record.valid ? "status" : "error" },
        record.valid ? `valid · ${record.latency_s} s` : "not valid")),
    record.id ? el("p", { class: "status" }, `id ${record.id}`) : null,
    el("div", { class: "text", "aria-label": "Ticket text with entities marked" },
      highlighted(text, record.entities)),
    el("dl", {},
      el("dt", {}, "Key issue"), el("dd", {}, record.key_issue || "–"),
      el("dt", {}, "Entities"), el("dd", {}, entities.length
        ? entities.map(([k, v]) => `${ENTITY_NAMES[k] || k}: ${v}`).join(" · ") : "none found"),
      el("dt", {}, "Reply draft"), el("dd", {}, record.suggested_response || "–")),
    problems.length ? el("div", { class: "error" }, el("p", {}, "Validation errors:"),
      el("ul", {}, problems.map((p) => el("li", {}, p)))) : null,
    (record.warnings || []).length ? el("p", { class: "status" },
      `warnings: ${record.warnings.join("; ")}`) : null);
}

function show(pairs) {
  results = pairs;
  $("#triage-results").replaceChildren(...pairs.map(([t, r]) => card(t, r)));
  $("#triage-download").disabled = pairs.length === 0;
}

/** RFC 4180 CSV: quoted fields, doubled quotes, newlines inside quotes. */
export function parseCSV(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); field = "";
      if (row.some((f) => f !== "")) rows.push(row);
      row = [];
    } else field += c;
  }
  row.push(field);
  if (row.some((f) => f !== "")) rows.push(row);
  return rows;
}

export function ticketsFrom(name, text) {
  const tickets = [];
  const problems = [];
  if (name.toLowerCase().endsWith(".csv")) {
    const [header, ...rows] = parseCSV(text);
    const cols = (header || []).map((h) => h.trim().toLowerCase());
    if (!cols.includes("body")) {
      throw new Error(`${name}: no 'body' column (it has ${cols.join(", ") || "none"})`);
    }
    rows.forEach((r) => {
      const get = (k) => (cols.includes(k) ? r[cols.indexOf(k)] || "" : "");
      tickets.push({ subject: get("subject"), body: get("body"), id: get("id") || null });
    });
  } else {
    text.split(/\r?\n/).forEach((line, i) => {
      if (!line.trim()) return;
      try {
        const row = JSON.parse(line);
        if (typeof row !== "object" || row === null || Array.isArray(row)) throw new Error("not an object");
        tickets.push({ subject: String(row.subject || ""), body: String(row.body || ""),
          id: row.id === undefined || row.id === null ? null : String(row.id) });
      } catch (error) {
        problems.push(`line ${i + 1}: ${error.message}`);
      }
    });
  }
  return { tickets: tickets.filter((t) => t.subject.trim() || t.body.trim()), problems };
}

async function triageMany(tickets, status) {
  const pairs = [];
  for (let i = 0; i < tickets.length; i += BATCH) {
    const batch = tickets.slice(i, i + BATCH);
    setStatus(status, `triaging tickets ${i + 1}-${i + batch.length} of ${tickets.length}…`);
    const answer = await postJSON("/v1/triage", { tickets: batch });
    answer.records.forEach((r, k) => pairs.push([batch[k], r]));
    show(pairs);
  }
  return pairs;
}

export function init() {
  const status = $("#triage-status");
  $("#triage-example").addEventListener("click", () => {
    $("#triage-subject").value = EXAMPLE.subject;
    $("#triage-body").value = EXAMPLE.body;
  });
  $("#triage-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const ticket = { subject: $("#triage-subject").value, body: $("#triage-body").value };
    if (!ticket.subject.trim() && !ticket.body.trim()) {
      setStatus(status, "write a subject or a body first", true);
      return;
    }
    $("#triage-send").disabled = true;
    setStatus(status, "triaging…");
    try {
      const record = await postJSON("/v1/triage", ticket);
      show([[ticket, record]]);
      setStatus(status, `done in ${record.latency_s} s (${record.attempts} attempt${record.attempts === 1 ? "" : "s"})`);
    } catch (error) {
      setStatus(status, error.message, true);
    }
    $("#triage-send").disabled = false;
  });
  $("#triage-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    try {
      const { tickets, problems } = ticketsFrom(file.name, await file.text());
      if (!tickets.length) throw new Error(`${file.name}: no tickets (${problems.slice(0, 3).join("; ")})`);
      const pairs = await triageMany(tickets, status);
      const skipped = problems.length ? `; skipped ${problems.join("; ")}` : "";
      setStatus(status, `${pairs.length} tickets triaged${skipped}`, problems.length > 0);
    } catch (error) {
      setStatus(status, error.message, true);
    }
    event.target.value = "";
  });
  $("#triage-download").addEventListener("click", () => {
    const lines = results.map(([, r]) => JSON.stringify(r)).join("\n") + "\n";
    const url = URL.createObjectURL(new Blob([lines], { type: "application/jsonl" }));
    const link = el("a", { href: url, download: "triage-results.jsonl" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
}
