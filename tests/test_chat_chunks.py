"""The chat chunk reader (``openai_providers.chat_events``) on streams of realistic size: an
answer of up to 600 chunks (OpenAI sends about a token a chunk) and tool calls whose
arguments come in up to 200 fragments. A stream as OpenAI sends it reads back to its words,
calls and usage; one with any JSON value put anywhere in it reads to those or stops at a
``StreamShapeError``, never another exception."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.openai_providers import chat_events
from pipeline.providers import LanguageModelEvent, TextDelta, ToolCall, Usage
from pipeline.streamed_json import StreamShapeError

SIZED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
FIELDS = (
    "choices", "delta", "content", "tool_calls", "index", "id", "function", "name",
    "arguments", "finish_reason", "usage", "prompt_tokens", "completion_tokens",
)  # fmt: skip


@dataclass
class Answer:
    pieces: list[str]
    calls: list[tuple[str, str, list[str]]]  # id, name, argument fragments
    usage: tuple[int, int]

    def chunks(self) -> list[dict[str, Any]]:
        """The stream OpenAI sends for it."""
        chunks = [_chunk({"role": "assistant", "content": ""})]
        chunks += [_chunk({"content": piece}) for piece in self.pieces]
        for index, (call_id, name, fragments) in enumerate(self.calls):
            function = {"name": name, "arguments": ""}
            first = {"index": index, "id": call_id, "type": "function", "function": function}
            chunks.append(_chunk({"tool_calls": [first]}))
            for fragment in fragments:
                more = {"index": index, "function": {"arguments": fragment}}
                chunks.append(_chunk({"tool_calls": [more]}))
        ending = "tool_calls" if self.calls else "stop"
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": ending}]})
        prompt, completion = self.usage
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        return [*chunks, {"choices": [], "usage": usage}]

    def events(self) -> list[LanguageModelEvent]:
        """What reading it gives."""
        deltas: list[LanguageModelEvent] = [TextDelta(piece) for piece in self.pieces if piece]
        calls = [ToolCall(i, n, "".join(fragments)) for i, n, fragments in self.calls]
        return [*deltas, *calls, Usage(*self.usage)]


def _chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


CALLS = st.tuples(
    st.text("abcdef0123456789", min_size=1, max_size=24).map(lambda s: f"call_{s}"),
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=30),
    st.lists(WORDS, max_size=200),
)
ANSWERS = st.builds(
    Answer,
    st.lists(WORDS, max_size=600),
    st.lists(CALLS, max_size=4),
    st.tuples(st.integers(0, 128_000), st.integers(0, 16_000)),
)


def read(chunks: list[object]) -> list[LanguageModelEvent]:
    async def stream() -> AsyncIterator[object]:
        for chunk in chunks:
            yield chunk

    async def collect() -> list[LanguageModelEvent]:
        return [event async for event in chat_events(stream())]

    return asyncio.run(collect())


@SIZED
@given(ANSWERS)
def test_a_stream_as_openai_sends_it_reads_back_to_its_words_calls_and_usage(
    answer: Answer,
) -> None:
    # each chunk as the wire has it: JSON text decoded again
    chunks: list[object] = [json.loads(json.dumps(chunk)) for chunk in answer.chunks()]
    assert read(chunks) == answer.events()


def _places(value: object) -> list[tuple[dict[str, Any] | list[Any], Any]]:
    """Every (container, key or index) inside ``value``, itself included as the stream's."""
    places: list[tuple[dict[str, Any] | list[Any], Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            places += [(node, key) for key in node] + [(node, key) for key in FIELDS]
            stack.extend(node.values())
        elif isinstance(node, list):
            places += [(node, index) for index in range(len(node))]
            stack.extend(node)
    return places


@st.composite
def damaged(draw: st.DrawFn) -> list[object]:
    """A stream as OpenAI sends it with one value (a chunk, or a field at any depth,
    present or not) replaced by any JSON value."""
    stream: list[object] = copy.deepcopy(draw(ANSWERS).chunks())  # type: ignore[arg-type]
    container, key = draw(st.sampled_from(_places(stream)))
    container[key] = draw(JSON_VALUES)
    return stream


@SIZED
@given(damaged())
def test_any_json_value_anywhere_in_a_stream_is_read_or_named_never_a_crash(
    stream: list[object],
) -> None:
    try:
        events = read(stream)
    except StreamShapeError as error:
        assert str(error).startswith("chat chunk"), error
    else:
        assert all(isinstance(e, TextDelta | ToolCall | Usage) for e in events)
        assert all(isinstance(e.text, str) for e in events if isinstance(e, TextDelta))
        for call in (e for e in events if isinstance(e, ToolCall)):
            assert all(isinstance(part, str) for part in (call.call_id, call.name, call.arguments))
