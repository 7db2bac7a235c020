"""The call records' acceptance call, and the history page (``/static/history.html``) showing it,
in headless Chromium.

Everything is real: a redis-server, a relay and a pipeline transceiver (API key required, a
signed ``call.ended`` webhook to a receiver on loopback that fails its first delivery). Chromium
loads the live page and opens a call with an ``ek_`` secret; its microphone plays piper's speech:
"Tell me about the moon." (answered through the knowledge tool) and, while that answer plays,
"What time is it?": a spoken barge-in, then a second answer. Then a typed question, whose answer
the client cancels once heard. The page reports when it heard each answer
(``voicerelay.turn.heard``; a report naming no response of the call, or one reported already,
gets an ``error`` event) and hangs up. The call's record at ``GET /v1/calls/{id}`` has every
field the record promises; the webhook receiver gets it again after its refusal, one
idempotency id; the history page, opened with the API key typed into its field, lists the call
and shows its turns: transcripts, the waterfall with the client's heard time, the tool calls,
both interruptions and the latency plot. Without the key it asks for one, and the key is never
kept in the address or the browser's storage. Its screenshot goes to ``SCREENSHOT`` (not the
repo).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Page
from records_stack import Receiver, recording_stack

from deploy.processes import Stack
from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import poll
from loadtest.browser import chromium
from loadtest.voice_audio import Speaker
from transceiver.webhook_signing import ID_HEADER, verify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "history-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEBHOOK_SECRET = "whsec-history-0123456789abcdef"
SCREENSHOT = Path("/tmp/history-acceptance.png")  # for the change's note, outside the repo
# The microphone: the second question starts 5 s after the first ends, while its answer plays.
SPOKEN: list[str | float] = [3.0, "Tell me about the moon.", 5.0, "What time is it?", 16.0]
TURN_TIMEOUT_S = 60.0


@dataclass
class Running:
    stack: Stack
    base_url: str
    receiver: Receiver


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    log_dir = tmp_path_factory.mktemp("history")
    receiver = await Receiver().start()
    redis = RedisServer(log_dir, "redis").start()
    env = {"TRANSCEIVER_API_KEY": API_KEY, "TRANSCEIVER_WEBHOOK_URL": receiver.url,
           "TRANSCEIVER_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "TRANSCEIVER_WEBHOOK_RETRY_FIRST_S": "0.05"}  # fmt: skip
    try:
        async with recording_stack(log_dir, redis, 1, env) as stack:
            yield Running(stack, stack.base_url(0), receiver)
    finally:
        redis.stop()
        receiver.close()


async def wait_event(page: Page, predicate: str, timeout_s: float = TURN_TIMEOUT_S) -> Any:
    script = f"window.voicerelay.events.find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=timeout_s * 1000, polling=50)
    return await handle.json_value()


async def make_the_call(page: Page, http: httpx.AsyncClient, base_url: str) -> str:
    """The spoken call (a barge-in, then an answer heard), hung up; the session id."""
    minted = await http.post(
        base_url + "/v1/realtime/client_secrets",
        json={"session": {"type": "realtime", "instructions": "Answer from the knowledge file."}},
        headers=AUTH,
    )
    assert minted.status_code == 200, minted.text
    await page.evaluate("(key) => window.voicerelay.connect({key})", minted.json()["value"])
    await wait_event(page, "e.type === 'session.created'", 10)
    session_id: str = await page.evaluate("window.voicerelay.resumeInfo().sessionId")

    first = (await wait_event(page, "e.type === 'response.created'"))["response"]["id"]
    await wait_event(page, cut_short(first))  # by the barge-in
    answered = await wait_event(
        page, f"e.type === 'response.done' && e.response.id !== '{first}'"
        " && e.response.status === 'completed'",
    )  # fmt: skip
    await heard_reported(page, first, answered["response"]["id"])
    await typed_and_cancelled(page)
    errors = await page.evaluate("window.voicerelay.events.filter((e) => e.type === 'error')")
    assert errors == [], errors
    # Strict: a response the call does not have, or one reported again, is an error event.
    for response_id in ("resp_nobody", first):
        heard = {"type": "voicerelay.turn.heard", "response_id": response_id}
        await page.evaluate("(e) => window.voicerelay.send(e)", {**heard, "event_id": response_id,
                            "after_output_started_ms": 5})  # fmt: skip
        refused = f"e.type === 'error' && e.error.event_id === '{response_id}'"
        error = await wait_event(page, refused, 10)
        assert error["error"]["param"] == "response_id", error
    await page.evaluate("window.voicerelay.hangup()")  # resolves once the server has it
    return session_id


async def heard_reported(page: Page, *response_ids: str) -> None:
    """Until the page has told the server when it heard each of these answers."""
    await page.wait_for_function(
        f"{list(response_ids)!r}.every((id) => window.voicerelay.sent.some("
        "(e) => e.type === 'voicerelay.turn.heard' && e.response_id === id))",
        timeout=10_000,
    )


async def typed_and_cancelled(page: Page) -> None:
    """A typed question whose answer the client stops once the page has heard it (WebRTC's
    ``output_audio_buffer.clear``, which also cancels it while it is generated)."""
    item = {"type": "message", "role": "user"}
    item["content"] = [{"type": "input_text", "text": "Tell me about coffee."}]
    before = await page.evaluate(
        "window.voicerelay.events.filter((e) => e.type === 'response.created')"
        ".map((e) => e.response.id)"
    )
    await page.evaluate(
        "(events) => events.forEach((e) => window.voicerelay.send(e))",
        [{"type": "conversation.item.create", "item": item}, {"type": "response.create"}],
    )
    created = f"e.type === 'response.created' && !{before!r}.includes(e.response.id)"
    typed = (await wait_event(page, created))["response"]["id"]
    await heard_reported(page, typed)  # armed by its output_audio_buffer.started
    await page.evaluate("window.voicerelay.send({type: 'output_audio_buffer.clear'})")
    await wait_event(page, cut_short(typed))


def cut_short(response_id: str) -> str:
    """The answer was cut: cancelled while generated, or its audio cleared after its
    response.done (over WebRTC a response is done when generated, as OpenAI's)."""
    return (
        f"(e.type === 'response.done' && e.response.id === '{response_id}'"
        " && e.response.status === 'cancelled') ||"
        f" (e.type === 'output_audio_buffer.cleared' && e.response_id === '{response_id}')"
    )


async def ended_record(http: httpx.AsyncClient, base_url: str, session_id: str) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        response = await http.get(f"{base_url}/v1/calls/{session_id}", headers=AUTH)
        return response.json()  # type: ignore[no-any-return]

    def done(record: dict[str, Any]) -> bool:
        turns = record.get("turns") or []
        heard = [t for t in turns if t["heard"] is not None]
        return record.get("status") == "ended" and len(turns) >= 3 and len(heard) >= 3

    return await poll(read, done, 20, lambda last: f"the record never got there: {last}", 0.05)


async def test_a_spoken_call_with_a_barge_in_and_a_tool_is_recorded_announced_and_shown(
    running: Running, tmp_path: Path
) -> None:
    base = running.base_url
    wav = tmp_path / "questions.wav"
    async with Speaker() as speaker:
        await speaker.wav(wav, SPOKEN)
    called_s = time.time()
    async with chromium(wav) as browser, httpx.AsyncClient(timeout=30) as http:
        live = await browser.new_page()
        live_errors: list[str] = []
        live.on("pageerror", lambda exc: live_errors.append(str(exc)))
        # The server's 500 ms window: its turns are cut where the questions' pauses are,
        # whatever the load (with the page's default, semantic_vad, a loaded machine's late
        # decisions split or join them, and the script's barge-in and questions go astray).
        await live.goto(base + "/?turn_detection=server_vad")
        await live.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
        session_id = await make_the_call(live, http, base)
        assert live_errors == []
        await live.close()
        record = await ended_record(http, base, session_id)
        check_the_record(record, session_id, called_s)
        await check_the_history_page(browser, base, record)
    await check_the_webhook(running.receiver, record)


def check_the_record(record: dict[str, Any], session_id: str, called_s: float) -> None:
    """Every field the issue lists: ids, times, end, transceivers, config, and per turn."""
    assert (record["id"], record["session_id"]) == (session_id, session_id)
    (call_id,) = record["call_ids"]
    assert call_id.startswith("rtc_") and record["resumed_from"] is None
    assert called_s * 1000 - 1 <= record["started_at"] <= record["ended_at"] <= time.time() * 1000
    assert (record["status"], record["end_reason"]) == ("ended", "hangup")
    assert len(record["transceivers"]) == 1 and record["legs"][0]["transceiver"]
    (version,) = record["config_versions"]
    assert len(version["hash"]) == 16 and version["from_turn"] == 1
    assert version["config"]["instructions"] == "Answer from the knowledge file."
    turns = record["turns"]
    cut = {t["interrupted"]["by"]: t for t in turns if t["interrupted"] is not None}
    assert len(cut) == 2 == record["interruptions"], turns
    moon, coffee = cut["user"], cut["client"]
    asked = [t for t in turns if "time" in re.findall(r"[a-z']+", t["user"].lower())]
    assert "moon" in moon["user"].lower() and asked, turns
    time_turn = asked[-1]
    assert time_turn["index"] > moon["index"], turns
    interrupted = moon["interrupted"]
    assert interrupted["by"] == "user" and interrupted["played_ms"] > 0, interrupted
    assert record["started_at"] <= interrupted["at"] <= record["ended_at"]
    assert moon["assistant"] and time_turn["assistant"] and time_turn["interrupted"] is None
    assert moon["tools"][0]["name"] == "lookup_knowledge", moon["tools"]
    assert moon["tools"][0]["side"] == "server" and moon["tools"][0]["ok"]
    assert moon["tools"][0]["ms"] >= 0 and record["tool_calls"] >= 1
    for turn in (moon, time_turn):
        check_a_spoken_turn(turn)
    check_the_typed_turn(coffee)


def check_the_typed_turn(turn: dict[str, Any]) -> None:
    """Typed, and cancelled by the client once heard: timed from its response's creation, its
    heard time from the page's output_audio_buffer.started."""
    assert turn["user"] == "Tell me about coffee." and turn["origin"] == "response_created"
    assert turn["interrupted"]["played_ms"] > 0 and turn["latency_ms"]["stt"] is None, turn
    assert turn["end_of_turn"] is None, turn  # no speech ended it
    heard, first_out = turn["heard"], turn["timeline_ms"]["first_frame_out"]
    assert heard["after_speech_stopped_ms"] is None and heard["after_output_started_ms"] >= 0
    assert heard["after_origin_ms"] == round(first_out + heard["after_output_started_ms"], 1)


def check_a_spoken_turn(turn: dict[str, Any]) -> None:
    latency, heard = turn["latency_ms"], turn["heard"]
    assert turn["origin"] == "speech_stopped", turn
    assert turn["end_of_turn"] == {"kind": "server_vad", "silence_ms": 500}, turn
    assert latency["vad_silence"] == 500, latency
    for stage in ("stt", "llm_first_token", "tts_first_audio", "voice_to_voice"):
        assert latency[stage] is not None and latency[stage] >= 0, (stage, latency)
    assert heard["after_speech_stopped_ms"] > 0 and heard["after_output_started_ms"] >= 0, heard
    assert heard["after_origin_ms"] == heard["after_speech_stopped_ms"], heard
    assert turn["timeline_ms"]["first_frame_out"] == latency["voice_to_voice"]
    stages = turn["stages"]
    assert stages["stt"] == {"provider": "moonshine", "model": None}, stages
    assert stages["llm"] == {"provider": "local-rule-based", "model": None}, stages
    assert stages["tts"]["provider"].startswith("piper"), stages
    usage = turn["usage"]
    assert usage["audio_in_s"] > 0 and usage["audio_out_s"] > 0 and usage["tts_chars"] > 0
    assert turn["cost_usd"] == {"total": 0, "stt": 0, "llm": 0, "tts": 0}  # offline stages
    assert turn["detours"] == []  # nothing was retried or fell back


async def check_the_history_page(browser: Any, base: str, record: dict[str, Any]) -> None:
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
    row = page.locator(f'#calls tr[data-id="{record["id"]}"]')
    await row.wait_for(timeout=10_000)
    cells = [c.strip() for c in await row.locator("td").all_text_contents()]
    assert cells[2:4] == [str(len(record["turns"])), "hangup"] and cells[5] == "2", cells
    assert await page.is_hidden("#error")

    await row.locator("button").click()
    count = len(record["turns"])
    shown = f"document.querySelectorAll('#turns > li.turn').length === {count}"
    await page.wait_for_function(shown)
    assert await page.text_content("#call-id") == record["id"]
    turns = {t["index"]: page.locator(f'#turns > li.turn[data-index="{t["index"]}"]')
             for t in record["turns"]}  # fmt: skip
    for turn in record["turns"]:
        shown_turn = turns[turn["index"]]
        chart = shown_turn.locator("svg.latency")
        assert await chart.get_attribute("data-origin") == turn["origin"]
        fields = await chart.locator("rect.lat-bar").evaluate_all(
            "(bars) => bars.map((b) => b.dataset.field)"
        )
        spoken = turn["origin"] == "speech_stopped"  # every bar; typed: no STT bar
        assert ({"stt_final_ms", "heard_ms"} <= set(fields)) == spoken, fields
        assert "llm_first_token_ms" in fields, fields
        assert "heard by client" in (await chart.text_content() or "")
        assert (await shown_turn.locator(".turn-cost").text_content() or "").startswith("cost $0")
        stages = await shown_turn.locator(".turn-stages").text_content() or ""
        assert "llm local-rule-based" in stages, stages
        ended = "ended by" if turn["end_of_turn"] else "no speech"  # what ended the turn
        assert ended in stages, stages
        cut = turn["interrupted"]
        badges = await shown_turn.locator(".entry.assistant.cut .badge").all_text_contents()
        if cut is None:
            assert badges == []
        else:
            by = "barge-in" if cut["by"] == "user" else "cancelled by the client"
            assert badges[0].startswith(f"interrupted ({by}) after"), badges
        tools = await shown_turn.locator(".entry.tool").all_text_contents()
        assert [t.split(" (")[0] for t in tools] == [t["name"] for t in turn["tools"]], tools
    plot = page.locator("#plot svg.latency-plot")
    assert await plot.locator("circle.point").count() == count
    assert await plot.locator("circle.point.cut").count() == 2

    # The key stayed in the page's memory: not in the address, not in the browser's storage.
    assert API_KEY not in page.url
    stored = await page.evaluate(
        "JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
    )
    assert API_KEY not in stored
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert errors == []


async def check_the_webhook(receiver: Receiver, record: dict[str, Any]) -> None:
    """Refused once, delivered once more: one idempotency id, signed, the record it carries."""
    await poll(
        lambda: receiver.requests,
        lambda got: any(status == 200 for status, _, _ in got),
        20,
        lambda got: f"no delivery answered 200: {[s for s, _, _ in got]}",
        0.05,
    )
    assert [status for status, _, _ in receiver.requests] == [500, 200]
    ids = {headers[ID_HEADER.lower()] for _, headers, _ in receiver.requests}
    assert ids == {f"evt_{record['call_ids'][0]}"}
    for _, headers, body in receiver.requests:
        assert verify(WEBHOOK_SECRET, headers, body, time.time())
    event = json.loads(receiver.requests[-1][2])
    assert (event["type"], event["data"]["id"]) == ("call.ended", record["id"])
    assert len(event["data"]["turns"]) == len(record["turns"])
