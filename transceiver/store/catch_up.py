"""Catch-up: store the sessions that began while Redis was away, once it answers again.

I/O layer (an owned, restarted loop; see ``background``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.journal import SessionJournal


class Unstored(Protocol):
    """What catch-up needs of the persistence it serves (``persistence`` implements it)."""

    journals: dict[str, SessionJournal]
    unstored: dict[str, SessionJournal]

    async def store_new(self, journal: SessionJournal) -> bool: ...


class CatchUp(BackgroundLoop):
    """Stores the sessions that began while Redis was down (or whose record it lost) once it
    answers again, and queues again what a full write-behind queue refused."""

    task_name = "session catch-up"
    # Crash-looping: red. Calls begun during an outage would never be stored (nor resumable).
    unready_when_failing = True

    def __init__(
        self, persistence: Unstored, interval_s: float, restarts: RestartPolicy | None = None
    ) -> None:
        super().__init__(restarts)
        self._persistence = persistence
        self._interval_s = interval_s

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._interval_s)
            for journal in list(self._persistence.unstored.values()):
                if not await self._persistence.store_new(journal):
                    break  # Redis still down: the next pass tries again
            for journal in list(self._persistence.journals.values()):
                if journal.behind:
                    journal.history(journal.messages)
