"""Sessions survive Redis failures in the middle of a live conversation.

Real processes throughout: redis-server (a Sentinel topology, or one server with an append-only
file), a relay, pipeline transceivers and an aiortc Realtime client that asks question after
question while Redis fails under it.

- Sentinel failover: the primary is SIGKILLed between two turns; the conversation goes on
  through the failover; every acknowledged item ends up in the promoted replica, in order; the
  session then resumes on the other transceiver and is answered from the stored history.
- Outage: the only redis-server is SIGKILLed and later restarted on the same port (its AOF
  brings the data back), or SIGSTOPped and later continued; it is away for longer than the
  session's lease. The conversation goes on, ``/readyz`` says "degraded" and stays 200 the
  whole time (a Redis outage must not refuse calls fleet-wide), and once Redis is back the
  turns spoken meanwhile are caught up in order, with the same owner and fencing token. The
  two outages share one redis-server and transceiver (each test its own session).

"Acknowledged": a message the server told the client is part of the conversation: every
``conversation.item.done`` message item the client received (its own text messages, and the
assistant's answers as heard). The stored conversation's messages (the agent's server-side tool
calls and their outputs are never shown to the client, so they are left out) must equal that
list exactly: nothing lost, repeated or reordered; and the stored ids run h1, h2, ... with no
gap. With Sentinel the transceivers write with ``REDIS_WAIT_REPLICAS=1``: a write leaves the
write-behind queue only once a replica has it, so a SIGKILLed primary cannot take an
acknowledged item with it; the topology has two replicas so that ``WAIT 1`` can still be met
once one of them is promoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deploy.processes import Process, Stack
from deploy.redis_server import (
    SERVICE,
    RedisServer,
    SentinelTopology,
    redis_server_binary,
)
from deploy.survival import Survival, pipeline_stack, stored_until, survival_stack
from deploy.waiting import poll, wait_until
from loadtest.realtime_client import RealtimeClient, acknowledged, ask, opened, resume
from relay.wire.redis_config import RedisConfig
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.keys import SessionState
from transceiver.store.survival import SurvivalPolicy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
Event = dict[str, Any]
Conversation = list[tuple[str, str]]

# Questions the offline agent answers from pipeline/data/knowledge.md, and how each answer begins.
ANSWERS = {
    "Tell me about water.": "Water covers",
    "Tell me about coffee.": "Coffee is made",
    "When does the library open?": "The library opens",
    "Tell me about yourself.": "I am voicerelay",
    "Tell me about the sea.": "Water covers",
}
QUESTIONS = list(ANSWERS)
CATCH_UP_TIMEOUT_S = 60.0  # generous: the machine is shared with other work
APPEND_ONLY = ("--appendonly", "yes", "--appendfsync", "always")


# --- what the client was told, what the store holds ---------------------------------------


def conversation(state: SessionState) -> Conversation:
    """(role, text) of the stored messages a client is shown: not the server-side tool calls."""
    return [
        (item["role"], item["content"])
        for item in state.items
        if item["role"] in ("user", "assistant") and item["content"]
    ]


async def stored_when_caught_up(
    survival: Survival, session_id: str, told: Conversation, turns: int, timeout_s: float
) -> SessionState:
    """The stored session once it holds exactly ``told`` and has reached turn ``turns``."""
    try:
        return await stored_until(
            survival,
            session_id,
            lambda state: conversation(state) == told and state.turn == turns,
            timeout_s,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\nacknowledged to the client: {told}") from None


def assert_items_numbered_in_order(state: SessionState) -> None:
    """SessionJournal ids history message n as 'h<n>': no gap, no repeat, no reordering."""
    ids = [item["id"] for item in state.items]
    assert ids == [f"h{n}" for n in range(1, len(ids) + 1)], ids


async def answered(client: RealtimeClient, question: str) -> None:
    answer = await ask(client, question)
    assert answer.startswith(ANSWERS[question]), (question, answer)


@asynccontextmanager
async def answering(client: RealtimeClient, question: str) -> AsyncIterator[asyncio.TaskGroup]:
    """Ask ``question``; the body runs as soon as the response has begun (the turn's items are
    being written behind it); leaving waits for the answer and for tasks the body added."""
    start = len(client.events)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(answered(client, question))
        await client.wait_for("response.created", after=start, timeout_s=60)
        yield tasks


async def recalls(client: RealtimeClient, question: str) -> None:
    """The agent reads the previous question back (as a sentence: "?" becomes ".")."""
    answer = await ask(client, "What did I just ask?")
    assert answer == f"You asked: {question[:-1]}.", answer


# --- process health -------------------------------------------------------------------------


def assert_no_crash(stack: Stack) -> None:
    for process in [stack.relay, *stack.transceivers]:
        assert process.alive(), f"{process.name} exited:\n{process.log_tail()}"
        assert "Traceback" not in process.log_path.read_text(), process.log_tail(80)


def log_since(process: Process, offset: int) -> str:
    return process.log_path.read_text()[offset:]


def log_size(process: Process) -> int:
    return len(process.log_path.read_text())


async def readyz(http: httpx.AsyncClient, base_url: str) -> tuple[int, Event]:
    response = await http.get(base_url + "/readyz")
    return response.status_code, response.json()


async def readyz_until(
    http: httpx.AsyncClient, base_url: str, want: Callable[[int, Event], bool], timeout_s: float
) -> tuple[int, Event]:
    """The first /readyz answer ``want`` accepts, polled with a deadline."""
    return await poll(
        lambda: readyz(http, base_url),
        lambda seen: want(*seen),
        timeout_s,
        lambda seen: f"/readyz never matched; last {seen}",
        interval_s=0.1,
    )


def redis_status(wanted: str) -> Callable[[int, Event], bool]:
    return lambda status, body: status == 200 and body.get("redis") == wanted


# --- what a failure keeps -------------------------------------------------------------------
# Nothing of a CI run's logs is kept: a failed test says in its own report whether the turn
# reached the server, where its answer stopped, and what the transceiver last logged.

DIAGNOSED_EVENTS = 40  # the client's last events shown
DIAGNOSED_LOG_LINES = 150  # each process's last log lines (a blocked loop's stack is ~15)


@asynccontextmanager
async def diagnosed(
    stack: Stack, clients: list[RealtimeClient], redis: list[Path]
) -> AsyncIterator[None]:
    """A failure inside gets a note: each client's transport and last events, each
    transceiver's event counts (what it received and sent), and the log tails of the
    transceivers, the relay and the Redis servers (``redis``: their log files)."""
    try:
        yield
    except Exception as error:
        error.add_note(await diagnosis(stack, clients, redis))
        raise


async def diagnosis(stack: Stack, clients: list[RealtimeClient], redis: list[Path]) -> str:
    parts = [f"--- noted at {datetime.now().isoformat(sep=' ')} (the logs' clock)"]
    for number, client in enumerate(clients, 1):
        parts.append(f"--- client {number}: {transport_state(client)}; its last events:")
        first = max(0, len(client.events) - DIAGNOSED_EVENTS)
        parts += [event_line(i, client.events[i]) for i in range(first, len(client.events))]
    for index, process in enumerate(stack.transceivers):
        parts += [f"--- {process.name}'s events by direction and type:"]
        parts += await event_counts(stack.base_url(index))
    for process in [*stack.transceivers, stack.relay]:
        parts += [f"--- {process.name}'s log tail:", process.log_tail(DIAGNOSED_LOG_LINES)]
    for log in redis:
        tail = log.read_text().splitlines()[-20:] if log.exists() else ["(no log)"]
        parts += [f"--- {log}'s tail:", *tail]
    return "\n".join(parts)


async def event_counts(base_url: str) -> list[str]:
    """The transceiver's ``transceiver_realtime_events_total`` samples: beside the client's
    events they tell a request that never arrived from an answer never sent or never heard."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(base_url + "/metrics")).text
    except httpx.HTTPError as error:
        return [f"(no metrics: {error!r})"]
    return [
        line for line in text.splitlines() if line.startswith("transceiver_realtime_events_total")
    ]


