"""The Redis session store against real redis-server processes (deploy/redis_server.py).

Round trip, idempotent append, expiry of every key, the item cap, fencing (takeover, lease
expiry, renew, release), resume credentials, WAIT with a real replica, Sentinel failover with
SIGKILL of the primary, and the write-behind queue across a Redis restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from deploy.redis_server import SERVICE, RedisServer, SentinelTopology
from deploy.waiting import eventually, wait_until
from relay.wire.redis_config import RedisConfig, RedisConfigError
from transceiver.store.errors import (
    LeaseHeldError,
    ReplicationError,
    SessionEndedError,
    SessionExistsError,
    SessionNotFoundError,
    StaleOwnerError,
    StoreError,
    StoreUnavailableError,
)
from transceiver.store.heartbeat import LeaseHeartbeat
from transceiver.store.keys import Lease, SessionKeys, new_credential
from transceiver.store.sessions import RedisSessionStore
from transceiver.store.write_behind import (
    AdvanceTurn,
    AppendItem,
    EndSession,
    PendingWrite,
    ReplaceItems,
    StoreImages,
    UpdateConfig,
    WriteBehindQueue,
)

CONFIG = {"instructions": "Be brief.", "voice": "joe", "turn_detection": {"type": "server_vad"}}
LEASE_S = 10.0


def item(n: int, text: str = "") -> dict[str, Any]:
    content = [{"type": "input_text", "text": text or f"utterance {n}"}]
    return {"id": f"item_{n:03d}", "type": "message", "role": "user", "content": content}


def config_for(server: RedisServer, **overrides: Any) -> RedisConfig:
    return RedisConfig(url=server.url, key_prefix=f"t{uuid.uuid4().hex[:12]}", **overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"), "single").start()
    yield redis
    redis.stop()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisSessionStore]:
    async with RedisSessionStore.from_config(config_for(server, session_ttl_s=60)) as store:
        yield store


async def new_session(store: RedisSessionStore, owner: str = "tx-a") -> tuple[Lease, str]:
    credential = new_credential()
    sid = f"rtc_{uuid.uuid4().hex}"
    lease = await store.create(sid, owner, config=CONFIG, credential=credential, lease_s=LEASE_S)
    return lease, credential


# --- round trip and idempotency ---------------------------------------------------------------


async def test_round_trip_of_config_items_and_turns(store: RedisSessionStore) -> None:
    lease, _ = await new_session(store)
    acks = [await store.append_item(lease, item(n)) for n in (1, 2, 3)]
    await store.update_config(lease, {**CONFIG, "voice": "amy"})
    await store.advance_turn(lease, 2)
    await store.advance_turn(lease, 1)  # never goes back

    state = await store.load(lease.session_id)
    assert [a.seq for a in acks] == [1, 2, 3] and all(a.appended for a in acks)
    assert acks[0].replicas_acked is None  # no WAIT asked for
    assert state.items == (item(1), item(2), item(3))
    assert state.config == {**CONFIG, "voice": "amy"}
    assert (state.turn, state.owner_id, state.token, state.first_seq) == (2, "tx-a", 1, 1)


async def test_append_is_idempotent_by_item_id(store: RedisSessionStore) -> None:
    lease, _ = await new_session(store)
    first = await store.append_item(lease, item(1))
    await store.append_item(lease, item(2))
    again = await store.append_item(lease, item(1, "a retry with other text"))
    assert (again.seq, again.appended) == (first.seq, False)
    assert (await store.load(lease.session_id)).items == (item(1), item(2))


async def test_an_edited_history_replaces_the_stored_one(server: RedisServer) -> None:
    config = config_for(server, max_items=3)
    async with RedisSessionStore.from_config(config) as store:
        lease, _ = await new_session(store)
        for n in (1, 2, 3):
            await store.append_item(lease, item(n))
        edited = (item(1), item(3, "cut short"))  # item 2 deleted, item 3 truncated
        await store.replace_items(lease, edited, 0)
        await store.replace_items(lease, edited, 0)  # a retry changes nothing
        state = await store.load(lease.session_id)
        after = await store.append_item(lease, item(4))
        retry = await store.append_item(lease, item(3, "an old append again"))
        longer = (*edited, item(4), item(5), item(6))
        await store.replace_items(lease, longer, 0)  # over the cap: the oldest trimmed
        capped = await store.load(lease.session_id)
        with pytest.raises(StaleOwnerError):  # fenced as every write
            await store.replace_items(dataclasses.replace(lease, token=99), edited, 0)
    assert (state.items, state.first_seq) == (edited, 1)
    assert (after.seq, after.appended) == (3, True) and not retry.appended
    assert (capped.items, capped.first_seq) == (longer[2:], 3)


async def test_every_key_expires(server: RedisServer) -> None:
    config = config_for(server, session_ttl_s=30)
    async with RedisSessionStore.from_config(config) as store:
        lease, _ = await new_session(store)
        await store.append_item(lease, item(1))
        await store.store_images(lease, ["ref1"], {"ref1": "data:image/png;base64,AA=="})
        await store.advance_turn(lease, 1)
    with server.client() as client:
        keys = client.keys(f"{config.key_prefix}:*")
        ttls = {key.decode(): client.pttl(key) for key in keys}
    assert set(ttls) == set(SessionKeys.of(config.key_prefix, lease.session_id).all())
    assert all(0 < ttl <= 30_000 for ttl in ttls.values()), ttls
    assert ttls[SessionKeys.of(config.key_prefix, lease.session_id).lease] <= LEASE_S * 1000


async def test_item_cap_keeps_the_newest_items(server: RedisServer) -> None:
    config = config_for(server, max_items=5)
    async with RedisSessionStore.from_config(config) as store:
        lease, _ = await new_session(store)
        for n in range(1, 9):
            await store.append_item(lease, item(n))
        state = await store.load(lease.session_id)
        retry = await store.append_item(lease, item(8))
    assert state.items == tuple(item(n) for n in range(4, 9))
    assert state.first_seq == 4
    assert (retry.seq, retry.appended) == (8, False)
    with server.client() as client:
        assert client.zcard(SessionKeys.of(config.key_prefix, lease.session_id).ids) == 5
        assert client.hget(SessionKeys.of(config.key_prefix, lease.session_id).meta, "trimmed")


async def test_bad_input_is_refused_before_redis(store: RedisSessionStore) -> None:
    lease, _ = await new_session(store)
    with pytest.raises(ValueError, match="item id None"):
        await store.append_item(lease, {"type": "message"})
    with pytest.raises(ValueError, match="over the 65536-byte limit"):
        await store.append_item(lease, item(1, "x" * 70_000))
    with pytest.raises(ValueError, match="session id 'a{b}'"):
        await store.load("a{b}")


async def test_missing_and_duplicate_sessions(store: RedisSessionStore) -> None:
    lease, credential = await new_session(store)
    replay = await store.create(
        lease.session_id, "tx-a", config=CONFIG, credential=credential, lease_s=LEASE_S
    )
    assert replay == lease  # a retried create (lost reply, too few replicas) is harmless
    with pytest.raises(SessionExistsError):
        await store.create(
            lease.session_id, "tx-b", config={}, credential=credential, lease_s=LEASE_S
        )
    with pytest.raises(SessionNotFoundError):
        await store.load("rtc_never_created")
    with pytest.raises(SessionNotFoundError):
        await store.claim("rtc_never_created", "tx-b", lease_s=LEASE_S, force=True)


async def test_an_ended_session_is_a_tombstone_nobody_can_claim(server: RedisServer) -> None:
    config = config_for(server, session_ttl_s=60)
    async with RedisSessionStore.from_config(config) as store:
        await ended_session_is_a_tombstone(store, server, config.key_prefix)


async def ended_session_is_a_tombstone(
    store: RedisSessionStore, server: RedisServer, prefix: str
) -> None:
    lease, credential = await new_session(store)
    await store.append_item(lease, item(1))
    await store.end(lease)
    await store.end(lease)  # a retried end (lost reply) is harmless
    with pytest.raises(SessionEndedError):
        await store.load(lease.session_id)
    with pytest.raises(SessionEndedError):
        await store.claim(lease.session_id, "tx-b", lease_s=LEASE_S, force=True)
    with pytest.raises(SessionNotFoundError):  # no owner any more: every write is refused
        await store.append_item(lease, item(2))
    with pytest.raises(SessionExistsError):  # the id is never reused
        await store.create(
            lease.session_id, "tx-a", config=CONFIG, credential=credential, lease_s=LEASE_S
        )
    assert await store.verify_credential(lease.session_id, credential)
    assert not await store.verify_credential(lease.session_id, "not-the-credential")
    keys = SessionKeys.of(prefix, lease.session_id)
    with server.client() as redis:
        assert redis.hgetall(keys.meta).keys() == {b"ended", b"credential"}
        assert not redis.exists(keys.items, keys.ids, keys.lease)
        assert 0 < redis.pttl(keys.meta) <= 60_000


# --- fencing ----------------------------------------------------------------------------------


async def test_stale_owner_cannot_write_after_a_takeover(store: RedisSessionStore) -> None:
    old, _ = await new_session(store, owner="tx-a")
    await store.append_item(old, item(1))
    with pytest.raises(LeaseHeldError, match="owned by 'tx-a'") as held:
        await store.claim(old.session_id, "tx-b", lease_s=LEASE_S)
    assert 0 < held.value.remaining_ms <= LEASE_S * 1000

    new = await store.claim(old.session_id, "tx-b", lease_s=LEASE_S, force=True)
    assert new.token == 2
    stale_writes: list[Awaitable[Any]] = [
        store.append_item(old, item(2)),
        store.update_config(old, {"voice": "stale"}),
        store.advance_turn(old, 9),
        store.renew(old, lease_s=LEASE_S),
        store.release(old),
        store.end(old),
    ]
    for write in stale_writes:
        with pytest.raises(StaleOwnerError, match="token 1 is stale, current token 2"):
            await write
    await store.append_item(new, item(3))

    state = await store.load(old.session_id)
    assert state.items == (item(1), item(3))
    assert (state.config, state.turn, state.owner_id, state.token) == (CONFIG, 0, "tx-b", 2)


async def test_an_expired_lease_lets_a_new_owner_claim_without_force(
    store: RedisSessionStore,
) -> None:
    sid = f"rtc_{uuid.uuid4().hex}"
    old = await store.create(sid, "tx-a", config=CONFIG, credential="c", lease_s=0.3)
    with pytest.raises(LeaseHeldError):
        await store.claim(sid, "tx-b", lease_s=LEASE_S)
    claimed: list[Lease] = []

    async def claim() -> bool:
        try:
            claimed.append(await store.claim(sid, "tx-b", lease_s=LEASE_S))
        except LeaseHeldError:
            return False
        return True

    await eventually(claim, 5.0, "the 0.3 s lease to expire")
    assert claimed[0].token == 2
    with pytest.raises(StaleOwnerError):
        await store.append_item(old, item(1))


async def test_renew_extends_only_the_current_token(
    store: RedisSessionStore, server: RedisServer
) -> None:
    old, _ = await new_session(store)
    await store.renew(old, lease_s=0.2)
    new = await store.claim(old.session_id, "tx-a", lease_s=LEASE_S)  # same owner: new token
    assert new.token == 2
    with pytest.raises(StaleOwnerError):
        await store.renew(old, lease_s=LEASE_S)
    await store.renew(new, lease_s=100.0)
    with server.client() as client:
        keys = SessionKeys.of(store._config.key_prefix, new.session_id)
        assert 10_000 < client.pttl(keys.lease) <= 100_000


async def test_renew_all_answers_each_lease_as_its_own_renew_would(
    store: RedisSessionStore, server: RedisServer
) -> None:
    """One round trip for many leases; per lease, in order, what ``renew`` raises or None."""
    live, _ = await new_session(store)
    stale, _ = await new_session(store)
    await store.claim(stale.session_id, "tx-b", lease_s=LEASE_S, force=True)
    ended, _ = await new_session(store)
    await store.end(ended)
    released, _ = await new_session(store)
    await store.release(released)
    unknown = Lease(f"rtc_{uuid.uuid4().hex}", "tx-a", 1)
    leases = [stale, live, ended, released, unknown, live]

    refusals = await store.renew_all(leases, lease_s=100.0)

    singles: list[type[StoreError] | None] = []
    for lease in leases:
        try:
            await store.renew(lease, lease_s=100.0)
            singles.append(None)
        except StoreError as error:
            singles.append(type(error))
    assert [None if r is None else type(r) for r in refusals] == singles
    expected = [StaleOwnerError, None, SessionNotFoundError, StaleOwnerError]
    assert singles == [*expected, SessionNotFoundError, None]
    assert str(refusals[0]) == f"session {stale.session_id}: token 1 is stale, current token 2"
    with server.client() as client:
        assert client.pttl(SessionKeys.of(store._config.key_prefix, live.session_id).lease) > 10_000
    assert await store.renew_all([], lease_s=1.0) == []


async def test_renew_all_without_redis_fails_alike_and_is_retryable(server: RedisServer) -> None:
    config = dataclasses.replace(config_for(server), url="redis://127.0.0.1:9/0")
    async with RedisSessionStore.from_config(config) as down:
        with pytest.raises(StoreUnavailableError) as raised:
            await down.renew_all([Lease("rtc_a", "tx-a", 1), Lease("rtc_b", "tx-a", 1)], lease_s=1)
        assert raised.value.retryable and not down.healthy


async def test_release_hands_over_without_force(store: RedisSessionStore) -> None:
    old, _ = await new_session(store)
    await store.release(old)
    assert (await store.load(old.session_id)).owner_id == ""
    with pytest.raises(StaleOwnerError, match="current token none"):
        await store.append_item(old, item(1))
    new = await store.claim(old.session_id, "tx-b", lease_s=LEASE_S)
    assert new.token == 2


# --- resume credential ------------------------------------------------------------------------


async def test_resume_credential(store: RedisSessionStore, server: RedisServer) -> None:
    lease, credential = await new_session(store)
    assert await store.verify_credential(lease.session_id, credential)
    for wrong in (None, "", credential[:-1], new_credential()):
        assert not await store.verify_credential(lease.session_id, wrong)
    assert not await store.verify_credential("rtc_unknown", credential)
    state = await store.load(lease.session_id)
    assert (state.owner_id, state.token) == ("tx-a", 1)  # a refused resume changed nothing
    keys = SessionKeys.of(store._config.key_prefix, lease.session_id)
    with server.client() as client:
        stored = client.hget(keys.meta, "credential")
    assert stored is not None and credential.encode() not in stored  # only a hash is kept


# --- durability: WAIT, Sentinel failover, Redis restart ---------------------------------------


@pytest.fixture(scope="module")
def replicated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, RedisServer]]:
    workdir = tmp_path_factory.mktemp("replicated")
    primary = RedisServer(workdir, "primary").start()
    replica = RedisServer(workdir, "replica", ("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        replica.start()
        wait_until(lambda: in_sync(replica), 10.0, "the replica to sync")
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def in_sync(replica: RedisServer) -> bool:
    return replica.info("replication").get("master_link_status") == "up"


async def test_wait_reports_the_acknowledging_replica(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = replicated
    config = config_for(primary, wait_replicas=1, wait_timeout_ms=2000)
    async with RedisSessionStore.from_config(config) as store:
        lease, _ = await new_session(store)
        ack = await store.append_item(lease, item(1))
        config_ack = await store.update_config(lease, {"voice": "amy"})
    assert (ack.replicas_acked, config_ack.replicas_acked) == (1, 1)
    with replica.client() as client:  # acknowledged means: already on the replica
        assert client.llen(SessionKeys.of(config.key_prefix, lease.session_id).items) == 1


async def test_too_few_replicas_is_a_retryable_error(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    primary, _ = replicated
    config = config_for(primary, wait_replicas=2, wait_timeout_ms=100)
    async with RedisSessionStore.from_config(config) as store:
        with pytest.raises(ReplicationError, match="1 of 2 required") as refused:
            await new_session(store)
    assert refused.value.retryable and refused.value.replicas_acked == 1


async def test_a_batch_of_writes_is_waited_for_once_and_retried_whole_when_too_few_ack(
    replicated: tuple[RedisServer, RedisServer],
) -> None:
    primary, replica = replicated
    enough = config_for(primary, wait_replicas=1, wait_timeout_ms=2000)
    async with RedisSessionStore.from_config(enough) as store:
        lease, _ = await new_session(store)
        assert await store.write_all(lease, [AppendItem(item(1)), AdvanceTurn(1)]) == (2, None)
    with replica.client() as client:  # acknowledged means: already on the replica
        assert client.llen(SessionKeys.of(enough.key_prefix, lease.session_id).items) == 1
    too_many = dataclasses.replace(enough, wait_replicas=2, wait_timeout_ms=100)
    async with RedisSessionStore.from_config(too_many) as store:
        applied, error = await store.write_all(lease, [AppendItem(item(2)), AdvanceTurn(2)])
        assert applied == 0 and isinstance(error, ReplicationError) and error.retryable
        assert (await store.load(lease.session_id)).turn == 2  # on the primary: a retry is safe


async def test_sentinel_failover_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    topology = SentinelTopology(tmp_path).start()
    try:
        topology.wait_ready()
        await failover_scenario(topology)
    finally:
        topology.stop_all()


async def failover_scenario(topology: SentinelTopology) -> None:
    config = RedisConfig(
        sentinels=tuple(("127.0.0.1", s.port) for s in topology.sentinels),
        sentinel_service=SERVICE,
        key_prefix="failover",
        wait_replicas=1,
        wait_timeout_ms=1000,
        connect_timeout_s=0.2,
    )
    async with RedisSessionStore.from_config(config) as store:
        lease, _ = await new_session(store)
        acked = [await store.append_item(lease, item(n)) for n in range(1, 21)]
        assert all(ack.replicas_acked == 1 for ack in acked)

        topology.primary.stop(signal.SIGKILL)
        started = time.monotonic()
        outcome: list[BaseException | None] = []

        async def write_reaches_new_primary() -> bool:
            try:
                await store.append_item(lease, item(21))
            except StoreUnavailableError:
                return False
            except ReplicationError as exc:  # written; the promoted primary has no replica left
                outcome.append(exc)
                return True
            outcome.append(None)
            return True

        await eventually(write_reaches_new_primary, 20.0, "the store to reach the promoted replica")
        took_s = time.monotonic() - started
        print(f"failover: first write on the promoted replica {took_s:.2f} s after the kill")
        assert topology.primary_port() == topology.replica.port
        state = await store.load(lease.session_id)
    assert state.items == tuple(item(n) for n in range(1, 22))  # none lost, order kept
    assert (state.owner_id, state.token) == ("tx-a", lease.token)  # the token survived too


async def test_write_behind_catches_up_after_a_redis_restart(tmp_path: Path) -> None:
    persistent = ("--appendonly", "yes", "--appendfsync", "always")
    server = RedisServer(tmp_path, "restarting", persistent).start()
    try:
        await restart_scenario(server)
    finally:
        server.stop()


async def restart_scenario(server: RedisServer) -> None:
    config = config_for(server, connect_timeout_s=0.2, socket_timeout_s=0.5)
    async with (
        RedisSessionStore.from_config(config) as store,
        WriteBehindQueue(store, retry_interval_s=0.2) as queue,
    ):
        sid = f"rtc_{uuid.uuid4().hex}"
        lease = await store.create(sid, "tx-a", config=CONFIG, credential="c", lease_s=1.0)
        for n in range(1, 6):
            queue.submit(lease, AppendItem(item(n)))
        await asyncio.wait_for(queue.drained(), 5.0)

        server.stop(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as down:
            await store.append_item(lease, item(99))
        assert down.value.retryable and time.monotonic() - started < 2.0  # fails fast
        for n in range(6, 16):
            queue.submit(lease, AppendItem(item(n)))
        queue.submit(lease, AdvanceTurn(7))
        await eventually(lambda: not queue.healthy, 5.0, "/readyz to see Redis down")
        # Down for a few seconds, longer than the 1 s lease: ~15 failed flushes of 0.2 s.
        await eventually(lambda: queue.failed_flushes >= 15, 10.0, "retries")
        assert queue.pending == 11  # kept, not dropped

        server.start()  # same port, same directory: the AOF comes back
        await asyncio.wait_for(queue.drained(), 10.0)
        assert queue.healthy
        state = await store.load(lease.session_id)
    assert state.items == tuple(item(n) for n in range(1, 16))  # nothing lost, order kept
    assert state.turn == 7
    assert (state.owner_id, state.token) == ("tx-a", 1)  # the lapsed lease cost no ownership


async def test_a_stale_queue_is_dropped_and_reported(store: RedisSessionStore) -> None:
    old, _ = await new_session(store)
    await store.claim(old.session_id, "tx-b", lease_s=LEASE_S, force=True)
    dropped: list[tuple[Lease, StoreError]] = []
    async with WriteBehindQueue(store, on_dropped=lambda s, e: dropped.append((s, e))) as queue:
        queue.submit(old, AppendItem(item(1)))
        queue.submit(old, AppendItem(item(2)))
        await asyncio.wait_for(queue.drained(), 5.0)
    assert [(s, type(e)) for s, e in dropped] == [(old, StaleOwnerError)]
    assert (await store.load(old.session_id)).items == ()


async def test_a_refused_lease_drops_only_its_own_writes(store: RedisSessionStore) -> None:
    """Resumed again by the same transceiver: the old lease's writes are refused and dropped,
    the new lease's writes queued behind them are still stored."""
    old, _ = await new_session(store)
    new = await store.claim(old.session_id, "tx-a", lease_s=LEASE_S, force=True)
    dropped: list[tuple[Lease, StoreError]] = []
    async with WriteBehindQueue(store, on_dropped=lambda s, e: dropped.append((s, e))) as queue:
        queue.submit(old, AppendItem(item(1)))
        queue.submit(new, AppendItem(item(2)))
        queue.submit(old, AppendItem(item(3)))
        await asyncio.wait_for(queue.drained(), 5.0)
    assert [(s, type(e)) for s, e in dropped] == [(old, StaleOwnerError)]
    assert (await store.load(old.session_id)).items == (item(2),)


