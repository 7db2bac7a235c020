"""``call.ended`` webhooks: each stored end of a call, POSTed signed to the operator's URL.

I/O layer (httpx). One event per stored end of a leg whose call did not move on since::

    {"id": "evt_<call id>", "object": "event", "type": "call.ended", "created_at": <unix s>,
     "data": <the record, as GET /v1/calls/{id} shows it>}

The event's id is the idempotency key (one per leg: a call resumed after a drain hand-over
sends one event per leg, the last with the whole call; a leg that ends after its call moved on
to another connection sends none). Events wait in Redis, in the outbox every transceiver shares
(``transceiver.store.outbox``), not in a process: the write that ends a leg reserves its event in
the same transaction, so delivery is at least once across processes. A transceiver that exits,
is SIGKILLed or crashes leaves its events to the next sender (another transceiver, or itself
restarted), with the same id, body, attempt count and next-due time.

Each transceiver's ``WebhookSender`` (one owned loop, ``background``) claims one due event at a
time and POSTs it. A 2xx acknowledges it; any other answer, or none within ``timeout_s``, makes
it due again after a pause that doubles from ``retry_first_s`` to ``retry_max_s`` (with jitter),
up to ``max_attempts``; then it is given up, logged and counted. An attempt cut short (the
process died) is made again once its claim times out (``claim_timeout_s``). A full outbox
(``max_pending``) drops new events, logged and counted. A crash of the loop is logged with its
traceback, counted in ``transceiver_task_crashes_total{task="webhook delivery"}`` and the loop
starts again; what it held waits in Redis. Signing: ``webhook_signing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from transceiver.background import BackgroundLoop, done_within
from transceiver.restarts import RestartPolicy
from transceiver.store.call_log import CallRecordLog, CallRecordStore
from transceiver.store.call_records import EndLeg
from transceiver.store.errors import StoreError
from transceiver.store.outbox import Claimed, WebhookOutbox, event_id
from transceiver.webhook_signing import WebhookPolicy, signed_headers

log = logging.getLogger(__name__)
EVENT_TYPE = "call.ended"
OUTCOMES = ("delivered", "retried", "failed", "dropped", "skipped")


def event_body(record: dict[str, Any], call_id: str, ended_at_ms: int) -> bytes:
    """The event announcing ``record``'s end of the leg ``call_id``, as sent."""
    event = {"id": event_id(call_id), "object": "event", "type": EVENT_TYPE,
             "created_at": ended_at_ms // 1000, "data": record}  # fmt: skip
    return json.dumps(event, separators=(",", ":")).encode()


def announces(record: dict[str, Any] | None, call_id: str) -> bool:
    """Whether the end of leg ``call_id`` is announced: the call ended with that leg."""
    if record is None or record["status"] != "ended" or not record["legs"]:
        return False
    return bool(record["legs"][-1]["call_id"] == call_id)


class WebhookSender(BackgroundLoop):
    task_name = "webhook delivery"
    # Crash-looping: counted and logged only. Events wait in Redis; calls go on.
    unready_when_failing = False

    def __init__(
        self,
        policy: WebhookPolicy,
        outbox: WebhookOutbox,
        records: CallRecordStore,
        restarts: RestartPolicy | None = None,
        jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.0),
    ) -> None:
        super().__init__(restarts)
        self.policy = policy
        self.outbox = outbox
        self._records = records
        self._jitter = jitter
        self._bodies: deque[tuple[str, bytes]] = deque()  # read back here, not yet in Redis
        self._next_due_s: float | None = None  # from the last look at the outbox
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: httpx.AsyncClient | None = None
        self.outcomes: Counter[str] = Counter()
        self.depth = 0  # the outbox's entries at the last look (every transceiver's)
        outbox.on_reserved = self._wake_up

    def call_ended(self, record: dict[str, Any], end: EndLeg) -> None:
        """The record writer's ``on_ended``: the body of ``end``'s event, to freeze at once.
        Bounded: past ``max_pending`` the event's body is built by its first claim instead."""
        if len(self._bodies) < self.policy.max_pending:
            self._bodies.append((event_id(end.call_id), event_body(record, end.call_id, end.at_ms)))
            self._wake_up()

    async def drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until nothing is due now; False at the deadline."""
        return await done_within(self._idle.wait(), timeout_s)

    def _wake_up(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.policy.timeout_s)
        while not self._closing:
            self._wakeup.clear()
            try:
                if await self._step(self._client):
                    continue
            except StoreError as error:
                log.warning("webhook outbox: %s; looking again soon", error)
                self._next_due_s = None
            if not self._bodies:
                self._idle.set()
            await self._pause()

    async def _step(self, client: httpx.AsyncClient) -> bool:
        """Freeze the bodies read back, then deliver one due event; whether there was one."""
        while self._bodies:
            await self.outbox.freeze(*self._bodies[0])
            self._bodies.popleft()
        claimed = await self.outbox.claim(round(self.policy.claim_timeout_s * 1000))
        if claimed is None:
            state = await self.outbox.state()
            self.depth = state.depth
            self._next_due_s = None if state.next_due_ms is None else state.next_due_ms / 1000
            return False
        await self._deliver(client, claimed)
        return True

    async def _pause(self) -> None:
        """Until the next event is due, a wake-up, or the next look for others' events."""
        pause_s = self.policy.poll_s
        if self._next_due_s is not None:
            pause_s = min(pause_s, self._next_due_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause_s):
                await self._wakeup.wait()

    async def _deliver(self, client: httpx.AsyncClient, claimed: Claimed) -> None:
        body = claimed.body or await self._body_from_record(claimed)
        if body is None:
            self.outcomes["skipped"] += 1
            log.info("webhook %s: its call moved on or its record is gone; not sent",
                     claimed.event_id)  # fmt: skip
            await self.outbox.ack(claimed.event_id)
            return
        failure = await self._attempt(client, claimed.event_id, body)
        if failure is None:
            self.outcomes["delivered"] += 1
            await self.outbox.ack(claimed.event_id)
        elif claimed.attempts >= self.policy.max_attempts:
            self.outcomes["failed"] += 1
            log.error("webhook %s given up after %d attempts: %s",
                      claimed.event_id, claimed.attempts, failure)  # fmt: skip
            await self.outbox.ack(claimed.event_id)
        else:
            await self._retry(claimed, failure)

    async def _retry(self, claimed: Claimed, failure: str) -> None:
        self.outcomes["retried"] += 1
        pause_s = self.policy.pause_s(claimed.attempts, self._jitter())
        log.warning("webhook %s attempt %d failed (%s); again in %.1f s",
                    claimed.event_id, claimed.attempts, failure, pause_s)  # fmt: skip
        if not await self.outbox.retry(claimed, round(pause_s * 1000), failure):
            log.warning("webhook %s: claimed again elsewhere meanwhile", claimed.event_id)

    async def _body_from_record(self, claimed: Claimed) -> bytes | None:
        """The body of an event whose leg's writer died before it read the record back."""
        record = await self._records.get(claimed.session_id)
        if not announces(record, claimed.call_id):
            return None
        assert record is not None
        body = event_body(record, claimed.call_id, claimed.ended_at_ms)
        return await self.outbox.freeze(claimed.event_id, body)

    async def _attempt(self, client: httpx.AsyncClient, event: str, body: bytes) -> str | None:
        """POST the event once; None on a 2xx, else what went wrong."""
        headers = signed_headers(self.policy.secret, event, int(time.time()), body)
        try:
            response = await client.post(self.policy.url, content=body, headers=headers)
        except httpx.HTTPError as error:
            return f"{type(error).__name__}: {error}"
        return None if response.is_success else f"HTTP {response.status_code}"

    async def aclose(self) -> None:
        await super().aclose()
        if self.depth:
            log.info("webhook: %d events wait in the outbox for the next sender", self.depth)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebhookCollector(Collector):
    def __init__(self, sender: WebhookSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "transceiver_webhook_deliveries",
            "call.ended webhook attempts and events by outcome (delivered; retried: an attempt "
            "failed and another follows; failed: given up after the last attempt; dropped: the "
            "outbox was full; skipped: the call moved on before its event was built)",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            counts.add_metric([outcome], self._count(outcome))
        yield counts
        yield GaugeMetricFamily(
            "transceiver_webhook_pending",
            "call.ended events in the outbox, every transceiver's (at this sender's last look)",
            value=self._sender.depth,
        )

    def _count(self, outcome: str) -> int:
        if outcome == "dropped":
            return self._sender.outbox.dropped
        return self._sender.outcomes[outcome]


@asynccontextmanager
async def call_ended_webhooks(
    policy: WebhookPolicy | None,
    records: CallRecordLog | None,
    registry: CollectorRegistry,
    restarts: RestartPolicy | None = None,
    flush_timeout_s: float = 2.0,
) -> AsyncIterator[WebhookSender | None]:
    """The sender, fed by ``records``, while the context lasts; at exit the last records get
    ``flush_timeout_s`` to be written, and the events due then as long to leave (the rest wait
    in the outbox)."""
    if policy is None:
        yield None
        return
    if records is None:
        log.warning("a webhook URL is set but no call is recorded (no Redis, or the echo agent)")
        yield None
        return
    grace_ms = round(policy.claim_timeout_s * 1000)
    outbox = records.store.open_outbox(policy.max_pending, grace_ms)
    sender = WebhookSender(policy, outbox, records.store, restarts)
    registry.register(WebhookCollector(sender))
    records.on_ended = sender.call_ended
    try:
        async with sender:
            yield sender
            await records.drained(flush_timeout_s)
            await sender.drained(flush_timeout_s)
    finally:
        records.on_ended = None  # the outbox stays: ends written later still reserve events
