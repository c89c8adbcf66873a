// kvlm's page: a chat over /v1/chat/completions and a live view of the KV cache from GET /kv/state
// and /kv/events (docs/SERVER.md). Plain JavaScript, no framework, nothing fetched but this
// server's own endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("kvlm." + key); return v === null ? fallback : JSON.parse(v); }
    catch (e) { return fallback; }
  },
  set(key, value) { localStorage.setItem("kvlm." + key, JSON.stringify(value)); },
};

// ---- state --------------------------------------------------------------------------------------
let convs = store.get("convs", []);        // [{id, title, system, messages: [{role, content, meta}], seq, usage}]
let current = store.get("current", null);  // the conversation shown
const running = new Map();                 // conversation id -> {ctrl, seq}: generations in flight
let kvState = null;                        // the last GET /kv/state
const finished = [];                       // "finished" events, newest first
let keyWaiters = [];

function apiKey() { return store.get("key", ""); }
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

// Resolves once the user has entered a key (the dialog opens on the first 401).
function askKey() {
  const dlg = $("key-dialog");
  if (!dlg.open) { $("key-input").value = apiKey(); dlg.showModal(); }
  return new Promise((resolve) => keyWaiters.push(resolve));
}
$("key-dialog").addEventListener("close", () => {
  store.set("key", $("key-input").value.trim());
  const w = keyWaiters; keyWaiters = [];
  w.forEach((f) => f());
});
$("key-btn").addEventListener("click", () => askKey());

// fetch with the key; a 401 asks for the key and tries again.
async function api(path, opts = {}) {
  for (;;) {
    const res = await fetch(path, { ...opts, headers: headers(opts.body !== undefined) });
    if (res.status !== 401) return res;
    await askKey();
  }
}

function conv() { return convs.find((c) => c.id === current) || null; }
function save() { store.set("convs", convs); store.set("current", current); }

// ---- conversations ------------------------------------------------------------------------------
function newConv() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6),
              title: "New chat", system: $("system").value, messages: [], seq: null, usage: null };
  convs.unshift(c);
  current = c.id;
  save();
  render();
  return c;
}

function renderConvList() {
  const ul = $("conv-list");
  ul.textContent = "";
  for (const c of convs) {
    const li = document.createElement("li");
    li.className = c.id === current ? "active" : "";
    li.dataset.id = c.id;
    const title = document.createElement("span");
    title.textContent = (running.has(c.id) ? "● " : "") + c.title;
    li.append(title);
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "delete";
    del.addEventListener("click", (e) => {
      e.stopPropagation();
      stopConv(c.id);
      convs = convs.filter((x) => x.id !== c.id);
      if (current === c.id) current = convs.length ? convs[0].id : null;
      save(); render();
    });
    li.append(del);
    li.addEventListener("click", () => { current = c.id; save(); render(); });
    ul.append(li);
  }
}

function renderMessages() {
  const box = $("messages");
  box.textContent = "";
  const c = conv();
  $("system").value = c ? c.system : $("system").value;
  if (!c) return;
  c.messages.forEach((m, i) => {
    const div = document.createElement("div");
    div.className = "msg " + m.role;
    if (m.role === "assistant" && running.has(c.id) && i === c.messages.length - 1)
      div.classList.add("streaming");
    div.textContent = m.content;
    if (m.meta) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = m.meta;
      div.append(meta);
    }
    box.append(div);
  });
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderConvList();
  renderMessages();
  const busy = running.has(current);
  $("stop").disabled = !busy;
  $("send").disabled = busy;
  renderKv();
}

// ---- chat ---------------------------------------------------------------------------------------
// Reads a server-sent-event body, calling onData with each "data:" payload.
async function readSse(res, onData) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n"))
        if (line.startsWith("data: ")) onData(line.slice(6));
    }
  }
}

function chatBody(c) {
  const messages = [];
  if (c.system.trim()) messages.push({ role: "system", content: c.system });
  for (const m of c.messages) if (m.content !== "" || m.role === "user") messages.push({ role: m.role, content: m.content });
  const body = { model: $("model").value || undefined, messages, stream: true,
                 stream_options: { include_usage: true },
                 temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) };
  if ($("ignore-eos").checked) body.ignore_eos = true;
  return body;
}

