"""Session survival: each session's record in Redis, written behind its conversation, and its
restore when a client resumes on another transceiver.

I/O layer: the facade a live session talks to, over ``sessions`` (fenced writes),
``write_behind`` (never wait on Redis), ``heartbeat`` (leases), ``journal`` (one session's
writes), ``catch_up`` (sessions begun while Redis was away) and ``health`` (the ping); it also
owns the call-record writer (``call_log``, ``records``). Only used when
``RedisConfig.from_env()`` finds Redis configured.

- A new call: ``create`` stores the session (config, hashed resume credential) and takes the
  first fencing token. Redis down at that moment: the call still runs (a voice session never
  waits for Redis beyond one short timeout) with its resume headers, and ``CatchUp``
  stores it once Redis answers again, then catches its history, config and turn up; until
  then a resume of it is refused as unknown (403).
- While it runs: a ``SessionJournal`` turns the engine's append-only history into stored items
  (user transcripts, assistant text as finally heard, tool calls and outputs), the config on
  every session.update and the turn counter, all through the ``WriteBehindQueue``: a Redis
  outage queues them (bounded) and they are caught up, in order, when it returns.
- Resume: ``resume`` checks the credential (missing: 401, wrong or unknown session: 403), then
  claims the session with force (the client proved it is the session's client; the old owner's
  later writes are refused by the fencing token) and loads config and items.
- Ended: only a hang-up by the caller (``DELETE /v1/realtime/calls/{id}`` or its ``/hangup``
  POST) ends a stored session (``SessionJournal.end``, queued behind its earlier writes); a
  resume of it is then refused with 410. Every other close leaves it resumable: the transceiver
  killed or drained (hand-over), the connection lost or closed by the peer (a client that moves
  to another transceiver closes its old connection exactly so), and a take-over elsewhere.
- Lost: when a renewal or write is refused (another transceiver took the session over, or its
  record is gone) the journal stops writing and calls its ``on_lost`` once; the session hangs up.
  A resume that lands on the transceiver still holding the session's old connection loses that
  connection's journal at once; only the journal of the newest claim (``current``) renews,
  releases, ends or unregisters the session, so the old connection's close or late hang-up
  leaves the live one alone.
- Health: a ping every ``SurvivalPolicy.health_interval_s``. A Redis outage never makes the
  transceiver unready: calls work without Redis (their writes wait in the queue and new sessions are
  caught up), and every transceiver shares the one Redis, so a 503 here would refuse new calls
  across the whole fleet at once, an outage of its own. ``/readyz`` reports it instead
  (``"redis": "degraded"``), as does the gauge ``transceiver_redis_unreachable_seconds``.
  What does turn it red is one of this transceiver's own loops crash-looping (``background``).
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from relay.wire.redis_config import RedisConfig
from transceiver.background import BackgroundLoop, done_within
from transceiver.store.call_log import CallRecordLog
from transceiver.store.catch_up import CatchUp
from transceiver.store.contracts import contract_type, split_contract
from transceiver.store.errors import (
    SessionEndedError,
    SessionExistsError,
    SessionNotFoundError,
    StoreError,
)
from transceiver.store.health import RedisHealth
from transceiver.store.heartbeat import LeaseHeartbeat
from transceiver.store.journal import RESUME_TOKEN_HEADER, SessionJournal
from transceiver.store.keys import Lease, SessionState, check_id, image_ref, new_credential
from transceiver.store.sessions import RedisSessionStore, SessionStore
from transceiver.store.survival import SurvivalPolicy
from transceiver.store.write_behind import WriteBehindQueue

log = logging.getLogger(__name__)


def new_owner_id() -> str:
    """Unique per process incarnation: host name plus a random suffix."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "transceiver"
    return f"{host}-{secrets.token_hex(6)}"


