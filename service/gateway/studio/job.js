// One job's trajectory: every round's prompt (with what changed), images, scores and
// justifications; live while it runs (the SSE stream), complete after.
"use strict";

const jobId = decodeURIComponent(window.location.pathname.split("/").pop());
const stream = new AbortController();
let job = null;
let live = { stage: "", round: null, step: 0, total: 0, preview: null };
let reloading = null;
let highlighted = null; // the card an "edited from" link points at; kept across reloads

document.getElementById("key-section").append(keyForm(() => { load(); follow(); }));

// A word diff: what the refined prompt added (<ins>) and dropped (<del>) against the round before.
function wordDiff(before, after) {
  const a = before.split(/\s+/).filter(Boolean), b = after.split(/\s+/).filter(Boolean);
  const lcs = Array.from({ length: a.length + 1 }, () => new Array(b.length + 1).fill(0));
  for (let i = a.length - 1; i >= 0; i--) for (let j = b.length - 1; j >= 0; j--)
    lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) { out.push(a[i] + " "); i++; j++; }
    else if (j < b.length && (i >= a.length || lcs[i][j + 1] >= lcs[i + 1][j])) { out.push(el("ins", {}, b[j]), " "); j++; }
    else { out.push(el("del", {}, a[i]), " "); i++; }
  }
  return out;
}

function chart(doc) {
  const points = doc.rounds.map((r) => r.overall);
  const edits = doc.rounds.map((r) => r.action === "edit");
  const threshold = doc.spec.loop.threshold;
  // Margins: the y-axis and its labels on the left; on the right, the threshold's label,
  // outside the plot so that no line can cross it.
  const width = 560, height = 200, left = 52, right = 96, top = 10, bottom = 28;
  const plotRight = width - right;
  const x = (i) => left + (points.length > 1 ? (i * (plotRight - left)) / (points.length - 1) : (plotRight - left) / 2);
  const y = (v) => height - bottom - v * (height - top - bottom);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const label = `Overall score by round: ${points.map((p, i) => `round ${i + 1} ${score(p)}${edits[i] ? " (edit)" : ""}`).join(", ")}; threshold ${threshold}`;
  svg.setAttribute("aria-label", label);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text) node.textContent = text;
    svg.append(node);
    return node;
  };
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    if (tick > 0) add("line", { x1: left, x2: plotRight, y1: y(tick), y2: y(tick), stroke: "#eaeef2" });
    add("text", { class: "y-tick", x: left - 6, y: y(tick) + 4, "text-anchor": "end", "font-size": 11, fill: "#57606a" }, String(tick));
  }
  add("line", { class: "y-axis", x1: left, x2: left, y1: y(0), y2: y(1), stroke: "#57606a" });
  add("line", { class: "x-axis", x1: left, x2: plotRight, y1: y(0), y2: y(0), stroke: "#57606a" });
  add("text", { class: "y-title", x: 12, y: y(0.5), transform: `rotate(-90 12 ${y(0.5)})`, "text-anchor": "middle", "font-size": 11, fill: "#57606a" }, "overall score (0–1)");
  add("line", { class: "threshold", x1: left, x2: plotRight, y1: y(threshold), y2: y(threshold), stroke: "#cf222e", "stroke-dasharray": "5 4" });
  add("text", { class: "threshold-label", x: plotRight + 6, y: y(threshold) + 4, "font-size": 11, fill: "#cf222e" }, `threshold ${threshold}`);
  if (points.length) {
    // A round whose images could not be judged has no score: no point, never a 0.
    const judged = points.map((p, i) => [p, i]).filter(([p]) => p !== null);
    add("polyline", { class: "score-line", points: judged.map(([p, i]) => `${x(i)},${y(p)}`).join(" "), fill: "none", stroke: "#0969da", "stroke-width": 2 });
    points.forEach((p, i) => {
      add("text", { x: x(i), y: height - 8, "text-anchor": "middle", "font-size": 11 }, `round ${i + 1}`);
      if (p === null) return;
      // An edit round's point is a square, a generate round's a disc.
      const marker = edits[i]
        ? add("rect", { x: x(i) - 4, y: y(p || 0) - 4, width: 8, height: 8, fill: "#8250df" })
        : add("circle", { cx: x(i), cy: y(p || 0), r: 4, fill: "#0969da" });
      const title = document.createElementNS(ns, "title");
      title.textContent = `round ${i + 1} (${edits[i] ? "edit" : "generate"}): ${score(p)}`;
      marker.append(title);
    });
  }
  return svg;
}

