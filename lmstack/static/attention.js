// Attention: the worked example ("The cat sat") step by step, and the model's attention on
// a sentence of the user's own, as heatmaps per head, one layer at a time.
import { $, el, postJSON, setStatus } from "./common.js";
import { heatmap } from "./charts.js";

let sentence = null; // the last /v1/attention answer for a sentence

function matrixTable(title, rows, tokens, cols) {
  return el("table", { class: "data" },
    el("caption", {}, title),
    el("thead", {}, el("tr", {}, el("th", {}, ""), cols.map((c) => el("th", { scope: "col" }, c)))),
    el("tbody", {}, rows.map((row, i) => el("tr", {},
      el("th", { scope: "row" }, tokens[i]),
      row.map((v) => el("td", { class: "num" }, v === null ? "−∞" : Number(v).toFixed(3)))))));
}

async function showExample() {
  const out = $("#example-out");
  try {
    const data = await postJSON("/v1/attention", {
      causal: $("#example-causal").checked, heads: Number($("#example-heads").value),
    });
    const perHead = data.heads === 1 ? [data.steps] : null;
    const heads = data.weights[0].map((w, h) => heatmap(w, data.tokens,
      { title: data.heads > 1 ? `head ${h} (d_k = ${data.d_k})` : `weights (d_k = ${data.d_k})`, values: true }));
    const tables = [];
    for (let h = 0; h < data.heads; h++) {
      const pick = (key) => (perHead ? data.steps[key] : data.steps[key][h]);
      const label = data.heads > 1 ? ` (head ${h})` : "";
      tables.push(matrixTable(`QKᵀ scores${label}`, pick("scores"), data.tokens, data.tokens));
      tables.push(matrixTable(`scaled by √d_k${label}`, pick("scaled"), data.tokens, data.tokens));
    }
    out.replaceChildren(el("div", { class: "heads" }, heads), el("div", { class: "steps" }, tables));
  } catch (error) {
    out.replaceChildren(el("p", { class: "error" }, error.message));
  }
}

function showLayer() {
  const layer = Number($("#layer").value);
  $("#layer-out").value = String(layer);
  const group = sentence.heads / sentence.kv_heads;
  $("#sentence-out").replaceChildren(...sentence.weights[layer].map((w, h) =>
    heatmap(w, sentence.tokens, { title: `layer ${layer}, head ${h} (kv ${Math.floor(h / group)})` })));
}

async function showSentence() {
  const status = $("#sentence-status");
  $("#sentence-send").disabled = true;
  setStatus(status, "running the model…");
  try {
    sentence = await postJSON("/v1/attention", { text: $("#sentence").value });
    const range = $("#layer");
    range.max = String(sentence.layers - 1);
    range.value = Math.min(Number(range.value), sentence.layers - 1);
    $("#sentence-controls").hidden = false;
    setStatus(status, `${sentence.tokens.length} tokens · ${sentence.layers} layers × ` +
      `${sentence.heads} heads (${sentence.kv_heads} key/value heads) · causal`);
    showLayer();
  } catch (error) {
    setStatus(status, error.message, true);
  }
  $("#sentence-send").disabled = false;
}

export function initAttention() {
  $("#example-causal").addEventListener("change", showExample);
  $("#example-heads").addEventListener("change", showExample);
  $("#example-form").addEventListener("submit", (e) => e.preventDefault());
  $("#sentence-form").addEventListener("submit", (e) => { e.preventDefault(); showSentence(); });
  $("#layer").addEventListener("input", showLayer);
  return (first) => { if (first) showExample(); };
}
