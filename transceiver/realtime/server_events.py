"""OpenAI Realtime (GA) server events and the item and response bodies they carry.

Pure protocol layer: plain values in, JSON-ready dicts out. Client events are parsed in
``events``; the engine's events are translated to these in ``realtime_events``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transceiver.realtime.client_events import EventError, new_id


def server_event(kind: str, **fields: Any) -> dict[str, Any]:
    """A server event with a fresh event_id; ``fields`` are its type-specific members."""
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(
    error: EventError,
    client_event_id: str | None = None,
    *,
    error_type: str = "invalid_request_error",
) -> dict[str, Any]:
    """An ``error`` event; ``error_type`` is ``server_error`` when the fault is ours."""
    body = {
        "type": error_type,
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "event_id": client_event_id,
    }
    return server_event("error", error=body)


def message_item(
    item_id: str, role: str, text: str, *, audio: bool, status: str = "completed"
) -> dict[str, Any]:
    """A conversation message item; user audio carries its transcript, assistant its text (or
    its audio's transcript), a system message its text."""
    if role in ("user", "system"):
        part = {
            "type": "input_audio" if audio else "input_text",
            ("transcript" if audio else "text"): text,
        }
    else:
        part = {
            "type": "output_audio" if audio else "output_text",
            ("transcript" if audio else "text"): text,
        }
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": role,
        "content": [part],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def function_call_output_item(item_id: str, call_id: str, output: str) -> dict[str, Any]:
    return {
        "id": item_id or new_id("item"),
        "object": "realtime.item",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }


def _user_item(item_id: str, text: str, images: Any) -> dict[str, Any]:
    body = message_item(item_id, "user", text, audio=False)
    shown = [
        {"type": "input_image", "image_url": image["image_url"], "detail": image["detail"]}
        for image in images
        if "image_url" in image
    ]
    if shown:
        body["content"] = body["content"][:1] if text else []
        body["content"] += shown
    return body


def stored_item_bodies(item: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation items a stored history item (``journal.message_to_item``) shows
    as when a resumed session replays its conversation; its id is kept (one id per call for
    an assistant's tool calls). A user's images (loaded: ``keys.with_images``) follow its
    words, as the model is sent them. Unknown roles show as nothing."""
    item_id, role = str(item.get("id", "")), item.get("role")
    text = str(item.get("content", ""))
    if role == "user":
        return [_user_item(item_id, text, item.get("images", ()))]
    if role == "tool":
        return [function_call_output_item(item_id, str(item.get("tool_call_id", "")), text)]
    if role != "assistant":
        return []
    bodies = [message_item(item_id, "assistant", text, audio=True)] if text else []
    for call in item.get("tool_calls", ()):
        call_id = str(call.get("call_id", ""))
        body = function_call_item(
            f"{item_id}_{call_id}", call_id, str(call.get("name", "")),
            str(call.get("arguments", "")), "completed",
        )  # fmt: skip
        bodies.append(body)
    return bodies
