"""The call history page (transceiver/http/static/history.html) in headless Chromium.

Everything is real: a redis-server, a relay and a pipeline transceiver (API key required).
Chromium loads the live page from the transceiver, opens a call with an ``ek_`` secret (its
microphone plays silence), types two questions over the events channel (the first answered
through the knowledge tool, the second cancelled once its audio started) and hangs up. The
call leaves a record; the history page, opened with the API key typed into its field, lists
it and shows its turns: transcripts, each turn's latency waterfall, the tool call, the
interruption, the cost and the latency plot. Without the key it asks for one, and the key is
never kept in the address or the browser's storage.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page
from records_stack import recording_stack

from deploy.processes import Stack
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import poll
from loadtest.browser import chromium
from loadtest.voice_audio import silence_pcm, write_wav

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "history-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NOTE_COPY = Path("/tmp/notes/history.png")  # a copy for the change's note, outside the repo


@dataclass
class Running:
    stack: Stack
    base_url: str


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    log_dir = tmp_path_factory.mktemp("history")
    redis = RedisServer(log_dir, "redis").start()
    try:
        async with recording_stack(log_dir, redis, 1, {"TRANSCEIVER_API_KEY": API_KEY}) as stack:
            yield Running(stack, stack.base_url(0))
    finally:
        redis.stop()


async def wait_event(page: Page, predicate: str, timeout_s: float = 30.0) -> Any:
    script = f"window.voicerelay.events.find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=timeout_s * 1000, polling=50)
    return await handle.json_value()


async def type_question(page: Page, text: str) -> None:
    content = [{"type": "input_text", "text": text}]
    item = {"type": "message", "role": "user", "content": content}
    await page.evaluate(
        "(events) => events.forEach((e) => window.voicerelay.send(e))",
        [{"type": "conversation.item.create", "item": item}, {"type": "response.create"}],
    )


async def make_a_call(page: Page, http: httpx.AsyncClient, base_url: str) -> str:
    """Two typed turns (a tool turn, a cancelled one), then a hang-up; the session id."""
    minted = await http.post(
        base_url + "/v1/realtime/client_secrets",
        json={"session": {"type": "realtime"}},
        headers=AUTH,
    )
    assert minted.status_code == 200, minted.text
    await page.evaluate("(key) => window.voicerelay.connect({key})", minted.json()["value"])
    await wait_event(page, "e.type === 'session.created'", 10)
    session_id: str = await page.evaluate("window.voicerelay.resumeInfo().sessionId")

    await type_question(page, "Tell me about water.")
    first = await wait_event(page, "e.type === 'response.done'")
    await type_question(page, "Tell me about the moon.")
    started = (
        f"e.type === 'output_audio_buffer.started' && e.response_id !== '{first['response']['id']}'"
    )
    second = await wait_event(page, started)
    await page.evaluate("window.voicerelay.send({type: 'response.cancel'})")
    await wait_event(
        page, f"e.type === 'response.done' && e.response.id === '{second['response_id']}'"
    )
    await page.evaluate("window.voicerelay.hangup()")  # resolves once the server has it

    async def read() -> dict[str, Any]:
        response = await http.get(f"{base_url}/v1/calls/{session_id}", headers=AUTH)
        return response.json()  # type: ignore[no-any-return]

    def done(record: dict[str, Any]) -> bool:
        return record.get("status") == "ended" and record.get("turn_count") == 2

    await poll(read, done, 15, lambda last: f"the record never got there: {last}", 0.05)
    return session_id


async def test_a_call_is_listed_and_shown_on_the_history_page(
    running: Running, tmp_path: Path
) -> None:
    base = running.base_url
    silence = write_wav(tmp_path / "silence.wav", silence_pcm(30.0))
    async with chromium(silence) as browser, httpx.AsyncClient(timeout=30) as http:
        live = await browser.new_page()
        live_errors: list[str] = []
        live.on("pageerror", lambda exc: live_errors.append(str(exc)))
        await live.goto(base + "/")
        await live.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
        session_id = await make_a_call(live, http, base)
        assert live_errors == []
        await live.close()

        page = await browser.new_page(viewport={"width": 900, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(base + "/static/history.html")
        # Without the key the server refuses and the page asks for it.
        await page.wait_for_selector("#error:not([hidden])", timeout=10_000)
        assert "API key" in (await page.text_content("#error") or "")
        assert await page.locator("#calls tbody tr").count() == 0

        await page.fill("#api-key", API_KEY)
        await page.click("#load")
        row = page.locator(f'#calls tr[data-id="{session_id}"]')
        await row.wait_for(timeout=10_000)
        cells = [c.strip() for c in await row.locator("td").all_text_contents()]
        assert cells[2:4] == ["2", "hangup"] and cells[5] == "1", cells  # turns, end, cut
        assert await page.is_hidden("#error")

        await row.locator("button").click()
        turns = page.locator("#turns > li.turn")
        await page.wait_for_function("document.querySelectorAll('#turns > li.turn').length === 2")
        first, second = turns.nth(0), turns.nth(1)
        assert await first.locator(".entry.user .text").text_content() == "Tell me about water."
        assert await second.locator(".entry.user .text").text_content() == "Tell me about the moon."
        answer = await first.locator(".entry.assistant .text").text_content() or ""
        assert answer.strip() and not await first.locator(".entry.assistant.cut").count()
        tool = await first.locator(".entry.tool").text_content() or ""
        assert tool.startswith("lookup_knowledge (server)"), tool
        badge = await second.locator(".entry.assistant.cut .badge").text_content() or ""
        assert badge.startswith("interrupted (cancelled by the client)"), badge
        for turn in (first, second):  # typed turns: no STT bar, the rest drawn
            chart = turn.locator("svg.latency")
            assert await chart.get_attribute("data-origin") == "response_created"
            fields = await chart.locator("rect.lat-bar").evaluate_all(
                "(bars) => bars.map((b) => b.dataset.field)"
            )
            assert "llm_first_token_ms" in fields and "stt_final_ms" not in fields, fields
            assert "heard here" not in (await chart.text_content() or "")
            assert (await turn.locator(".turn-cost").text_content() or "").startswith("cost $")
            assert "llm local-rule-based" in (
                await turn.locator(".turn-stages").text_content() or ""
            )
        plot = page.locator("#plot svg.latency-plot")
        assert await plot.locator("circle.point").count() == 2
        assert await plot.locator("circle.point.cut").count() == 1
        assert await page.text_content("#call-id") == session_id

        # The key stayed in the page's memory: not in the address, not in the browser's storage.
        assert API_KEY not in page.url
        stored = await page.evaluate(
            "JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
        )
        assert API_KEY not in stored
        shot = tmp_path / "history.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert errors == []
    NOTE_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, NOTE_COPY)
