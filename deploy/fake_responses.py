"""The fake OpenAI server's Responses API (``POST /v1/responses``, streamed): the request's
checks and the answer's events, as plain data (``deploy.fake_openai`` serves them).

It answers as the fake's chat endpoint does: after a ``function_call_output`` item, "The NAME
tool says OUTPUT."; a user message that names one of the tools (or a ``tool_choice`` that
forces one) gets a ``function_call`` of it with ``{"query": the message}``; any other
"You said: MESSAGE". The events are the API's (``openai.types.responses``): ``response.created``,
an output item added, its text or argument deltas, done events, ``response.completed`` with the
usage; each sent as ``event: TYPE`` and ``data: JSON`` lines, with no ``[DONE]``. The request is
checked the way the API checks it: stream only, a model, ``input`` items of known types, each
``function_call_output`` after the ``function_call`` it answers, flat function tools (a chat
completions tool, nested under ``function``, has no ``name``: refused), a valid tool choice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

Json = dict[str, Any]
INPUT_TYPES = ("message", "function_call", "function_call_output")
ROLES = ("user", "assistant", "system", "developer")
CALL_ID = "call_fake_1"


def responses_problem(body: Json) -> str:
    """Why the API would refuse this request ("" when it would not)."""
    if body.get("stream") is not True:
        return "this fake serves stream=true only"
    if not isinstance(body.get("model"), str):
        return "model: required"
    items = body.get("input")
    if not isinstance(items, list) or not items:
        return "input: a non-empty list of items"
    return _input_problem(items) or _tools_problem(body)


def _input_problem(items: list[Any]) -> str:
    calls: set[str] = set()
    for index, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind not in INPUT_TYPES:
            return f"input[{index}]: unknown item type {kind!r}"
        if kind == "message" and (item.get("role") not in ROLES or "content" not in item):
            return f"input[{index}]: a message needs a role and content"
        if kind == "message" and (problem := _parts_problem(item, f"input[{index}].content")):
            return problem
        if kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                return f"input[{index}]: a function_call needs call_id, name and arguments"
            calls.add(item["call_id"])
        if kind == "function_call_output" and item.get("call_id") not in calls:
            return f"input[{index}].call_id: no function_call before it has it"
    return ""


def _parts_problem(item: Json, where: str) -> str:
    """A message's content parts: text, and in a user message images as data URLs."""
    if not isinstance(item["content"], list):
        return ""
    for index, part in enumerate(item["content"]):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            continue
        if kind != "input_image" or item["role"] != "user":
            return f"{where}[{index}]: invalid content part"
        if not str(part.get("image_url", "")).startswith("data:image/"):
            return f"{where}[{index}].image_url: invalid image URL"
        if part.get("detail") not in ("auto", "low", "high"):
            return f"{where}[{index}].detail: invalid"
    return ""


def _tools_problem(body: Json) -> str:
    tools = body.get("tools") or []
    for index, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            return f"Missing required parameter: 'tools[{index}].name'."
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return ""
    names = {tool["name"] for tool in tools}
    if isinstance(choice, dict) and choice.get("type") == "function":
        return "" if choice.get("name") in names else "tool_choice.name: not among the tools"
    return "tool_choice: 'auto', 'none', 'required' or a function among the tools"


# --- the answer -----------------------------------------------------------------------------


def responses_sse(body: Json, ending: str = "completed") -> list[bytes]:
    """The answer to a checked request, one SSE message per event. ``ending`` other than
    "completed": the server fails after the output ("failed": ``response.failed``; "error":
    an ``error`` event; "cut": the stream just stops)."""
    events = list(_events(body))
    if ending != "completed":
        events = [*events[:-1], *_failure(body, ending)]
    numbered = _numbered(iter(events))
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in numbered]


def _failure(body: Json, ending: str) -> list[Json]:
    error = {"code": "server_error", "message": f"injected {ending}"}
    if ending == "failed":
        failed = {**_response(body, "failed", [], None), "error": error}
        return [{"type": "response.failed", "response": failed}]
    return [{"type": "error", **error, "param": None}] if ending == "error" else []


