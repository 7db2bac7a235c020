"""Fixtures shared by the OpenAI provider and resilience tests: the fake OpenAI server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from deploy.fake_openai import FakeOpenAIServer
from pipeline.native_threads import pin_native_threads

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
