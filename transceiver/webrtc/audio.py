"""Audio between aiortc and the conversation engine: decoded frames in, paced frames out.

I/O layer (aiortc tracks, av frames). No per-sample Python: numpy picks the first channel and
soxr resamples.

- :func:`pump_input` reads the client's decoded audio (aiortc's Opus decoder gives 48 kHz s16
  stereo) and pushes 16-bit mono PCM at the engine's input rate; a track that decodes to PCM
  itself (a :class:`PcmSource`: the lean media path's) pushes straight to it instead.
- :class:`AgentVoiceTrack` is the outgoing track: one 20 ms frame per 20 ms of the loop clock,
  the engine's frames while an answer plays and silence otherwise, handed to aiortc at its
  encoder's rate and layout (:class:`EncoderFrames`: no frame held back in its resampler);
  :meth:`clear` drops what is queued at once (barge-in). It notes when each response's first
  frame left for the encoder, and logs when its first loud one did (``first answer audio``:
  ``loadtest.bench_transport`` reads it).
  The lean media path's tick takes its frames with :meth:`AgentVoiceTrack.take` instead of
  ``recv`` (nothing while no answer plays), with the same bookkeeping.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, AudioResampler

FIRST_FRAME_MEMORY = 64  # responses whose first-frame time is kept until the turn is reported
MAX_QUEUED_FRAMES = 500  # 10 s: the engine paces in real time, so this is only a safety net
ENCODER_RATE_HZ = 48000  # aiortc's Opus encoder's rate; with stereo s16, frames pass through it
LOUD_FRAME_RMS = 328  # 0.01 of full scale: the browser meter's "loud" (loadtest.bench_e2e)

logger = logging.getLogger(__name__)


class InputResampler:
    """Decoded frames (any rate, packed s16, any channel count) -> mono PCM at one rate."""

    def __init__(self, output_rate_hz: int) -> None:
        self.output_rate_hz = output_rate_hz
        self._input_rate_hz = 0
        self._stream: Any = None

    def convert(self, frame: AudioFrame) -> bytes:
        channels = len(frame.layout.channels)
        samples = np.frombuffer(bytes(frame.planes[0]), np.int16)[: frame.samples * channels]
        mono = np.ascontiguousarray(samples[::channels])
        if frame.sample_rate != self._input_rate_hz:
            self._input_rate_hz = frame.sample_rate
            self._stream = None
            if frame.sample_rate != self.output_rate_hz:
                self._stream = soxr.ResampleStream(
                    frame.sample_rate, self.output_rate_hz, 1, dtype="int16"
                )
        if self._stream is None:
            return mono.tobytes()
        return bytes(self._stream.resample_chunk(mono).tobytes())


@runtime_checkable
class PcmSource(Protocol):
    """A track that decodes to mono PCM itself (``lean_media.LeanInputTrack``)."""

    async def feed_pcm(
        self,
        push: Callable[[bytes], None],
        rate_hz: int,
        silence: Callable[[int], bool] | None = None,
    ) -> None:
        """Push mono PCM at ``rate_hz`` to ``push`` until the track ends; the ms of silence
        a caller in Opus DTX did not send to ``silence`` (False: not taken), if given."""
        ...


async def pump_input(
    track: MediaStreamTrack,
    push: Callable[[bytes], None],
    output_rate_hz: int,
    silence: Callable[[int], bool] | None = None,
) -> None:
    """Until the track ends: every decoded frame, as mono PCM at ``output_rate_hz``; a
    ``PcmSource`` tells ``silence`` of the caller's unsent silences, if given."""
    if isinstance(track, PcmSource):
        await track.feed_pcm(push, output_rate_hz, silence)
        return
    resampler = InputResampler(output_rate_hz)
    async for frame in audio_frames(track):
        push(resampler.convert(frame))


