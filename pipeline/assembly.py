"""From a PipelineConfig to started providers and a ConversationEngine.

I/O layer (it starts worker processes, loads models, opens HTTP clients). Providers are shared
by every conversation of a process, and so is the pool their heavy offline stages run in
(``pipeline.pool``); engines are per conversation::

    async with open_providers(config) as providers:
        async with build_engine(config, providers) as engine:
            ...

OpenAI classes are imported only when a stage uses them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.context_window import token_counter
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import KnowledgeBase, load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.pool import PipelinePool
from pipeline.providers import LanguageModel, SpeechToText, TextToSpeech
from pipeline.speech_prewarm import prewarm, reply_chunks
from pipeline.tools import ToolRegistry, builtin_tools
from pipeline.turns import CostEstimator, TurnRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Providers:
    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech
    knowledge: KnowledgeBase
    estimate_cost: CostEstimator
    pool: PipelinePool | None = None  # the offline heavy stages' (STT, TTS) shared pool
    # stage -> why it does not run the provider configured for it (PIPELINE_LLM=local without
    # its model: the rule-based agent answers)
    substitutes: dict[str, str] = field(default_factory=dict)


@asynccontextmanager
async def open_providers(config: PipelineConfig) -> AsyncIterator[Providers]:
    if not (config.stt and config.llm and config.tts):
        raise ValueError("open_providers needs a resolved config (PipelineConfig.resolved)")
    knowledge = load_knowledge(config.knowledge_file or None)
    async with AsyncExitStack() as stack:
        openai_stages = "openai" in (config.stt, config.llm, config.tts)
        client = _openai_client(stack, config.provider_http) if openai_stages else None
        if config.encoding_preload:
            await preload_encoding(config)
        pool = PipelinePool(config.pool_policy())
        stack.push_async_callback(asyncio.to_thread, pool.close)
        stt = await _speech_to_text(config, stack, client, pool)
        substitutes: dict[str, str] = {}
        llm = await _language_model(config, knowledge, client, stack, substitutes)
        tts = await _text_to_speech(config, stack, client, pool)
        if config.speech_prewarm and isinstance(llm, LocalRuleBasedAgent):
            _start_prewarm(stack, tts, speech_chunks(llm, config))
        yield Providers(stt, llm, tts, knowledge, cost_estimator(config), pool, substitutes)


def speech_chunks(agent: LocalRuleBasedAgent, config: PipelineConfig) -> list[str]:
    return reply_chunks(agent.fixed_replies(), config.engine_config().chunker)


def _start_prewarm(stack: AsyncExitStack, tts: TextToSpeech, chunks: list[str]) -> None:
    """``speech_prewarm.prewarm`` in the background, owned: cancelled as the providers close,
    its failure logged with its traceback (the calls then synthesize as they would anyway)."""
    task = asyncio.create_task(prewarm(tts, chunks), name="speech prewarm")

    def reported(done: asyncio.Task[float]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("speech prewarm failed", exc_info=done.exception())

    task.add_done_callback(reported)

    async def cancelled() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(cancelled)


async def preload_encoding(config: PipelineConfig) -> None:
    """Truncation's token encoding, loaded now rather than in the first call that needs it."""
    started_s = time.perf_counter()
    loaded = await asyncio.to_thread(token_counter, config.token_encoding())
    took_s = time.perf_counter() - started_s
    if loaded is not None:  # else token_counter logged why
        log.info("%s encoding loaded in %.2f s", config.token_encoding(), took_s)


def build_engine(
    config: PipelineConfig,
    providers: Providers,
    *,
    wall_clock: Callable[[], datetime] | None = None,
) -> ConversationEngine:
    """A new conversation with the built-in tools (current time, knowledge lookup)."""
    tools = ToolRegistry(builtin_tools(providers.knowledge, wall_clock))
    return ConversationEngine(
        config.engine_config(),
        providers.stt,
        providers.llm,
        providers.tts,
        tools,
        estimate_cost=providers.estimate_cost,
    )


def _openai_client(stack: AsyncExitStack, http: str) -> Any:
    from pipeline.openai_providers import openai_client

    # OPENAI_BASE_URL alone (vLLM, Ollama, llama.cpp) is enough; the SDK insists on some key.
    client = openai_client(os.environ.get("OPENAI_API_KEY") or "not-needed", http=http)
    stack.push_async_callback(client.close)
    return client


async def _started(provider: Any, stack: AsyncExitStack) -> Any:
    await provider.start()
    stack.push_async_callback(provider.aclose)
    return provider


