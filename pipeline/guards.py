"""The guards a hardened provider is built from: count, timeout, circuit breaker, retry.

I/O layer (asyncio). Each guard wraps "an attempt" -- a function that starts one fresh call
and returns its async iterator -- and is itself an attempt's iterator, so guards stack. None
knows which Protocol it serves; ``pipeline.resilience`` puts them around the providers.

Retries happen only before the first item: a stream the consumer has started on is never
replayed. They draw from a token bucket that successes refill, so a burst of failures cannot
multiply traffic. Timeouts count only time spent waiting on the provider, from the end of the
call's input (for speech-to-text, the end of the utterance).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pipeline.circuit_breaker import BreakerState, CircuitBreaker, CircuitOpenError
from pipeline.providers import ProviderError

log = logging.getLogger(__name__)

T = TypeVar("T")
Attempt = Callable[[], AsyncIterator[T]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class TimeoutPolicy:
    """Time the provider may take, counted from the end of the input (STT: the utterance).

    Only time spent waiting on the provider counts, not time the consumer holds an item, so a
    slow playout never times out a finished stream.
    """

    first_item_timeout_s: float = 5.0
    call_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _require_positive(self, "first_item_timeout_s", "call_timeout_s")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, under a token-bucket retry budget."""

    max_attempts: int = 3
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    budget_tokens: float = 10.0  # bucket size, and what it starts with
    deposit_per_success: float = 0.1  # so retries stay under ~10 % of successful traffic

    def __post_init__(self) -> None:
        _require_positive(self, "max_attempts", "max_delay_s", "budget_tokens")
        if self.base_delay_s < 0 or self.deposit_per_success < 0:
            raise ValueError("RetryPolicy: base_delay_s and deposit_per_success must be >= 0")


@dataclass
class ResilienceStats:
    """Counters by provider name, for export as metrics (e.g. Prometheus counters)."""

    attempts: Counter[str] = field(default_factory=Counter)  # calls that reached a provider
    failures: Counter[str] = field(default_factory=Counter)  # attempts that raised
    retries: Counter[str] = field(default_factory=Counter)
    retries_denied: Counter[str] = field(default_factory=Counter)  # budget empty
    short_circuited: Counter[str] = field(default_factory=Counter)  # refused by an open breaker
    fallbacks: Counter[str] = field(default_factory=Counter)  # calls passed on past this one
    served: Counter[str] = field(default_factory=Counter)  # calls this provider answered
    breaker_transitions: Counter[str] = field(default_factory=Counter)  # "provider:open"

    def moved(self, provider: str, state: BreakerState) -> None:
        self.breaker_transitions[f"{provider}:{state}"] += 1


def _require_positive(policy: object, *names: str) -> None:
    for name in names:
        if not getattr(policy, name) > 0:
            raise ValueError(f"{type(policy).__name__}.{name} must be > 0")


async def close_iterator(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class Guard(Protocol):
    def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]: ...


# --- input end: when the provider's clock starts --------------------------------------------


class InputEnd:
    """Fires once the call's input is complete; timeouts count from then."""

    def __init__(self, ended: bool) -> None:
        self.ended = ended
        self._listeners: list[Callable[[], None]] = []

    def fire(self) -> None:
        if not self.ended:
            self.ended = True
            for listener in list(self._listeners):
                listener()

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def forget(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)


# --- count and timeout ----------------------------------------------------------------------


class CountGuard:
    """Counts attempts and failures by provider; the innermost layer."""

    def __init__(self, provider: str, stats: ResilienceStats) -> None:
        self._provider = provider
        self._stats = stats

    async def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        self._stats.attempts[self._provider] += 1
        iterator = attempt()
        try:
            async for item in iterator:
                yield item
        except Exception:
            self._stats.failures[self._provider] += 1
            raise
        finally:
            await close_iterator(iterator)