function critiqueBlock(candidate) {
  const critique = candidate.critique;
  if (!critique) return el("p", { class: "error" }, candidate.error ? `${candidate.error.code}: ${candidate.error.message}` : "not judged");
  const rows = Object.entries(critique.dimensions).map(([name, dim]) => el("tr", {},
    el("td", {}, name.replace(/_/g, " ")), el("td", {}, dim.score === null ? "N/A" : dim.score.toFixed(1)), el("td", {}, dim.justification)));
  return el("div", {},
    el("table", { class: "dims" }, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "dimension"), el("th", { scope: "col" }, "score (1–4)"), el("th", { scope: "col" }, "why"))), el("tbody", {}, rows)),
    critique.summary ? el("p", {}, el("strong", {}, "Summary: "), critique.summary) : null,
    critique.refinement_comments ? el("p", {}, el("strong", {}, "Refinement: "), critique.refinement_comments) : null);
}

// Anchors are 1-based, as every number the studio shows.
function cardId(roundIndex, candidateIndex) { return `round-${roundIndex + 1}-candidate-${candidateIndex + 1}`; }

function highlight(id) {
  highlighted = id;
  for (const node of document.querySelectorAll(".candidate.highlight")) node.classList.remove("highlight");
  const card = id && document.getElementById(id);
  if (card) card.classList.add("highlight");
}

// What a round did (generate or edit), on which model, why, and which image an edit started from.
async function actionLine(doc, round) {
  const edit = round.action === "edit"; // rounds written before strategies existed have no action: generate
  const parts = [el("span", { class: `badge ${edit ? "edit" : "generate"}` }, edit ? "edit" : "generate")];
  if (round.model) parts.push(" on ", el("code", { class: "model" }, round.model));
  const from = round.edited_from;
  if (edit && from) {
    const id = cardId(from.round, from.candidate);
    const link = el("a", { class: "edited-from", href: `#${id}` },
      `↳ edited from round ${from.round + 1}, candidate ${from.candidate + 1}`);
    const source = (doc.rounds.find((r) => r.index === from.round) || { candidates: [] }).candidates.find((c) => c.index === from.candidate);
    if (source && source.image_url) {
      const thumb = el("img", { class: "edited-from-thumb", alt: "" });
      thumb.src = await imageSource(source.image_url);
      link.prepend(thumb);
    }
    link.addEventListener("mouseenter", () => highlight(id));
    link.addEventListener("focus", () => highlight(id));
    link.addEventListener("click", () => highlight(id));
    parts.push(" · ", link);
  } else if (edit && doc.spec.mode === "edit") {
    parts.push(" · ", el("a", { class: "edited-from", href: "#source" }, "↳ edited from the source image"));
  }
  if (round.reason) parts.push(" · ", el("span", { class: "reason" }, `why: ${round.reason}`));
  return el("p", { class: "action" }, parts);
}

async function candidateCard(doc, round, candidate) {
  const best = doc.best && doc.best.round === round.index && doc.best.candidate === candidate.index;
  const chosen = round.chosen === candidate.index;
  const alt = `Round ${round.index + 1}, candidate ${candidate.index + 1}, overall ${score(candidate.overall)}`;
  const image = candidate.image_url ? el("img", { alt, "data-src": candidate.image_url }) : el("p", { class: "muted" }, "no image");
  if (candidate.image_url) image.src = await imageSource(candidate.image_url);
  const id = cardId(round.index, candidate.index);
  return el("div", { id, class: `candidate${chosen ? " chosen" : ""}${best ? " best" : ""}${highlighted === id ? " highlight" : ""}` },
    el("p", {}, best ? el("span", { class: "badge best" }, "★ best of all rounds") : null, chosen ? el("span", { class: "badge chosen" }, "chosen this round") : null),
    image,
    el("div", { class: "judgment" },
      el("p", {}, el("strong", {}, "Overall: "), el("span", { class: "overall" }, score(candidate.overall)), el("span", { class: "muted" }, ` · seed ${candidate.seed}`)),
      critiqueBlock(candidate)));
}

