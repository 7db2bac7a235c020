"""The product in a real browser: `make run`'s stack, headless Chromium, the web client.

Everything is real: ``python -m deploy.local`` (what `make run` runs) starts Redis, the relay
and a transceiver; Chromium loads the web client from the transceiver, its microphone plays a
WAV (a tone, or questions spoken by piper), and the call goes through the relay. The stack is
stopped with SIGINT (Ctrl-C) and every process it started must be gone.

One Chromium serves the module, a context of its own per test. The page's getUserMedia answers
with a WebAudio stream (``loadtest.browser.MIC_JS``; silence until a clip plays) into which each
test plays its WAV once its call is up: no lead-in of silence waited out, and one browser for
every test's recording (Chromium's file-backed fake device takes its file at launch).

The voice tests run the stack as in production (auth required): each page connects with an
``ek_`` secret minted by ``/v1/realtime/client_secrets`` carrying the session's instructions.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from deploy.launched import Launched, launched
from deploy.processes import metric_values
from deploy.waiting import poll
from loadtest.browser import MIC_JS, chromium, dominant_frequency_hz, recorded_audio
from loadtest.voice_audio import Speaker, hear, tone_pcm, voiced, write_wav

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
API_KEY = "vr-e2e-" + os.urandom(12).hex()
INSTRUCTIONS = "Answer from the knowledge file, briefly."
MOON_WORDS = {"moon", "earth", "days", "air", "weather", "kilometres", "thousand"}
TURN_TIMEOUT_S = 40.0


# --- the stacks --------------------------------------------------------------------------------


def assert_stopped_cleanly(stack: Launched) -> None:
    assert stack.process.returncode == 0, stack.tail()
    assert not stack.left_running, f"left running after Ctrl-C: {stack.left_running}"
    assert {"relay", "transceiver-0"} <= set(stack.child_pids), stack.tail()


@pytest.fixture(scope="module")
def voice_stack() -> Iterator[Launched]:
    """`make run` with the voice pipeline, auth required (production mode)."""
    args = ["--agent", "pipeline", "--auth", "required"]
    # the fixed replies not spoken ahead as the transceiver starts (tests/test_speech_prewarm.py
    # tests that): ~5 CPU-s, spent while the first call runs
    env = {"TRANSCEIVER_API_KEY": API_KEY, "PIPELINE_SPEECH_PREWARM": "0"}
    with launched(args, env=env) as stack:
        yield stack
    assert_stopped_cleanly(stack)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What each test says into the microphone once its call is up, as base64 WAVs. The
    barge-in: the second question 3.5 s after the first, while its answer plays; the first
    2 s after session.created, about where 3 s of silence from connect put it when a file
    fed the microphone (on a loaded machine the call's start slows its first turn)."""
    out = tmp_path_factory.mktemp("clips")
    async with Speaker() as speaker:
        await speaker.wav(out / "moon.wav", [0.5, "Tell me about the moon."])
        await speaker.wav(
            out / "barge.wav", [2.0, "Tell me about the moon.", 3.5, "What time is it?"]
        )
    return {name: base64.b64encode((out / f"{name}.wav").read_bytes()).decode()
            for name in ("moon", "barge")}  # fmt: skip


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium for the module (each start costs ~1 CPU-s); every page has its own context."""
    async with chromium() as running:
        yield running


async def say(page: Page, clip_b64: str) -> None:
    """Start playing a clip into the page's microphone (``MIC_JS``); returns at once."""
    await page.evaluate("(clip) => { window.__testMic.say(clip); }", clip_b64)


async def mint(stack: Launched, session: dict[str, Any] | None = None) -> str:
    body = {"session": session or {"type": "realtime", "instructions": INSTRUCTIONS}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            stack.url + "v1/realtime/client_secrets", json=body, headers=headers
        )
    assert response.status_code == 200, response.text
    value: str = response.json()["value"]
    return value


# --- the page --------------------------------------------------------------------------------


async def open_client(
    browser: Browser, url: str, init_script: str | None = None
) -> tuple[Page, list[str]]:
    """The web client loaded (``init_script`` run before its own scripts); its page errors."""
    page = await browser.new_page()  # in a context of its own (closing it closes the page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if init_script is not None:
        await page.add_init_script(init_script)
    await page.goto(url)
    await page.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
    return page, errors


@pytest_asyncio.fixture(loop_scope="module")
async def voice_page(
    request: pytest.FixtureRequest, voice_stack: Launched, browser: Browser, clips: dict[str, str]
) -> AsyncIterator[Page]:
    """A connected page; once its session is created its microphone plays
    ``clips[request.param]`` (default: it stays silent)."""
    page, errors = await open_client(browser, voice_stack.url, MIC_JS)
    try:
        key = await mint(voice_stack)
        await page.evaluate("(key) => window.voicerelay.connect({key, record: true})", key)
        await wait_event(page, "e.type === 'session.created'", 10.0)
        if hasattr(request, "param"):
            await say(page, clips[request.param])
        yield page
        await page.evaluate("window.voicerelay.hangup()")
        assert errors == []
    finally:
        await page.context.close()


