"""Resilience as wrappers: timeout, retry under a budget, circuit breaker, fallback chain.

I/O layer (asyncio); the policies are frozen dataclasses. Each hardened provider implements
the same Protocol as what it wraps, so the engine never knows. ``harden_stt``/``harden_llm``/
``harden_tts`` stack the guards of ``pipeline.guards`` around the primary, from the inside out
count -> timeout -> circuit breaker -> retry, and put the fallback (counted) behind them. The
fallback takes over only when the primary failed (a ``ProviderError``, never a bug of ours)
before yielding anything.

Per call, the detours it took: ``reporting(provider, sink)`` is a view of a hardened provider
(the same breaker, budget and counters) that hands ``sink`` one :class:`Detour` for each call
that was retried or passed on to the fallback (stage, from and to, the last failure, attempts).
The engine gives each turn's calls a sink of that turn's (``pipeline.engine``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
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
    NO_HINTS,
    AudioChunk,
    LanguageModel,
    LanguageModelEvent,
    Message,
    ModelOptions,
    ProviderError,
    SpeechToText,
    TextToSpeech,
    ToolChoice,
    ToolSpec,
    Transcript,
    TranscriptionHints,
    answering_as,
    generate_with,
    sees_images,
    synthesize_with,
    transcribe_with,
    transcription_details,
    with_options,
)

__all__ = [
    "BreakerPolicy",
    "Detour",
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
    "reporting",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ResiliencePolicy:
    """Everything ``harden_*`` needs to know; the defaults suit a voice turn."""

    timeout: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)


# --- detours: what one call took besides its first provider's first answer --------------------

MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class Detour:
    """One call that did not go as planned. ``retry``: ``to_provider`` (the same) answered, or
    with ``served`` False finally failed, after ``attempts`` tries; ``fallback``: ``from_provider``
    failed ``attempts`` times and the call passed on to ``to_provider`` (``served``: it answered).
    ``reason`` is the last failure before that."""

    stage: str  # stt, llm or tts
    kind: str  # retry or fallback
    from_provider: str
    to_provider: str
    reason: str
    attempts: int
    served: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "kind": self.kind, "from": self.from_provider,
            "to": self.to_provider, "reason": self.reason, "attempts": self.attempts,
            "served": self.served,
        }  # fmt: skip


DetourSink = Callable[[Detour], None]


class AttemptLog:
    """A guard just inside the retry: one call's attempts on its primary, and the last failure."""

    def __init__(self) -> None:
        self.attempts = 0
        self.reason = ""

    async def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        self.attempts += 1
        iterator = attempt()
        try:
            async for item in iterator:
                yield item
        except ProviderError as error:
            self.reason = str(error)[:MAX_REASON_CHARS]
            raise
        finally:
            await close_iterator(iterator)


