"""Keep committed session writes while Redis is unreachable; write them back, in order, later.

I/O layer. ``submit`` never waits on Redis: it queues the write and wakes the one flusher task,
which writes each session's queue oldest first, the writes of one lease queued together (a turn's
items and its counter) in one round trip (``write_all``). On a retryable error (Redis down, replicas
behind) the flusher keeps the writes not yet applied at the head and tries again after
``retry_interval_s``, so nothing is lost or reordered; since every store write is idempotent (items
by id, an edited history as a whole, the turn as a maximum, the config and the kept images as a
whole), a write that reached Redis before its reply was lost is harmless to repeat. A non-retryable
error (this transceiver lost the session: stale token, or the session is gone) drops the writes made
under that lease and reports it through ``on_dropped``; writes under a newer lease of the same
session (resumed again on this transceiver) stay queued.

Bounded: at most ``max_pending`` writes in all. When full, ``submit`` raises ``QueueFullError``
rather than silently dropping an older committed write; the caller decides (typically: tell the
client, end or hand over the session). Keep ``max_pending`` below the store's item cap per
session, so a retried append is still within reach of the store's idempotency window.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable

from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.errors import StoreError
from transceiver.store.keys import MAX_CONFIG_BYTES, Lease, encode_item, encode_json
from transceiver.store.sessions import SessionStore
from transceiver.store.writes import (
    AdvanceTurn,
    AppendItem,
    EndSession,
    PendingWrite,
    ReplaceItems,
    StoreImages,
    UpdateConfig,
)

__all__ = [
    "AdvanceTurn",
    "AppendItem",
    "EndSession",
    "PendingWrite",
    "QueueFullError",
    "ReplaceItems",
    "StoreImages",
    "UpdateConfig",
    "WriteBehindQueue",
]

log = logging.getLogger(__name__)

# A session's writes queued together (a turn's items and its counter) go in one round trip;
# bounded so one pipeline stays small however long Redis was away.
MAX_WRITES_PER_ROUND_TRIP = 32


class QueueFullError(Exception):
    """``max_pending`` writes are already waiting for Redis."""


class WriteBehindQueue(BackgroundLoop):
    """Per-session ordered, bounded write-back in front of a ``SessionStore``."""

    task_name = "write-behind flusher"
    # Crash-looping: red. Committed writes pile up unstored until the queue refuses more, and a
    # write that crashes the flusher each time (a poison write) never leaves: take no new calls.
    unready_when_failing = True

    def __init__(
        self,
        store: SessionStore,
        *,
        max_pending: int = 200,
        retry_interval_s: float = 0.2,
        on_dropped: Callable[[Lease, StoreError], None] | None = None,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(restarts)
        self._store = store
        self._max_pending = max_pending
        self._retry_interval_s = retry_interval_s
        self._on_dropped = on_dropped
        self._queues: dict[str, deque[tuple[Lease, PendingWrite]]] = {}
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._backing_off = False
        self._failed_flushes = 0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def failed_flushes(self) -> int:
        """Flush passes Redis refused (a counter for metrics)."""
        return self._failed_flushes

    @property
    def healthy(self) -> bool:
        """For /readyz: Redis answered the last write, and the store has not seen it fail."""
        return not self._backing_off and self._store.healthy

    def submit(self, lease: Lease, write: PendingWrite) -> None:
        """Queue a write; ``ValueError`` at once for one the store would never accept. An
        ``EndSession`` is taken even when full (one per session, and it ends its writes)."""
        _validate(write)
        if self._pending >= self._max_pending and not isinstance(write, EndSession):
            raise QueueFullError(f"{self._pending} writes already wait for Redis")
        self._queues.setdefault(lease.session_id, deque()).append((lease, write))
        self._pending += 1
        self._empty.clear()
        self._wakeup.set()

    def discard(self, session_id: str) -> int:
        """Forget a session's pending writes (it ended); how many were dropped."""
        dropped = len(self._queues.pop(session_id, ()))
        self._settle(dropped)
        return dropped

    async def drained(self) -> None:
        """Return once every submitted write is in Redis (or dropped as non-retryable)."""
        await self._empty.wait()

    def _wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while not self._closing:
            if not self._pending:  # a restarted run (after a crash) first flushes what waits
                await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self._closing:
                if await self._flush_all():
                    self._backing_off = False
                else:
                    self._backing_off = True
                    self._failed_flushes += 1
                    await asyncio.sleep(self._retry_interval_s)

    async def _flush_all(self) -> bool:
        """One pass over every session's queue; False when Redis refused to take writes."""
        for session_id in list(self._queues):
            if not await self._flush_session(session_id):
                return False
        return True

    async def _flush_session(self, session_id: str) -> bool:
        """Write a session's queue, oldest first, the writes of one lease in one round trip
        (at most ``MAX_WRITES_PER_ROUND_TRIP``); False when Redis refused to take them."""
        queue = self._queues.get(session_id)
        while queue:
            lease, writes = _head(queue)
            try:
                applied, error = await self._store.write_all(lease, writes)
            except StoreError as unavailable:
                applied, error = 0, unavailable
            if self._queues.get(session_id) is not queue and (applied or error is None):
                return True  # discarded while the writes were in flight (after one was applied)
            for _ in range(applied):
                queue.popleft()
            self._settle(applied)
            if error is not None and error.retryable:
                log.info("write-behind: %s; retrying", error)
                return False
            if error is not None:
                self._drop(lease, error)
                return True
        self._queues.pop(session_id, None)
        return True

    def _drop(self, lease: Lease, error: StoreError) -> None:
        log.warning("write-behind: dropping session %s's writes: %s", lease.session_id, error)
        queue = self._queues.pop(lease.session_id, deque())
        kept = deque(entry for entry in queue if entry[0] != lease)
        if kept:
            self._queues[lease.session_id] = kept
        self._settle(len(queue) - len(kept))
        if self._on_dropped is not None:
            self._on_dropped(lease, error)

    def _settle(self, count: int) -> None:
        self._pending -= count
        if self._pending == 0:
            self._empty.set()


def _head(queue: deque[tuple[Lease, PendingWrite]]) -> tuple[Lease, list[PendingWrite]]:
    """The first lease of a queue and its writes in a row from the head, a round trip's worth."""
    lease = queue[0][0]
    run = itertools.takewhile(lambda entry: entry[0] == lease, queue)
    return lease, [write for _, write in itertools.islice(run, MAX_WRITES_PER_ROUND_TRIP)]


def _validate(write: PendingWrite) -> None:
    if isinstance(write, AppendItem):
        encode_item(write.item)
    elif isinstance(write, ReplaceItems):
        for item in write.items:
            encode_item(item)
    elif isinstance(write, UpdateConfig):
        encode_json(write.config, MAX_CONFIG_BYTES, "session config")
