// The voicerelay web client: wires the call, the transcripts, the latency charts and the log
// to the page, and exposes window.voicerelay for people and for Playwright tests:
//   connect({key, record}) / hangup() / send(evt)   drive a call (send: object or raw string;
//            hangup resolves once the server has ended the call)
//   events   every server event received, in order      sent   every client event sent
//   states   [{at_ms, name, value}] every status change (connection, events, session, call),
//            at_ms = Date.now(); the last MAX_STATES kept
//   turns    [{item_id, response_id, metrics, heard_ms, heard_at_ms, heard}] per turn
//            (heard_at_ms: Date.now() when the answer's first audible sample arrived; heard: the
//            voicerelay.turn.heard event this page sent the server for it, or null)
// The heard time goes to the server (voicerelay.turn.heard, into the call record): in ms after
// this page received the turn's speech_stopped (spoken turns) and the response's
// output_audio_buffer.started; a typed turn's meter is armed by the latter.
//   on(type, fn) -> unsubscribe ("*" for all)   _handle(evt) feed a server event (tests)
//   recording() -> {rate, pcm16_b64} of all remote audio (when connected with record)
//   recordedSamples() -> how many samples recording() would return now (cheap)
//   resumeInfo() -> {sessionId, token} | null   the stored session this page would resume
// Auto-resume: when the connection fails (or stays "disconnected" for DISCONNECTED_GRACE_MS),
// goes silent (no audio packet for SILENT_RESUME_MS: the server sends frames without pause), or
// the server sends voicerelay.session.reconnect (drain), the page re-offers naming its session
// (up to RESUME_ATTEMPTS times) and shows "reconnecting…" then "resumed". The resumed session
// replays its stored conversation, which replaces the transcript shown.
import { Call } from "./call.js";
import { FirstSoundMeter, renderChart } from "./latency.js";
import { Recorder } from "./recorder.js";
import { Transcript } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
const MAX_LOG_LINES = 1000;
const MAX_STATES = 1000;
const DISCONNECTED_GRACE_MS = 2000;
const SILENT_RESUME_MS = 2500;
const SILENCE_POLL_MS = 250;
const RESUME_ATTEMPTS = 5;
const RESUME_BACKOFF_MS = 500;
// The session a new call asks for. semantic_vad: the end-of-turn model decides at a 200 ms
// pause (its "not yet" waits for eagerness auto's 700 ms window), so a finished question is
// answered ~300 ms sooner than with server_vad's 500 ms window, and a sentence paused in the
// middle is cut less often (python -m loadtest.bench_end_of_turn, and _recorded for people's
// speech). ?turn_detection=server_vad asks for the window alone; ?eagerness= sets
// semantic_vad's.
const SESSION = {
  type: "realtime",
  audio: { input: { turn_detection: turnDetection(params) } },
};

const events = [];
const sent = [];
const states = [];
const turns = [];
const listeners = new Map(); // type -> Set(fn)
const transcript = new Transcript($("transcript"));
const meter = new FirstSoundMeter((turn, ms) => {
  const spoken = turn.stopped_at !== null;
  Object.assign(turn, { heard_ms: spoken ? ms : null, heard_at_ms: Date.now(), heard_at: performance.now() });
  renderTurn(turn);
  reportHeard(turn);
});
let recorder = null;
let call = null;
let resumeInfo = null; // {sessionId, token}
let resuming = false;
let disconnectedTimer = null;
let silenceTimer = null;
let replaceTranscript = false; // set by resume: the replayed conversation replaces the shown one
let lastKey = "";

function log(direction, text, cls = "") {
  const line = document.createElement("div");
  line.className = `log-line ${cls}`;
  line.textContent = `${new Date().toISOString().slice(11, 23)} ${direction} ${text}`;
  const box = $("log");
  box.append(line);
  while (box.childElementCount > MAX_LOG_LINES) box.firstElementChild.remove();
  box.scrollTop = box.scrollHeight;
  $("log-count").textContent = String(events.length);
}

