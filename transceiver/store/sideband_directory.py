"""Where a session a sideband or a hang-up names runs: its owner's id and internal HTTP address.

I/O layer (Redis). A sideband (``transceiver.http.sideband``) or a hang-up names a session by an
id (a Realtime call's ``rtc_…`` id, a GPT-Live session's id) and may land on any transceiver;
the one it lands on finds the session's owner here and forwards the request there
(``transceiver.http.owner_hop``). Three records, under prefix ``P``:

- ``P:call:{call id}``: the stored session a Realtime call runs, written once when the call is
  answered, with the session's time to live (``RedisConfig.session_ttl_s``). A resume makes a
  new call for the same session, so the call id of any of its calls leads to it.
- the session's lease (``P:sess:{S}:lease``, ``transceiver.store.keys``): the owner id, kept
  by the lease heartbeat. A GPT-Live session's id is its stored session's, so it needs no alias.
- ``P:owner:{owner id}``: ``"{owner_id} {host}:{port}"``, with `` {worker}`` after it in a pod
  of workers (they share the address; ``sideband`` goes on to the worker within the pod), one
  record per transceiver process, refreshed every third of its time to live (the lease's) and
  withdrawn at exit.

So a running session costs one write when its call is answered, not one every few seconds:
ownership is the lease's alone, and a resumed session is found at its new owner the moment
the lease moves. An owner that dies leaves its address record to lapse as its leases do; until
then a hop to it fails to connect, or reaches a process that no longer runs the session and
answers 404, so a stale record costs a refusal, never a wrong session. A session that is not
stored (begun while Redis was away, until it catches up) is not found: its 404.

Rolling upgrade: the previous release published ``P:sideband:{id}`` per session (the same
value as an address record). ``locate`` still reads it when the new records name no owner, so a
sideband that lands on an upgraded transceiver reaches a session on one not yet upgraded. The
other way round is not kept: writing the old per-session keys would keep the cost this layout
removes, and a sideband that lands on an old transceiver for a session on a new one gets the
404 it would get for an unknown call, for as long as the rollout lasts. Remove the fallback
(``previous_release_key``) in the release after this one.

``alias`` queues the call's record and wakes the one owned task; the HTTP request that answers
the call never waits on Redis. Redis being down costs log lines and, until it is back, sidebands
that land on another transceiver; never a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from relay.wire.redis_config import RedisConfig
from transceiver.background import BackgroundLoop
from transceiver.restarts import RestartPolicy
from transceiver.store.connection import RedisConnection, open_redis, unavailable_as_store_error
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.keys import SessionKeys, check_id
from transceiver.store.survival import SurvivalPolicy

Address = tuple[str, int]
log = logging.getLogger(__name__)
WITHDRAW_TIMEOUT_S = 1.0  # at exit; the time to live removes what is left
MAX_QUEUED_ALIASES = 10_000  # calls answered while Redis is away; the oldest dropped past it
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


def call_key(prefix: str, call_id: str) -> str:
    """The call's record: the id of the stored session it runs."""
    return f"{prefix}:call:{check_id('call id', call_id)}"


def owner_key(prefix: str, owner_id: str) -> str:
    """A transceiver process's record: its ``Owner.value()``."""
    return f"{prefix}:owner:{check_id('owner id', owner_id)}"


def previous_release_key(prefix: str, target_id: str) -> str:
    """The previous release's per-session record, read for one release (module docstring)."""
    return f"{prefix}:sideband:{check_id('session id', target_id)}"


async def locate_owner(client: Any, prefix: str, target_id: str) -> Owner | None:
    """Who runs ``target_id`` (a call id or a stored session's id), as Redis says: the call's
    session (or the id itself), its lease's owner, that owner's address record; else the
    previous release's record. Redis errors are the caller's."""
    check_id("session id", target_id)
    session_id = _text(await client.get(call_key(prefix, target_id))) or target_id
    owner_id = _text(await client.get(SessionKeys.of(prefix, session_id).lease))
    raw = None if not owner_id else await client.get(owner_key(prefix, owner_id))
    if raw is None:
        raw = await client.get(previous_release_key(prefix, target_id))
    if raw is None:
        return None
    try:
        return Owner.parse(_text(raw))
    except ValueError:
        log.warning("owner directory: %s has a malformed record %r", target_id, raw)
        return None


