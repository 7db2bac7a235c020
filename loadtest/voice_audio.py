"""Speech in and out of a browser under test: fake-microphone WAVs and hearing the answer.

I/O layer over the offline pipeline providers. ``Speaker`` writes WAV files for Chromium's
``--use-file-for-fake-audio-capture``: questions spoken by piper (noise off, so deterministic)
with silences between them, and reports where each utterance lies in the file. ``hear()``
runs pocketsphinx on recorded audio (float samples) and returns the words it recognised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

import pipeline.wav
from pipeline.config import PiperConfig, PocketsphinxConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.playout import PcmResampler
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import AudioChunk

WAV_RATE_HZ = 48_000
Part = str | float  # text to speak, or seconds of silence


@dataclass(frozen=True)
class Utterance:
    text: str
    start_s: float
    end_s: float


def write_wav(path: Path, pcm: bytes, rate_hz: int = WAV_RATE_HZ) -> Path:
    """A fake microphone's WAV file: ``pipeline.wav.write_wav`` at its rate unless told."""
    return pipeline.wav.write_wav(path, pcm, rate_hz)


def silence_pcm(seconds: float, rate_hz: int = WAV_RATE_HZ) -> bytes:
    return b"\0\0" * int(seconds * rate_hz)


def tone_pcm(frequency_hz: float, seconds: float, rate_hz: int = WAV_RATE_HZ) -> bytes:
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    return (8_000 * np.sin(2 * np.pi * frequency_hz * t)).astype("<i2").tobytes()


async def spoken_pcm(tts: PiperTextToSpeech, text: str, rate_hz: int) -> bytes:
    """``text`` spoken by a started ``tts``, as 16-bit mono PCM at ``rate_hz``."""
    resampler: PcmResampler | None = None
    pcm = b""
    async for chunk in tts.synthesize(text):
        resampler = resampler or PcmResampler(chunk.sample_rate_hz, rate_hz)
        pcm += resampler.push(chunk.pcm)
    assert resampler is not None, f"piper said nothing for {text!r}"
    return pcm + resampler.flush()


async def recognised(stt: PocketsphinxSpeechToText, pcm: bytes, rate_hz: int) -> list[str]:
    """The final transcripts a started ``stt`` makes of 16-bit mono PCM (one stream)."""

    async def once() -> AsyncIterator[AudioChunk]:
        yield AudioChunk(pcm, rate_hz)

    return [t.text async for t in stt.transcribe(once()) if t.final]


class Speaker:
    """piper, started once, writing spoken WAVs: ``async with Speaker() as s: await s.wav()``."""

    def __init__(self) -> None:
        self._tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))

    async def __aenter__(self) -> Speaker:
        await self._tts.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._tts.aclose()

    async def speak(self, text: str, rate_hz: int = WAV_RATE_HZ) -> bytes:
        return await spoken_pcm(self._tts, text, rate_hz)

    async def wav(self, path: Path, parts: Sequence[Part]) -> list[Utterance]:
        """Write ``parts`` (text spoken, numbers as silence) to ``path``; the utterances."""
        pcm, spans = b"", []
        for part in parts:
            if isinstance(part, str):
                start_s = len(pcm) / 2 / WAV_RATE_HZ
                pcm += await self.speak(part)
                spans.append(Utterance(part, start_s, len(pcm) / 2 / WAV_RATE_HZ))
            else:
                pcm += silence_pcm(part)
        write_wav(path, pcm)
        return spans


def voiced(
    samples: np.ndarray[Any, Any], rate_hz: int, margin_s: float = 0.3
) -> np.ndarray[Any, Any]:
    """From ``margin_s`` before the first to ``margin_s`` after the last audible 20 ms block."""
    block = rate_hz // 50
    blocks = samples[: len(samples) // block * block].reshape(-1, block)
    loud = np.flatnonzero(np.sqrt(np.mean(blocks**2, axis=1)) > 0.01)
    if not len(loud):
        return samples[:0]
    first = max(0, loud[0] * block - int(margin_s * rate_hz))
    last = min(len(samples), (loud[-1] + 1) * block + int(margin_s * rate_hz))
    return samples[first:last]


async def hear(samples: np.ndarray[Any, Any], rate_hz: int) -> list[str]:
    """The words pocketsphinx recognises in float samples (one utterance). The whole of it is
    decoded at once, so its final transcript may take longer than a live turn's (the product's
    10 s): an 8.4 s answer took 12.6 s to decode at a load of 7. The deadline grows with it."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    seconds = len(samples) / rate_hz
    stt = PocketsphinxSpeechToText(PocketsphinxConfig(final_timeout_s=max(10.0, 6 * seconds)))
    await stt.start()
    try:
        finals = await recognised(stt, pcm, rate_hz)
    finally:
        await stt.aclose()
    return " ".join(finals).split()
