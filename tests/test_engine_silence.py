"""``ConversationEngine.push_silence`` (a caller in Opus DTX: silence it did not send) decides
as ``push_audio`` of zero frames does, on recorded human speech (``loadtest.recorded_speech``,
each recording followed by silence): the same events at the same audio positions, the same
utterances, the same audio to the speech-to-text and the same questions to the end-of-turn
model; and it is refused while the last frame heard was speech."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from engine_feed import events_while_fed, speech_marks

from loadtest import recorded_speech
from loadtest.frame_stages import speech_frames
from pipeline.config import EngineConfig, VadConfig
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.providers import AudioChunk, Transcript
from pipeline.vad import Verdict

RATE_HZ = recorded_speech.SAMPLE_RATE_HZ
FRAME_BYTES = 2 * RATE_HZ // 50  # the lean path's 20 ms frames


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    folder = recorded_speech.fetch()
    recordings = [recorded_speech.read_pcm(r, folder) for r in recorded_speech.RECORDINGS]
    quiet = [(np.frombuffer(pcm, "<i2") // 20).astype("<i2").tobytes() for pcm in recordings]
    return speech_frames(recordings[:5] + quiet[5:])


class HeardSpeechToText:
    """Keeps every stretch's audio; its transcript is the audio's length."""

    name = "heard"

    def __init__(self) -> None:
        self.stretches: list[bytes] = []

    async def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncIterator[Transcript]:
        pcm = b"".join([chunk.pcm async for chunk in audio])
        self.stretches.append(pcm)
        yield Transcript(f"{len(pcm)} bytes", final=True)


def asking(questions: list[bytes]) -> Callable[[bool, int], Callable[[bytes], Verdict] | None]:
    """An end-of-turn model whose verdict is a function of what it is asked (kept)."""

    def end_of_turn(semantic: bool, rate_hz: int) -> Callable[[bytes], Verdict] | None:
        def ask(pcm: bytes) -> Verdict:
            questions.append(pcm)
            return lambda: len(pcm) // FRAME_BYTES % 3 == 0

        return ask if semantic else None

    return end_of_turn


async def heard(config: EngineConfig, frames: list[bytes], dtx: bool) -> tuple[Any, ...]:
    """Every event, the speech-to-text's stretches and the model's questions, the silent
    frames pushed as zeros or (``dtx``) as push_silence wherever it takes them."""
    stt = HeardSpeechToText()
    questions: list[bytes] = []
    engine = ConversationEngine(
        config,
        stt,
        LocalRuleBasedAgent(load_knowledge()),
        EspeakTextToSpeech(),
        end_of_turn=asking(questions),
    )
    await engine.start()
    taken = 0

    def push(frame: bytes) -> None:
        nonlocal taken
        if not dtx or frame.count(0) != len(frame) or not engine.push_silence(20):
            engine.push_audio(frame)
        else:
            taken += 1

    seen = speech_marks(await events_while_fed(engine, frames, push, 30), transcripts=True)
    return tuple(seen), tuple(stt.stretches), tuple(questions), engine.input_position_ms, taken


@pytest.mark.parametrize(
    "vad",
    [
        VadConfig(),
        VadConfig(threshold=0.75, voice_end_db=12.0, prefix_padding_ms=100),
        VadConfig(semantic=True, voice_end_db=40.0, model_pad_ms=120),
    ],
    ids=["server_vad", "aggressive, voice's end", "semantic_vad"],
)
@pytest.mark.parametrize("frame_ms", [20, 30])
async def test_silence_pushed_is_heard_as_zero_frames_pushed(
    frames: list[bytes], vad: VadConfig, frame_ms: int
) -> None:
    config = EngineConfig(
        input_sample_rate_hz=RATE_HZ, frame_ms=frame_ms, vad=vad, create_response=False
    )
    *zeros, _ = await heard(config, frames, dtx=False)
    *silences, taken = await heard(config, frames, dtx=True)
    assert silences == zeros
    events = zeros[0]
    assert sum(1 for e in events if e[0] == "stopped") >= 8  # the speech was segmented
    silent = sum(1 for frame in frames if frame.count(0) == len(frame))
    assert taken > 0.9 * silent  # the silence went the fast way
    if vad.semantic:
        assert zeros[2]  # the model was asked


async def test_silence_is_refused_after_speech_until_a_silence_was_taken() -> None:
    config = EngineConfig(input_sample_rate_hz=RATE_HZ, create_response=False)
    answers = iter([True, True, True, True, True, True, False])
    engine = ConversationEngine(
        config,
        HeardSpeechToText(),
        LocalRuleBasedAgent(load_knowledge()),
        EspeakTextToSpeech(),
        classify=lambda frame: next(answers, False),
    )
    await engine.start()
    try:
        with pytest.raises(ValueError, match="silence must be 0 to 60000 ms, not -20"):
            engine.push_silence(-20)
        for _ in range(6):
            engine.push_audio(bytes(FRAME_BYTES))  # called speech
        assert engine.user_speaking and engine.input_position_ms == 120
        assert not engine.push_silence(20)  # mid-word: nothing heard
        assert engine.input_position_ms == 120
        engine.push_audio(bytes(FRAME_BYTES))  # a pause begins
        assert engine.push_silence(40) and engine.input_position_ms == 180
        assert engine.push_silence(30)  # not whole frames: as pushed audio
        assert engine.input_position_ms == 200  # (10 ms wait for the next frame's rest)
    finally:
        await engine.aclose()
