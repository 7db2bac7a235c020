"""transceiver.store.persistence against a real redis-server: a session that began while Redis was
down is stored once Redis is back, with the history, config and turn it had meanwhile; a create
whose reply was lost is adopted, not lost; a Redis that comes back empty gets the live session again
from memory (it is not hung up); writes a full queue refused are queued again later, in order;
edits are stored as the whole history, also when a full queue refused them first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_image_parts import data_url, png_bytes

from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import eventually
from pipeline.providers import ImagePart, Message
from relay.wire.redis_config import RedisConfig
from transceiver.realtime.server_events import stored_item_bodies
from transceiver.store.errors import SessionNotFoundError, StoreError
from transceiver.store.journal import SessionJournal, item_to_message
from transceiver.store.keys import SessionState, image_ref
from transceiver.store.persistence import SessionPersistence
from transceiver.store.sessions import RedisSessionStore
from transceiver.store.survival import SurvivalPolicy

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")
CONFIG = {"instructions": "Be brief.", "voice": "joe"}


def fresh_config(server: RedisServer) -> RedisConfig:
    return RedisConfig(
        url=server.url, key_prefix=f"p{uuid.uuid4().hex[:10]}",
        connect_timeout_s=0.2, socket_timeout_s=0.5,
    )  # fmt: skip


async def stored(store: RedisSessionStore, session_id: str) -> SessionState | None:
    try:
        return await store.load(session_id)
    except (SessionNotFoundError, StoreError):
        return None


@pytest.fixture
def max_pending() -> int:
    return 200


@pytest.fixture
def redis_args() -> tuple[str, ...]:
    return ()  # no AOF, no RDB: a restarted server comes back empty


@pytest.fixture
def image_bytes() -> int:
    return SurvivalPolicy().session_image_bytes


@pytest.fixture
async def persistence(
    tmp_path: Path, max_pending: int, redis_args: tuple[str, ...], image_bytes: int
) -> AsyncIterator[tuple[SessionPersistence, RedisServer]]:
    server = RedisServer(tmp_path, "redis", redis_args).start()
    try:
        async with RedisSessionStore.from_config(fresh_config(server)) as store:
            policy = SurvivalPolicy(max_pending_writes=max_pending, session_image_bytes=image_bytes)
            persistence = SessionPersistence(store, policy)
            await persistence.start()
            try:
                yield persistence, server
            finally:
                await persistence.aclose(flush_timeout_s=1.0)
    finally:
        server.stop()


async def test_a_session_begun_while_redis_is_down_is_stored_when_it_returns(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, server = persistence
    server.stop()
    session_id = f"rtc_{uuid.uuid4().hex}"
    journal = await manager.create(session_id, CONFIG)
    assert journal.lease is None and session_id in manager.unstored
    assert set(journal.headers().values()) == {session_id, journal.credential}

    history = [Message("user", "Tell me about water."), Message("assistant", "Water is wet.")]
    journal.history(history)
    journal.config({**CONFIG, "voice": "amy"})
    journal.turn(1)
    await asyncio.sleep(1.5)  # the deferred create tries (and fails) meanwhile
    history.append(Message("user", "And the moon?"))
    journal.history(history)

    server.start()  # empty: nothing of the session was ever in Redis
    store = manager.store
    assert isinstance(store, RedisSessionStore)

    async def caught_up() -> bool:
        state = await stored(store, session_id)
        return state is not None and len(state.items) == 3 and state.turn == 1

    await eventually(caught_up, 10.0, "the session to be stored and caught up")
    state = await store.load(session_id)
    assert [(i["id"], i["role"], i["content"]) for i in state.items] == [
        ("h1", "user", "Tell me about water."),
        ("h2", "assistant", "Water is wet."),
        ("h3", "user", "And the moon?"),
    ]
    assert state.config == {**CONFIG, "voice": "amy"}
    assert state.owner_id == manager.owner_id and journal.lease is not None
    assert await store.verify_credential(session_id, journal.credential)
    assert manager.unstored == {} and not journal.lost
    assert journal.lease in manager.heartbeat.held


async def test_a_create_whose_reply_was_lost_is_adopted(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, _ = persistence
    session_id = f"rtc_{uuid.uuid4().hex}"
    journal = await manager.create(session_id, CONFIG)
    first = journal.lease
    assert first is not None
    journal.lease = None  # as if the create landed but its reply never came back
    assert await manager.store_new(journal)
    assert journal.lease == first and not journal.lost


async def test_a_session_id_someone_else_stored_is_not_taken(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, _ = persistence
    session_id = f"rtc_{uuid.uuid4().hex}"
    await manager.store.create(session_id, "someone-else", config=CONFIG, credential="c", lease_s=5)
    journal = await manager.create(session_id, CONFIG)
    assert journal.lost and journal.lease is None and session_id not in manager.unstored
    journal.history([Message("user", "hello")])  # nothing is written for a lost journal
    state = await manager.store.load(session_id)
    assert state.owner_id == "someone-else" and state.items == ()


async def new_session(manager: SessionPersistence) -> tuple[RedisSessionStore, str, SessionJournal]:
    """A fresh session created through ``manager``: the store, its id and its journal."""
    store = manager.store
    assert isinstance(store, RedisSessionStore)
    session_id = f"rtc_{uuid.uuid4().hex}"
    return store, session_id, await manager.create(session_id, CONFIG)


def spoken(state: SessionState) -> list[tuple[str, str, str]]:
    return [(i["id"], i["role"], i["content"]) for i in state.items]


async def test_a_redis_that_comes_back_empty_gets_the_live_session_again(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, server = persistence
    store, session_id, journal = await new_session(manager)
    lost: list[str] = []
    journal.on_lost = lost.append
    history = [Message("user", "Tell me about water."), Message("assistant", "Water is wet.")]
    journal.history(history)
    journal.turn(1)
    await eventually(lambda: stored_items(store, session_id, 2), 5.0, "the first turn stored")

    server.restart()  # no AOF, no RDB: it comes back empty
    history.append(Message("user", "And the moon?"))
    journal.history(history)  # refused (no such session): stored again from memory
    await eventually(lambda: stored_items(store, session_id, 3), 15.0, "the session stored again")
    state = await store.load(session_id)
    assert spoken(state) == [
        ("h1", "user", "Tell me about water."),
        ("h2", "assistant", "Water is wet."),
        ("h3", "user", "And the moon?"),
    ]
    assert state.turn == 1 and state.config == CONFIG
    assert await store.verify_credential(session_id, journal.credential)
    assert lost == [] and not journal.lost and journal.lease is not None


async def stored_items(store: RedisSessionStore, session_id: str, count: int) -> bool:
    state = await stored(store, session_id)
    return state is not None and len(state.items) == count


@pytest.mark.parametrize("max_pending", [3])
@pytest.mark.parametrize("redis_args", [("--appendonly", "yes", "--appendfsync", "always")])
async def test_writes_a_full_queue_refused_are_queued_again_in_order(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, server = persistence
    store, session_id, journal = await new_session(manager)
    server.stop()
    history = [Message("user" if n % 2 == 0 else "assistant", f"line {n}") for n in range(7)]
    journal.history(history)  # 3 queued, 4 refused by the full queue
    journal.turn(3)
    assert manager.queue.pending == 3 and journal.behind

    server.start()  # from its append-only file: the session is still there
    await eventually(lambda: stored_items(store, session_id, 7), 15.0, "every line stored")
    state = await store.load(session_id)
    assert spoken(state) == [
        (f"h{n + 1}", "user" if n % 2 == 0 else "assistant", f"line {n}") for n in range(7)
    ]
    assert state.turn == 3 and not journal.behind and not journal.lost


@pytest.mark.parametrize("max_pending", [2])
@pytest.mark.parametrize("redis_args", [("--appendonly", "yes", "--appendfsync", "always")])
async def test_edits_are_stored_as_the_whole_history_even_past_a_full_queue(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    manager, server = persistence
    store, session_id, journal = await new_session(manager)
    history = [
        Message("user", "Tell me about water."),
        Message("assistant", "Water is wet and covers the earth."),
        Message("user", "And the moon?"),
    ]
    journal.history(history)
    await eventually(lambda: stored_items(store, session_id, 3), 5.0, "the first turn stored")
    server.stop()
    del history[2]  # an item deleted: the whole history again (queued)
    journal.history(history)
    history[1] = Message("assistant", "Water is wet")  # an answer truncated (queued: now full)
    journal.history(history)
    history.insert(0, Message("system", "Be kind."))  # an item inserted: refused, waits
    journal.history(history)
    assert manager.queue.pending == 2 and journal.behind

    server.start()  # from its append-only file: the session as it was before the edits
    edited = [
        ("h1", "system", "Be kind."),
        ("h2", "user", "Tell me about water."),
        ("h3", "assistant", "Water is wet"),
    ]
    await eventually(lambda: stored_as(store, session_id, edited), 15.0, "the edits stored")
    history.append(Message("user", "And the sun?"))  # appends go on after it
    journal.history(history)
    await eventually(lambda: stored_items(store, session_id, 4), 5.0, "the next item stored")
    assert spoken(await store.load(session_id))[-1] == ("h4", "user", "And the sun?")
    assert not journal.behind and not journal.lost


async def stored_as(
    store: RedisSessionStore, session_id: str, items: list[tuple[str, str, str]]
) -> bool:
    state = await stored(store, session_id)
    return state is not None and spoken(state) == items


IMAGES = [ImagePart(data_url(png_bytes(side, side)), "low") for side in (3, 4, 5)]


@pytest.mark.parametrize("image_bytes", [len(IMAGES[0].data_url) + len(IMAGES[2].data_url)])
async def test_images_are_stored_beside_their_items_the_oldest_dropped_past_the_budget(
    persistence: tuple[SessionPersistence, RedisServer],
) -> None:
    """Images are stored once each (by ref) with the session's TTL, and a session resumed on
    another transceiver gets them back in its items; past the budget the oldest are dropped
    (logged, counted) and their items resume without them; a deleted item's image leaves."""
    manager, server = persistence
    store, session_id, journal = await new_session(manager)
    a, b, c = IMAGES
    history = [
        Message("user", "Look at this.", images=(a,)),
        Message("assistant", "A grey square."),
        Message("user", "And these?", images=(b, a)),  # a again: newer than b
        Message("user", "", images=(c,)),  # an image alone
    ]
    journal.history(history)
    await eventually(lambda: stored_items(store, session_id, 4), 5.0, "the items stored")
    assert manager.images_dropped == 1  # b: c and a fill the budget
    other = SessionPersistence(store, SurvivalPolicy())  # another transceiver, the same Redis
    await other.start()
    try:
        await resumed_with_images(other, server, session_id, journal.credential)
    finally:
        await other.aclose(flush_timeout_s=1.0)


