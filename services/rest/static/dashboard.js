// stddaq dashboard: polls the REST interface (relative URLs, so a page opened under
// /key/<KEY>/ sends its key with every request) and draws what it answers.
"use strict";

const $ = (id) => document.getElementById(id);
let liveUrl = null;
let configShown = {};

async function api(path, options) {
  const response = await fetch(path, options);
  const answer = await response.json();
  if (answer.status !== "ok") throw new Error(answer.message);
  return answer;
}

function post(path, body) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify(body || {})});
}

function say(element, text, kind) {
  element.textContent = text;
  element.className = "message " + (kind || "");
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "-";
}

function guarded(task) {  // a poll that fails shows it, never throws into the console
  return async () => {
    try {
      await task();
      $("connection").textContent = "";
    } catch (error) {
      $("connection").textContent = "REST: " + error.message;
    }
  };
}

async function pollWriter() {
  const writer = (await api("writer/status")).writer;
  const badge = $("writer-state");
  badge.textContent = writer.state;
  badge.className = "badge " + writer.state;
  const acquisition = writer.acquisition;
  if (!acquisition) {
    $("acquisition-state").textContent = "no acquisition yet";
    return;
  }
  const stats = acquisition.stats;
  $("acquisition-state").textContent = acquisition.state;
  $("progress").max = stats.n_write_requested || 1;
  $("progress").value = stats.n_write_completed || 0;
  $("progress-text").textContent = `${stats.n_write_completed} of ${stats.n_write_requested}` +
    ` images in ${acquisition.info.output_file}`;
  if (acquisition.message) {
    say($("writer-message"), acquisition.message,
        acquisition.state === "FAILED" ? "error" : "ok");
  }
}

async function pollServices() {
  const answer = await api("daq/services");
  const buffer = answer.buffer;
  $("buffer-line").textContent = (buffer.connected ? "detector buffer up" : "detector buffer down") +
    (buffer.acquiring ? ", images arriving" : ", no images") +
    ` - ${buffer.images} images, ${buffer.rate.toFixed(0)}/s, ${buffer.flagged} flagged, ` +
    `${buffer.lost} lost, last id ${buffer.last_image_id}`;
  const rows = answer.services.map((service) => {
    const age = service.heartbeat_age_s === null ? "none" : service.heartbeat_age_s.toFixed(1) + " s ago";
    return `<tr><td>${escape(service.service_name)}</td><td>${escape(service.state || "-")}</td>` +
      `<td class="${service.alive ? "alive" : "dead"}">${age}</td>` +
      `<td>${escape(service.last_error || "")}</td></tr>`;
  });
  $("services").tBodies[0].innerHTML = rows.join("") ||
    "<tr><td colspan=4>no service of this detector reports in Redis</td></tr>";
}

function escape(text) {
  const span = document.createElement("span");
  span.textContent = String(text);
  return span.innerHTML;
}

async function pollLive() {
  const parameters = new URLSearchParams({cmap: $("cmap").value, size: "400",
                                          when_missing: "empty"});
  for (const limit of ["low", "high"]) {
    const value = $(limit).value.trim();
    if (value !== "" && !isNaN(Number(value))) parameters.set(limit, value);
  }
  const response = await fetch("daq/live/image?" + parameters);
  if (response.status === 204) {
    $("live-info").textContent = "no image in the buffer yet";
    return;
  }
  if (!response.ok) {
    $("live-info").textContent = (await response.json()).message;
    return;
  }
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const image = $("live");
  image.src = url;
  image.dataset.imageId = response.headers.get("X-Image-Id");
  if (liveUrl) URL.revokeObjectURL(liveUrl);
  liveUrl = url;
  $("live-info").textContent = `image ${image.dataset.imageId}, colour scale ` +
    `${response.headers.get("X-Low")} .. ${response.headers.get("X-High")}`;
}

async function pollRates() {
  const history = (await api("daq/stats/history")).history;
  const canvas = $("rates");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!history.length) return;
  const top = Math.max(1, ...history.map((s) => Math.max(s.detector, s.writer, s.lost)));
  const span = Math.max(60, history[history.length - 1].time - history[0].time);
  const end = history[history.length - 1].time;
  const x = (t) => canvas.width - 4 - (end - t) / span * (canvas.width - 40);
  const y = (v) => canvas.height - 16 - v / top * (canvas.height - 30);
  context.fillStyle = "#666";
  context.font = "11px sans-serif";
  context.fillText(top.toFixed(0) + "/s", 2, 12);
  context.fillText(`${(span / 60).toFixed(1)} min`, 2, canvas.height - 3);
  for (const [key, colour] of [["detector", "#1565c0"], ["writer", "#2e7d32"],
                                ["lost", "#c62828"]]) {
    context.strokeStyle = colour;
    context.beginPath();
    history.forEach((sample, i) => {
      const point = [x(sample.time), y(sample[key])];
      if (i) context.lineTo(...point); else context.moveTo(...point);
    });
    context.stroke();
  }
  const last = history[history.length - 1];
  $("rates-line").textContent = `now: detector ${last.detector.toFixed(0)}/s, ` +
    `writer ${last.writer.toFixed(0)}/s, lost or flagged ${last.lost.toFixed(0)}/s`;
}

