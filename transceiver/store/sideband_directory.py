"""Where each session a sideband may attach to runs: its owner's id and internal HTTP address.

I/O layer (Redis). A sideband (``transceiver.http.sideband``) names a session by an id (a
Realtime call's ``rtc_…`` id, a GPT-Live session's id) and may land on any transceiver; the one
it lands on finds the session's owner here and forwards the sideband there
(``transceiver.http.owner_hop``). Key ``P:sideband:{id}`` (prefix ``P``), value
``"{owner_id} {host}:{port}"``, with `` {worker}`` after it in a pod of workers (they share
the address; ``sideband`` goes on to the worker within the pod), and the lease's time to live
(``SurvivalPolicy.lease_s``).

Why a key per session, refreshed, and not the session's lease record: a Realtime call's id is
not its stored session's id (a resume makes a new call), sessions without Redis persistence have
no record, and a Live session keeps its id across a resume, so the newest owner must be able to
take the key over. Why its time to live is the lease's: an owner that dies leaves a pointer
that lapses as its leases do; until then a hop to it fails to connect, or reaches a process that
no longer runs the session and answers 404, so a stale pointer costs a refusal, never a wrong
session.

``announce`` records the id with the event set when its session ends and wakes the one owned
task; the HTTP request that made the session never waits on Redis. The task publishes what was
announced at once, republishes every running session each ``refresh_s`` (a third of the time to
live, as the lease heartbeat does) and withdraws the ended ones (only while the key still names
this owner: a Live session resumed elsewhere is the new owner's). Redis being down costs log
lines and, until it is back, sidebands that land on another transceiver; never a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from relay.wire.redis_config import RedisConfig
from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.connection import RedisConnection, open_redis, unavailable_as_store_error
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.keys import check_id
from transceiver.store.survival import SurvivalPolicy

Address = tuple[str, int]
log = logging.getLogger(__name__)
WITHDRAW_TIMEOUT_S = 1.0  # at exit; the time to live removes what is left
# Delete the key only while it still names this owner (KEYS[1]; ARGV[1]: our value).
_WITHDRAW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Owner:
    """The transceiver that runs a session: its owner id and internal HTTP address, and in a
    pod of workers (``transceiver.workers``, one address for all) the worker's index."""

    owner_id: str
    address: Address
    worker: int | None = None

    def value(self) -> str:
        host, port = self.address
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.owner_id} {address}" + ("" if self.worker is None else f" {self.worker}")

    @classmethod
    def parse(cls, value: str) -> Owner:
        """ValueError when ``value`` is not what ``value()`` writes."""
        owner_id, _, rest = value.partition(" ")
        address, _, worker = rest.partition(" ")
        host, sep, port = address.rpartition(":")
        if not owner_id or not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not an owner record: {value!r}")
        if worker and not worker.isdigit():
            raise ValueError(f"not an owner record: {value!r}")
        index = int(worker) if worker else None
        return cls(owner_id, (host.removeprefix("[").removesuffix("]"), int(port)), index)


def directory_key(prefix: str, target_id: str) -> str:
    return f"{prefix}:sideband:{check_id('session id', target_id)}"


class SidebandDirectory(BackgroundLoop):
    task_name = "sideband directory"
    # Crash-looping: counted only. Unpublished sessions cost sidebands that land elsewhere a
    # 404; refusing calls over it would cost more than it saves.
    unready_when_failing = False

    def __init__(
        self,
        connection: RedisConnection,
        prefix: str,
        me: Owner,
        ttl_s: float,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(restarts)
        self.me = me
        self._connection = connection
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._refresh_s = ttl_s / 3
        self._held: dict[str, asyncio.Event] = {}  # announced id -> set when its session ends
        self._fresh: set[str] = set()  # announced since the last pass
        self._event = asyncio.Event()

    @classmethod
    def from_config(
        cls, config: RedisConfig, me: Owner, policy: SurvivalPolicy
    ) -> SidebandDirectory:
        return cls(open_redis(config), config.key_prefix, me, policy.lease_s, policy.restarts)

    def announce(self, target_id: str, ended: asyncio.Event) -> None:
        """``target_id`` runs here until ``ended`` is set."""
        check_id("session id", target_id)
        self._held[target_id] = ended
        self._fresh.add(target_id)
        self._event.set()

    async def locate(self, target_id: str) -> Owner | None:
        """Who runs ``target_id``, as published; StoreUnavailableError when Redis is away."""
        with unavailable_as_store_error("sideband directory lookup"):
            raw = await self._connection.client.get(directory_key(self._prefix, target_id))
        if raw is None:
            return None
        try:
            return Owner.parse(raw.decode() if isinstance(raw, bytes) else str(raw))
        except ValueError:
            log.warning("sideband directory: %s has a malformed record %r", target_id, raw)
            return None

    def _wake(self) -> None:
        self._event.set()

    async def aclose(self) -> None:
        await super().aclose()
        with contextlib.suppress(TimeoutError, StoreUnavailableError):
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
                await self._withdraw(list(self._held))  # best effort at exit
        await self._connection.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_at = loop.time()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), max(0.0, refresh_at - loop.time()))
            self._event.clear()
            fresh, self._fresh = self._fresh, set()
            if loop.time() >= refresh_at:
                refresh_at = loop.time() + self._refresh_s
                fresh = set(self._held)
            await self._pass(fresh)

    async def _pass(self, publish: set[str]) -> None:
        ended = [target for target, done in self._held.items() if done.is_set()]
        for target in ended:
            del self._held[target]
        try:
            await self._publish([target for target in publish if target in self._held])
            await self._withdraw(ended)
        except StoreUnavailableError as exc:
            self._fresh |= publish & set(self._held)  # the next pass tries them again
            log.info("sideband directory: %d sessions not published: %s", len(publish), exc)

    async def _publish(self, targets: list[str]) -> None:
        if not targets:
            return
        value = self.me.value()
        with unavailable_as_store_error("sideband directory publish"):
            async with self._connection.client.pipeline(transaction=False) as pipe:
                for target in targets:
                    pipe.set(directory_key(self._prefix, target), value, px=self._ttl_ms)
                await pipe.execute()

    async def _withdraw(self, targets: list[str]) -> None:
        value = self.me.value()
        with unavailable_as_store_error("sideband directory withdraw"):
            for target in targets:
                key = directory_key(self._prefix, target)
                await self._connection.client.eval(_WITHDRAW, 1, key, value)


@asynccontextmanager
async def open_sideband_directory(
    config: RedisConfig | None,
    owner_id: str | None,
    advertise: Address | None,
    policy: SurvivalPolicy,
    worker: int | None = None,
) -> AsyncIterator[SidebandDirectory | None]:
    """The directory, running, when sessions here are stored (Redis, an ``owner_id``) and other
    transceivers can reach this one (``advertise``); else None, said once in the log."""
    if config is None or owner_id is None:
        yield None
        return
    if advertise is None:
        log.warning(
            "sidebands that land on other transceivers cannot reach the sessions here: "
            "set TRANSCEIVER_HTTP_ADVERTISE (the HTTP listener is a wildcard address)"
        )
        yield None
        return
    me = Owner(owner_id, advertise, worker)
    async with SidebandDirectory.from_config(config, me, policy) as found:
        yield found
