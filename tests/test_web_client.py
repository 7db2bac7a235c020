"""The web client (transceiver/http/static) in headless Chromium, without a voice pipeline.

A tiny static server in the test serves the page the way the transceiver does (``/`` and
``/static/...``) and can forward the calls endpoint to a real transceiver. Scripted GA server
events go through ``window.voicerelay._handle`` exactly as data-channel messages would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from agents_sdk import NodeUnavailable, agents_page_html, build_agents_bundle
from playwright.async_api import Browser, Page

from deploy.processes import Stack, metric_values
from deploy.waiting import eventually
from loadtest.browser import chromium, recorded_audio

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the module's browser is on its loop
STATIC_DIR = Path(__file__).resolve().parents[1] / "transceiver" / "http" / "static"
CALLS_PATH = "/v1/realtime/calls"


class _Handler(SimpleHTTPRequestHandler):
    """``/`` is index.html, ``/static/x`` is a static file, ``/agents`` the SDK page; calls
    requests go to ``upstream`` (a transceiver) so the page stays same-origin."""

    upstream: str | None = None
    agents_html: str = ""
    forwarded: list[tuple[str, str, dict[str, str]]]  # (method, path, headers) sent upstream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(STATIC_DIR), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        if self.path == "/agents":
            return self._reply(200, self.agents_html.encode(), "text/html; charset=utf-8")
        if self.path == "/" or self.path.startswith("/?"):
            self.path = "/index.html"
        elif self.path.startswith("/static/"):
            self.path = self.path.removeprefix("/static")
        return super().do_GET()

    def do_POST(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def _forward(self) -> None:
        if self.upstream is None or not self.path.startswith(CALLS_PATH):
            return self._reply(404, b'{"error": {"code": "not_found"}}', "application/json")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.forwarded.append(
            (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        )
        headers = {
            k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")
        }
        upstream = httpx.request(
            self.command, self.upstream + self.path, content=body, headers=headers, timeout=20
        )
        extra = {"Location": upstream.headers["location"]} if "location" in upstream.headers else {}
        self._reply(
            upstream.status_code, upstream.content, upstream.headers.get("content-type", ""), extra
        )

    def _reply(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def static_server(
    upstream: str | None = None,
    agents_html: str = "",
    forwarded: list[tuple[str, str, dict[str, str]]] | None = None,
) -> Iterator[str]:
    attrs = {
        "upstream": upstream,
        "agents_html": agents_html,
        "forwarded": [] if forwarded is None else forwarded,
    }
    handler = type("Handler", (_Handler,), attrs)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with static_server() as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_browser() -> AsyncIterator[Browser]:
    """One Chromium for the module (a start costs ~1 CPU-s); each test gets its own context."""
    async with chromium() as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def browser(shared_browser: Browser) -> AsyncIterator[Browser]:
    """The module's Chromium; the pages (each in its own context) a test opened are closed
    after it, so no test sees another's cookies, storage or calls."""
    before = set(shared_browser.contexts)
    yield shared_browser
    for context in set(shared_browser.contexts) - before:
        await context.close()


class PageErrors:
    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)


async def open_client(browser: Browser, url: str) -> tuple[Page, PageErrors]:
    page = await browser.new_page()
    errors = PageErrors(page)
    await page.goto(url)
    await page.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
    return page, errors


async def inject(page: Page, events: list[dict[str, Any]]) -> None:
    await page.evaluate("(events) => events.forEach((e) => window.voicerelay._handle(e))", events)


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": f"event_{kind}", **fields}


def assistant_item(item_id: str, transcript: str | None, status: str) -> dict[str, Any]:
    part = {"type": "output_audio", "transcript": transcript}
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part],
    }


def spoken(kind: str, resp: str, item: str, **fields: Any) -> dict[str, Any]:
    """A response.output_audio_transcript.* event."""
    where = {"response_id": resp, "item_id": item, "output_index": 0, "content_index": 0}
    return ev(f"response.output_audio_transcript.{kind}", **where, **fields)


def heard(kind: str, item: str, **fields: Any) -> dict[str, Any]:
    """A conversation.item.input_audio_transcription.* event."""
    return ev(
        f"conversation.item.input_audio_transcription.{kind}",
        item_id=item,
        content_index=0,
        **fields,
    )


def response(kind: str, resp: str, status: str, **fields: Any) -> dict[str, Any]:
    return ev(
        f"response.{kind}",
        response={"id": resp, "object": "realtime.response", "status": status, **fields},
    )


def output_item(kind: str, resp: str, item: dict[str, Any]) -> dict[str, Any]:
    return ev(f"response.output_item.{kind}", response_id=resp, output_index=0, item=item)


METRICS = {"speech_stopped_ms": 0, "stt_final_ms": 180, "llm_first_token_ms": 420}
METRICS |= {"first_audio_ms": 610, "first_frame_out_ms": 640}
ANSWER = "It is ten past nine."