@dataclass
class CallNotes:
    """What one call of a reporting provider took, told to its sink as it becomes known."""

    stage: str
    names: Sequence[str]  # the tiers' providers, primary first
    sink: DetourSink
    primary: AttemptLog = field(default_factory=AttemptLog)
    _reasons: dict[int, str] = field(default_factory=dict)  # tier -> why it failed

    def served(self, position: int) -> None:
        """Tier ``position`` yielded its first item."""
        if position > 0:
            self._fallback(position, served=True)
        elif self.primary.attempts > 1:
            self._retry(served=True)

    def failed(self, position: int, error: ProviderError, last: bool) -> None:
        """Tier ``position`` failed before yielding anything (``last``: no tier after it)."""
        self._reasons[position] = str(error)[:MAX_REASON_CHARS]
        if last and position > 0:
            self._fallback(position, served=False)
        elif last and self.primary.attempts > 1:
            self._retry(served=False)

    def _attempts(self, position: int) -> int:
        return self.primary.attempts if position == 0 else 1

    def _retry(self, served: bool) -> None:
        primary, log = self.names[0], self.primary
        self.sink(Detour(self.stage, "retry", primary, primary, log.reason, log.attempts, served))

    def _fallback(self, position: int, served: bool) -> None:
        before = position - 1
        detour = Detour(
            self.stage, "fallback", self.names[before], self.names[position],
            self._reasons.get(before, ""), self._attempts(before), served,
        )  # fmt: skip
        self.sink(detour)


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
    calls: Sequence[tuple[str, Attempt[T]]],
    stats: ResilienceStats,
    notes: CallNotes | None = None,
) -> AsyncGenerator[T, None]:
    """Try each call in order; move on when one fails with a ``ProviderError`` before yielding
    anything. Any ``ProviderError`` moves on, retryable or not: ``retryable`` says whether the
    *same* provider may answer a second try, while a refusal for good (a revoked key, a model
    gone) is exactly when another provider helps. Any other exception is a bug in our code or
    in the provider's adapter (the adapters map every provider failure to ``ProviderError``):
    it propagates unchanged, so it is seen instead of hidden behind a working fallback.
    ``notes`` (a reporting call) hears of each tier that served or failed."""
    for position, (name, attempt) in enumerate(calls):
        yielded = False
        iterator = attempt()
        try:
            async for item in iterator:
                if not yielded:
                    yielded = True
                    stats.served[name] += 1
                    if notes is not None:
                        notes.served(position)
                yield item
            return
        except ProviderError as error:
            last = position == len(calls) - 1
            if notes is not None and not yielded:
                notes.failed(position, error, last)
            if yielded or last:
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
        self._sink: DetourSink | None = None  # a reporting view's (``reporting``)
        if fallback is not None:
            self._providers.append(fallback)
            self._tiers.append(Tier[Any](fallback.name, [CountGuard(fallback.name, self.stats)]))

    def _moved(self, provider: str, state: BreakerState) -> None:
        self.circuit = state
        self.stats.moved(provider, state)

    def reporting(self, sink: DetourSink) -> _Hardened[P]:
        """This provider (its breaker, budget and counters shared), telling ``sink`` the
        detours of each call made through the view."""
        view = copy.copy(self)
        view._sink = sink
        return view

    def _run(self, attempts: Sequence[Attempt[T]], input_end: InputEnd) -> AsyncGenerator[T, None]:
        tiers, notes = self._tiers, None
        if self._sink is not None:
            notes = CallNotes(_stage(self), [tier.name for tier in tiers], self._sink)
            primary = tiers[0]
            guards = [*primary.guards[:-1], notes.primary, primary.guards[-1]]
            tiers = [Tier[Any](primary.name, guards), *tiers[1:]]
        calls = [
            (tier.name, partial(tier.run, attempt, input_end))
            for tier, attempt in zip(tiers, attempts, strict=True)
        ]
        return first_to_answer(calls, self.stats, notes)


class HardenedSpeechToText(_Hardened[SpeechToText]):
    @property
    def details(self) -> frozenset[str]:
        """The primary's (an answer from the fallback may come without them)."""
        return transcription_details(self._providers[0])

    def transcribe(
        self, audio: AsyncIterator[AudioChunk], hints: TranscriptionHints = NO_HINTS
    ) -> AsyncGenerator[Transcript, None]:
        replay = AudioReplay(audio)
        attempts = [partial(_transcribe, p, replay, hints) for p in self._providers]
        return self._run(attempts, replay.input_end)


def _transcribe(
    provider: SpeechToText, replay: AudioReplay, hints: TranscriptionHints
) -> AsyncIterator[Transcript]:
    return transcribe_with(provider, replay.fresh(), hints)


class HardenedLanguageModel(_Hardened[LanguageModel]):
    @property
    def sees_images(self) -> bool:
        """The primary's (the fallback answers from a message's text)."""
        return sees_images(self._providers[0])

    def as_model(self, model: str) -> HardenedLanguageModel:
        """The primary sending ``model`` (``providers.answering_as``); its breaker, budget and
        counters shared; the fallback as it is."""
        view = copy.copy(self)
        primary = answering_as(self._providers[0], model)
        view._providers = [primary, *self._providers[1:]]
        view.name = primary.name
        return view

    def with_model_options(self, options: ModelOptions) -> HardenedLanguageModel:
        """Each provider with ``options`` (``providers.with_options``); the rest shared."""
        view = copy.copy(self)
        view._providers = [with_options(provider, options) for provider in self._providers]
        return view

    def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], choice: ToolChoice = "auto"
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        attempts = [partial(generate_with, p, messages, tools, choice) for p in self._providers]
        return self._run(attempts, InputEnd(ended=True))


class HardenedTextToSpeech(_Hardened[TextToSpeech]):
    """The primary's voices; a fallback without the asked voice speaks in its own default."""

    @property
    def voices(self) -> tuple[str, ...]:
        return self._providers[0].voices

    def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> AsyncGenerator[AudioChunk, None]:
        attempts = [
            partial(synthesize_with, p, text, voice if voice in p.voices else None, speed)
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


def _stage(provider: _Hardened[Any]) -> str:
    if isinstance(provider, HardenedSpeechToText):
        return "stt"
    return "llm" if isinstance(provider, HardenedLanguageModel) else "tts"


def reporting(provider: T, sink: DetourSink) -> T:
    """``provider`` telling ``sink`` the detours of its calls; a provider that is not hardened
    (it takes none) as it is."""
    if isinstance(provider, _Hardened):
        return provider.reporting(sink)  # type: ignore[return-value]
    return provider