async function render(doc) {
  document.title = `gcr studio: ${doc.spec.prompt.slice(0, 40)}`;
  document.getElementById("job-title").textContent = doc.spec.prompt;
  const summary = document.getElementById("summary");
  const running = !TERMINAL.has(doc.status);
  const parts = [el("p", {}, el("span", { class: `status ${doc.status}` }, doc.status), " ",
    doc.stop_reason ? el("span", { class: "stop-reason" }, STOP_REASONS[doc.stop_reason] || doc.stop_reason) : null)];
  if (doc.best) {
    parts.push(el("p", {}, el("strong", {}, "Best score: "), el("span", { id: "best-score" }, score(doc.best.overall)),
      ` (round ${doc.best.round + 1}, candidate ${doc.best.candidate + 1}) `));
    const download = el("a", { href: doc.best.image_url, download: `gcr-${doc.id}.png` }, "Download the best image");
    if (apiKey()) imageSource(doc.best.image_url).then((url) => { download.href = url; });
    parts.push(el("p", {}, download));
  }
  if (doc.error) parts.push(el("p", { class: "error" }, `${doc.error.code}: ${doc.error.message}`));
  if (running) {
    const cancel = el("button", { class: "danger", type: "button", id: "cancel" }, "Cancel job");
    cancel.addEventListener("click", async () => { cancel.disabled = true; try { render(await api(`/jobs/${jobId}`, { method: "DELETE" })); } catch (e) { cancel.disabled = false; } });
    parts.push(el("p", {}, cancel));
  }
  summary.replaceChildren(...parts);
  renderLive(running);
  document.getElementById("chart").replaceChildren(chart(doc));
  if (doc.spec.mode === "edit" && doc.links.source_image) {
    const img = el("img", { alt: "The source image this job edits" });
    img.src = await imageSource(doc.links.source_image);
    document.getElementById("source").replaceChildren(el("section", { class: "source" }, el("h2", {}, "Source image"), img));
  }
  const cards = [];
  for (const round of doc.rounds) {
    const before = round.index > 0 ? doc.rounds[round.index - 1] : null;
    const edit = round.action === "edit";
    // A diff only between texts of one kind: a prompt against a prompt, an edit instruction against an instruction.
    const comparable = before && (before.action === "edit") === edit;
    const candidates = [];
    for (const candidate of round.candidates) candidates.push(await candidateCard(doc, round, candidate));
    cards.push(el("article", { class: "round", "aria-label": `Round ${round.index + 1}` },
      el("h2", {}, `Round ${round.index + 1}`, el("span", { class: "muted" }, ` · overall ${score(round.overall)}${round.delta !== null ? ` (${round.delta >= 0 ? "+" : ""}${round.delta.toFixed(3)})` : ""}`)),
      await actionLine(doc, round),
      el("p", { class: "prompt-label muted" }, edit ? "Edit instruction" : "Prompt"),
      el("div", { class: "prompt" }, comparable ? wordDiff(before.prompt, round.prompt) : round.prompt),
      promptCut(round),
      el("div", { class: "candidates" }, candidates)));
  }
  document.getElementById("rounds").replaceChildren(...cards);
}

// A prompt the generator's text encoder could not read whole was shortened to what it reads (docs/loop.md).
function promptCut(round) {
  const fit = round.prompt_fit;
  if (!fit || !fit.cut) return null;
  return el("p", { class: "prompt-cut muted" },
    `Shortened to the ${fit.limit} tokens the generator's ${fit.encoder} reads (the text had ${fit.tokens}); left out: `,
    el("del", {}, fit.dropped || "part of the first word"));
}

function renderLive(running) {
  const box = document.getElementById("live");
  if (!running) { box.replaceChildren(); return; }
  const stage = live.stage ? `Round ${live.round + 1}: ${live.stage}` : "queued";
  const bar = live.total ? el("progress", { max: live.total, value: live.step, "aria-label": "denoising steps" }) : null;
  const p = live.preview;
  // Before the first preview, say so: never an empty slot (or the word "null").
  const waiting = job && job.spec.previews ? "waiting for the first preview" : "no live preview: this job did not ask for previews";
  const preview = p ? el("figure", { class: "live-preview" },
    el("img", { src: p.image, alt: `Live preview of round ${p.round + 1}, candidate ${p.candidate + 1}, step ${p.step} of ${p.total}` }),
    el("figcaption", { class: "muted" }, `preview: round ${p.round + 1}, candidate ${p.candidate + 1}, step ${p.step}/${p.total}`))
    : el("p", { class: "live-placeholder muted" }, waiting);
  box.replaceChildren(el("p", {}, el("strong", { class: "stage" }, stage), " ", bar, live.total ? ` step ${live.step}/${live.total}` : ""), preview);
}

async function load() {
  try {
    job = await api(`/jobs/${jobId}`);
    document.getElementById("job-error").textContent = "";
    await render(job);
  } catch (failure) {
    document.getElementById("job-error").textContent = failure.message;
    document.querySelector("#summary .loading")?.remove(); // the error says why nothing came
  }
}

function reloadSoon() {
  // Coalesce bursts of events into one reload of the document.
  if (!reloading) reloading = setTimeout(() => { reloading = null; load(); }, 150);
}

function follow() {
  followEvents(`/jobs/${jobId}/events`, (event) => {
    if (event.type === "stage") {
      live = { ...live, stage: event.data.stage, round: event.data.round, step: 0, total: 0 };
      renderLive(true);
    } else if (event.type === "preview") {
      live.preview = event.data;
      renderLive(true);
    } else if (event.type === "progress") {
      live.step = event.data.step; live.total = event.data.total;
      renderLive(true);
    } else if (["round", "status", "end", "error"].includes(event.type)) {
      reloadSoon();
    }
  }, stream.signal);
}

load().then(() => { if (job && !TERMINAL.has(job.status)) follow(); });