class _ProviderClock:
    """The provider-waiting time of one attempt, and the deadline of the current wait."""

    def __init__(self, provider: str, policy: TimeoutPolicy, input_end: InputEnd) -> None:
        self._provider = provider
        self._policy = policy
        self._loop = asyncio.get_running_loop()
        self._armed_at: float | None = self._loop.time() if input_end.ended else None
        self._waited_s = 0.0
        self._got_item = False
        self._timeout: asyncio.Timeout | None = None

    def arm(self) -> None:
        self._armed_at = self._loop.time()
        if self._timeout is not None:
            self._timeout.reschedule(self._deadline(self._armed_at))

    def _deadline(self, now: float) -> float | None:
        if self._armed_at is None:
            return None
        limit_s = self._policy.call_timeout_s
        if not self._got_item:
            limit_s = min(limit_s, self._policy.first_item_timeout_s)
        return now + limit_s - self._waited_s

    async def wait(self, step: Awaitable[T]) -> T:
        started = self._loop.time()
        timeout = self._timeout = asyncio.timeout_at(self._deadline(started))
        try:
            async with timeout:
                item = await step
        except TimeoutError:
            if not timeout.expired():
                raise
            raise self._error() from None
        finally:
            self._timeout = None
            if self._armed_at is not None:
                self._waited_s += self._loop.time() - max(started, self._armed_at)
        self._got_item = True
        return item

    def _error(self) -> ProviderError:
        if self._got_item:
            message = f"timed out: call took over {self._policy.call_timeout_s} s"
        else:
            message = f"timed out: no first item within {self._policy.first_item_timeout_s} s"
        return ProviderError(self._provider, message, retryable=True)


class TimeoutGuard:
    """Fails an attempt that keeps its caller waiting: no first item, or too long in all."""

    def __init__(self, provider: str, policy: TimeoutPolicy) -> None:
        self._provider = provider
        self._policy = policy

    async def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        clock = _ProviderClock(self._provider, self._policy, input_end)
        input_end.listen(clock.arm)
        iterator = attempt()
        try:
            while True:
                try:
                    item = await clock.wait(anext(iterator))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            input_end.forget(clock.arm)
            await close_iterator(iterator)


# --- retry under a budget -------------------------------------------------------------------


class RetryBudget:
    """A token bucket: each success deposits a fraction of a token, each retry withdraws one."""

    def __init__(self, tokens: float, deposit_per_success: float) -> None:
        self._capacity = tokens
        self._deposit = deposit_per_success
        self.tokens = tokens

    def deposit(self) -> None:
        self.tokens = min(self._capacity, self.tokens + self._deposit)

    def withdraw(self) -> bool:
        if self.tokens < 1.0 - 1e-9:  # ten deposits of 0.1 make a token despite rounding
            return False
        self.tokens = max(0.0, self.tokens - 1.0)
        return True


class RetryGuard:
    """Starts the call again after a retryable failure before its first item, budget allowing."""

    def __init__(
        self,
        provider: str,
        policy: RetryPolicy,
        stats: ResilienceStats,
        sleep: Sleep,
        rng: random.Random,
    ) -> None:
        self._provider = provider
        self._policy = policy
        self._stats = stats
        self._sleep = sleep
        self._rng = rng
        self.budget = RetryBudget(policy.budget_tokens, policy.deposit_per_success)

    async def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        for number in range(1, self._policy.max_attempts + 1):
            yielded = False
            iterator = attempt()
            try:
                async for item in iterator:
                    yielded = True
                    yield item
            except ProviderError as error:
                if yielded or not self._may_retry(error, number):
                    raise
                log.info("%s: retrying after attempt %d: %s", self._provider, number, error)
            else:
                self.budget.deposit()
                return
            finally:
                await close_iterator(iterator)
            await self._sleep(self.backoff_s(number))

    def _may_retry(self, error: ProviderError, number: int) -> bool:
        if not error.retryable or isinstance(error, CircuitOpenError):
            return False
        if number >= self._policy.max_attempts:
            return False
        if not self.budget.withdraw():
            self._stats.retries_denied[self._provider] += 1
            return False
        self._stats.retries[self._provider] += 1
        return True

    def backoff_s(self, number: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**(n-1))]."""
        ceiling_s = min(self._policy.max_delay_s, self._policy.base_delay_s * 2 ** (number - 1))
        return self._rng.uniform(0.0, ceiling_s)


# --- the breaker as a guard ---------------------------------------------------------------


class BreakerGuard:
    """Asks the breaker before each attempt and tells it how the attempt went."""

    def __init__(self, breaker: CircuitBreaker, stats: ResilienceStats) -> None:
        self._breaker = breaker
        self._stats = stats

    async def run(self, attempt: Attempt[T], input_end: InputEnd) -> AsyncIterator[T]:
        try:
            call = self._breaker.admit()
        except CircuitOpenError:
            self._stats.short_circuited[self._breaker.provider] += 1
            raise
        iterator = attempt()
        try:
            async for item in iterator:
                call.got_item()
                yield item
        except ProviderError as error:
            call.failed(error)
            raise
        else:
            call.succeeded()
        finally:
            call.end()
            await close_iterator(iterator)
