"""Tools the language model may call: a registry of Python callables with JSON-schema parameters.

I/O layer (it awaits tool code and client answers). The engine hands every ``ToolCall`` of the
model to :meth:`ToolRegistry.execute` and feeds the ``ToolResult`` back as a ``tool`` message.
Failures never raise out of ``execute``: unknown tool, malformed or invalid arguments, an
exception or a timeout become an error result the model can read and recover from.

Client-executed tools: a :class:`Tool` with ``run=None``. The engine never executes one: a
call to it ends the response (OpenAI Realtime's flow), and the client's answer comes back as a
``function_call_output`` item (``ConversationEngine.add_tool_output``) before its next
``response.create``. ``execute`` answers such a call with an error result.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.knowledge import KnowledgeBase
from pipeline.providers import ToolCall, ToolResult, ToolSpec
from pipeline.untrusted_json import JsonInputError, decode

ToolFunction = Callable[[dict[str, Any]], Awaitable[str] | str]
JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    run: ToolFunction | None = None  # None: the client executes it

    @property
    def client_side(self) -> bool:
        return self.run is None


class ToolArgumentError(ValueError):
    pass


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = (), *, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.spec.name in self._tools:
            raise ValueError(f"tool {tool.spec.name!r} is already registered")
        self._tools[tool.spec.name] = tool

    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def is_client_side(self, name: str) -> bool:
        tool = self._tools.get(name)
        return tool is not None and tool.client_side

    async def execute(self, call: ToolCall) -> ToolResult:
        tool = self._tools.get(call.name)
        if tool is None:
            return _error(call, f"unknown tool {call.name!r}")
        if tool.run is None:
            return _error(call, f"tool {call.name!r} runs on the client")
        try:
            arguments = parse_arguments(tool.spec, call.arguments)
            async with asyncio.timeout(self.timeout_s):
                output = await _run(tool.run, arguments)
        except ToolArgumentError as error:
            return _error(call, str(error))
        except TimeoutError:
            return _error(call, f"tool {call.name!r} timed out after {self.timeout_s} s")
        except Exception as error:  # a tool's bug must not end the conversation
            return _error(call, f"tool {call.name!r} failed: {type(error).__name__}: {error}")
        return ToolResult(call, output, ok=True)


async def _run(run: ToolFunction, arguments: dict[str, Any]) -> str:
    result = run(arguments)
    return await result if inspect.isawaitable(result) else result


def _error(call: ToolCall, message: str) -> ToolResult:
    return ToolResult(call, json.dumps({"error": message}), ok=False)


def parse_arguments(spec: ToolSpec, arguments: str) -> dict[str, Any]:
    """JSON text -> dict, checked against the spec's top-level properties and required keys."""
    try:
        parsed = decode(arguments or "{}")
    except JsonInputError as error:
        raise ToolArgumentError(f"arguments of {spec.name!r} are not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ToolArgumentError(f"arguments of {spec.name!r} must be a JSON object")
    properties: Mapping[str, Any] = spec.parameters.get("properties", {})
    for name in spec.parameters.get("required", ()):
        if name not in parsed:
            raise ToolArgumentError(f"{spec.name!r} needs argument {name!r}")
    for name, value in parsed.items():
        _check_type(spec.name, name, value, properties.get(name, {}).get("type"))
    return parsed


def _check_type(tool: str, name: str, value: Any, expected: str | None) -> None:
    if expected is None or expected not in JSON_TYPES:
        return
    wrong_bool = isinstance(value, bool) and expected in ("integer", "number")
    if wrong_bool or not isinstance(value, JSON_TYPES[expected]):
        raise ToolArgumentError(f"argument {name!r} of {tool!r} must be {expected}")


# --- built-in tools ---------------------------------------------------------------------------


def current_time_tool(wall_clock: Callable[[], datetime] | None = None) -> Tool:
    """The current UTC time and date; ``wall_clock`` is injectable so answers are testable.
    The result is short, as a local model reads it before it says a word, at tens of tokens a
    second on shared cores: ``{"time": "09:05", "date": "Monday 2 March 2026", "timezone":
    "UTC"}``, the date as it is said (no model has to turn "2026-03-02" into words). With only
    the time and the weekday, the local model answered "what's the date?" with them and "what
    year is it?" with 2023; with the date, a time turn reads 72-74 tokens instead of 64-66
    (76-78 with the weekday a field of its own; the hour and minute repeated in fields of
    their own cost 12 more)."""
    now = wall_clock or (lambda: datetime.now(UTC))

    def run(_: dict[str, Any]) -> str:
        moment = now()
        return json.dumps(
            {
                "time": moment.strftime("%H:%M"),
                "date": f"{moment:%A} {moment.day} {moment:%B %Y}",
                "timezone": moment.tzname() or "UTC",
            }
        )

    spec = ToolSpec("current_time", "The current time (24-hour clock), weekday and date.")
    return Tool(spec, run)


def lookup_knowledge_tool(knowledge: KnowledgeBase) -> Tool:
    """Search the knowledge file by keywords."""

    def run(arguments: dict[str, Any]) -> str:
        entry = knowledge.search(arguments["query"])
        if entry is None:
            return json.dumps({"found": False, "topics": knowledge.titles})
        return json.dumps({"found": True, "title": entry.title, "answer": entry.answer})

    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to look up"}},
        "required": ["query"],
    }
    spec = ToolSpec("lookup_knowledge", "Look a topic up in the knowledge file.", parameters)
    return Tool(spec, run)


def builtin_tools(
    knowledge: KnowledgeBase, wall_clock: Callable[[], datetime] | None = None
) -> list[Tool]:
    return [current_time_tool(wall_clock), lookup_knowledge_tool(knowledge)]
