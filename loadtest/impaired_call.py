"""A spoken call through a bad network: the stack on the host, the client in its own network
namespace (``loadtest.impairment``).

``impaired_stack`` starts a real relay (one worker, its public port on the host's end of the
veth) in front of a pipeline transceiver (offline providers: pocketsphinx hears, the rule-based
agent answers, piper speaks; its HTTP on the same address, so the client reaches it from the
namespace). ``ImpairedStack.call`` opens an aiortc Realtime call from inside the namespace
(``NetnsLoop``), and ``spoken_turn`` asks one spoken question on it, starting the condition's
outage once the answer has been heard for a while, and returns what the client heard.
``chromium_in`` runs headless Chromium in the namespace: the web client makes the call there.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from playwright.async_api import Browser, async_playwright

from deploy.processes import (
    Process,
    free_port,
    metric_values,
    random_keys,
    relay_process,
    text,
    transceiver_process,
)
from deploy.waiting import eventually
from loadtest.browser import CHROMIUM, chromium_args
from loadtest.impairment import ImpairedPath, NetnsLoop
from loadtest.realtime_client import Event, RealtimeClient

READY_TIMEOUT_S = 90.0
TURN_TIMEOUT_S = 60.0
HEARD_BEFORE_OUTAGE_FRAMES = 25  # 500 ms of answer, then the outage: mid-answer
LEAN_EVENTS = "transceiver_lean_media_events_total"


@dataclass
class ImpairedStack:
    path: ImpairedPath
    relay: Process
    transceiver: Process
    base_url: str

    @asynccontextmanager
    async def call(self) -> AsyncIterator[tuple[NetnsLoop, RealtimeClient]]:
        """A Realtime call from the client's namespace: its loop and the client."""
        async with NetnsLoop(self.path.netns) as netns:
            client = await netns.run(_opened(self.base_url))
            try:
                yield netns, client
            finally:
                await netns.run(client.close())

    async def lean_events(self) -> dict[str, float]:
        """The transceiver's lean media counters (lost, recovered_fec, concealed_plc, ...)."""
        async with httpx.AsyncClient(timeout=10) as http:
            exposition = (await http.get(self.base_url + "/metrics")).text
        return metric_values(exposition, LEAN_EVENTS)


async def _opened(base_url: str) -> RealtimeClient:
    client = RealtimeClient()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            await client.connect(http, base_url)
    except BaseException:
        await client.close()
        raise
    return client


@asynccontextmanager
async def impaired_stack(log_dir: Path, media_path: str = "aiortc") -> AsyncIterator[ImpairedStack]:
    """A relay and a pipeline transceiver on the host, reached by the client over the path."""
    with ImpairedPath(log_dir) as path:
        keys = random_keys()
        link = ("127.0.0.1", free_port())
        public = f"{path.host}:{free_port(host=path.host)}"
        http = (path.host, free_port(socket.SOCK_STREAM, host=path.host))
        relay_http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        env = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # offline, whatever the host
        env |= {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}
        # no drain at the stop: a call whose client is gone (a failed test's browser closed
        # without hanging up) would hold the transceiver for its 30 s, past Process.stop's 15
        env["TRANSCEIVER_DRAIN_TIMEOUT_S"] = "0"
        transceiver = transceiver_process(
            "transceiver", link, http, public, keys, log_dir, env,
            agent="pipeline", media_path=media_path,
        )  # fmt: skip
        relay = relay_process(public, [link], keys, relay_http, log_dir, workers=1)
        try:
            await _started(transceiver, relay, f"http://{text(http)}")
            yield ImpairedStack(path, relay, transceiver, f"http://{text(http)}")
        finally:
            await path.aclose()
            await relay.stop()
            await transceiver.stop()


async def _started(transceiver: Process, relay: Process, base_url: str) -> None:
    transceiver.start()
    relay.start()
    await transceiver.ready(timeout_s=READY_TIMEOUT_S)
    await relay.ready(timeout_s=READY_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=10) as http:

        async def keyed() -> bool:
            exposition = (await http.get(base_url + "/metrics")).text
            return metric_values(exposition, "transceiver_link_keyed_relays").get("", 0) >= 1

        await eventually(keyed, 30.0, "the transceiver keyed the relay's worker")


@dataclass(frozen=True)
class Turn:
    question: Event  # conversation.item.input_audio_transcription.completed
    done: Event  # response.done
    heard: bytes  # 48 kHz mono s16 PCM the client heard of the answer


async def spoken_turn(
    stack: ImpairedStack, netns: NetnsLoop, client: RealtimeClient, question: bytes
) -> Turn:
    """Say ``question``; wait for the answer's audio to end (the outage, if the condition has
    one, starts ``HEARD_BEFORE_OUTAGE_FRAMES`` into it)."""
    start, heard_from = len(client.events), len(client.heard)
    await netns.run(_say(client, question))
    if stack.path.impairment.outage_ms:
        await eventually(
            lambda: loud_frames(client.heard[heard_from:]) >= HEARD_BEFORE_OUTAGE_FRAMES,
            TURN_TIMEOUT_S,
            "the answer's audio before the outage",
        )
        await stack.path.outage()
    done = await netns.run(client.wait_for("response.done", after=start, timeout_s=TURN_TIMEOUT_S))
    kind = "output_audio_buffer.stopped"
    await netns.run(client.wait_for(kind, after=start, timeout_s=TURN_TIMEOUT_S))
    transcribed = "conversation.item.input_audio_transcription.completed"
    asked = await netns.run(client.wait_for(kind=transcribed, after=start))
    return Turn(asked, done, b"".join(client.heard[heard_from:]))


async def _say(client: RealtimeClient, pcm: bytes) -> None:
    client.mic.say(pcm)  # on the client's loop, which plays it out


def loud_frames(frames: list[bytes]) -> int:
    """How many of the 20 ms frames are audible (answer, not silence)."""
    return sum(1 for frame in frames if np.abs(np.frombuffer(frame, np.int16)).max() > 500)


@asynccontextmanager
async def chromium_in(
    path: ImpairedPath, fake_audio: Path | None, origin: str
) -> AsyncIterator[Browser]:
    """Headless Chromium running in the path's namespace (``ip netns exec`` in front of it;
    Playwright drives it over pipes, which cross namespaces), its microphone playing
    ``fake_audio`` (None: Chromium's fake device, for a page that scripts its own); the web
    client's ``origin`` (plain HTTP, not loopback) counts as secure, as getUserMedia requires."""
    wrapper = path.log_dir / "chromium-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {path.netns} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(wrapper), headless=True, args=_args(fake_audio, path.host, origin)
        )
        try:
            yield browser
        finally:
            await browser.close()


def _args(fake_audio: Path | None, host: str, origin: str) -> list[str]:
    """``loadtest.browser``'s flags; the host's address reachable as 127.0.0.1 is there."""
    rules = "--host-resolver-rules="
    args = [
        a + f" , EXCLUDE {host}" if a.startswith(rules) else a for a in chromium_args(fake_audio)
    ]
    return [*args, f"--unsafely-treat-insecure-origin-as-secure={origin}"]