def _text(raw: object) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class SidebandDirectory(BackgroundLoop):
    task_name = "sideband directory"
    # Crash-looping: counted only. An unpublished address costs sidebands that land elsewhere
    # a 404; refusing calls over it would cost more than it saves.
    unready_when_failing = False

    def __init__(
        self,
        connection: RedisConnection,
        prefix: str,
        me: Owner,
        ttl_s: float,
        session_ttl_s: float,
        restarts: RestartPolicy | None = None,
    ) -> None:
        super().__init__(restarts)
        self.me = me
        self._connection = connection
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._session_ttl_ms = max(1, round(session_ttl_s * 1000))
        self._refresh_s = ttl_s / 3
        self._aliases: dict[str, str] = {}  # call id -> session id, not yet written
        self._event = asyncio.Event()

    @classmethod
    def from_config(
        cls, config: RedisConfig, me: Owner, policy: SurvivalPolicy
    ) -> SidebandDirectory:
        connection = open_redis(config)
        ttl_s, session_ttl_s = policy.lease_s, config.session_ttl_s
        return cls(connection, config.key_prefix, me, ttl_s, session_ttl_s, policy.restarts)

    def alias(self, call_id: str, session_id: str) -> None:
        """Call ``call_id`` runs stored session ``session_id``: written by the owned task."""
        check_id("call id", call_id)
        check_id("session id", session_id)
        if len(self._aliases) >= MAX_QUEUED_ALIASES:
            dropped = next(iter(self._aliases))
            del self._aliases[dropped]
            log.warning("owner directory: call %s not recorded (Redis away too long)", dropped)
        self._aliases[call_id] = session_id
        self._event.set()

    async def locate(self, target_id: str) -> Owner | None:
        """Who runs ``target_id``; StoreUnavailableError when Redis is away."""
        with unavailable_as_store_error("sideband directory lookup"):
            return await locate_owner(self._connection.client, self._prefix, target_id)

    async def session_of(self, call_id: str) -> str | None:
        """The stored session call ``call_id`` ran (None: not recorded)."""
        with unavailable_as_store_error("sideband directory lookup"):
            raw = await self._connection.client.get(call_key(self._prefix, call_id))
        return _text(raw) or None

    def _wake(self) -> None:
        self._event.set()

    async def aclose(self) -> None:
        await super().aclose()
        with contextlib.suppress(TimeoutError, StoreUnavailableError):
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
                await self._withdraw()  # best effort at exit
        await self._connection.aclose()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_at = loop.time()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), max(0.0, refresh_at - loop.time()))
            self._event.clear()
            refresh = loop.time() >= refresh_at
            if refresh:
                refresh_at = loop.time() + self._refresh_s
            await self._pass(refresh)

    async def _pass(self, refresh: bool) -> None:
        aliases, self._aliases = self._aliases, {}
        try:
            await self._publish(aliases, refresh)
        except StoreUnavailableError as exc:
            self._aliases = aliases | self._aliases  # the next pass tries them again
            log.info("owner directory: %d calls not recorded: %s", len(aliases), exc)

    async def _publish(self, aliases: dict[str, str], refresh: bool) -> None:
        if not aliases and not refresh:
            return
        with unavailable_as_store_error("sideband directory publish"):
            async with self._connection.client.pipeline(transaction=False) as pipe:
                if refresh:
                    key = owner_key(self._prefix, self.me.owner_id)
                    pipe.set(key, self.me.value(), px=self._ttl_ms)
                for call_id, session_id in aliases.items():
                    key = call_key(self._prefix, call_id)
                    pipe.set(key, session_id, px=self._session_ttl_ms)
                await pipe.execute()

    async def _withdraw(self) -> None:
        key = owner_key(self._prefix, self.me.owner_id)
        with unavailable_as_store_error("sideband directory withdraw"):
            await self._connection.client.eval(_WITHDRAW, 1, key, self.me.value())


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
