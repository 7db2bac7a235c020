"""CPU a provider request costs this process, per kind, by the HTTP path that sends it.

``python -m loadtest.bench_provider_http`` (and ``make bench``) starts the fake OpenAI server
(``deploy.fake_openai``, its own process) and sends it the requests a turn makes through the
pipeline's own providers and ``openai_client``: a streamed chat completion (a 10-message
conversation, answered in ~17 chunks), a streamed transcription (2 s of audio, ~7 events) and
a speech request (~0.5 s of PCM in 4 pieces). Each round runs ``requests`` of a kind,
``concurrency`` at a time, once per path (``PATHS``): the providers' lean client
(``openai_http``, ``http="lean"``), and the SDK's request path on httpcore over our asyncio
backend (``asyncio``) or over httpx's own anyio one (``anyio``), the paths' order rotating
round by round; CPU is this process's (all threads), so the server's is not counted. The loop
is uvloop's, as the transceiver's is. Per kind and path: the median over the rounds of CPU ms
a request, and the ratios lean / asyncio and asyncio / anyio, each measured in the same run on
the same load. ``--profile PATH`` instead runs one path's rounds under cProfile and prints
where the time goes. The server waits 10 ms between a stream's pieces; ``quick`` (one round of
4 requests, the smoke test's: each path sends and reads each kind) has it wait
``QUICK_CHUNK_DELAY_S``, so the waits are no longer most of its time; pieces then come closer
together, more of them in a read, and its figures (chat's most) are lower than a stream's.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import uvloop

from deploy.fake_openai import FakeOpenAIServer
from pipeline.openai_providers import (
    OpenAILanguageModel,
    OpenAISpeechToText,
    OpenAITextToSpeech,
    openai_client,
)
from pipeline.providers import AudioChunk, Message

KINDS = ("chat", "transcription", "speech")
PATHS = ("lean", "asyncio", "anyio")  # the lean client; the SDK's path on either network
RATIOS = (("lean", "asyncio"), ("asyncio", "anyio"))  # (measured, its reference)
QUICK_CHUNK_DELAY_S = 0.002  # quick: the fake server's wait between a stream's pieces


def client_of(path: str) -> openai.AsyncOpenAI:
    """The pipeline's client sending the providers' requests by ``path``."""
    if path == "lean":
        return openai_client("sk-bench", "asyncio", http="lean")
    return openai_client("sk-bench", path, http="sdk")


SAMPLE_RATE_HZ = 16_000
QUESTION = "Tell me about the moon and how far away it is from the earth tonight please"


def conversation() -> list[Message]:
    """A system prompt and nine turns of talk, the last the user's question."""
    said: list[Message] = [Message("system", "You are a helpful voice assistant. Be brief.")]
    for turn in range(4):
        said.append(Message("user", f"Question number {turn} about the weather today?"))
        said.append(Message("assistant", f"Answer number {turn}: it is sunny and warm."))
    return [*said, Message("user", QUESTION)]


Request = Callable[[], Awaitable[None]]


def requests_of(client: openai.AsyncOpenAI) -> dict[str, Request]:
    """A request of each kind through providers made once (as a process makes them)."""
    model, stt, tts = (
        OpenAILanguageModel(client),
        OpenAISpeechToText(client),
        OpenAITextToSpeech(client),
    )
    said = conversation()

    async def chat() -> None:
        async for _ in model.generate(said, []):
            pass

    async def audio() -> AsyncIterator[AudioChunk]:
        yield AudioChunk(bytes(2 * SAMPLE_RATE_HZ * 2), SAMPLE_RATE_HZ)  # 2 s

    async def transcription() -> None:
        async for _ in stt.transcribe(audio()):
            pass

    async def speech() -> None:
        async for _ in tts.synthesize("Hello there, how are you?"):
            pass

    return {"chat": chat, "transcription": transcription, "speech": speech}


async def cpu_ms_a_request(request: Request, requests: int, concurrency: int) -> float:
    """This process's CPU ms a request over ``requests`` of them, ``concurrency`` at a time."""
    started = time.process_time()
    for first in range(0, requests, concurrency):
        batch = min(concurrency, requests - first)
        await asyncio.gather(*(request() for _ in range(batch)))
    return (time.process_time() - started) * 1000 / requests


