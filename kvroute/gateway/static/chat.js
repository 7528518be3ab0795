// kvroute chat page: streams replies from the OpenAI endpoint (fetch + SSE parsing) and shows,
// under every reply, what the KV cache saved. No framework, no build step, nothing external.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), maxTokens: $("max-tokens"), chart: $("ttft-chart"),
  note: $("chart-note"), dot: $("badge-dot"), model: $("badge-model"), fleet: $("badge-fleet"),
};

const state = {
  model: "default",
  history: [],      // {role, content} sent with every request, replies exactly as streamed
  turns: [],        // {ttft, path} per reply of this chat, for the chart
  sessionKey: newKey(),
  controller: null, // AbortController of the request in flight
};

function newKey() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms"; }

// --- badge: model and fleet ---------------------------------------------------------------

async function refreshBadge() {
  try {
    const models = await (await fetch("v1/models")).json();
    if (models.data && models.data.length) state.model = models.data[0].id;
    els.model.textContent = state.model;
  } catch (e) {
    els.model.textContent = "gateway unreachable";
  }
  try {
    const res = await fetch("health");
    const h = await res.json();
    const ok = res.ok && h.status === "ok";
    const n = h.workers || 0;
    els.dot.className = "dot " + (ok ? "ok" : "bad");
    els.fleet.textContent = !h.broker ? "broker not answering"
      : `${n} worker${n === 1 ? "" : "s"}`;
  } catch (e) {
    els.dot.className = "dot bad";
    els.fleet.textContent = "no answer";
  }
}

// --- the TTFT chart -----------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawChart() {
  const c = els.chart;
  c.replaceChildren();
  const turns = state.turns.filter((t) => t.ttft !== null);
  els.note.hidden = turns.length > 1;
  if (!turns.length) return;
  const W = Math.max(200, c.clientWidth || 600), top = 14, bottom = 14, H = 84 - top - bottom;
  c.setAttribute("viewBox", `0 0 ${W} 84`); // one unit a pixel: text is never stretched
  const max = Math.max(...turns.map((t) => t.ttft));
  const slot = W / Math.max(turns.length, 8);
  const bw = Math.max(4, Math.min(46, slot * 0.7));
  c.appendChild(svg("line", { x1: 0, x2: W, y1: top + H, y2: top + H, stroke: "#e3e6ec" }));
  turns.forEach((t, i) => {
    const h = Math.max(2, (t.ttft / max) * H);
    const x = i * slot + (slot - bw) / 2;
    const kind = t.path === "cold" ? "cold" : t.path === "stopped" ? "stopped" : "warm";
    const bar = svg("rect", { x, y: top + H - h, width: bw, height: h, rx: 3, class: "bar " + kind });
    const prompt = t.prompt === null ? "" : `, ${t.prompt} prompt tokens`;
    bar.appendChild(svg("title", {}, `turn ${t.n}: TTFT ${fmtMs(t.ttft)} (${t.path}${prompt})`));
    c.appendChild(bar);
    if (bw >= 18) {
      c.appendChild(svg("text", { x: x + bw / 2, y: top + H - h - 3, "text-anchor": "middle", class: "value" }, Math.round(t.ttft)));
    }
    c.appendChild(svg("text", { x: x + bw / 2, y: 84 - 2, "text-anchor": "middle" }, t.n));
  });
}

// --- messages -----------------------------------------------------------------------------

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  m.appendChild(el("div", "bubble", text));
  els.messages.appendChild(m);
  scrollDown();
  return m;
}

function showError(title, detail) {
  const box = el("div", "error");
  box.appendChild(el("b", "", title));
  box.appendChild(document.createTextNode(detail));
  els.messages.appendChild(box);
  scrollDown();
}

// An OpenAI error object (HTTP body or SSE event) in words a person can act on.
function explain(err, maxTokens) {
  const code = err.code || "";
  if (code === "context_length_exceeded") {
    return ["The chat no longer fits the model's context",
      `${err.n_prompt_tokens} prompt tokens + ${maxTokens} max tokens > ${err.n_ctx} context ` +
      "tokens. Nothing was truncated: start a new chat, or lower max tokens."];
  }
  if (code === "worker_lost") {
    return ["The worker holding this chat was lost",
      "Send again: another worker continues the chat (its first turn there is cold, reason worker_lost)."];
  }
  if (code === "no_worker") {
    return ["No worker is available",
      "The broker has no live worker. Start one (kvroute serve, or kvroute worker), then send again."];
  }
  return [`Request failed${code ? " (" + code + ")" : ""}`, err.message || "unknown error"];
}