async def audio_frames(track: MediaStreamTrack) -> AsyncIterator[AudioFrame]:
    """Every audio frame ``track`` delivers, until it ends."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if isinstance(frame, AudioFrame):
            yield frame


class EncoderFrames:
    """Mono 16-bit PCM at one rate -> packed s16 stereo frames at ``ENCODER_RATE_HZ``, one frame
    out for each frame in.

    aiortc's Opus encoder passes such frames straight on; any other it resamples through a
    buffer of whole 20 ms frames, and as its resampler's delay (32 samples) leaves the first
    output short, every frame then waits there for the next one: 20 ms more before an answer's
    first sound leaves. Here the same resampler (libswresample, through PyAV; mono to stereo at
    -3 dB as aiortc's) pays that delay once: zeros in front of the first frame.
    """

    def __init__(self, input_rate_hz: int, frame_ms: int) -> None:
        self.input_rate_hz = input_rate_hz
        self.frame_samples = ENCODER_RATE_HZ * frame_ms // 1000
        self._frame_bytes = 4 * self.frame_samples
        self._resampler = AudioResampler(format="s16", layout="stereo", rate=ENCODER_RATE_HZ)
        self._pending = b""
        self._pts = 0

    def convert(self, pcm: bytes) -> bytes:
        """One frame of mono PCM -> one frame of stereo at ``ENCODER_RATE_HZ`` (bytes)."""
        frame = AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2)
        frame.planes[0].update(pcm)
        frame.sample_rate, frame.pts = self.input_rate_hz, self._pts
        frame.time_base = fractions.Fraction(1, self.input_rate_hz)
        self._pts += frame.samples
        out = [bytes(o.planes[0])[: 4 * o.samples] for o in self._resampler.resample(frame)]
        pending = self._pending + b"".join(out)
        pending = pending.rjust(self._frame_bytes, b"\0")  # short: the first frame only
        frame_bytes, self._pending = pending[: self._frame_bytes], pending[self._frame_bytes :]
        return frame_bytes


@dataclass
class AnswerStart:
    """An answer's first frame: queued, then taken for the encoder (``time.monotonic()``)."""

    queued_s: float
    taken_s: float | None = None


def is_loud(pcm: bytes) -> bool:
    """16-bit PCM whose RMS reaches ``LOUD_FRAME_RMS`` (integer sums: no BLAS)."""
    samples = np.frombuffer(pcm, np.int16)
    energy = int(np.square(samples, dtype=np.int64).sum())
    return energy >= LOUD_FRAME_RMS * LOUD_FRAME_RMS * max(1, samples.size)


class AgentVoiceTrack(MediaStreamTrack):
    """The agent's voice: queued response frames, else silence, paced by the loop clock."""

    kind = "audio"

    def __init__(self, sample_rate_hz: int, frame_ms: int = 20) -> None:
        super().__init__()
        self.sample_rate_hz = sample_rate_hz
        self.frame_samples = sample_rate_hz * frame_ms // 1000
        self._silence = bytes(2 * self.frame_samples)
        self._queue: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUED_FRAMES)
        self._encoder_frames = EncoderFrames(sample_rate_hz, frame_ms)
        self._time_base = fractions.Fraction(1, ENCODER_RATE_HZ)
        self._start_s: float | None = None
        self._sent_samples = 0  # at sample_rate_hz
        self.first_frame_sent_s: dict[str, float] = {}
        self.frames_played = 0
        self._answer_starts: dict[str, AnswerStart] = {}  # until the answer's first loud frame

    def play(self, response_id: str, pcm: bytes) -> None:
        """Queue one frame of ``response_id`` (16-bit mono, exactly one frame long)."""
        if len(pcm) != len(self._silence):
            raise ValueError(f"agent frames must be {len(self._silence)} bytes, got {len(pcm)}")
        if response_id not in self.first_frame_sent_s and response_id not in self._answer_starts:
            if len(self._answer_starts) >= FIRST_FRAME_MEMORY:
                self._answer_starts.pop(next(iter(self._answer_starts)))
            self._answer_starts[response_id] = AnswerStart(time.monotonic())
        self._queue.append((response_id, pcm))

    def clear(self) -> int:
        """Drop every queued frame now; how many were dropped."""
        dropped = len(self._queue)
        self._queue.clear()
        return dropped

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pace()
        samples = self._encoder_frames.frame_samples
        frame = AudioFrame(format="s16", layout="stereo", samples=samples)
        frame.planes[0].update(self._encoder_frames.convert(self._next_pcm()))
        frame.sample_rate = ENCODER_RATE_HZ
        frame.pts = self._sent_samples // self.frame_samples * samples
        frame.time_base = self._time_base
        self._sent_samples += self.frame_samples
        return frame

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        if self._start_s is None:
            self._start_s = now_s
        due_s = self._start_s + self._sent_samples / self.sample_rate_hz
        if due_s > now_s:
            await asyncio.sleep(due_s - now_s)  # pacing a real-time source
        elif now_s - due_s > 0.1:  # stalled (loop busy): restart the clock, do not burst
            self._start_s = now_s - self._sent_samples / self.sample_rate_hz

    def _next_pcm(self) -> bytes:
        pcm = self.take()
        return self._silence if pcm is None else pcm

    def take(self) -> bytes | None:
        """The next queued frame, now, counted as played; None while nothing is queued."""
        if not self._queue:
            return None
        response_id, pcm = self._queue.popleft()
        if response_id not in self.first_frame_sent_s:
            self._remember_first_frame(response_id)
        if response_id in self._answer_starts:
            self._note_start(response_id, pcm)
        self.frames_played += 1
        return pcm

    def _note_start(self, response_id: str, pcm: bytes) -> None:
        """Log when the answer's first loud frame leaves, for the transport split
        (``loadtest.bench_transport``): the first frame's wait in the queue, the quiet lead-in."""
        start = self._answer_starts[response_id]
        now_s = time.monotonic()
        if start.taken_s is None:
            start.taken_s = now_s
        if not is_loud(pcm):
            return
        del self._answer_starts[response_id]
        logger.info(
            "first answer audio %s: queued_wait_ms=%.1f loud_after_ms=%.1f loud_unix_s=%.6f",
            response_id,
            (start.taken_s - start.queued_s) * 1000,
            (now_s - start.taken_s) * 1000,
            time.time(),
        )

    def _remember_first_frame(self, response_id: str) -> None:
        if len(self.first_frame_sent_s) >= FIRST_FRAME_MEMORY:
            self.first_frame_sent_s.pop(next(iter(self.first_frame_sent_s)))
        self.first_frame_sent_s[response_id] = asyncio.get_running_loop().time()