async function send(text) {
  let c = conv() || newConv();
  if (running.has(c.id)) return;
  c.system = $("system").value;
  if (!c.messages.length) c.title = text.slice(0, 40);
  c.messages.push({ role: "user", content: text });
  const body = chatBody(c);
  const reply = { role: "assistant", content: "", meta: "" };
  c.messages.push(reply);
  const job = { ctrl: new AbortController(), seq: null };
  running.set(c.id, job);
  $("chat-status").textContent = "";
  save(); render();
  const t0 = performance.now();
  let tFirst = 0, n = 0;
  try {
    const res = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: job.ctrl.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + res.status));
    }
    job.seq = Number(res.headers.get("X-Kvlm-Request-Id"));
    c.seq = job.seq;
    await readSse(res, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) { c.usage = chunk.usage; c.positions = chunk.usage.prompt_tokens + chunk.usage.completion_tokens - 1; }
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (!tFirst) tFirst = performance.now();
        ++n;
        reply.content += delta.content;
        if (current === c.id) updateStreaming(reply.content);
      }
    });
    const u = c.usage;
    if (u) reply.meta = `${u.prompt_tokens} prompt tokens (${(u.prompt_tokens_details || {}).cached_tokens || 0} from the prefix cache), ` +
      `${u.completion_tokens} generated; first text after ${Math.round(tFirst - t0)} ms`;
  } catch (e) {
    if (e.name === "AbortError") reply.meta = "stopped";
    else { reply.meta = "error: " + e.message; if (current === c.id) $("chat-status").textContent = e.message; }
  } finally {
    running.delete(c.id);
    save(); render();
    refreshKv();
  }
}

function updateStreaming(text) {
  const last = $("messages").lastElementChild;
  if (last) { last.firstChild ? (last.firstChild.nodeValue = text) : (last.textContent = text); }
  $("messages").scrollTop = $("messages").scrollHeight;
}

// Aborting the fetch closes the connection; the server sees it and cancels the request, so its
// blocks go back to the pool.
function stopConv(id) {
  const job = running.get(id);
  if (job) job.ctrl.abort();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => stopConv(current));
$("new-conv").addEventListener("click", () => newConv());
$("system").addEventListener("change", () => { const c = conv(); if (c) { c.system = $("system").value; save(); } });
for (const id of ["temperature", "max-tokens", "ignore-eos", "model"]) {
  const el = $(id);
  const saved = store.get("setting." + id, null);
  if (saved !== null) { if (el.type === "checkbox") el.checked = saved; else el.value = saved; }
  el.addEventListener("change", () => store.set("setting." + id, el.type === "checkbox" ? el.checked : el.value));
}

// ---- the KV view --------------------------------------------------------------------------------
function human(bytes) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; ++i; }
  return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
}

// The running sequence of the conversation shown, if it is generating now.
function mySeq() {
  const c = conv();
  if (!c || !kvState) return null;
  return kvState.running.find((q) => q.id === c.seq) || null;
}

function renderSummary(s) {
  const k = s.cache, n = s.counters;
  const hit = n.prompt_tokens ? (100 * n.prompt_tokens_cached / n.prompt_tokens).toFixed(0) : 0;
  $("kv-summary").innerHTML = "";
  const lines = [
    `<b>K ${k.type_k}, V ${k.type_v}</b>${k.rotate ? ", rotated" : ""}${k.kivi_residual >= 0 ? ", KIVI residual " + k.kivi_residual : ""}` +
      ` · ${k.block_size} tokens per block · <b>${human(k.bytes_per_token)}</b> per token (all ${s.model.n_layer} layers, K and V)`,
    `used <b>${human(k.bytes_used)}</b> of ${human(k.bytes_total)} · ${s.running.length} running, ${s.waiting.length} queued`,
    `prefix cache: ${n.prompt_tokens_cached} of ${n.prompt_tokens} prompt tokens reused (${hit}%) · ` +
      `${n.preemptions} preemptions · ${n.evicted_tokens} tokens evicted · ${n.generated_tokens} generated`,
  ];
  for (const l of lines) { const d = document.createElement("div"); d.innerHTML = l; $("kv-summary").append(d); }
}

