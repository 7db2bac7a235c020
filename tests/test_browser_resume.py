"""Acceptance: the web client resumes its session by itself after its transceiver is SIGKILLed.

Everything is real: ``python -m deploy.local --transceivers 2`` (Redis, the relay, two
pipeline transceivers and the front door the page is served by and signals to), headless
Chromium running the web client, speech in and out. The page asks "Tell me about water." and
hears the answer; the transceiver that owns the session (the one whose ``/readyz`` counts it) is
SIGKILLed by PID; the page must notice, re-offer naming its session through the front door,
land on the surviving transceiver and show "resumed" with the same session id. Then it asks
"What did I just ask?", which only the stored conversation can answer, and must hear the answer.
The time from the kill to the first audible sample of that answer in the page is printed.
Moving the session did not end it (the stored session is live, under the new owner); the
page's **Hang up** button does (a resume with its token then answers 410 ``session_ended``).

The microphone: Chromium's file-backed fake device plays one WAV from the moment the page opens
the microphone, and the page opens it again when it resumes (restarting the file). So the page's
getUserMedia is pointed at a WebAudio stream instead, and the test speaks each question into it
when the conversation is ready for it (``loadtest.browser.MIC_JS``). Everything after the
microphone is the client's own code path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page
from test_sdp import CHROME_OFFER

from deploy.launched import Launched, launched
from deploy.redis_server import redis_server_binary
from deploy.waiting import poll
from loadtest.browser import MIC_JS, chromium, recorded_audio
from loadtest.voice_audio import Speaker, hear, voiced, write_wav
from relay.wire.redis_config import RedisConfig
from transceiver.store.errors import SessionEndedError
from transceiver.store.journal import RESUME_TOKEN_HEADER, SESSION_HEADER
from transceiver.store.keys import SessionState
from transceiver.store.sessions import RedisSessionStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server"),
]
API_KEY = "vr-resume-" + os.urandom(12).hex()
QUESTION = "Tell me about water."
FOLLOW_UP = "What did I just ask?"
CALLS_PATH = "/v1/realtime/calls"
TRANSCRIPT_JS = (
    "[...document.querySelectorAll('#transcript .entry .text')].map((e) => e.textContent)"
)
ANSWER_WORDS = {"you", "asked", "tell", "about", "water"}
TURN_TIMEOUT_S = 60.0
RESUME_TIMEOUT_S = 90.0  # ICE notices the loss, the grace period, up to 5 attempts with backoff
HANG_UP_TIMEOUT_S = 10.0
STACK_ENV = {
    "TRANSCEIVER_API_KEY": API_KEY,
    "OPENAI_API_KEY": "",  # the offline agent, whatever the environment says
    "OPENAI_BASE_URL": "",
    "PIPELINE_PIPER_NOISE_SCALE": "0",  # deterministic speech, easier to recognise
    "PIPELINE_PIPER_NOISE_W_SCALE": "0",
    # the fixed replies not spoken ahead as each transceiver starts (tests/test_speech_prewarm.py
    # tests that): ~5 CPU-s each, spent while the page's call runs
    "PIPELINE_SPEECH_PREWARM": "0",
}


# --- the page ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    question: str  # as the server transcribed it
    answer: str  # the answer's transcript
    item_id: str


async def spoken(tmp_path: Path) -> dict[str, str]:
    """The two questions as base64 WAVs (piper, noise off)."""
    clips = {}
    async with Speaker() as speaker:
        for name, text in (("question", QUESTION), ("follow_up", FOLLOW_UP)):
            path = write_wav(tmp_path / f"{name}.wav", await speaker.speak(text))
            clips[name] = base64.b64encode(path.read_bytes()).decode()
    return clips


async def event_count(page: Page) -> int:
    return int(await page.evaluate("window.voicerelay.events.length"))


async def wait_event(page: Page, predicate: str, after: int = 0, timeout_s: float = 30.0) -> Any:
    """The first event at index >= ``after`` satisfying the JS ``predicate`` on ``e``."""
    script = f"window.voicerelay.events.slice({after}).find((e) => {predicate}) || null"
    handle = await page.wait_for_function(script, timeout=timeout_s * 1000, polling=100)
    return await handle.json_value()


async def ask(page: Page, clip_b64: str) -> Turn:
    """Speak a clip into the microphone; the completed turn it started."""
    mark = await event_count(page)
    await page.evaluate("(clip) => window.__testMic.say(clip)", clip_b64)
    done = "e.type === 'conversation.item.input_audio_transcription.completed'"
    heard = await wait_event(page, done, mark, TURN_TIMEOUT_S)
    ok = "e.type === 'response.done' && e.response.status === 'completed'"
    await wait_event(page, ok, mark, TURN_TIMEOUT_S)
    await wait_event(page, "e.type === 'output_audio_buffer.stopped'", mark, TURN_TIMEOUT_S)
    spoken = await wait_event(page, "e.type === 'response.output_audio_transcript.done'", mark)
    return Turn(heard["transcript"], spoken["transcript"], heard["item_id"])


async def heard_at_ms(page: Page, turn: Turn) -> float:
    """Date.now() in the page when the answer to ``turn`` first became audible there."""
    script = (
        f"window.voicerelay.turns.find((t) => t.item_id === '{turn.item_id}'"
        " && t.heard_at_ms !== null)?.heard_at_ms ?? null"
    )
    handle = await page.wait_for_function(script, timeout=10_000, polling=100)
    return float(await handle.json_value())


async def connection_states_since(page: Page, since_ms: float) -> list[tuple[float, str]]:
    """``(ms after since_ms, state)`` of each connection state the page showed since then."""
    states = await page.evaluate(
        "(since) => window.voicerelay.states"
        ".filter((s) => s.name === 'connection' && s.at_ms >= since)",
        since_ms,
    )
    return [(float(s["at_ms"]) - since_ms, str(s["value"])) for s in states]


# --- the stack ---------------------------------------------------------------------------------


async def mint(stack: Launched) -> str:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            stack.url + "v1/realtime/client_secrets", json={}, headers=headers
        )
    assert response.status_code == 200, response.text
    return str(response.json()["value"])


async def sessions_per_transceiver(stack: Launched) -> list[int]:
    """Each transceiver's live session count, asked directly (not through the front door)."""
    counts = []
    async with httpx.AsyncClient(timeout=5) as http:
        for url in stack.transceiver_urls:
            try:
                counts.append(int((await http.get(url + "readyz")).json()["sessions"]))
            except httpx.ConnectError:
                counts.append(-1)  # not running
    return counts


