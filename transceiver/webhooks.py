"""``call.ended`` webhooks: each stored end of a call, POSTed signed to the operator's URL.

I/O layer (httpx). When the call-record writer (``transceiver.store.call_log``) has stored a
leg's end, it hands the whole record to ``WebhookSender.call_ended``, which queues one event::

    {"id": "evt_<call id>", "object": "event", "type": "call.ended", "created_at": <unix s>,
     "data": <the record, as GET /v1/calls/{id} shows it>}

The event's id is the idempotency key (one per leg: a call resumed after a drain hand-over
sends one event per leg, the last with the whole call; a leg that ends after its call moved on
to another connection sends none). Delivery is at least once while the
process runs: any answer but 2xx, or no answer within ``timeout_s``, is tried again after a
pause that doubles from ``retry_first_s`` to ``retry_max_s`` (with jitter), up to
``max_attempts``; then the event is given up, logged and counted. Events wait in a bounded
heap (``max_pending``: more are dropped, logged and counted), so a slow receiver never holds
anything else up, and events still waiting when the process exits are lost (logged with their
count). One owned loop (``background``) delivers: a crash of it is logged, counted in
``transceiver_task_crashes_total{task="webhook delivery"}`` and it starts again with the same
heap. Signing: ``webhook_signing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from transceiver.background import BackgroundLoop, done_within
from transceiver.restarts import RestartPolicy
from transceiver.store.call_log import CallRecordLog
from transceiver.store.call_records import EndLeg
from transceiver.webhook_signing import WebhookPolicy, signed_headers

log = logging.getLogger(__name__)
EVENT_TYPE = "call.ended"
OUTCOMES = ("delivered", "retried", "failed", "dropped")


@dataclass(order=True)
class _Delivery:
    due_s: float
    seq: int
    event_id: str = field(compare=False)
    body: bytes = field(compare=False)
    attempts: int = field(default=0, compare=False)


class WebhookSender(BackgroundLoop):
    task_name = "webhook delivery"
    # Crash-looping: counted and logged only. Events wait; calls go on.
    unready_when_failing = False

    def __init__(
        self,
        policy: WebhookPolicy,
        restarts: RestartPolicy | None = None,
        jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0),
    ) -> None:
        super().__init__(restarts)
        self.policy = policy
        self._jitter = jitter
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: httpx.AsyncClient | None = None
        self.outcomes: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return len(self._heap)

    def call_ended(self, record: dict[str, Any], end: EndLeg) -> None:
        """The record writer's ``on_ended``: one event per stored end of a leg."""
        event_id = f"evt_{end.call_id}"
        event = {"id": event_id, "object": "event", "type": EVENT_TYPE,
                 "created_at": end.at_ms // 1000, "data": record}  # fmt: skip
        self.submit(event_id, json.dumps(event, separators=(",", ":")).encode())

    def submit(self, event_id: str, body: bytes) -> bool:
        """Queue an event; False (dropped, logged and counted) when the heap is full."""
        if len(self._heap) >= self.policy.max_pending:
            self.outcomes["dropped"] += 1
            log.warning("webhook: %d events wait already; %s dropped", len(self._heap), event_id)
            return False
        due_s = asyncio.get_running_loop().time()
        heapq.heappush(self._heap, _Delivery(due_s, next(self._seq), event_id, body))
        self._idle.clear()
        self._wakeup.set()
        return True

    async def drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until no event waits; False at the deadline."""
        return await done_within(self._idle.wait(), timeout_s)

    def _wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.policy.timeout_s)
        while not self._closing:
            self._wakeup.clear()
            if not self._heap:
                self._idle.set()
                await self._wakeup.wait()
                continue
            delay_s = self._heap[0].due_s - loop.time()
            if delay_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_s):
                        await self._wakeup.wait()
                continue
            delivery = heapq.heappop(self._heap)
            try:
                await self._attempt(self._client, delivery)
            except BaseException:
                heapq.heappush(self._heap, delivery)  # a crash or a close: it is not lost here
                raise

    async def _attempt(self, client: httpx.AsyncClient, delivery: _Delivery) -> None:
        headers = signed_headers(
            self.policy.secret, delivery.event_id, int(time.time()), delivery.body
        )
        try:
            response = await client.post(self.policy.url, content=delivery.body, headers=headers)
            failure = None if response.is_success else f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            failure = f"{type(error).__name__}: {error}"
        if failure is None:
            self.outcomes["delivered"] += 1
            return
        delivery.attempts += 1
        if delivery.attempts >= self.policy.max_attempts:
            self.outcomes["failed"] += 1
            log.error("webhook %s given up after %d attempts: %s",
                      delivery.event_id, delivery.attempts, failure)  # fmt: skip
            return
        self.outcomes["retried"] += 1
        pause_s = self.policy.pause_s(delivery.attempts, self._jitter())
        log.warning("webhook %s attempt %d failed (%s); again in %.1f s",
                    delivery.event_id, delivery.attempts, failure, pause_s)  # fmt: skip
        delivery.due_s = asyncio.get_running_loop().time() + pause_s
        heapq.heappush(self._heap, delivery)

    async def aclose(self) -> None:
        await super().aclose()
        if self._heap:
            log.warning("webhook: %d events not delivered at exit", len(self._heap))
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebhookCollector(Collector):
    def __init__(self, sender: WebhookSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "transceiver_webhook_deliveries",
            "call.ended webhook attempts by outcome (delivered; retried: an attempt failed and "
            "another follows; failed: given up after the last attempt; dropped: the queue was "
            "full)",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            counts.add_metric([outcome], self._sender.outcomes[outcome])
        yield counts
        yield GaugeMetricFamily(
            "transceiver_webhook_pending", "call.ended events waiting", value=self._sender.pending
        )


@asynccontextmanager
async def call_ended_webhooks(
    policy: WebhookPolicy | None,
    records: CallRecordLog | None,
    registry: CollectorRegistry,
    restarts: RestartPolicy | None = None,
    flush_timeout_s: float = 2.0,
) -> AsyncIterator[WebhookSender | None]:
    """The sender, fed by ``records``, while the context lasts; at exit the last records and
    their events get ``flush_timeout_s`` each to leave."""
    if policy is None:
        yield None
        return
    if records is None:
        log.warning("a webhook URL is set but no call is recorded (no Redis, or the echo agent)")
        yield None
        return
    sender = WebhookSender(policy, restarts)
    registry.register(WebhookCollector(sender))
    records.on_ended = sender.call_ended
    try:
        async with sender:
            yield sender
            await records.drained(flush_timeout_s)
            await sender.drained(flush_timeout_s)
    finally:
        records.on_ended = None
