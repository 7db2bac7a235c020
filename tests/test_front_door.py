"""The local stack's front door against real uvicorn backends on loopback.

Each backend is a small FastAPI app that reports what it received and counts its hits; one can
be "busy" (503 to offers and WebSockets, as a full or draining transceiver is); its ``/ws``
WebSocket echoes what it gets. A dead backend is a loopback port nobody listens on. The front
door runs in-process for most tests and as the real ``python -m deploy.front_door`` process for
its lifecycle. Malformed requests go over a raw socket, so the parser sees exactly the bytes
under test. The WebSocket tests at the end drive a real transceiver process (the fake OpenAI
server its models) through the front door with the official ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketDisconnect
from websocket_harness import EventLog, ask_in_text, openai_client, transceiver_process_with
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from deploy.fake_openai import FakeOpenAIServer
from deploy.front_door import READY_LINE, BackendRing, FrontDoor, FrontDoorConfig
from deploy.http_wire import HttpError, body_length, parse_head
from deploy.waiting import eventually
from deploy.websocket_wire import (
    HandshakeError,
    UpstreamError,
    check_handshake,
    parse_response_head,
    request_version,
    sideband_call_id,
    upstream_handshake,
    websocket_requested,
)

ROOT = Path(__file__).resolve().parents[1]
CALLS = "/v1/realtime/calls"
START_TIMEOUT_S = 15.0
MAX_ECHOES = 1000


# --- backends ----------------------------------------------------------------------------------


class Backend:
    """A transceiver-shaped app: offers make calls (or 503 when busy), calls can be hung up."""

    def __init__(self, name: str, busy: bool = False) -> None:
        self.name, self.busy = name, busy
        self.hits: list[str] = []
        self.calls: set[str] = set()
        self.app = FastAPI()
        self.app.add_api_route("/echo", self.echo, methods=["GET", "POST", "PUT", "DELETE"])
        self.app.add_api_route("/who", self.who, methods=["GET", "HEAD"])
        self.app.add_api_route("/slow", self.slow, methods=["GET"])
        self.app.add_api_route(CALLS, self.offer, methods=["POST"])
        self.app.add_api_route(CALLS + "/{call_id}", self.hangup, methods=["DELETE"])
        self.app.add_api_websocket_route("/ws", self.websocket)
        self.app.add_api_websocket_route("/v1/realtime", self.websocket)  # sidebands
        self.handshakes: list[dict[str, str]] = []
        self.targets: list[str] = []  # the query of each WebSocket

    async def echo(self, request: Request) -> Response:
        self.hits.append("echo")
        seen = {
            "backend": self.name,
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body_b64": base64.b64encode(await request.body()).decode(),
        }
        headers = {
            "Location": "/somewhere/else",
            "X-Voicerelay-Session": "sess_echo",
            "X-Voicerelay-Resume-Token": "tok_echo",
            "Retry-After": "4",
            "Retry-After-Ms": "3500",
            "X-RateLimit-Remaining-Requests": "7",
            "X-Internal-Detail": "must not leak",
            "Set-Cookie": "a=b",
        }
        return JSONResponse(seen, status_code=207, headers=headers)

    async def who(self) -> dict[str, str]:
        self.hits.append("who")
        return {"backend": self.name}

    async def slow(self) -> dict[str, str]:
        self.hits.append("slow")
        await asyncio.sleep(1.5)
        return {"backend": self.name}

    async def offer(self, request: Request) -> Response:
        self.hits.append("offer")
        if self.busy:
            body = {"error": {"code": "transceiver_full", "message": "full"}}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "3"})
        call_id = f"rtc_{self.name}_{len(self.calls)}"
        self.calls.add(call_id)
        headers = {"Location": f"{CALLS}/{call_id}", "X-Voicerelay-Session": f"sess_{self.name}"}
        return Response(b"v=0 answer from " + self.name.encode(), 201, headers, "application/sdp")

    async def websocket(self, websocket: WebSocket) -> None:
        """Echo each message back; ``?refuse=404`` (or being busy: 503) refuses the upgrade."""
        self.hits.append("ws")
        self.handshakes.append(dict(websocket.headers))
        self.targets.append(websocket.url.query)
        refuse = 503 if self.busy else int(websocket.query_params.get("refuse", "0"))
        if refuse:
            body = {"error": {"code": f"refused_{refuse}", "message": "no"}}
            denial = JSONResponse(body, status_code=refuse, headers={"Retry-After": "3"})
            await websocket.send_denial_response(denial)
            return
        offered = websocket.scope["subprotocols"]
        await websocket.accept(subprotocol=offered[0] if offered else None)
        with contextlib.suppress(WebSocketDisconnect):
            for _ in range(MAX_ECHOES):
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                else:
                    await websocket.send_bytes(message["bytes"])

    async def hangup(self, call_id: str) -> Response:
        self.hits.append("hangup")
        if call_id not in self.calls:
            return JSONResponse({"error": {"code": "call_not_found"}}, status_code=404)
        self.calls.discard(call_id)
        return Response(status_code=204)


class _Server(uvicorn.Server):
    """uvicorn in the test's loop, leaving the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(backend: Backend) -> AsyncIterator[str]:
    """The backend on a free loopback port; yields its ``host:port``."""
    config = uvicorn.Config(backend.app, host="127.0.0.1", port=0, log_level="warning")
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), START_TIMEOUT_S, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, START_TIMEOUT_S)


