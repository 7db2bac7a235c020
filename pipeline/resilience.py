"""Resilience as wrappers: timeout, retry under a budget, circuit breaker, fallback chain.

I/O layer (asyncio); the policies are frozen dataclasses. Each hardened provider implements
the same Protocol as what it wraps, so the engine never knows. ``harden_stt``/``harden_llm``/
``harden_tts`` stack the guards of ``pipeline.guards`` around the primary, from the inside out
count -> timeout -> circuit breaker -> retry, and put the fallback (counted) behind them. The
fallback takes over only when the primary failed (a ``ProviderError``, never a bug of ours)
before yielding anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from pipeline.circuit_breaker import (
    BreakerPolicy,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Clock,
)
from pipeline.guards import (
    Attempt,
    BreakerGuard,
    CountGuard,
    Guard,
    InputEnd,
    ResilienceStats,
    RetryBudget,
    RetryGuard,
    RetryPolicy,
    Sleep,
    TimeoutGuard,
    TimeoutPolicy,
    close_iterator,
)
from pipeline.providers import (
    AudioChunk,
    LanguageModel,
    LanguageModelEvent,
    Message,
    ProviderError,
    SpeechToText,
    TextToSpeech,
    ToolSpec,
    Transcript,
)

__all__ = [
    "BreakerPolicy",
    "CircuitBreaker",
    "CircuitOpenError",
    "ResiliencePolicy",
    "ResilienceStats",
    "RetryBudget",
    "RetryPolicy",
    "TimeoutPolicy",
    "harden_llm",
    "harden_stt",
    "harden_tts",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ResiliencePolicy:
    """Everything ``harden_*`` needs to know; the defaults suit a voice turn."""

    timeout: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)


# --- the utterance, recorded for replays ------------------------------------------------------


class AudioReplay:
    """Records an utterance as it is read, so a retry or a fallback hears all of it again."""

    def __init__(self, source: AsyncIterator[AudioChunk]) -> None:
        self._source = source
        self._chunks: list[AudioChunk] = []
        self.input_end = InputEnd(ended=False)

    async def fresh(self) -> AsyncIterator[AudioChunk]:
        for chunk in list(self._chunks):
            yield chunk
        if self.input_end.ended:
            return
        async for chunk in self._source:
            self._chunks.append(chunk)
            yield chunk
        self.input_end.fire()


@dataclass(frozen=True)
class Tier(Generic[T]):
    """One provider of a fallback chain, with the guards around it (innermost first)."""

    name: str
    guards: Sequence[Guard]

    def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        for guard in self.guards:
            attempt = partial(guard.run, attempt, input_end)
        return attempt()


async def first_to_answer(
    calls: Sequence[tuple[str, Attempt[T]]], stats: ResilienceStats
) -> AsyncGenerator[T, None]:
    """Try each call in order; move on when one fails with a ``ProviderError`` before yielding
    anything. Any ``ProviderError`` moves on, retryable or not: ``retryable`` says whether the
    *same* provider may answer a second try, while a refusal for good (a revoked key, a model
    gone) is exactly when another provider helps. Any other exception is a bug in our code or
    in the provider's adapter (the adapters map every provider failure to ``ProviderError``):
    it propagates unchanged, so it is seen instead of hidden behind a working fallback."""
    for position, (name, attempt) in enumerate(calls):
        yielded = False
        iterator = attempt()
        try:
            async for item in iterator:
                if not yielded:
                    yielded = True
                    stats.served[name] += 1
                yield item
            return
        except ProviderError as error:
            if yielded or position == len(calls) - 1:
                raise
            stats.fallbacks[name] += 1
            log.warning("%s failed, falling back: %s", name, error)
        finally:
            await close_iterator(iterator)


# --- the three hardened providers -----------------------------------------------------------


class _Named(Protocol):
    name: str


P = TypeVar("P", bound=_Named)


class _Hardened(Generic[P]):
    """Count, timeout, breaker and retry around the primary; the fallback (counted) behind."""

    def __init__(
        self,
        primary: P,
        fallback: P | None,
        policy: ResiliencePolicy | None,
        *,
        clock: Clock | None,
        sleep: Sleep | None,
        rng: random.Random | None,
    ) -> None:
        policy = policy or ResiliencePolicy()
        self.name = primary.name
        self.stats = ResilienceStats()
        # The breaker's state as of its last transition, for export only (metrics read it at
        # scrape time; ``breaker.state`` would move an expired open circuit to half-open).
        self.circuit: BreakerState = "closed"
        self.breaker = CircuitBreaker(primary.name, policy.breaker, clock, self._moved)
        self.retry = RetryGuard(
            primary.name, policy.retry, self.stats, sleep or asyncio.sleep, rng or random.Random()
        )
        guards: list[Guard] = [
            CountGuard(primary.name, self.stats),
            TimeoutGuard(primary.name, policy.timeout),
            BreakerGuard(self.breaker, self.stats),
            self.retry,
        ]
        self._providers = [primary]
        self._tiers = [Tier[Any](primary.name, guards)]
        if fallback is not None:
            self._providers.append(fallback)
            self._tiers.append(Tier[Any](fallback.name, [CountGuard(fallback.name, self.stats)]))

    def _moved(self, provider: str, state: BreakerState) -> None:
        self.circuit = state
        self.stats.moved(provider, state)

    def _run(self, attempts: Sequence[Attempt[T]], input_end: InputEnd) -> AsyncGenerator[T, None]:
        calls = [
            (tier.name, partial(tier.run, attempt, input_end))
            for tier, attempt in zip(self._tiers, attempts, strict=True)
        ]
        return first_to_answer(calls, self.stats)


class HardenedSpeechToText(_Hardened[SpeechToText]):
    def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncGenerator[Transcript, None]:
        replay = AudioReplay(audio)
        attempts = [partial(_transcribe, p, replay) for p in self._providers]
        return self._run(attempts, replay.input_end)


def _transcribe(provider: SpeechToText, replay: AudioReplay) -> AsyncIterator[Transcript]:
    return provider.transcribe(replay.fresh())


class HardenedLanguageModel(_Hardened[LanguageModel]):
    def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        attempts = [partial(p.generate, messages, tools) for p in self._providers]
        return self._run(attempts, InputEnd(ended=True))


class HardenedTextToSpeech(_Hardened[TextToSpeech]):
    """The primary's voices; a fallback without the asked voice speaks in its own default."""

    @property
    def voices(self) -> tuple[str, ...]:
        return self._providers[0].voices

    def synthesize(self, text: str, voice: str | None = None) -> AsyncGenerator[AudioChunk, None]:
        attempts = [
            partial(p.synthesize, text, voice if voice in p.voices else None)
            for p in self._providers
        ]
        return self._run(attempts, InputEnd(ended=True))


