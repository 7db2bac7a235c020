"""Timeout, retry budget, circuit breaker and fallback, against a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from deploy.fake_openai import FakeOpenAIServer
from pipeline.circuit_breaker import BreakerPolicy, CircuitBreaker, CircuitOpenError
from pipeline.openai_providers import OpenAILanguageModel, OpenAISpeechToText, OpenAITextToSpeech
from pipeline.providers import (
    AudioChunk,
    LanguageModel,
    LanguageModelEvent,
    Message,
    ProviderError,
    SpeechToText,
    TextDelta,
    TextToSpeech,
)
from pipeline.resilience import (
    ResiliencePolicy,
    RetryPolicy,
    TimeoutPolicy,
    harden_llm,
    harden_stt,
    harden_tts,
)

PRIMARY = "gpt-4o-mini"
SECOND = "second-model"
QUESTION = [Message("user", "what time is it")]


class ManualClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class RecordedSleep:
    """The backoff's sleep, recorded (and not slept: the delays are checked, not waited)."""

    def __init__(self) -> None:
        self.delays_s: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.delays_s.append(delay_s)


def state(breaker: CircuitBreaker) -> str:
    return breaker.state


def policy(
    *,
    attempts: int = 3,
    budget: float = 10.0,
    threshold: int = 3,
    first_item_s: float = 10.0,
    call_s: float = 20.0,
) -> ResiliencePolicy:
    return ResiliencePolicy(
        timeout=TimeoutPolicy(first_item_timeout_s=first_item_s, call_timeout_s=call_s),
        retry=RetryPolicy(
            max_attempts=attempts, base_delay_s=0.002, max_delay_s=0.01, budget_tokens=budget
        ),
        breaker=BreakerPolicy(failure_threshold=threshold, reset_timeout_s=10.0),
    )


async def answer(llm: LanguageModel) -> str:
    events: list[LanguageModelEvent] = [e async for e in llm.generate(QUESTION, [])]
    return "".join(e.text for e in events if isinstance(e, TextDelta)).strip()


async def utterance(duration_ms: int, pace_s: float = 0.0) -> AsyncIterator[AudioChunk]:
    for _ in range(duration_ms // 20):
        if pace_s:
            await asyncio.sleep(pace_s)  # a live microphone: 20 ms frames arrive over time
        yield AudioChunk(b"\x01\x00" * 320, 16_000)


def test_hardened_providers_implement_the_protocols(client: openai.AsyncOpenAI) -> None:
    assert isinstance(harden_stt(OpenAISpeechToText(client)), SpeechToText)
    assert isinstance(harden_llm(OpenAILanguageModel(client)), LanguageModel)
    assert isinstance(harden_tts(OpenAITextToSpeech(client)), TextToSpeech)


# --- retry ----------------------------------------------------------------------------------


async def test_429_and_500_are_retried_with_jittered_backoff_then_succeed(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"chat": [429, 500]})
    sleep = RecordedSleep()
    llm = harden_llm(OpenAILanguageModel(client), policy=policy(), sleep=sleep)
    assert await answer(llm) == "You said: what time is it"
    assert (await server.stats())["hits"]["chat"] == 3
    name = llm.name
    assert (llm.stats.attempts[name], llm.stats.failures[name], llm.stats.retries[name]) == (
        3,
        2,
        2,
    )
    assert len(sleep.delays_s) == 2
    assert 0 <= sleep.delays_s[0] <= 0.002 and 0 <= sleep.delays_s[1] <= 0.004
    assert state(llm.breaker) == "closed"


async def test_a_retried_transcription_hears_the_whole_utterance_again(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"transcriptions": [503]})
    stt = harden_stt(OpenAISpeechToText(client), policy=policy())
    transcripts = [t async for t in stt.transcribe(utterance(500))]
    assert transcripts[-1].final and transcripts[-1].text == "heard 500 milliseconds at 16000 hertz"
    assert sum(t.final for t in transcripts) == 1
    assert (await server.stats())["hits"]["transcriptions"] == 2


