"""Keys over HTTP, against real ``python -m transceiver`` processes.

``POST /v1/realtime/client_secrets`` (authenticated with the server's API key) mints ``ek_``
secrets; ``POST /v1/realtime/calls`` accepts such a secret or the API key; any transceiver
sharing the secret keyring accepts any transceiver's secret, and only that keyring (never the
ufrag keyring, which every relay holds) signs them; auth off is explicit and loud; auth
required without an API key or a secret keyring, or with a weak key, does not start.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_sdp import CHROME_OFFER

from deploy.processes import (
    ROOT,
    Process,
    free_port,
    random_keys,
    random_secret_keys,
    text,
    transceiver_process,
)
from relay.wire.ufrag import Keyring
from transceiver.http import client_secrets

API_KEY = "vr-test-" + os.urandom(12).hex()
UFRAG_KEYS = random_keys()
CALLS = "/v1/realtime/calls"
SECRETS = "/v1/realtime/client_secrets"
SESSION = {
    "type": "realtime",
    "instructions": "Answer in one short sentence.",
    "audio": {"output": {"voice": "joe"}},
    "tools": [{"type": "function", "name": "get_weather", "description": "The weather"}],
}


def start(log_dir: Path, name: str, keys: str, env: dict[str, str]) -> tuple[Process, str]:
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    link = ("127.0.0.1", free_port())
    process = transceiver_process(name, link, http, "127.0.0.1:3478", keys, log_dir, env=env)
    process.start().wait_ready()
    return process, f"http://{text(http)}"


@pytest.fixture(scope="module")
def keys() -> str:
    return random_keys()


@pytest.fixture(scope="module")
def secret_keys() -> str:
    """The transceivers' own keyring for ek_ secrets: a current key and a previous one."""
    return f"{random_secret_keys()},{random_secret_keys().replace('4:', '3:', 1)}"


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, keys: str, secret_keys: str
) -> Iterator[list[str]]:
    """Two auth-required transceivers sharing the ufrag keyring, the secret keyring and one API
    key."""
    log_dir = tmp_path_factory.mktemp("auth")
    env = {"TRANSCEIVER_AUTH": "required", "TRANSCEIVER_API_KEY": API_KEY}
    env["TRANSCEIVER_SECRET_KEYS"] = secret_keys
    running = [start(log_dir, f"transceiver{i}", keys, env) for i in range(2)]
    yield [url for _, url in running]
    for process, _ in running:
        asyncio.run(process.stop())


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(
    response: httpx.Response, status: int, code: str, param: str | None = None
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", code), error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


async def mint(http: httpx.AsyncClient, base: str, body: dict[str, Any] | None = None) -> Any:
    response = await http.post(base + SECRETS, json=body or {}, headers=bearer(API_KEY))
    assert response.status_code == 200, response.text
    return response.json()


async def call(http: httpx.AsyncClient, base: str, headers: dict[str, str]) -> httpx.Response:
    headers = {"Content-Type": "application/sdp", **headers}
    return await http.post(base + CALLS, content=CHROME_OFFER, headers=headers)


async def test_minting_needs_the_api_key(servers: list[str], http: httpx.AsyncClient) -> None:
    url = servers[0] + SECRETS
    response = await http.post(url, json={})
    assert_error(response, 401, "missing_authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert_error(
        await http.post(url, json={}, headers=bearer("wrong-" + API_KEY)), 401, "invalid_api_key"
    )
    assert_error(
        await http.post(url, json={}, headers={"Authorization": API_KEY}),
        401,
        "invalid_authorization",
    )
    secret = (await mint(http, servers[0]))["value"]
    assert_error(await http.post(url, json={}, headers=bearer(secret)), 401, "invalid_api_key")


async def test_minted_secret_has_expiry_and_carries_the_session(
    servers: list[str], http: httpx.AsyncClient, secret_keys: str
) -> None:
    before = int(time.time())
    body = {"expires_after": {"anchor": "created_at", "seconds": 120}, "session": SESSION}
    minted = await mint(http, servers[0], body)
    assert minted["value"].startswith("ek_")
    assert before + 120 <= minted["expires_at"] <= int(time.time()) + 120
    session = minted["session"]
    assert session["type"] == "realtime" and session["id"].startswith("sess_")
    assert session["instructions"] == SESSION["instructions"]
    assert [tool["name"] for tool in session["tools"]] == ["get_weather"]
    key = client_secrets.signing_key(_secret(secret_keys))
    assert client_secrets.verify(key, minted["value"], time.time()).session == SESSION
    defaults = await mint(http, servers[0])
    assert defaults["expires_at"] - before in range(600, 602 + int(time.time()) - before)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"expires_after": {"seconds": 5}}, 400, "invalid_value", "expires_after.seconds"),
        ({"expires_after": {"seconds": "60"}}, 400, "invalid_value", "expires_after.seconds"),
        ({"expires_after": {"anchor": "now"}}, 400, "invalid_value", "expires_after.anchor"),
        ({"expires_after": 60}, 400, "invalid_type", "expires_after"),
        ({"expiry": 60}, 400, "unknown_parameter", "expiry"),
        ({"session": []}, 400, "invalid_type", "session"),
        ({"session": {"type": "translation"}}, 400, "invalid_value", "session.type"),
        (
            {"session": {"type": "transcription", "instructions": "Hi"}},
            400,
            "unknown_parameter",
            "session.instructions",
        ),
        ({"session": {"tools": {}}}, 400, "invalid_type", "session.tools"),
        ({"session": {"instructions": 7}}, 400, "invalid_type", "session.instructions"),
    ],
)
async def test_bad_secret_requests_name_the_field(
    servers: list[str],
    http: httpx.AsyncClient,
    body: dict[str, Any],
    status: int,
    code: str,
    param: str,
) -> None:
    response = await http.post(servers[0] + SECRETS, json=body, headers=bearer(API_KEY))
    assert_error(response, status, code, param)