def harden_stt(
    primary: SpeechToText,
    fallback: SpeechToText | None = None,
    policy: ResiliencePolicy | None = None,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    rng: random.Random | None = None,
) -> HardenedSpeechToText:
    """Timeout, breaker and retry around ``primary``; ``fallback`` (if any) behind them.

    The utterance is recorded as it is read, so a retry or the fallback hears all of it.
    ``clock`` (seconds; default the loop's time) drives the breaker; ``sleep`` and ``rng`` the
    backoff. Timeouts use the loop's time.
    """
    return HardenedSpeechToText(primary, fallback, policy, clock=clock, sleep=sleep, rng=rng)


def harden_llm(
    primary: LanguageModel,
    fallback: LanguageModel | None = None,
    policy: ResiliencePolicy | None = None,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    rng: random.Random | None = None,
) -> HardenedLanguageModel:
    """As ``harden_stt``, for a language model."""
    return HardenedLanguageModel(primary, fallback, policy, clock=clock, sleep=sleep, rng=rng)


def harden_tts(
    primary: TextToSpeech,
    fallback: TextToSpeech | None = None,
    policy: ResiliencePolicy | None = None,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    rng: random.Random | None = None,
) -> HardenedTextToSpeech:
    """As ``harden_stt``, for text to speech (e.g. OpenAI speech, then piper)."""
    return HardenedTextToSpeech(primary, fallback, policy, clock=clock, sleep=sleep, rng=rng)
