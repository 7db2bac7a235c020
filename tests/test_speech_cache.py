"""Synthesized speech kept by text (pipeline/speech_cache.py): its byte bound, which entry
goes first, and piper playing a repeated sentence from it unchanged, without a synthesis job."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import cast

import pytest
from metric_samples import served_samples
from prometheus_client import CollectorRegistry

from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pool import PipelinePool
from pipeline.providers import AudioChunk
from pipeline.speech_cache import SpeechCache, SpeechKey
from transceiver.metrics import PipelinePoolCollector

on_module_loop = pytest.mark.asyncio(loop_scope="module")


def key(text: str, speed: float | None = None) -> SpeechKey:
    return SpeechKey("joe", speed, text)


def test_a_kept_entry_is_returned_and_counted() -> None:
    cache = SpeechCache(100)
    assert cache.get(key("a")) is None
    cache.put(key("a"), (b"12", b"345"))
    assert cache.get(key("a")) == (b"12", b"345")
    assert (cache.hits, cache.misses, cache.bytes, len(cache)) == (1, 1, 5, 1)


def test_the_least_recently_heard_goes_first_to_stay_within_the_bound() -> None:
    cache = SpeechCache(10)
    cache.put(key("a"), (b"aaaa",))
    cache.put(key("b"), (b"bbbb",))
    cache.get(key("a"))  # "b" is now the least recently heard
    cache.put(key("c"), (b"cccc",))
    assert cache.get(key("b")) is None
    assert cache.get(key("a")) == (b"aaaa",) and cache.get(key("c")) == (b"cccc",)
    assert (cache.bytes, cache.evictions) == (8, 1)


def test_an_entry_larger_than_the_bound_is_not_kept_and_evicts_nothing() -> None:
    cache = SpeechCache(10)
    cache.put(key("a"), (b"aaaa",))
    cache.put(key("big"), (b"x" * 6, b"y" * 5))
    assert cache.get(key("big")) is None
    assert (cache.bytes, len(cache), cache.evictions) == (4, 1, 0)


def test_putting_a_key_again_replaces_its_audio_and_its_size() -> None:
    cache = SpeechCache(10)
    cache.put(key("a"), (b"aaaa",))
    cache.put(key("a"), (b"aa",))
    assert cache.get(key("a")) == (b"aa",) and cache.bytes == 2


def test_speed_and_voice_are_part_of_the_key_and_zero_keeps_nothing() -> None:
    cache = SpeechCache(100)
    cache.put(key("a"), (b"slow",))
    assert cache.get(key("a", 0.5)) is None
    assert cache.get(SpeechKey("other", None, "a")) is None
    off = SpeechCache(0)
    off.put(key("a"), (b"x",))
    assert off.get(key("a")) is None and off.bytes == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        SpeechCache(-1)


@on_module_loop
async def test_a_piper_on_a_pool_lends_it_its_cache() -> None:
    pool = PipelinePool()
    try:
        assert PiperTextToSpeech(pool=pool).cache is pool.speech_cache
    finally:
        pool.close()


async def spoken(tts: PiperTextToSpeech, text: str, speed: float = 1.0) -> list[bytes]:
    return [chunk.pcm async for chunk in tts.synthesize(text, speed=speed)]


@on_module_loop
async def test_piper_plays_a_repeated_text_from_the_cache_unchanged(
    piper: PiperTextToSpeech,
) -> None:
    text = "The cache test speaks twice. Then once more."
    first = await spoken(piper, text)
    jobs, hits = piper.load.jobs, piper.cache.hits
    assert len(first) == 2 and all(first)  # two sentences, each its own part
    assert await spoken(piper, text) == first
    assert (piper.load.jobs, piper.cache.hits) == (jobs, hits + 1)  # no synthesis job at all
    faster = await spoken(piper, text, speed=1.5)
    assert piper.load.jobs > jobs and sum(map(len, faster)) < sum(map(len, first))


@on_module_loop
async def test_an_answer_cut_off_before_its_end_is_not_kept(piper: PiperTextToSpeech) -> None:
    text = "This answer is cut. Its second sentence is never heard."
    stream = cast(AsyncGenerator[AudioChunk, None], piper.synthesize(text))
    async with aclosing(stream) as chunks:
        async for _ in chunks:
            break  # the listener barged in after the first sentence
    misses = piper.cache.misses
    assert len(await spoken(piper, text)) == 2
    assert piper.cache.misses == misses + 1  # synthesized again, whole this time


def test_the_pool_serves_the_cache_it_was_given() -> None:
    pool = PipelinePool()
    registry = CollectorRegistry()
    try:
        registry.register(PipelinePoolCollector(pool, registry))
        assert not any("speech_cache" in name for name in served_samples(registry))
        pool.speech_cache = cache = SpeechCache(10)
        cache.get(key("a"))
        cache.put(key("a"), (b"aaaa",))
        cache.get(key("a"))
        cache.put(key("b"), (b"bbbbbbb",))
        served = served_samples(registry)
    finally:
        pool.close()
    prefix = "transceiver_pipeline_speech_cache"
    assert served[f'{prefix}_lookups_total{{result="hit"}}'] == 1
    assert served[f'{prefix}_lookups_total{{result="miss"}}'] == 1
    assert served[f"{prefix}_evictions_total"] == 1
    assert served[f"{prefix}_bytes"] == 7
