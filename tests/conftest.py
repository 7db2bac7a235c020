"""Fixtures shared by the tests: the fake OpenAI server (the OpenAI provider and resilience
tests) and piper speaking questions (the offline pipeline tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest
import pytest_asyncio

from deploy.fake_openai import FakeOpenAIServer
from pipeline.config import PiperConfig
from pipeline.native_threads import pin_native_threads
from pipeline.piper_tts import PiperTextToSpeech

pin_native_threads()  # the test process too, before any test module imports numpy


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    """A local OpenAI-compatible server (uvicorn on loopback), one per test module."""
    with FakeOpenAIServer() as running:
        yield running


@pytest.fixture
async def client(server: FakeOpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    await server.reset()
    async with server.openai_client() as opened:
        yield opened


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def piper() -> AsyncIterator[PiperTextToSpeech]:
    """Piper with its noise off (the same words, the same audio), on the module's loop."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    yield tts
    await tts.aclose()
