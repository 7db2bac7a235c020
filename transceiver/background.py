"""One owned background task per object: ``start()`` spawns ``_run()``, ``aclose()`` ends it.

I/O support for the Redis-facing loops (lease heartbeat, write-behind flusher, route refresh).
``aclose`` sets ``_closing`` as well as cancelling: redis-py 8.1 can swallow a cancellation that
lands while a pipeline hands back its connection (redis-py issues #2028, #2551), so every
``_run`` loop also checks the flag and ends on its own.
"""

from __future__ import annotations

import asyncio
from typing import Self


class BackgroundLoop:
    task_name = "background loop"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._closing = True
            self._wake()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _wake(self) -> None:
        """Hook: nudge a loop that waits on an event, so it sees ``_closing`` at once."""

    async def _run(self) -> None:
        raise NotImplementedError
