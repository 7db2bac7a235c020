// The call history page: recent call records (GET /v1/calls) and, per call (GET /v1/calls/{id}),
// its transcript with each turn's latency waterfall (the live page's chart, its last row the
// client's own heard time when the client reported one), interruptions, tool calls, the
// retries and fallbacks its providers took, cost, and a plot of voice-to-voice latency.
//
// Trust: call records hold every caller's words, so the server serves them to its API key only
// (an ek_ client secret opens one call, it reads no records). The operator types the key; it is
// kept in this module's memory and sent as a bearer header to this origin only: never stored,
// never in the URL. With auth off (local development) the list loads without a key.
// Every text from a record (transcripts, tool names, providers) is set as textContent.
//
// window.voicerelayHistory, for people and for Playwright tests:
//   load({key}) -> the listed summaries   open(id) -> the shown record   more() next page
//   calls  the summaries listed so far    record  the record shown (or null)
import { renderChart } from "./latency.js";

const $ = (id) => document.getElementById(id);
const CALLS_PATH = "/v1/calls";
const PAGE_SIZE = 20;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { key: "", calls: [], record: null, cursor: null, generation: 0 };

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else node[k] = v;
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function cell(child, attrs = {}) {
  const td = el("td", attrs);
  td.append(child);
  return td;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const msText = (v) => (num(v) === null ? "—" : `${Math.round(v)} ms`);
const usd = (v) => (num(v) === null ? "—" : v === 0 ? "$0" : `$${v < 0.01 ? v.toFixed(5) : v.toFixed(3)}`);
const when = (ms) => (num(ms) === null ? "—" : new Date(ms).toLocaleString());

function duration(record) {
  if (num(record.started_at) === null || num(record.ended_at) === null) return "ongoing";
  const s = Math.max(0, Math.round((record.ended_at - record.started_at) / 1000));
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

async function api(path) {
  const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
  const resp = await fetch(path, { headers, cache: "no-store", referrerPolicy: "no-referrer" });
  const body = await resp.json().catch(() => null);
  if (resp.ok) return body;
  const error = body?.error || {};
  if (resp.status === 401) throw new Error(`${error.code || "unauthorized"}: enter the server's API key`);
  throw new Error(`${resp.status} ${error.code || ""}: ${error.message || "request failed"}`);
}

// --- the list --------------------------------------------------------------------------------

function summaryRow(call) {
  const row = el("tr", { "data-id": call.id, class: "call-row" });
  const open = el("button", { type: "button", class: "link" }, when(call.started_at));
  open.onclick = () => openCall(call.id).catch((err) => showError(err.message));
  row.append(cell(open));
  row.append(el("td", {}, duration(call)));
  row.append(el("td", {}, call.turn_count));
  row.append(el("td", {}, call.status === "ended" ? call.end_reason || "—" : "in progress"));
  row.append(el("td", {}, msText(call.max_latency_ms)));
  row.append(el("td", {}, call.interruptions || ""));
  row.append(el("td", {}, usd(call.cost_usd)));
  return row;
}

async function load({ key = $("api-key").value.trim() } = {}) {
  state.key = key;
  state.calls = [];
  state.cursor = null;
  state.generation += 1;
  $("calls").tBodies[0].replaceChildren();
  $("older").hidden = true;
  return more();
}

// The next page; an answer that arrives after a newer load() began is dropped.
async function more() {
  showError("");
  const generation = state.generation;
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (state.cursor) query.set("after", state.cursor);
  let page;
  try {
    page = await api(`${CALLS_PATH}?${query}`);
  } catch (err) {
    if (generation === state.generation) showError(err.message);
    throw err;
  }
  if (generation !== state.generation) return state.calls;
  state.calls.push(...page.data);
  state.cursor = page.next_cursor;
  $("calls").tBodies[0].append(...page.data.map(summaryRow));
  $("older").hidden = !page.has_more;
  if (!state.calls.length) {
    const empty = el("tr", { class: "empty" });
    empty.append(el("td", { colSpan: 7 }, "no calls yet"));
    $("calls").tBodies[0].append(empty);
  }
  return state.calls;
}

// --- one call --------------------------------------------------------------------------------

// A stored turn's timeline as the live chart's metrics (ms after the turn's origin: speech
// stopped, or for a typed turn the response's creation).
export function chartMetrics(turn) {
  const t = turn.timeline_ms || {};
  return {
    speech_stopped_ms: num(t.speech_stopped) ?? 0,
    stt_final_ms: num(t.stt_final),
    llm_first_token_ms: num(t.llm_first_token),
    first_audio_ms: num(t.first_tts_audio),
    first_frame_out_ms: num(t.first_frame_out),
  };
}

function said(role, text, chars) {
  const entry = el("div", { class: `entry ${role}` });
  entry.append(el("span", { class: "who" }, role === "user" ? "caller" : "agent"));
  if (text === null || text === undefined) entry.append(el("span", { class: "text withheld" }, `(${chars || 0} characters, not kept)`));
  else if (!text) entry.append(el("span", { class: "text withheld" }, "(nothing heard)"));
  else entry.append(el("span", { class: "text" }, text));
  return entry;
}

const END_OF_TURN = {
  server_vad: "ended by the silence window",
  semantic_vad: "ended by the end-of-turn model",
  semantic_vad_timeout: "ended by semantic_vad's silence window",
  commit: "committed by the client",
};

// What ended a spoken turn (records written before end_of_turn: the VAD's silence window).
function endOfTurnText(end, vadSilence) {
  if (end === undefined) return `VAD silence wait ${msText(vadSilence)}`;
  if (end === null) return "no speech";
  const said = END_OF_TURN[end.kind] || `ended by ${end.kind}`;
  const silence = num(end.silence_ms) === null ? "" : ` after ${msText(end.silence_ms)} of silence`;
  const p = num(end.model_probability) === null ? "" : ` (p ${end.model_probability})`;
  return `${said}${silence}${p}`;
}

function stageLine(turn) {
  const parts = Object.entries(turn.stages || {}).map(([stage, s]) => `${stage} ${s.provider}${s.model ? `/${s.model}` : ""}`);
  const lat = turn.latency_ms || {};
  const extra = [
    endOfTurnText(turn.end_of_turn, lat.vad_silence),
    `provider ${msText(lat.provider)}`,
    `overhead ${msText(lat.overhead)}`,
  ];
  return el("p", { class: "turn-stages" }, [...parts, ...extra].join(" · "));
}

function costLine(turn) {
  const cost = turn.cost_usd || {};
  const stages = ["stt", "llm", "tts"].filter((s) => num(cost[s]) !== null).map((s) => `${s} ${usd(cost[s])}`);
  const u = turn.usage || {};
  const usage = `audio in ${u.audio_in_s ?? 0} s, out ${u.audio_out_s ?? 0} s · tokens ${u.input_tokens ?? 0}/${u.output_tokens ?? 0} · ${u.tts_chars ?? 0} chars`;
  return el("p", { class: "turn-cost" }, `cost ${usd(cost.total)}${stages.length ? ` (${stages.join(", ")})` : ""} · ${usage}`);
}

function turnItem(turn) {
  const item = el("li", { class: "turn", "data-index": turn.index });
  const head = el("div", { class: "turn-head" }, `turn ${turn.index} · ${when(turn.at)} · voice to voice ${msText(turn.latency_ms?.voice_to_voice)}`);
  item.append(head, said("user", turn.user, turn.user_chars));
  const answer = said("assistant", turn.assistant, turn.assistant_chars);
  const cut = turn.interrupted;
  if (cut) {
    answer.classList.add("cut");
    const by = cut.by === "user" ? "barge-in" : "cancelled by the client";
    answer.append(el("span", { class: "badge" }, `interrupted (${by}) after ${msText(cut.played_ms)} played`));
  }
  item.append(answer);
  for (const tool of turn.tools || []) {
    const line = `${tool.name} (${tool.side}) ${msText(tool.ms)}${tool.ok ? "" : " · failed"}`;
    item.append(el("div", { class: "entry tool" }, line));
  }
  for (const d of turn.detours || []) item.append(detourLine(d));
  const heard = num(turn.heard?.after_origin_ms);
  const chart = renderChart(chartMetrics(turn), heard, { heardRow: heard !== null, heardLabel: "heard by client" });
  chart.dataset.origin = turn.origin || "";
  item.append(chart, stageLine(turn), costLine(turn));
  return item;
}

// A retry or fallback one of the turn's provider calls took.
function detourLine(d) {
  const path = d.kind === "fallback" ? `${d.from} → ${d.to}` : d.from;
  const tries = `${d.attempts} attempt${d.attempts === 1 ? "" : "s"}`;
  const outcome = d.served ? "" : " · failed";
  return el("div", { class: `entry detour ${d.kind}` }, `${d.stage} ${d.kind}: ${path} after ${tries} (${d.reason})${outcome}`);
}

// Voice-to-voice latency per turn: points on a line, interrupted turns in red.
export function latencyPlot(turns, { width = 360, height = 140 } = {}) {
  const pad = { left: 44, right: 8, top: 8, bottom: 22 };
  const points = turns.map((t) => ({ index: t.index, ms: num(t.latency_ms?.voice_to_voice), cut: !!t.interrupted }));
  const known = points.filter((p) => p.ms !== null);
  const top = Math.max(100, ...known.map((p) => p.ms));
  const first = turns.length ? turns[0].index : 0;
  const span = Math.max(1, (turns.length ? turns[turns.length - 1].index : 0) - first);
  const x = (i) => pad.left + ((i - first) / span) * (width - pad.left - pad.right);
  const y = (v) => pad.top + (1 - v / top) * (height - pad.top - pad.bottom);
  const plot = svg("svg", { class: "latency-plot", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  plot.append(svg("title", {}, "voice-to-voice latency per turn, ms"));
  for (const v of [0, top / 2, top]) {
    plot.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(v), y2: y(v), class: "grid" }));
    plot.append(svg("text", { x: pad.left - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" }, `${Math.round(v)}`));
  }
  plot.append(svg("text", { x: width / 2, y: height - 4, class: "axis", "text-anchor": "middle" }, "turn"));
  if (turns.length) {
    const last = turns[turns.length - 1].index;
    for (const i of first === last ? [first] : [first, last]) {
      plot.append(svg("text", { x: x(i), y: height - 4, class: "axis", "text-anchor": "middle" }, String(i)));
    }
  }
  if (known.length > 1) {
    plot.append(svg("polyline", { points: known.map((p) => `${x(p.index)},${y(p.ms)}`).join(" "), class: "trend" }));
  }
  for (const p of known) {
    const dot = svg("circle", { cx: x(p.index), cy: y(p.ms), r: 4, class: p.cut ? "point cut" : "point", "data-index": p.index });
    dot.append(svg("title", {}, `turn ${p.index}: ${Math.round(p.ms)} ms${p.cut ? " (interrupted)" : ""}`));
    plot.append(dot);
  }
  return plot;
}

function facts(record) {
  const list = $("call-facts");
  list.replaceChildren();
  const add = (name, value) => list.append(el("dt", {}, name), el("dd", {}, value));
  add("started", when(record.started_at));
  add("duration", duration(record));
  add("end", record.status === "ended" ? record.end_reason || "—" : "in progress");
  add("turns", `${record.turn_count}${record.turns_trimmed ? ` (${record.turns_trimmed} oldest trimmed)` : ""}`);
  add("interruptions", String(record.interruptions));
  add("tool calls", String(record.tool_calls));
  add("cost", usd(record.cost_usd));
  add("transceivers", (record.transceivers || []).join(", ") || "—");
  const legs = (record.legs || []).map((l) => `${l.call_id} ${l.end_reason || "running"}${l.resumed_from ? ` (resumed from ${l.resumed_from})` : ""}`);
  add("legs", legs.join("; ") || "—");
  add("config versions", (record.config_versions || []).map((v) => `${v.hash} from turn ${v.from_turn ?? 1}`).join("; ") || "—");
}

async function openCall(id) {
  showError("");
  let record;
  try {
    record = await api(`${CALLS_PATH}/${encodeURIComponent(id)}`);
  } catch (err) {
    showError(err.message);
    throw err;
  }
  state.record = record;
  $("call-id").textContent = record.id;
  facts(record);
  const turns = record.turns || [];
  $("plot").replaceChildren(turns.length ? latencyPlot(turns) : el("p", { class: "hint" }, "no turns"));
  $("turns").replaceChildren(...turns.map(turnItem));
  $("call").hidden = false;
  document.querySelectorAll("#calls tr.selected").forEach((r) => r.classList.remove("selected"));
  document.querySelector(`#calls tr[data-id="${CSS.escape(record.id)}"]`)?.classList.add("selected");
  window.history.replaceState(null, "", `#${encodeURIComponent(record.id)}`);
  return record;
}

$("access").onsubmit = (e) => {
  e.preventDefault();
  load().catch(() => {});
};
$("older").onclick = () => more().catch(() => {});

window.voicerelayHistory = {
  load,
  more,
  open: openCall,
  get calls() {
    return state.calls;
  },
  get record() {
    return state.record;
  },
};

// Without auth (local development) the list needs no key: try once; a 401 asks for the key.
load({ key: "" })
  .then(() => {
    const wanted = decodeURIComponent(window.location.hash.slice(1));
    if (wanted) return openCall(wanted);
  })
  .catch(() => {});
