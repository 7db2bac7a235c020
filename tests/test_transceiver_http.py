"""The transceiver's HTTP surface and lifecycle, against a real ``python -m transceiver``.

Media goes through ``LoopbackRelay`` (a header-on/header-off shim in the test process), so a
real aiortc client really connects and hears its echo without a real relay.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_sdp import CHROME_OFFER

from deploy.processes import (
    LoopbackRelay,
    Process,
    free_port,
    metric_values,
    random_keys,
    text,
    transceiver_process,
)
from deploy.waiting import eventually, poll
from loadtest.tones import ToneClient
from transceiver.webrtc.sdp import candidate_addresses

PUBLIC = "127.0.0.1:3478"
CAPACITY_GAUGES = (
    "transceiver_sessions",
    "transceiver_capacity",
    "transceiver_cpu_cores",
    "transceiver_cpu_cores_per_call",
    "transceiver_cpu_budget_cores",
    "transceiver_load",
)


@dataclass
class Running:
    process: Process
    base_url: str
    link: tuple[str, int]


def start(
    tmp_path: Path, public: str, name: str = "transceiver", keys: str = "", **flags: Any
) -> Running:
    link = ("127.0.0.1", free_port())
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    keys = keys or random_keys()
    process = transceiver_process(name, link, http, public, keys, tmp_path, **flags)
    process.start().wait_ready()
    return Running(process, f"http://{text(http)}", link)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = start(tmp_path_factory.mktemp("tx"), PUBLIC)
    yield running
    asyncio.run(running.process.stop())


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    for word in words:
        assert word in error["message"], error["message"]


async def post_offer(
    http: httpx.AsyncClient, base_url: str, body: bytes | str, content_type: str
) -> httpx.Response:
    headers = {"Content-Type": content_type}
    return await http.post(base_url + "/v1/realtime/calls", content=body, headers=headers)


async def test_wrong_content_type_is_415(shared: Running, http: httpx.AsyncClient) -> None:
    response = await post_offer(http, shared.base_url, CHROME_OFFER, "text/plain")
    assert_error(response, 415, "unsupported_media_type", "application/sdp", "'text/plain'")


async def test_oversized_body_is_413(shared: Running, http: httpx.AsyncClient) -> None:
    big = b"v=0\r\n" + b"a=x\r\n" * 14_000
    response = await post_offer(http, shared.base_url, big, "application/sdp")
    assert_error(response, 413, "offer_too_large", "65536")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the stream is counted
        for _ in range(20):
            yield b"a=" + b"x" * 8_000 + b"\r\n"

    response = await http.post(
        shared.base_url + "/v1/realtime/calls",
        content=chunks(),
        headers={"Content-Type": "application/sdp"},
    )
    assert_error(response, 413, "offer_too_large")


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"hello", "invalid_sdp", ("line 1", "'hello'")),
        (b"", "empty_body", ("empty",)),
        (b"v=0\r\n\xff\xfe\r\n", "invalid_encoding", ("UTF-8",)),
        (CHROME_OFFER.replace("m=audio", "m=video").encode(), "no_audio", ("m=audio",)),
        (CHROME_OFFER.replace("a=fingerprint", "a=fpr").encode(), "missing_fingerprint", ()),
    ],
)
async def test_malformed_sdp_is_400(
    shared: Running, http: httpx.AsyncClient, body: bytes, code: str, words: tuple[str, ...]
) -> None:
    response = await post_offer(http, shared.base_url, body, "application/sdp")
    assert_error(response, 400, code, *words)


async def test_offer_aiortc_cannot_negotiate_is_400(
    shared: Running, http: httpx.AsyncClient
) -> None:
    offer = CHROME_OFFER.replace("opus/48000/2", "nocodec/8000")
    offer = offer.replace("111 63 9 0 8", "111")
    response = await post_offer(http, shared.base_url, offer, "application/sdp")
    assert_error(response, 400, "offer_rejected", "OperationError")


async def test_multipart_offer(shared: Running, http: httpx.AsyncClient) -> None:
    url = shared.base_url + "/v1/realtime/calls"
    files = {"sdp": (None, CHROME_OFFER), "session": (None, '{"type": "realtime"}')}
    response = await http.post(url, files=files)
    assert response.status_code == 201, response.text
    assert candidate_addresses(response.text) == [("127.0.0.1", 3478)] * 2
    assert (await http.delete(shared.base_url + response.headers["Location"])).status_code == 204
    response = await http.post(url, files={"session": (None, "{}")})
    assert_error(response, 400, "missing_sdp", "'sdp'")
    response = await http.post(url, files={"sdp": (None, CHROME_OFFER), "session": (None, "[1")})
    assert_error(response, 400, "invalid_session", "not JSON")


async def test_answer_location_and_hangup(shared: Running, http: httpx.AsyncClient) -> None:
    response = await post_offer(http, shared.base_url, CHROME_OFFER, "application/sdp")
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/sdp"
    location = response.headers["Location"]
    assert location.startswith("/v1/realtime/calls/rtc_")
    assert candidate_addresses(response.text) == [("127.0.0.1", 3478)] * 2
    assert (await http.delete(shared.base_url + location)).status_code == 204
    assert_error(await http.delete(shared.base_url + location), 404, "call_not_found")


async def test_unknown_call_and_route_are_404(shared: Running, http: httpx.AsyncClient) -> None:
    response = await http.delete(shared.base_url + "/v1/realtime/calls/rtc_nope")
    assert_error(response, 404, "call_not_found", "rtc_nope")
    assert_error(await http.get(shared.base_url + "/v2/nothing"), 404, "not_found")


async def test_health_and_metrics(shared: Running, http: httpx.AsyncClient) -> None:
    assert (await http.get(shared.base_url + "/livez")).json() == {"status": "live"}
    ready = await http.get(shared.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = (await http.get(shared.base_url + "/metrics")).text
    assert "transceiver_sessions " in metrics and "transceiver_link_sessions" in metrics


async def test_capacity_media_and_garbage_on_the_link(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """--capacity 1: one real session echoes its tone; a second offer gets 503 + Retry-After."""
    keys = random_keys()
    shim = LoopbackRelay(("127.0.0.1", 0), keys)
    public = await shim.start()
    running = start(tmp_path, text(public), keys=keys, capacity=1)
    shim.transceiver = running.link
    client = ToneClient(523.0)
    try:
        assert (await client.offer(http, running.base_url)).status_code == 201
        await client.connected()
        await eventually(lambda: client.hears_own_tone([]), 10, "the echoed tone")
        second = await post_offer(http, running.base_url, CHROME_OFFER, "application/sdp")
        assert_error(second, 503, "transceiver_full")
        assert int(second.headers["Retry-After"]) > 0
        assert_error(await http.get(running.base_url + "/readyz"), 503, "full")
        await send_garbage(running.link)
        heard = client.frames_received
        await eventually(lambda: client.frames_received > heard + 25, 5, "audio after garbage")
        assert client.hears_own_tone([])
        metrics = (await http.get(running.base_url + "/metrics")).text
        assert 'transceiver_link_events_total{kind="drop_header"} 3.0' in metrics
        assert 'transceiver_link_refused_total{reason="unkeyed_source"} 1.0' in metrics
        assert (await http.delete(client.call_url)).status_code == 204
        assert (await http.get(running.base_url + "/readyz")).status_code == 200
    finally:
        await client.close()
        shim.close()
        await running.process.stop()


async def send_garbage(link: tuple[str, int]) -> None:
    """Short, wrong-version, unknown-client and bad-control datagrams to the link socket, from
    an address that sent no keyed HELLO."""
    from relay.wire.header import FLAG_CONTROL, header_for

    datagrams = [b"", b"\x01\x00", b"\x09" + b"\x00" * 40]  # three header drops
    datagrams += [header_for(("198.51.100.1", 9)) + b"\x17\xfe\xfd" + b"\x00" * 30]
    datagrams += [header_for(("0.0.0.0", 0), FLAG_CONTROL) + b"\x07"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            sock.sendto(datagram, link)


async def test_connect_timeout_frees_capacity(tmp_path: Path, http: httpx.AsyncClient) -> None:
    running = start(tmp_path, PUBLIC, capacity=1, connect_timeout_s=1)
    try:
        response = await post_offer(http, running.base_url, CHROME_OFFER, "application/sdp")
        assert response.status_code == 201
        assert (await http.get(running.base_url + "/readyz")).status_code == 503

        async def ready() -> bool:
            return (await http.get(running.base_url + "/readyz")).status_code == 200

        failure = "a session that never connected was not closed"
        await poll(ready, bool, 5, lambda _: failure, 0.05)
        metrics = (await http.get(running.base_url + "/metrics")).text
        assert 'transceiver_sessions_ended_total{reason="connect_timeout"} 1.0' in metrics
    finally:
        await running.process.stop()


async def test_measured_cpu_refuses_a_call_over_the_budget(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A budget of 0.0001 cores: the first call is taken (no cost measured yet); once its cost
    is measured, the next offer gets 503 transceiver_overloaded and /readyz is red although the
    fixed capacity has room. /metrics shows the measurement and a load of 1 or more."""
    flags = {"capacity": 5, "connect_timeout_s": 60, "cpu_budget_cores": 0.0001}
    running = start(tmp_path, PUBLIC, cpu_window_s=2, **flags)
    try:
        first = await post_offer(http, running.base_url, CHROME_OFFER, "application/sdp")
        assert first.status_code == 201, first.text
        ready_url = running.base_url + "/readyz"
        never = "the measured cost never refused a call"
        await poll(lambda: http.get(ready_url), lambda r: r.status_code == 503, 20, lambda _: never)
        assert_error(await http.get(running.base_url + "/readyz"), 503, "overloaded", "budget")
        second = await post_offer(http, running.base_url, CHROME_OFFER, "application/sdp")
        assert_error(second, 503, "transceiver_overloaded", "cores per call", "2 calls")
        text = (await http.get(running.base_url + "/metrics")).text
        value = {name: metric_values(text, name).get("") for name in CAPACITY_GAUGES}
        assert (value["transceiver_sessions"], value["transceiver_capacity"]) == (1, 5)
        assert value["transceiver_cpu_budget_cores"] == 0.0001
        cores, per_call = value["transceiver_cpu_cores"], value["transceiver_cpu_cores_per_call"]
        assert cores is not None and per_call is not None and per_call >= cores > 0
        assert value["transceiver_load"] is not None and value["transceiver_load"] >= 1
        assert (await http.delete(running.base_url + first.headers["Location"])).status_code == 204
        await eventually_status(http, running.base_url + "/readyz", 200)  # no call: no cost
    finally:
        await running.process.stop()


