// The studio's front page: the key, a submit form, and this key's jobs, newest first.
"use strict";

document.getElementById("key-section").append(keyForm(() => { loadJobs(); loadModels(); }));

// The source image belongs to edits only: shown, and required, in edit mode.
const modeField = document.getElementById("mode");
function showSourceField() {
  const editing = modeField.value === "edit";
  document.getElementById("source-field").hidden = !editing;
  document.getElementById("source").required = editing;
  document.getElementById("size-field").hidden = editing; // an edit's size follows its source
}
modeField.addEventListener("change", showSourceField);
showSourceField(); // a restored form (back button) may come back in edit mode

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

document.getElementById("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const error = document.getElementById("submit-error");
  error.textContent = "";
  const body = {
    prompt: form.prompt.value,
    mode: form.mode.value,
    previews: true, // live previews of the latents while denoising (SSE `preview` events)
    loop: {
      max_rounds: Number(form.max_rounds.value),
      threshold: Number(form.threshold.value),
      candidates_per_round: Number(form.candidates.value),
      patience: Number(form.patience.value),
      seed_policy: form.seed_policy.value,
      strategy: form.strategy.value,
    },
  };
  if (form.model.value) body.model = form.model.value;
  if (form.size.value && form.mode.value === "t2i") {
    const [width, height] = form.size.value.split("x").map(Number);
    body.generation = { width, height };
  }
  try {
    if (form.mode.value === "edit") {
      if (!form.source.files.length) throw new Error("an edit needs a source image");
      body.source_image = await readFile(form.source.files[0]);
    }
    const job = await api("/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    window.location.href = `/studio/jobs/${job.id}`;
  } catch (failure) {
    error.textContent = failure.message;
  }
});

async function loadJobs() {
  const rows = document.getElementById("jobs");
  const error = document.getElementById("jobs-error");
  try {
    const { jobs } = await api("/jobs?limit=50");
    error.textContent = "";
    rows.replaceChildren(...jobs.map((job) => el("tr", {},
      el("td", {}, new Date(job.created_at * 1000).toLocaleString()),
      el("td", {}, el("a", { href: `/studio/jobs/${job.id}` }, job.spec.prompt.slice(0, 90))),
      el("td", {}, el("span", { class: `status ${job.status}` }, job.status)),
      el("td", {}, String(job.rounds.length)),
      el("td", {}, job.best ? score(job.best.overall) : "–"))));
  } catch (failure) {
    error.textContent = failure.message;
  }
}

// The models live workers serve (GET /v1/models), for the model field; the fleet's
// default stays the first choice.
async function loadModels() {
  const select = document.getElementById("model");
  try {
    const { data } = await api("/v1/models");
    const chosen = select.value;
    select.replaceChildren(select.options[0], ...data.map((model) => el("option", { value: model.id }, model.id)));
    select.value = data.some((model) => model.id === chosen) ? chosen : "";
  } catch (failure) {
    // No key yet, or no worker: the default stays, and submitting says what is wrong.
  }
}

loadJobs();
loadModels();
setInterval(loadJobs, 3000);