def event_line(index: int, event: Event) -> str:
    """A received event with what tells a stall apart: its response's id and status, its
    item's id and role, an error's code and message."""
    response, item = event.get("response") or {}, event.get("item") or {}
    error = event.get("error") or {}
    fields = {
        "response": response.get("id") or event.get("response_id"),
        "status": response.get("status"),
        "item": item.get("id") or event.get("item_id"),
        "role": item.get("role"),
        "code": error.get("code"),
        "message": error.get("message"),
    }
    shown = " ".join(f"{name}={value}" for name, value in fields.items() if value)
    return f"{index} {event.get('type')} {shown}".rstrip()


def transport_state(client: RealtimeClient) -> str:
    """The peer connection's states; and its SCTP association's retransmission timeout and
    unacknowledged chunks (aiortc's private fields: a stalled data channel shows there)."""
    pc, sctp = client.pc, client.pc.sctp
    state = f"connection {pc.connectionState}, ice {pc.iceConnectionState}"
    state += f", channel {client.channel.readyState}"
    if sctp is not None:
        unacked = len(getattr(sctp, "_sent_queue", ()))
        queued = len(getattr(sctp, "_outbound_queue", ()))
        rto = getattr(sctp, "_rto", "?")
        state += f", sctp {sctp.state} rto {rto} s, {unacked} unacknowledged, {queued} queued"
    return state


# --- Sentinel failover ----------------------------------------------------------------------


