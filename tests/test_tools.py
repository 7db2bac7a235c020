"""Tool registry: server tools, argument checks, failures as results, client-side tools."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.knowledge import load_knowledge
from pipeline.providers import ToolCall, ToolSpec
from pipeline.tools import Tool, ToolRegistry, builtin_tools

ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)


def add(arguments: dict[str, Any]) -> str:
    return json.dumps({"sum": arguments["a"] + arguments["b"]})


async def slow(_: dict[str, Any]) -> str:
    await asyncio.sleep(10)
    return "never"


def broken(_: dict[str, Any]) -> str:
    raise KeyError("missing")


def registry(**kwargs: Any) -> ToolRegistry:
    tools = [
        Tool(ADD, add),
        Tool(ToolSpec("slow", "Sleeps."), slow),
        Tool(ToolSpec("broken", "Fails."), broken),
        Tool(ToolSpec("geolocate", "Runs in the browser.")),
    ]
    return ToolRegistry(tools, **kwargs)


def call(name: str, arguments: str = "{}") -> ToolCall:
    return ToolCall("call_1", name, arguments)


async def test_a_server_tool_runs_and_its_result_is_returned() -> None:
    result = await registry().execute(call("add", '{"a": 2, "b": 40}'))
    assert result.ok and json.loads(result.output) == {"sum": 42}


@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("nope", "{}", "unknown tool 'nope'"),
        (
            "add",
            "{not json",
            "arguments of 'add' are not JSON: Expecting property name enclosed in double quotes",
        ),
        ("add", "[1, 2]", "arguments of 'add' must be a JSON object"),
        ("add", '{"a": 1}', "'add' needs argument 'b'"),
        ("add", '{"a": 1, "b": "2"}', "argument 'b' of 'add' must be integer"),
        ("add", '{"a": true, "b": 2}', "argument 'a' of 'add' must be integer"),
        ("broken", "{}", "tool 'broken' failed: KeyError: 'missing'"),
        ("geolocate", "{}", "tool 'geolocate' runs on the client"),
    ],
)
async def test_failures_become_error_results_the_model_can_read(
    name: str, arguments: str, error: str
) -> None:
    result = await registry().execute(call(name, arguments))
    assert not result.ok
    assert json.loads(result.output) == {"error": error}


async def test_a_tool_that_overruns_its_timeout_is_reported() -> None:
    result = await registry(timeout_s=0.05).execute(call("slow"))
    assert json.loads(result.output) == {"error": "tool 'slow' timed out after 0.05 s"}


def test_a_client_side_tool_is_known_as_such() -> None:
    """The engine ends the response at a call to it and never executes it; the client's
    function_call_output comes back through add_tool_output (end to end with a real client:
    test_realtime_session's client-executed tool round trip)."""
    tools = registry()
    assert tools.is_client_side("geolocate")
    assert not tools.is_client_side("add") and not tools.is_client_side("nope")


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="tool 'add' is already registered"):
        ToolRegistry([Tool(ADD, add), Tool(ADD, add)])


async def test_builtin_tools_tell_the_time_and_look_up_the_knowledge_file() -> None:
    nine = datetime(2026, 3, 2, 9, 5, tzinfo=UTC)
    tools = ToolRegistry(builtin_tools(load_knowledge(), lambda: nine))
    assert [spec.name for spec in tools.specs()] == ["current_time", "lookup_knowledge"]
    now = json.loads((await tools.execute(call("current_time"))).output)
    assert now == {"time": "09:05", "date": "Monday 2 March 2026", "timezone": "UTC"}
    found = json.loads(
        (await tools.execute(call("lookup_knowledge", '{"query": "coffee beans"}'))).output
    )
    assert found["found"] and found["title"] == "Coffee" and "caffeine" in found["answer"]
    missing = json.loads(
        (await tools.execute(call("lookup_knowledge", '{"query": "dragons"}'))).output
    )
    assert missing == {
        "found": False,
        "topics": ["The moon", "Coffee", "The library", "Voicerelay", "Water"],
    }
