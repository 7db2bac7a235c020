"""Call records in Redis: written behind the calls, read by the API and the export.

I/O layer over ``call_records`` (keys, Lua, shapes). ``CallRecordStore`` reads and writes one
record at a time; ``CallRecordLog`` is the process's writer, in the journal's write-behind
style: ``submit`` never waits (a bounded queue; a write that does not fit is dropped and
counted), one owned loop (``background``) writes them in order, tries a write Redis cannot
take ``write_attempts`` times and then drops it, counted and logged: a record is worth less than
a call, so nothing here ever waits for Redis on a call's behalf. Once a leg's end is stored
and that leg is still the record's last (the call did not move on to another connection),
``on_ended`` gets the whole record (the webhook, ``transceiver.webhooks``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from relay.wire.redis_config import RedisConfig
from transceiver.background import BackgroundLoop, done_within, report_crash
from transceiver.restarts import RestartPolicy
from transceiver.store.call_records import (
    APPEND_TURN,
    BEGIN_LEG,
    CONFIG_VERSION,
    END_LEG,
    HEARD_WINDOW,
    MAX_VERSIONS,
    TURN_HEARD,
    AppendTurn,
    BeginLeg,
    CallRecordKeys,
    CallRecordPolicy,
    ConfigVersion,
    EndLeg,
    HeardTime,
    Json,
    RecordWrite,
    alias_key,
    compact,
    config_key,
    decode_record,
    encode_heard,
    encode_turn,
    index_key,
    index_member,
    member_session,
    since_bound,
    time_bound,
)
from transceiver.store.connection import RedisConnection, open_redis, unavailable_as_store_error
from transceiver.store.errors import StoreError
from transceiver.store.keys import check_id
from transceiver.store.outbox import WebhookOutbox
from transceiver.store.scripts import LuaScript

log = logging.getLogger(__name__)
MAX_SCANNED = 2000  # index entries one listing reads at most (then it hands back a cursor)
MAX_LIMIT = 100


@dataclass(frozen=True)
class CallPage:
    data: list[Json]
    has_more: bool
    next_cursor: str | None  # pass as ``after`` for the next page


class CallRecordStore:
    """One Redis connection's view of the call records under a prefix."""

    def __init__(self, redis: Redis, prefix: str, policy: CallRecordPolicy) -> None:
        self._redis = redis
        self._prefix = prefix
        self.policy = policy
        self.outbox: WebhookOutbox | None = None  # call.ended events, reserved as legs end

    def open_outbox(self, max_pending: int, grace_ms: int) -> WebhookOutbox:
        """The webhook outbox on this store's Redis: from now on each leg's end reserves its
        ``call.ended`` event in the same transaction (``transceiver.store.outbox``)."""
        self.outbox = WebhookOutbox(self._redis, self._prefix, max_pending, grace_ms)
        return self.outbox

    # --- writes ---------------------------------------------------------------------------

    async def apply(self, write: RecordWrite) -> Any:
        """Store one write (every write is idempotent, so a retry is harmless)."""
        keys = CallRecordKeys.of(self._prefix, write.session_id)
        ttl = self.policy.ttl_ms
        with unavailable_as_store_error("call record"):
            if isinstance(write, BeginLeg):
                return await self._begin(keys, write)
            if isinstance(write, ConfigVersion):
                async with self._redis.pipeline(transaction=False) as pipe:
                    where = config_key(self._prefix, write.config_hash)
                    pipe.set(where, compact(write.config), px=ttl, nx=True)
                    pipe.pexpire(where, ttl)
                    await pipe.execute()
                args = [write.config_hash, write.call_id, write.at_ms, MAX_VERSIONS]
                return await self._script(CONFIG_VERSION, keys, args)
            if isinstance(write, HeardTime):
                args = [check_id("call id", write.call_id), write.turn,
                        encode_heard(write.heard), HEARD_WINDOW]  # fmt: skip
                return await self._script(TURN_HEARD, keys, args)
            if isinstance(write, AppendTurn):
                latency = "" if write.latency_ms is None else f"{write.latency_ms:.1f}"
                args = [self.policy.max_turns, write.call_id, write.seq, encode_turn(write.turn),
                        latency, f"{write.cost_usd:.10f}", int(write.interrupted),
                        write.tool_calls]  # fmt: skip
                return await self._script(APPEND_TURN, keys, args)
            return await self._end(keys, write)

    async def _begin(self, keys: CallRecordKeys, write: BeginLeg) -> int:
        args = [write.session_id, write.call_id, write.transceiver, write.at_ms, write.trace_id]
        started_ms = int(await self._script(BEGIN_LEG, keys, args))
        ttl, index = self.policy.ttl_ms, index_key(self._prefix)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(index, {index_member(started_ms, write.session_id): 0})
            pipe.zremrangebylex(index, "-", time_bound(write.at_ms - ttl))
            pipe.pexpire(index, ttl)
            pipe.set(alias_key(self._prefix, write.call_id), write.session_id, px=ttl)
            await pipe.execute()
        return started_ms

    async def _end(self, keys: CallRecordKeys, write: EndLeg) -> Any:
        args: list[Any] = [write.call_id, write.reason, write.at_ms]
        if self.outbox is None:
            return await self._script(END_LEG, keys, args)
        async with self._redis.pipeline(transaction=True) as pipe:  # both or neither
            pipe.eval(END_LEG.text, 2, *keys.all(), self.policy.ttl_ms, *args)
            self.outbox.reserve_in(pipe, write)
            try:
                ended, reserved = await pipe.execute()
            except redis_errors.ResponseError as error:
                raise StoreError(f"{END_LEG.name}: {error}") from None
        self.outbox.reserved(write, reserved)
        return ended

    async def _script(self, script: LuaScript, keys: CallRecordKeys, args: list[Any]) -> Any:
        try:
            ttl = self.policy.ttl_ms
            return await self._redis.eval(script.text, 2, *keys.all(), ttl, *args)
        except redis_errors.ResponseError as error:
            raise StoreError(f"{script.name}: {error}") from None

    # --- reads ----------------------------------------------------------------------------

    async def get(self, record_id: str) -> Json | None:
        """The whole record of a session id, or of one of its call ids; None if unknown."""
        try:
            check_id("record id", record_id)
        except ValueError:
            return None
        with unavailable_as_store_error("call record"):
            found = await self._load(record_id, full=True)
            if found is None:
                session_id = await self._redis.get(alias_key(self._prefix, record_id))
                if session_id is not None:
                    found = await self._load(_text(session_id), full=True)
        return found

    async def _load(self, session_id: str, *, full: bool) -> Json | None:
        keys = CallRecordKeys.of(self._prefix, session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.meta)
            if full:
                pipe.lrange(keys.turns, 0, -1)
            replies = await pipe.execute()
        meta = replies[0]
        if not meta or b"session_id" not in meta:
            return None
        if not full:
            return decode_record(meta, None, {})
        hashes = [v["hash"] for v in json.loads(meta.get(b"versions", b"[]")) or []]
        configs: dict[str, Any] = {}
        if hashes:
            raw = await self._redis.mget([config_key(self._prefix, h) for h in hashes])
            configs = {h: json.loads(r) for h, r in zip(hashes, raw, strict=True) if r}
        return decode_record(meta, replies[1], configs)

    async def page(
        self,
        *,
        limit: int = 20,
        after: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        end_reason: str | None = None,
        min_latency_ms: float | None = None,
    ) -> CallPage:
        """Summaries, newest first, that pass the filters; ``after`` a record id (cursor)."""
        limit = max(1, min(MAX_LIMIT, limit))
        with unavailable_as_store_error("call records"):
            high = time_bound(until_ms) if until_ms is not None else "+"
            if after is not None:
                cursor = await self._cursor(after)
                if cursor is None:
                    return CallPage([], False, None)
                high = cursor if high == "+" else min(high, cursor)
            low = since_bound(since_ms) if since_ms is not None else "-"
            return await self._scan(high, low, limit, end_reason, min_latency_ms)

    async def _cursor(self, after: str) -> str | None:
        """The exclusive index bound just below the record ``after`` (a session id)."""
        try:
            keys = CallRecordKeys.of(self._prefix, after)
        except ValueError:
            return None
        started = await self._redis.hget(keys.meta, "started_at")
        return None if started is None else "(" + index_member(int(started), after)

    async def _scan(
        self, high: str, low: str, limit: int, end_reason: str | None, min_latency: float | None
    ) -> CallPage:
        index, scanned = index_key(self._prefix), 0
        data: list[Json] = []
        last_seen: str | None = None
        batch = max(2 * limit, 50)
        while scanned < MAX_SCANNED:
            members = await self._redis.zrevrangebylex(index, high, low, 0, batch)
            if not members:
                return CallPage(data, False, None)
            for member in map(_text, members):
                scanned += 1
                session_id = member_session(member)
                record = await self._load(session_id, full=False)
                if record is None:  # expired: its index entry goes too
                    await self._redis.zrem(index, member)
                elif _passes(record, end_reason, min_latency):
                    if len(data) == limit:
                        return CallPage(data, True, data[-1]["id"])
                    data.append(record)
                last_seen = session_id
                high = "(" + member
            if len(members) < batch:
                return CallPage(data, False, None)
        return CallPage(data, True, last_seen)  # bounded: the caller goes on from here

    async def export(
        self, since_ms: int | None = None, until_ms: int | None = None, batch: int = 100
    ) -> AsyncIterator[Json]:
        """Every whole record in the range, oldest first."""
        index = index_key(self._prefix)
        low = since_bound(since_ms) if since_ms is not None else "-"
        high = time_bound(until_ms) if until_ms is not None else "+"
        while True:
            with unavailable_as_store_error("call records"):
                members = await self._redis.zrangebylex(index, low, high, 0, batch)
            for member in map(_text, members):
                with unavailable_as_store_error("call record"):
                    record = await self._load(member_session(member), full=True)
                if record is not None:
                    yield record
                low = "(" + member
            if len(members) < batch:
                return


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _passes(record: Json, end_reason: str | None, min_latency: float | None) -> bool:
    if end_reason is not None and record["end_reason"] != end_reason:
        return False
    latency = record["max_latency_ms"]
    return min_latency is None or (latency is not None and latency > min_latency)


