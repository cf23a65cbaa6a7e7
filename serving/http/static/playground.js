// Chorus playground: one prompt to two to four models at once, streamed side by side.
// Plain browser JavaScript, no build step and no dependencies: it speaks the same OpenAI API as
// any client (GET /v1/models, streamed POST /v1/chat/completions), with the key typed in.
"use strict";

const MIN_MODELS = 2;
const MAX_MODELS = 4;
const PALETTE_SIZE = 8; // .e0 … .e7 in playground.css

const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  models: [], // the model cards of GET /v1/models
  colours: new Map(), // expert name -> palette index, stable for the page's life
  controller: null, // aborts the comparison running now
};

// -- the API -----------------------------------------------------------------------------

function apiHeaders() {
  const headers = { "content-type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  return headers;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// The `data:` payloads of a server-sent event stream; comments (`: keep-alive`) carry none.
async function* sseData(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

// -- models and colours --------------------------------------------------------------------

function colourOf(expert) {
  if (!state.colours.has(expert)) state.colours.set(expert, state.colours.size % PALETTE_SIZE);
  return `e${state.colours.get(expert)}`;
}

async function loadModels() {
  const status = $("#models-status");
  status.hidden = false;
  status.textContent = "Loading…";
  let response;
  try {
    response = await fetch("/v1/models", { headers: apiHeaders() });
  } catch (error) {
    status.textContent = `Cannot reach the server: ${error}`;
    return;
  }
  if (!response.ok) {
    status.textContent =
      response.status === 401
        ? "This server needs an API key: type it above, then Load models."
        : await errorMessage(response);
    return;
  }
  state.models = (await response.json()).data;
  for (const card of state.models) {
    if (card.chorus?.type === "expert") colourOf(card.id);
  }
  renderModels();
  renderLegend();
  status.hidden = true;
}

function describe(card) {
  const meta = card.chorus ?? {};
  return meta.type === "pool" ? `${meta.strategy} pool` : "expert";
}

function renderModels() {
  const fieldset = $("#models");
  fieldset.querySelectorAll("label").forEach((label) => label.remove());
  const ids = state.models.map((card) => card.id);
  const preferred = ["auto", "fuse"].filter((id) => ids.includes(id));
  const initial = preferred.length >= MIN_MODELS ? preferred : ids.slice(0, MIN_MODELS);
  for (const card of state.models) {
    const label = document.createElement("label");
    label.className = "model-choice";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = card.id;
    box.checked = initial.includes(card.id);
    box.addEventListener("change", updateSelection);
    const name = document.createElement("span");
    name.textContent = card.id;
    const kind = document.createElement("small");
    kind.textContent = describe(card);
    label.append(box, name, kind);
    fieldset.append(label);
  }
  updateSelection();
}

function selected() {
  return [...document.querySelectorAll("#models input:checked")].map((box) => box.value);
}

function updateSelection() {
  const count = selected().length;
  for (const box of document.querySelectorAll("#models input")) {
    box.disabled = !box.checked && count >= MAX_MODELS;
  }
  const running = state.controller !== null;
  $("#run").disabled = running || count < MIN_MODELS || count > MAX_MODELS;
}

function renderLegend() {
  const legend = $("#legend");
  legend.replaceChildren();
  if (!state.colours.size) return;
  const title = document.createElement("span");
  title.className = "muted";
  title.textContent = "Text is coloured by the expert that chose it:";
  legend.append(title);
  for (const expert of state.colours.keys()) {
    const item = document.createElement("span");
    item.className = `swatch ${colourOf(expert)}`;
    item.textContent = expert;
    legend.append(item);
  }
}

// -- one comparison ------------------------------------------------------------------------

async function compare() {
  const ids = selected();
  const prompt = $("#prompt").value;
  if (ids.length < MIN_MODELS || !prompt.trim()) return;
  state.controller = new AbortController();
  $("#stop").disabled = false;
  updateSelection();
  $("#run-status").textContent = `Streaming from ${ids.length} models…`;
  const panes = $("#panes");
  panes.replaceChildren();
  panes.style.setProperty("--columns", String(ids.length));
  const started = performance.now();
  await Promise.all(ids.map((id) => runPane(id, prompt, state.controller.signal)));
  $("#run-status").textContent = `Done in ${seconds(performance.now() - started)}.`;
  state.controller = null;
  $("#stop").disabled = true;
  updateSelection();
  renderLegend(); // experts met on the way (pools of other servers' experts) join it
}

function requestBody(model, prompt) {
  const body = {
    model,
    messages: [{ role: "user", content: prompt }],
    stream: true,
    stream_options: { include_usage: true },
    chorus_pieces: true, // Chorus's extension: which expert chose each piece of text
  };
  const maxTokens = $("#max-tokens").value;
  if (maxTokens) body.max_tokens = Number(maxTokens);
  const temperature = $("#temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  return body;
}

async function runPane(model, prompt, signal) {
  const pane = $("#pane-template").content.firstElementChild.cloneNode(true);
  pane.dataset.model = model;
  $(".model", pane).textContent = model;
  const card = state.models.find((c) => c.id === model);
  $(".kind", pane).textContent = card ? describe(card) : "";
  $("#panes").append(pane);
  setState(pane, "waiting");

  const started = performance.now();
  let firstToken = null;
  const tick = () => {
    $(".latency", pane).textContent = seconds(performance.now() - started);
  };
  const ticker = setInterval(tick, 100);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders(),
      body: JSON.stringify(requestBody(model, prompt)),
      signal,
    });
    if (!response.ok) {
      fail(pane, await errorMessage(response));
      return;
    }
    setState(pane, "streaming");
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        fail(pane, chunk.error.message ?? "error");
        continue;
      }
      if (chunk.chorus) showChorus(pane, chunk.chorus);
      if (chunk.usage) showUsage(pane, chunk.usage);
      for (const choice of chunk.choices ?? []) {
        const delta = choice.delta ?? {};
        if (!delta.content) continue;
        if (firstToken === null) {
          firstToken = performance.now();
          $(".ttft", pane).textContent = seconds(firstToken - started);
        }
        appendPieces(pane, delta);
      }
    }
    if (pane.dataset.state !== "failed") setState(pane, "done");
  } catch (error) {
    if (error.name === "AbortError") setState(pane, "stopped");
    else fail(pane, String(error));
  } finally {
    clearInterval(ticker);
    tick();
  }
}

