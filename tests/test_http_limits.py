"""The transceiver's HTTP bodies at their real limits and with pathological JSON, against a real
``python -m transceiver``: the offer (64 KiB, raw SDP or multipart with a ``session`` field)
and the client_secrets body (64 KiB). At the limit: accepted or the field's normal 4xx; one
byte over: 413; deeply nested JSON or multipart: 400 naming the problem; never a 500.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated, padded_json
from test_sdp import CHROME_OFFER

from deploy.processes import Process, free_port, random_keys, text, transceiver_process
from transceiver.http.app import MAX_SECRET_REQUEST_BYTES
from transceiver.http.offers import MAX_OFFER_BYTES

API_KEY = "vr-test-" + os.urandom(12).hex()
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CALLS = "/v1/realtime/calls"
SECRETS = "/v1/realtime/client_secrets"
BOUNDARY = "limitsboundary"
HTTP_FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    link = ("127.0.0.1", free_port())
    env = {"TRANSCEIVER_AUTH": "required", "TRANSCEIVER_API_KEY": API_KEY}
    env["TRANSCEIVER_SECRET_KEYS"] = "1:" + os.urandom(32).hex()
    log_dir = tmp_path_factory.mktemp("limits")
    process = transceiver_process("transceiver", link, http, "127.0.0.1:3478", random_keys(),
                                  log_dir, env=env)  # fmt: skip
    process.start().wait_ready()
    yield f"http://{text(http)}"
    asyncio.run(process.stop())
    check_no_traceback(process)


def check_no_traceback(process: Process) -> None:
    log = process.log_path.read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def multipart(sdp: bytes, session: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name="
    return (
        f'{head}"sdp"\r\n\r\n'.encode() + sdp + f'\r\n{head}"session"\r\n\r\n'.encode()
        + session + f"\r\n--{BOUNDARY}--\r\n".encode()
    )  # fmt: skip


def multipart_of_size(size: int) -> bytes:
    """A multipart offer of exactly ``size`` bytes: the session's instructions fill it."""
    frame = len(multipart(CHROME_OFFER.encode(), b""))
    session = padded_json('{"instructions": ', "}", size - frame)
    return multipart(CHROME_OFFER.encode(), session)


def sdp_of_size(size: int) -> bytes:
    """CHROME_OFFER grown to exactly ``size`` bytes with one long attribute line."""
    offer = CHROME_OFFER.encode()
    line = b"a=x-pad:"
    return offer + line + b"p" * (size - len(offer) - len(line) - 2) + b"\r\n"


async def post(
    http: httpx.AsyncClient, base_url: str, path: str, body: bytes, content_type: str
) -> httpx.Response:
    headers = {"Content-Type": content_type, **AUTH}
    response = await http.post(base_url + path, content=body, headers=headers)
    if response.status_code == 201:  # free the capacity the call holds
        await http.delete(base_url + response.headers["location"], headers=AUTH)
    return response


def error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]
    return body


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


async def test_offers_at_the_limit_are_taken_and_one_byte_more_is_413(
    base_url: str, http: httpx.AsyncClient
) -> None:
    sdp = sdp_of_size(MAX_OFFER_BYTES)
    assert len(sdp) == MAX_OFFER_BYTES
    assert (await post(http, base_url, CALLS, sdp, "application/sdp")).status_code == 201
    over = await post(http, base_url, CALLS, sdp_of_size(MAX_OFFER_BYTES + 1), "application/sdp")
    assert error(over, 413)["code"] == "offer_too_large"
    form = multipart_of_size(MAX_OFFER_BYTES)
    assert len(form) == MAX_OFFER_BYTES
    assert (await post(http, base_url, CALLS, form, MULTIPART)).status_code == 201
    over = await post(http, base_url, CALLS, multipart_of_size(MAX_OFFER_BYTES + 1), MULTIPART)
    assert error(over, 413)["code"] == "offer_too_large"


@pytest.mark.parametrize(
    "session",
    [
        b"[" * 1000,
        b"[" * (MAX_OFFER_BYTES - len(CHROME_OFFER) - 500),
        b'{"tools": [{"name": "t", "parameters": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}]}",
        b'{"instructions": NaN}',
    ],
)
async def test_a_pathological_session_field_is_400(
    base_url: str, http: httpx.AsyncClient, session: bytes
) -> None:
    body = multipart(CHROME_OFFER.encode(), session)
    response = await post(http, base_url, CALLS, body, MULTIPART)
    assert error(response, 400)["code"] in ("invalid_session", "invalid_json")


async def test_multipart_nested_as_deep_as_the_limit_allows_is_400(
    base_url: str, http: httpx.AsyncClient
) -> None:
    level = "--{0}\r\nContent-Type:multipart/mixed;boundary={1}\r\n\r\n"
    body, depth = b"", 0
    while len(body) < MAX_OFFER_BYTES - 64:
        body += level.format(depth, depth + 1).encode()
        depth += 1
    response = await post(http, base_url, CALLS, body, "multipart/form-data; boundary=0")
    assert error(response, 400)["code"] == "invalid_multipart"


async def test_secret_bodies_at_the_limit_get_their_normal_error_and_one_byte_more_is_413(
    base_url: str, http: httpx.AsyncClient
) -> None:
    at_limit = padded_json(
        '{"session": {"instructions": ', "}}", MAX_SECRET_REQUEST_BYTES, varied=True
    )
    response = await post(http, base_url, SECRETS, at_limit, "application/json")
    refused = error(response, 400)  # too large for an ek_ secret, and no Redis to keep it
    assert refused["code"] == "too_large" and "REDIS_URL" in refused["message"], refused
    over = padded_json('{"session": {"instructions": ', "}}", MAX_SECRET_REQUEST_BYTES + 1)
    response = await post(http, base_url, SECRETS, over, "application/json")
    assert error(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 1000,
        b"{" + b'"a":{' * (MAX_SECRET_REQUEST_BYTES // 6),
        b'{"session": {"tools": [' + b"[" * 5000 + b"]" * 5000 + b"]}}",
        b'{"expires_after": {"seconds": Infinity}}',
        b'{"session": {"instructions": "\\udc00"}}',
    ],
)
async def test_a_pathological_secret_body_is_400(
    base_url: str, http: httpx.AsyncClient, body: bytes
) -> None:
    response = await post(http, base_url, SECRETS, body, "application/json")
    assert error(response, 400)["code"] == "invalid_json"


@HTTP_FUZZ
@given(st.data())
async def test_mutated_bodies_at_the_limits_never_get_a_5xx(
    base_url: str, http: httpx.AsyncClient, data: st.DataObject
) -> None:
    size = data.draw(around(MAX_OFFER_BYTES, spread=16))
    kind = data.draw(st.sampled_from(["sdp", "multipart", "secret"]))
    if kind == "secret":
        payload = padded_json('{"session": {"instructions": ', "}}", size)
        path, content_type = SECRETS, "application/json"
    else:
        payload = sdp_of_size(size) if kind == "sdp" else multipart_of_size(size)
        path, content_type = CALLS, "application/sdp" if kind == "sdp" else MULTIPART
    body = data.draw(mutated(payload))
    response = await post(http, base_url, path, body, content_type)
    assert response.status_code < 500, response.text
    if len(body) > MAX_OFFER_BYTES:
        assert response.status_code == 413, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