async function pollLogs() {
  const logs = (await api("daq/logs/10")).logs;
  $("logs").tBodies[0].innerHTML = logs.map((entry) =>
    `<tr><td>${escape(entry.info.output_file)}</td><td>${entry.stats.n_write_completed}` +
    ` of ${entry.stats.n_write_requested}</td><td>${escape(entry.message)}</td>` +
    `<td>${when(entry.stats.stop_time)}</td></tr>`).join("") ||
    "<tr><td colspan=4>no acquisition yet</td></tr>";
}

async function loadConfig() {
  const answer = await api("daq/config");
  configShown = answer.config;
  $("detector-name").textContent = answer.config.detector_name;
  const form = $("config-form");
  form.innerHTML = "";
  for (const [field, value] of Object.entries(answer.config)) {
    const row = document.createElement("div");
    row.className = "field";
    const label = document.createElement("label");
    label.textContent = field;
    label.htmlFor = "cfg-" + field;
    const structured = value !== null && typeof value === "object";
    const input = document.createElement(structured ? "textarea" : "input");
    input.id = "cfg-" + field;
    input.dataset.field = field;
    input.dataset.kind = structured ? "json" : typeof value;
    input.value = structured ? JSON.stringify(value) : String(value);
    const error = document.createElement("span");
    error.className = "field-error";
    error.id = "err-" + field;
    row.append(label, input, error);
    form.append(row);
  }
  await showDeployment();
}

function parsed(input) {
  const text = input.value;
  if (input.dataset.kind === "json") return JSON.parse(text);
  if (input.dataset.kind === "number") return text.trim() === "" ? text : Number(text);
  if (input.dataset.kind === "boolean") return text === "true";
  return text;
}

async function applyConfig() {
  document.querySelectorAll(".field-error").forEach((element) => { element.textContent = ""; });
  const changes = {};
  for (const input of document.querySelectorAll("#config-form [data-field]")) {
    let value;
    try {
      value = parsed(input);
    } catch (error) {
      $("err-" + input.dataset.field).textContent = "not valid JSON: " + error.message;
      return;
    }
    if (JSON.stringify(value) !== JSON.stringify(configShown[input.dataset.field])) {
      changes[input.dataset.field] = value;
    }
  }
  if (!Object.keys(changes).length) {
    say($("config-message"), "nothing changed", "");
    return;
  }
  try {
    await post("daq/config", changes);
    say($("config-message"), "config published: " + Object.keys(changes).join(", "), "ok");
    setTimeout(guarded(loadConfig), 1500);
  } catch (error) {
    showConfigErrors(error.message);
  }
}

function showConfigErrors(message) {
  const general = [];
  for (const line of message.split("\n")) {
    const match = line.match(/^\s*(?:-\s*)?([A-Za-z_][\w.]*):\s*(.*)$/);
    const field = match && document.getElementById("err-" + match[1].split(".")[0]);
    if (field) field.textContent = match[2]; else general.push(line);
  }
  say($("config-message"), general.join(" ").trim() || "see the fields above", "error");
}

async function showDeployment() {
  const deployment = (await api("daq/deployment")).deployment;
  $("deployment").textContent = `deployment ${deployment.config_id || "-"}: ` +
    `${deployment.status} (${deployment.message})`;
}

async function startWriting() {
  try {
    const writer = (await post("writer/write_async", {
      output_file: $("output-file").value.trim(),
      n_images: Number($("n-images").value)})).writer;
    say($("action-message"), "writing started: " + writer.acquisition.info.output_file, "ok");
  } catch (error) {
    say($("action-message"), error.message, "error");
  }
}

async function stopWriting() {
  try {
    await post("writer/stop");
    say($("action-message"), "writing stopped", "ok");
  } catch (error) {
    say($("action-message"), error.message, "error");
  }
}

function every(milliseconds, task) {  // never two runs of one poll at once
  const run = guarded(task);
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try { await run(); } finally { busy = false; }
  };
  tick();
  setInterval(tick, milliseconds);
}

$("start").addEventListener("click", startWriting);
$("stop").addEventListener("click", stopWriting);
$("apply-config").addEventListener("click", (event) => { event.preventDefault(); applyConfig(); });
guarded(loadConfig)();
every(500, pollWriter);
every(2000, pollServices);
every(300, pollLive);
every(2000, pollRates);
every(5000, pollLogs);
every(3000, showDeployment);