async def _speech_to_text(
    config: PipelineConfig, stack: AsyncExitStack, client: Any, pool: PipelinePool
) -> SpeechToText:
    def offline() -> SpeechToText:
        if config.stt == "moonshine":  # loaded only when chosen: ~150 MB a model
            from pipeline.moonshine_stt import MoonshineSpeechToText

            return MoonshineSpeechToText(config.moonshine_config(), pool.stt)
        return PocketsphinxSpeechToText(config.pocketsphinx_config(), pool.stt)

    if config.stt != "openai":
        return await _started(offline(), stack)  # type: ignore[no-any-return]
    from pipeline.openai_providers import OpenAISpeechToText
    from pipeline.resilience import harden_stt

    fallback = await _started(offline(), stack) if config.fallback else None
    return harden_stt(OpenAISpeechToText(client, config.openai_stt_model), fallback)


async def _language_model(
    config: PipelineConfig,
    knowledge: KnowledgeBase,
    client: Any,
    stack: AsyncExitStack,
    substitutes: dict[str, str],
) -> LanguageModel:
    local = LocalRuleBasedAgent(knowledge, config.local_agent_config())
    if config.llm == "local":
        return await _local_model(config, knowledge, stack, substitutes) or local
    if config.llm != "openai":
        return local
    from pipeline.openai_providers import OpenAILanguageModel
    from pipeline.openai_responses import OpenAIResponsesLanguageModel
    from pipeline.resilience import harden_llm

    api = OpenAIResponsesLanguageModel if config.llm_api == "responses" else OpenAILanguageModel
    model = api(client, config.openai_llm_model, reasoning=config.openai_llm_reasoning)
    return harden_llm(model, local if config.fallback else None)


async def _local_model(
    config: PipelineConfig,
    knowledge: KnowledgeBase,
    stack: AsyncExitStack,
    substitutes: dict[str, str],
) -> LanguageModel | None:
    """The local language model, started; None when it cannot be (its extra is not installed,
    its file fails the check, it does not load): logged, and noted in ``substitutes``."""
    from pipeline.llama_llm import LlamaCppLanguageModel
    from pipeline.local_llm_file import ModelFileError
    from pipeline.providers import ProviderError

    tools = [tool.spec for tool in builtin_tools(knowledge)]
    facts = [f"{entry.title}: {entry.answer}" for entry in knowledge.entries]
    model = LlamaCppLanguageModel(
        config.local_llm_config(), topics=knowledge.titles, facts=facts, warm_tools=tools
    )
    try:
        await model.start()
    except (ImportError, ModelFileError, ProviderError) as error:
        await model.aclose()
        substitutes["llm"] = f"local model unavailable: {error}"
        log.error("PIPELINE_LLM=local: %s; the rule-based agent answers instead", error)
        return None
    stack.push_async_callback(model.aclose)
    log.info("PIPELINE_LLM=local: %s loaded and warm", model.name)
    return model


async def _text_to_speech(
    config: PipelineConfig, stack: AsyncExitStack, client: Any, pool: PipelinePool
) -> TextToSpeech:
    def offline() -> TextToSpeech:
        if config.tts == "espeak":
            return EspeakTextToSpeech(config.espeak_config())
        return PiperTextToSpeech(config.piper_config(), pool)

    if config.tts != "openai":
        return await _started(offline(), stack)  # type: ignore[no-any-return]
    from pipeline.openai_providers import OpenAITextToSpeech
    from pipeline.resilience import harden_tts

    primary = OpenAITextToSpeech(client, config.openai_tts_model, config.openai_tts_voice)
    fallback = await _started(offline(), stack) if config.fallback else None
    return harden_tts(primary, fallback)


def cost_estimator(config: PipelineConfig) -> CostEstimator:
    """Prices the OpenAI stages of a turn with ``pipeline.pricing``; offline stages are free."""
    from pipeline.pricing import TurnUsage, estimate_cost_usd, load_prices

    prices = load_prices()

    def estimate(record: TurnRecord) -> float:
        usage = TurnUsage(
            stt_model=config.openai_stt_model if config.stt == "openai" else None,
            audio_in_s=record.input_audio_s,
            llm_model=_llm_model(config, record),
            input_tokens=record.llm_input_tokens,
            output_tokens=record.llm_output_tokens,
            tts_model=config.openai_tts_model if config.tts == "openai" else None,
            characters=record.tts_chars,
        )
        return estimate_cost_usd(usage, prices)

    return estimate


def _llm_model(config: PipelineConfig, record: TurnRecord) -> str | None:
    """The model a turn's answer asked for: the one its provider's name carries (a session's
    own, ``providers.answering_as``), else the deployment's; offline: none."""
    if config.llm != "openai":
        return None
    _, _, model = record.llm_provider.partition("/")
    return model or config.openai_llm_model