async def test_heartbeat_keeps_the_lease_and_reports_a_takeover(
    store: RedisSessionStore,
) -> None:
    sid = f"rtc_{uuid.uuid4().hex}"
    lease = await store.create(sid, "tx-a", config=CONFIG, credential="c", lease_s=0.3)
    lost: list[Lease] = []

    def on_lost(gone: Lease, error: StoreError) -> None:
        assert isinstance(error, StaleOwnerError)
        lost.append(gone)

    async with LeaseHeartbeat(store, lease_s=0.3, on_lost=on_lost) as beat:
        beat.hold(lease)
        loop = asyncio.get_running_loop()
        until_s = loop.time() + 1.0  # over three leases: alive only because it is renewed
        while loop.time() < until_s:
            with pytest.raises(LeaseHeldError):
                await store.claim(sid, "tx-b", lease_s=LEASE_S)
            await asyncio.sleep(0.1)
        await store.claim(sid, "tx-b", lease_s=LEASE_S, force=True)
        await eventually(lambda: lost == [lease], 3.0, "the heartbeat to see the takeover")
        assert beat.held == ()


async def test_write_all_stores_what_the_separate_writes_store(
    store: RedisSessionStore, server: RedisServer
) -> None:
    """Every kind of write in one round trip, in order: the same session as written one by one;
    a refused write stops the count there (the writes before it applied, none after it)."""
    image = "data:image/png;base64,iVBORw0KGgo="
    first, _ = await new_session(store)
    second, _ = await new_session(store)
    writes: list[PendingWrite] = [
        AppendItem(item(1)),
        UpdateConfig({**CONFIG, "voice": "amy"}),
        AppendItem(item(2)),
        ReplaceItems((item(1), item(2, "edited")), 0),
        StoreImages(("r1",), {"r1": image}),
        AdvanceTurn(3),
        AppendItem(item(3)),
    ]
    assert await store.write_all(first, writes) == (len(writes), None)
    await store.append_item(second, item(1))
    await store.update_config(second, {**CONFIG, "voice": "amy"})
    await store.append_item(second, item(2))
    await store.replace_items(second, (item(1), item(2, "edited")), 0)
    await store.store_images(second, ("r1",), {"r1": image})
    await store.advance_turn(second, 3)
    await store.append_item(second, item(3))
    batched, separate = await store.load(first.session_id), await store.load(second.session_id)
    assert batched.items == separate.items == (item(1), item(2, "edited"), item(3))
    assert (batched.config, batched.turn) == (separate.config, separate.turn)
    assert (batched.config["voice"], batched.turn, batched.first_seq) == ("amy", 3, 1)
    with server.client() as client:
        images = [client.hgetall(SessionKeys.of(store._config.key_prefix, lease.session_id).images)
                  for lease in (first, second)]  # fmt: skip
    assert images[0] == images[1] == {b"r1": image.encode()}
    assert await store.write_all(first, []) == (0, None)

    applied, error = await store.write_all(
        first, [AdvanceTurn(4), EndSession(), AppendItem(item(4))]
    )
    assert applied == 2 and isinstance(error, SessionNotFoundError)  # ended by the second
    stale, _ = await new_session(store)
    await store.claim(stale.session_id, "tx-b", lease_s=LEASE_S, force=True)
    applied, error = await store.write_all(stale, [AppendItem(item(1)), AdvanceTurn(1)])
    assert applied == 0 and isinstance(error, StaleOwnerError)
    assert (await store.load(stale.session_id)).items == ()