async def aim_next_request_at(stack: Launched, dead: str) -> None:
    """Make the front door's next request start at the ``dead`` backend, so that the page's
    resume offer meets it and has to fail over. Two backends take turns; a probe that did not
    meet the dead one leaves the turn to it. (The page sends nothing meanwhile: it is still
    waiting for ICE to notice the loss.)"""
    refused = f"{dead} refused GET /livez"
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(2):
            seen = sum(refused in line for line in stack.lines)
            assert (await http.get(stack.url + "livez")).status_code == 200
            with contextlib.suppress(AssertionError):
                await wait_lines(stack, refused, seen + 1, timeout_s=1.0)
                continue  # the probe met the dead one: the next turn is the live one's
            return
    raise AssertionError(f"two probes in a row met {dead}:\n{stack.tail()}")


async def wait_lines(stack: Launched, text: str, count: int, timeout_s: float) -> None:
    await poll(
        lambda: sum(text in line for line in stack.lines),
        lambda seen: seen >= count,
        timeout_s,
        lambda _: f"no {text!r} from the stack:\n{stack.tail()}",
        interval_s=0.05,
    )


def redis_url(stack: Launched) -> str:
    for line in stack.lines:
        if "redis: redis://" in line:
            return line.split("redis: ", 1)[1].split()[0]
    raise AssertionError(f"the stack started no Redis:\n{stack.tail()}")


async def stored(stack: Launched, session_id: str) -> SessionState:
    store = RedisSessionStore.from_config(RedisConfig(url=redis_url(stack)))
    try:
        return await store.load(session_id)
    finally:
        await store.aclose()


async def ended(stack: Launched, session_id: str) -> None:
    """Wait until the stored session has ended (its end is written behind, as every write)."""

    async def has_ended() -> bool:
        try:
            await stored(stack, session_id)
        except SessionEndedError:
            return True
        return False

    await poll(
        has_ended,
        bool,
        HANG_UP_TIMEOUT_S,
        lambda _: f"the hung-up session never ended:\n{stack.tail()}",
        interval_s=0.05,
    )


async def resume_offer(stack: Launched, session_id: str, token: str) -> httpx.Response:
    """A resume of the session through the front door, as the page would send it."""
    headers = {
        "Authorization": f"Bearer {await mint(stack)}",
        "Content-Type": "application/sdp",
        SESSION_HEADER: session_id,
        RESUME_TOKEN_HEADER: token,
    }
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(stack.url + CALLS_PATH[1:], content=CHROME_OFFER, headers=headers)


def contents(state: SessionState) -> list[tuple[str, str]]:
    return [(item["role"], item["content"]) for item in state.items]


@contextlib.asynccontextmanager
async def client_page(stack: Launched) -> AsyncIterator[Page]:
    """The web client from the front door, connected with an ek_ secret, recording."""
    async with chromium() as browser:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.add_init_script(MIC_JS)
        await page.goto(stack.url)
        await page.wait_for_function("window.voicerelay !== undefined", timeout=10_000)
        key = await mint(stack)
        await page.evaluate("(key) => window.voicerelay.connect({key, record: true})", key)
        yield page
        await page.evaluate("window.voicerelay.hangup()")
        assert errors == []


