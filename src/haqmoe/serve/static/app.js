// haqmoe serve's built-in page: a chat over /v1/chat/completions (SSE streaming, the model's chat
// template applied by the server) and a live panel polling /v1/haqmoe/telemetry. No dependencies,
// no network beyond this server. With API keys, the key typed here is kept in this tab's
// sessionStorage and sent as "Authorization: Bearer KEY" on every API call.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null, pollTimer: null, lastOk: 0 };

function apiKey() { return sessionStorage.getItem("haqmoe-key") || ""; }
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n.toFixed(0)) + " " + units[i];
}
function fmtPct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %"; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function explain(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || resp.statusText; }
  catch (e) { return resp.status + " " + resp.statusText; }
}

// ------------------------------------------------------------------ chat
async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.dataset.streaming = "1";
  const body = out.querySelector(".body");
  const stops = $("stop").value.split("|").map((s) => s).filter((s) => s.length > 0);
  const req = {
    model: state.model, messages: state.history, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 128,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top-p").value),
  };
  if (stops.length) req.stop = stops.slice(0, 4);
  state.controller = new AbortController();
  $("send").disabled = true; $("stop-gen").disabled = false;
  $("chat-status").textContent = "waiting for the first token…";
  const t0 = performance.now();
  let first = null, finish = null, usage = null, answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(req), signal: state.controller.signal,
    });
    if (!resp.ok) throw new Error(await explain(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          for (const c of msg.choices || []) {
            const delta = (c.delta && c.delta.content) || "";
            if (delta) {
              if (first === null) first = performance.now();
              answer += delta;
              body.textContent = answer;
              $("messages").scrollTop = $("messages").scrollHeight;
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    state.history.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
      if (answer) state.history.push({ role: "assistant", content: answer });
    } else {
      out.className = "msg error";
      body.textContent = (answer ? answer + "\n" : "") + "Error: " + err.message;
      state.history.pop();  // the question that failed is not part of the conversation
    }
  } finally {
    const secs = (performance.now() - t0) / 1000;
    const meta = document.createElement("span");
    meta.className = "meta";
    const toks = usage ? usage.completion_tokens : null;
    meta.textContent = [finish && "finish: " + finish, toks !== null && toks + " tokens",
      first !== null && "first token " + ((first - t0) / 1000).toFixed(2) + " s",
      secs.toFixed(2) + " s"].filter(Boolean).join(" · ");
    out.appendChild(meta);
    delete out.dataset.streaming;
    out.dataset.done = "1";
    state.controller = null;
    $("send").disabled = false; $("stop-gen").disabled = true;
    $("chat-status").textContent = "";
  }
}

// ------------------------------------------------------------------ live panel
function heat(x) {
  // 0 -> --heat-0, 0.5 -> --heat-50, 1 -> --heat-100 (linear in RGB between the stops)
  const stops = [[251, 224, 154], [224, 138, 60], [140, 28, 19]];
  const t = Math.max(0, Math.min(1, x)) * 2, i = Math.min(1, Math.floor(t)), f = t - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatmap(t) {
  const grid = $("heatmap");
  const { layers, experts } = t.engine;
  const res = t.heatmap.resident, rate = t.heatmap.hit_rate, calls = t.heatmap.calls;
  if (grid.dataset.shape !== layers + "x" + experts) {
    grid.dataset.shape = layers + "x" + experts;
    grid.style.gridTemplateColumns = `3.2rem repeat(${experts}, minmax(10px, 1fr))`;
    grid.textContent = "";
    const corner = document.createElement("div"); corner.className = "rowlabel"; corner.textContent = "layer";
    grid.appendChild(corner);
    for (let e = 0; e < experts; e++) {
      const h = document.createElement("div"); h.className = "collabel";
      h.textContent = experts <= 32 || e % 8 === 0 ? String(e) : "";
      grid.appendChild(h);
    }
    for (let l = 0; l < layers; l++) {
      const lab = document.createElement("div"); lab.className = "rowlabel"; lab.textContent = String(l);
      grid.appendChild(lab);
      for (let e = 0; e < experts; e++) {
        const c = document.createElement("div"); c.className = "cell"; c.id = `cell-${l}-${e}`;
        grid.appendChild(c);
      }
    }
  }
  let resident = 0, called = 0;
  for (let l = 0; l < layers; l++) {
    for (let e = 0; e < experts; e++) {
      const c = $(`cell-${l}-${e}`);
      const r = rate[l][e], n = calls[l][e], on = res[l][e] === 1;
      c.style.background = r < 0 ? "" : heat(r);
      c.classList.toggle("resident", on);
      c.dataset.calls = String(n); c.dataset.resident = on ? "1" : "0";
      c.title = `layer ${l}, expert ${e}: ${n} calls, hit rate ${r < 0 ? "–" : (100 * r).toFixed(0) + " %"}` +
        (on ? ", resident" : "");
      resident += on; called += n > 0;
    }
  }
  grid.dataset.updates = String((parseInt(grid.dataset.updates || "0", 10)) + 1);
  grid.dataset.totalCalls = String(calls.flat().reduce((a, b) => a + b, 0));
  $("heat-note").textContent = t.engine.gpu_tier ? `${resident} resident, ${called} called` :
    "(no GPU tier: every expert runs on the CPU)";
}

function render(t) {
  const s = t.server, e = t.engine, m = t.memory;
  state.model = state.model || t.model;
  $("model-name").textContent = t.model;
  $("m-toks").textContent = s.tok_s.toFixed(1);
  $("m-waiting").textContent = String(s.waiting);
  $("m-batch").textContent = `${s.batch} / ${s.max_batch}` + (s.mean_batch ? ` (mean ${s.mean_batch.toFixed(1)})` : "");
  $("m-hit").textContent = e.gpu_tier ? fmtPct(e.hit_rate) : "no GPU tier";
  $("m-bytes").textContent = fmtBytes(e.bytes_moved);
  $("m-tokens").textContent = String(s.generated_tokens);
  $("m-host").textContent = `${fmtBytes(m.host_rss_bytes)} / ${fmtBytes(m.host_available_bytes)}`;
  if (m.gpu_total_bytes) {
    $("m-gpu-label").textContent = "GPU memory (allocated / total)";
    $("m-gpu").textContent = `${fmtBytes(m.gpu_allocated_bytes)} / ${fmtBytes(m.gpu_total_bytes)}`;
  } else if (m.expert_slots_bytes !== undefined) {
    $("m-gpu-label").textContent = "GPU expert slots" + (m.emulated ? " (emulated)" : "");
    $("m-gpu").textContent = `${fmtBytes(m.experts_resident_bytes)} / ${fmtBytes(m.expert_slots_bytes)}`;
  } else {
    $("m-gpu").textContent = "no GPU tier";
  }
  $("engine-info").textContent = `device ${e.device}${e.emulated_gpu ? " (GPU tier emulated)" : ""} · policy ` +
    `${e.policy} · ${e.layers} MoE layers × ${e.experts} experts, top-${e.top_k}` +
    (e.slots_per_layer ? ` · ${e.slots_per_layer[0]} slots/layer` : "") +
    ` · ${e.cpu_expert_calls} CPU / ${e.gpu_expert_calls} GPU expert calls`;
  drawHeatmap(t);
}

async function poll() {
  try {
    const resp = await fetch("/v1/haqmoe/telemetry", { headers: headers(false), cache: "no-store" });
    if (resp.status === 401) {
      $("live-state").textContent = "needs an API key";
      $("key-state").textContent = apiKey() ? "key refused" : "this server needs an API key";
    } else if (!resp.ok) {
      $("live-state").textContent = await explain(resp);
    } else {
      render(await resp.json());
      state.lastOk = Date.now();
      $("live-state").textContent = "updated " + new Date().toLocaleTimeString();
      if (apiKey()) $("key-state").textContent = "key accepted";
    }
  } catch (err) {
    $("live-state").textContent = "server unreachable";
  }
  state.pollTimer = setTimeout(poll, 1000);
}

function init() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = $("api-key").value.trim();
    if (k) sessionStorage.setItem("haqmoe-key", k); else sessionStorage.removeItem("haqmoe-key");
    $("key-state").textContent = k ? "key set" : "no key";
    clearTimeout(state.pollTimer); poll();
  });
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop-gen").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => { state.history = []; $("messages").textContent = ""; });
  poll();
}

init();
