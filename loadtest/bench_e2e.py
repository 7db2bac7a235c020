"""End-to-end turn latency as the browser sees it: end of the user's speech -> first answer audio.

Everything real: `make run`'s stack (``deploy.local``: relay, transceiver with the offline
voice pipeline), headless Chromium (the tests' launcher, ``loadtest/browser.py``) loading the web
client from the transceiver, its fake microphone playing questions spoken by piper, each
followed by enough silence for the answer.

An init script in the page meters, on one AudioContext clock, the local microphone (speech
segments) and the remote audio (answer onsets); each segment also carries the Unix ms at which
its first and last loud blocks reached the page's audio graph, the clock of the transport split
(``loadtest.bench_transport``) and of the barge-ins (``loadtest.bench_bargein``).
Per turn: ``e2e_ms`` = first answer onset after a question's end - that end. The server's
``voicerelay.turn.metrics`` event gives its own window (speech stopped -> first frame out) and
the pipeline's overhead in it, hence the provider time; everything else in ``e2e_ms`` (VAD
end-of-speech wait, network, jitter buffers, pipeline overhead) is "outside providers".

Each media path (``TRANSCEIVER_MEDIA_PATH``: aiortc, lean) runs its own stack: a call of
questions, then a call of barge-ins; with ``--local-llm-path P`` one more stack on path P answers
with the local language model (``PIPELINE_LLM=local``), reported as ``P+local-llm``. The page
asks for the web client's session (semantic_vad: the turn decided by the end-of-turn model);
``turn_decision_ms`` is what is left of ``e2e_ms`` once the server's window and first frame out
-> heard are taken out: the wait for the decision, and the microphone's uplink. The server's
record splits it (``decision_stages``): ``to_last_voiced_ms`` (the uplink and webrtcvad's own
hangover: it calls the voice's quiet tail and some silence after it speech), ``pause_ms`` (the
last voiced frame -> the model asked: the pause it is asked at), ``after_asked_ms`` (-> the turn
ended: the rest of the decision's pause, the model's run, the words before the pause still being
transcribed), with the model's own time (``model_total_ms``: queued, features, run, on its
thread) and when the words were in (``words_after_asked_ms``). ``vad_tail_ms`` is measured on
the questions' audio alone, without the stack: the last loud block (the meter's threshold) ->
the end of the last frame webrtcvad calls speech; it does not depend on the machine's load.

    .venv/bin/python -m loadtest.bench_e2e [--turns N] [--barge-ins N] [--media-path P]...
        [--jitter-target-ms MS] [--local-llm-path P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.launched import launched
from loadtest import bench_bargein as bargein
from loadtest import bench_transport as transport
from loadtest.browser import chromium
from loadtest.voice_audio import Speaker, Utterance
from pipeline.config import VadConfig
from pipeline.vad import webrtc_classifier

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = (
    "What time is it?",
    "Tell me about coffee.",
    "When does the library open?",
    "Tell me about water.",
    "Who are you?",
    "What time is it?",
)
LEAD_S, GAP_S = 3.0, 9.0
SEGMENT_HANGOVER_S = 0.4  # quieter than this for longer ends a segment
LOUD_RMS = 0.01
VAD_RATE_HZ = 16000  # what the server's VAD hears

# Runs before the page's own scripts: meters the microphone and every remote track.
METER_JS = """
(() => {
  const HANGOVER = %(hangover)s, LOUD = %(loud)s;
  const meter = (window.__meter = { mic: [], remote: [], ctx: null });
  function watch(kind, stream) {
    meter.ctx = meter.ctx || new AudioContext();
    meter.ctx.resume().catch(() => {});
    const source = meter.ctx.createMediaStreamSource(stream);
    const node = meter.ctx.createScriptProcessor(512, 1, 1);
    const segments = meter[kind];
    let last = -1;
    node.onaudioprocess = (e) => {
      const x = e.inputBuffer.getChannelData(0);
      let sum = 0;
      for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
      if (Math.sqrt(sum / x.length) < LOUD) return;
      const t = e.playbackTime, end = t + x.length / meter.ctx.sampleRate;
      // [2], [3]: Unix ms at which the block reached the page's audio graph (its callback,
      // less the block), the clock the transport split and the barge-in bench read.
      const now = performance.timeOrigin + performance.now();
      const entered = now - (1000 * x.length) / meter.ctx.sampleRate;
      if (last < 0 || t - last > HANGOVER) segments.push([t, end, entered, now]);
      else Object.assign(segments[segments.length - 1], { 1: end, 3: now });
      last = end;
    };
    source.connect(node);
    node.connect(meter.ctx.destination);
  }
  const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => {
    const s = await gum(c);
    watch("mic", s);
    return s;
  };
  const Native = window.RTCPeerConnection;
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...(meter.configure ? meter.configure(args) : args));
    if (meter.onPeer) meter.onPeer(pc);
    pc.addEventListener("track", (e) => {
      watch("remote", e.streams[0] || new MediaStream([e.track]));
      if (meter.onRemote) meter.onRemote(e);
    });
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""


METRICS_JS = "window.voicerelay.events.filter((e) => e.type === 'voicerelay.turn.metrics')"
SESSION_JS = "window.voicerelay.events.find((e) => e.type === 'session.created').session"


async def _questions_wav(path: Path, turns: int) -> tuple[list[Utterance], list[float]]:
    """The questions' microphone file; its utterances, and each question's ``vad_tail_ms``."""
    parts: list[str | float] = [LEAD_S]
    for i in range(turns):
        parts += [QUESTIONS[i % len(QUESTIONS)], GAP_S]
    async with Speaker() as speaker:
        spoken = await speaker.wav(path, parts)
        said = [await speaker.speak(u.text, VAD_RATE_HZ) for u in spoken]
    return spoken, [vad_tail_ms(pcm) for pcm in said]


def vad_tail_ms(pcm: bytes, rate_hz: int = VAD_RATE_HZ) -> float:
    """How long after the speech's last loud 20 ms block (``LOUD_RMS``) webrtcvad, as the
    server runs it, still calls a frame speech (silence appended, so the tail is complete)."""
    frame_bytes = rate_hz // 50 * 2
    padded = pcm + bytes(frame_bytes * 25)
    frames = [
        padded[i : i + frame_bytes] for i in range(0, len(padded) - frame_bytes + 1, frame_bytes)
    ]
    classify = webrtc_classifier(VadConfig(), rate_hz)
    voiced = [i for i, frame in enumerate(frames) if classify(frame)]
    levels = [np.sqrt(np.mean((np.frombuffer(f, "<i2") / 32768.0) ** 2)) for f in frames]
    loud = [i for i, level in enumerate(levels) if level >= LOUD_RMS]
    if not voiced or not loud:
        return 0.0
    return float((voiced[-1] - loud[-1]) * 20)


async def _run_page(
    url: str, wav: Path, done_js: str, timeout_s: float, jitter_target_ms: float | None
) -> dict[str, Any]:
    """One call whose microphone plays ``wav``, until ``done_js`` holds: what the page measured."""
    async with chromium(wav) as browser:
        page = await browser.new_page()
        script = METER_JS % {"hangover": SEGMENT_HANGOVER_S, "loud": LOUD_RMS}
        await page.add_init_script(script=script + transport.transport_script(jitter_target_ms))
        await page.goto(url)
        await page.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
        await page.evaluate(bargein.STAMP_JS)
        await page.evaluate("window.voicerelay.connect()")
        await page.wait_for_function(done_js, timeout=timeout_s * 1000, polling=250)
        result: dict[str, Any] = await page.evaluate(
            "({mic: __meter.mic, remote: __meter.remote, packets: __meter.packets,"
            " stats: __meter.stats,"
            " stamps: __stamps, latency_s: [__meter.ctx.baseLatency, __meter.ctx.outputLatency],"
            f" metrics: {METRICS_JS}, session: {SESSION_JS}}})"
        )
        await page.evaluate("window.voicerelay.hangup()")
    return result


def turn_latencies(page: dict[str, Any], server_lines: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Pair each question (mic segment) with the first answer onset after it and its metrics;
    with the transceiver's log lines, split first frame out -> heard (``bench_transport``)."""
    mic, remote, metrics = page["mic"], page["remote"], page["metrics"]
    detection = page["session"]["audio"]["input"]["turn_detection"] or {}
    vad_wait_ms = float(detection.get("silence_duration_ms", 0))
    firsts = transport.server_first_audio(server_lines)
    turns = []
    for question, metric in zip(mic, metrics, strict=False):
        answers = [answer for answer in remote if answer[0] >= question[1]]
        if not answers:
            break
        e2e_ms = (answers[0][0] - question[1]) * 1000
        turn = _split(e2e_ms, metric, vad_wait_ms)
        turn.update(_transport(page, firsts, question[3], answers[0][2]))
        turn["turn_decision_ms"] = _decision_ms(turn)
        turn["decision_stages"] = decision_stages(turn["turn_decision_ms"], metric)
        turns.append(turn)
    return turns


def decision_stages(decision_ms: float | None, metric: dict[str, Any]) -> dict[str, Any] | None:
    """``turn_decision_ms`` by stage, from the server's record (times after speech stopped);
    None for a turn the model was not asked about (the silence window ended it)."""
    last_voiced, asked = metric.get("last_voiced_ms"), metric.get("turn_asked_ms")
    timing, words = metric.get("turn_decision") or {}, metric.get("stt_final_ms")
    if last_voiced is None or asked is None or decision_ms is None:
        return None
    scored = timing.get("probability") is not None  # else still running as the turn ended
    parts = [float(timing.get(name) or 0.0) for name in ("queued_ms", "features_ms", "model_ms")]
    model_ms = round(sum(parts), 1) if scored else None
    return {
        "to_last_voiced_ms": round(decision_ms + last_voiced, 1),
        "pause_ms": round(asked - last_voiced, 1),
        "after_asked_ms": round(-asked, 1),
        "model_total_ms": model_ms,
        "model_cpu_ms": timing.get("cpu_ms"),
        "model_queued_ms": timing.get("queued_ms") if scored else None,
        "model_features_ms": timing.get("features_ms") if scored else None,
        "model_run_ms": timing.get("model_ms") if scored else None,
        "model_probability": timing.get("probability"),
        "asked": timing.get("asked"),
        "words_after_asked_ms": None if words is None else round(words - asked, 1),
    }


DECISION_FIELDS = (
    "to_last_voiced_ms",
    "pause_ms",
    "after_asked_ms",
    "model_total_ms",
    "model_features_ms",
    "model_run_ms",
    "model_cpu_ms",
    "words_after_asked_ms",
)


def decision_medians(turns: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each decision stage's median over the turns the model decided."""
    staged = [t["decision_stages"] for t in turns if t.get("decision_stages")]
    medians: dict[str, float | None] = {}
    for name in DECISION_FIELDS:
        values = [s[name] for s in staged if s.get(name) is not None]
        medians[name] = round(statistics.median(values), 1) if values else None
    return medians


def _transport(
    page: dict[str, Any], firsts: list[dict[str, Any]], speech_end_ms: float, heard_ms: float
) -> dict[str, Any]:
    """The answer's first frame out -> heard, by stage, for the answer heard at ``heard_ms``."""
    inside = [f for f in firsts if speech_end_ms <= f["loud_unix_ms"] <= heard_ms]
    server = inside[-1] if inside else None
    packets, stats = page.get("packets") or [], page.get("stats") or []
    return transport.split_turn(server, packets, stats, heard_ms)


def _decision_ms(turn: dict[str, Any]) -> float | None:
    """End of speech -> the server's speech_stopped: the turn decision (and the uplink)."""
    server_ms, heard_ms = turn.get("server_window_ms"), turn.get("frame_out_to_heard_ms")
    if server_ms is None or heard_ms is None:
        return None
    return round(float(turn["e2e_ms"]) - float(server_ms) - float(heard_ms), 1)


def _split(e2e_ms: float, metric: dict[str, Any], vad_wait_ms: float) -> dict[str, Any]:
    """``e2e_ms`` = end-of-speech wait + server window (providers + overhead) + the rest
    (VAD frame granularity, uplink, downlink, jitter buffers, browser playout)."""
    server_ms = metric.get("first_frame_out_ms")
    overhead_ms = metric.get("overhead_ms")
    provider_ms = None if server_ms is None or overhead_ms is None else server_ms - overhead_ms
    outside_ms = None if provider_ms is None else e2e_ms - provider_ms
    rest_ms = None if server_ms is None else e2e_ms - vad_wait_ms - server_ms
    return {
        "e2e_ms": round(e2e_ms, 1),
        "vad_silence_wait_ms": vad_wait_ms,
        "server_window_ms": server_ms,
        "server_overhead_ms": overhead_ms,
        "transport_and_buffers_ms": None if rest_ms is None else round(rest_ms, 1),
        "provider_ms": None if provider_ms is None else round(provider_ms, 1),
        "outside_providers_ms": None if outside_ms is None else round(outside_ms, 1),
        "outside_share": None if outside_ms is None else round(outside_ms / e2e_ms, 3),
        "stt_final_ms": metric.get("stt_final_ms"),
        "llm_first_token_ms": metric.get("llm_first_token_ms"),
        "first_tts_request_ms": metric.get("first_tts_request_ms"),  # the first chunk cut
        "first_audio_ms": metric.get("first_audio_ms"),
    }


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 1) if present else None


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


TRANSPORT_FIELDS = ("frame_out_to_heard_ms", *transport.STAGES, "target_ms")


def summarise(turns: list[dict[str, Any]]) -> dict[str, Any]:
    e2e = [t["e2e_ms"] for t in turns]
    shares = [t["outside_share"] for t in turns if t["outside_share"] is not None]
    outside = [t["outside_providers_ms"] for t in turns if t["outside_providers_ms"] is not None]
    rest = [
        t["transport_and_buffers_ms"] for t in turns if t["transport_and_buffers_ms"] is not None
    ]
    server = [t["server_window_ms"] for t in turns if t["server_window_ms"] is not None]
    return {
        "turns": len(turns),
        "e2e_median_ms": round(statistics.median(e2e), 1) if e2e else None,
        "e2e_p90_ms": round(_p90(e2e), 1) if e2e else None,
        "outside_providers_median_ms": round(statistics.median(outside), 1) if outside else None,
        "outside_providers_share_median": round(statistics.median(shares), 3) if shares else None,
        "server_window_median_ms": round(statistics.median(server), 1) if server else None,
        "transport_and_buffers_median_ms": round(statistics.median(rest), 1) if rest else None,
        "frame_out_to_heard_median": transport.medians(turns, TRANSPORT_FIELDS),
        "turn_decision_median_ms": _median(t.get("turn_decision_ms") for t in turns),
        "decision_stages_median": decision_medians(turns),
        "per_turn": turns,
    }


@dataclass(frozen=True)
class Variant:
    """What a run changes from the defaults: the page's query (the session it asks for) and
    the stack's environment."""

    query: str = ""  # e.g. "?turn_detection=server_vad"
    env: dict[str, str] = field(default_factory=dict)  # e.g. PIPELINE_ANSWER_EARLY=false


async def _bench(
    turns: int,
    barge_ins: int,
    media_path: str,
    jitter_target_ms: float | None,
    llm: str = "rule",
    variant: Variant = Variant(),
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="voicerelay-bench-e2e-") as tmp:
        wav, barge_wav = Path(tmp) / "questions.wav", Path(tmp) / "barge-in.wav"
        spoken, tails_ms = await _questions_wav(wav, turns)
        if barge_ins:
            await bargein.barge_in_wav(barge_wav, barge_ins)
        timeout_s = spoken[-1].end_s + GAP_S + 30.0
        env = {"TRANSCEIVER_MEDIA_PATH": media_path, "PIPELINE_LLM": llm, **variant.env}
        with launched(["--agent", "pipeline", "--no-redis"], env=env) as stack:
            done = f"{METRICS_JS}.length >= {turns}"
            url = stack.url + variant.query
            page = await _run_page(url, wav, done, timeout_s, jitter_target_ms)
            barged = await _barge_in_page(url, barge_wav, barge_ins, jitter_target_ms)
    result = summarise(turn_latencies(page, stack.lines))
    result["vad_tail_ms"] = {"per_question": tails_ms, "median": statistics.median(tails_ms)}
    result["media_path"], result["jitter_target_ms"] = media_path, jitter_target_ms
    result["llm"], result["loadavg"] = llm, _loadavg()
    result["receiver"] = transport.concealment(page.get("stats") or [])
    result["receiver"]["audio_context_latency_s"] = page.get("latency_s")
    if barged is not None:
        result["barge_in"] = bargein.summarise(bargein.barge_ins(barged), barge_ins)
    result["method"] = "browser mic speech end -> first remote audio onset (one AudioContext clock)"
    return result


async def _barge_in_page(
    url: str, wav: Path, barge_ins: int, jitter_target_ms: float | None
) -> dict[str, Any] | None:
    """The barge-in call (``bench_bargein``), unless none was asked for."""
    if not barge_ins:
        return None
    timeout_s = barge_ins * 30.0 + 30.0
    return await _run_page(url, wav, bargein.done_js(barge_ins), timeout_s, jitter_target_ms)


def _loadavg() -> str:
    """The machine's load at the end of a run (``/proc/loadavg``'s 1, 5 and 15 min)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run_e2e_bench(
    turns: int = 6,
    barge_ins: int = 3,
    media_paths: Sequence[str] = ("aiortc", "lean"),
    jitter_target_ms: float | None = None,
    local_llm_path: str | None = "lean",
    variant: Variant = Variant(),
) -> dict[str, Any]:
    """Per media path: median and p90 of the browser-seen turn latency, the share outside
    providers, and first frame out -> heard by stage; then, on ``local_llm_path``, the same
    with the local language model answering (no barge-ins)."""
    results = {
        path: asyncio.run(_bench(turns, barge_ins, path, jitter_target_ms, "rule", variant))
        for path in media_paths
    }
    if local_llm_path is not None:
        local = _bench(turns, 0, local_llm_path, jitter_target_ms, "local", variant)
        results[f"{local_llm_path}+local-llm"] = asyncio.run(local)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_e2e", description=__doc__)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--barge-ins", type=int, default=3)
    parser.add_argument("--media-path", action="append", choices=("aiortc", "lean"))
    parser.add_argument("--jitter-target-ms", type=float, default=None)
    parser.add_argument("--local-llm-path", choices=("aiortc", "lean"), default=None)
    parser.add_argument("--query", default="", help="the page's query, e.g. ?eagerness=high")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the stack")
    args = parser.parse_args(argv)
    paths = args.media_path or ("aiortc", "lean")
    variant = Variant(args.query, dict(item.split("=", 1) for item in args.env))
    result = run_e2e_bench(
        args.turns, args.barge_ins, paths, args.jitter_target_ms, args.local_llm_path, variant
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


DECISION_COLUMNS = (
    ("decision", "turn_decision_ms"),
    ("to voiced", "to_last_voiced_ms"),
    ("pause", "pause_ms"),
    ("after asked", "after_asked_ms"),
    ("model", "model_total_ms"),
    ("model cpu", "model_cpu_ms"),
    ("words", "words_after_asked_ms"),
)


def decision_table(paths: dict[str, dict[str, Any]]) -> str:
    """Per media path, per turn: the turn decision by stage (``decision_stages``)."""
    rows = [["path", "turn", *(name for name, _ in DECISION_COLUMNS)]]
    for path, result in paths.items():
        for index, turn in enumerate(result.get("per_turn", []), 1):
            stages = {**(turn.get("decision_stages") or {}), **turn}
            cells = [stages.get(key) for _, key in DECISION_COLUMNS]
            rows.append([path, str(index), *("-" if c is None else f"{c:.0f}" for c in cells)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    title = (
        "The turn decision, ms (end of speech -> speech_stopped): to the last voiced frame"
        " (uplink, webrtcvad's tail), the pause to the question, after it (the model's run, the"
        " words: when they were in, after the question)"
    )
    return "\n".join([title, *lines])


def e2e_report(paths: dict[str, Any], out_dir: Path) -> str:
    """The per-path tables (turns by stage, barge-ins) as text; the stage figure written to
    ``out_dir/turn-stages.png`` when there is anything to draw."""
    from loadtest import figures

    measured = {name: result for name, result in paths.items() if "per_turn" in result}
    parts = [transport.table(measured), decision_table(measured)]
    for name, result in measured.items():
        if "barge_in" in result:
            parts.append(bargein.text(name, result["barge_in"]))
    figure = figures.turn_stages_figure(measured)
    if figure is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_dir / "turn-stages.png", dpi=figures.DPI)
        figures.close(figure)
        parts.append(f"wrote {out_dir / 'turn-stages.png'}")
    return "\n".join(parts)