async def test_a_turns_writes_queued_together_go_in_one_round_trip(server: RedisServer) -> None:
    """A turn's user item, answer and counter, queued in one step: one round trip, in order;
    writes queued after a refused write of the same lease are dropped with it, as before."""
    async with CountedStore.from_config(config_for(server, session_ttl_s=60)) as store:
        assert isinstance(store, CountedStore)
        store.batches, store.written = [], []
        lease, _ = await new_session(store)
        async with WriteBehindQueue(store) as queue:
            for write in (AppendItem(item(1)), AppendItem(item(2)), AdvanceTurn(1)):
                queue.submit(lease, write)
            await asyncio.wait_for(queue.drained(), 5.0)
        assert store.written == [3] and store.singles == 0
        state = await store.load(lease.session_id)
        assert (state.items, state.turn) == ((item(1), item(2)), 1)

        dropped: list[tuple[Lease, StoreError]] = []
        async with WriteBehindQueue(store, on_dropped=lambda s, e: dropped.append((s, e))) as queue:
            for write in (AppendItem(item(3)), EndSession(), AppendItem(item(4)), AdvanceTurn(2)):
                queue.submit(lease, write)
            await asyncio.wait_for(queue.drained(), 5.0)
        assert [(s, type(e)) for s, e in dropped] == [(lease, SessionNotFoundError)]
        assert store.written == [3, 4] and queue.pending == 0
        with pytest.raises(SessionEndedError):
            await store.load(lease.session_id)