function setState(name, value) {
  states.push({ at_ms: Date.now(), name, value });
  if (states.length > MAX_STATES) states.shift();
  if (name === "connection") watchConnection(value);
  const el = $(`state-${name}`);
  if (el) el.textContent = value;
  if (name === "connection") document.body.dataset.connection = value;
  log("·", `${name} ${value}`);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// --- turns and latency -----------------------------------------------------------------------

function newTurn(itemId, stoppedAt = null) {
  return {
    item_id: itemId, response_id: null, metrics: null, heard_ms: null, heard_at_ms: null,
    stopped_at: stoppedAt, started_at: null, heard_at: null, heard: null,
  };
}

const since = (from, to) => (from === null || to < from ? null : Math.round((to - from) * 10) / 10);

// The server keeps this page's heard time in the turn's call record (once per response).
function reportHeard(turn) {
  if (!call || !turn.response_id || turn.heard_at === null || turn.heard) return;
  const heard = {
    type: "voicerelay.turn.heard",
    response_id: turn.response_id,
    after_speech_stopped_ms: since(turn.stopped_at, turn.heard_at),
    after_output_started_ms: since(turn.started_at, turn.heard_at),
  };
  if (heard.after_speech_stopped_ms === null && heard.after_output_started_ms === null) return;
  turn.heard = heard;
  try {
    send(heard);
  } catch (err) {
    log("!", `heard time not sent: ${err.message}`, "log-error");
  }
}

function turnFor(responseId) {
  let turn = turns.find((t) => t.response_id === responseId);
  if (!turn) {
    turn = turns.findLast((t) => !t.response_id) || newTurn(null);
    if (!turns.includes(turn)) turns.push(turn);
    turn.response_id = responseId;
  }
  return turn;
}

function renderTurn(turn) {
  if (!turn.metrics) return;
  const host = transcript.forResponse(turn.response_id)[0]?.el || standaloneTurn(turn);
  host.querySelector("svg.latency")?.remove();
  host.append(renderChart(turn.metrics, turn.heard_ms));
}

function standaloneTurn(turn) {
  turn.el = turn.el || Object.assign(document.createElement("li"), { className: "entry turn" });
  if (!turn.el.isConnected) $("transcript").append(turn.el);
  return turn.el;
}

const TURN_HANDLERS = {
  "input_audio_buffer.speech_stopped": (e) => {
    const turn = newTurn(e.item_id, performance.now());
    turns.push(turn);
    meter.arm(turn);
  },
  "response.created": (e) => reportHeard(turnFor(e.response?.id)),
  "output_audio_buffer.started": (e) => {
    const turn = turnFor(e.response_id);
    turn.started_at = performance.now();
    if (turn.stopped_at === null && turn.heard_at === null) meter.arm(turn); // a typed turn
  },
  "voicerelay.turn.metrics": (e) => {
    const turn = turnFor(e.response_id);
    turn.metrics = e;
    renderTurn(turn);
  },
  "session.created": (e) => {
    if (replaceTranscript) transcript.clear();
    replaceTranscript = false;
    setState("session", e.session?.id || "created");
    const ext = e.voicerelay;
    if (ext?.session_id && ext?.resume_token) resumeInfo = { sessionId: ext.session_id, token: ext.resume_token };
  },
  "voicerelay.session.reconnect": () => resume("the server asked"),
  error: (e) => showError(`${e.error?.code || "error"}: ${e.error?.message || JSON.stringify(e.error)}`),
};

// --- events ----------------------------------------------------------------------------------

function handle(evt) {
  events.push(evt);
  log("⇣", `${evt.type} ${JSON.stringify(evt).slice(0, 300)}`, evt.type === "error" ? "log-error" : "");
  transcript.handle(evt);
  TURN_HANDLERS[evt.type]?.(evt);
  for (const key of [evt.type, "*"]) listeners.get(key)?.forEach((fn) => fn(evt));
}

function send(evt) {
  if (!call) throw new Error("not connected");
  call.send(evt);
  sent.push(evt);
  log("⇡", typeof evt === "string" ? `(raw) ${evt.slice(0, 300)}` : `${evt.type} ${JSON.stringify(evt).slice(0, 300)}`);
}

function on(type, fn) {
  if (!listeners.has(type)) listeners.set(type, new Set());
  listeners.get(type).add(fn);
  return () => listeners.get(type).delete(fn);
}

// --- resume ----------------------------------------------------------------------------------

function watchConnection(state) {
  clearTimeout(disconnectedTimer);
  if (!call || resuming) return;
  if (state === "failed") resume("connection failed");
  if (state === "disconnected") disconnectedTimer = setTimeout(() => resume("connection lost"), DISCONNECTED_GRACE_MS);
}

// Resume when no audio packet arrived for SILENT_RESUME_MS (a dead transceiver is noticed
// long before the browser's ICE gives up on it).
function watchSilence() {
  clearInterval(silenceTimer);
  let last = null;
  let changedAt = performance.now();
  silenceTimer = setInterval(async () => {
    const watched = call;
    if (!watched || resuming) return;
    const packets = await watched.audioPacketsReceived().catch(() => null);
    if (watched !== call || packets === null) return;
    if (packets !== last) {
      last = packets;
      changedAt = performance.now();
    } else if (performance.now() - changedAt > SILENT_RESUME_MS) {
      resume(`no audio from the server for ${SILENT_RESUME_MS / 1000} s`);
    }
  }, SILENCE_POLL_MS);
}

function newCall() {
  return new Call({
    onEvent: handle,
    onRawMessage: (text) => log("⇣", `(not JSON) ${text.slice(0, 300)}`, "log-error"),
    onState: setState,
    onTrack: (stream) => {
      $("remote").srcObject = stream;
      meter.attach(stream);
      recorder?.attach(stream);
    },
  });
}

// Re-offer naming the stored session, a bounded number of times; the conversation continues.
async function resume(why) {
  if (!call || resuming || !resumeInfo) return;
  resuming = true;
  log("!", `reconnecting: ${why}`);
  call.close();
  call = null;
  setState("connection", "reconnecting…");
  for (let attempt = 1; attempt <= RESUME_ATTEMPTS; attempt++) {
    const next = newCall();
    try {
      replaceTranscript = true;
      await next.connect({ key: lastKey, resume: resumeInfo });
      call = next;
      resuming = false;
      setState("connection", "resumed");
      watchSilence();
      return;
    } catch (err) {
      next.close();
      log("!", `resume attempt ${attempt} failed: ${err.message}`, "log-error");
      if (/ (401|403|410) /.test(` ${err.message} `)) break; // refused for good
      await new Promise((done) => setTimeout(done, RESUME_BACKOFF_MS * attempt));
    }
  }
  resuming = false;
  showError("could not resume the session");
  hangup();
}

// --- connect / hang up -----------------------------------------------------------------------

function turnDetection(query) {
  if (query.get("turn_detection") === "server_vad") return { type: "server_vad" };
  return { type: "semantic_vad", eagerness: query.get("eagerness") || "auto" };
}

async function connect({ key = $("key").value.trim(), record = params.has("record") } = {}) {
  if (call) throw new Error("already connected");
  showError("");
  $("talk").disabled = true;
  recorder = record ? new Recorder() : null;
  call = newCall();
  lastKey = key;
  resumeInfo = null;
  setState("connection", "connecting");
  try {
    await call.connect({ key, session: SESSION });
    resumeInfo = call.resume || resumeInfo;
    watchSilence();
    $("hangup").disabled = false;
  } catch (err) {
    showError(err.message);
    hangup();
    throw err;
  }
}

// The user hangs up (the session ends, it cannot be resumed); a resume that moves the session
// only closes its old connection (call.close()). Resolves once the server has the hang-up.
function hangup() {
  clearTimeout(disconnectedTimer);
  clearInterval(silenceTimer);
  const over = call ? call.hangup() : Promise.resolve();
  call = null;
  resumeInfo = null;
  meter.close();
  recorder?.close();
  $("remote").srcObject = null;
  setState("connection", "idle");
  setState("events", "—");
  $("hangup").disabled = true;
  $("talk").disabled = false;
  return over;
}

$("key").value = params.get("key") || "";
$("talk").onclick = () => connect().catch((err) => log("!", err.message, "log-error"));
$("hangup").onclick = hangup;
document.body.dataset.connection = "idle";

window.voicerelay = {
  connect, hangup, send, on, events, sent, states, turns,
  _handle: handle,
  resumeInfo: () => resumeInfo,
  recording: () => (recorder ? recorder.take() : { rate: 0, pcm16_b64: "" }),
  recordedSamples: () => (recorder ? recorder.length : 0),
};
