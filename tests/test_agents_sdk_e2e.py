"""OpenAI's own Realtime client against voicerelay: ``@openai/agents-realtime`` in Chromium.

The SDK (from npm, bundled for the browser at test time by ``tests/agents_sdk.py``) gets an
``ek_`` secret from ``/v1/realtime/client_secrets`` and ``baseUrl`` pointed at the transceiver of
a production-mode `make run` stack (auth required). It must connect through the real relay, get
``session.updated`` for the config it sends, and complete a spoken turn (Chromium's fake
microphone plays a question spoken by piper), receiving the transcript events.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents_sdk import NodeUnavailable, agents_page_html, build_agents_bundle
from playwright.async_api import Page, Route

from deploy.launched import Launched, launched
from loadtest.browser import chromium
from loadtest.voice_audio import Speaker

pytestmark = pytest.mark.slow
API_KEY = "vr-sdk-" + os.urandom(12).hex()
INSTRUCTIONS = "You answer questions about the moon."
TURN_TIMEOUT_S = 45.0


@pytest.fixture(scope="module")
def bundle() -> str:
    try:
        return build_agents_bundle().read_text()
    except NodeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def stack() -> Iterator[Launched]:
    args = ["--agent", "pipeline", "--auth", "required"]
    # the fixed replies not spoken ahead (tests/test_speech_prewarm.py tests that): ~5 CPU-s
    env = {"TRANSCEIVER_API_KEY": API_KEY, "PIPELINE_SPEECH_PREWARM": "0"}
    with launched(args, env=env) as running:
        yield running
    assert running.process.returncode == 0 and not running.left_running, running.tail()


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sdk") / "moon.wav"

    async def build() -> None:
        async with Speaker() as speaker:
            await speaker.wav(path, [4.0, "Tell me about the moon.", 16.0])

    asyncio.run(build())
    return path


async def mint(stack: Launched) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            stack.url + "v1/realtime/client_secrets",
            json={"expires_after": {"anchor": "created_at", "seconds": 300}},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert response.status_code == 200, response.text
    value: str = response.json()["value"]
    return value


async def serve_page(page: Page, url: str, html: str) -> None:
    """The SDK page at ``url`` (the transceiver's origin), so its calls POST is same-origin."""

    async def fulfil(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)

    await page.route(url, fulfil)


async def wait_event(page: Page, predicate: str, timeout_s: float = TURN_TIMEOUT_S) -> Any:
    script = f"window.agentEvents.find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=timeout_s * 1000, polling=100)
    return await handle.json_value()


async def test_agents_sdk_connects_with_an_ek_secret_and_completes_a_spoken_turn(
    bundle: str, stack: Launched, question_wav: Path
) -> None:
    async with chromium(question_wav) as browser:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await serve_page(page, stack.url + "agents", agents_page_html(bundle))
        await page.goto(stack.url + "agents")
        await page.wait_for_function("window.agentsSdkReady === true", timeout=10_000)
        options = {"baseUrl": stack.url.rstrip("/"), "apiKey": await mint(stack)}
        options |= {"instructions": INSTRUCTIONS, "model": "gpt-realtime"}
        connected = await page.evaluate("(o) => window.runAgent(o)", options)
        assert connected["status"] == "connected", connected
        assert connected["callId"].startswith("rtc_"), connected

        updated = await wait_event(page, "e.type === 'session.updated'")
        assert updated["session"]["instructions"] == INSTRUCTIONS
        await wait_event(page, "e.type === 'input_audio_buffer.speech_started'")
        done = "e.type === 'conversation.item.input_audio_transcription.completed'"
        transcript = (await wait_event(page, done))["transcript"]
        assert "moon" in re.findall(r"[a-z']+", transcript.lower()), transcript
        spoken = await wait_event(page, "e.type === 'response.output_audio_transcript.done'")
        assert "moon" in spoken["transcript"].lower()
        response = await wait_event(page, "e.type === 'response.done'")
        assert response["response"]["status"] == "completed", response
        history = await page.evaluate(
            "window.agentSession.history.map((i) => [i.type, i.role, i.status])"
        )
        requests = await page.evaluate("window.agentRequests")
        sdk_errors = await page.evaluate("window.agentErrors")
        server_errors = await page.evaluate(
            "window.agentEvents.filter((e) => e.type === 'error').map((e) => e.error)"
        )
        sent = await page.evaluate("window.agentSent.map((e) => e.type)")
        await page.evaluate("window.stopAgent()")
    assert sdk_errors == [] and errors == [] and server_errors == [], (sdk_errors, errors)
    assert "session.update" in sent, sent
    (post,) = [r for r in requests if r["url"].endswith("/v1/realtime/calls")]
    assert post["status"] == 201 and post["headers"]["authorization"].startswith("Bearer ek_")
    assert ["message", "user", "completed"] in history, history
    assert ["message", "assistant", "completed"] in history, history