# --- the test ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    owner: int  # index of the transceiver that owned the session
    address: str  # its HTTP host:port, now dead
    at_ms: float  # time.time() of the SIGKILL, in ms


async def kill_the_owner(stack: Launched) -> Kill:
    """SIGKILL (by PID) the transceiver whose /readyz counts the page's session."""
    counts = await sessions_per_transceiver(stack)
    assert sorted(counts) == [0, 1], counts
    owner = counts.index(1)
    pid = stack.child_pids[f"transceiver-{owner}"]
    at_ms = time.time() * 1000
    os.kill(pid, signal.SIGKILL)
    await wait_lines(stack, f"transceiver-{owner} (pid {pid}) exited with -9", 1, 10)
    address = stack.transceiver_urls[owner].removeprefix("http://").rstrip("/")
    return Kill(owner, address, at_ms)


async def wait_resumed(page: Page, session_id: str, after: int) -> None:
    """The page shows "resumed" and got session.created/updated for the same session."""
    await page.wait_for_function(
        "document.getElementById('state-connection').textContent === 'resumed'",
        timeout=RESUME_TIMEOUT_S * 1000,
        polling=50,
    )
    same = f"e.voicerelay?.session_id === '{session_id}'"
    await wait_event(page, f"e.type === 'session.created' && {same}", after)
    await wait_event(page, "e.type === 'session.updated'", after)


async def test_page_resumes_its_session_on_another_transceiver_after_a_sigkill(
    tmp_path: Path,
) -> None:
    clips = await spoken(tmp_path)
    args = ["--agent", "pipeline", "--transceivers", "2", "--auth", "required"]
    with launched(args, env=STACK_ENV) as stack:
        assert {"front-door", "transceiver-0", "transceiver-1"} <= set(stack.child_pids)
        assert len(stack.transceiver_urls) == 2 and stack.url not in stack.transceiver_urls
        async with client_page(stack) as page:
            created = await wait_event(page, "e.type === 'session.created'", timeout_s=15)
            session_id = created["voicerelay"]["session_id"]
            first = await ask(page, clips["question"])
            await heard_at_ms(page, first)  # the first answer was audible in the page
            before = await stored(stack, session_id)

            mark = await event_count(page)
            kill = await kill_the_owner(stack)
            await aim_next_request_at(stack, kill.address)
            await wait_resumed(page, session_id, mark)
            survivor = [-1 if i == kill.owner else 1 for i in range(2)]
            assert await sessions_per_transceiver(stack) == survivor

            audio_mark = int(await page.evaluate("window.voicerelay.recordedSamples()"))
            second = await ask(page, clips["follow_up"])
            first_audio_ms = await heard_at_ms(page, second) - kill.at_ms
            await asyncio.sleep(1.0)  # the tail of the answer into the recording
            samples, rate_hz = await recorded_audio(page)
            timeline = await connection_states_since(page, kill.at_ms)
            shown = await page.evaluate(TRANSCRIPT_JS)
            after = await stored(stack, session_id)  # moving it did not end it
            token = await page.evaluate("window.voicerelay.resumeInfo().token")
            await page.click("#hangup")  # the user hangs up: now it ends
            await ended(stack, session_id)
            refused = await resume_offer(stack, session_id, token)
    assert stack.process.returncode == 0, stack.tail()
    assert not stack.left_running, f"left running after Ctrl-C: {stack.left_running}"

    words = await hear(voiced(samples[audio_mark:], rate_hz), rate_hz)
    states = ", ".join(f"{state} +{ms:.0f} ms" for ms, state in timeline)
    print(
        f"\ntransceiver-{kill.owner} SIGKILLed; the page's connection then: {states}"
        f"\nkill to first answer audio heard in the page: {first_audio_ms:.0f} ms"
        f" (heard: {' '.join(words)!r})"
    )
    assert "water" in re.findall(r"[a-z']+", first.question.lower()), first
    assert first.answer.startswith("Water covers"), first
    assert [state for _, state in timeline][-1] == "resumed", timeline
    assert any(f"{kill.address} refused POST {CALLS_PATH}" in line for line in stack.lines)
    assert "ask" in re.findall(r"[a-z']+", second.question.lower()), second
    assert second.answer == f"You asked: {first.question.rstrip('?.! ')}.", second
    # the words of the question as heard (Moonshine hears piper's "about water" as "the bout water")
    assert "water" in re.findall(r"[a-z']+", second.answer.lower()), second
    assert len(ANSWER_WORDS & set(words)) >= 2, words
    assert after.owner_id != before.owner_id and after.token > before.token
    assert contents(after)[: len(before.items)] == contents(before)
    assert ("assistant", second.answer) in contents(after)
    # The transcript is the replayed conversation plus the new turn: nothing shown twice.
    assert shown.count(first.answer) == 1 and shown.count(second.answer) == 1, shown
    assert shown.index(first.answer) < shown.index(second.answer), shown
    assert refused.status_code == 410, refused.text
    assert refused.json()["error"]["code"] == "session_ended", refused.text
