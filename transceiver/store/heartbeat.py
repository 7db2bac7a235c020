"""Keep this transceiver's session leases alive: one task renews every held lease on a cadence.

I/O layer. ``hold(lease)`` after a create or claim, ``drop(session_id)`` on release or end.
Every ``interval_s`` (policy: a third of the lease, so two renewals may fail before it lapses)
each held lease is renewed for ``lease_s``, together: one round trip (``renew_all``) for up to
``MAX_LEASES_PER_ROUND_TRIP`` leases, not one a call. Each lease's answer is settled as its own
renewal's would be. A renewal refused as stale or missing means another transceiver took the
session: the lease is dropped and ``on_lost`` is told, so the session can stop talking. A
retryable failure (Redis down) keeps the lease and tries again next beat: the fencing token, not
the lease, guards the writes, so an owner nobody replaced keeps its session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.errors import StoreError
from transceiver.store.keys import Lease
from transceiver.store.sessions import SessionStore

log = logging.getLogger(__name__)

# Bounds one pipeline (its request and its replies) however many calls the process holds.
MAX_LEASES_PER_ROUND_TRIP = 256


class LeaseHeartbeat(BackgroundLoop):
    task_name = "lease heartbeat"
    # Crash-looping: red. Unrenewed leases lapse, so any resume takes these sessions from under
    # this transceiver; it should take no new ones until it can hold them.
    unready_when_failing = True

    def __init__(
        self,
        store: SessionStore,
        *,
        lease_s: float,
        interval_s: float | None = None,
        on_lost: Callable[[Lease, StoreError], None] | None = None,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(restarts)
        self._store = store
        self._lease_s = lease_s
        self._interval_s = lease_s / 3 if interval_s is None else interval_s
        self._on_lost = on_lost
        self._leases: dict[str, Lease] = {}

    def hold(self, lease: Lease) -> None:
        self._leases[lease.session_id] = lease

    def drop(self, session_id: str) -> None:
        self._leases.pop(session_id, None)

    @property
    def held(self) -> tuple[Lease, ...]:
        return tuple(self._leases.values())

    def held_count(self) -> int:
        return len(self._leases)

    async def _run(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._interval_s)
            held = self.held
            for start in range(0, len(held), MAX_LEASES_PER_ROUND_TRIP):
                await self._renew(held[start : start + MAX_LEASES_PER_ROUND_TRIP])

    async def _renew(self, leases: tuple[Lease, ...]) -> None:
        """Renew ``leases`` together; each refusal is settled as its own renewal's would be."""
        try:
            refusals = await self._store.renew_all(leases, lease_s=self._lease_s)
        except StoreError as error:
            refusals = [error] * len(leases)
        for lease, refusal in zip(leases, refusals, strict=True):
            if refusal is not None:
                self._refused(lease, refusal)

    def _refused(self, lease: Lease, error: StoreError) -> None:
        if error.retryable:
            log.info("lease heartbeat: %s: %s; next beat retries", lease.session_id, error)
            return
        if self._leases.get(lease.session_id) == lease:
            self.drop(lease.session_id)
            log.warning("lease heartbeat: lost %s: %s", lease.session_id, error)
            if self._on_lost is not None:
                self._on_lost(lease, error)