async def test_400_is_not_retried(server: FakeOpenAIServer, client: openai.AsyncOpenAI) -> None:
    await server.control(fail={"speech": [400]})
    tts = harden_tts(OpenAITextToSpeech(client), policy=policy())
    with pytest.raises(ProviderError) as caught:
        _ = [chunk async for chunk in tts.synthesize("hello")]
    assert not caught.value.retryable
    assert (await server.stats())["hits"]["speech"] == 1
    assert tts.stats.retries[tts.name] == 0
    assert state(tts.breaker) == "closed"  # the server answered: not a sign of ill health


async def test_the_retry_budget_stops_a_retry_storm(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"chat": [500] * 100})
    llm = harden_llm(
        OpenAILanguageModel(client), policy=policy(attempts=5, budget=3.0, threshold=1000)
    )
    errors: list[ProviderError] = []

    async def call() -> None:
        try:
            await answer(llm)
        except ProviderError as error:
            errors.append(error)

    async with asyncio.TaskGroup() as group:
        for _ in range(10):
            group.create_task(call())
    assert len(errors) == 10
    # Without a budget 10 calls x 5 attempts = 50 requests; the bucket held 3 retries.
    assert (await server.stats())["hits"]["chat"] == 13
    assert llm.stats.retries[llm.name] == 3
    assert llm.stats.retries_denied[llm.name] == 10


async def test_successes_refill_the_retry_budget(client: openai.AsyncOpenAI) -> None:
    llm = harden_llm(OpenAILanguageModel(client), policy=policy(budget=1.0))
    assert llm.retry.budget.withdraw()
    assert not llm.retry.budget.withdraw()
    for _ in range(10):
        await answer(llm)
    assert llm.retry.budget.tokens == pytest.approx(1.0)
    assert llm.retry.budget.withdraw()


# --- circuit breaker and fallback -----------------------------------------------------------


async def test_a_persistent_failure_opens_the_circuit_and_the_fallback_answers(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={f"chat:{PRIMARY}": [500] * 100})
    primary, second = OpenAILanguageModel(client, PRIMARY), OpenAILanguageModel(client, SECOND)
    llm = harden_llm(primary, fallback=second, policy=policy(attempts=3, threshold=3))
    assert await answer(llm) == "You said: what time is it"
    assert state(llm.breaker) == "open"
    assert await answer(llm) == "You said: what time is it"
    hits = (await server.stats())["hits"]
    assert (hits[f"chat:{PRIMARY}"], hits[f"chat:{SECOND}"]) == (3, 2)
    stats = llm.stats
    assert stats.short_circuited[primary.name] == 1
    assert stats.fallbacks[primary.name] == 2
    assert stats.served[second.name] == 2
    assert dict(stats.breaker_transitions) == {f"{primary.name}:open": 1}


async def test_an_open_circuit_fails_fast_naming_itself(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"chat": [500, 500]})
    clock = ManualClock()
    llm = harden_llm(
        OpenAILanguageModel(client), policy=policy(attempts=1, threshold=2), clock=clock
    )
    for _ in range(2):
        with pytest.raises(ProviderError):
            await answer(llm)
    with pytest.raises(CircuitOpenError) as caught:
        await answer(llm)
    assert caught.value.retryable
    assert str(caught.value) == f"{llm.name}: circuit open; next probe in 10.0 s"
    assert (await server.stats())["hits"]["chat"] == 2


async def test_half_open_lets_one_probe_through_and_recovers(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"chat": [500, 500, 500]})
    clock = ManualClock()
    llm = harden_llm(
        OpenAILanguageModel(client), policy=policy(attempts=1, threshold=2), clock=clock
    )
    for _ in range(2):
        with pytest.raises(ProviderError):
            await answer(llm)
    clock.now_s += 10.0
    assert state(llm.breaker) == "half_open"
    with pytest.raises(ProviderError):  # the probe fails: open again
        await answer(llm)
    assert state(llm.breaker) == "open"
    clock.now_s += 10.0
    await server.control(hold=["chat"])
    probe = llm.generate(QUESTION, [])
    assert isinstance(await anext(probe), TextDelta)
    with pytest.raises(CircuitOpenError, match="probe is in flight"):
        await answer(llm)
    await server.release("chat")
    _ = [event async for event in probe]
    assert state(llm.breaker) == "closed"
    assert await answer(llm) == "You said: what time is it"
    assert dict(llm.stats.breaker_transitions) == {
        f"{llm.name}:open": 2,
        f"{llm.name}:half_open": 2,
        f"{llm.name}:closed": 1,
    }


