"""A circuit breaker: closed, open, half-open, on an injected clock.

Closed: calls pass; ``failure_threshold`` consecutive failures open it. Open: calls fail fast
with ``CircuitOpenError`` (retryable, so a fallback or a later turn may try again) until
``reset_timeout_s`` has passed; then half-open: ``half_open_max_calls`` probes pass, the first
verdict closes or re-opens it. A failure is a *retryable* ``ProviderError`` (5xx, 429,
timeouts, connection errors); a non-retryable one means the service answered (a 400 is our
fault, not its), so it counts as a sign of health. A call the consumer closes after its first
item succeeded; one closed before any item says nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pipeline.providers import ProviderError

BreakerState = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]
Transition = Callable[[str, BreakerState], None]


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    reset_timeout_s: float = 10.0
    half_open_max_calls: int = 1

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "reset_timeout_s", "half_open_max_calls"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BreakerPolicy.{name} must be > 0")


class CircuitOpenError(ProviderError):
    """The breaker refused the call without trying the provider."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(provider, message, retryable=True)


class CircuitBreaker:
    def __init__(
        self,
        provider: str,
        policy: BreakerPolicy,
        clock: Clock | None = None,
        on_transition: Transition | None = None,
    ) -> None:
        self.provider = provider
        self._policy = policy
        self._clock = clock
        self._on_transition = on_transition
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._generation = 0  # bumped on every transition; probes of a past state don't count

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self._now() - self._opened_at >= self._policy.reset_timeout_s:
            self._move("half_open")
        return self._state

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._probes = 0
        if state == "open":
            self._opened_at = self._now()
        if state == "closed":
            self._failures = 0
        if self._on_transition is not None:
            self._on_transition(self.provider, state)

    def admit(self) -> BreakerCall:
        """Let one call through, or raise CircuitOpenError; the caller must ``end()`` it."""
        state = self.state
        if state == "open":
            wait_s = self._opened_at + self._policy.reset_timeout_s - self._now()
            raise CircuitOpenError(self.provider, f"circuit open; next probe in {wait_s:.1f} s")
        probe = state == "half_open"
        if probe and self._probes >= self._policy.half_open_max_calls:
            raise CircuitOpenError(self.provider, "circuit half-open; a probe is in flight")
        self._probes += probe
        return BreakerCall(self, probe, self._generation)

    def release_probe(self, generation: int) -> None:
        if generation == self._generation:
            self._probes -= 1

    def record_success(self) -> None:
        if self._state == "half_open":
            self._move("closed")
        elif self._state == "closed":
            self._failures = 0

    def record_failure(self) -> None:
        if self._state == "half_open":
            self._move("open")
        elif self._state == "closed":
            self._failures += 1
            if self._failures >= self._policy.failure_threshold:
                self._move("open")


class BreakerCall:
    """The verdict of one admitted call."""

    def __init__(self, breaker: CircuitBreaker, probe: bool, generation: int) -> None:
        self._breaker = breaker
        self._probe = probe
        self._generation = generation
        self._got_item = False
        self._settled = False

    def got_item(self) -> None:
        self._got_item = True

    def succeeded(self) -> None:
        self._verdict(ok=True)

    def failed(self, error: ProviderError) -> None:
        self._verdict(ok=not error.retryable)

    def end(self) -> None:
        """Release a half-open probe; a call closed by its consumer after an item succeeded."""
        if self._probe:
            self._breaker.release_probe(self._generation)
        if self._got_item:
            self._verdict(ok=True)

    def _verdict(self, *, ok: bool) -> None:
        if self._settled:
            return
        self._settled = True
        if ok:
            self._breaker.record_success()
        else:
            self._breaker.record_failure()