def dead_address() -> str:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def front_door(backends: list[str], **settings: Any) -> AsyncIterator[FrontDoor]:
    door = FrontDoor(FrontDoorConfig("127.0.0.1", 0, tuple(backends), **settings))
    await door.start()
    try:
        yield door
    finally:
        await door.aclose()


def base_url(door: FrontDoor) -> str:
    return f"http://127.0.0.1:{door.port}"


@contextlib.asynccontextmanager
async def two_backends(*, busy: bool = False) -> AsyncIterator[tuple[Backend, Backend, FrontDoor]]:
    a, b = Backend("a", busy=busy), Backend("b")
    async with serving(a) as at_a, serving(b) as at_b, front_door([at_a, at_b]) as door:
        yield a, b, door


async def raw_answer(door: FrontDoor, data: bytes, head_only: bool = False) -> bytes:
    """Send ``data`` as is; the answer, read until close (or only its head)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await (reader.readuntil(b"\r\n\r\n") if head_only else reader.read())
    finally:
        writer.close()
        await writer.wait_closed()


async def raw_exchange(door: FrontDoor, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``data`` as is; the status and JSON body of the answer (read until close)."""
    answer = await raw_answer(door, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return int(head.split(b" ")[1]), json.loads(body)


# --- forwarding --------------------------------------------------------------------------------


async def test_method_path_query_body_and_relevant_headers_pass_both_ways() -> None:
    async with two_backends() as (_, _, door), httpx.AsyncClient() as http:
        response = await http.put(
            base_url(door) + "/echo?session_id=sess_1&x=%20y",
            content=b"\x00binary\xffbody",
            headers={
                "Content-Type": "application/sdp",
                "Authorization": "Bearer ek_abc",
                "X-Voicerelay-Resume-Token": "tok_1",
                "X-Unlisted": "dropped",
                "Cookie": "c=d",
            },
        )
    assert response.status_code == 207, response.text
    seen = response.json()
    assert (seen["method"], seen["path"]) == ("PUT", "/echo")
    assert seen["query"] == "session_id=sess_1&x=%20y"
    assert base64.b64decode(seen["body_b64"]) == b"\x00binary\xffbody"
    sent = seen["headers"]
    assert sent["content-type"] == "application/sdp"
    assert sent["authorization"] == "Bearer ek_abc"
    assert sent["x-voicerelay-resume-token"] == "tok_1"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-host"] == f"127.0.0.1:{door.port}"
    assert "x-unlisted" not in sent and "cookie" not in sent
    assert response.headers["location"] == "/somewhere/else"
    assert response.headers["x-voicerelay-session"] == "sess_echo"
    assert response.headers["x-voicerelay-resume-token"] == "tok_echo"
    assert response.headers["retry-after"] == "4"
    assert response.headers["retry-after-ms"] == "3500"  # a transceiver's rate limits
    assert response.headers["x-ratelimit-remaining-requests"] == "7"
    assert response.headers["content-type"] == "application/json"
    assert "x-internal-detail" not in response.headers and "set-cookie" not in response.headers


async def test_backends_take_turns() -> None:
    async with two_backends() as (_, _, door), httpx.AsyncClient() as http:
        names = [(await http.get(base_url(door) + "/who")).json()["backend"] for _ in range(4)]
    assert names in (["a", "b", "a", "b"], ["b", "a", "b", "a"]), names


async def test_head_gets_the_status_and_headers_without_a_body() -> None:
    async with two_backends() as (_, _, door), httpx.AsyncClient() as http:
        response = await http.head(base_url(door) + "/who")
    assert response.status_code == 200
    assert response.content == b""


async def test_a_dead_backend_is_skipped() -> None:
    alive = Backend("alive")
    async with (
        serving(alive) as at_alive,
        front_door([dead_address(), at_alive]) as door,
        httpx.AsyncClient() as http,
    ):
        answers = [await http.get(base_url(door) + "/who") for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.json()["backend"] for r in answers} == {"alive"}
    assert alive.hits == ["who"] * 4


async def test_no_reachable_backend_is_a_json_502() -> None:
    async with front_door([dead_address(), dead_address()]) as door, httpx.AsyncClient() as http:
        response = await http.post(base_url(door) + CALLS, content=b"v=0")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "no_backend"
    assert response.json()["error"]["type"] == "server_error"


async def test_503_is_retried_on_the_next_backend() -> None:
    async with two_backends(busy=True) as (busy, ok, door), httpx.AsyncClient() as http:
        answers = [await http.post(base_url(door) + CALLS, content=b"v=0") for _ in range(2)]
    assert [r.status_code for r in answers] == [201, 201]
    assert {r.content for r in answers} == {b"v=0 answer from b"}
    assert busy.hits == ["offer"]  # asked once (its turn came once), passed over
    assert ok.hits == ["offer", "offer"]


async def test_when_every_backend_is_busy_the_503_and_retry_after_come_through() -> None:
    a, b = Backend("a", busy=True), Backend("b", busy=True)
    async with (
        serving(a) as at_a,
        serving(b) as at_b,
        front_door([at_a, at_b]) as door,
        httpx.AsyncClient() as http,
    ):
        response = await http.post(base_url(door) + CALLS, content=b"v=0")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "transceiver_full"
    assert a.hits == b.hits == ["offer"]


async def test_hang_up_reaches_the_backend_that_owns_the_call() -> None:
    async with two_backends() as (a, b, door), httpx.AsyncClient() as http:
        created = [await http.post(base_url(door) + CALLS, content=b"v=0") for _ in range(2)]
        locations = [r.headers["location"] for r in created]
        await http.get(base_url(door) + "/who")  # turn the ring: a plain turn would miss now
        gone = [await http.delete(base_url(door) + location) for location in locations]
        unknown = await http.delete(base_url(door) + CALLS + "/rtc_nobody")
    assert [r.status_code for r in gone] == [204, 204]
    assert a.calls == b.calls == set()
    # Each hang-up went straight to its call's backend; only the unknown call asked both.
    assert a.hits.count("hangup") == b.hits.count("hangup") == 2
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "call_not_found"


async def test_a_backend_that_times_out_is_a_504_and_not_retried() -> None:
    a, b = Backend("a"), Backend("b")
    async with (
        serving(a) as at_a,
        serving(b) as at_b,
        front_door([at_a, at_b], upstream_timeout_s=0.3) as door,
        httpx.AsyncClient(timeout=10) as http,
    ):
        response = await http.get(base_url(door) + "/slow")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert sorted(a.hits + b.hits) == ["slow"]


# --- bad input -----------------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "invalid_request_line"),
    (b"GET /who\r\n\r\n", 400, "invalid_request_line"),
    (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "invalid_target"),
    (b"GET /who#fragment HTTP/1.1\r\n\r\n", 400, "invalid_target"),
    (b"GET /caf\xe9 HTTP/1.1\r\n\r\n", 400, "invalid_target"),
    (b"GET * HTTP/1.1\r\n\r\n", 400, "invalid_target"),
    (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    (b"GET /who HTTP/2.0\r\n\r\n", 400, "unsupported_http_version"),
    (b"GET /who HTTP/1.1\r\nno colon here\r\n\r\n", 400, "invalid_header"),
    (b"GET /who HTTP/1.1\r\n folded: header\r\n\r\n", 400, "invalid_header"),
    (b"GET /who HTTP/1.1\r\nX-A: bell\x07\r\n\r\n", 400, "invalid_header"),
    (b"POST /v1/realtime/calls HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", 400,
     "invalid_content_length"),
    (b"POST /v1/realtime/calls HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     400, "invalid_content_length"),
    (b"POST /v1/realtime/calls HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     411, "length_required"),
    (b"POST /v1/realtime/calls HTTP/1.1\r\nContent-Length: 999999999\r\n\r\nv=0", 413,
     "body_too_large"),
    (b"GET /who HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /who HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "too_many_headers"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "status", "code"), BAD_REQUESTS)
async def test_malformed_requests_get_a_json_error(data: bytes, status: int, code: str) -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        got_status, body = await raw_exchange(door, data)
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]
    assert a.hits == []  # nothing malformed reaches a transceiver


async def test_an_oversize_body_is_refused_and_the_client_still_reads_the_answer() -> None:
    async with two_backends() as (a, b, door), httpx.AsyncClient() as http:
        door_config = door.config
        response = await http.post(base_url(door) + CALLS, content=b"x" * (300 * 1024))
        after = await http.get(base_url(door) + "/who")  # and the front door goes on
    assert door_config.max_body_bytes < 300 * 1024
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert after.status_code == 200
    assert "offer" not in a.hits + b.hits


def head_of_size(size: int) -> bytes:
    """A GET /who head of exactly ``size`` bytes, its blank line included."""
    start, end = b"GET /who HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


async def test_a_request_head_at_the_limit_is_forwarded_and_one_byte_more_is_a_431() -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        limit = door.config.max_head_bytes
        at_limit = await raw_exchange(door, head_of_size(limit))
        over = await raw_exchange(door, head_of_size(limit + 1))
    assert at_limit == (200, {"backend": "a"})
    assert (over[0], over[1]["error"]["code"]) == (431, "headers_too_large")
    assert over[1]["error"]["message"] == f"request head exceeds {limit} bytes"
    assert a.hits == ["who"]


def nested_json_of_size(size: int) -> bytes:
    """Arrays nested ``size // 2`` deep: valid JSON far past any parser's recursion limit."""
    return b"[" * (size // 2) + b"]" * (size // 2) + b" " * (size % 2)


@pytest.mark.parametrize("extra", [0, 1])
async def test_a_body_at_the_limit_is_forwarded_whole_and_one_byte_more_is_a_413(
    extra: int,
) -> None:
    """The front door parses no JSON: a body of deeply nested JSON at the limit reaches the
    backend byte for byte (the transceiver answers it); one byte more is refused."""
    async with two_backends() as (a, b, door), httpx.AsyncClient() as http:
        body = nested_json_of_size(door.config.max_body_bytes + extra)
        response = await http.post(
            base_url(door) + "/echo", content=body, headers={"Content-Type": "application/json"}
        )
    if extra:
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        assert a.hits + b.hits == []
    else:
        assert response.status_code == 207
        assert base64.b64decode(response.json()["body_b64"]) == body


async def test_a_client_that_stalls_mid_request_gets_a_408() -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a], read_timeout_s=0.3) as door:
        status, body = await raw_exchange(door, b"GET /who HTTP/1.1\r\nHost: x\r\n")
    assert (status, body["error"]["code"]) == (408, "request_timeout")


async def test_a_client_that_disconnects_early_costs_nothing() -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        for data in (b"", b"POST /v1/realtime/calls HTTP/1.1\r\nContent-Length: 10\r\n\r\nv="):
            _, writer = await asyncio.open_connection("127.0.0.1", door.port)
            writer.write(data)
            writer.close()
            await writer.wait_closed()
        async with httpx.AsyncClient() as http:
            assert (await http.get(base_url(door) + "/who")).status_code == 200
    assert a.hits == ["who"]


# --- pure parts ----------------------------------------------------------------------------------


def test_parse_head_keeps_the_target_and_lower_cases_header_names() -> None:
    head = parse_head(
        b"POST /a?b=c HTTP/1.1\r\nX-Voicerelay-Session: S\r\nContent-Length: 3\r\n\r\n"
    )
    assert (head.method, head.target) == ("POST", "/a?b=c")
    assert head.get("x-voicerelay-session") == "S"
    assert body_length(head, max_body_bytes=3) == 3
    with pytest.raises(HttpError) as raised:
        body_length(head, max_body_bytes=2)
    assert (raised.value.status, raised.value.code) == (413, "body_too_large")


def test_ring_rotates_and_puts_a_calls_owner_first() -> None:
    ring = BackendRing(["a", "b", "c"])
    assert [ring.order() for _ in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    ring.remember("rtc_1", "c")
    assert ring.order("rtc_1") == ["c", "b", "a"]
    assert ring.order("rtc_other") == ["c", "a", "b"]


def test_config_refuses_no_backends_or_a_malformed_one() -> None:
    with pytest.raises(ValueError, match="at least one backend"):
        FrontDoorConfig("127.0.0.1", 0, ())
    with pytest.raises(ValueError, match="not host:port"):
        FrontDoorConfig("127.0.0.1", 0, ("127.0.0.1",))


# --- the process ---------------------------------------------------------------------------------


async def ready_url(process: asyncio.subprocess.Process, timeout_s: float = 30.0) -> str:
    """The URL on the front door's ready line (it binds port 0 here)."""
    assert process.stdout is not None
    async with asyncio.timeout(timeout_s):
        while line := (await process.stdout.readline()).decode():
            if READY_LINE in line:
                return line.split()[3]
    raise AssertionError(f"the front door exited with {await process.wait()} before its ready line")


async def test_the_process_prints_its_ready_line_forwards_and_stops_on_sigterm() -> None:
    a = Backend("a")
    async with serving(a) as at_a:
        argv = ["-m", "deploy.front_door", "--port", "0", "--backends", at_a]
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        try:
            url = await ready_url(process)
            async with httpx.AsyncClient() as http:
                response = await http.get(url + "who")
            assert response.json() == {"backend": "a"}
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert code == 0


def test_the_process_refuses_a_missing_backend_list_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy.front_door", "--backends", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "at least one backend" in done.stderr


HEAD_PIECES = st.sampled_from(
    [b"GET", b"POST", b" ", b"/v1/realtime/calls", b"?x=1", b"HTTP/1.1", b"HTTP/2", b"\r\n",
     b"Content-Length: ", b"12", b"-1", b"Transfer-Encoding: chunked", b":", b"\x00", b"\xff",
     b"Host: a", b"\t", b"#"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.lists(HEAD_PIECES, max_size=30).map(b"".join)))
def test_any_request_head_parses_or_is_refused_with_an_http_error(raw: bytes) -> None:
    try:
        head = parse_head(raw + b"\r\n\r\n")
        length = body_length(head, 1000)
    except HttpError as error:
        assert 400 <= error.status < 500 and error.code and error.message
        return
    assert head.target.startswith("/") and 0 <= length <= 1000


# --- WebSockets ----------------------------------------------------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's sample nonce


def ws_url(door: FrontDoor, target: str = "/ws") -> str:
    return f"ws://127.0.0.1:{door.port}{target}"


def upgrade(first: bytes = b"GET /ws HTTP/1.1", drop: str = "", more: bytes = b"") -> bytes:
    """A WebSocket handshake, less the header named ``drop``, plus the lines ``more``."""
    fields = {
        "host": b"Host: x",
        "connection": b"Connection: keep-alive, Upgrade",
        "upgrade": b"Upgrade: websocket",
        "key": b"Sec-WebSocket-Key: " + KEY,
        "version": b"Sec-WebSocket-Version: 13",
    }
    lines = [first, *(line for name, line in fields.items() if name != drop)]
    return b"\r\n".join(lines) + b"\r\n" + more + b"\r\n"


async def echoed(connection: ClientConnection, message: str | bytes) -> bool:
    await connection.send(message)
    return await asyncio.wait_for(connection.recv(), 30) == message


async def test_a_websocket_is_carried_both_ways_with_its_handshake_headers() -> None:
    a = Backend("a")
    big = os.urandom(3 * 1024 * 1024)  # far more than any buffer on the way: back-pressure
    async with serving(a) as at_a, front_door([at_a]) as door:
        async with ws_connect(
            ws_url(door, "/ws?model=m"),
            subprotocols=[websockets.Subprotocol("realtime")],
            additional_headers={"Authorization": "Bearer k", "X-Voicerelay-Resume-Token": "t"},
            origin=websockets.Origin("http://page.example"),
            max_size=None,
        ) as connection:
            assert connection.subprotocol == "realtime"
            assert await echoed(connection, "hello")
            assert await echoed(connection, big)
            counts = door.tunnels
            assert (counts.open, counts.total) == (1, 1)
        await eventually(lambda: door.tunnels.open == 0, 30, "the tunnel to be closed")
    (seen,) = a.handshakes
    assert seen["authorization"] == "Bearer k" and seen["x-voicerelay-resume-token"] == "t"
    assert seen["origin"] == "http://page.example"
    assert seen["sec-websocket-protocol"] == "realtime"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{door.port}"
    assert counts.bytes_up > len(big) + 5 and counts.bytes_down > len(big) + 5


async def test_a_refused_upgrade_comes_back_as_the_backends_answer() -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with ws_connect(ws_url(door, "/ws?refuse=404")):
                pass
    response = refused.value.response
    assert response.status_code == 404
    assert json.loads(response.body)["error"]["code"] == "refused_404"
    assert response.headers["retry-after"] == "3"
    assert door.tunnels.total == 0


async def test_a_websocket_passes_over_dead_and_busy_backends() -> None:
    busy, alive = Backend("busy", busy=True), Backend("alive")
    async with (
        serving(busy) as at_busy,
        serving(alive) as at_alive,
        front_door([dead_address(), at_busy, at_alive]) as door,
        ws_connect(ws_url(door)) as connection,
    ):
        assert await echoed(connection, "through")
    assert busy.hits == ["ws"] and alive.hits == ["ws"]


async def test_a_sideband_goes_first_to_the_backend_that_made_its_call() -> None:
    async with two_backends() as (a, b, door), httpx.AsyncClient() as http:
        created = [await http.post(base_url(door) + CALLS, content=b"v=0") for _ in range(2)]
        calls = [r.headers["location"].rsplit("/", 1)[1] for r in created]
        await http.get(base_url(door) + "/who")  # turn the ring: a plain turn would miss now
        for call_id in calls * 2:
            async with ws_connect(ws_url(door, f"/v1/realtime?call_id={call_id}")) as connection:
                assert await echoed(connection, call_id)
    assert sorted(calls) == ["rtc_a_0", "rtc_b_0"]
    assert a.targets == ["call_id=rtc_a_0"] * 2 and b.targets == ["call_id=rtc_b_0"] * 2


async def test_when_every_backend_is_busy_their_503_comes_through() -> None:
    a, b = Backend("a", busy=True), Backend("b", busy=True)
    async with serving(a) as at_a, serving(b) as at_b, front_door([at_a, at_b]) as door:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with ws_connect(ws_url(door)):
                pass
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["retry-after"] == "3"
    assert json.loads(refused.value.response.body)["error"]["code"] == "refused_503"
    assert a.hits == b.hits == ["ws"]


BAD_UPGRADES = [
    (upgrade(b"POST /ws HTTP/1.1"), 405, "websocket_not_get"),
    (upgrade(b"GET /ws HTTP/1.0"), 400, "websocket_http_version"),
    (upgrade(more=b"Content-Length: 2\r\n") + b"hi", 400, "websocket_body"),
    (upgrade(more=b"Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n", 400, "websocket_body"),
    (upgrade(drop="connection"), 400, "websocket_connection"),
    (upgrade(drop="host"), 400, "websocket_host"),
    (upgrade(drop="key"), 400, "websocket_key"),
    (upgrade(more=b"Sec-WebSocket-Key: " + KEY + b"\r\n"), 400, "websocket_key"),
    (upgrade(drop="key", more=b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400, "websocket_key"),
    (upgrade(drop="key", more=b"Sec-WebSocket-Key: not base64!\r\n"), 400, "websocket_key"),
    (upgrade(drop="version"), 400, "websocket_version"),
    (upgrade(drop="version", more=b"Sec-WebSocket-Version: 8\r\n"), 426, "websocket_version"),
]


@pytest.mark.parametrize(("data", "status", "code"), BAD_UPGRADES)
async def test_a_malformed_upgrade_gets_its_specific_error(
    data: bytes, status: int, code: str
) -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        answer = await raw_answer(door, data)
        got_status, body = await raw_exchange(door, data)
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]
    if status == 426:  # RFC 6455 section 4.4: name the version spoken
        assert b"\r\nsec-websocket-version: 13\r\n" in answer.lower()
    assert a.hits == []


async def test_an_upgrade_at_the_head_limit_is_carried_and_one_byte_more_is_a_431() -> None:
    a = Backend("a")
    async with serving(a) as at_a, front_door([at_a]) as door:
        limit = door.config.max_head_bytes
        pad = b"X-Pad: " + b"p" * (limit - len(upgrade()) - len(b"X-Pad: \r\n")) + b"\r\n"
        at_limit = upgrade(more=pad)
        switched = await raw_answer(door, at_limit, head_only=True)
        over = await raw_exchange(door, upgrade(more=b"p" + pad))
    assert len(at_limit) == limit
    assert switched.startswith(b"HTTP/1.1 101 ")
    assert (over[0], over[1]["error"]["code"]) == (431, "headers_too_large")
    assert a.hits == ["ws"]


async def test_an_idle_tunnel_is_closed() -> None:
    a = Backend("a")
    async with (
        serving(a) as at_a,
        front_door([at_a], tunnel_idle_timeout_s=0.5) as door,
        ws_connect(ws_url(door), ping_interval=None) as connection,
    ):
        assert await echoed(connection, "once")
        await asyncio.wait_for(connection.wait_closed(), 30)
        assert connection.close_code == 1006  # its sockets closed: no close frame in between
        await eventually(lambda: door.tunnels.open == 0, 30, "the tunnel to be counted closed")


async def test_sigterm_leaves_a_tunnel_the_drain_timeout_then_closes_it() -> None:
    a = Backend("a")
    async with serving(a) as at_a:
        argv = ["-m", "deploy.front_door", "--port", "0", "--backends", at_a]
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--drain-timeout-s", "5", cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            url = (await ready_url(process)).replace("http://", "ws://")
            async with ws_connect(url + "ws") as connection:
                assert await echoed(connection, "before")
                process.send_signal(signal.SIGTERM)
                await eventually(lambda: refuses(url), 30, "the listener to close")
                assert await echoed(connection, "during the drain")
                await asyncio.wait_for(connection.wait_closed(), 30)
            code = await asyncio.wait_for(process.wait(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert code == 0
    assert connection.close_code == 1006
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    # (a probe of the listener that got in before it closed may be counted as a connection)
    assert re.search(r"closing \d+ connections \(1 WebSockets\)", log), log
    assert "closed: the front door stopped and its drain timeout passed" in log, log


@contextlib.asynccontextmanager
async def raw_backend(answer: bytes | None) -> AsyncIterator[str]:
    """A backend that reads the handshake head, then writes ``answer`` and closes (or, for
    None, says nothing until the test ends); yields its ``host:port``."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await done.wait()
            writer.write(answer or b"")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (b"", 502, "upstream_failed"),  # closed before answering
        (b"SSH-2.0-OpenSSH\r\n\r\n", 502, "upstream_failed"),
        (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 502,
         "upstream_failed"),
        (None, 504, "upstream_timeout"),
    ],
)  # fmt: skip
async def test_a_backend_that_fails_the_handshake_is_a_json_error_and_not_retried(
    answer: bytes | None, status: int, code: str
) -> None:
    alive = Backend("alive")
    async with (
        raw_backend(answer) as at_raw,
        serving(alive) as at_alive,
        front_door([at_raw, at_alive], upstream_timeout_s=0.5) as door,
    ):
        got = await raw_exchange(door, upgrade())
    assert (got[0], got[1]["error"]["code"]) == (status, code), got
    assert alive.hits == []  # the handshake reached a backend: its failure is the answer


def refuses(url: str) -> bool:
    host, port = url.removeprefix("ws://").rstrip("/").rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


# --- the handshake check (pure) ------------------------------------------------------------------

WEBSOCKET_BREAKS: dict[str, tuple[str, bytes | None, str]] = {  # field, new line or none, code
    "not a GET": ("first", b"PUT /v1/realtime HTTP/1.1", "websocket_not_get"),
    "HTTP/1.0": ("first", b"GET /v1/realtime HTTP/1.0", "websocket_http_version"),
    "a body": ("body", b"Content-Length: 1", "websocket_body"),
    "no Connection": ("connection", None, "websocket_connection"),
    "no Host": ("host", None, "websocket_host"),
    "no key": ("key", None, "websocket_key"),
    "an odd key": ("key", b"Sec-WebSocket-Key: AAAA", "websocket_key"),
    "no version": ("version", None, "websocket_version"),
    "version 8": ("version", b"Sec-WebSocket-Version: 8", "websocket_version"),
}
SUBPROTOCOLS = st.lists(st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True), max_size=3)


def handshake_of_size(size: int, fields: dict[str, bytes]) -> bytes:
    """The lines of ``fields`` as a request head of ``size`` bytes (padded), if they fit."""
    raw = b"\r\n".join(fields.values()) + b"\r\nX-Pad: "
    return raw + b"p" * max(0, size - len(raw) - 4) + b"\r\n\r\n"


@settings(max_examples=150, deadline=None)
@given(
    nonce=st.binary(min_size=16, max_size=16),
    protocols=SUBPROTOCOLS,
    voicerelay=st.from_regex(r"[!-~]{0,200}", fullmatch=True),
    size=st.integers(min_value=0, max_value=16 * 1024),
    broken=st.sampled_from([None, *WEBSOCKET_BREAKS]),
)
def test_a_handshake_up_to_the_head_limit_is_checked_and_forwarded_faithfully(
    nonce: bytes, protocols: list[str], voicerelay: str, size: int, broken: str | None
) -> None:
    """Any handshake up to the front door's head limit (16 KiB) is refused with its break's
    code, or accepted and forwarded as a handshake with the same key and subprotocols and only
    the headers a transceiver is given."""
    key = base64.b64encode(nonce)
    fields = {
        "first": b"GET /v1/realtime?model=m HTTP/1.1",
        "host": b"Host: x",
        "connection": b"Connection: Upgrade",
        "upgrade": b"Upgrade: websocket",
        "key": b"Sec-WebSocket-Key: " + key,
        "version": b"Sec-WebSocket-Version: 13",
        "protocols": b"Sec-WebSocket-Protocol: " + ", ".join(protocols).encode(),
        "voicerelay": b"X-Voicerelay-Test: " + voicerelay.encode(),
        "cookie": b"Cookie: c",
    }
    if broken:
        name, line, code = WEBSOCKET_BREAKS[broken]
        fields = {n: v for n, v in ({**fields, name: line}).items() if v is not None}
    raw = handshake_of_size(size, fields)
    head = parse_head(raw)
    assert websocket_requested(head)
    if broken:
        with pytest.raises(HandshakeError) as refused:
            check_handshake(head, request_version(raw))
        assert refused.value.code == code and refused.value.message
        return
    check_handshake(head, request_version(raw))
    sent = parse_head(upstream_handshake(head, "10.0.0.7:8080", "127.0.0.1"))
    check_handshake(sent, "HTTP/1.1")
    assert (sent.method, sent.target) == ("GET", "/v1/realtime?model=m")
    assert sent.all("sec-websocket-key") == [key.decode()]
    assert sent.all("sec-websocket-protocol") == [", ".join(protocols)]
    assert sent.all("x-voicerelay-test") == [voicerelay.strip(" \t")]
    assert sent.all("host") == ["10.0.0.7:8080"] and sent.all("x-forwarded-host") == ["x"]
    assert not sent.all("cookie") and not sent.all("x-pad")


UVICORN_DENIAL = (  # a transceiver's 404 to a sideband, as uvicorn writes it
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 35\r\ncontent-type: application/json\r\n"
    b"Date: Sat, 05 Dec 2026 17:50:28 GMT\r\nConnection: close\r\n\r\n"
)
UVICORN_SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: realtime\r\n"
    b"date: Sat, 05 Dec 2026 17:50:28 GMT\r\nserver: uvicorn\r\n"
    b"X-Voicerelay-Session: sess_1\r\n\r\n"
)


def test_a_transceivers_answers_to_a_handshake_parse_and_relay_what_they_should() -> None:
    denial = parse_response_head(UVICORN_DENIAL)
    assert (denial.status, denial.body_bytes(1000)) == (404, 35)
    assert denial.reply_headers() == [(b"content-type", b"application/json")]
    with pytest.raises(UpstreamError, match="oversized"):
        denial.body_bytes(34)
    switched = parse_response_head(UVICORN_SWITCH).switch_head()
    assert switched == (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"sec-websocket-protocol: realtime\r\nx-voicerelay-session: sess_1\r\n\r\n"
    )
    closing = parse_response_head(b"HTTP/1.0 401 Unauthorized\r\n\r\n")
    assert closing.body_bytes(1000) is None  # the body ends with the connection


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_answer_head_parses_or_is_an_upstream_error(raw: bytes) -> None:
    for head in (raw, UVICORN_DENIAL[:-4] + raw):
        try:
            parsed = parse_response_head(head + b"\r\n\r\n")
            parsed.body_bytes(1000)
        except UpstreamError as error:
            assert str(error)
            continue
        assert 100 <= parsed.status <= 599


def test_a_sideband_names_its_call_and_other_targets_none() -> None:
    assert sideband_call_id("/v1/realtime?call_id=rtc_1") == "rtc_1"
    assert sideband_call_id("/v1/realtime?model=m") is None
    assert sideband_call_id("/v1/realtime?call_id=a&call_id=b") is None
    assert sideband_call_id("/v1/live/sessions/x/attach?call_id=rtc_1") is None


# --- the official SDK through the front door to a real transceiver --------------------------------

SDK_KEY = "vr-door-" + os.urandom(12).hex()


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A transceiver process's ``host:port`` (auth required; its models the fake server)."""
    log_dir = tmp_path_factory.mktemp("front-door")
    with transceiver_process_with(server.base_url, SDK_KEY, 2, log_dir) as url:
        yield url.removeprefix("http://")


@pytest.mark.slow
async def test_the_sdk_talks_to_a_transceiver_through_the_front_door(transceiver: str) -> None:
    """A text turn over ``client.realtime.connect()``; the backend that refuses is skipped."""
    async with front_door([dead_address(), transceiver]) as door:
        client = openai_client(base_url(door), SDK_KEY)
        async with client.realtime.connect(model="gpt-realtime") as connection:
            events = EventLog(connection)
            await events.next("session.created")
            await ask_in_text(connection, "hi there")
            done = await events.next("response.done")
        counts = door.tunnels
        await eventually(lambda: counts.open == 0, 30, "the tunnel to be closed")
    assert done["response"]["status"] == "completed", done
    transcript = done["response"]["output"][0]["content"][0]["transcript"]
    assert transcript.split() == ["You", "said:", "hi", "there"]
    assert "error" not in events.types(), events.seen
    assert counts.total == 1 and counts.bytes_up > 0 and counts.bytes_down > 0


@pytest.mark.slow
async def test_a_live_session_starts_and_closes_through_the_front_door(transceiver: str) -> None:
    async with front_door([transceiver]) as door:
        client = openai_client(base_url(door), SDK_KEY)
        async with client.live.connect() as connection:
            events = EventLog(connection)
            await connection.session.start(session={"model": "gpt-live-1"})
            started = await events.next("session.started")
            await connection.session.close(event_id="bye")
            closed = await events.next("session.closed")
    assert closed["session"]["id"] == started["session"]["id"]


@pytest.mark.slow
async def test_sidebands_for_unknown_sessions_get_the_transceivers_404(transceiver: str) -> None:
    async with front_door([transceiver]) as door:
        client = openai_client(base_url(door), SDK_KEY)
        with pytest.raises(websockets.InvalidStatus) as realtime:
            async with client.realtime.connect(call_id="rtc_" + "0" * 24):
                pass
        with pytest.raises(websockets.InvalidStatus) as live:
            async with client.live.sideband.connect(session_id="sess_" + "0" * 24):
                pass
    refusals = [realtime.value.response, live.value.response]
    assert [r.status_code for r in refusals] == [404, 404]
    codes = [json.loads(r.body)["error"]["code"] for r in refusals]
    assert codes == ["call_not_found", "session_not_found"]
