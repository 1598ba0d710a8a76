// Chat: /v1/chat/completions streamed token by token; Stop aborts the fetch, and the server
// aborts the request when the connection closes. Figures per reply: TTFT, tokens, tokens/s.
import { $, el, fmt, setStatus, streamJSON } from "./common.js";

const history = []; // {role, content} of the conversation so far (system prompt excluded)
let controller = null;

function bubble(role, text) {
  const body = el("div", { class: "text" }, text);
  const figures = el("div", { class: "figures" });
  const node = el("div", { class: `msg ${role}` },
    el("div", { class: "who" }, role === "user" ? "You" : "Model"), body, figures);
  $("#chat-log").append(node);
  node.scrollIntoView({ block: "end" });
  return { node, body, figures };
}

function settings() {
  const body = {
    temperature: Number($("#chat-temperature").value),
    top_p: Number($("#chat-top-p").value),
    max_tokens: Number($("#chat-max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = $("#chat-seed").value;
  if (seed !== "") body.seed = Number(seed);
  return body;
}

async function send(text) {
  const status = $("#chat-status");
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.node.setAttribute("aria-busy", "true");
  const system = $("#chat-system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  controller = new AbortController();
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  setStatus(status, "generating…");
  const start = performance.now();
  let first = null;
  let pieces = 0;
  let usage = null;
  let answer = "";
  let ending = "";
  try {
    for await (const event of streamJSON("/v1/chat/completions", { messages, ...settings() },
      controller.signal)) {
      if (event.usage) usage = event.usage;
      const choice = (event.choices || [])[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        if (first === null) first = performance.now();
        pieces += 1;
        answer += delta;
        reply.body.textContent = answer;
        reply.node.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) ending = choice.finish_reason;
    }
    setStatus(status, ending === "length" ? "stopped at max tokens" : "");
  } catch (error) {
    if (error.name === "AbortError") {
      ending = "stopped";
      setStatus(status, "stopped: the server aborted the request");
    } else {
      setStatus(status, error.message, true);
      reply.body.append(el("span", { class: "error" }, answer ? "\n" : "", error.message));
    }
  }
  const end = performance.now();
  const tokens = usage ? usage.completion_tokens : pieces;
  const rate = first !== null && tokens > 1 && end > first ? (tokens - 1) / ((end - first) / 1000) : null;
  reply.figures.textContent =
    `TTFT ${first === null ? "–" : fmt(first - start)} ms · ${fmt(tokens)} tokens · ` +
    `${fmt(rate, 1)} tokens/s` + (ending === "stopped" ? " · stopped" : "");
  reply.figures.dataset.ttftMs = first === null ? "" : String(Math.round(first - start));
  reply.node.removeAttribute("aria-busy");
  if (answer) history.push({ role: "assistant", content: answer });
  controller = null;
  $("#chat-send").disabled = false;
  $("#chat-stop").disabled = true;
}

export function initChat() {
  const input = $("#chat-input");
  for (const id of ["temperature", "top-p"]) {
    const range = $(`#chat-${id}`);
    range.addEventListener("input", () => { $(`#chat-${id}-out`).value = range.value; });
  }
  $("#chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("#chat-form").requestSubmit();
    }
  });
  $("#chat-stop").addEventListener("click", () => controller && controller.abort());
  $("#chat-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("#chat-log").replaceChildren();
    setStatus($("#chat-status"), "");
    input.focus();
  });
}