async def measure(
    base_url: str, rounds: int, requests: int, concurrency: int, warm_batches: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Per kind and path, each round's CPU ms a request, after ``warm_batches`` batches of
    each unmeasured."""
    os.environ["OPENAI_BASE_URL"] = f"{base_url}/v1"
    clients = {path: client_of(path) for path in PATHS}
    asked = {path: requests_of(client) for path, client in clients.items()}
    figures: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PATHS} for k in KINDS}
    try:
        for of_path in asked.values():  # the pool's connections opened, code paths warm
            for request in of_path.values():
                await cpu_ms_a_request(request, warm_batches * concurrency, concurrency)
        for number in range(rounds):
            shift = number % len(PATHS)
            order = PATHS[shift:] + PATHS[:shift]
            for kind in KINDS:
                for path in order:
                    cost = await cpu_ms_a_request(asked[path][kind], requests, concurrency)
                    figures[kind][path].append(cost)
    finally:
        for client in clients.values():
            await client.close()
    return figures


def summary(figures: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Per kind: the median CPU ms a request of each path, and each ratio (``RATIOS``)."""
    result: dict[str, float] = {}
    for kind, by_path in figures.items():
        medians = {path: statistics.median(costs) for path, costs in by_path.items()}
        for path, cost in medians.items():
            result[f"{kind} CPU ms a request ({path})"] = round(cost, 3)
        for measured, reference in RATIOS:
            ratio = medians[measured] / medians[reference]
            result[f"{kind} {measured} / {reference}"] = round(ratio, 3)
    return result


def run_provider_http_bench(
    quick: bool = False, rounds: int = 9, requests: int = 20, concurrency: int = 4
) -> dict[str, Any]:
    warm_batches = 2
    if quick:  # one batch still opens the pool's connections and runs each path's code
        rounds, requests, warm_batches = 1, 4, 1
    with FakeOpenAIServer() as server:
        if quick:
            uvloop.run(server.control(chunk_delay_s=QUICK_CHUNK_DELAY_S))
        figures = uvloop.run(measure(server.base_url, rounds, requests, concurrency, warm_batches))
    return {
        **summary(figures),
        "rounds": rounds,
        "requests_a_round": requests,
        "concurrency": concurrency,
        "loadavg after": _loadavg(),
    }


def profile(path: str, rounds: int, requests: int, concurrency: int, top: int) -> str:
    """cProfile's view of one path's requests (all kinds), the ``top`` by own time."""

    async def run(base_url: str) -> None:
        os.environ["OPENAI_BASE_URL"] = f"{base_url}/v1"
        client = client_of(path)
        asked = requests_of(client)
        for request in asked.values():
            await cpu_ms_a_request(request, 2 * concurrency, concurrency)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(rounds):
            for request in asked.values():
                await cpu_ms_a_request(request, requests, concurrency)
        profiler.disable()
        await client.close()
        stats_out = io.StringIO()
        stats = pstats.Stats(profiler, stream=stats_out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        printed.append(stats_out.getvalue())

    printed: list[str] = []
    with FakeOpenAIServer() as server:
        uvloop.run(run(server.base_url))
    return printed[0]


def _loadavg() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_provider_http", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds per kind and path")
    parser.add_argument("--requests", type=int, default=20, help="requests a round")
    parser.add_argument("--concurrency", type=int, default=4, help="requests at a time")
    parser.add_argument("--profile", choices=PATHS, help="profile this path instead")
    parser.add_argument("--top", type=int, default=40, help="functions shown by --profile")
    args = parser.parse_args(argv)
    for name in ("rounds", "requests", "concurrency", "top"):
        if not 1 <= getattr(args, name) <= 10_000:
            parser.error(f"--{name} must be between 1 and 10000")
    if args.profile:
        print(profile(args.profile, args.rounds, args.requests, args.concurrency, args.top))
        return 0
    before = _loadavg()
    result = run_provider_http_bench(False, args.rounds, args.requests, args.concurrency)
    print(f"loadavg before: {before}")
    for name, value in result.items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
