"""Where the time between the server's first answer frame and the browser hearing it goes.

Used by ``loadtest.bench_e2e``. Three sources, all on Unix milliseconds on this one machine:

- the transceiver's log: ``audio.AgentVoiceTrack`` logs, per answer, how long its first frame
  waited in the track's queue and when its first loud frame was taken for the encoder
  (``FIRST_AUDIO_LOG``);
- the page's encoded frames (``encodedInsertableStreams``, handed to a worker) are stamped as
  Chromium receives them, before its jitter buffer (NetEq); a frame of ``LOUD_FRAME_BYTES`` or
  more after quiet ones starts a talkspurt (the frames' hop through the worker is part of the
  measured path: it adds a thread hop per frame that a plain page does not have);
- the page's inbound-rtp ``getStats()`` every ``STATS_EVERY_MS`` (jitter buffer delay, target,
  concealment), and the meter's onsets (``bench_e2e.METER_JS``): when the answer's first loud
  block reached the page's audio graph. "Heard" is that moment: the output device's own
  latency (``AudioContext.baseLatency + outputLatency``, recorded) comes after it, for the
  answer as for everything else the page plays.

Per turn, ``frame_out_to_heard_ms`` (the answer's first frame taken for the encoder -> the
meter's onset; the server's ``first_frame_out_ms`` ends where it starts) =
``send_ms`` (-> its first non-silent packet received in the page: encoder, SRTP, relay,
loopback) + ``neteq_ms`` (mean jitter-buffer delay of the samples played in the answer's first
half second, from ``jitterBufferDelay``/``jitterBufferEmittedCount``) + ``quiet_lead_ms`` (first
frame -> first loud frame: the voice's own quiet lead-in, below the meter's threshold) +
``playout_ms`` (the rest: decoding, Chromium's audio rendering into the page's graph). Before
it, on the server: ``track_wait_ms`` (first frame queued -> taken by the sender's tick).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Any

LOUD_FRAME_BYTES = 40  # Opus: a frame of silence or near silence is a few bytes; speech 60+
STATS_EVERY_MS = 50
NETEQ_WINDOW_MS = 500.0  # the answer's first part, over which the jitter-buffer delay is read
FIRST_AUDIO_LOG = re.compile(
    r"first answer audio (?P<response>\S+): queued_wait_ms=(?P<wait>[\d.]+) "
    r"loud_after_ms=(?P<quiet>[\d.]+) loud_unix_s=(?P<loud>[\d.]+)"
)
STAGES = ("track_wait_ms", "quiet_lead_ms", "send_ms", "neteq_ms", "playout_ms")

# Appended to the meter's init script: stamps received frames in a worker, polls getStats.
# ``%(jitter_target)s``: null, or ms for the receiver's jitterBufferTarget.
TRANSPORT_JS = """
(() => {
  const LOUD = %(loud_bytes)s, EVERY = %(every_ms)s, TARGET = %(jitter_target)s;
  const meter = window.__meter;
  Object.assign(meter, { packets: [], stats: [] });
  const epoch = () => performance.timeOrigin + performance.now();
  // Encoded frames reach the worker as transferred streams (RTCRtpScriptTransform delivered
  // no audio frames in this Chromium); the microphone's go straight through.
  const source = `
    const epoch = () => performance.timeOrigin + performance.now();
    function stamp(readable, writable) {
      let quiet = true, last = 0;
      readable.pipeThrough(new TransformStream({ transform(frame, out) {
        const now = epoch(), bytes = frame.data.byteLength;
        const loud = bytes >= ${LOUD};
        if (loud && (quiet || now - last > 100))
          postMessage({ at_ms: now, bytes, rtp: frame.getMetadata().rtpTimestamp });
        quiet = !loud; last = now;
        out.enqueue(frame);
      } })).pipeTo(writable);
    }
    onmessage = ({ data }) => data.stamp ? stamp(data.readable, data.writable)
                                         : data.readable.pipeTo(data.writable);`;
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const worker = new Worker(url);
  worker.onmessage = (e) => meter.packets.push(e.data);
  const hand = (streams, stamp) => worker.postMessage(
    { stamp, readable: streams.readable, writable: streams.writable },
    [streams.readable, streams.writable]);
  meter.configure = ([config, ...rest]) => [{ ...(config || {}), encodedInsertableStreams: true },
                                            ...rest];
  meter.onPeer = (pc) => {
    const addTrack = pc.addTrack.bind(pc);
    pc.addTrack = (...args) => {
      const sender = addTrack(...args);
      hand(sender.createEncodedStreams(), false);
      return sender;
    };
  };
  const FIELDS = ["jitterBufferDelay", "jitterBufferEmittedCount", "jitterBufferTargetDelay",
    "jitterBufferMinimumDelay", "totalSamplesReceived", "concealedSamples",
    "silentConcealedSamples", "concealmentEvents", "insertedSamplesForDeceleration",
    "removedSamplesForAcceleration", "packetsReceived", "packetsLost", "jitter",
    "lastPacketReceivedTimestamp"];
  async function poll(receiver) {
    const report = await receiver.getStats();
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      const row = { at_ms: epoch() };
      for (const f of FIELDS) row[f] = s[f] === undefined ? null : s[f];
      meter.stats.push(row);
    });
  }
  meter.onRemote = (event) => {
    const receiver = event.receiver;
    hand(receiver.createEncodedStreams(), true);
    if (TARGET !== null) receiver.jitterBufferTarget = TARGET;
    setInterval(() => poll(receiver).catch(() => {}), EVERY);
  };
})();
"""


def transport_script(jitter_target_ms: float | None) -> str:
    target = "null" if jitter_target_ms is None else str(jitter_target_ms)
    values = {"loud_bytes": LOUD_FRAME_BYTES, "every_ms": STATS_EVERY_MS, "jitter_target": target}
    return TRANSPORT_JS % values


def server_first_audio(lines: Sequence[str]) -> list[dict[str, Any]]:
    """Every ``first answer audio`` line the transceiver logged, in order."""
    found = []
    for line in lines:
        if match := FIRST_AUDIO_LOG.search(line):
            found.append(
                {
                    "response": match["response"],
                    "queued_wait_ms": float(match["wait"]),
                    "quiet_lead_ms": float(match["quiet"]),
                    "loud_unix_ms": float(match["loud"]) * 1000,
                }
            )
    return found


def neteq_delay_ms(stats: Sequence[dict[str, Any]], from_ms: float) -> dict[str, Any]:
    """The jitter buffer over ``NETEQ_WINDOW_MS`` from ``from_ms``: mean delay of the samples it
    emitted, its target at the start, concealed samples in the window."""
    before = _last_at_or_before(stats, from_ms)
    later = [row for row in stats if row["at_ms"] >= from_ms + NETEQ_WINDOW_MS]
    after = later[0] if later else (stats[-1] if stats else None)
    if before is None or after is None or after is before:
        return {"neteq_ms": None, "target_ms": None, "concealed_samples": None}
    emitted = _delta(after, before, "jitterBufferEmittedCount")
    delay_s = _delta(after, before, "jitterBufferDelay")
    target_s = _delta(after, before, "jitterBufferTargetDelay")
    return {
        "neteq_ms": None if not emitted else round(1000 * delay_s / emitted, 1),
        "target_ms": None if not emitted else round(1000 * target_s / emitted, 1),
        "concealed_samples": _delta(after, before, "concealedSamples"),
    }


def _last_at_or_before(stats: Sequence[dict[str, Any]], at_ms: float) -> dict[str, Any] | None:
    found = None
    for row in stats:
        if row["at_ms"] > at_ms:
            break
        found = row
    return found


def _delta(after: dict[str, Any], before: dict[str, Any], field: str) -> float:
    return float(after.get(field) or 0) - float(before.get(field) or 0)


def split_turn(
    server: dict[str, Any] | None,
    packets: Sequence[dict[str, Any]],
    stats: Sequence[dict[str, Any]],
    heard_unix_ms: float | None,
) -> dict[str, Any]:
    """One answer's first frame out -> heard, by stage (None where a clock is missing)."""
    split: dict[str, Any] = dict.fromkeys(STAGES)
    if server is None or heard_unix_ms is None:
        return split
    taken_ms = server["loud_unix_ms"] - server["quiet_lead_ms"]
    split["track_wait_ms"] = server["queued_wait_ms"]
    split["quiet_lead_ms"] = server["quiet_lead_ms"]
    split["frame_out_to_heard_ms"] = round(heard_unix_ms - taken_ms, 1)
    received = [p for p in packets if taken_ms - 5 <= p["at_ms"] <= heard_unix_ms]
    if not received:
        return split
    arrived_ms = received[0]["at_ms"]
    split["send_ms"] = round(arrived_ms - taken_ms, 1)
    buffer = neteq_delay_ms(stats, arrived_ms)
    split.update(buffer)
    if buffer["neteq_ms"] is not None:
        rest_ms = heard_unix_ms - arrived_ms - buffer["neteq_ms"] - server["quiet_lead_ms"]
        split["playout_ms"] = round(rest_ms, 1)
    return split


