// Per-turn latency: the server's voicerelay.turn.metrics record (milliseconds after speech
// stopped) as a small waterfall of 4 bars, plus what this browser measured itself: from the
// speech_stopped event to the first audible sample of the answer ("heard"), a bar from the
// first frame out to it. The history page draws stored turns with the same chart, its heard
// row the client's own report kept in the record (heardLabel "heard by client").

const SVG_NS = "http://www.w3.org/2000/svg";
export const STAGES = [
  // [label, metrics field ending the stage]; each bar starts where the previous one ended.
  ["STT final", "stt_final_ms"],
  ["LLM first token", "llm_first_token_ms"],
  ["first audio", "first_audio_ms"],
  ["first frame out", "first_frame_out_ms"],
];
const WIDTH = 360, LABEL = 110, VALUE = 52, ROW = 16;

function node(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ms(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

// [{label, field, start, end}] with start/end in ms; end null when the server had no value.
export function stages(metrics) {
  let previous = ms(metrics.speech_stopped_ms) ?? 0;
  return STAGES.map(([label, field]) => {
    const end = ms(metrics[field]);
    const row = { label, field, start: previous, end };
    if (end !== null) previous = end;
    return row;
  });
}

export function renderChart(metrics, heardMs, { heardRow = true, heardLabel = "heard here" } = {}) {
  const rows = stages(metrics);
  const ends = rows.map((r) => r.end ?? 0).concat([ms(heardMs) ?? 0, 1]);
  const scale = (WIDTH - LABEL - VALUE) / Math.max(...ends);
  const height = ROW * (rows.length + (heardRow ? 1 : 0));
  const svg = node("svg", { class: "latency", width: WIDTH, height, viewBox: `0 0 ${WIDTH} ${height}`, role: "img" });
  svg.append(node("title", {}, "latency after speech end, ms"));
  rows.forEach((row, i) => {
    const y = i * ROW;
    svg.append(node("text", { x: 0, y: y + 12, class: "lat-label" }, row.label));
    if (row.end !== null) {
      const x = LABEL + row.start * scale;
      const width = Math.max(1, (row.end - row.start) * scale);
      svg.append(node("rect", { x, y: y + 3, width, height: ROW - 6, class: `lat-bar lat-${i}`, "data-field": row.field }));
    }
    const value = row.end === null ? "—" : `${Math.round(row.end)} ms`;
    svg.append(node("text", { x: WIDTH - VALUE + 4, y: y + 12, class: "lat-value" }, value));
  });
  if (!heardRow) return svg;
  const heard = ms(heardMs);
  const y = rows.length * ROW;
  svg.append(node("text", { x: 0, y: y + 12, class: "lat-label" }, heardLabel));
  const out = rows.map((r) => r.end).filter((end) => end !== null).pop() ?? 0;
  if (heard !== null && heard > out) {
    const bar = { x: LABEL + out * scale, y: y + 3, width: Math.max(1, (heard - out) * scale), height: ROW - 6 };
    svg.append(node("rect", { ...bar, class: "lat-bar lat-heard-bar", "data-field": "heard_ms" }));
  }
  if (heard !== null) svg.append(node("line", { x1: LABEL + heard * scale, x2: LABEL + heard * scale, y1: 0, y2: y + ROW, class: "lat-heard" }));
  svg.append(node("text", { x: WIDTH - VALUE + 4, y: y + 12, class: "lat-value" }, heard === null ? "—" : `${Math.round(heard)} ms`));
  return svg;
}

// Watches the remote stream's level; after arm(), reports the ms until it first exceeds the
// threshold (or gives up at the deadline). One shared AudioContext, polled only while armed.
export class FirstSoundMeter {
  constructor(onHeard, { thresholdRms = 0.01, deadlineMs = 20000, pollMs = 5 } = {}) {
    Object.assign(this, { onHeard, thresholdRms, deadlineMs, pollMs });
    this.analyser = null;
    this.timer = null;
  }

  attach(stream) {
    this.ctx = this.ctx || new AudioContext();
    this.ctx.resume().catch(() => {});
    this.analyser = this.ctx.createAnalyser();
    this.analyser.fftSize = 512;
    this.ctx.createMediaStreamSource(stream).connect(this.analyser);
    this.buffer = new Float32Array(this.analyser.fftSize);
  }

  arm(tag) {
    this.disarm();
    if (!this.analyser) return;
    const start = performance.now();
    this.timer = setInterval(() => {
      const elapsed = performance.now() - start;
      if (elapsed > this.deadlineMs) return this.disarm();
      if (this.level() >= this.thresholdRms) {
        this.disarm();
        this.onHeard(tag, elapsed);
      }
    }, this.pollMs);
  }

  level() {
    this.analyser.getFloatTimeDomainData(this.buffer);
    let sum = 0;
    for (const s of this.buffer) sum += s * s;
    return Math.sqrt(sum / this.buffer.length);
  }

  disarm() {
    clearInterval(this.timer);
    this.timer = null;
  }

  close() {
    this.disarm();
    if (this.ctx) this.ctx.close().catch(() => {});
    this.ctx = this.analyser = null;
  }
}