const COLORS = { f: "#e4e4e4", c: "#9ecae1", u: "#fdae6b", r: "#e6550d", s: "#756bb1" };

// One canvas per cache group, a square per block; its data-* attributes count what it shows.
function renderGroup(g, gi, mine) {
  let canvas = document.getElementById("kv-grid-" + gi);
  if (!canvas) {
    const title = document.createElement("div");
    title.className = "group-title";
    title.id = "kv-group-title-" + gi;
    canvas = document.createElement("canvas");
    canvas.className = "grid";
    canvas.id = "kv-grid-" + gi;
    $("kv-groups").append(title, canvas);
  }
  const n = g.states.length;
  const width = Math.max(200, $("kv-groups").clientWidth || 400);
  const cell = Math.max(3, Math.min(14, Math.floor(Math.sqrt((width * 220) / n))));
  const cols = Math.max(1, Math.floor(width / cell));
  const rows = Math.ceil(n / cols);
  canvas.width = cols * cell; canvas.height = rows * cell;
  canvas.style.height = rows * cell * (canvas.clientWidth / canvas.width || 1) + "px";
  const ctx = canvas.getContext("2d");
  const counts = { f: 0, c: 0, u: 0, r: 0, s: 0 };
  for (let b = 0; b < n; ++b) {
    const st = g.states[b];
    counts[st]++;
    ctx.fillStyle = COLORS[st];
    const x = (b % cols) * cell, y = Math.floor(b / cols) * cell;
    ctx.fillRect(x, y, cell - 1, cell - 1);
    if (mine.has(b)) { ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.strokeRect(x + 0.5, y + 0.5, cell - 2, cell - 2); }
  }
  Object.assign(canvas.dataset, { blocks: n, free: counts.f + counts.c, cachedFree: counts.c,
    used: counts.u + counts.r + counts.s, shared: counts.s, mine: mine.size });
  $("kv-group-title-" + gi).textContent = (g.window ? `window of ${g.window} tokens` : "full attention") +
    `: ${g.n_layers} layers, ${n} blocks (${g.n_used} in use, ${g.n_shared} shared, ${g.n_cached_free} cached-free), ` +
    `${human(g.bytes_used)} of ${human(g.bytes_total)}`;
}

function renderSeqs(s) {
  const box = $("kv-seqs");
  box.textContent = "";
  const c = conv();
  for (const q of s.running) {
    const div = document.createElement("div");
    div.className = "seq" + (c && q.id === c.seq ? " mine" : "");
    div.dataset.seqId = q.id;
    div.dataset.cachedBlocks = q.n_cached_blocks;
    const table = q.tables[0];
    div.textContent = `#${q.id}${c && q.id === c.seq ? " (this chat)" : ""}: ${q.n_prompt} prompt tokens ` +
      `(${q.n_cached} from the prefix cache) + ${q.n_generated} generated = ${q.n_held} positions in ` +
      `${table.filter((b) => b >= 0).length} blocks, the last ${q.last_block_fill}/${s.cache.block_size} full`;
    const blocks = document.createElement("div");
    blocks.className = "blocks";
    table.forEach((b, i) => {
      const el = document.createElement("b");
      const shared = b >= 0 && s.groups[0].refs[b] > 1;
      el.className = b < 0 ? "hole" : shared ? "shared" : i < q.n_cached_blocks ? "hit" : "own";
      el.textContent = b < 0 ? "" : b;
      el.title = b < 0 ? "released by the window" :
        `block ${b}, positions ${i * s.cache.block_size}..${(i + 1) * s.cache.block_size - 1}` +
        (shared ? `, shared by ${s.groups[0].refs[b]} sequences` : "") + (i < q.n_cached_blocks ? ", from the prefix cache" : "");
      blocks.append(el);
    });
    div.append(blocks);
    box.append(div);
  }
  for (const w of s.waiting) {
    const div = document.createElement("div");
    div.className = "waiting";
    div.textContent = `queued #${w.id}: ${w.n_prompt} prompt tokens` +
      (w.preempted ? " (preempted: gave its blocks back, will be recomputed)" : " (waiting for free blocks or a slot)");
    box.append(div);
  }
  if (!s.running.length && !s.waiting.length) box.innerHTML = '<div class="note">no sequence is running</div>';
}