class ResumeRefused(Exception):
    """A resume the transceiver will not do; ``status`` and ``code`` for the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class SessionPersistence:
    """The process-wide store, write-behind queue, lease heartbeat and health check."""

    def __init__(
        self,
        store: RedisSessionStore,
        policy: SurvivalPolicy,
        records: CallRecordLog | None = None,
    ) -> None:
        self.store: SessionStore = store
        self.records = records  # call records (``call_log``), written behind the calls
        self.owner_id = new_owner_id()
        self.lease_s = policy.lease_s
        self.image_budget_bytes = policy.session_image_bytes  # each session's, ``journal``
        self.images_dropped = 0  # images not stored for that budget (metrics)
        self.journals: dict[str, SessionJournal] = {}
        self.unstored: dict[str, SessionJournal] = {}  # began while Redis was down
        restarts, every_s = policy.restarts, policy.health_interval_s
        self.queue = WriteBehindQueue(
            store, max_pending=policy.max_pending_writes, on_dropped=self._lost, restarts=restarts
        )
        self.heartbeat = LeaseHeartbeat(
            store, lease_s=policy.lease_s, on_lost=self._lost, restarts=restarts
        )
        self.health = RedisHealth(store, every_s, restarts)
        self.catch_up = CatchUp(self, every_s, restarts)

    @property
    def loops(self) -> tuple[BackgroundLoop, ...]:
        records = () if self.records is None else (self.records,)
        return (self.queue, self.heartbeat, self.health, self.catch_up, *records)

    def not_ready_reason(self) -> str | None:
        """``task_failing`` while a loop readiness depends on keeps crashing; Redis being
        unreachable is never a reason (see the module docstring)."""
        if any(loop.unready_when_failing and loop.failing for loop in self.loops):
            return "task_failing"
        return None

    def status(self) -> str:
        return "ok" if self.health.down_for_s() == 0.0 and self.queue.healthy else "degraded"

    async def create(self, session_id: str, config: Mapping[str, Any]) -> SessionJournal:
        """A new session's journal; stored now, or by ``CatchUp`` when Redis is back."""
        journal = SessionJournal(self, session_id, new_credential(), None)
        journal.latest_config = config
        self.journals[session_id] = journal
        if not await self.store_new(journal):
            log.warning("session %s: Redis unavailable; stored once it is back", session_id)
            self.unstored[session_id] = journal
        return journal

    async def store_new(self, journal: SessionJournal) -> bool:
        """Create the journal's session in Redis; False while Redis is unreachable."""
        session_id = journal.session_id
        lease: Lease | None
        try:
            try:
                lease = await self.store.create(
                    session_id, self.owner_id, config=journal.latest_config,
                    credential=journal.credential, lease_s=self.lease_s,
                )  # fmt: skip
            except SessionExistsError:
                lease = await self._adopt(session_id)  # an earlier try landed, its reply lost
        except StoreError as error:
            if error.retryable:
                return False
            journal.mark_lost(f"could not be stored ({error})")
            lease = None
        self.unstored.pop(session_id, None)
        if lease is not None and self.journals.get(session_id) is journal:
            self.heartbeat.hold(lease)
            journal.stored(lease)
        return True

    async def _adopt(self, session_id: str) -> Lease:
        """The stored session's lease if this transceiver created it (else it is not ours)."""
        state = await self.store.load(session_id)
        if state.owner_id != self.owner_id:
            raise SessionExistsError(session_id)
        return Lease(session_id, self.owner_id, state.token)

    async def resume(
        self, session_id: str, credential: str | None, contract: str | None = None
    ) -> tuple[SessionJournal, SessionState]:
        """Verify, claim with force, load. ResumeRefused says why not. With ``contract``, a
        session stored with another client contract (``contracts``) is refused (409) before
        it is claimed: its running connection, if any, keeps it."""
        try:
            check_id("session id", session_id)
        except ValueError as exc:
            raise ResumeRefused(400, "invalid_session_id", str(exc)) from None
        if not credential:
            raise ResumeRefused(401, "missing_resume_token", f"{RESUME_TOKEN_HEADER} is required")
        try:
            if not await self.store.verify_credential(session_id, credential):
                raise ResumeRefused(403, "invalid_resume_token", "wrong resume token or session")
            if contract is not None:
                _check_contract(session_id, await self.store.load(session_id), contract)
            lease = await self.store.claim(
                session_id, self.owner_id, lease_s=self.lease_s, force=True
            )
            state = await self.store.load(session_id)
        except SessionEndedError:
            raise ResumeRefused(410, "session_ended", "the session was hung up") from None
        except SessionNotFoundError:  # expired (or ended) since its credential was checked
            raise ResumeRefused(404, "session_not_found", "the session is gone") from None
        except StoreError as error:
            raise ResumeRefused(503, "store_unavailable", str(error)) from None
        if state.images_missing:
            log.warning(
                "session %s resumed without %d of its items' images (not kept: over its budget)",
                session_id, state.images_missing,
            )  # fmt: skip
        journal = SessionJournal(
            self, session_id, credential, lease, stored_messages=len(state.items),
            id_offset=state.first_seq - 1, base_turn=state.turn,
            stored_images=stored_image_refs(state),
        )  # fmt: skip
        journal.latest_config = state.config
        superseded = self.journals.get(session_id)
        if superseded is not None:  # its old connection is still up here
            superseded.mark_lost("resumed on a newer connection here")
        self.journals[session_id] = journal
        self.heartbeat.hold(lease)
        return journal, state

    def _lost(self, lease: Lease, error: StoreError) -> None:
        """A renewal or write under ``lease`` was refused for good (an older lease's refusal
        says nothing about the journal holding a newer one)."""
        journal = self.journals.get(lease.session_id)
        if journal is not None and journal.lease == lease:
            self._refused(journal, error)

    def _refused(self, journal: SessionJournal, error: StoreError) -> None:
        """A renewal or write refused for good. Record gone (Redis came back empty, or it
        expired): nobody else can own the session, so this transceiver stores it again from
        memory. Otherwise another transceiver took it over: the session here is lost."""
        if not isinstance(error, SessionNotFoundError):
            journal.mark_lost(f"taken over elsewhere ({error})")
            return
        log.warning(
            "session %s: its record is gone from Redis; storing it again", journal.session_id
        )
        self.heartbeat.drop(journal.session_id)
        self.queue.discard(journal.session_id)
        journal.restart_from_memory()
        self.unstored[journal.session_id] = journal

    async def start(self) -> None:
        for loop in self.loops:
            loop.start()

    async def aclose(self, flush_timeout_s: float = 2.0) -> None:
        if not await done_within(self.queue.drained(), flush_timeout_s):
            log.warning("%d session writes not stored at exit", self.queue.pending)
        if self.records is not None and not await self.records.drained(flush_timeout_s):
            log.warning("%d call-record writes not stored at exit", self.records.pending)
        records = () if self.records is None else (self.records,)
        for loop in (self.catch_up, self.health, self.heartbeat, self.queue, *records):
            await loop.aclose()


def stored_image_refs(state: SessionState) -> frozenset[str]:
    """The refs of the images a loaded session's items show (those stored)."""
    images = (image for item in state.items for image in item.get("images", ()))
    return frozenset(image_ref(image["image_url"]) for image in images if "image_url" in image)


def _check_contract(session_id: str, state: SessionState, contract: str) -> None:
    try:
        stored = contract_type(split_contract(state.config)[1])
    except ValueError as exc:
        raise ResumeRefused(409, "invalid_stored_session", str(exc)) from None
    if stored != contract:
        message = f"session {session_id!r} is a {stored} session; resume it at its own endpoint"
        raise ResumeRefused(409, "session_contract_mismatch", message)


@asynccontextmanager
async def open_persistence(
    config: RedisConfig | None, policy: SurvivalPolicy
) -> AsyncIterator[SessionPersistence | None]:
    """Persistence when Redis is configured, else ``None`` (sessions live and die here)."""
    if config is None:
        yield None
        return
    async with RedisSessionStore.from_config(config) as store:
        records = CallRecordLog.from_config(config, policy.records, policy.restarts)
        persistence = SessionPersistence(store, policy, records)
        await persistence.start()
        try:
            yield persistence
        finally:
            await persistence.aclose()