class CallRecordLog(BackgroundLoop):
    """The process's call-record writer: bounded, ordered, never waited for."""

    task_name = "call record writer"
    # Crash-looping: counted and logged only. Records are lost, calls are not.
    unready_when_failing = False

    def __init__(
        self,
        store: CallRecordStore,
        connection: RedisConnection | None = None,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(restarts)
        self.store = store
        self.policy = store.policy
        self._connection = connection
        self._queue: deque[RecordWrite] = deque()
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self.outcomes: Counter[str] = Counter()  # written, dropped (queue full), failed
        self.on_ended: Callable[[Json, EndLeg], None] | None = None

    @classmethod
    def from_config(
        cls, config: RedisConfig, policy: CallRecordPolicy, restarts: RestartPolicy | None = None
    ) -> CallRecordLog:
        """A writer on a connection of its own (closed with it)."""
        connection = open_redis(config)
        store = CallRecordStore(connection.client, config.key_prefix, policy)
        return cls(store, connection, restarts)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, write: RecordWrite) -> bool:
        """Queue a write; False (dropped, counted) when the queue is full."""
        if len(self._queue) >= self.policy.max_pending:
            self.outcomes["dropped"] += 1
            if self.outcomes["dropped"] == 1 or self.outcomes["dropped"] % 100 == 0:
                log.warning(
                    "call records: queue full (%d writes wait for Redis); %d writes dropped",
                    len(self._queue), self.outcomes["dropped"],
                )  # fmt: skip
            return False
        self._queue.append(write)
        self._empty.clear()
        self._wakeup.set()
        return True

    async def drained(self, timeout_s: float) -> bool:
        return await done_within(self._empty.wait(), timeout_s)

    def _wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while not self._closing:
            if not self._queue:
                self._empty.set()
                await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._closing:
                await self._write(self._queue[0])
                if self._queue:
                    self._queue.popleft()
            if not self._queue:
                self._empty.set()

    async def _write(self, write: RecordWrite) -> None:
        for attempt in range(1, self.policy.write_attempts + 1):
            try:
                await self.store.apply(write)
            except StoreError as error:
                if error.retryable and attempt < self.policy.write_attempts:
                    await asyncio.sleep(self.policy.retry_interval_s)
                    continue
                self.outcomes["failed"] += 1
                log.warning("call record %s: %s not stored: %s",
                            write.session_id, type(write).__name__, error)  # fmt: skip
                return
            except ValueError as error:  # never storable (too large)
                self.outcomes["failed"] += 1
                log.warning("call record %s: %s", write.session_id, error)
                return
            except Exception as error:  # a bug: seen and counted, and it cannot jam the queue
                self.outcomes["failed"] += 1
                report_crash(self.task_name, error, log, "the write is dropped")
                return
            self.outcomes["written"] += 1
            if isinstance(write, EndLeg) and self.on_ended is not None:
                await self._ended(write)
            return

    async def _ended(self, write: EndLeg) -> None:
        assert self.on_ended is not None
        try:
            record = await self.store.get(write.session_id)
        except StoreError as error:
            log.warning("call record %s: not read back for its webhook: %s",
                        write.session_id, error)  # fmt: skip
            self.outcomes["unannounced"] += 1
            return
        if record is not None and record["status"] == "ended":  # not moved on since
            self.on_ended(record, write)

    async def aclose(self) -> None:
        await super().aclose()
        if self._connection is not None:
            await self._connection.aclose()
            self._connection = None


class CallRecordCollector(Collector):
    """The writer's counts at scrape time."""

    def __init__(self, records: CallRecordLog) -> None:
        self._records = records

    def collect(self) -> Iterator[Metric]:
        writes = CounterMetricFamily(
            "transceiver_call_record_writes",
            "Call-record writes by outcome (written; dropped: the queue was full; failed: Redis "
            "refused or stayed unreachable; unannounced: an end not read back for its webhook)",
            labels=["outcome"],
        )
        for outcome in ("written", "dropped", "failed", "unannounced"):
            writes.add_metric([outcome], self._records.outcomes[outcome])
        yield writes
        yield GaugeMetricFamily(
            "transceiver_call_record_pending",
            "Call-record writes waiting for Redis",
            value=self._records.pending,
        )
