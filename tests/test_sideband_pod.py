"""A sideband that reaches the wrong worker of a pod goes on to the worker running its session.

Real processes: redis-server, a relay and a transceiver pod of two pipeline workers
(``--workers 2``, offline providers, the API key required). Every worker takes requests on the
pod's public port, and on a private loopback port of its own, which the test uses to pick the
worker a sideband reaches. A Realtime call's id names its worker; a Live session's worker is in
its directory record. Each sideband, sent to the other worker, is forwarded within the pod
(``transceiver.http.sideband``) and drives its session; so is one that arrives as a hop between
transceivers; a hop already within the pod is never forwarded again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
import websockets
from aiortc import RTCSessionDescription
from redis.asyncio import Redis

from deploy.processes import (
    free_port,
    free_port_run,
    metric_values,
    random_keys,
    random_secret_keys,
    relay_process,
    text,
    transceiver_process,
)
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.survival import redis_env
from deploy.waiting import poll
from loadtest.realtime_client import SESSION_HEADER, TOKEN_HEADER, RealtimeClient
from relay.wire.redis_config import RedisConfig
from relay.wire.ufrag import Keyring
from transceiver.http.hop_signature import HOP_HEADER, HopKeys
from transceiver.store.sideband_directory import locate_owner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "test-pod-sideband-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WORKER_LINE = re.compile(r"transceiver worker (\d+) ready .* pid=(\d+) private=(\S+)")
CONNECT_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0
LINGER_S = 60.0  # a call whose session was taken over hangs up this long after its notice
FORWARD_TIMEOUT_S = 5.0  # a hang-up forwarded to a stopped worker is 503 after this (default 10)


@dataclass
class Pod:
    base_url: str
    private_urls: dict[int, str]  # worker index -> its private base URL
    redis: RedisServer
    hops: HopKeys
    pids: dict[int, int] = field(default_factory=dict)  # worker index -> its process id


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pod(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pod]:
    log_dir = tmp_path_factory.mktemp("sideband-pod")
    redis = RedisServer(log_dir, "redis").start()
    keys, secret_keys = random_keys(), random_secret_keys()
    public = ("127.0.0.1", free_port())
    first_link = free_port_run(2)
    links = [("127.0.0.1", first_link), ("127.0.0.1", first_link + 1)]
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    relay_http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    relay = relay_process(text(public), links, keys, relay_http, log_dir, workers=1)
    env = {**redis_env(RedisConfig(url=redis.url)), "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
    env |= {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": secret_keys}
    env["TRANSCEIVER_REALTIME_LOST_NOTICE_S"] = str(LINGER_S)  # a taken-over call lingers
    env["TRANSCEIVER_FORWARD_TIMEOUT_S"] = str(FORWARD_TIMEOUT_S)
    transceiver = transceiver_process(
        "pod", links[0], http, text(public), keys, log_dir, env,
        agent="pipeline", auth="required", workers=2, capacity=2,
    )  # fmt: skip
    try:
        for process in (transceiver, relay):
            process.start()
        await transceiver.ready(timeout_s=120)  # two workers load their models
        await relay.ready()
        running = Pod(f"http://{text(http)}", {}, redis, HopKeys(Keyring.parse(secret_keys)))
        for line in transceiver.lines:
            if match := WORKER_LINE.match(line):
                running.private_urls[int(match[1])] = "http://" + match[3]
                running.pids[int(match[1])] = int(match[2])
        assert sorted(running.private_urls) == [0, 1], transceiver.lines
        await keyed(running)
        yield running
    finally:
        for process in (relay, transceiver):
            await process.stop()
        redis.stop()
    assert "Traceback" not in (log_dir / "pod.log").read_text()


async def keyed(pod: Pod) -> None:
    """Every worker takes data from the relay (a first HELLO may precede a worker's bind)."""
    async with httpx.AsyncClient(timeout=10) as http:

        async def relays() -> list[float]:
            found = []
            for url in pod.private_urls.values():
                metrics = (await http.get(url + "/metrics")).text
                found.append(metric_values(metrics, "transceiver_link_keyed_relays").get("", 0))
            return found

        await poll(relays, lambda n: min(n) >= 1, 15, lambda _: "a worker never keyed", 0.1)


def sdk(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=API_KEY, base_url=base_url + "/v1", max_retries=0)


async def realtime_call(pod: Pod, peer: RealtimeClient) -> str:
    """A Realtime call from ``peer`` on the pod's public port; its id once it began."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    offer = peer.pc.localDescription.sdp
    headers = {"Content-Type": "application/sdp", **AUTH}
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            pod.base_url + "/v1/realtime/calls", content=offer, headers=headers
        )
    assert created.status_code == 201, created.text
    await peer.pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
    await peer.wait_for("session.created", timeout_s=CONNECT_TIMEOUT_S)
    return str(created.headers["Location"]).rsplit("/", 1)[1]


async def live_call(pod: Pod, peer: RealtimeClient) -> str:
    """A GPT-Live session from ``peer`` on the pod's public port; its id once it started."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    transport = {"type": "webrtc", "sdp": peer.pc.localDescription.sdp}
    answer = await sdk(pod.base_url).live.create(
        session={"model": "gpt-live-1"}, transport=transport
    )
    await peer.pc.setRemoteDescription(RTCSessionDescription(answer.transport.sdp, "answer"))
    await peer.wait_for("session.started", timeout_s=CONNECT_TIMEOUT_S)
    return answer.session.id


async def next_event(connection: Any, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            event: dict[str, Any] = json.loads(await connection.recv_bytes())
            if event["type"] == kind:
                return event


async def test_a_realtime_sideband_on_the_other_worker_reaches_the_call(
    pod: Pod, peer: RealtimeClient
) -> None:
    call_id = await realtime_call(pod, peer)
    owner = int(call_id[4:6], 16)  # the call id names its worker
    other = pod.private_urls[1 - owner]
    async with sdk(other).realtime.connect(call_id=call_id) as connection:
        await connection.session.update(session={"type": "realtime", "instructions": "Hi."})
        updated = await next_event(connection, "session.updated")
        assert updated["session"]["instructions"] == "Hi."
    await peer.wait_for("session.updated")  # the call's client is told: the same session
    between = pod.hops.sign(f"realtime:{call_id}", AUTH["Authorization"], time.time())
    async with sdk(other).realtime.connect(
        call_id=call_id, extra_headers={HOP_HEADER: between}
    ) as connection:  # a hop from another transceiver that reached the wrong worker
        await connection.session.update(session={"type": "realtime", "instructions": "Again."})
        assert (await next_event(connection, "session.updated"))["session"]["instructions"]
    within = pod.hops.sign(f"realtime:{call_id}:pod", AUTH["Authorization"], time.time())
    with pytest.raises(websockets.InvalidStatus) as refused:  # within the pod already: no further
        async with sdk(other).realtime.connect(call_id=call_id, extra_headers={HOP_HEADER: within}):
            pass
    assert refused.value.response.status_code == 404


async def test_a_live_sideband_on_the_other_worker_reaches_the_session(
    pod: Pod, peer: RealtimeClient
) -> None:
    session_id = await live_call(pod, peer)
    client = Redis.from_url(pod.redis.url)
    try:
        prefix = RedisConfig(url=pod.redis.url).key_prefix
        owner = await poll(
            lambda: locate_owner(client, prefix, session_id),
            lambda o: o is not None,
            10,
            repr,
            0.02,
        )
    finally:
        await client.aclose()
    assert owner is not None and owner.worker in (0, 1), owner
    other = pod.private_urls[1 - owner.worker]
    async with sdk(other).live.sideband.connect(session_id=session_id) as connection:
        await connection.session.instructions.append(content="Hi.", delegation_id=None)
        await next_event(connection, "session.instructions.appended")
    await peer.wait_for("session.instructions.appended")  # the session's client saw it too


async def answered(
    url: str, peer: RealtimeClient, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A Realtime call from ``peer`` offered at ``url`` (a worker's private URL picks the
    worker; ``headers``: a resume's), once its session began."""
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    asked = {"Content-Type": "application/sdp", **AUTH, **(headers or {})}
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            url + "/v1/realtime/calls", content=peer.pc.localDescription.sdp, headers=asked
        )
    assert created.status_code == 201, created.text
    await peer.pc.setRemoteDescription(RTCSessionDescription(created.text, "answer"))
    await peer.wait_for("session.created", timeout_s=CONNECT_TIMEOUT_S)
    return created


async def run_by(pod: Pod, call_id: str, worker: int) -> None:
    """Until the directory leads from ``call_id`` to ``worker`` (the session's lease moved)."""
    client = Redis.from_url(pod.redis.url)
    prefix = RedisConfig(url=pod.redis.url).key_prefix
    try:
        await poll(
            lambda: locate_owner(client, prefix, call_id),
            lambda o: o is not None and o.worker == worker,
            10,
            repr,
            0.02,
        )
    finally:
        await client.aclose()


async def sideband_drives(base_url: str, call_id: str, instructions: str) -> None:
    """A sideband on ``call_id`` through ``base_url`` updates its session's instructions."""
    async with sdk(base_url).realtime.connect(call_id=call_id) as side:
        await side.session.update(session={"type": "realtime", "instructions": instructions})
        updated = await next_event(side, "session.updated")
        assert updated["session"]["instructions"] == instructions, updated


async def resumed_on_the_other_worker(
    pod: Pod, first_peer: RealtimeClient, resumed: RealtimeClient
) -> tuple[str, str, int]:
    """A call on one worker (``first_peer``), resumed by a new call on the other (``resumed``):
    once the first is told its session was taken over and the directory leads from its id to
    the other worker, the first call's id, the second's, and the worker the first id names."""
    first = await answered(pod.base_url, first_peer)
    first_id = first.headers["Location"].rsplit("/", 1)[1]
    named = int(first_id[4:6], 16)  # the worker the first call's id names
    resume = {name: first.headers[name] for name in (SESSION_HEADER, TOKEN_HEADER)}
    second = await answered(pod.private_urls[1 - named], resumed, resume)
    second_id = second.headers["Location"].rsplit("/", 1)[1]
    assert int(second_id[4:6], 16) == 1 - named, (first_id, second_id)
    await first_peer.wait_for("error", lambda e: e["error"]["code"] == "session_taken_over")
    await run_by(pod, first_id, 1 - named)
    return first_id, second_id, named


async def test_an_earlier_call_s_id_reaches_its_session_resumed_on_the_other_worker(
    pod: Pod,
) -> None:
    """A call on one worker, resumed by a new call on the other: a sideband naming the first
    call's id reaches the session through either worker (the one the id names forwards it) while
    the first call lingers, its session taken over (``LINGER_S``): no sideband stops at it. A
    hang-up naming the lingering call ends it alone (its own client's late hang-up), and the
    resumed call, still running, is hung up through the worker the first id names."""
    first_peer, resumed = RealtimeClient(), RealtimeClient()
    try:
        first_id, second_id, named = await resumed_on_the_other_worker(pod, first_peer, resumed)
        for worker in (named, 1 - named):
            said = f"Hi from {worker}."
            await sideband_drives(pod.private_urls[worker], first_id, said)
            told = lambda e, said=said: e["session"]["instructions"] == said  # noqa: E731
            try:
                await resumed.wait_for("session.updated", told)  # its client is told: one session
            except TimeoutError:
                raise AssertionError(f"through worker {worker}: not the resumed session") from None
        assert first_peer.pc.connectionState == "connected"  # all the while the first lingered
        async with httpx.AsyncClient(timeout=30) as http:
            url = pod.private_urls[named] + "/v1/realtime/calls/"
            own = await http.delete(url + first_id, headers=AUTH)  # the lingering call's client
            hung_up = await http.delete(url + second_id, headers=AUTH)  # forwarded to its worker
            gone = await http.delete(url + second_id, headers=AUTH)
        assert own.status_code == 204, own.text  # the lingering call alone ended...
        assert hung_up.status_code == 204, hung_up.text  # ...the resumed one still ran
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "call_not_found")
    finally:
        await first_peer.close()
        await resumed.close()


async def test_the_lingering_calls_hang_up_on_the_resumed_calls_worker_ends_it_alone(
    pod: Pod,
) -> None:
    """A call on one worker, resumed by a new call on the other: the first call's client's late
    hang-up, landing on the resumed call's worker (the pod's port spreads connections over the
    workers) while the first call lingers, ends the first call alone; the resumed call goes on
    (a sideband still drives it). Once the first call is gone, a hang-up naming it there ends
    the resumed call."""
    first_peer, resumed = RealtimeClient(), RealtimeClient()
    try:
        first_id, second_id, named = await resumed_on_the_other_worker(pod, first_peer, resumed)
        url = pod.private_urls[1 - named] + "/v1/realtime/calls/"
        async with httpx.AsyncClient(timeout=30) as http:
            late = await http.delete(url + first_id, headers=AUTH)  # the lingering call's client
        assert late.status_code == 204, late.text
        await sideband_drives(pod.private_urls[1 - named], second_id, "Still.")
        async with httpx.AsyncClient(timeout=30) as http:
            resumed_ended = await http.delete(url + first_id, headers=AUTH)
            gone = await http.delete(url + second_id, headers=AUTH)
        assert resumed_ended.status_code == 204, resumed_ended.text
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "call_not_found")
    finally:
        await first_peer.close()
        await resumed.close()


async def test_a_hang_up_whose_named_worker_does_not_answer_ends_no_call(pod: Pod) -> None:
    """A call on one worker, resumed by a new call on the other, the first lingering: while the
    worker the first call's id names does not answer (stopped), a hang-up naming the first call
    on the resumed call's worker is 503 ``worker_unavailable`` naming that worker, and ends no
    call (the resumed call is not the one the id names, which may still linger there). Once
    both calls are gone, a hang-up naming the first is 404 (its worker asked once)."""
    first_peer, resumed = RealtimeClient(), RealtimeClient()
    try:
        first_id, second_id, named = await resumed_on_the_other_worker(pod, first_peer, resumed)
        url = pod.private_urls[1 - named] + "/v1/realtime/calls/"
        os.kill(pod.pids[named], signal.SIGSTOP)  # a worker this test's pod started
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                late = await http.delete(url + first_id, headers=AUTH)
        finally:
            os.kill(pod.pids[named], signal.SIGCONT)
        assert late.status_code == 503, late.text
        error = late.json()["error"]
        assert error["code"] == "worker_unavailable", error
        assert error["message"].startswith(f"worker {named} of this transceiver"), error
        await sideband_drives(pod.private_urls[1 - named], second_id, "On.")
        async with httpx.AsyncClient(timeout=30) as http:
            ended = await http.delete(url + second_id, headers=AUTH)
            first_gone = await http.delete(
                pod.private_urls[named] + "/v1/realtime/calls/" + first_id, headers=AUTH
            )
            gone = await http.delete(url + first_id, headers=AUTH)
        assert ended.status_code == 204, ended.text
        assert first_gone.status_code in (204, 404), first_gone.text  # lingering, or ended since
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "call_not_found")
    finally:
        await first_peer.close()
        await resumed.close()
