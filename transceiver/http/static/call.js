// One WebRTC call to a Realtime-shaped endpoint: POST the SDP offer to /v1/realtime/calls
// (application/sdp, optional "Authorization: Bearer ek_..."), 201 + SDP answer + Location,
// events as JSON on the "oai-events" data channel, remote audio on a media element.
// No UI here: app.js owns the page.
// Session survival: with Redis, the 201 carries X-Voicerelay-Session and
// X-Voicerelay-Resume-Token (also session.created's "voicerelay" field); connect({resume})
// re-offers naming that session so any transceiver continues the conversation.

export const CALLS_PATH = "/v1/realtime/calls";
const GATHER_TIMEOUT_MS = 1000;
const CONNECT_TIMEOUT_MS = 15000;
const HANGUP_TIMEOUT_MS = 5000;
const QUIET = { onEvent() {}, onRawMessage() {}, onState() {}, onTrack() {} };
export const SESSION_HEADER = "X-Voicerelay-Session";
export const RESUME_TOKEN_HEADER = "X-Voicerelay-Resume-Token";

function gatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

function connected(pc, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`not connected after ${timeoutMs} ms`)), timeoutMs);
    const check = () => {
      if (pc.connectionState === "connected") { clearTimeout(timer); resolve(); }
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        clearTimeout(timer);
        reject(new Error(`connection ${pc.connectionState}`));
      }
    };
    pc.addEventListener("connectionstatechange", check);
    check();
  });
}

async function refusal(resp) {
  const body = await resp.text();
  try {
    const error = JSON.parse(body).error;
    return `${resp.status} ${error.code}: ${error.message}`;
  } catch {
    return `${resp.status} ${body.slice(0, 200)}`;
  }
}

export class Call {
  // handlers: {onEvent(evt), onRawMessage(text), onState(name, value), onTrack(stream)}
  constructor(handlers) {
    this.handlers = handlers;
    this.pc = null;
    this.channel = null;
    this.mic = null;
    this.callUrl = null;
    this.key = "";
    this.resume = null; // {sessionId, token} once the server stored the session
  }

  // resume: {sessionId, token} of an earlier call to continue (null: a new session).
  // session: the session a new call asks for (OpenAI's multipart offer: sdp + session JSON);
  // a resumed one keeps its stored config.
  async connect({ key = "", baseUrl = "", resume = null, session = null } = {}) {
    this.mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    const pc = (this.pc = new RTCPeerConnection({ iceServers: [] }));
    pc.addEventListener("connectionstatechange", () => this.handlers.onState("connection", pc.connectionState));
    pc.ontrack = (e) => this.handlers.onTrack(e.streams[0] || new MediaStream([e.track]));
    this.mic.getTracks().forEach((t) => pc.addTrack(t, this.mic));
    this.openChannel(pc.createDataChannel("oai-events"));
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, GATHER_TIMEOUT_MS);
    this.key = key;
    const headers = { ...this.auth() };
    let body = pc.localDescription.sdp;
    if (resume) {
      headers[SESSION_HEADER] = resume.sessionId;
      headers[RESUME_TOKEN_HEADER] = resume.token;
    }
    if (session && !resume) {
      body = new FormData(); // fetch sets the multipart Content-Type with its boundary
      body.set("sdp", pc.localDescription.sdp);
      body.set("session", JSON.stringify(session));
    } else {
      headers["Content-Type"] = "application/sdp";
    }
    const resp = await fetch(baseUrl + CALLS_PATH, { method: "POST", headers, body });
    if (resp.status !== 201) throw new Error(`offer refused: ${await refusal(resp)}`);
    const sessionId = resp.headers.get(SESSION_HEADER);
    const token = resp.headers.get(RESUME_TOKEN_HEADER);
    if (sessionId && token) this.resume = { sessionId, token };
    const location = resp.headers.get("Location");
    this.callUrl = location ? new URL(location, baseUrl || window.location.href).href : null;
    this.handlers.onState("call", this.callUrl || "(no Location)");
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    await connected(pc, CONNECT_TIMEOUT_MS);
  }

  // Audio RTP packets received so far (the server sends 20 ms frames without pause, silence
  // included), or null before any arrived / when the stats do not say.
  async audioPacketsReceived() {
    if (!this.pc) return null;
    const stats = await this.pc.getStats();
    for (const report of stats.values()) {
      if (report.type === "inbound-rtp" && report.kind === "audio") return report.packetsReceived || null;
    }
    return null;
  }

  auth() {
    return this.key ? { Authorization: `Bearer ${this.key}` } : {};
  }

  openChannel(channel) {
    this.channel = channel;
    channel.onopen = () => this.handlers.onState("events", "open");
    channel.onclose = () => this.handlers.onState("events", "closed");
    channel.onmessage = (e) => {
      let evt;
      try {
        evt = JSON.parse(e.data);
      } catch {
        this.handlers.onRawMessage(String(e.data));
        return;
      }
      this.handlers.onEvent(evt);
    };
  }

  // An object is sent as JSON; a string verbatim (tests send malformed events on purpose).
  send(evt) {
    if (!this.channel || this.channel.readyState !== "open") throw new Error("events channel is not open");
    this.channel.send(typeof evt === "string" ? evt : JSON.stringify(evt));
  }

  // The caller hangs up: the server ends the call and its stored session. Quiet at once (no
  // more events or states, microphone off), but the connection is closed only once the DELETE
  // is answered (or failed): the server takes a peer that leaves without it for a client
  // moving elsewhere, and keeps the session resumable. Resolves when it is over.
  async hangup() {
    const url = this.callUrl;
    this.handlers = QUIET;
    if (this.mic) this.mic.getTracks().forEach((t) => t.stop());
    if (url) {
      const signal = AbortSignal.timeout(HANGUP_TIMEOUT_MS);
      await fetch(url, { method: "DELETE", headers: this.auth(), signal }).catch(() => {});
    }
    this.close();
  }

  // Drop this connection without hanging up (the session is resumed elsewhere).
  close() {
    if (this.channel) this.channel.close();
    if (this.pc) this.pc.close();
    if (this.mic) this.mic.getTracks().forEach((t) => t.stop());
    this.callUrl = this.channel = this.pc = this.mic = null;
  }
}
