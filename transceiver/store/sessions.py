"""Session state that outlives its transceiver: the ``SessionStore`` role and its Redis version.

I/O layer over ``session_keys`` (key layout, records), ``session_scripts`` (the Lua that checks
fencing and writes in one atomic step) and ``store_errors``.

Ownership. One owner per session at a time, proven by a fencing token (``Lease.token``) that
every write carries; a write with any other token is refused with ``StaleOwnerError``, so a
transceiver that was paused and comes back after a takeover cannot touch the conversation.
``claim`` while another owner's lease is live is refused with ``LeaseHeldError`` unless
``force=True``. Policy for callers: force only with evidence that the old owner is gone or must
go: a client reconnecting with its verified resume credential (its old connection is dead from
its side), or an orchestrator that saw the owner die. Without such evidence (say, the same offer
delivered twice) the lease keeps two transceivers from taking turns at the session.

Durability. With ``wait_replicas > 0`` every write except ``renew`` (a heartbeat) is followed by
``WAIT`` on the same connection (one pipeline; ``write_all``'s writes by one WAIT after the last);
the count of replicas that acknowledged comes back in the ack, and too few raises
``ReplicationError`` (retryable: the write is on the primary, and every write is idempotent). Claims
are waited for too: an unreplicated token increment lost in a failover would let an older token
become current again.

Owner ids must be unique per process incarnation (host name plus a random suffix): a restarted
process is a new owner.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from redis import exceptions as redis_errors

from relay.wire.redis_config import RedisConfig
from transceiver.store.connection import (
    UNAVAILABLE,
    RedisConnection,
    open_redis,
    unavailable_as_store_error,
)
from transceiver.store.errors import (
    ReplicationError,
    SessionEndedError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
    from_script_error,
)
from transceiver.store.keys import (
    MAX_CONFIG_BYTES,
    AppendAck,
    Lease,
    SessionKeys,
    SessionState,
    WriteAck,
    check_id,
    credential_matches,
    decode_state,
    encode_item,
    encode_json,
    hash_credential,
)
from transceiver.store.scripts import (
    ADVANCE_TURN,
    APPEND_ITEM,
    CLAIM,
    CREATE,
    END,
    RELEASE,
    RENEW,
    REPLACE_ITEMS,
    STORE_IMAGES,
    UPDATE_CONFIG,
    LuaScript,
)
from transceiver.store.writes import (
    AdvanceTurn,
    AppendItem,
    EndSession,
    PendingWrite,
    ReplaceItems,
    StoreImages,
    UpdateConfig,
)

Arg = str | bytes | int


class SessionStore(Protocol):
    """Where sessions live between transceivers. Every write is idempotent."""

    @property
    def healthy(self) -> bool: ...

    async def create(
        self,
        session_id: str,
        owner_id: str,
        *,
        config: Mapping[str, Any],
        credential: str,
        lease_s: float,
    ) -> Lease: ...

    async def claim(
        self, session_id: str, owner_id: str, *, lease_s: float, force: bool = False
    ) -> Lease: ...

    async def renew(self, lease: Lease, *, lease_s: float) -> WriteAck: ...

    async def renew_all(
        self, leases: Sequence[Lease], *, lease_s: float
    ) -> list[StoreError | None]: ...

    async def release(self, lease: Lease) -> WriteAck: ...

    async def end(self, lease: Lease) -> WriteAck: ...

    async def append_item(self, lease: Lease, item: Mapping[str, Any]) -> AppendAck: ...

    async def replace_items(
        self, lease: Lease, items: Sequence[Mapping[str, Any]], first_seq_offset: int
    ) -> WriteAck: ...

    async def update_config(self, lease: Lease, config: Mapping[str, Any]) -> WriteAck: ...

    async def store_images(
        self, lease: Lease, keep: Sequence[str], add: Mapping[str, str]
    ) -> WriteAck: ...

    async def advance_turn(self, lease: Lease, turn: int) -> WriteAck: ...

    async def write_all(
        self, lease: Lease, writes: Sequence[PendingWrite]
    ) -> tuple[int, StoreError | None]: ...

    async def load(self, session_id: str) -> SessionState: ...

    async def verify_credential(self, session_id: str, credential: str | None) -> bool: ...


class RedisSessionStore:
    """``SessionStore`` on one Redis primary (plain URL or Sentinel-managed)."""

    def __init__(self, connection: RedisConnection, config: RedisConfig) -> None:
        self._connection = connection
        self._redis = connection.client
        self._config = config
        self._ttl_ms = round(config.session_ttl_s * 1000)
        self._healthy = True

    @classmethod
    def from_config(cls, config: RedisConfig) -> RedisSessionStore:
        return cls(open_redis(config), config)

    async def __aenter__(self) -> RedisSessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._connection.aclose()

    @property
    def healthy(self) -> bool:
        """False from a failed round trip to Redis until the next successful one (/readyz)."""
        return self._healthy

    async def ping(self) -> bool:
        try:
            with unavailable_as_store_error("ping"):
                await self._redis.ping()
        except StoreUnavailableError:
            self._healthy = False
            return False
        self._healthy = True
        return True

    async def create(
        self,
        session_id: str,
        owner_id: str,
        *,
        config: Mapping[str, Any],
        credential: str,
        lease_s: float,
    ) -> Lease:
        if not credential:
            raise ValueError("a session needs a resume credential")
        check_id("owner id", owner_id)
        args: list[Arg] = [owner_id, self._ttl_ms, _ms(lease_s), _config_json(config)]
        await self._write(CREATE, session_id, [*args, hash_credential(credential)])
        return Lease(session_id, owner_id, 1)

    async def claim(
        self, session_id: str, owner_id: str, *, lease_s: float, force: bool = False
    ) -> Lease:
        check_id("owner id", owner_id)
        args: list[Arg] = [owner_id, self._ttl_ms, _ms(lease_s), "1" if force else "0"]
        token, _ = await self._write(CLAIM, session_id, args)
        return Lease(session_id, owner_id, int(token))

    async def renew(self, lease: Lease, *, lease_s: float) -> WriteAck:
        await self._fenced(RENEW, [_ms(lease_s)], lease, wait=False)
        return WriteAck(None)

    async def renew_all(
        self, leases: Sequence[Lease], *, lease_s: float
    ) -> list[StoreError | None]:
        """``renew`` for each lease, in one round trip (one pipeline of the same EVALs): per
        lease, in order, ``None`` (renewed) or the error its own ``renew`` would have raised.
        Redis unavailable fails them all alike: ``StoreUnavailableError`` is raised."""
        if not leases:
            return []
        lease_ms = _ms(lease_s)
        with self._tracking(RENEW.name):
            async with self._redis.pipeline(transaction=False) as pipe:
                for lease in leases:
                    keys = SessionKeys.of(self._config.key_prefix, lease.session_id).all()
                    fence: list[Arg] = [lease.owner_id, str(lease.token), self._ttl_ms]
                    pipe.eval(RENEW.text, len(keys), *keys, *fence, lease_ms)
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, UNAVAILABLE):
                    raise reply
        return [_refusal(reply, lease) for reply, lease in zip(replies, leases, strict=True)]

    async def release(self, lease: Lease) -> WriteAck:
        _, acked = await self._fenced(RELEASE, [], lease)
        return WriteAck(acked)

    async def end(self, lease: Lease) -> WriteAck:
        """End the session (its caller hung up); only its current owner may. The conversation
        is deleted; a tombstone keeps the credential hash for the session TTL, so a resume
        with it is told the session ended (``SessionEndedError`` from ``claim`` and ``load``)
        rather than that it never existed."""
        _, acked = await self._fenced(*self._prepare(EndSession()), lease)
        return WriteAck(acked)

    async def append_item(self, lease: Lease, item: Mapping[str, Any]) -> AppendAck:
        """Append a committed item; a repeat of a stored item id changes nothing."""
        reply, acked = await self._fenced(*self._prepare(AppendItem(item)), lease)
        appended, seq = reply
        return AppendAck(int(seq), bool(appended), acked)

    async def replace_items(
        self, lease: Lease, items: Sequence[Mapping[str, Any]], first_seq_offset: int
    ) -> WriteAck:
        """The whole history again (edited), in place of the stored one; the cap applies."""
        write = ReplaceItems(tuple(items), first_seq_offset)
        _, acked = await self._fenced(*self._prepare(write), lease)
        return WriteAck(acked)

    async def update_config(self, lease: Lease, config: Mapping[str, Any]) -> WriteAck:
        _, acked = await self._fenced(*self._prepare(UpdateConfig(config)), lease)
        return WriteAck(acked)

    async def store_images(
        self, lease: Lease, keep: Sequence[str], add: Mapping[str, str]
    ) -> WriteAck:
        """The session's images become ``keep`` (refs, ``keys.image_ref``): the others are
        deleted, and ``add`` (ref -> data URL) are stored."""
        _, acked = await self._fenced(*self._prepare(StoreImages(tuple(keep), add)), lease)
        return WriteAck(acked)

    async def advance_turn(self, lease: Lease, turn: int) -> WriteAck:
        """Record that ``turn`` was reached: the stored counter only grows (idempotent)."""
        _, acked = await self._fenced(*self._prepare(AdvanceTurn(turn)), lease)
        return WriteAck(acked)

    async def write_all(
        self, lease: Lease, writes: Sequence[PendingWrite]
    ) -> tuple[int, StoreError | None]:
        """``writes`` under ``lease`` in one round trip, in order (one pipeline of the same
        EVALs as each write's own method, then one WAIT): how many from the first were applied,
        and the error the first one not applied met (``None``: all were). Redis runs every
        EVAL of the pipeline: those after a refused one may have run too (the same lease: a
        refused fence refuses them as well); every write is idempotent, so retrying from the
        first not applied is safe. Too few replicas: none counts as applied (all retried)."""
        if not writes:
            return 0, None
        keys = SessionKeys.of(self._config.key_prefix, lease.session_id).all()
        fence: list[Arg] = [lease.owner_id, str(lease.token), self._ttl_ms]
        waits = self._config.wait_replicas > 0
        with self._tracking("write batch"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for write in writes:
                    script, args = self._prepare(write)
                    pipe.eval(script.text, len(keys), *keys, *fence, *args)
                if waits:
                    pipe.wait(self._config.wait_replicas, self._config.wait_timeout_ms)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[0], UNAVAILABLE):
                raise replies[0]
        if waits and int(replies[-1]) < self._config.wait_replicas:
            return 0, ReplicationError(int(replies[-1]), self._config.wait_replicas)
        applied, error = _first_refused(replies[: len(writes)], lease)
        if isinstance(error, StoreUnavailableError):
            self._healthy = False
        return applied, error

    def _prepare(self, write: PendingWrite) -> tuple[LuaScript, list[Arg]]:
        """A write's fenced script and its arguments after the fence (owner, token, TTL)."""
        if isinstance(write, AppendItem):
            return APPEND_ITEM, [self._config.max_items, *encode_item(write.item)]
        if isinstance(write, ReplaceItems):
            args: list[Arg] = [self._config.max_items, int(write.first_seq_offset)]
            for item in write.items:
                args.extend(encode_item(item))
            return REPLACE_ITEMS, args
        if isinstance(write, UpdateConfig):
            return UPDATE_CONFIG, [_config_json(write.config)]
        if isinstance(write, StoreImages):
            images: list[Arg] = [len(write.keep), *write.keep]
            for ref, data_url in write.add.items():
                images.extend((ref, data_url))
            return STORE_IMAGES, images
        if isinstance(write, AdvanceTurn):
            return ADVANCE_TURN, [int(write.turn)]
        if isinstance(write, EndSession):
            return END, []
        raise TypeError(f"not a session write: {write!r}")

    async def load(self, session_id: str) -> SessionState:
        keys = SessionKeys.of(self._config.key_prefix, session_id)
        with self._tracking("load"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.meta)
                pipe.lrange(keys.items, 0, -1)
                pipe.hgetall(keys.images)
                meta, items, images = await pipe.execute()
        if not meta:
            raise SessionNotFoundError(session_id)
        if b"ended" in meta:
            raise SessionEndedError(session_id)
        return decode_state(session_id, meta, items, images)

    async def verify_credential(self, session_id: str, credential: str | None) -> bool:
        """Constant-time check of a resume credential; an unknown session never verifies."""
        keys = SessionKeys.of(self._config.key_prefix, session_id)
        with self._tracking("verify credential"):
            stored = await self._redis.hget(keys.meta, "credential")
        stored_text = stored.decode() if isinstance(stored, bytes) else stored
        return credential_matches(credential, stored_text)

    async def _fenced(
        self, script: LuaScript, args: Sequence[Arg], lease: Lease, wait: bool = True
    ) -> tuple[Any, int | None]:
        fence: list[Arg] = [lease.owner_id, str(lease.token), self._ttl_ms]
        return await self._write(script, lease.session_id, [*fence, *args], lease.token, wait)

    async def _write(
        self,
        script: LuaScript,
        session_id: str,
        args: Sequence[Arg],
        token: int = 0,
        wait: bool = True,
    ) -> tuple[Any, int | None]:
        """Run a script (then WAIT); map its refusal to the typed error."""
        keys = SessionKeys.of(self._config.key_prefix, session_id).all()
        waits = wait and self._config.wait_replicas > 0
        with self._tracking(script.name):
            reply, acked = await self._execute(script, keys, args, waits)
        if isinstance(reply, redis_errors.ResponseError):
            raise from_script_error(str(reply), session_id, token) or StoreError(str(reply))
        if acked is not None and acked < self._config.wait_replicas:
            raise ReplicationError(acked, self._config.wait_replicas)
        return reply, acked

    async def _execute(
        self, script: LuaScript, keys: list[str], args: Sequence[Arg], waits: bool
    ) -> tuple[Any, int | None]:
        """EVAL (+ WAIT) in one pipeline: WAIT counts the writes of its own connection only.

        EVAL rather than EVALSHA: a promoted replica has an empty script cache, and a NOSCRIPT
        round would cost a second WAIT; the script text is a few hundred bytes.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(script.text, len(keys), *keys, *args)
            if waits:
                pipe.wait(self._config.wait_replicas, self._config.wait_timeout_ms)
            replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[0], UNAVAILABLE):
            raise replies[0]
        return replies[0], int(replies[1]) if waits else None

    @contextmanager
    def _tracking(self, what: str) -> Iterator[None]:
        """Map unavailability to ``StoreUnavailableError`` and keep ``healthy`` current."""
        try:
            with unavailable_as_store_error(what):
                yield
        except StoreUnavailableError:
            self._healthy = False
            raise
        self._healthy = True


def _first_refused(replies: Sequence[Any], lease: Lease) -> tuple[int, StoreError | None]:
    """How many replies from the first were successes, and the first refusal's error."""
    for applied, reply in enumerate(replies):
        refusal = _refusal(reply, lease)
        if refusal is not None:
            if isinstance(reply, UNAVAILABLE):
                return applied, StoreUnavailableError(f"write batch: Redis unavailable: {reply}")
            return applied, refusal
    return len(replies), None


def _refusal(reply: Any, lease: Lease) -> StoreError | None:
    """A fenced script's reply as ``_write`` would raise it, or ``None`` for a success."""
    if not isinstance(reply, Exception):
        return None
    message = str(reply)
    return from_script_error(message, lease.session_id, lease.token) or StoreError(message)


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"lease of {seconds} s: must be positive")
    return max(1, round(seconds * 1000))


def _config_json(config: Mapping[str, Any]) -> bytes:
    return encode_json(config, MAX_CONFIG_BYTES, "session config")