function renderRequests() {
  const body = $("kv-requests").tBodies[0];
  body.textContent = "";
  for (const e of finished.slice(0, 12)) {
    const tr = document.createElement("tr");
    for (const v of [e.id, e.finish, e.prompt_tokens, e.cached_tokens, e.completion_tokens,
                     Math.round(e.ttft_s * 1000) + " ms", e.tokens_per_s.toFixed(1)]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    body.append(tr);
  }
}

// What the conversation shown keeps per layer: K and V of every position it holds.
function renderLayers(s) {
  const box = $("kv-layers");
  const c = conv();
  const q = mySeq();
  // Generating: what its blocks hold now; after a turn: the last one seen, or the turn's prompt
  // and reply but the last token (sampled, never fed back).
  if (c && q) c.positions = q.n_held;
  const positions = q ? q.n_held : c && c.positions ? c.positions :
    c && c.usage ? c.usage.prompt_tokens + c.usage.completion_tokens - 1 : 0;
  const m = s.model;
  if (!c || positions <= 0) { box.innerHTML = '<div class="note">send a message to see what its K/V take</div>'; return; }
  const group = m.n_head / m.n_kv_head;
  const perLayer = s.cache.bytes_per_token / m.n_layer;
  let html = `<p class="note">${positions} positions${q ? " (generating now)" : " (after the last turn)"}. ` +
    `Each layer stores K and V as [positions, n_kv_head × head_dim] = [${positions}, ${m.n_kv_head} × ${m.head_dim}]. ` +
    (group > 1 ? `Grouped-query attention: the ${m.n_head} query heads share ${m.n_kv_head} K/V heads (${group} each), ` +
      `so the cache holds ${m.n_kv_head * m.head_dim} values per token and layer for K, and as many for V, instead of ${m.n_head * m.head_dim}.`
      : `Every query head has its own K/V head (no grouped-query attention).`) + `</p>`;
  // Positions a window or context shift dropped from every layer (kvlm serve --kv-window, --keep):
  // the sequence's, kept with the conversation once its turn ends.
  if (c && q) c.dropped = q.n_evicted > 0 ? { begin: q.evict_begin, n: q.n_evicted } : null;
  const ev = c && c.dropped;
  if (ev) html += `<p class="note">The cache evicted positions ${span(ev.begin, ev.begin + ev.n)} from every layer ` +
    `(window with sinks, or context shift): the ${positions} positions held are 0–${ev.begin - 1} and ` +
    `${ev.begin + ev.n}–${positions + ev.n - 1}.</p>`;
  html += "<table><thead><tr><th>layer</th><th>K</th><th>V</th><th>attends to</th><th>dropped</th><th>bytes</th></tr></thead><tbody>";
  for (let il = 0; il < m.n_layer; ++il) {
    const w = (m.layer_window && m.layer_window[il]) || 0;
    const p = w ? Math.min(w, positions) : positions;
    const shape = `[${p}, ${m.n_kv_head}×${m.head_dim}]`;
    // A window layer's blocks before its window go back to the pool: the next token cannot see them.
    const gone = [w && positions > w ? span(0, positions - w) : "", ev ? span(ev.begin, ev.begin + ev.n) : ""];
    html += `<tr><td>${il}</td><td>${shape}</td><td>${shape}</td><td>${w ? "last " + w : "all"}</td>` +
      `<td>${gone.filter((x) => x).join(", ") || "none"}</td><td>${human(perLayer * p)}</td></tr>`;
  }
  box.innerHTML = html + "</tbody></table>";
  fillAttnSelects(m);
}

// Positions [a, b) as "a–(b-1)".
function span(a, b) { return b - a === 1 ? `${a}` : `${a}–${b - 1}`; }

// ---- the attention heatmap (POST /kv/attention) ---------------------------------------------------

function fillAttnSelects(m) {
  const fill = (sel, n, label) => {
    if (sel.options.length === n) return;
    sel.textContent = "";
    for (let i = 0; i < n; ++i) { const o = document.createElement("option"); o.value = i; o.textContent = label(i); sel.append(o); }
  };
  const group = m.n_head / m.n_kv_head;
  fill($("attn-layer"), m.n_layer, (i) => `${i}${m.layer_window && m.layer_window[i] ? " (window " + m.layer_window[i] + ")" : ""}`);
  fill($("attn-head"), m.n_head, (h) => group > 1 ? `${h} (K/V ${Math.floor(h / group)})` : `${h}`);
}

let attnMap = null;  // the map drawn: its tokens and weights, for the hover text

async function showAttention() {
  const c = conv();
  const note = $("attn-note");
  if (!c || !c.messages.some((m) => m.content)) { note.textContent = "send a message first"; return; }
  const req = { messages: chatBody(c).messages.filter((m) => m.content !== ""),
                layer: Number($("attn-layer").value), head: Number($("attn-head").value),
                last: Number($("attn-rows").value) };
  note.textContent = "computing…";
  const res = await api("/kv/attention", { method: "POST", body: JSON.stringify(req) });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) { note.textContent = "error: " + ((body.error && body.error.message) || "HTTP " + res.status); return; }
  attnMap = body;
  drawAttention(body);
}

