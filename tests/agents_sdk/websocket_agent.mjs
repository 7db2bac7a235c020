// OpenAI's @openai/agents-realtime in Node, over its WebSocket transport, pointed at voicerelay's
// /v1/realtime: the SDK is unchanged but for the URL it connects to. Run by
// tests/test_agents_js_websocket.py (after tests/agents_sdk.py's npm ci):
//
//   node websocket_agent.mjs '{"url": "ws://HOST/v1/realtime?model=gpt-realtime",
//     "apiKey": "...", "text": "hi there", "questionPcm": "/path/question.pcm",
//     "toolName": "weather", "toolOutput": "sunny", "stepTimeoutMs": 60000}'
//
// A RealtimeAgent with one function tool connects, sends `text` as a message and waits for the
// answer, then sends the spoken question (PCM16 mono at 24 kHz, in 100 ms chunks through
// session.sendAudio) and waits for the tool's round trip and the answer after it. Everything
// seen goes to stdout as JSON lines {"kind": ...}:
//   event      every server event the transport parsed (an audio delta's base64 as its length)
//   audio      the answer's audio as the SDK hands it to the app: {response_id, pcm (base64)}
//   tool_start, tool_end   the SDK's function tool events: {name, arguments, output}
//   error      every 'error' the session emitted, as text
//   step       a step done: {name}
//   history    the session's history at the end
//   failed     why the run stopped early (a step not done in stepTimeoutMs: "timeout: STEP", or
//              connect's error), and the exit code is 1
import { readFileSync } from "node:fs";
import { EventEmitter } from "node:events";
import { RealtimeAgent, RealtimeSession, tool } from "@openai/agents-realtime";

const CHUNK_BYTES = 4800; // 100 ms of PCM16 at 24 kHz

const options = JSON.parse(process.argv[2]);
const changed = new EventEmitter();
const seen = { events: [], toolEnds: 0 };

function emit(kind, fields) {
  process.stdout.write(JSON.stringify({ kind, ...fields }) + "\n");
}

function printable(event) {
  if (event.type !== "response.output_audio.delta") return event;
  return { ...event, delta: Buffer.from(event.delta, "base64").length };
}

function weatherTool() {
  return tool({
    name: options.toolName,
    description: "The weather for what the user asked about.",
    parameters: {
      type: "object",
      properties: { query: { type: "string" } },
      required: ["query"],
      additionalProperties: false,
    },
    execute: async () => options.toolOutput,
  });
}

// `promise`, or a rejection once stepTimeoutMs have passed.
function withDeadline(step, promise) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout: ${step}`)), options.stepTimeoutMs);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

// Resolves once check() is true, checked on every session event; rejects at the deadline.
function until(step, check) {
  return new Promise((resolve, reject) => {
    const test = () => {
      if (!check()) return;
      clearTimeout(timer);
      changed.off("change", test);
      emit("step", { name: step });
      resolve();
    };
    const timer = setTimeout(() => {
      changed.off("change", test);
      reject(new Error(`timeout: ${step}`));
    }, options.stepTimeoutMs);
    changed.on("change", test);
    test();
  });
}

function messageDoneCount() {
  const done = seen.events.filter((e) => e.type === "response.done");
  return done.filter((e) => e.response.output.some((item) => item.type === "message")).length;
}

function record(session) {
  session.on("transport_event", (event) => {
    seen.events.push(event);
    emit("event", { event: printable(event) });
    changed.emit("change");
  });
  session.on("audio", (event) => {
    const pcm = Buffer.from(event.data).toString("base64");
    emit("audio", { response_id: event.responseId, pcm });
  });
  session.on("agent_tool_start", (_context, _agent, used, details) => {
    emit("tool_start", { name: used.name, arguments: details.toolCall.arguments });
  });
  session.on("agent_tool_end", (_context, _agent, used, output, details) => {
    seen.toolEnds += 1;
    emit("tool_end", { name: used.name, arguments: details.toolCall.arguments, output });
    changed.emit("change");
  });
  session.on("error", (event) => {
    const error = event.error;
    emit("error", { message: String(error?.message ?? JSON.stringify(error)) });
  });
}

function sendSpeech(session, pcm) {
  for (let start = 0; start < pcm.length; start += CHUNK_BYTES) {
    const chunk = pcm.subarray(start, start + CHUNK_BYTES);
    session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length));
  }
}

async function converse(session) {
  await withDeadline("connected", session.connect({ apiKey: options.apiKey, url: options.url }));
  emit("step", { name: "connected" });
  session.sendMessage(options.text);
  await until("text answered", () => messageDoneCount() >= 1);
  sendSpeech(session, readFileSync(options.questionPcm));
  await until("tool ended", () => seen.toolEnds >= 1);
  await until("spoken question answered", () => messageDoneCount() >= 2);
}

async function main() {
  const agent = new RealtimeAgent({
    name: "voicerelay-websocket",
    instructions: "Be brief.",
    tools: [weatherTool()],
  });
  const session = new RealtimeSession(agent, { transport: "websocket", model: "gpt-realtime" });
  record(session);
  try {
    await converse(session);
  } catch (error) {
    emit("failed", { reason: String(error?.message ?? error) });
    process.exitCode = 1;
  } finally {
    emit("history", { history: session.history });
    session.close();
  }
}

await main();
