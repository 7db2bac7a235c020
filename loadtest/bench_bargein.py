"""Barge-in as the browser hears it: the user speaks over a long answer; how soon does it stop?

Used by ``loadtest.bench_e2e`` (a second call on the same stack). The fake microphone asks a
question whose answer is long, then speaks again ``BARGE_AFTER_S`` after the question ends
(while the answer's first sentence plays, unless the server took longer than that to start
it). Per barge-in, on one clock (Unix ms; the meter's segments carry it, ``bench_e2e.METER_JS``):

- ``onset``: the interrupting speech starts (the mic meter);
- ``speech_started``: the page receives ``input_audio_buffer.speech_started``;
- ``cleared``: the page receives ``output_audio_buffer.cleared`` (the server dropped the
  answer's queued audio and stopped sending it);
- ``stopped``: the last audible sample of the answer in the page (the end of the remote
  segment the onset falls in).

``onset_to_stopped_ms`` is the figure the issue sets (<= 150 ms p50), split into
``detect_ms`` (onset -> speech_started: VAD onset window, uplink, data channel),
``clear_ms`` (-> cleared) and ``drain_ms`` (cleared -> stopped: audio already sent, in
Chromium's jitter buffer and playout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import bench_transport as transport
from loadtest.voice_audio import Speaker

LEAD_S = 3.0
LONG_QUESTION = "Tell me about the moon."  # three sentences: about eight seconds of answer
INTERRUPTION = "What time is it?"
# After the question ends: inside the answer's first sentence (piper speaks it in ~3.1 s) for
# an answer that began 0-1.9 s after the question. At 6.0 s the onset fell in the pause between
# the second and third sentences when the answer began ~0.35 s after (the aiortc path: 0 of 3
# barge-ins counted, nothing audible to stop); tests/test_bench_transport.py checks the moment.
BARGE_AFTER_S = 2.0
GAP_S = 8.0  # after the interruption: its own answer, then quiet
SENTENCE_PAUSE_MS = 600.0  # the voice's pauses between sentences are shorter
NEXT_ANSWER_AFTER_MS = 1200.0  # the interruption is longer than this, then VAD and the answer

# Stamps every server event as the page receives it (Unix ms); run once the client is loaded.
STAMP_JS = """
(() => {
  const epoch = () => performance.timeOrigin + performance.now();
  window.__stamps = [];
  window.voicerelay.on("*", (e) => window.__stamps.push([e.type, epoch()]));
})()
"""


async def barge_in_wav(path: Path, count: int) -> None:
    parts: list[str | float] = [LEAD_S]
    for _ in range(count):
        parts += [LONG_QUESTION, BARGE_AFTER_S, INTERRUPTION, GAP_S]
    async with Speaker() as speaker:
        await speaker.wav(path, parts)


def barge_ins(page: dict[str, Any]) -> list[dict[str, Any]]:
    """Each interruption (every second mic segment) that fell inside an answer, by stage."""
    stamps = page.get("stamps") or []
    found = []
    for interruption in page["mic"][1::2]:
        next_ms = _first_after(stamps, "output_audio_buffer.started", interruption[2])
        stopped_ms = answer_stopped_ms(page["remote"], interruption[2], next_ms)
        if stopped_ms is not None and stopped_ms > interruption[2]:  # not silent already
            found.append(_stages(interruption[2], stopped_ms, stamps))
    return found


def answer_stopped_ms(
    remote: Sequence[Sequence[float]], onset_ms: float, next_answer_ms: float | None = None
) -> float | None:
    """The answer's last audible moment (Unix ms) if one was playing at ``onset_ms``, else None.

    Playing: a remote segment began before the onset and ended at most a pause between two
    sentences before it (``SENTENCE_PAUSE_MS``). Its last audible moment: the end of the last
    segment that began before the next answer did (``next_answer_ms``: the page's first
    ``output_audio_buffer.started`` after the onset; a pause between sentences ends the
    meter's segment), and at most ``NEXT_ANSWER_AFTER_MS`` after the onset. The interruption's
    own answer can begin sooner than that: a segment of it is not the old answer's."""
    playing = [s for s in remote if s[2] <= onset_ms <= s[3] + SENTENCE_PAUSE_MS]
    if not playing:
        return None
    bound_ms = onset_ms + NEXT_ANSWER_AFTER_MS
    if next_answer_ms is not None:
        bound_ms = min(bound_ms, next_answer_ms)
    ends = [s[3] for s in remote if playing[0][2] <= s[2] < bound_ms]
    return max(ends)


def _stages(onset_ms: float, stopped_ms: float, stamps: Sequence[Sequence[Any]]) -> dict[str, Any]:
    started = _first_after(stamps, "input_audio_buffer.speech_started", onset_ms - 300)
    cleared = _first_after(stamps, "output_audio_buffer.cleared", onset_ms - 300)
    return {
        "onset_to_stopped_ms": round(stopped_ms - onset_ms, 1),
        "detect_ms": _since(onset_ms, started),
        "clear_ms": _since(started, cleared),
        "drain_ms": _since(cleared, stopped_ms),
    }


def _first_after(stamps: Sequence[Sequence[Any]], kind: str, after_ms: float) -> float | None:
    times = [float(at) for name, at in stamps if name == kind and at >= after_ms]
    return min(times) if times else None


def _since(start_ms: float | None, end_ms: float | None) -> float | None:
    return None if start_ms is None or end_ms is None else round(end_ms - start_ms, 1)


FIELDS = ("onset_to_stopped_ms", "detect_ms", "clear_ms", "drain_ms")


def summarise(found: list[dict[str, Any]], asked: int) -> dict[str, Any]:
    return {
        "asked": asked,
        "inside_an_answer": len(found),
        "median": transport.medians(found, FIELDS),
        "per_barge_in": found,
    }


def done_js(count: int) -> str:
    """The page has heard every question and interruption, and the last one's answer time."""
    segments = 2 * count
    return (
        f"__meter.mic.length >= {segments} && __meter.ctx.currentTime"
        f" - __meter.mic[__meter.mic.length - 1][1] > {GAP_S - 2}"
    )


def text(path: str, summary: dict[str, Any]) -> str:
    """One line per barge-in and the medians, ms."""
    lines = [
        f"Barge-in, {path}: onset -> answer audio stopped in the page, ms"
        f" ({summary['inside_an_answer']} of {summary['asked']} fell inside an answer)"
    ]
    rows = [*summary["per_barge_in"], summary["median"]]
    for index, row in enumerate(rows, 1):
        name = "p50" if index == len(rows) else str(index)
        cells = "  ".join(f"{key.removesuffix('_ms')} {_cell(row.get(key))}" for key in FIELDS)
        lines.append(f"  {name:>3}  {cells}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"
