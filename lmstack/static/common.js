// Helpers every section shares: DOM building, the API key, JSON and SSE requests.

export const $ = (selector, root = document) => root.querySelector(selector);

/** el("p", {class: "x", onclick: f}, "text", child) -> an element; text is never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// X-Requested-With: the server takes uploads and deletes (no JSON body) only with it, which a
// page on another site cannot send without the server's leave (a CORS preflight).
export function authHeaders(json = true) {
  const headers = { "X-Requested-With": "lmstack" };
  if (json) headers["Content-Type"] = "application/json";
  const key = localStorage.getItem("lmstack-api-key");
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** The message of an OpenAI-shaped error body, else the status line. */
export function errorText(body, status) {
  if (body && body.error && body.error.message) return body.error.message;
  return `HTTP ${status}`;
}

export async function request(method, url, body, signal) {
  const response = await fetch(url, {
    method,
    headers: authHeaders(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  let data = null;
  try { data = await response.json(); } catch { /* an empty or non-JSON body */ }
  if (!response.ok) throw new Error(errorText(data, response.status));
  return data;
}

export const postJSON = (url, body, signal) => request("POST", url, body, signal);

/** POST and read server-sent events: yields each `data:` payload parsed as JSON until [DONE]. */
export async function* streamJSON(url, body, signal) {
  const response = await fetch(url, {
    method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch { /* not JSON */ }
    throw new Error(errorText(data, response.status));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      yield event;
    }
  }
}

export function setStatus(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle("error", isError);
}

export const fmt = (x, digits = 0) =>
  x === null || x === undefined || Number.isNaN(x) ? "–" :
  Number(x).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