@asynccontextmanager
async def sentinel_survival(log_dir: Path) -> AsyncIterator[tuple[SentinelTopology, Survival]]:
    topology = SentinelTopology(log_dir, replicas=2)
    try:
        topology.start()
        await asyncio.to_thread(topology.wait_ready)
        config = RedisConfig(
            sentinels=tuple(("127.0.0.1", s.port) for s in topology.sentinels),
            sentinel_service=SERVICE,
            wait_replicas=1,
            wait_timeout_ms=500,
        )
        async with pipeline_stack(log_dir, config) as (stack, store):
            yield topology, Survival(topology.primary, stack, store)
    finally:
        topology.stop_all()


async def test_a_conversation_goes_on_through_a_sentinel_failover_and_resumes(
    tmp_path: Path,
) -> None:
    async with sentinel_survival(tmp_path) as (topology, survival):
        first, second = RealtimeClient(), RealtimeClient()
        servers = [topology.primary, *topology.replicas]
        try:
            async with (
                httpx.AsyncClient(timeout=30) as http,
                diagnosed(survival.stack, [first, second], [s.log for s in servers]),
            ):
                await failover_conversation(topology, survival, http, first, second)
        finally:
            await first.close()
            await second.close()


async def failover_conversation(
    topology: SentinelTopology,
    survival: Survival,
    http: httpx.AsyncClient,
    first: RealtimeClient,
    second: RealtimeClient,
) -> None:
    """Two turns; one cut by a SIGKILL of the primary; two after the failover; then resume."""
    stack = survival.stack
    session_id, token = await opened(first, http, stack.base_url(0))
    for question in QUESTIONS[:2]:
        await answered(first, question)
    before = await stored_when_caught_up(survival, session_id, acknowledged(first), 2, 30)

    log_offset = log_size(stack.transceivers[0])
    await converse_through_failover(topology, survival, first, session_id)
    state = await stored_when_caught_up(
        survival, session_id, acknowledged(first), len(QUESTIONS), CATCH_UP_TIMEOUT_S
    )
    assert await asyncio.to_thread(topology.primary_port) in {r.port for r in topology.replicas}
    assert_items_numbered_in_order(state)
    assert (state.owner_id, state.token) == (before.owner_id, before.token)
    # Not vacuous: the transceiver did meet the dead primary with writes of this conversation:
    # its turns' (write-behind) or, when the answer came only after the promotion (a slow
    # machine: seen with three test files at once on 2 cores), its lease's renewal
    met = log_since(stack.transceivers[0], log_offset)
    renewal = f"lease heartbeat: {session_id}: renew: Redis unavailable"
    assert "write-behind: " in met or renewal in met, met
    await readyz_until(http, stack.base_url(0), redis_status("ok"), 30)

    await first.close()  # the client moves to the other transceiver, as after a network change
    resumed = await resume(second, http, stack.base_url(1), session_id, token)
    assert resumed.status_code == 201, resumed.text
    await recalls(second, QUESTIONS[-1])  # answered from the history the new primary holds
    replayed = acknowledged(second)  # the resumed client is told the conversation so far
    assert replayed[: len(conversation(state))] == conversation(state)
    final = await stored_when_caught_up(survival, session_id, replayed, len(QUESTIONS) + 1, 30)
    assert_items_numbered_in_order(final)
    assert final.owner_id != state.owner_id and final.token > state.token
    assert_no_crash(stack)


async def converse_through_failover(
    topology: SentinelTopology, survival: Survival, client: RealtimeClient, session_id: str
) -> None:
    """A turn during which the primary is SIGKILLed (its writes meet the failover); two more."""
    old_primary, loop, question = topology.primary.port, asyncio.get_running_loop(), QUESTIONS[2]
    asked = holds(("user", question))
    async with answering(client, question) as tasks:
        topology.primary.stop(signal.SIGKILL)
        killed_at = loop.time()
        promoted = tasks.create_task(asyncio.to_thread(wait_for_promotion, topology, old_primary))
        question_stored = tasks.create_task(seconds_until_stored(survival, session_id, asked))
        turn_stored = tasks.create_task(seconds_until_stored(survival, session_id, reached(3)))
    print(
        f"\nsentinel failover, seconds after the kill: {promoted.result():.2f} a replica promoted;"
        f" {question_stored.result():.2f} the question asked just before it readable there;"
        f" {loop.time() - killed_at:.2f} the answer heard; {turn_stored.result():.2f} the whole"
        " turn stored"
    )
    for question in QUESTIONS[3:]:
        await answered(client, question)


def holds(message: tuple[str, str]) -> Callable[[SessionState], bool]:
    return lambda state: message in conversation(state)


def reached(turn: int) -> Callable[[SessionState], bool]:
    return lambda state: state.turn >= turn


