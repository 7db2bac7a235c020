"""The rule-based agent's fixed replies, synthesized as the providers open
(pipeline/speech_prewarm.py): the chunks prewarmed are exactly those a response speaks, so a
first caller's knowledge answer is played from the cache without one synthesis."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from deploy.waiting import eventually
from pipeline import events as ev
from pipeline.assembly import build_engine, open_providers, speech_chunks
from pipeline.config import ChunkerConfig, PipelineConfig
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.providers import Message
from pipeline.speech_prewarm import reply_chunks

KNOWLEDGE = load_knowledge()


def test_every_reply_that_does_not_depend_on_the_moment_is_a_fixed_one() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    fixed = set(agent.fixed_replies())
    asked = [f"Tell me about {entry.title}" for entry in KNOWLEDGE.entries]
    asked += ["hello", "What is the weather like on Mars?", "um"]
    replies = [agent.decide([Message("user", question)], set()) for question in asked]
    assert [reply for reply in replies if reply not in fixed] == []
    assert agent.decide([], set()) in fixed


def test_a_reply_is_cut_as_a_response_cuts_it_each_chunk_once() -> None:
    one = "Coffee is made from roasted beans. It keeps people awake, and people like it."
    chunks = reply_chunks([one, one], ChunkerConfig())
    assert len(chunks) >= 2 and " ".join(c.strip() for c in chunks) == one
    assert len(chunks) == len(set(chunks))


async def test_a_first_knowledge_answer_is_played_from_the_prewarmed_speech() -> None:
    config = PipelineConfig(stt="pocketsphinx", llm="rule", tts="piper", speech_prewarm=True)
    async with open_providers(config) as providers:
        tts, agent = providers.tts, providers.llm
        assert isinstance(tts, PiperTextToSpeech) and isinstance(agent, LocalRuleBasedAgent)
        chunks = speech_chunks(agent, config)
        await eventually(lambda: len(tts.cache) == len(chunks), 120, "the prewarmed chunks")
        misses = tts.cache.misses
        engine = build_engine(config, providers)
        async with engine:
            engine.add_user_text("Tell me about coffee")
            engine.create_response()
            async with asyncio.timeout(60), aclosing(engine.events()) as stream:
                async for event in stream:
                    if isinstance(event, ev.TurnCompleted):
                        break
        assert tts.cache.misses == misses, "a chunk of the answer was not among those prewarmed"
        assert tts.cache.hits >= 1
