"""Test support: aiortc tone clients that hear their own echo (an FFT says which tone).

``ToneClient`` is an aiortc peer (iceServers=[]) that sends its own paced sine tone and keeps
the last second of audio it hears back.
"""

from __future__ import annotations

import asyncio
import fractions
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from deploy.waiting import eventually
from transceiver.webrtc.audio import audio_frames


async def first_channel_frames(track: MediaStreamTrack) -> AsyncIterator[np.ndarray]:
    """The first channel of every audio frame ``track`` delivers, until the track ends."""
    async for frame in audio_frames(track):
        yield frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]


SAMPLE_RATE_HZ = 48_000
FRAME_SAMPLES = 960  # 20 ms


class PacedTrack(MediaStreamTrack):
    """A real-time 48 kHz mono source: one 20 ms frame of ``next_pcm()`` per ``recv``."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._sent = 0
        self._start: float | None = None

    def next_pcm(self) -> bytes:
        """The next FRAME_SAMPLES samples as s16 little-endian bytes."""
        raise NotImplementedError

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        self._start = loop.time() if self._start is None else self._start
        delay_s = self._start + self._sent / SAMPLE_RATE_HZ - loop.time()
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # pacing a real-time source, not synchronisation
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(self.next_pcm())
        frame.sample_rate, frame.pts = SAMPLE_RATE_HZ, self._sent
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE_HZ)
        self._sent += FRAME_SAMPLES
        return frame


class ToneTrack(PacedTrack):
    """A paced 20 ms sine tone at ``frequency_hz``."""

    def __init__(self, frequency_hz: float) -> None:
        super().__init__()
        self.frequency_hz = frequency_hz

    def next_pcm(self) -> bytes:
        t = (self._sent + np.arange(FRAME_SAMPLES)) / SAMPLE_RATE_HZ
        return (8_000 * np.sin(2 * np.pi * self.frequency_hz * t)).astype("<i2").tobytes()


class ToneClient:
    """An aiortc client that sends a tone and keeps the last second of audio it hears."""

    def __init__(self, frequency_hz: float) -> None:
        self.frequency_hz = frequency_hz
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTrack(ToneTrack(frequency_hz))
        self.pc.on("track", self._on_track)
        self.frames_received = 0
        self.recent: deque[np.ndarray[Any, Any]] = deque(maxlen=50)
        self.answer_sdp = ""
        self.call_url = ""
        self._reader: asyncio.Task[None] | None = None

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._reader is None:
            self._reader = asyncio.create_task(self._read(track))

    async def _read(self, track: MediaStreamTrack) -> None:
        async for samples in first_channel_frames(track):
            self.recent.append(samples.astype(np.float64))
            self.frames_received += 1

    async def offer(self, http: httpx.AsyncClient, base_url: str) -> httpx.Response:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(
            base_url + "/v1/realtime/calls",
            content=self.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp"},
        )
        if response.status_code == 201:
            self.answer_sdp = response.text
            self.call_url = base_url + response.headers["Location"]
            answer = RTCSessionDescription(sdp=response.text, type="answer")
            await self.pc.setRemoteDescription(answer)
        return response

    async def connected(self, timeout_s: float = 15.0) -> None:
        await eventually(
            lambda: self.pc.connectionState == "connected", timeout_s, f"{self} to connect"
        )

    def hears_own_tone(self, others: list[float], frames: int = 25) -> bool:
        """In the last ``frames`` frames the loudest frequency is ours (within 15 Hz) and every
        other test tone is at least 20 dB below ours."""
        if len(self.recent) < frames:
            return False
        samples = np.concatenate(list(self.recent)[-frames:])
        power = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) ** 2
        freqs = np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE_HZ)
        dominant_hz = float(freqs[int(np.argmax(power[1:])) + 1])

        def band(hz: float) -> float:
            return float(power[np.abs(freqs - hz) <= 15].sum())

        own, other = band(self.frequency_hz), max((band(hz) for hz in others), default=0.0)
        return abs(dominant_hz - self.frequency_hz) <= 15 and own > 0 and own > 100 * other

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def __repr__(self) -> str:
        return f"ToneClient({self.frequency_hz:g} Hz)"


@asynccontextmanager
async def tone_call(
    base_url: str, frequency_hz: float, timeout_s: float = 15.0
) -> AsyncIterator[ToneClient]:
    """A ``ToneClient`` on a new call to the transceiver at ``base_url``, connected and hearing
    its own tone echoed; closed at exit."""
    client = ToneClient(frequency_hz)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await client.offer(http, base_url)
        assert response.status_code == 201, response.text
        await client.connected(timeout_s)
        await eventually(lambda: client.hears_own_tone([]), timeout_s, f"{client} to hear its tone")
        yield client
    finally:
        await client.close()