def _numbered(events: Iterator[Json]) -> Iterator[Json]:
    for number, event in enumerate(events):
        yield {**event, "sequence_number": number}


def _events(body: Json) -> Iterator[Json]:
    yield {"type": "response.created", "response": _response(body, "in_progress", [], None)}
    answer = list(_answer(body))
    yield from answer
    item = answer[-1]["item"]  # the output item, done
    deltas = sum(event["type"].endswith(".delta") for event in answer)
    usage = _usage(body["input"], deltas)
    yield {"type": "response.completed", "response": _response(body, "completed", [item], usage)}


def _answer(body: Json) -> Iterator[Json]:
    items = body["input"]
    last = items[-1]
    if last.get("type") == "function_call_output":
        name = _call_name(items, last["call_id"])
        return _text_item(f"The {name} tool says {last['output']}.")
    text = _text(last)
    tool = _requested_tool(body, text)
    if tool:
        return _call_item(tool, json.dumps({"query": text}))
    return _text_item(f"You said: {text}")


def _text(item: Json) -> str:
    """A message's words; a list of parts: its ``input_text``s', and how many images it shows."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    text = " ".join(str(part.get("text", "")) for part in content or [] if "text" in part)
    images = sum(part.get("type") == "input_image" for part in content or [])
    return f"{text} (and {images} image{'s' * (images != 1)})" if images else text


def _call_name(items: list[Json], call_id: str) -> str:
    calls = (i for i in items if i.get("type") == "function_call" and i["call_id"] == call_id)
    return str(next(calls)["name"])


def _requested_tool(body: Json, text: str) -> str:
    """The tool the message names, or the one ``tool_choice`` makes it call."""
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        return str(choice["name"])
    tools = [str(tool["name"]) for tool in body.get("tools") or []]
    named = [name for name in tools if name in text and choice != "none"]
    if not named and choice == "required":
        named = tools
    return named[0] if named else ""


def _text_item(text: str) -> Iterator[Json]:
    """A message item, word by word; the last event carries it done."""
    item: Json = {"id": "msg_fake_1", "type": "message", "role": "assistant"}
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    yield {"type": "response.output_item.added", "output_index": 0,
           "item": {**item, "status": "in_progress", "content": []}}  # fmt: skip
    words = text.split(" ")
    for number, word in enumerate(words):
        delta = word if number == 0 else " " + word
        yield {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
    yield {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
    done = {**item, "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
    yield {"type": "response.output_item.done", "output_index": 0, "item": done}


def _call_item(name: str, arguments: str) -> Iterator[Json]:
    """A function_call item, its arguments in three deltas; the last event carries it done."""
    item: Json = {"id": "fc_fake_1", "type": "function_call", "call_id": CALL_ID, "name": name}
    where = {"item_id": item["id"], "output_index": 0}
    yield {"type": "response.output_item.added", "output_index": 0,
           "item": {**item, "arguments": "", "status": "in_progress"}}  # fmt: skip
    third = len(arguments) // 3 + 1
    for start in range(0, len(arguments), third):
        piece = arguments[start : start + third]
        yield {"type": "response.function_call_arguments.delta", **where, "delta": piece}
    yield {"type": "response.function_call_arguments.done", **where, "arguments": arguments,
           "name": name}  # fmt: skip
    done = {**item, "arguments": arguments, "status": "completed"}
    yield {"type": "response.output_item.done", "output_index": 0, "item": done}


def _usage(items: list[Json], output_tokens: int) -> Json:
    words = sum(len(_text(i).split()) for i in items if i.get("type", "message") == "message")
    return {
        "input_tokens": words,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": words + output_tokens,
    }


def _response(body: Json, status: str, output: list[Json], usage: Json | None) -> Json:
    return {
        "id": "resp_fake_1",
        "object": "response",
        "created_at": 0,
        "model": body["model"],
        "status": status,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": None,
        "top_p": None,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
    }