class CountedStore(RedisSessionStore):
    """Counts the store's round trips: renewals and writes one by one (``singles``), renewals
    together (the leases of each) and writes together (the writes of each)."""

    singles = 0
    batches: list[int]
    written: list[int]

    async def renew(self, lease: Lease, *, lease_s: float) -> Any:
        self.singles += 1
        return await super().renew(lease, lease_s=lease_s)

    async def append_item(self, lease: Lease, item: Mapping[str, Any]) -> Any:
        self.singles += 1
        return await super().append_item(lease, item)

    async def advance_turn(self, lease: Lease, turn: int) -> Any:
        self.singles += 1
        return await super().advance_turn(lease, turn)

    async def end(self, lease: Lease) -> Any:
        self.singles += 1
        return await super().end(lease)

    async def write_all(self, lease: Lease, writes: Sequence[PendingWrite]) -> Any:
        self.written.append(len(writes))
        return await super().write_all(lease, writes)

    async def renew_all(self, leases: Sequence[Lease], *, lease_s: float) -> Any:
        self.batches.append(len(leases))
        return await super().renew_all(leases, lease_s=lease_s)


async def test_heartbeat_renews_every_held_lease_in_one_round_trip_a_beat(
    server: RedisServer,
) -> None:
    """Five calls, one beat: one renewal round trip carrying five leases, none one by one; a
    takeover of one loses that one only, the others stay held and renewed past their lease."""
    config = config_for(server, session_ttl_s=60)
    async with CountedStore.from_config(config) as store:
        assert isinstance(store, CountedStore)
        store.batches = []
        sids = [f"rtc_{uuid.uuid4().hex}" for _ in range(5)]
        leases = [
            await store.create(sid, "tx-a", config=CONFIG, credential="c", lease_s=0.3)
            for sid in sids
        ]
        lost: list[Lease] = []
        async with LeaseHeartbeat(store, lease_s=0.3, on_lost=lambda g, e: lost.append(g)) as beat:
            for lease in leases:
                beat.hold(lease)
            await eventually(lambda: len(store.batches) >= 3, 5.0, "three beats")
            assert store.singles == 0 and set(store.batches[:3]) == {5}
            await store.claim(sids[2], "tx-b", lease_s=LEASE_S, force=True)
            await eventually(lambda: lost == [leases[2]], 3.0, "the takeover to be seen")
            assert beat.held == (*leases[:2], *leases[3:])
            beats = len(store.batches)
            await eventually(lambda: len(store.batches) >= beats + 4, 5.0, "four more beats")
            assert store.batches[-1] == 4
            for sid in (*sids[:2], *sids[3:]):  # 0.3 s leases, well over 0.3 s ago: renewed
                with pytest.raises(LeaseHeldError):
                    await store.claim(sid, "tx-b", lease_s=LEASE_S)