async def wait_event(page: Page, predicate: str, timeout_s: float = TURN_TIMEOUT_S) -> Any:
    """The first received event satisfying the JS ``predicate`` on ``e``, waiting for it."""
    script = f"window.voicerelay.events.find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=timeout_s * 1000, polling=100)
    return await handle.json_value()


async def events_of(page: Page, kind: str) -> list[Any]:
    events: list[Any] = await page.evaluate(
        "(kind) => window.voicerelay.events.filter((e) => e.type === kind)", kind
    )
    return events


async def send(page: Page, event: dict[str, Any] | str) -> None:
    await page.evaluate("(evt) => window.voicerelay.send(evt)", event)


async def recorded_seconds(page: Page) -> float:
    return float(
        await page.evaluate(
            "(() => { const r = window.voicerelay.recording();"
            " return r.rate ? r.pcm16_b64.length * 3 / 4 / 2 / r.rate : 0; })()"
        )
    )


async def wait_recorded(page: Page, seconds: float, timeout_s: float) -> None:
    await poll(
        lambda: recorded_seconds(page),
        lambda got: got >= seconds,
        timeout_s,
        lambda got: f"only {got:.1f} s of remote audio after {timeout_s} s",
        interval_s=0.2,
    )


def loud_part(samples: np.ndarray[Any, Any], rate_hz: int) -> np.ndarray[Any, Any]:
    """The 20 ms blocks whose RMS is above 0.01, concatenated."""
    block = rate_hz // 50
    blocks = samples[: len(samples) // block * block].reshape(-1, block)
    loud = blocks[np.sqrt(np.mean(blocks**2, axis=1)) > 0.01]
    return loud.reshape(-1)


def user_text(text: str) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": content},
    }


# --- tests -----------------------------------------------------------------------------------


async def test_make_run_echo_call_through_the_relay_hears_the_440_hz_tone(
    browser: Browser, tmp_path: Path
) -> None:
    """Proves the browser path: page from the transceiver, media through the real relay."""
    tone = write_wav(tmp_path / "tone.wav", tone_pcm(440.0, 6.0)).read_bytes()
    with launched(["--agent", "echo"]) as stack:
        page, errors = await open_client(browser, stack.url, MIC_JS)
        try:
            await page.evaluate("window.voicerelay.connect({record: true})")
            assert await page.text_content("#state-connection") == "connected"
            await say(page, base64.b64encode(tone).decode())
            await wait_recorded(page, 3.0, timeout_s=20.0)
            samples, rate_hz = await recorded_audio(page)
            await page.evaluate("window.voicerelay.hangup()")
            assert errors == []
        finally:
            await page.context.close()
    assert_stopped_cleanly(stack)
    heard = loud_part(samples, rate_hz)
    assert len(heard) > rate_hz, "less than a second of the tone came back"
    assert abs(dominant_frequency_hz(heard, rate_hz) - 440.0) < 5.0


@pytest.mark.parametrize("voice_page", ["moon"], indirect=True)
async def test_spoken_question_is_transcribed_answered_and_heard(
    voice_page: Page, voice_stack: Launched
) -> None:
    page = voice_page
    created = (await events_of(page, "session.created"))[0]
    assert created["session"]["instructions"] == INSTRUCTIONS  # carried by the ek_ secret
    await wait_event(page, "e.type === 'input_audio_buffer.speech_started'")
    await wait_event(page, "e.type === 'input_audio_buffer.speech_stopped'")
    done = "e.type === 'conversation.item.input_audio_transcription.completed'"
    transcript = (await wait_event(page, done))["transcript"]
    assert "moon" in re.findall(r"[a-z']+", transcript.lower()), transcript
    response = await wait_event(page, "e.type === 'response.done'")
    assert response["response"]["status"] == "completed", response
    await wait_event(page, "e.type === 'output_audio_buffer.stopped'")
    await wait_recorded(page, await recorded_seconds(page) + 1.0, timeout_s=10.0)
    samples, rate_hz = await recorded_audio(page)
    words = await hear(voiced(samples, rate_hz), rate_hz)
    assert len(MOON_WORDS & set(words)) >= 2, words
    spoken = await wait_event(page, "e.type === 'response.output_audio_transcript.done'")
    assert "moon" in spoken["transcript"].lower()
    await assert_caller_dtx_heard(voice_stack)