function appendPieces(pane, delta) {
  const output = $(".output", pane);
  // Without the extension (another gateway), the text still shows, uncoloured.
  const pieces = delta.chorus_pieces ?? [{ text: delta.content, expert: null, weights: {} }];
  for (const piece of pieces) {
    const span = document.createElement("span");
    span.className = "piece";
    span.textContent = piece.text;
    if (piece.expert) {
      span.classList.add(colourOf(piece.expert));
      span.dataset.expert = piece.expert;
      span.dataset.weights = JSON.stringify(piece.weights ?? {});
    }
    output.append(span);
  }
}

// -- what the `chorus` object says ---------------------------------------------------------

function showChorus(pane, chorus) {
  const experts = $(".experts", pane);
  experts.replaceChildren();
  (chorus.experts ?? []).forEach((expert, i) => {
    const chip = document.createElement("span");
    chip.className = `swatch ${colourOf(expert)}`;
    const weight = chorus.weights?.[i];
    chip.textContent = weight === undefined ? expert : `${expert} ${weight.toFixed(2)}`;
    experts.append(chip);
  });
  for (const expert of chorus.failed ?? []) {
    const chip = document.createElement("span");
    chip.className = "swatch failed";
    chip.textContent = `${expert} failed`;
    experts.append(chip);
  }
  if (!experts.childElementCount) experts.textContent = "–";
  const routed = chorus.cluster !== null && chorus.cluster !== undefined;
  $(".cluster", pane).textContent = routed ? String(chorus.cluster) : "not routed";
  $(".ood", pane).textContent = routed ? (chorus.ood ? "yes" : "no") : "–";
  if (chorus.cost !== null && chorus.cost !== undefined) {
    $(".cost", pane).textContent = `${chorus.cost.toPrecision(3)} ${chorus.cost_unit ?? ""}`;
  }
  showSummary(pane, chorus);
}