async def seconds_until_stored(
    survival: Survival,
    session_id: str,
    predicate: Callable[[SessionState], bool],
    timeout_s: float = 60.0,
) -> float:
    """Seconds until the stored session matches, read through whichever primary Redis has."""

    async def matches() -> bool:
        with contextlib.suppress(StoreUnavailableError):
            return predicate(await survival.store.load(session_id))
        return False

    loop = asyncio.get_running_loop()
    start = loop.time()
    failure = f"the stored session did not match within {timeout_s} s"
    await poll(matches, bool, timeout_s, lambda _: failure, interval_s=0.05)
    return loop.time() - start


def wait_for_promotion(topology: SentinelTopology, old_primary: int) -> float:
    """Seconds until the sentinels name another primary (blocking: run it in a thread)."""
    return wait_until(lambda: topology.primary_port() != old_primary, 45.0, "a failover")


# --- Redis down and restarted ---------------------------------------------------------------


# How Redis goes away and comes back: SIGKILL then a restart on the same port (connections
# refused meanwhile), or SIGSTOP then SIGCONT (connections hang until the client times out, and
# the commands they left behind run late, when it continues).
OUTAGES: dict[str, tuple[Callable[[RedisServer], object], Callable[[RedisServer], object]]] = {
    "killed-restarted": (lambda redis: redis.stop(signal.SIGKILL), RedisServer.start),
    "stopped-continued": (RedisServer.pause, RedisServer.unpause),
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def outage_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Survival]:
    """One redis-server (append-only) and one transceiver for both outages: each test has its
    own session, and leaves Redis answering again (``redis_answering``)."""
    log_dir = tmp_path_factory.mktemp("outage")
    async with survival_stack(log_dir, transceivers=1, redis_args=APPEND_ONLY) as survival:
        yield survival


@pytest_asyncio.fixture(loop_scope="module")
async def redis_answering(outage_stack: Survival) -> AsyncIterator[Survival]:
    """The shared stack; Redis continued or restarted after the test, however it ended."""
    try:
        yield outage_stack
    finally:
        redis = outage_stack.redis
        if redis.process is not None and redis.process.poll() is None:
            redis.unpause()  # SIGCONT: nothing if it was not stopped
        else:
            redis.start()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("outage", list(OUTAGES))
async def test_a_conversation_goes_on_while_redis_is_down_and_then_catches_up(
    redis_answering: Survival, outage: str
) -> None:
    survival, client = redis_answering, RealtimeClient()
    try:
        async with (
            httpx.AsyncClient(timeout=30) as http,
            diagnosed(survival.stack, [client], [survival.redis.log]),
        ):
            await outage_conversation(survival, http, client, outage)
    finally:
        await client.close()


async def outage_conversation(
    survival: Survival, http: httpx.AsyncClient, client: RealtimeClient, outage: str
) -> None:
    """Two turns; one cut by Redis going away; one more and /readyz checks; Redis back; catch up."""
    go_away, come_back = OUTAGES[outage]
    stack, loop = survival.stack, asyncio.get_running_loop()
    base_url = stack.base_url(0)
    session_id, _ = await opened(client, http, base_url)
    for question in QUESTIONS[:2]:
        await answered(client, question)
    before = await stored_when_caught_up(survival, session_id, acknowledged(client), 2, 30)
    assert redis_status("ok")(*await readyz(http, base_url))

    async with answering(client, QUESTIONS[2]) as tasks:
        go_away(survival.redis)
        gone_at = loop.time()
        degraded = readyz_until(http, base_url, redis_status("degraded"), SurvivalPolicy().lease_s)
        tasks.create_task(degraded)
    await recalls(client, QUESTIONS[2])  # answered from the history Redis has not got yet
    # Down past the lease (it lapses unrenewed) and past the old 10 s grace: /readyz stays 200.
    while loop.time() - gone_at < max(SurvivalPolicy().lease_s, 10.0) + 1:
        assert redis_status("degraded")(*(seen := await readyz(http, base_url))), seen
        await asyncio.sleep(0.2)
    down_s = loop.time() - gone_at

    come_back(survival.redis)  # a restart reloads the append-only file (same port, same dir)
    back_at = loop.time()
    told = acknowledged(client)
    state = await stored_when_caught_up(survival, session_id, told, 4, CATCH_UP_TIMEOUT_S)
    print(
        f"\nredis {outage}: down {down_s:.1f} s; the outage's turns stored "
        f"{loop.time() - back_at:.2f} s after it came back"
    )
    assert_items_numbered_in_order(state)
    assert (state.owner_id, state.token) == (before.owner_id, before.token)  # lease lapse: no loss
    await readyz_until(http, base_url, redis_status("ok"), 30)
    await answered(client, QUESTIONS[3])  # and the session keeps writing after catching up
    await stored_when_caught_up(survival, session_id, acknowledged(client), 5, 30)
    assert_no_crash(stack)
