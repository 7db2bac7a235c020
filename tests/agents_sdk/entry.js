// OpenAI's own Realtime client (@openai/agents-realtime) pointed at voicerelay, for Chromium
// tests. Bundled at test time by tests/agents_sdk.py into one IIFE; never committed.
//
// window.runAgent({baseUrl, apiKey, instructions?, tools?, model?, connectTimeoutMs?})
//   connects a RealtimeSession over WebRTC to `${baseUrl}/v1/realtime/calls` (or to baseUrl
//   itself if it already names the calls endpoint) and resolves with {callId, status}.
// Recorded for the test, in order:
//   window.agentEvents    every server event the transport parsed (the SDK's '*' stream)
//   window.agentSent      every client event the SDK sent on the data channel
//   window.agentRequests  every HTTP request the page made (method, url, headers, status)
//   window.agentErrors    every 'error' the session emitted, as text
//   window.agentToolCalls every client-executed tool call {name, args}
// window.stopAgent() closes the session.
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession, tool } from "@openai/agents-realtime";

const CALLS_PATH = "/v1/realtime/calls";

window.agentEvents = [];
window.agentSent = [];
window.agentRequests = [];
window.agentErrors = [];
window.agentToolCalls = [];
window.agentSession = null;

function recordDataChannelSends() {
  const send = RTCDataChannel.prototype.send;
  RTCDataChannel.prototype.send = function (data) {
    try {
      window.agentSent.push(typeof data === "string" ? JSON.parse(data) : { binary: true });
    } catch {
      window.agentSent.push({ unparsed: String(data) });
    }
    return send.call(this, data);
  };
}

function recordFetches() {
  const fetch = window.fetch.bind(window);
  window.fetch = async (input, init = {}) => {
    const entry = {
      method: init.method || "GET",
      url: String(input),
      headers: Object.fromEntries(new Headers(init.headers || {}).entries()),
      body_type: typeof init.body === "string" ? "string" : String(init.body),
    };
    window.agentRequests.push(entry);
    const response = await fetch(input, init);
    entry.status = response.status;
    entry.response_headers = Object.fromEntries(response.headers.entries());
    return response;
  };
}

function callsUrl(baseUrl) {
  const trimmed = baseUrl.replace(/\/+$/, "");
  return trimmed.endsWith(CALLS_PATH) ? trimmed : trimmed + CALLS_PATH;
}

// tools: [{name, description, output}] -> client-executed tools answering a fixed output.
function clientTools(specs) {
  return (specs || []).map((spec) =>
    tool({
      name: spec.name,
      description: spec.description || spec.name,
      parameters: { type: "object", properties: {}, required: [], additionalProperties: true },
      strict: false,
      execute: async (args) => {
        window.agentToolCalls.push({ name: spec.name, args });
        return spec.output;
      },
    }),
  );
}

function withDeadline(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

window.runAgent = async function runAgent(options) {
  const agent = new RealtimeAgent({
    name: "voicerelay-test",
    instructions: options.instructions || "You are a helpful voice assistant.",
    tools: clientTools(options.tools),
  });
  const transport = new OpenAIRealtimeWebRTC({
    baseUrl: callsUrl(options.baseUrl),
    audioElement: document.getElementById("remote") || undefined,
  });
  const session = new RealtimeSession(agent, { transport, model: options.model });
  session.on("transport_event", (event) => window.agentEvents.push(event));
  session.on("error", (event) => window.agentErrors.push(String(event?.error?.message || JSON.stringify(event?.error))));
  window.agentSession = session;
  await withDeadline(session.connect({ apiKey: options.apiKey }), options.connectTimeoutMs || 20000, "connect");
  return { callId: transport.callId || null, status: transport.status };
};

window.stopAgent = function stopAgent() {
  if (window.agentSession) window.agentSession.close();
  window.agentSession = null;
};

recordDataChannelSends();
recordFetches();
window.agentsSdkReady = true;