// Rows: the last tokens (queries), columns: every position (keys); darker is more weight, relative
// to the row's largest (sqrt, so small weights stay visible). Positions beyond the canvas's
// pixels share one column (their max): a narrow column such as the sink's is never scaled away.
function drawAttention(m) {
  const cv = $("attn-map");
  const rows = m.weights.length, cols = Math.min(m.n_pos, Math.max(64, cv.clientWidth || 600)), per = m.n_pos / cols;
  const rowPx = Math.max(2, Math.min(8, Math.floor(240 / rows)));
  cv.width = cols; cv.height = rows * rowPx;
  const ctx = cv.getContext("2d");
  const img = ctx.createImageData(cols, rows * rowPx);
  const colMass = new Float64Array(m.n_pos);
  for (let i = 0; i < rows; ++i) {
    const w = m.weights[i];
    let top = 0;
    for (let j = 0; j < m.n_pos; ++j) { colMass[j] += w[j] / rows; top = Math.max(top, w[j]); }
    for (let x = 0; x < cols; ++x) {
      let v = 0;
      for (let j = Math.floor(x * per); j < Math.max(Math.floor((x + 1) * per), Math.floor(x * per) + 1); ++j) v = Math.max(v, w[j]);
      const t = Math.sqrt(v / (top || 1)), r = 255 - 230 * t, g = 255 - 200 * t, b = 255 - 90 * t;
      for (let y = 0; y < rowPx; ++y) {
        const o = ((i * rowPx + y) * cols + x) * 4;
        img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
  const top = [...colMass.keys()].sort((a, b) => colMass[b] - colMass[a]).slice(0, 3);
  const tok = (j) => JSON.stringify(m.tokens[j]);
  $("attn-note").textContent =
    `layer ${m.layer} (${m.window ? "window " + m.window : "full attention"}), head ${m.head} (reads K/V head ${m.kv_head}): ` +
    `rows are positions ${m.q0}–${m.n_pos - 1}, columns positions 0–${m.n_pos - 1}. ` +
    `Most attended: ${top.map((j) => `${j} ${tok(j)} ${(100 * colMass[j]).toFixed(0)}%`).join(", ")}` +
    (top[0] === 0 ? " — the first token gets far more than its words deserve: an attention sink." : ".");
}

function attentionHover(e) {
  const m = attnMap, cv = $("attn-map");
  if (!m) return;
  const r = cv.getBoundingClientRect();
  const i = Math.floor((e.clientY - r.top) / r.height * m.weights.length);
  const j = Math.floor((e.clientX - r.left) / r.width * m.n_pos);
  if (i < 0 || j < 0 || i >= m.weights.length || j >= m.n_pos) return;
  cv.title = `${m.q0 + i} ${JSON.stringify(m.tokens[m.q0 + i])} → ${j} ${JSON.stringify(m.tokens[j])}: ${m.weights[i][j]}`;
}

function renderKv() {
  const s = kvState;
  if (!s) return;
  $("model-name").textContent = s.model.name;
  renderSummary(s);
  const q = mySeq();
  s.groups.forEach((g, gi) => renderGroup(g, gi, new Set(q ? q.tables[gi].filter((b) => b >= 0) : [])));
  renderSeqs(s);
  renderRequests();
  renderLayers(s);
}

let kvBusy = false, kvAgain = false;
async function refreshKv() {
  if (kvBusy) { kvAgain = true; return; }
  kvBusy = true;
  try {
    const res = await api("/kv/state");
    if (res.ok) { kvState = await res.json(); renderKv(); setConn("ok", "connected"); }
    else setConn("bad", "GET /kv/state: HTTP " + res.status);
  } catch (e) {
    setConn("bad", "server unreachable");
  } finally {
    kvBusy = false;
    if (kvAgain) { kvAgain = false; setTimeout(refreshKv, 150); }
  }
}

function setConn(cls, text) { $("conn").className = "conn " + cls; $("conn").textContent = text; }

function logEvent(e) {
  const li = document.createElement("li");
  const t = e.t !== undefined ? e.t.toFixed(2) + "s " : "";
  const what = {
    admit: () => `admit #${e.id}: ${e.n_prompt} prompt tokens, ${e.n_cached} from the prefix cache, ${e.n_blocks} blocks`,
    blocks: () => `#${e.id} ${e.n_blocks > 0 ? "+" : ""}${e.n_blocks} block${Math.abs(e.n_blocks) === 1 ? "" : "s"} (${e.n_tokens} positions)`,
    evict: () => `#${e.id} evicted ${e.n_tokens} positions (window / context shift)`,
    preempt: () => `#${e.id} preempted: ${e.n_blocks} blocks back to the pool`,
    release: () => `#${e.id} released ${e.n_blocks} blocks`,
    finished: () => `#${e.id} ${e.finish}: ${e.prompt_tokens} prompt (${e.cached_tokens} cached), ${e.completion_tokens} generated, TTFT ${Math.round(e.ttft_s * 1000)} ms, ${e.tokens_per_s.toFixed(1)} tok/s`,
    dropped: () => `${e.n_events} events dropped (this page fell behind)`,
  }[e.type];
  li.textContent = t + (what ? what() : JSON.stringify(e));
  const ol = $("kv-events");
  ol.prepend(li);
  while (ol.children.length > 200) ol.lastChild.remove();
}

// The event stream: fetch (not EventSource, which cannot send the API key), reconnecting.
async function watchEvents() {
  for (;;) {
    try {
      const res = await api("/kv/events");
      if (res.ok) {
        await readSse(res, (data) => {
          const e = JSON.parse(data);
          logEvent(e);
          if (e.type === "finished") { finished.unshift(e); renderRequests(); }
          refreshKv();
        });
      }
    } catch (e) { /* the server went away: try again */ }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function loadModels() {
  const res = await api("/v1/models");
  if (!res.ok) return;
  const list = await res.json();
  const sel = $("model");
  const keep = store.get("setting.model", null);
  sel.textContent = "";
  for (const m of list.data) { const o = document.createElement("option"); o.value = o.textContent = m.id; sel.append(o); }
  if (keep && list.data.some((m) => m.id === keep)) sel.value = keep;
}

if (current && !conv()) current = null;
render();
loadModels().then(() => { refreshKv(); watchEvents(); });
setInterval(refreshKv, 1000);
window.addEventListener("resize", renderKv);
$("attn-go").addEventListener("click", showAttention);
$("attn-map").addEventListener("mousemove", attentionHover);