async def assert_caller_dtx_heard(stack: Launched) -> None:
    """On the lean media path the answer asks for Opus DTX: Chromium sends next to nothing
    while its microphone is silent, and the transceiver fed the engine that silence."""
    async with httpx.AsyncClient(timeout=10) as http:
        exposition = (await http.get(stack.url + "metrics")).text
    lean = metric_values(exposition, "transceiver_lean_media_events_total")
    print(f"the transceiver's lean media: {lean}")
    if lean:  # (none on the aiortc path)
        assert lean["silence_fed"] > lean["rtp_in"], lean
        assert lean["lost"] == lean.get("lost_in_silence", 0) == 0, lean


@pytest.mark.parametrize("voice_page", ["barge"], indirect=True)
async def test_barge_in_clears_the_answer_and_answers_the_new_question(voice_page: Page) -> None:
    page = voice_page
    first = await wait_event(page, "e.type === 'response.created'")
    first_id = first["response"]["id"]
    cut = (
        f"(e.type === 'output_audio_buffer.cleared' && e.response_id === '{first_id}') ||"
        f" (e.type === 'response.done' && e.response.id === '{first_id}'"
        " && e.response.status === 'cancelled')"
    )
    await wait_event(page, cut)
    done = (
        f"e.type === 'response.done' && e.response.id !== '{first_id}'"
        " && e.response.status === 'completed'"
    )
    await wait_event(page, done)
    transcripts = await events_of(page, "conversation.item.input_audio_transcription.completed")
    assert len(transcripts) >= 2, transcripts
    assert "time" in re.findall(r"[a-z']+", transcripts[-1]["transcript"].lower()), transcripts
    first_done = [
        e for e in await events_of(page, "response.done") if e["response"]["id"] == first_id
    ]
    assert first_done, await events_of(page, "response.done")
    if first_done[0]["response"]["status"] == "completed":  # done before the barge-in, as
        # OpenAI's: its audio was cleared and its item truncated to the words played
        item_id = first_done[0]["response"]["output"][0]["id"]
        truncated = await events_of(page, "conversation.item.truncated")
        cleared = await events_of(page, "output_audio_buffer.cleared")
        assert any(e["item_id"] == item_id for e in truncated), truncated
        assert any(e["response_id"] == first_id for e in cleared), cleared


async def test_client_tool_round_trip_over_the_data_channel(voice_page: Page) -> None:
    page = voice_page
    tool = {"type": "function", "name": "current_time", "description": "The local time"}
    tool["parameters"] = {"type": "object", "properties": {}}
    await send(page, {"type": "session.update", "session": {"type": "realtime", "tools": [tool]}})
    updated = await wait_event(page, "e.type === 'session.updated'")
    assert [t["name"] for t in updated["session"]["tools"]] == ["current_time"]
    await send(page, user_text("What time is it?"))
    await send(page, {"type": "response.create"})
    call = await wait_event(page, "e.type === 'response.function_call_arguments.done'")
    assert call["name"] == "current_time", call
    await wait_event(page, "e.type === 'response.done'")
    output = {"type": "function_call_output", "call_id": call["call_id"]}
    output["output"] = json.dumps({"hour": 9, "minute": 0})
    await send(page, {"type": "conversation.item.create", "item": output})
    await send(page, {"type": "response.create"})
    spoken = await wait_event(page, "e.type === 'response.output_audio_transcript.done'")
    assert spoken["transcript"] == "It is nine o'clock in the morning.", spoken


async def test_bad_input_gets_error_events_and_the_session_goes_on(voice_page: Page) -> None:
    page = voice_page
    bad: list[tuple[dict[str, Any] | str, str, str | None]] = [
        ("{not json", "invalid_json", None),
        ({"type": "no.such.event"}, "invalid_value", "type"),
        (
            {"type": "session.update", "session": {"instructions": 7}},
            "invalid_type",
            "session.instructions",
        ),
        ({"type": "conversation.item.create", "item": "hello"}, "invalid_type", "item"),
        ({"type": "response.cancel"}, "response_cancel_not_active", None),
    ]
    for event, _, _ in bad:
        await send(page, event)
    await page.wait_for_function(
        f"window.voicerelay.events.filter((e) => e.type === 'error').length >= {len(bad)}",
        timeout=10_000,
    )
    errors = [e["error"] for e in await events_of(page, "error")]
    assert [e["code"] for e in errors] == [code for _, code, _ in bad], errors
    for error, (_, _, param) in zip(errors, bad, strict=True):
        if param is not None:
            assert error.get("param") == param, error
    await send(page, user_text("Tell me about the moon."))
    await send(page, {"type": "response.create"})
    spoken = await wait_event(page, "e.type === 'response.output_audio_transcript.done'")
    assert "moon" in spoken["transcript"].lower()
    assert await page.text_content("#state-connection") == "connected"
