"""The agent's voice as the lean media path codes it (``lean_media.OpusEncoder``: the shipped
application, bitrate and complexity, at the TTS's 24 kHz) is heard as said: pocketsphinx
hears piper's sentences, coded and decoded at the pipeline's 16 kHz, as it hears them uncoded.
"""

from __future__ import annotations

import ctypes
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from loadtest.realtime_client import hear, silence, speak
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from transceiver.webrtc.lean_media import (
    ENCODER_COMPLEXITY,
    OPUS,
    OpusDecoder,
    OpusEncoder,
)

VOICE_RATE_HZ = 24_000  # the rate the TTS gives the agent's voice at, coded at it
HEARD_RATE_HZ = 16_000
FRAME_MS = 20
OPUS_GET_COMPLEXITY = 4011
SENTENCES = (
    "The moon is about four hundred thousand kilometres away.",
    "Coffee is brewed from roasted coffee beans.",
    "Tell me about the weather today.",
)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def voices() -> AsyncIterator[tuple[PiperTextToSpeech, PocketsphinxSpeechToText]]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    stt = PocketsphinxSpeechToText()
    await tts.start()
    await stt.start()
    try:
        yield tts, stt
    finally:
        await stt.aclose()
        await tts.aclose()


def coded(pcm: bytes) -> bytes:
    """``pcm`` (24 kHz) through the lean path's encoder, decoded at 16 kHz."""
    frame_bytes = 2 * VOICE_RATE_HZ * FRAME_MS // 1000
    encoder = OpusEncoder(VOICE_RATE_HZ, frame_bytes // 2)
    decoder = OpusDecoder(HEARD_RATE_HZ)
    frames = []
    for start in range(0, len(pcm), frame_bytes):
        frames.append(
            decoder.decode(
                encoder.encode(pcm[start : start + frame_bytes].ljust(frame_bytes, b"\0"))
            )
        )
    return b"".join(frame or b"" for frame in frames)


def test_the_encoder_runs_at_the_complexity_it_is_given() -> None:
    encoder = OpusEncoder(VOICE_RATE_HZ, VOICE_RATE_HZ * FRAME_MS // 1000)
    complexity = ctypes.c_int(-1)
    state = ctypes.c_void_p(encoder._state)
    OPUS.opus_encoder_ctl(state, OPUS_GET_COMPLEXITY, ctypes.byref(complexity))
    assert complexity.value == ENCODER_COMPLEXITY


@pytest.mark.parametrize("sentence", SENTENCES)
@pytest.mark.asyncio(loop_scope="module")
async def test_the_agents_voice_coded_is_heard_as_said(
    voices: tuple[PiperTextToSpeech, PocketsphinxSpeechToText], sentence: str
) -> None:
    tts, stt = voices
    uncoded = await speak(tts, sentence, HEARD_RATE_HZ) + silence(600, HEARD_RATE_HZ)
    voice = await speak(tts, sentence, VOICE_RATE_HZ) + silence(600, VOICE_RATE_HZ)
    said = await hear(stt, uncoded, HEARD_RATE_HZ)
    assert len(said) >= 5  # the sentence is heard at all
    assert await hear(stt, coded(voice), HEARD_RATE_HZ) == said
