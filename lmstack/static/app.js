// The page's entry: tabs (WAI-ARIA pattern: arrows, Home, End), the API key, each section.
// The shell's sections are imported here; each mounted app's script comes from its own
// folder (/static/<app>/), named in the #page-apps JSON that the server puts in the page.
import { $, el } from "./common.js";
import { initChat } from "./chat.js";
import { initMetrics } from "./metrics.js";
import { initAttention } from "./attention.js";

const shown = new Set();
const onShow = {};

function select(tab, focus = false) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const on = other === tab;
    other.setAttribute("aria-selected", String(on));
    other.tabIndex = on ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !on;
  }
  const id = tab.getAttribute("aria-controls");
  if (focus) tab.focus();
  if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
  if (onShow[id]) onShow[id](!shown.has(id));
  shown.add(id);
}

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      select(tabs[(next + tabs.length) % tabs.length], true);
    });
  }
  const wanted = tabs.find((t) => `#${t.getAttribute("aria-controls")}` === location.hash);
  select(wanted || tabs[0]);
}

function initKey() {
  const input = $("#api-key");
  input.value = localStorage.getItem("lmstack-api-key") || "";
  input.addEventListener("change", () => {
    if (input.value) localStorage.setItem("lmstack-api-key", input.value);
    else localStorage.removeItem("lmstack-api-key");
  });
}

/** /rate exists only when the server runs with --ratings-db: say so rather than link a 404. */
async function checkRatingPage() {
  const link = $(".rate-link");
  try {
    const response = await fetch("/rate", { method: "HEAD" });
    if (response.ok) return;
  } catch { /* the server is unreachable: every section will say so */ }
  link.textContent = "Rate replies (serve with --ratings-db)";
  link.setAttribute("title", "The rating page is served when lmstack serve has --ratings-db");
}

/** The mounted apps' scripts: each exports init(), which returns its tab's on-show callback.
 * A tab whose app is not mounted (its extra is not installed) says what to install. */
async function initApps() {
  const node = document.getElementById("page-apps");
  const apps = node ? JSON.parse(node.textContent) : { parts: [], off: {} };
  for (const [tab, reason] of Object.entries(apps.off)) {
    $(`#${tab}`).replaceChildren(el("p", { class: "status" }, `Not available on this server: ${reason}.`));
  }
  for (const part of apps.parts) {
    const module = await import(part.script);
    onShow[part.tab] = module.init();
  }
}

initKey();
checkRatingPage();
initChat();
await initApps();
onShow.metrics = initMetrics();
onShow.attention = initAttention();
initTabs();
