// Small SVG charts drawn here (no library): line charts, heatmaps and a stacked bar.
import { el, fmt } from "./common.js";

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

/** series: [{name, color, points: [[seconds, value], ...]}] over the same time axis. */
export function lineChart(series, { width = 420, height = 160, unit = "", digits = 2 } = {}) {
  const pad = { l: 52, r: 8, t: 8, b: 22 };
  const all = series.flatMap((s) => s.points);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  const t0 = all.length ? Math.min(...all.map((p) => p[0])) : 0;
  const t1 = all.length ? Math.max(...all.map((p) => p[0])) : 1;
  const finite = all.map((p) => p[1]).filter((v) => v !== null && Number.isFinite(v));
  const top = Math.max(...finite, 0) || 1;
  const x = (t) => pad.l + ((t - t0) / Math.max(t1 - t0, 1)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - (v / top) * (height - pad.t - pad.b);
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    root.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), stroke: "#d5d5d0" }));
    root.append(svg("text", { x: pad.l - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#333" },
      `${fmt(v, v < 10 ? Math.max(digits, frac === 0.5 && top < 3 ? 1 : 0) : 0)}${unit}`));
  }
  root.append(svg("text", { x: width - pad.r, y: height - 6, "text-anchor": "end", "font-size": 11, fill: "#333" },
    "now"));
  root.append(svg("text", { x: pad.l, y: height - 6, "font-size": 11, fill: "#333" },
    `-${Math.round(t1 - t0)} s`));
  const described = [];
  for (const s of series) {
    const pts = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (pts.length) {
      root.append(svg("polyline", {
        points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
        fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash || "",
      }));
    }
    const last = pts.length ? pts[pts.length - 1][1] : null;
    described.push(`${s.name} ${fmt(last, digits)}${unit}`);
  }
  root.setAttribute("aria-label", `latest: ${described.join(", ")}`);
  const legend = el("ul", { class: "legend" }, series.map((s) =>
    el("li", {}, el("i", { style: `background:${s.color}` }), s.name)));
  return [root, legend];
}

/** Light yellow to dark blue, readable text on both ends. */
export function heatColor(v) {
  const stops = [[255, 255, 217], [127, 205, 187], [29, 145, 192], [37, 52, 148], [8, 29, 88]];
  const p = Math.min(Math.max(v, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(p), stops.length - 2);
  const f = p - i;
  const c = stops[i].map((a, k) => Math.round(a + (stops[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** A [T][T] weights matrix as a labelled SVG heatmap; each cell has a tooltip. */
export function heatmap(matrix, tokens, { title = "", values = false, cell = 0 } = {}) {
  const n = tokens.length;
  const size = cell || (values ? 46 : Math.max(8, Math.min(22, Math.floor(360 / n))));
  const label = Math.min(110, 8 + Math.max(...tokens.map((t) => t.length)) * 6.5);
  const fontSize = Math.min(12, size * 0.8 + 3);
  const width = label + n * size + 4;
  const height = label + n * size + 4;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${title}: attention weights, ${n} by ${n}; rows attend to columns`,
  });
  tokens.forEach((tok, i) => {
    const short = tok.length > 14 ? `${tok.slice(0, 13)}…` : tok;
    root.append(svg("text", { x: label - 4, y: label + i * size + size / 2 + 4, "text-anchor": "end",
      "font-size": fontSize, fill: "#1b1b1b" }, short));
    const cx = label + i * size + size / 2;
    root.append(svg("text", { x: cx, y: label - 4, "font-size": fontSize, fill: "#1b1b1b",
      transform: `rotate(-60 ${cx} ${label - 4})` }, short));
  });
  matrix.forEach((row, i) => row.forEach((v, j) => {
    const rect = svg("rect", { x: label + j * size, y: label + i * size, width: size, height: size,
      fill: heatColor(v), stroke: "#ffffff", "stroke-width": 0.5 });
    rect.append(svg("title", {}, `"${tokens[i]}" → "${tokens[j]}": ${v.toFixed(3)}`));
    root.append(rect);
    if (values) {
      root.append(svg("text", { x: label + j * size + size / 2, y: label + i * size + size / 2 + 4,
        "text-anchor": "middle", "font-size": 11, fill: v > 0.45 ? "#ffffff" : "#1b1b1b" },
        v.toFixed(2)));
    }
  }));
  return el("figure", { class: "heatmap" }, title ? el("h3", {}, title) : null, root);
}

/** parts: [{name, value, color}] drawn as one bar of total `whole`, with a legend. */
export function stackedBar(parts, whole, caption) {
  const bar = el("div", {
    class: "bar", role: "img",
    "aria-label": `${caption}: ` + parts.map((p) => `${p.name} ${p.value}`).join(", "),
  });
  for (const p of parts) {
    if (p.value <= 0) continue;
    bar.append(el("span", {
      style: `width:${(100 * p.value) / whole}%;background:${p.color}`,
      title: `${p.name}: ${fmt(p.value)} tokens`,
    }));
  }
  const legend = el("ul", { class: "legend" }, parts.map((p) =>
    el("li", {}, el("i", { style: `background:${p.color}` }), `${p.name} ${fmt(p.value)}`)));
  return el("div", {}, el("h3", {}, caption), bar, legend);
}
