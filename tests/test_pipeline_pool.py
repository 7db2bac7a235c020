"""The offline pipeline's shared heavy stages: one call's stalled utterance must not hold up
the other calls of the process, and the pool's load is measured and refuses work it cannot do.

Real webrtcvad, pocketsphinx processes, local agent and piper; nothing is faked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
import pytest_asyncio

from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline import events as ev
from pipeline.config import EngineConfig, LocalAgentConfig, PiperConfig, PocketsphinxConfig
from pipeline.engine import ConversationEngine
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.tools import ToolRegistry, builtin_tools

on_module_loop = pytest.mark.asyncio(loop_scope="module")

RATE_HZ = 16000
KNOWLEDGE = load_knowledge()
BOUND_S = 20  # a bound for a hang, never a latency claim


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def piper() -> AsyncIterator[PiperTextToSpeech]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    yield tts
    await tts.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def one_decoder() -> AsyncIterator[PocketsphinxSpeechToText]:
    """A single decoder process: any sharing between calls shows at once."""
    stt = PocketsphinxSpeechToText(PocketsphinxConfig(workers=1))
    await stt.start()
    yield stt
    await stt.aclose()


def make_engine(stt: PocketsphinxSpeechToText, tts: PiperTextToSpeech) -> ConversationEngine:
    model = LocalRuleBasedAgent(KNOWLEDGE, LocalAgentConfig())
    config = EngineConfig(RATE_HZ, 24000)
    return ConversationEngine(config, stt, model, tts, ToolRegistry(builtin_tools(KNOWLEDGE)))


async def first(engine: ConversationEngine, kind: type[Any]) -> Any:
    async with asyncio.timeout(BOUND_S), aclosing(engine.events()) as stream:
        async for event in stream:
            if isinstance(event, kind):
                return event
    raise AssertionError("engine closed first")


@on_module_loop
async def test_a_call_stalled_mid_utterance_does_not_hold_up_another_calls_answer(
    piper: PiperTextToSpeech, one_decoder: PocketsphinxSpeechToText
) -> None:
    question = await spoken_pcm(piper, "Tell me about the moon.", RATE_HZ)
    stalled, asking = make_engine(one_decoder, piper), make_engine(one_decoder, piper)
    async with stalled, asking:
        # The stalled caller starts a sentence and its audio stops: no end of speech, ever.
        stalled.push_audio(silence_pcm(0.3, RATE_HZ) + question[: len(question) // 2])
        assert (await first(stalled, ev.InputTranscript)).final is False  # it is being decoded
        assert stalled.user_speaking
        asking.push_audio(silence_pcm(0.3, RATE_HZ) + question + silence_pcm(1.0, RATE_HZ))
        record = (await first(asking, ev.TurnCompleted)).record
        assert "moon" in record.transcript.split() and not record.interrupted
        assert stalled.user_speaking  # still mid-utterance: it was not cut short for the other
