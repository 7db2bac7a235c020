"""OpenAI's Agents SDK for Python against our Realtime WebSocket: ``agents.realtime``'s runner.

A ``RealtimeRunner`` with a ``RealtimeAgent`` and a ``@function_tool`` connects, with the SDK's
own WebSocket model unchanged but for ``model_config``'s ``url`` and ``api_key``, to a transceiver
process (``--agent pipeline``, auth required) whose language model is the fake OpenAI server: it
answers "You said: …" and calls a tool whose name the user says, with ``{"query": <the words>}``.
The runner must get an answer to a text message, run the tool the model calls and have the
tool's output make the final answer, all through its public events.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from agents import function_tool
from agents.realtime import (
    AssistantMessageItem,
    RealtimeAgent,
    RealtimeHistoryUpdated,
    RealtimeRunner,
    RealtimeSession,
    RealtimeSessionEvent,
    RealtimeToolEnd,
    RealtimeToolStart,
)
from agents.realtime.items import AssistantAudio, AssistantText
from websocket_harness import EVENT_TIMEOUT_S, transceiver_process_with

from deploy.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.slow
API_KEY = "vr-agents-" + os.urandom(12).hex()
CAPACITY = 2
weather_queries: list[str] = []


@function_tool
def get_weather(query: str) -> str:
    """The weather for what the user asked about."""
    weather_queries.append(query)
    return "sunny"


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The transceiver's HTTP base URL."""
    log_dir = tmp_path_factory.mktemp("agents-realtime")
    with transceiver_process_with(server.base_url, API_KEY, CAPACITY, log_dir) as base_url:
        yield base_url


@pytest.fixture
async def session(transceiver: str) -> AsyncIterator[RealtimeSession]:
    agent = RealtimeAgent(name="weather", instructions="Be brief.", tools=[get_weather])
    url = transceiver.replace("http://", "ws://", 1) + "/v1/realtime?model=gpt-realtime"
    runner = RealtimeRunner(agent)
    weather_queries.clear()
    async with await runner.run(model_config={"url": url, "api_key": API_KEY}) as opened:
        yield opened


class Events:
    """Every event the session gives, kept, with waits on a condition (never on a time)."""

    def __init__(self, session: RealtimeSession) -> None:
        self.stream = session.__aiter__()
        self.seen: list[RealtimeSessionEvent] = []

    async def until(
        self, done: Callable[[RealtimeSessionEvent], bool], timeout_s: float = EVENT_TIMEOUT_S
    ) -> RealtimeSessionEvent:
        async with asyncio.timeout(timeout_s):
            while True:
                event = await anext(self.stream)
                self.seen.append(event)
                # an error would also be the runner refusing an event it cannot parse (one of
                # our voicerelay.* events: the WebSocket sends them only when asked)
                assert event.type != "error", event
                if done(event):
                    return event


def answers(event: RealtimeSessionEvent) -> list[str]:
    """The completed assistant answers of a ``history_updated`` event."""
    if not isinstance(event, RealtimeHistoryUpdated):
        return []
    return [
        " ".join(said(part) for part in item.content)
        for item in event.history
        if isinstance(item, AssistantMessageItem) and item.status == "completed"
    ]


def said(part: AssistantText | AssistantAudio) -> str:
    """What an answer's part says: its text, or its audio's transcript."""
    words = part.text if isinstance(part, AssistantText) else part.transcript
    return words or ""


async def test_a_text_message_gets_an_answer(session: RealtimeSession) -> None:
    events = Events(session)
    await session.send_message("hi there")
    event = await events.until(lambda e: bool(answers(e)))
    assert answers(event)[-1].split() == ["You", "said:", "hi", "there"], event
    assert not weather_queries


async def test_the_runner_calls_the_tool_and_its_output_makes_the_answer(
    session: RealtimeSession,
) -> None:
    events = Events(session)
    question = "Use get_weather for Oslo"
    await session.send_message(question)
    ended = await events.until(lambda e: isinstance(e, RealtimeToolEnd))
    assert isinstance(ended, RealtimeToolEnd)
    assert ended.tool.name == "get_weather"
    assert json.loads(ended.arguments) == {"query": question}
    assert ended.output == "sunny"
    assert weather_queries == [question], weather_queries
    event = await events.until(lambda e: bool(answers(e)))
    assert answers(event)[-1].split() == ["The", "get_weather", "tool", "says", "sunny."], event
    (started,) = [e for e in events.seen if isinstance(e, RealtimeToolStart)]
    assert started.arguments == ended.arguments