async def test_heartbeat_keeps_every_lease_while_redis_is_away(tmp_path: Path) -> None:
    """A failed round trip fails each renewal retryably: nothing is lost, and once Redis is
    back the next beat renews them all."""
    persistent = ("--appendonly", "yes", "--appendfsync", "always")
    redis = RedisServer(tmp_path, "away", persistent).start()
    try:
        config = config_for(redis, session_ttl_s=60)
        async with CountedStore.from_config(config) as store:
            assert isinstance(store, CountedStore)
            store.batches = []
            leases = [(await new_session(store))[0] for _ in range(3)]
            lost: list[Lease] = []
            beat = LeaseHeartbeat(
                store, lease_s=3.0, interval_s=0.05, on_lost=lambda g, e: lost.append(g)
            )
            async with beat:
                for lease in leases:
                    beat.hold(lease)
                redis.stop()
                beats = len(store.batches)
                await eventually(lambda: len(store.batches) >= beats + 3, 10.0, "beats")
                assert not store.healthy and lost == [] and beat.held == tuple(leases)
                redis.start()
                await eventually(lambda: store.healthy, 10.0, "a renewal to succeed again")
                assert lost == [] and beat.held == tuple(leases)
    finally:
        redis.stop()


# --- configuration ----------------------------------------------------------------------------


