// Opt-in (?record=1 or connect({record: true})): keeps every sample of the remote audio since
// the first track arrived, so a test can run speech recognition on what the browser really heard.
// One AudioContext for the whole call: a resumed call's new stream is recorded after the old
// one (the gap while reconnecting is recorded as the silence it was).
// ScriptProcessorNode is deprecated but needs no separate worklet file and works headless.

const MAX_SECONDS = 300;

export class Recorder {
  attach(stream) {
    if (!this.ctx) this.open();
    this.ctx.resume().catch(() => {});
    if (this.source) this.source.disconnect();
    this.source = this.ctx.createMediaStreamSource(stream);
    this.source.connect(this.node);
  }

  open() {
    this.ctx = new AudioContext();
    this.rate = this.ctx.sampleRate;
    this.chunks = [];
    this.samples = 0;
    this.node = this.ctx.createScriptProcessor(4096, 1, 1);
    this.node.onaudioprocess = (e) => {
      if (this.samples > MAX_SECONDS * this.rate) return;
      const chunk = new Float32Array(e.inputBuffer.getChannelData(0));
      this.chunks.push(chunk);
      this.samples += chunk.length;
    };
    this.node.connect(this.ctx.destination); // a processor only runs when connected
  }

  // Everything so far (also after hangup) as 16-bit little-endian PCM, base64.
  take() {
    if (!this.chunks) return { rate: 0, pcm16_b64: "" };
    const pcm = new Int16Array(this.samples);
    let offset = 0;
    for (const chunk of this.chunks) {
      for (let i = 0; i < chunk.length; i++) pcm[offset + i] = Math.max(-1, Math.min(1, chunk[i])) * 32767;
      offset += chunk.length;
    }
    const bytes = new Uint8Array(pcm.buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return { rate: this.rate, pcm16_b64: btoa(binary) };
  }

  // Samples recorded so far (cheap, unlike take()).
  get length() {
    return this.samples || 0;
  }

  close() {
    if (this.source) this.source.disconnect();
    if (this.node) this.node.disconnect();
    if (this.ctx) this.ctx.close().catch(() => {});
    this.ctx = this.node = this.source = null;
  }
}
