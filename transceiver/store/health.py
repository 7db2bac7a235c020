"""Redis health: a ping on a cadence, and how long Redis has been unreachable.

I/O layer (an owned, restarted loop; see ``background``). Its answer is reported (``/readyz``
``"redis": "degraded"``, ``transceiver_redis_unreachable_seconds``), never a reason to refuse
calls: see ``persistence``.
"""

from __future__ import annotations

import asyncio

from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.sessions import RedisSessionStore


class RedisHealth(BackgroundLoop):
    """Pings Redis; ``down_for_s`` is how long it has been unreachable (0 when up)."""

    task_name = "redis health"
    # Crash-looping: counted only. Its answer is reported, never a reason to refuse calls
    # (see ``SessionPersistence.not_ready_reason``), so its failure is not one either.
    unready_when_failing = False

    def __init__(
        self, store: RedisSessionStore, interval_s: float, restarts: RestartPolicy | None = None
    ) -> None:
        super().__init__(restarts)
        self._store = store
        self._interval_s = interval_s
        self._down_since: float | None = None

    def down_for_s(self) -> float:
        if self._down_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._down_since

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if await self._store.ping():
                self._down_since = None
            elif self._down_since is None:
                self._down_since = loop.time()
            await asyncio.sleep(self._interval_s)