function showSummary(pane, chorus) {
  const [name, text] = chorus.fusion
    ? [
        "fusion",
        `${shares(chorus.fusion.share)} · ${chorus.fusion.steps} steps · ` +
          `primary alone ${percent(chorus.fusion.gate_skip_rate)}`,
      ]
    : chorus.cascade
      ? ["cascade", `${shares(chorus.cascade.share)} · draft ${chorus.cascade.draft}`]
      : chorus.vote
        ? [
            "vote",
            `${JSON.stringify(chorus.vote.answer)} · agreement ${percent(chorus.vote.agreement)}` +
              (chorus.vote.escalated ? " · escalated" : ""),
          ]
        : [null, null];
  $(".summary-row", pane).hidden = name === null;
  if (name !== null) {
    $(".summary-name", pane).textContent = name;
    $(".summary", pane).textContent = text;
  }
}

function showUsage(pane, usage) {
  $(".tokens", pane).textContent = `${usage.prompt_tokens} in · ${usage.completion_tokens} out`;
}

function shares(share) {
  return Object.entries(share ?? {})
    .map(([expert, value]) => `${expert} ${percent(value)}`)
    .join(", ");
}

const percent = (value) => `${Math.round(value * 100)}%`;
const seconds = (ms) => (ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`);

function setState(pane, value) {
  pane.dataset.state = value;
  $(".state", pane).textContent = value;
}

function fail(pane, message) {
  setState(pane, "failed");
  const box = $(".error", pane);
  box.hidden = false;
  box.textContent = message;
}

// -- the hover card: who chose a piece, and with what weights ------------------------------

function showTip(event) {
  const span = event.target.closest(".piece[data-expert]");
  const tip = $("#tip");
  if (!span) {
    tip.hidden = true;
    return;
  }
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = `swatch ${colourOf(span.dataset.expert)}`;
  head.textContent = `${JSON.stringify(span.textContent)} chosen by ${span.dataset.expert}`;
  tip.append(head);
  for (const [expert, weight] of Object.entries(JSON.parse(span.dataset.weights))) {
    const row = document.createElement("div");
    row.className = `weight ${colourOf(expert)}`;
    const label = document.createElement("span");
    label.textContent = `${expert} ${weight.toFixed(2)}`;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(weight * 100)}%`;
    track.append(bar);
    row.append(label, track);
    tip.append(row);
  }
  const box = span.getBoundingClientRect();
  tip.style.left = `${Math.min(box.left, window.innerWidth - 300) + window.scrollX}px`;
  tip.style.top = `${box.bottom + window.scrollY + 6}px`;
  tip.hidden = false;
}

// -- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const tip = document.createElement("div");
  tip.id = "tip";
  tip.hidden = true;
  document.body.append(tip);
  $("#panes").addEventListener("mouseover", showTip);
  $("#panes").addEventListener("mouseleave", () => {
    tip.hidden = true;
  });

  const key = $("#api-key");
  key.value = sessionStorage.getItem("chorus-api-key") ?? "";
  key.addEventListener("change", () => sessionStorage.setItem("chorus-api-key", key.value));
  $("#load-models").addEventListener("click", loadModels);
  $("#run").addEventListener("click", compare);
  $("#stop").addEventListener("click", () => state.controller?.abort());
  loadModels();
});
