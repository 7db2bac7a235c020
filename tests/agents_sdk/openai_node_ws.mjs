// The `openai` npm package's OpenAIRealtimeWS (openai/realtime/ws, the `ws`-based client) in
// Node, pointed at voicerelay: the SDK is unchanged but for the client's baseURL. It always
// connects with wss:, so tests/test_agents_js_websocket.py puts TLS in front of the transceiver
// and trusts its certificate with NODE_EXTRA_CA_CERTS:
//
//   node openai_node_ws.mjs '{"baseURL": "https://HOST/v1", "apiKey": "...",
//     "text": "hi there", "questionPcm": "/path/question.pcm", "stepTimeoutMs": 60000}'
//
// A text turn (the user's message, then response.create) and a spoken one (the question, PCM16
// mono at 24 kHz, appended in 100 ms chunks; the server's VAD ends the turn and answers it).
// Everything seen goes to stdout as JSON lines {"kind": ...}:
//   event   every server event the SDK emitted (an audio delta's base64 as its length)
//   error   every 'error' the SDK emitted, as text
//   step    a step done: {name}
//   failed  why the run stopped early ("timeout: STEP"), and the exit code is 1
import { readFileSync } from "node:fs";
import OpenAI from "openai";
import { OpenAIRealtimeWS } from "openai/realtime/ws";

const CHUNK_BYTES = 4800; // 100 ms of PCM16 at 24 kHz
const options = JSON.parse(process.argv[2]);
const seen = [];
const waiters = [];

function emit(kind, fields) {
  process.stdout.write(JSON.stringify({ kind, ...fields }) + "\n");
}

function printable(event) {
  if (event.type !== "response.output_audio.delta") return event;
  return { ...event, delta: Buffer.from(event.delta, "base64").length };
}

// The first event after `from` (an index into `seen`) of type `type`, within the step's time.
function next(step, type, from) {
  const found = seen.slice(from).find((event) => event.type === type);
  if (found) return Promise.resolve(found);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timeout: ${step}`)), options.stepTimeoutMs);
    waiters.push({ type, from, resolve: (event) => (clearTimeout(timer), resolve(event)) });
  });
}

function heard(event) {
  const index = seen.push(event) - 1;
  emit("event", { event: printable(event) });
  for (const waiter of [...waiters]) {
    if (waiter.type === event.type && index >= waiter.from) {
      waiters.splice(waiters.indexOf(waiter), 1);
      waiter.resolve(event);
    }
  }
}

async function textTurn(rt) {
  const from = seen.length;
  const content = [{ type: "input_text", text: options.text }];
  rt.send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
  rt.send({ type: "response.create" });
  await next("text answered", "response.done", from);
  emit("step", { name: "text answered" });
}

async function spokenTurn(rt) {
  const from = seen.length;
  const pcm = readFileSync(options.questionPcm);
  for (let start = 0; start < pcm.length; start += CHUNK_BYTES) {
    const audio = pcm.subarray(start, start + CHUNK_BYTES).toString("base64");
    rt.send({ type: "input_audio_buffer.append", audio });
  }
  const done = "conversation.item.input_audio_transcription.completed";
  const transcribed = await next("spoken question transcribed", done, from);
  await next("spoken question answered", "response.done", seen.indexOf(transcribed));
  emit("step", { name: "spoken question answered" });
}

async function main() {
  const client = new OpenAI({ apiKey: options.apiKey, baseURL: options.baseURL });
  const rt = new OpenAIRealtimeWS({ model: "gpt-realtime" }, client);
  rt.on("event", heard);
  rt.on("error", (error) => emit("error", { error: String(error?.message ?? error) }));
  await new Promise((resolve, reject) => {
    rt.socket.once("open", resolve);
    rt.socket.once("error", reject);
  });
  await next("connected", "session.created", 0);
  emit("step", { name: "connected" });
  try {
    await textTurn(rt);
    await spokenTurn(rt);
  } finally {
    rt.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    emit("failed", { error: String(error?.message ?? error) });
    process.exit(1);
  },
);
