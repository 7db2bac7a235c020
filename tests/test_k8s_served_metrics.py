"""The metrics the autoscalers and alerts of k8s/ read are served with the values they mean: a
transceiver's capacity and draining, and each provider's circuit breaker (state, transitions,
calls refused). The names are checked against the rules by test_k8s_monitoring.py; here, the
values, read from the real objects through the transceiver's own registry wiring."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from metric_samples import served_samples
from prometheus_client import CollectorRegistry

from pipeline.providers import LanguageModelEvent, Message, ProviderError, TextDelta, ToolSpec
from pipeline.resilience import (
    BreakerPolicy,
    ResiliencePolicy,
    RetryPolicy,
    TimeoutPolicy,
    harden_llm,
)
from transceiver.http.app import _capacity_collector
from transceiver.metrics import ResilienceCollector
from transceiver.webrtc.calls import CallLimits, Calls


async def test_capacity_and_draining_come_from_the_calls() -> None:
    registry = CollectorRegistry()
    calls = Calls(None, CallLimits(capacity=7, connect_timeout_s=1.0), registry, None)  # type: ignore[arg-type]
    registry.register(_capacity_collector(calls))
    served = served_samples(registry)
    assert (served["transceiver_capacity"], served["transceiver_draining"]) == (7.0, 0.0)
    await calls.drain(0.1)  # no calls: the drain only stops admission
    assert served_samples(registry)["transceiver_draining"] == 1.0


class Model:
    """A language model that fails (a 503, retryable) until told otherwise."""

    def __init__(self, name: str, failing: bool) -> None:
        self.name = name
        self.failing = failing

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        if self.failing:
            raise ProviderError(self.name, "503 from upstream", retryable=True)
        yield TextDelta("hello")


async def answer(llm: object) -> str:
    events = [e async for e in llm.generate([], [])]  # type: ignore[attr-defined]
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def no_sleep(_: float) -> None:
    return None


async def test_the_circuit_state_its_transitions_and_refused_calls_are_served() -> None:
    now = [0.0]
    primary, fallback = Model("primary-llm", failing=True), Model("offline-llm", failing=False)
    policy = ResiliencePolicy(
        timeout=TimeoutPolicy(first_item_timeout_s=5, call_timeout_s=5),
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.001, max_delay_s=0.001),
        breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=10.0),
    )
    llm = harden_llm(primary, fallback, policy, clock=lambda: now[0], sleep=no_sleep)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    registry.register(ResilienceCollector([llm]))
    provider = '{provider="primary-llm"}'
    assert served_samples(registry)[f"transceiver_provider_circuit_open{provider}"] == 0.0

    assert await answer(llm) == "hello"  # two failures open the circuit; the fallback answers
    assert await answer(llm) == "hello"  # refused at once by the open circuit
    served = served_samples(registry)
    assert served[f"transceiver_provider_circuit_open{provider}"] == 1.0
    assert served[f"transceiver_provider_short_circuited_total{provider}"] == 1.0
    opened = 'transceiver_provider_circuit_transitions_total{provider="primary-llm",state="open"}'
    assert served[opened] == 1.0

    now[0] = 11.0  # past the reset timeout: still "open" until a call probes it
    assert served_samples(registry)[f"transceiver_provider_circuit_open{provider}"] == 1.0
    primary.failing = False
    assert await answer(llm) == "hello"  # the probe succeeds: closed
    served = served_samples(registry)
    assert served[f"transceiver_provider_circuit_open{provider}"] == 0.0
    moved = {k: v for k, v in served.items() if k.startswith("transceiver_provider_circuit_tr")}
    assert moved == {
        opened: 1.0,
        opened.replace('"open"', '"half_open"'): 1.0,
        opened.replace('"open"', '"closed"'): 1.0,
    }
