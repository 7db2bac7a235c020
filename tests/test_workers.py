"""A transceiver pod of two worker processes behind a real relay, against real processes.

``python -m transceiver --workers 2 --capacity 1``: each worker takes one call, so the second
call lands on the other worker whichever one the kernel hands its connection to (a full worker
passes the offer on). Checked: each worker's call connects through the relay to that worker's
own link socket and hears its echo; ``/readyz`` and ``/metrics`` answer for the pod; a hang-up
sent to the worker that does not own the call reaches the owner; a worker killed with SIGKILL
is restarted and its death counted; SIGTERM to the supervisor drains every worker.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from test_sdp import CHROME_OFFER

from deploy.processes import (
    Process,
    free_port,
    free_port_run,
    metric_values,
    random_keys,
    relay_process,
    text,
    transceiver_process,
)
from deploy.waiting import eventually, poll
from loadtest.tones import ToneClient

TONES_HZ = (523.0, 784.0)
WORKER_LINE = re.compile(r"transceiver worker (\d+) ready .* pid=(\d+) private=(\S+)")


class Pod:
    """A relay and a two-worker transceiver pod on free loopback ports."""

    def __init__(self, log_dir: Path) -> None:
        keys = random_keys()
        public = ("127.0.0.1", free_port())
        first_link = free_port_run(2)
        links = [("127.0.0.1", first_link), ("127.0.0.1", first_link + 1)]
        http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.base_url = f"http://{text(http)}"
        relay_http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.relay = relay_process(text(public), links, keys, relay_http, log_dir, workers=1)
        self.transceiver = transceiver_process(
            "pod", links[0], http, text(public), keys, log_dir,
            workers=2, capacity=1, drain_timeout_s=60, connect_timeout_s=30,
        )  # fmt: skip

    def workers(self) -> dict[int, tuple[int, str]]:
        """Worker index -> (pid, private base URL), from the latest ready line of each."""
        found = {}
        for line in self.transceiver.lines:
            match = WORKER_LINE.match(line)
            if match:
                found[int(match[1])] = (int(match[2]), "http://" + match[3])
        return found

    async def metrics(self, http: httpx.AsyncClient) -> str:
        """The pod's /metrics; empty when the connection met a worker as it was killed."""
        try:
            return (await http.get(self.base_url + "/metrics")).text
        except httpx.TransportError:
            return ""


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[Pod]:
    running = Pod(tmp_path)
    processes: list[Process] = [running.transceiver, running.relay]
    try:
        for process in processes:
            process.start()
        for process in processes:
            await process.ready(60)
        yield running
    finally:
        for process in processes:
            await process.stop()


async def keyed(pod: Pod, http: httpx.AsyncClient) -> None:
    """Every worker takes data from the relay (its first HELLO may precede the bind)."""

    async def relays() -> float:
        return metric_values(await pod.metrics(http), "transceiver_link_keyed_relays").get("", 0)

    await poll(relays, lambda n: n >= 1, 15, lambda _: "a worker never keyed the relay", 0.1)


async def calls_by_worker(pod: Pod, http: httpx.AsyncClient) -> dict[str, float]:
    return metric_values(await pod.metrics(http), "transceiver_worker_sessions")


async def test_a_pod_of_two_workers(pod: Pod) -> None:
    # A new connection per request: the kernel hands each to any worker (SO_REUSEPORT).
    one_shot = httpx.Limits(max_keepalive_connections=0)
    async with AsyncExitStack() as stack, httpx.AsyncClient(timeout=30, limits=one_shot) as http:
        await keyed(pod, http)
        clients = []
        for frequency_hz in TONES_HZ:
            client = ToneClient(frequency_hz)
            stack.push_async_callback(client.close)
            async with httpx.AsyncClient(timeout=30) as fresh:  # a new connection per offer
                assert (await client.offer(fresh, pod.base_url)).status_code == 201
            clients.append(client)
        for client in clients:
            await client.connected(30)
            others = [hz for hz in TONES_HZ if hz != client.frequency_hz]
            await eventually(lambda c=client, o=others: c.hears_own_tone(o), 15, "its echo")
        assert await calls_by_worker(pod, http) == {"0": 1.0, "1": 1.0}
        await pod_is_full(pod, http)
        owners = [int(client.call_url.rsplit("/", 1)[1][4:6], 16) for client in clients]
        assert sorted(owners) == [0, 1]
        await hang_up_through_the_other_worker(pod, http, clients[owners.index(0)])
        await killed_worker_is_restarted(pod, http)
        await sigterm_drains_every_worker(pod, http, clients[owners.index(1)])


