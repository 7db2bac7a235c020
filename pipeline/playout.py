"""Playout bookkeeping: fixed-size output frames, and which text the listener actually heard.

Protocol layer, pure. The engine speaks text chunk by chunk; each chunk becomes a
:class:`SpokenSegment` spanning a range of output audio. When the user interrupts after
``played_ms`` of audio, :func:`heard_text` keeps the whole segments that were played and the
played share of the current one, cut back to a word boundary -- what OpenAI's Realtime API does
with ``conversation.item.truncate`` and ``audio_end_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr


class FrameSlicer:
    """Cuts a PCM stream into frames of exactly ``frame_bytes``; the tail waits for more."""

    def __init__(self, frame_bytes: int) -> None:
        if frame_bytes <= 0 or frame_bytes % 2:
            raise ValueError(f"frame size must be a positive even number of bytes: {frame_bytes}")
        self.frame_bytes = frame_bytes
        self._pending = bytearray()

    def push(self, pcm: bytes) -> list[bytes]:
        self._pending += pcm
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        frames = [
            bytes(self._pending[start : start + self.frame_bytes])
            for start in range(0, whole, self.frame_bytes)
        ]
        del self._pending[:whole]
        return frames

    def flush(self) -> list[bytes]:
        """The tail, padded with silence to a whole frame."""
        if not self._pending:
            return []
        frame = bytes(self._pending) + b"\0" * (self.frame_bytes - len(self._pending))
        self._pending.clear()
        return [frame]


@dataclass
class SpokenSegment:
    text: str
    start_ms: float
    end_ms: float


class PlayoutLedger:
    """Which output audio belongs to which text chunk, in order."""

    def __init__(self) -> None:
        self.segments: list[SpokenSegment] = []

    @property
    def total_ms(self) -> float:
        return self.segments[-1].end_ms if self.segments else 0.0

    def begin(self, text: str) -> None:
        self.segments.append(SpokenSegment(text, self.total_ms, self.total_ms))

    def add_audio(self, duration_ms: float) -> None:
        if not self.segments:
            raise ValueError("audio added before any text segment began")
        self.segments[-1].end_ms += duration_ms

    def heard_text(self, played_ms: float) -> str:
        return heard_text(self.segments, played_ms)

    @property
    def full_text(self) -> str:
        return " ".join(segment.text for segment in self.segments)


def heard_text(segments: list[SpokenSegment], played_ms: float) -> str:
    heard: list[str] = []
    for segment in segments:
        span_ms = segment.end_ms - segment.start_ms
        if span_ms <= 0:
            continue  # no audio for this text: nobody heard it
        if played_ms >= segment.end_ms:
            heard.append(segment.text)
            continue
        if played_ms > segment.start_ms:
            share = (played_ms - segment.start_ms) / span_ms
            heard.append(_cut_at_word(segment.text, int(len(segment.text) * share)))
        break
    return " ".join(part for part in heard if part)


def _cut_at_word(text: str, chars: int) -> str:
    if chars >= len(text):
        return text
    if chars < len(text) and text[chars] == " ":
        return text[:chars].rstrip()
    space = text.rfind(" ", 0, chars)
    return text[:space].rstrip() if space > 0 else ""


QUIET_LEVEL = 0.003  # RMS of full scale under which a block of a voice's lead-in is quiet
LEAD_BLOCK_MS = 2
LEAD_KEEP_MS = 10  # of the quiet before the voice, kept: its onset is not clipped
LEAD_MAX_TRIM_MS = 200  # more quiet than this is left as it is: a pause meant, not a lead-in


class LeadTrimmer:
    """Drops an answer's quiet lead-in (piper starts each sentence with 40-60 ms of it), so its
    first frame out is already voice: 16-bit mono PCM in, the same out from the first loud
    block on, with ``LEAD_KEEP_MS`` before it. Quiet longer than ``LEAD_MAX_TRIM_MS`` goes out
    untouched; after the first loud block everything passes."""

    def __init__(self, sample_rate_hz: int) -> None:
        self._block_bytes = sample_rate_hz * LEAD_BLOCK_MS // 500
        self._keep_bytes = sample_rate_hz * LEAD_KEEP_MS // 500
        self._max_bytes = sample_rate_hz * LEAD_MAX_TRIM_MS // 500
        self._held = bytearray()
        self.trimmed_bytes = 0
        self.done = False

    def push(self, pcm: bytes) -> bytes:
        if self.done:
            return pcm
        self._held += pcm
        loud_at = _first_loud_byte(bytes(self._held), self._block_bytes)
        if loud_at is None and len(self._held) <= self._max_bytes:
            return b""
        cut = 0 if loud_at is None else max(0, loud_at - self._keep_bytes)
        out = bytes(self._held[cut:])
        self.trimmed_bytes, self.done = cut, True
        self._held.clear()
        return out

    def flush(self) -> bytes:
        """The end of the audio: what is held (all quiet) goes out as it is."""
        self.done = True
        out, self._held = bytes(self._held), bytearray()
        return out


def _first_loud_byte(pcm: bytes, block_bytes: int) -> int | None:
    whole = len(pcm) - len(pcm) % block_bytes
    if not whole:
        return None
    blocks = np.frombuffer(pcm[:whole], np.int16).reshape(-1, block_bytes // 2) / 32768.0
    loud = np.flatnonzero(np.sqrt(np.mean(blocks * blocks, axis=1)) >= QUIET_LEVEL)
    return None if not len(loud) else int(loud[0]) * block_bytes


class PcmResampler:
    """Streaming 16-bit mono resampling (soxr); a pass-through when the rates match."""

    def __init__(self, input_rate_hz: int, output_rate_hz: int) -> None:
        self.input_rate_hz = input_rate_hz
        self.output_rate_hz = output_rate_hz
        self._stream: Any = None
        if input_rate_hz != output_rate_hz:
            self._stream = soxr.ResampleStream(input_rate_hz, output_rate_hz, 1, dtype="int16")

    def push(self, pcm: bytes, *, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, np.int16)
        return bytes(self._stream.resample_chunk(samples, last=last).tobytes())

    def flush(self) -> bytes:
        return self.push(b"", last=True)
