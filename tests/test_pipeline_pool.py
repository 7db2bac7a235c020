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
from metric_samples import served_samples
from prometheus_client import CollectorRegistry

from loadtest.voice_audio import silence_pcm, spoken_pcm
from pipeline import events as ev
from pipeline.config import (
    EngineConfig,
    LocalAgentConfig,
    PipelineConfig,
    PocketsphinxConfig,
)
from pipeline.engine import ConversationEngine
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.tools import ToolRegistry, builtin_tools
from transceiver.http.app import _capacity_collector
from transceiver.http.errors import unavailable
from transceiver.realtime.pipeline_agent import pipeline_agents
from transceiver.webrtc.calls import AdmissionError, CallLimits, Calls

on_module_loop = pytest.mark.asyncio(loop_scope="module")

RATE_HZ = 16000
KNOWLEDGE = load_knowledge()
BOUND_S = 20  # a bound for a hang, never a latency claim


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


@on_module_loop
async def test_a_saturated_pool_refuses_new_calls_and_says_why_while_its_calls_go_on() -> None:
    config = PipelineConfig(
        stt="pocketsphinx", llm="rule", tts="piper", pool_size=1, pool_max_queue=1,
        pool_max_wait_ms=600_000,  # only the queue's depth decides here: no timing in the test
    )  # fmt: skip
    registry = CollectorRegistry()
    async with pipeline_agents(config, registry) as agents:
        assert agents.pool is not None and agents.pool.size == 1
        limits = CallLimits(capacity=10, connect_timeout_s=1.0)
        calls = Calls(None, limits, registry, agents, overload=agents.overload)  # type: ignore[arg-type]
        registry.register(_capacity_collector(calls))
        assert calls.not_ready_reason is None
        assert served_samples(registry)["transceiver_pipeline_pool_saturated"] == 0.0

        tts = agents.providers.tts
        text = "The moon is about three hundred and eighty four thousand kilometres away."
        speaking = [asyncio.create_task(spoken_pcm(tts, text, RATE_HZ)) for _ in range(3)]
        for _ in range(BOUND_S * 100):  # one thread: two of the three wait
            if agents.pool.tts.queue_depth == 2:
                break
            await asyncio.sleep(0.01)
        assert agents.pool.tts.queue_depth == 2 and agents.pool.tts.busy == 1
        assert calls.not_ready_reason == "overloaded"
        with pytest.raises(AdmissionError) as refused, calls.reserve():
            pass
        error = unavailable(refused.value)
        assert (error.status, error.code) == (503, "transceiver_overloaded")
        assert "2 tts jobs wait for a slot (over 1)" in error.message
        metrics = served_samples(registry)
        assert metrics["transceiver_pipeline_pool_saturated"] == 1.0
        assert metrics['transceiver_pipeline_pool_queue_depth{stage="tts"}'] == 2.0
        assert metrics['transceiver_pipeline_pool_busy{stage="tts"}'] == 1.0

        async with asyncio.timeout(BOUND_S):
            voices = await asyncio.gather(*speaking)  # the work in progress still completes
        assert all(len(voice) > RATE_HZ for voice in voices)  # a second of speech, or more
        assert calls.not_ready_reason is None
        metrics = served_samples(registry)
        assert metrics["transceiver_pipeline_pool_saturated"] == 0.0
        assert metrics['transceiver_pipeline_pool_wait_seconds_count{stage="tts"}'] >= 3
        assert metrics["transceiver_pipeline_pool_size"] == 1.0
        assert metrics["transceiver_capacity"] == 10.0