async def pod_is_full(pod: Pod, http: httpx.AsyncClient) -> None:
    """Both workers full: the pod's readiness is red, an offer is refused, /metrics sums."""
    ready = await http.get(pod.base_url + "/readyz")
    assert ready.status_code == 503 and ready.json()["workers"] == {"0": "full", "1": "full"}
    refused = await http.post(
        pod.base_url + "/v1/realtime/calls",
        content=CHROME_OFFER,
        headers={"Content-Type": "application/sdp"},
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "transceiver_full"
    text = await pod.metrics(http)
    assert metric_values(text, "transceiver_sessions") == {"": 2.0}
    assert metric_values(text, "transceiver_capacity") == {"": 2.0}
    assert metric_values(text, "transceiver_workers_up") == {"": 2.0}
    assert metric_values(text, "transceiver_load")[""] >= 1.0


async def hang_up_through_the_other_worker(
    pod: Pod, http: httpx.AsyncClient, client: ToneClient
) -> None:
    """Worker 0's call, hung up at worker 1's own port: forwarded, and worker 0 ends it."""
    call_path = client.call_url.removeprefix(pod.base_url)
    other = pod.workers()[1][1]
    assert (await http.delete(other + call_path)).status_code == 204
    assert await calls_by_worker(pod, http) == {"0": 0.0, "1": 1.0}
    again = await http.delete(other + call_path)
    assert again.status_code == 404 and again.json()["error"]["code"] == "call_not_found"
    ready = await http.get(pod.base_url + "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["workers"] == {"0": "ready", "1": "full"}


async def killed_worker_is_restarted(pod: Pod, http: httpx.AsyncClient) -> None:
    """SIGKILL worker 0: it is counted, restarted (a new pid) and takes calls again."""
    pid, _ = pod.workers()[0]
    os.kill(pid, signal.SIGKILL)  # a worker this test's pod started

    async def deaths() -> dict[str, float]:
        return metric_values(await pod.metrics(http), "transceiver_worker_deaths_total")

    await poll(deaths, bool, 15, lambda found: f"no death counted: {found}", 0.1)

    async def restarted() -> bool:
        try:
            ready = await http.get(pod.base_url + "/readyz")
        except httpx.TransportError:
            return False
        return pod.workers()[0][0] != pid and ready.json()["workers"]["0"] == "ready"

    await poll(restarted, bool, 30, lambda _: "worker 0 did not come back", 0.1)
    text = await pod.metrics(http)
    assert metric_values(text, "transceiver_worker_restarts_total") == {"0": 1.0}
    assert 'transceiver_worker_deaths_total{cause="signal_KILL",worker="0"} 1.0' in text


async def sigterm_drains_every_worker(
    pod: Pod, http: httpx.AsyncClient, client: ToneClient
) -> None:
    """SIGTERM to the supervisor: the pod is not ready, the live call goes on, and the pod
    exits 0 once the call has hung up."""
    pod.transceiver.send_signal(signal.SIGTERM)

    async def status() -> int:
        return (await http.get(pod.base_url + "/readyz")).status_code

    await poll(status, lambda code: code == 503, 15, lambda _: "never drained", 0.1)
    heard = client.frames_received
    await eventually(lambda: client.frames_received > heard + 25, 10, "audio while draining")
    assert pod.transceiver.alive()
    assert (await http.delete(client.call_url)).status_code == 204
    assert await pod.transceiver.exited(timeout_s=30) == 0
    assert not any(alive(pid) for pid, _ in pod.workers().values())


def alive(pid: int) -> bool:
    """Whether ``pid`` still exists (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_pod_whose_workers_cannot_start_exits_1(tmp_path: Path) -> None:
    """The HTTP port is held by a socket without SO_REUSEPORT: no worker can bind it, and the
    pod gives up at once (every restart would fail alike) instead of restarting them."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        http = ("127.0.0.1", taken.getsockname()[1])
        link = ("127.0.0.1", free_port_run(2))
        pod = transceiver_process("pod", link, http, "127.0.0.1:3478", random_keys(), tmp_path,
                                  workers=2)  # fmt: skip
        pod.start()
        try:
            assert await pod.exited(timeout_s=40) == 1
        finally:
            await pod.stop()
    assert "cannot bind the HTTP listener" in pod.log_tail()
    assert "before it was ready" in pod.log_tail()
