"""Fixtures shared by the tests: the fake OpenAI server (the OpenAI provider and resilience
tests), piper speaking questions (the offline pipeline tests) and an aiortc Realtime client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
import pytest_asyncio

from deploy.fake_openai import FakeOpenAIServer
from loadtest.realtime_client import RealtimeClient
from pipeline.config import PiperConfig
from pipeline.native_threads import pin_native_threads
from pipeline.openai_providers import openai_client
from pipeline.piper_tts import PiperTextToSpeech

pin_native_threads()  # the test process too, before any test module imports numpy

# Admission by measured CPU (TRANSCEIVER_CPU_BUDGET_CORES, default 0.85 of a core) refuses a call
# when the process's CPU per call says one more would not fit. An offline pipeline call costs a
# good part of a core while it listens and speaks, so a test transceiver running two such calls
# would refuse a third that no test meant to refuse. The processes the tests start (they inherit
# this environment) admit by capacity alone unless a test sets a budget, as the admission tests
# in test_transceiver_http.py and test_transceiver_cpu_cost.py do.
os.environ.setdefault("TRANSCEIVER_CPU_BUDGET_CORES", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with end-to-end tests (marked ``slow``) first, each file's tests together and
    in their order. ``make test`` hands a file at a time to a worker (``--dist loadfile``, in
    this order: ``--no-loadscope-reorder``), so the long files start early and the many short
    ones fill the end, where a worker would otherwise wait for the other's last long file
    (pytest-xdist's own order, by number of tests, put the one-test end-to-end files last)."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file's own order kept


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    """A local OpenAI-compatible server (uvicorn on loopback), one per test module."""
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
async def client(server: FakeOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The pipeline's own client (``openai_client``: its transport on asyncio) for the server."""
    await server.reset()
    pipelines = openai_client("sk-test").with_options(base_url=f"{server.base_url}/v1", timeout=30)
    async with pipelines as opened:
        yield opened


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def piper() -> AsyncIterator[PiperTextToSpeech]:
    """Piper with its noise off (the same words, the same audio), on the module's loop."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    yield tts
    await tts.aclose()


@pytest_asyncio.fixture(loop_scope="module")
async def peer() -> AsyncIterator[RealtimeClient]:
    """An aiortc Realtime client: a microphone track and the oai-events channel."""
    client = RealtimeClient()
    try:
        yield client
    finally:
        await client.close()
