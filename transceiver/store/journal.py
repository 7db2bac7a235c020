"""One session's journal: what it committed, turned into stored writes behind its back.

I/O layer over the write-behind queue. ``message_to_item`` and ``item_to_message`` convert the
engine's history to stored items and back; ``SessionJournal`` queues a session's items, config
and turn (never waiting on Redis), catches up what a full queue refused, and is told when the
session is lost here. ``persistence`` owns the journals (``JournalOwner``).

The history grows by appends (one ``AppendItem`` per new message); an edit of what was stored
(a client's insert, delete or truncate, an answer cut by a barge-in after it was done) is
noticed by identity (a stored message is no longer the same object at its place) and stored
as one ``ReplaceItems`` of the whole history, so a resumed session sees the edited
conversation.

A user message's images (each <= 180 KiB decoded, ``transceiver.realtime.image_urls``) are
too large for an item (``keys.MAX_ITEM_BYTES``): they are stored beside the items, once each,
by ref (``keys``: the session's ``images`` hash), and the item names them. Bounded per
session by ``SurvivalPolicy.session_image_bytes`` of data URLs: ``kept_images`` keeps the
newest images that fit, newest first, stopping at the first that does not, so what a resumed
session lost is always its oldest images. A dropped image is logged and counted
(``images_dropped``, ``transceiver_session_images_dropped``); its item resumes without it.
The kept set is written (``StoreImages``) before the items that name a new image, so a
resumed session finds the images of every item it loads, but for the dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipeline.providers import ImagePart, Message, ToolCall
from transceiver.background import done_within
from transceiver.store.errors import StoreError
from transceiver.store.heartbeat import LeaseHeartbeat
from transceiver.store.keys import Lease, image_ref
from transceiver.store.sessions import SessionStore
from transceiver.store.write_behind import (
    AdvanceTurn,
    AppendItem,
    EndSession,
    PendingWrite,
    QueueFullError,
    ReplaceItems,
    StoreImages,
    UpdateConfig,
    WriteBehindQueue,
)

log = logging.getLogger(__name__)
SESSION_HEADER = "X-Voicerelay-Session"
RESUME_TOKEN_HEADER = "X-Voicerelay-Resume-Token"
Json = dict[str, Any]


def message_to_item(item_id: str, message: Message) -> Json:
    item: Json = {"id": item_id, "type": "message", "role": message.role}
    item["content"] = message.content
    if message.tool_calls:
        item["tool_calls"] = [
            {"call_id": c.call_id, "name": c.name, "arguments": c.arguments}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        item["tool_call_id"] = message.tool_call_id
    if message.images:
        item["images"] = [
            {"ref": image_ref(image.data_url), "detail": image.detail} for image in message.images
        ]
    return item


def item_to_message(item: Mapping[str, Any]) -> Message:
    calls = tuple(
        ToolCall(str(c["call_id"]), str(c["name"]), str(c["arguments"]))
        for c in item.get("tool_calls", ())
    )
    images = tuple(
        ImagePart(str(image["image_url"]), str(image.get("detail", "auto")))
        for image in item.get("images", ())
        if "image_url" in image  # loaded (``keys.with_images``); a dropped one has only a ref
    )
    return Message(
        item["role"], str(item.get("content", "")), calls, str(item.get("tool_call_id", "")),
        images,
    )  # fmt: skip


def kept_images(
    messages: Sequence[Message], budget_bytes: int, ref_of: Callable[[str], str] = image_ref
) -> dict[str, str]:
    """The images a session keeps (ref -> data URL): the newest first, while their data URLs
    fit in ``budget_bytes`` together; from the first that does not fit on, none (older)."""
    kept: dict[str, str] = {}
    total_bytes = 0
    for message in reversed(messages):
        for image in reversed(message.images):
            ref = ref_of(image.data_url)
            if ref in kept:
                continue
            total_bytes += len(image.data_url)
            if total_bytes > budget_bytes:
                return kept
            kept[ref] = image.data_url
    return kept


class JournalOwner(Protocol):
    """What a journal needs of the process-wide persistence that owns it (``persistence``
    implements it; named here so the journal need not import its owner)."""

    store: SessionStore
    queue: WriteBehindQueue
    heartbeat: LeaseHeartbeat
    journals: dict[str, SessionJournal]
    unstored: dict[str, SessionJournal]  # began while Redis was down
    image_budget_bytes: int  # a session's stored images' data URLs, together
    images_dropped: int  # images not stored for the budget (a counter for metrics)


class SessionJournal:
    """One session's writes, submitted behind its back; never waits on Redis."""

    def __init__(
        self,
        persistence: JournalOwner,
        session_id: str,
        credential: str,
        lease: Lease | None,
        *,
        stored_messages: int = 0,
        id_offset: int = 0,
        base_turn: int = 0,
        stored_images: frozenset[str] = frozenset(),
    ) -> None:
        self.persistence = persistence
        self._session_id = session_id
        self.lease = lease  # None: not stored yet (Redis was down when the call began)
        self.credential = credential
        self.messages: Sequence[Message] = ()  # the engine's history
        self._stored: list[Message] | None = None  # the messages written, in order (None:
        # a resumed journal's, taken from the first history it is given)
        self._rewrite_behind = False  # an edit's ReplaceItems waits for room in the queue
        self.latest_config: Mapping[str, Any] = {}
        self._latest_turn = base_turn
        self._written = stored_messages  # history messages already in Redis
        self._id_offset = id_offset  # items trimmed by the store's cap before them
        self._base_turn = base_turn
        self._config_behind = self._turn_behind = False
        self._images: frozenset[str] = stored_images  # the refs stored (or queued) in Redis
        self._dropped: set[str] = set()  # refs left out for the budget (logged once each)
        self._refs: dict[str, str] = {}  # the history's images' data URLs -> their refs
        self.lost = False
        # Told once when the session is lost here (taken over elsewhere, or its record gone).
        self.on_lost: Callable[[str], None] | None = None

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def current(self) -> bool:
        """This journal speaks for its session here (no newer resume here replaced it)."""
        return self.persistence.journals.get(self.session_id) is self

    def headers(self) -> dict[str, str]:
        return {SESSION_HEADER: self.session_id, RESUME_TOKEN_HEADER: self.credential}

    def extension(self) -> Json:
        """The ``voicerelay`` field of session.created: what the client needs to resume."""
        return {"session_id": self.session_id, "resume_token": self.credential}

    @property
    def behind(self) -> bool:
        """Some of what this session committed is not queued yet (a full queue refused it)."""
        pending = self._written < len(self.messages) or self._config_behind or self._turn_behind
        pending = pending or self._rewrite_behind
        return pending and self.lease is not None and not self.lost

    def history(self, messages: Sequence[Message]) -> None:
        """Store the messages appended to the history since the last call, or the whole
        history when what was stored changed, and whatever a full queue refused before (in
        order: a refused item stops the rest)."""
        self.messages = messages
        if self.lease is None:
            return  # written by ``stored`` once the session is in Redis
        if self._config_behind:
            self._config_behind = not self._submit(UpdateConfig(self.latest_config))
        if self._stored is None:
            self._stored = list(messages[: self._written])
        self._store_images(messages)
        if self._rewrite_behind or self._edited(messages):
            self._rewrite(messages)
        while not self._rewrite_behind and self._written < len(messages):
            item_id = f"h{self._id_offset + self._written + 1}"
            if not self._submit(AppendItem(message_to_item(item_id, messages[self._written]))):
                break
            self._stored.append(messages[self._written])
            self._written += 1
        if self._turn_behind:
            self._turn_behind = not self._submit(AdvanceTurn(self._latest_turn))

    def _store_images(self, messages: Sequence[Message]) -> None:
        """Queue the images the session keeps now, when they changed (an image shown, an
        item with images deleted); retried on the next history when the queue is full."""
        if not self._images and not any(m.images for m in messages):
            return
        known, self._refs = self._refs, {}
        for url in (image.data_url for m in messages for image in m.images):
            self._refs[url] = known.get(url) or image_ref(url)  # each image hashed once
        kept = kept_images(messages, self.persistence.image_budget_bytes, self._refs.__getitem__)
        self._count_dropped(kept)
        if frozenset(kept) == self._images:
            return
        added = {ref: url for ref, url in kept.items() if ref not in self._images}
        if self._submit(StoreImages(tuple(kept), added)):
            self._images = frozenset(kept)

    def _count_dropped(self, kept: Mapping[str, str]) -> None:
        dropped = set(self._refs.values()) - kept.keys() - self._dropped
        if dropped:
            self._dropped |= dropped
            self.persistence.images_dropped += len(dropped)
            budget = self.persistence.image_budget_bytes
            log.warning(
                "session %s: %d older image(s) not stored: its images are over %d bytes "
                "(TRANSCEIVER_SESSION_IMAGE_BYTES); a resume shows their items without them",
                self.session_id, len(dropped), budget,
            )  # fmt: skip

    def _edited(self, messages: Sequence[Message]) -> bool:
        """A stored message is not at its place any more (edited, moved or taken out)."""
        stored = self._stored or []
        if len(messages) < len(stored):
            return True
        return any(old is not new for old, new in zip(stored, messages, strict=False))

    def _rewrite(self, messages: Sequence[Message]) -> None:
        items = [
            message_to_item(f"h{self._id_offset + i + 1}", message)
            for i, message in enumerate(messages)
        ]
        self._rewrite_behind = not self._submit(ReplaceItems(tuple(items), self._id_offset))
        if not self._rewrite_behind:
            self._stored, self._written = list(messages), len(messages)

    def config(self, config: Mapping[str, Any]) -> None:
        self.latest_config = config
        self._config_behind = not self._submit(UpdateConfig(config))

    def turn(self, turn: int) -> None:
        self._latest_turn = self._base_turn + turn
        self._turn_behind = not self._submit(AdvanceTurn(self._latest_turn))

    def stored(self, lease: Lease) -> None:
        """The session is in Redis now (with ``latest_config``): catch up what it missed."""
        self.lease = lease
        self._config_behind = False
        self._turn_behind = self._latest_turn > 0
        self.history(self.messages)

    def restart_from_memory(self) -> None:
        """Its record is gone from Redis (emptied, or expired): write it all again later."""
        self.lease = None
        self._written = 0
        self._stored, self._rewrite_behind = [], False
        self._images = frozenset()

    def mark_lost(self, why: str) -> None:
        """Stop writing; tell the session (once) so it can hang up."""
        if self.lost:
            return
        self.lost = True
        log.warning("session %s lost here: %s", self.session_id, why)
        if self.on_lost is not None:
            self.on_lost(why)

    def _submit(self, write: PendingWrite) -> bool:
        """Queue a write; False if it must be submitted again later (queue full, not stored)."""
        if self.lost or self.lease is None:
            return False
        try:
            self.persistence.queue.submit(self.lease, write)
        except QueueFullError as error:
            log.warning("session %s: write deferred: %s", self.session_id, error)
            return False
        except ValueError as error:  # never storable (too large): skipped, not retried
            log.warning("session %s: write not stored: %s", self.session_id, error)
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Wait (bounded) until the queued writes are in Redis; False at the deadline."""
        return await done_within(self.persistence.queue.drained(), timeout_s)

    async def release(self) -> None:
        """Hand the session back (drain): the next owner claims it without waiting."""
        if not self.current:
            return
        self.persistence.heartbeat.drop(self.session_id)
        self.persistence.unstored.pop(self.session_id, None)
        if self.lease is None:
            return
        try:
            await self.persistence.store.release(self.lease)
        except StoreError as error:
            log.info("session %s: release failed: %s", self.session_id, error)

    def end(self) -> None:
        """The caller hung up: end the stored session (it cannot be resumed), then ``close``.
        Its queued writes are dropped (the end deletes them anyway); the end is queued, so it
        reaches Redis after an outage too. Never stored (Redis was down throughout): nothing
        to end."""
        if self.lease is not None and not self.lost and self.current:
            self.persistence.queue.discard(self.session_id)
            self.persistence.queue.submit(self.lease, EndSession())
        self.close()

    def close(self) -> None:
        """The session ended here: stop renewing (queued writes still flush)."""
        if not self.current:
            return
        self.persistence.heartbeat.drop(self.session_id)
        self.persistence.journals.pop(self.session_id, None)
        self.persistence.unstored.pop(self.session_id, None)