async def test_unparseable_secret_request(servers: list[str], http: httpx.AsyncClient) -> None:
    headers = {**bearer(API_KEY), "Content-Type": "application/json"}
    response = await http.post(servers[0] + SECRETS, content=b"{nope", headers=headers)
    assert_error(response, 400, "invalid_json")
    response = await http.post(servers[0] + SECRETS, content=b" " * 70_000, headers=headers)
    assert_error(response, 413, "body_too_large")
    headers["Content-Type"] = "text/plain"
    response = await http.post(servers[0] + SECRETS, content=b"{}", headers=headers)
    assert_error(response, 415, "unsupported_media_type")


async def test_calls_need_a_key(servers: list[str], http: httpx.AsyncClient) -> None:
    assert_error(await call(http, servers[0], {}), 401, "missing_authorization")
    assert_error(await call(http, servers[0], bearer("sk-nope-" + API_KEY)), 401, "invalid_api_key")
    assert_error(await call(http, servers[0], bearer("ek_garbage")), 401, "client_secret_signature")


async def test_secret_from_one_transceiver_opens_calls_on_any(
    servers: list[str], http: httpx.AsyncClient
) -> None:
    secret = (await mint(http, servers[0], {"session": SESSION}))["value"]
    for base in servers:
        response = await call(http, base, bearer(secret))
        assert response.status_code == 201, response.text
        location = response.headers["Location"]
        assert_error(await http.delete(base + location), 401, "missing_authorization")
        assert (await http.delete(base + location, headers=bearer(secret))).status_code == 204


async def test_a_bad_session_with_the_call_names_the_field(
    servers: list[str], http: httpx.AsyncClient
) -> None:
    session = '{"type": "realtime", "tools": [{"type": "function"}]}'
    files = {"sdp": (None, CHROME_OFFER), "session": (None, session)}
    response = await http.post(servers[0] + CALLS, files=files, headers=bearer(API_KEY))
    assert_error(response, 400, "missing_required_parameter", "session.tools[0].name")


async def test_the_api_key_itself_opens_calls(servers: list[str], http: httpx.AsyncClient) -> None:
    response = await call(http, servers[1], bearer(API_KEY))
    assert response.status_code == 201, response.text
    location = response.headers["Location"]
    assert (await http.delete(servers[1] + location, headers=bearer(API_KEY))).status_code == 204


async def test_expired_and_foreign_secrets_are_refused(
    servers: list[str], http: httpx.AsyncClient, secret_keys: str
) -> None:
    key = client_secrets.signing_key(_secret(secret_keys))
    expired = client_secrets.mint(key, time.time() - 3600, ttl_s=60)
    assert_error(await call(http, servers[0], bearer(expired.value)), 401, "client_secret_expired")
    foreign_key = client_secrets.signing_key(_secret(random_secret_keys()))
    foreign = client_secrets.mint(foreign_key, time.time())
    response = await call(http, servers[0], bearer(foreign.value))
    assert_error(response, 401, "client_secret_signature")