async def test_speech_falls_back_to_piper(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    from pipeline.piper_tts import PiperTextToSpeech

    await server.control(fail={"speech": [503] * 100})
    piper = PiperTextToSpeech()
    await piper.start()
    try:
        tts = harden_tts(OpenAITextToSpeech(client), fallback=piper, policy=policy(attempts=2))
        chunks = [chunk async for chunk in tts.synthesize("Hello from the fallback voice.")]
    finally:
        await piper.aclose()
    assert sum(chunk.duration_s for chunk in chunks) > 0.5
    assert {chunk.sample_rate_hz for chunk in chunks} == {piper.sample_rate_hz}
    assert tts.stats.served == {"piper": 1}
    assert (await server.stats())["hits"]["speech"] == 2


async def test_transcription_falls_back_with_the_whole_utterance(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(fail={"transcriptions:gpt-4o-mini-transcribe": [500] * 10})
    stt = harden_stt(
        OpenAISpeechToText(client),
        fallback=OpenAISpeechToText(client, model="whisper-1"),
        policy=policy(attempts=2),
    )
    transcripts = [t async for t in stt.transcribe(utterance(300))]
    assert transcripts[-1].text == "heard 300 milliseconds at 16000 hertz"
    assert stt.stats.served == {"openai-stt/whisper-1": 1}


# --- timeouts and partially consumed streams ------------------------------------------------


async def test_no_first_item_in_time_is_a_retryable_timeout(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(stall_s={"chat": 30.0})
    llm = harden_llm(OpenAILanguageModel(client), policy=policy(attempts=2, first_item_s=0.2))
    with pytest.raises(ProviderError, match=r"no first item within 0.2 s") as caught:
        await answer(llm)
    assert caught.value.retryable
    assert (await server.stats())["hits"]["chat"] == 2
    await server.wait_for("disconnected", "chat", 2)  # each timed-out stream was closed


async def test_the_stt_timeout_counts_from_the_end_of_the_utterance(
    client: openai.AsyncOpenAI,
) -> None:
    stt = harden_stt(OpenAISpeechToText(client), policy=policy(first_item_s=0.3))
    # The utterance takes ~0.6 s to arrive, twice the first-item timeout.
    transcripts = [t async for t in stt.transcribe(utterance(600, pace_s=0.02))]
    assert transcripts[-1].text == "heard 600 milliseconds at 16000 hertz"


async def test_a_stream_that_fails_after_its_first_item_is_not_replayed(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["speech"])
    primary = OpenAITextToSpeech(client)
    second = OpenAITextToSpeech(client, model=SECOND)
    tts = harden_tts(primary, fallback=second, policy=policy(first_item_s=1.0, call_s=1.0))
    received: list[AudioChunk] = []
    with pytest.raises(ProviderError, match="call took over 1.0 s"):
        async for chunk in tts.synthesize("one two three"):
            received.append(chunk)
    assert len(received) == 1
    assert (await server.stats())["hits"] == {"speech": 1, f"speech:{primary.model}": 1}
    assert tts.stats.retries[primary.name] == 0 and tts.stats.fallbacks[primary.name] == 0


async def test_the_call_timeout_adds_up_the_waits_on_the_provider(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(chunk_delay_s=0.3)  # 4 chunks: ~0.9 s of waiting, 0.3 s at a time
    tts = harden_tts(OpenAITextToSpeech(client), policy=policy(attempts=1, call_s=0.75))
    received: list[AudioChunk] = []
    with pytest.raises(ProviderError, match="call took over 0.75 s"):
        async for chunk in tts.synthesize("one two three four"):
            received.append(chunk)
    assert 1 <= len(received) < 4


async def test_time_the_consumer_holds_an_item_is_not_the_providers(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    # Chunks 0.4 s apart, each held 0.35 s by a slow playout: ~1.25 s from first to last,
    # of which only ~0.05 s per chunk is spent waiting on the provider.
    await server.control(chunk_delay_s=0.4)
    tts = harden_tts(OpenAITextToSpeech(client), policy=policy(attempts=1, call_s=0.7))
    received: list[AudioChunk] = []
    async for chunk in tts.synthesize("one two three four"):
        received.append(chunk)
        await asyncio.sleep(0.35)
    assert len(received) == 4


async def test_closing_a_hardened_stream_closes_the_http_stream(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["speech"])
    tts = harden_tts(OpenAITextToSpeech(client), policy=policy())
    chunks = tts.synthesize("stop me early")
    await anext(chunks)
    await chunks.aclose()
    await server.wait_for("disconnected", "speech", 1)
    assert state(tts.breaker) == "closed"
    assert tts.stats.failures[tts.name] == 0


# --- the breaker and the policies on their own ----------------------------------------------


def test_breaker_counts_only_consecutive_retryable_failures() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("p", BreakerPolicy(failure_threshold=2, reset_timeout_s=5.0), clock)
    retryable = ProviderError("p", "500", retryable=True)
    for error in (retryable, ProviderError("p", "400", retryable=False), retryable):
        call = breaker.admit()
        call.failed(error)
        call.end()
    assert state(breaker) == "closed"  # the 400 in between reset the count
    call = breaker.admit()
    call.failed(retryable)
    call.end()
    assert state(breaker) == "open"
    clock.now_s += 4.9
    assert state(breaker) == "open"
    clock.now_s += 0.1
    assert state(breaker) == "half_open"


def test_a_probe_closed_before_any_item_leaves_the_breaker_half_open() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker("p", BreakerPolicy(failure_threshold=1, reset_timeout_s=1.0), clock)
    call = breaker.admit()
    call.failed(ProviderError("p", "503", retryable=True))
    call.end()
    clock.now_s += 1.0
    breaker.admit().end()  # cancelled before its first item: no verdict, the slot is free
    assert state(breaker) == "half_open"
    call = breaker.admit()
    call.got_item()
    call.end()
    assert state(breaker) == "closed"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: RetryPolicy(max_attempts=0), "RetryPolicy.max_attempts"),
        (lambda: TimeoutPolicy(first_item_timeout_s=0), "TimeoutPolicy.first_item_timeout_s"),
        (lambda: BreakerPolicy(reset_timeout_s=-1), "BreakerPolicy.reset_timeout_s"),
    ],
)
def test_invalid_policies_name_the_field(make: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()  # type: ignore[operator]


def test_backoff_is_full_jitter_under_a_cap(client: openai.AsyncOpenAI) -> None:
    retry_policy = RetryPolicy(base_delay_s=0.1, max_delay_s=0.5)
    llm = harden_llm(
        OpenAILanguageModel(client),
        policy=ResiliencePolicy(retry=retry_policy),
        rng=random.Random(7),
    )
    for number, ceiling_s in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 0.5)):
        delays = [llm.retry.backoff_s(number) for _ in range(200)]
        assert all(0 <= d <= ceiling_s for d in delays)
        assert max(delays) > 0.8 * ceiling_s and min(delays) < 0.2 * ceiling_s


async def test_a_bug_in_our_code_propagates_instead_of_falling_back(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """A programming error (here: a tool that is not a ToolSpec reaches the adapter) is raised
    as is; the fallback is never asked, so the bug is not hidden behind its answer."""
    primary, second = OpenAILanguageModel(client, PRIMARY), OpenAILanguageModel(client, SECOND)
    llm = harden_llm(primary, fallback=second, policy=policy())
    not_a_tool: Any = object()
    with pytest.raises(AttributeError):
        [event async for event in llm.generate(QUESTION, [not_a_tool])]
    hits = (await server.stats())["hits"]
    assert (hits.get(f"chat:{PRIMARY}", 0), hits.get(f"chat:{SECOND}", 0)) == (0, 0)
    assert llm.stats.fallbacks[primary.name] == 0
    assert llm.stats.retries[primary.name] == 0


async def test_a_refusal_for_good_still_falls_back(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """A non-retryable provider error (401: a revoked key) is not retried, but another provider
    may well answer: the fallback does."""
    await server.control(fail={f"chat:{PRIMARY}": [401]})
    primary, second = OpenAILanguageModel(client, PRIMARY), OpenAILanguageModel(client, SECOND)
    llm = harden_llm(primary, fallback=second, policy=policy())
    assert await answer(llm) == "You said: what time is it"
    assert llm.stats.retries[primary.name] == 0
    assert llm.stats.fallbacks[primary.name] == 1