async def test_sigterm_drains_then_exits(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """SIGTERM: readyz 503 and no new calls while the live call goes on; exit once it ends."""
    keys = random_keys()
    shim = LoopbackRelay(("127.0.0.1", 0), keys)
    public = await shim.start()
    running = start(tmp_path, text(public), keys=keys, drain_timeout_s=60)
    shim.transceiver = running.link
    client = ToneClient(659.0)
    try:
        assert (await client.offer(http, running.base_url)).status_code == 201
        await client.connected()
        running.process.send_signal(signal.SIGTERM)
        await eventually_status(http, running.base_url + "/readyz", 503)
        refused = await post_offer(http, running.base_url, CHROME_OFFER, "application/sdp")
        assert_error(refused, 503, "transceiver_draining")
        heard = client.frames_received
        await eventually(lambda: client.frames_received > heard + 25, 5, "audio while draining")
        assert running.process.alive()
        assert (await http.delete(client.call_url)).status_code == 204
        assert await running.process.exited(timeout_s=10) == 0
    finally:
        await client.close()
        shim.close()
        await running.process.stop()


async def eventually_status(http: httpx.AsyncClient, url: str, status: int) -> None:
    await poll(
        lambda: http.get(url),
        lambda response: response.status_code == status,
        5,
        lambda _: f"{url} never answered {status}",
        0.05,
    )