async def test_only_the_secret_keyring_signs_secrets_not_the_relays_ufrag_keyring(
    servers: list[str], http: httpx.AsyncClient, keys: str, secret_keys: str
) -> None:
    """A relay holds the ufrag keyring: a secret it could mint with it opens nothing. The
    current and the previous secret key both do (rotation)."""
    from_relay_key = client_secrets.mint(client_secrets.signing_key(_secret(keys)), time.time())
    response = await call(http, servers[0], bearer(from_relay_key.value))
    assert_error(response, 401, "client_secret_signature")
    for key_id in Keyring.parse(secret_keys).secrets:
        signed = client_secrets.mint(
            client_secrets.signing_key(_secret(secret_keys, key_id)), time.time()
        )
        response = await call(http, servers[1], bearer(signed.value))
        assert response.status_code == 201, response.text
        location = response.headers["Location"]
        assert (
            await http.delete(servers[1] + location, headers=bearer(API_KEY))
        ).status_code == 204


def _secret(keys: str, key_id: int | None = None) -> bytes:
    keyring = Keyring.parse(keys)
    return keyring.secrets[keyring.current_id if key_id is None else key_id]


async def test_auth_off_is_explicit_and_loud(tmp_path: Path, http: httpx.AsyncClient) -> None:
    process, base = start(tmp_path, "open", random_keys(), {"TRANSCEIVER_AUTH": "off"})
    try:
        response = await call(http, base, {})
        assert response.status_code == 201, response.text
        assert (await http.delete(base + response.headers["Location"])).status_code == 204
        minted = (await http.post(base + SECRETS, json={"session": SESSION})).json()
        response = await call(http, base, bearer(minted["value"]))
        assert response.status_code == 201, response.text
        opened = [response.headers["Location"]]
        for stale in ("ek_garbage", "not even bearer"):  # ignored, not refused, with auth off
            headers = bearer(stale) if stale.startswith("ek_") else {"Authorization": stale}
            response = await call(http, base, headers)
            assert response.status_code == 201, response.text
            opened.append(response.headers["Location"])
        for location in opened:  # hung up: the stop need not drain them (10 s, connect_timeout)
            assert (await http.delete(base + location)).status_code == 204
    finally:
        await process.stop()
    assert "AUTHENTICATION IS OFF" in process.log_path.read_text()


@pytest.mark.parametrize(
    ("env", "flags", "words"),
    [
        ({}, [], ["TRANSCEIVER_API_KEY is not set", "--insecure-dev"]),
        ({"TRANSCEIVER_AUTH": "maybe"}, [], ["TRANSCEIVER_AUTH='maybe'"]),
        ({"TRANSCEIVER_API_KEY": "short"}, [], ["shorter than 16"]),
        ({"TRANSCEIVER_AUTH": "off"}, ["--auth", "required"], ["is not set"]),
        ({"TRANSCEIVER_API_KEY": API_KEY}, [], ["TRANSCEIVER_SECRET_KEYS is not set"]),
        (
            {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": "1:" + "00" * 32},
            [],
            ["TRANSCEIVER_SECRET_KEYS: key 1 is all zeros", "secrets.token_hex(32)"],
        ),
        (
            {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": "1:" + "ab" * 20},
            [],
            ["TRANSCEIVER_SECRET_KEYS: key 1 is shorter than 32 bytes"],
        ),
        (
            {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_SECRET_KEYS": UFRAG_KEYS},
            [],
            ["TRANSCEIVER_SECRET_KEYS reuses a secret of TRANSCEIVER_KEYS"],
        ),
        ({"TRANSCEIVER_AUTH": "off"}, ["--keys", "2:" + "00" * 32], ["TRANSCEIVER_KEYS: key 2"]),
        ({"TRANSCEIVER_AUTH": "off"}, ["--keys", "2:" + "ab" * 16], ["shorter than 32 bytes"]),
    ],
)
def test_a_missing_or_weak_key_does_not_start(
    env: dict[str, str], flags: list[str], words: list[str]
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRANSCEIVER_")}
    argv = [sys.executable, "-m", "transceiver", "--keys", UFRAG_KEYS, *flags]
    result = subprocess.run(
        argv, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert "ready" not in result.stdout


async def test_the_page_and_cors_preflight_need_no_key(
    servers: list[str], http: httpx.AsyncClient
) -> None:
    page = await http.get(servers[0] + "/")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html") and "<html" in page.text
    script = await http.get(servers[0] + "/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert_error(await http.get(servers[0] + "/static/nope.js"), 404, "not_found")
    preflight = await http.options(
        servers[0] + CALLS,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "*"