def test_config_from_env() -> None:
    assert RedisConfig.from_env({}) is None
    plain = RedisConfig.from_env({"REDIS_URL": "redis://r:6379/0", "REDIS_WAIT_REPLICAS": "1"})
    assert plain is not None and (plain.url, plain.wait_replicas) == ("redis://r:6379/0", 1)
    env = {"REDIS_SENTINELS": "s1:26379, [::1]:26380", "REDIS_SENTINEL_SERVICE": "main"}
    sentinel = RedisConfig.from_env(env)
    assert sentinel is not None
    assert sentinel.sentinels == (("s1", 26379), ("::1", 26380))
    assert sentinel.reply_timeout_s == pytest.approx(1.2)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "redis://x", "REDIS_SENTINELS": "a:1"}, "exactly one of"),
        ({"REDIS_SENTINELS": "a:1"}, "needs REDIS_SENTINEL_SERVICE"),
        ({"REDIS_SENTINELS": "a", "REDIS_SENTINEL_SERVICE": "m"}, "'a' is not host:port"),
        ({"REDIS_URL": "redis://x", "REDIS_KEY_PREFIX": "a{b}"}, "REDIS_KEY_PREFIX='a{b}'"),
        ({"REDIS_URL": "redis://x", "REDIS_MAX_ITEMS": "0"}, "REDIS_MAX_ITEMS=0 is below 1"),
        ({"REDIS_URL": "redis://x", "REDIS_SESSION_TTL_S": "x"}, "is not a float"),
        (
            {"REDIS_URL": "redis://x", "REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": "0"},
            "REDIS_WAIT_TIMEOUT_MS must be at least 1",
        ),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(RedisConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        RedisConfig.from_env(env)
