// Live transcripts of both sides, built from Realtime GA server events.
// One <li class="entry ROLE"> per conversation item, keyed by item_id. Assistant answers that
// were cut short (output_audio_buffer.cleared, conversation.item.truncated, a cancelled
// response) get class "cut" and a badge; text the server says was never played is struck out.

const WHO = { user: "you", assistant: "agent", tool: "tool" };

export class Transcript {
  constructor(list) {
    this.list = list;
    this.entries = new Map(); // item_id -> entry
  }

  // Forget every entry (a resumed session replays its stored conversation).
  clear() {
    this.list.replaceChildren();
    this.entries.clear();
  }

  entry(itemId, role, responseId) {
    let entry = this.entries.get(itemId);
    if (!entry) {
      entry = this.create(itemId, role);
      this.entries.set(itemId, entry);
    }
    if (responseId) entry.el.dataset.responseId = responseId;
    return entry;
  }

  create(itemId, role) {
    const el = document.createElement("li");
    el.className = `entry ${role} pending`;
    el.dataset.itemId = itemId;
    el.innerHTML = '<span class="who"></span><span class="text"></span><span class="badge"></span>';
    el.querySelector(".who").textContent = WHO[role] || role;
    this.list.append(el);
    el.scrollIntoView({ block: "nearest" });
    return { el, role, text: "", textEl: el.querySelector(".text") };
  }

  append(entry, delta) {
    entry.text += delta || "";
    entry.textEl.textContent = entry.text;
  }

  // The final text; if it is a shorter prefix of what streamed, the rest was never heard.
  finish(entry, final) {
    entry.el.classList.remove("pending");
    if (typeof final !== "string") return;
    const streamed = entry.text;
    entry.text = final;
    if (final.length < streamed.length && streamed.startsWith(final)) {
      entry.textEl.textContent = final;
      const unheard = document.createElement("del");
      unheard.className = "unheard";
      unheard.textContent = streamed.slice(final.length);
      entry.textEl.append(unheard);
      this.cut(entry, "truncated");
    } else {
      entry.textEl.textContent = final;
    }
  }

  cut(entry, label) {
    if (entry.el.classList.contains("cut")) return;
    entry.el.classList.add("cut");
    entry.el.querySelector(".badge").textContent = label;
  }

  forResponse(responseId) {
    const all = [...this.entries.values()].filter((e) => e.role === "assistant");
    if (!responseId) return all.slice(-1);
    return all.filter((e) => e.el.dataset.responseId === responseId);
  }

  handle(evt) {
    const handler = HANDLERS[evt.type];
    if (handler) handler(this, evt);
  }
}

function itemText(item) {
  const parts = (item.content || []).map((p) => p.transcript ?? p.text).filter((t) => typeof t === "string");
  return parts.length ? parts.join(" ") : null;
}

function onItem(t, evt) {
  const item = evt.item || {};
  if (!item.id) return;
  if (item.type === "function_call_output") {
    const entry = t.entry(item.id, "tool");
    t.finish(entry, `→ ${item.output ?? ""}`);
  } else if (item.type === "function_call") {
    onFunctionCall(t, { item_id: item.id, name: item.name, arguments: item.arguments }, evt.type.endsWith(".done"));
  } else if (item.type === "message" && (item.role === "user" || item.role === "assistant")) {
    const entry = t.entry(item.id, item.role, evt.response_id);
    const text = itemText(item);
    if (evt.type.endsWith(".done") || (text && !entry.text)) t.finish(entry, text ?? undefined);
    if (item.status === "incomplete") t.cut(entry, "interrupted");
  }
}

function onFunctionCall(t, evt, done) {
  const entry = t.entry(evt.item_id, "tool", evt.response_id);
  if (evt.name) entry.name = evt.name;
  if (evt.delta !== undefined) entry.args = (entry.args || "") + evt.delta;
  if (evt.arguments !== undefined) entry.args = evt.arguments;
  entry.textEl.textContent = `${entry.name || "function"}(${entry.args || ""})`;
  if (done) entry.el.classList.remove("pending");
}

function cutResponse(t, responseId, label) {
  t.forResponse(responseId).forEach((entry) => t.cut(entry, label));
}

const HANDLERS = {
  "input_audio_buffer.speech_started": (t, e) => t.entry(e.item_id, "user"),
  "conversation.item.input_audio_transcription.delta": (t, e) => t.append(t.entry(e.item_id, "user"), e.delta),
  "conversation.item.input_audio_transcription.completed": (t, e) => t.finish(t.entry(e.item_id, "user"), e.transcript),
  "conversation.item.input_audio_transcription.failed": (t, e) => t.cut(t.entry(e.item_id, "user"), "not transcribed"),
  "conversation.item.created": onItem,
  "conversation.item.added": onItem,
  "conversation.item.done": onItem,
  "conversation.item.retrieved": onItem,
  "response.output_item.added": onItem,
  "response.output_item.done": onItem,
  "response.output_audio_transcript.delta": (t, e) => t.append(t.entry(e.item_id, "assistant", e.response_id), e.delta),
  "response.output_audio_transcript.done": (t, e) => t.finish(t.entry(e.item_id, "assistant", e.response_id), e.transcript),
  "response.output_text.delta": (t, e) => t.append(t.entry(e.item_id, "assistant", e.response_id), e.delta),
  "response.output_text.done": (t, e) => t.finish(t.entry(e.item_id, "assistant", e.response_id), e.text),
  "response.function_call_arguments.delta": (t, e) => onFunctionCall(t, e, false),
  "response.function_call_arguments.done": (t, e) => onFunctionCall(t, e, true),
  "output_audio_buffer.cleared": (t, e) => cutResponse(t, e.response_id, "interrupted"),
  "conversation.item.truncated": (t, e) =>
    t.cut(t.entry(e.item_id, "assistant"), `truncated at ${((e.audio_end_ms || 0) / 1000).toFixed(1)} s`),
  "response.done": (t, e) => {
    const status = e.response?.status;
    if (status === "cancelled" || status === "incomplete" || status === "failed") cutResponse(t, e.response?.id, status);
    t.forResponse(e.response?.id).forEach((entry) => entry.el.classList.remove("pending"));
  },
};
