// gcr studio: what both pages share. Plain JavaScript, no build step, nothing from the network
// but this gateway's own API. The API key lives in sessionStorage only (never in a URL).
"use strict";

const KEY = "gcr-api-key";
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
const STOP_REASONS = {
  accepted: "accepted: the score reached the threshold",
  max_rounds: "stopped at the round limit",
  no_improvement: "stopped: no better image for several rounds",
  deadline: "stopped at the deadline",
  cancelled: "cancelled",
  no_refinement: "stopped: the critic proposed no refinement",
  failed: "failed",
  unclaimed: "expired: no worker took the job",
};

function apiKey() { return sessionStorage.getItem(KEY) || ""; }
function setApiKey(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); }
function authHeaders() { const k = apiKey(); return k ? { Authorization: `Bearer ${k}` } : {}; }

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: "http_error", message: response.statusText };
    throw new Error(`${response.status} ${error.code}: ${error.message}`);
  }
  return body;
}

const blobs = new Map();
// With a key, images are fetched with it and shown from blob: URLs (an <img> cannot send a
// header); without one, the <img> points at the API's own image URL.
async function imageSource(url) {
  if (!apiKey()) return url;
  if (!blobs.has(url)) {
    blobs.set(url, fetch(url, { headers: authHeaders() }).then((r) => r.blob()).then((b) => URL.createObjectURL(b)));
  }
  return blobs.get(url);
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function followEvents(url, onEvent, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 20 && !signal.aborted; attempt++) {
    try {
      const headers = { ...authHeaders(), Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(url, { headers, signal });
      if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const fields = { data: "" };
          for (const line of block.split(/\r?\n/)) {
            const i = line.indexOf(":");
            if (i <= 0) continue;
            const name = line.slice(0, i), val = line.slice(i + 1).replace(/^ /, "");
            if (name === "data") fields.data += val; else fields[name] = val;
          }
          // A keep-alive (a comment line, or a message without data) carries no event.
          if (!fields.data.trim() || fields.event === "ping") continue;
          if (fields.id) lastId = fields.id;
          let event;
          try { event = JSON.parse(fields.data); } catch (error) { continue; }
          onEvent(event);
          if (event.type === "end") return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value; else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function score(value) { return value === null || value === undefined ? "–" : value.toFixed(3); }

function keyForm(onChange) {
  const input = el("input", { id: "api-key", type: "password", autocomplete: "off", placeholder: "gcr_… (empty when auth is off)" });
  input.value = apiKey();
  const form = el("form", { class: "key" },
    el("label", { for: "api-key" }, "API key (kept in this tab only)"), input, " ", el("button", { type: "submit" }, "Use key"));
  form.addEventListener("submit", (event) => { event.preventDefault(); setApiKey(input.value.trim()); onChange(); });
  return form;
}