def answered_turn(user: str, resp: str, item: str) -> list[dict[str, Any]]:
    """A full voice turn: speech, transcription, a spoken answer, the turn metrics."""
    return [
        ev("input_audio_buffer.speech_started", item_id=user, audio_start_ms=100),
        heard("delta", user, delta="what time "),
        ev("input_audio_buffer.speech_stopped", item_id=user, audio_end_ms=1400),
        ev("input_audio_buffer.committed", item_id=user, previous_item_id=None),
        heard("completed", user, transcript="what time is it"),
        response("created", resp, "in_progress"),
        output_item("added", resp, assistant_item(item, None, "in_progress")),
        ev("output_audio_buffer.started", response_id=resp),
        *[spoken("delta", resp, item, delta=d) for d in ("It is ", "ten ", "past nine.")],
        spoken("done", resp, item, transcript=ANSWER),
        output_item("done", resp, assistant_item(item, ANSWER, "completed")),
        response("done", resp, "completed", usage={"input_tokens": 5, "output_tokens": 7}),
        ev("output_audio_buffer.stopped", response_id=resp),
        {"type": "voicerelay.turn.metrics", "response_id": resp, **METRICS},
    ]


def interrupted_turn(user: str, resp: str, item: str) -> list[dict[str, Any]]:
    """An answer cut short by barge-in: cleared audio, a truncated item, a cancelled response."""
    return [
        response("created", resp, "in_progress"),
        spoken("delta", resp, item, delta="Let me tell you a long story about"),
        ev("input_audio_buffer.speech_started", item_id=user, audio_start_ms=5000),
        ev("output_audio_buffer.cleared", response_id=resp),
        ev("conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=800),
        response("done", resp, "cancelled"),
    ]


async def test_page_renders_and_exposes_the_test_api(
    browser: Browser, base_url: str, tmp_path: Path
) -> None:
    page, errors = await open_client(browser, base_url + "/")
    await page.screenshot(path=str(tmp_path / "web-client.png"), full_page=True)
    assert await page.is_enabled("#talk") and not await page.is_enabled("#hangup")
    assert await page.text_content("#state-connection") == "idle"
    api = await page.evaluate(
        "Object.fromEntries(Object.entries(window.voicerelay).map(([k, v]) => [k, typeof v]))"
    )
    for name in ("connect", "hangup", "send", "on", "_handle", "recording"):
        assert api[name] == "function", api
    assert api["events"] == "object" and api["turns"] == "object"
    with pytest.raises(Exception, match="not connected"):
        await page.evaluate("window.voicerelay.send({type: 'response.create'})")
    assert errors.errors == []


async def test_key_comes_from_the_query(browser: Browser, base_url: str) -> None:
    page, _ = await open_client(browser, base_url + "/?key=ek_abc123")
    assert await page.input_value("#key") == "ek_abc123"


async def test_scripted_events_render_transcripts_marks_and_latency(
    browser: Browser, base_url: str, tmp_path: Path
) -> None:
    page, errors = await open_client(browser, base_url + "/")
    script = [ev("session.created", session={"id": "sess_1", "type": "realtime"})]
    script += answered_turn("item_u1", "resp_1", "item_a1")
    script += interrupted_turn("item_u2", "resp_2", "item_a2")
    await inject(page, script)

    user = page.locator('.entry.user[data-item-id="item_u1"] .text')
    assert await user.text_content() == "what time is it"
    answer = page.locator('.entry.assistant[data-response-id="resp_1"]')
    assert await answer.locator(".text").text_content() == "It is ten past nine."
    assert await answer.get_attribute("class") == "entry assistant"  # finished, not cut
    cut = page.locator('.entry.assistant[data-response-id="resp_2"]')
    assert "cut" in (await cut.get_attribute("class") or "")
    assert await cut.locator(".badge").text_content() == "interrupted"
    assert await page.locator('.entry.user[data-item-id="item_u2"]').count() == 1

    bars = answer.locator("svg.latency rect.lat-bar")
    assert await bars.count() == 4
    widths = [float(await bars.nth(i).get_attribute("width") or 0) for i in range(4)]
    assert all(w > 0 for w in widths) and widths[1] > widths[0]  # 240 ms LLM vs 180 ms STT
    assert "640 ms" in (await answer.locator("svg.latency").text_content() or "")

    received = await page.evaluate("window.voicerelay.events.map((e) => e.type)")
    assert received == [e["type"] for e in script]
    turns = await page.evaluate("window.voicerelay.turns")
    assert turns[0]["response_id"] == "resp_1" and turns[0]["metrics"]["stt_final_ms"] == 180
    assert await page.text_content("#state-session") == "sess_1"
    assert await page.text_content("#log-count") == str(len(script))
    await page.screenshot(path=str(tmp_path / "web-client-turns.png"), full_page=True)
    assert errors.errors == []


async def test_unplayed_text_is_struck_out_and_missing_metrics_draw_no_bar(
    browser: Browser, base_url: str
) -> None:
    page, errors = await open_client(browser, base_url + "/")
    streamed = "The weather today is sunny with"
    played = assistant_item("item_a9", "The weather today", "incomplete")
    metrics = {**METRICS, "llm_first_token_ms": None}
    await inject(
        page,
        [
            response("created", "resp_9", "in_progress"),
            spoken("delta", "resp_9", "item_a9", delta=streamed),
            ev("conversation.item.done", item=played),
            {"type": "voicerelay.turn.metrics", "response_id": "resp_9", **metrics},
        ],
    )
    entry = page.locator('.entry.assistant[data-item-id="item_a9"]')
    assert await entry.locator("del.unheard").text_content() == " is sunny with"
    assert await entry.locator(".badge").text_content() == "truncated"
    assert await entry.locator("rect.lat-bar").count() == 3
    assert "—" in (await entry.locator("svg.latency").text_content() or "")
    assert errors.errors == []


async def test_error_events_are_shown(browser: Browser, base_url: str) -> None:
    page, _ = await open_client(browser, base_url + "/")
    error = {"type": "invalid_request_error", "code": "unknown_event", "message": "unknown event"}
    await inject(page, [ev("error", error=error)])
    assert await page.text_content("#error") == "unknown_event: unknown event"
    assert await page.locator("#log .log-error").count() == 1


@pytest.mark.slow
async def test_echo_mode_call_through_the_relay(browser: Browser, tmp_path: Path) -> None:
    """A real call (relay + echo transceiver): no events needed, the page plays the echo."""
    stack = Stack(tmp_path, transceivers=1, workers=1)
    try:
        await stack.start()
        forwarded: list[tuple[str, str, dict[str, str]]] = []
        with static_server(upstream=stack.base_url(0), forwarded=forwarded) as url:
            page, errors = await open_client(browser, url + "/?record=1&key=ek_test")
            await page.evaluate("window.voicerelay.connect()")
            assert await page.text_content("#state-connection") == "connected"
            assert await page.is_enabled("#hangup")
            await page.wait_for_function(
                "window.voicerelay.recording().pcm16_b64.length > 4 * 48000", timeout=15_000
            )
            samples, rate_hz = await recorded_audio(page)
            # The in-page meter times the first audible sound after speech stopped.
            stopped = ev("input_audio_buffer.speech_stopped", item_id="item_1", audio_end_ms=0)
            await inject(page, [stopped])
            await page.wait_for_function("window.voicerelay.turns[0].heard_ms !== null")
            await page.evaluate("window.voicerelay.hangup()")  # resolves once answered
            assert await page.text_content("#state-connection") == "idle"
            await eventually(lambda: len(forwarded) == 2, 5.0, "the hang-up DELETE")
            assert errors.errors == []
            # The page closed its connection after the DELETE, not before: a peer that
            # just leaves is not a hang-up (its stored session would stay resumable).
            async with httpx.AsyncClient(timeout=5) as http:
                metrics = (await http.get(stack.base_url(0) + "/metrics")).text
            ended = metric_values(metrics, "transceiver_sessions_ended_total")
            assert ended == {"hangup": 1.0}, ended
    finally:
        await stack.stop()
    (post, path, headers), (delete, call_path, _) = forwarded
    assert (post, path, delete) == ("POST", CALLS_PATH, "DELETE")
    # The offer goes with the session the page asks for (sdp + session, as OpenAI's calls take).
    assert headers["content-type"].startswith("multipart/form-data; boundary="), headers
    assert headers["authorization"] == "Bearer ek_test"
    assert call_path.startswith(CALLS_PATH + "/rtc_")
    assert rate_hz > 0 and len(samples) > rate_hz  # over a second since the track arrived
    assert np.sqrt(np.mean(samples**2)) > 0.01  # Chromium's fake beep came back


@pytest.mark.slow
async def test_agents_sdk_bundle_loads_in_chromium(browser: Browser) -> None:
    try:
        bundle = build_agents_bundle()
    except NodeUnavailable as exc:
        pytest.skip(str(exc))
    with static_server(agents_html=agents_page_html(bundle.read_text())) as url:
        page = await browser.new_page()
        errors = PageErrors(page)
        await page.goto(url + "/agents")
        await page.wait_for_function("window.agentsSdkReady === true", timeout=10_000)
        kinds = await page.evaluate("[typeof window.runAgent, typeof window.stopAgent]")
        assert kinds == ["function", "function"]
        assert await page.evaluate("Array.isArray(window.agentEvents)")
        assert errors.errors == []