def medians(turns: Sequence[dict[str, Any]], fields: Sequence[str]) -> dict[str, float | None]:
    """The median of each field over the turns that have it."""
    out: dict[str, float | None] = {}
    for field in fields:
        values = [t[field] for t in turns if t.get(field) is not None]
        out[field] = round(statistics.median(values), 1) if values else None
    return out


def concealment(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whole-call receiver counters: concealed (underrun) samples against samples received."""
    if not stats:
        return {}
    last = stats[-1]
    received = float(last.get("totalSamplesReceived") or 0)
    concealed = float(last.get("concealedSamples") or 0)
    silent = float(last.get("silentConcealedSamples") or 0)
    return {
        "samples_received": int(received),
        "concealed_samples": int(concealed),
        "concealed_share": round(concealed / received, 4) if received else None,
        "audible_concealed_samples": int(concealed - silent),
        "concealment_events": last.get("concealmentEvents"),
        "jitter_buffer_mean_ms": _mean_delay_ms(last),
    }


def _mean_delay_ms(row: dict[str, Any]) -> float | None:
    emitted = float(row.get("jitterBufferEmittedCount") or 0)
    return round(1000 * float(row.get("jitterBufferDelay") or 0) / emitted, 1) if emitted else None


TABLE_COLUMNS = (
    ("e2e", "e2e_ms"),
    ("decision", "turn_decision_ms"),
    ("server", "server_window_ms"),
    ("stt", "stt_final_ms"),
    ("llm 1st", "llm_first_token_ms"),
    ("tts 1st", "first_audio_ms"),
    ("out->heard", "frame_out_to_heard_ms"),
    ("track wait", "track_wait_ms"),
    ("send", "send_ms"),
    ("NetEq", "neteq_ms"),
    ("NetEq target", "target_ms"),
    ("quiet lead", "quiet_lead_ms"),
    ("playout", "playout_ms"),
)


def table(paths: dict[str, dict[str, Any]]) -> str:
    """Per media path, per turn and median: the turn and its first frame out -> heard split."""
    head = ["path", "turn", *(name for name, _ in TABLE_COLUMNS)]
    rows = [head]
    for path, result in paths.items():
        turns = result.get("per_turn", [])
        for index, turn in enumerate(turns, 1):
            rows.append([path, str(index), *(_cell(turn.get(key)) for _, key in TABLE_COLUMNS)])
        middle = medians(turns, [key for _, key in TABLE_COLUMNS])
        rows.append([path, "p50", *(_cell(middle[key]) for _, key in TABLE_COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    notes = [_receiver_note(path, result.get("receiver") or {}) for path, result in paths.items()]
    return "\n".join(
        [
            "End of speech -> heard in Chromium, ms (first frame out -> heard split; stt, llm 1st"
            " and tts 1st after the turn's decision, negative when done before it)"
        ]
        + lines
        + notes
    )


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def _receiver_note(path: str, receiver: dict[str, Any]) -> str:
    share = receiver.get("concealed_share")
    return (
        f"  {path}: jitter buffer mean {receiver.get('jitter_buffer_mean_ms')} ms over the call;"
        f" concealed {receiver.get('audible_concealed_samples')} audible samples"
        f" ({receiver.get('concealment_events')} events), {share} of all incl. silent"
    )
