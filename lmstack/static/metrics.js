// Metrics: the server's own Prometheus text (/metrics) parsed here, every 3 s. Percentiles
// come from histogram buckets as Prometheus' histogram_quantile computes them, over the
// last 30 s when requests finished in it, else since the server started.
import { $, el, fmt, setStatus, authHeaders } from "./common.js";
import { lineChart } from "./charts.js";

const PERIOD_MS = 3000;
const WINDOW_S = 30;
const KEEP = 120; // samples kept: 6 minutes
const samples = []; // {t, metrics}
let timer = null;

/** Prometheus text format -> [{name, labels: {k: v}, value}] */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2];
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (metrics, name) =>
  metrics.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);

function buckets(metrics, name) {
  return metrics.filter((s) => s.name === `${name}_bucket`)
    .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value }))
    .sort((a, b) => a.le - b.le);
}

/** histogram_quantile over cumulative bucket counts (linear within a bucket). */
export function quantile(q, bs) {
  if (!bs.length) return null;
  const total = bs[bs.length - 1].count;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0, prevCount = 0;
  for (const b of bs) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      const inBucket = b.count - prevCount;
      return inBucket > 0 ? prevLe + (b.le - prevLe) * ((rank - prevCount) / inBucket) : b.le;
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

function windowed(name, now, before) {
  const cur = buckets(now.metrics, name);
  if (!before) return cur;
  const old = new Map(buckets(before.metrics, name).map((b) => [b.le, b.count]));
  const diff = cur.map((b) => ({ le: b.le, count: b.count - (old.get(b.le) || 0) }));
  return diff.length && diff[diff.length - 1].count > 0 ? diff : cur;
}

function derive(i) {
  const now = samples[i];
  const m = now.metrics;
  const prev = samples[i - 1];
  let before = null;
  for (let k = i - 1; k >= 0; k--) {
    if (now.t - samples[k].t >= WINDOW_S) { before = samples[k]; break; }
  }
  if (!before && i > 0) before = samples[0];
  const rate = (name) => prev && now.t > prev.t
    ? Math.max(0, (sum(m, name) - sum(prev.metrics, name)) / (now.t - prev.t)) : null;
  const ttft = windowed("lmstack:time_to_first_token_seconds", now, before);
  const e2e = windowed("lmstack:e2e_request_latency_seconds", now, before);
  return {
    t: now.t,
    running: sum(m, "lmstack:num_requests_running"),
    waiting: sum(m, "lmstack:num_requests_waiting"),
    kv: 100 * sum(m, "lmstack:kv_cache_usage_perc"),
    requests: sum(m, "lmstack:request_success_total"),
    rejected: sum(m, "lmstack:requests_rejected_total"),
    genRate: rate("lmstack:generation_tokens_total"),
    promptRate: rate("lmstack:prompt_tokens_total"),
    ttft50: quantile(0.5, ttft), ttft95: quantile(0.95, ttft),
    e2e50: quantile(0.5, e2e), e2e95: quantile(0.95, e2e),
  };
}

function tile(id, label, value) {
  return el("div", { class: "tile" }, el("div", { class: "v", id }, value), el("div", { class: "k" }, label));
}

function chart(title, series, opts) {
  const [svgNode, legend] = lineChart(series, opts);
  return el("figure", { class: "chart" }, el("h3", {}, title), svgNode, legend);
}

function render() {
  const rows = samples.map((_, i) => derive(i));
  const last = rows[rows.length - 1];
  const t1 = last.t;
  const pts = (key) => rows.map((r) => [r.t - t1, r[key]]);
  $("#metric-tiles").replaceChildren(
    tile("metric-requests", "requests finished", fmt(last.requests)),
    tile("metric-running", "running", fmt(last.running)),
    tile("metric-waiting", "waiting", fmt(last.waiting)),
    tile("metric-kv", "KV cache in use", `${fmt(last.kv, 1)} %`),
    tile("metric-tps", "tokens/s generated", fmt(last.genRate, 1)),
    tile("metric-ttft", "TTFT p50", last.ttft50 === null ? "–" : `${fmt(last.ttft50 * 1000)} ms`),
    tile("metric-e2e", "latency p50", last.e2e50 === null ? "–" : `${fmt(last.e2e50, 2)} s`),
    tile("metric-rejected", "rejected (429/503)", fmt(last.rejected)),
  );
  $("#metric-charts").replaceChildren(
    chart("Requests running and waiting", [
      { name: "running", color: "#1f4fbf", points: pts("running") },
      { name: "waiting", color: "#b03a7a", points: pts("waiting"), dash: "5 3" },
    ], { digits: 0 }),
    chart("KV cache in use", [{ name: "KV cache", color: "#2e9e6b", points: pts("kv") }],
      { unit: " %", digits: 1 }),
    chart("Tokens per second", [
      { name: "generated", color: "#1f4fbf", points: pts("genRate") },
      { name: "prompt", color: "#e0a100", points: pts("promptRate"), dash: "5 3" },
    ], { digits: 1 }),
    chart("Time to first token (s)", [
      { name: "p50", color: "#1f4fbf", points: pts("ttft50") },
      { name: "p95", color: "#b03a7a", points: pts("ttft95"), dash: "5 3" },
    ], { digits: 2 }),
    chart("Request latency (s)", [
      { name: "p50", color: "#1f4fbf", points: pts("e2e50") },
      { name: "p95", color: "#b03a7a", points: pts("e2e95"), dash: "5 3" },
    ], { digits: 2 }),
  );
}

async function scrape() {
  const status = $("#metrics-status");
  if ($("#metrics").hidden || document.visibilityState !== "visible") return;
  try {
    const response = await fetch("/metrics", { headers: authHeaders(false) });
    if (!response.ok) throw new Error(`/metrics answered HTTP ${response.status}`);
    samples.push({ t: performance.now() / 1000, metrics: parseMetrics(await response.text()) });
    if (samples.length > KEEP) samples.shift();
    render();
    setStatus(status, `updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    setStatus(status, error.message, true);
  }
}

function schedule() {
  clearInterval(timer);
  timer = $("#metrics-live").checked ? setInterval(scrape, PERIOD_MS) : null;
}

export function initMetrics() {
  $("#metrics-live").addEventListener("change", schedule);
  schedule(); // scrape() itself skips while the section or the page is hidden
  return () => scrape();
}