function statsLine(box, r) {
  const s = el("div", "stats");
  const put = (label, value, title) => {
    if (s.childNodes.length) s.appendChild(document.createTextNode(" · "));
    const span = el("span");
    if (title) span.title = title;
    if (label) span.appendChild(document.createTextNode(label + " "));
    span.appendChild(el("b", "", value));
    s.appendChild(span);
  };
  if (r.stopped) {
    s.appendChild(el("span", "path stopped", "stopped"));
    s.dataset.stopped = "1";
  }
  if (r.ttft !== null) {
    const worker = r.info ? ` (worker ${fmtMs(r.info.ttft_ms)})` : "";
    put("TTFT", fmtMs(r.ttft), "time to first token, measured here" + worker);
  }
  if (r.usage) {
    const cached = r.usage.prompt_tokens_details ? r.usage.prompt_tokens_details.cached_tokens : 0;
    put("cached", `${cached} / ${r.usage.prompt_tokens}`, "prompt tokens reused from the KV cache");
    s.appendChild(document.createTextNode(" prompt tokens"));
    s.dataset.cached = cached;
    s.dataset.prompt = r.usage.prompt_tokens;
  }
  if (r.info) {
    put("prefill", String(r.info.prefill_tokens), "prompt tokens computed for this turn");
    const n = r.usage ? r.usage.completion_tokens : 0;
    if (n > 1 && r.info.decode_ms > 0) {
      put("", `${((n - 1) * 1000 / r.info.decode_ms).toFixed(0)} tok/s`, "decode speed on the worker");
    }
    put("worker", r.info.worker);
    if (s.childNodes.length) s.appendChild(document.createTextNode(" · "));
    const cold = r.info.path === "cold";
    const path = el("span", "path " + (cold ? "cold" : "warm"),
      cold ? `cold: ${r.info.cold_reason}` : r.info.path);
    path.title = cold ? "nothing reused from the cache" : "only the new text was prefilled";
    s.appendChild(path);
    s.dataset.path = r.info.path;
  } else if (!r.stopped) {
    s.appendChild(el("span", "", "no stats"));
  }
  box.appendChild(s);
}

// --- one turn -----------------------------------------------------------------------------

// Yields the JSON objects of an SSE body ("data: {...}" events; "[DONE]" ends it).
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  els.send.disabled = busy;
  els.stop.hidden = !busy;
  els.send.hidden = busy;
}

async function send(text) {
  const maxTokens = Math.max(1, parseInt(els.maxTokens.value, 10) || 256);
  const history = state.history; // this chat's, even if New chat is pressed meanwhile
  history.push({ role: "user", content: text });
  const userBox = addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const bubble = box.querySelector(".bubble");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const r = { ttft: null, usage: null, info: null, stopped: false };
  let reply = "";
  const t0 = performance.now();
  const fail = (err) => {
    history.pop(); // the user message was not answered: it is not part of the chat
    userBox.classList.add("failed");
    if (!reply) box.remove();
    if (!els.input.value) els.input.value = text;
    const [title, detail] = explain(err, maxTokens);
    showError(title, detail);
  };
  try {
    const res = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", "x-session-id": state.sessionKey },
      body: JSON.stringify({
        model: state.model, messages: history, stream: true, max_tokens: maxTokens,
        temperature: 0, stream_options: { include_usage: true },
      }),
      signal: controller.signal,
    });
    if (!res.ok) {
      let err = { message: `HTTP ${res.status}` };
      try { err = (await res.json()).error || err; } catch (e) { /* not JSON */ }
      fail(err);
      return;
    }
    for await (const ev of sseEvents(res.body)) {
      if (ev.error) { fail(ev.error); return; }
      const choice = ev.choices && ev.choices[0];
      const piece = choice && choice.delta ? choice.delta.content : null;
      if (piece) {
        if (r.ttft === null) r.ttft = performance.now() - t0;
        reply += piece;
        bubble.textContent = reply;
        scrollDown();
      }
      if (ev.usage) r.usage = ev.usage;
      if (ev.kvroute) r.info = ev.kvroute;
    }
    history.push({ role: "assistant", content: reply });
  } catch (e) {
    if (e.name !== "AbortError") { fail({ message: String(e) }); return; }
    // Stopped: the gateway cancels the turn on its worker, which keeps the partial reply.
    r.stopped = true;
    history.push({ role: "assistant", content: reply });
  } finally {
    box.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    els.input.focus();
  }
  if (box.isConnected) {
    statsLine(box, r);
    state.turns.push({
      n: state.turns.length + 1,
      ttft: r.ttft,
      path: r.info ? r.info.path : "stopped",
      prompt: r.usage ? r.usage.prompt_tokens : null,
    });
    drawChart();
    scrollDown();
  }
}

// --- wiring -------------------------------------------------------------------------------

function grow() {
  els.input.style.height = "auto";
  els.input.style.height = Math.min(els.input.scrollHeight, 180) + "px";
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = els.input.value.trim();
  if (!text || state.controller) return;
  els.input.value = "";
  grow();
  send(text);
});
els.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
els.input.addEventListener("input", grow);
els.stop.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
els.newChat.addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.turns = [];
  state.sessionKey = newKey();
  els.messages.replaceChildren();
  drawChart();
  els.input.focus();
});

window.addEventListener("resize", drawChart);
refreshBadge();
setInterval(refreshBadge, 5000);
drawChart();
els.input.focus();