async def resumed_with_images(
    other: SessionPersistence, server: RedisServer, session_id: str, credential: str
) -> None:
    a, _, c = IMAGES
    resumed, state = await other.resume(session_id, credential)
    messages = [item_to_message(item) for item in state.items]
    assert [m.images for m in messages] == [(a,), (), (a,), (c,)]
    assert state.images_missing == 1
    bodies = [stored_item_bodies(item)[0]["content"] for item in state.items]
    image_part = {"type": "input_image", "image_url": c.data_url, "detail": "low"}
    assert bodies[3] == [image_part], bodies[3]
    assert bodies[2][0] == {"type": "input_text", "text": "And these?"}, bodies[2]
    assert [part["type"] for part in bodies[2]] == ["input_text", "input_image"]
    with server.client() as client:
        (images_key,) = client.keys(f"*:sess:{{{session_id}}}:images")
        meta_key = images_key.replace(b":images", b":meta")
        assert 0 < client.pttl(images_key) <= client.pttl(meta_key) + 1000  # the session's TTL
    assert images_are(server, images_key, {a, c})  # each once
    resumed.history(messages)  # as the resumed session starts
    resumed.history(messages[:3])  # the image alone deleted: c leaves, b is gone for good
    await eventually(lambda: images_are(server, images_key, {a}), 5.0, "c deleted")
    assert not resumed.behind and not resumed.lost


def images_are(server: RedisServer, key: bytes, images: set[ImagePart]) -> bool:
    with server.client() as client:
        return set(client.hkeys(key)) == {image_ref(i.data_url).encode() for i in images}
