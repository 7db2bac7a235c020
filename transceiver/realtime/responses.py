"""``response.create``'s ``response``: per-response settings and out-of-band responses.

Pure protocol layer. ``plan_response`` reads the object as OpenAI's GA API defines it
(``openai.types.realtime.RealtimeResponseCreateParamsParam``) into a ``ResponsePlan``:

- the settings this response alone overrides (``instructions``, ``tools``, ``tool_choice``,
  ``output_modalities``, ``max_output_tokens``, ``audio.output.voice``), validated exactly as a
  ``session.update`` would (the errors name ``response.…``);
- ``conversation``: ``"auto"`` (the default conversation: its context, and its output joins
  it) or ``"none"`` (out of band: the output is not added to the conversation and is not
  spoken into the call);
- ``input``: the context of an out-of-band response instead of the conversation's: messages
  (system, user, assistant text; a user's images as in ``conversation.item.create``:
  ``image_urls``) and ``item_reference``s to items of the session;
- ``metadata``: up to 16 string pairs, reported back in ``response.created``/``done``.

``parallel_tool_calls``, ``prompt`` and ``reasoning`` are read as a session's
(``session_fields``): the first and the last hold for this response, a saved prompt refused;
any other key is ``unknown_parameter``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.providers import ImagePart, Message
from transceiver.realtime.client_events import EventError, SessionUpdate, parse_client_event
from transceiver.realtime.event_errors import refuse_unknown
from transceiver.realtime.image_urls import image_part

RESPONSE_KEYS = frozenset({
    "audio", "conversation", "input", "instructions", "max_output_tokens", "metadata",
    "output_modalities", "parallel_tool_calls", "prompt", "reasoning", "tool_choice", "tools",
})  # fmt: skip
AS_IN_A_SESSION = (
    "instructions", "tools", "tool_choice", "output_modalities", "max_output_tokens",
    "parallel_tool_calls", "prompt", "reasoning",
)  # fmt: skip
MAX_METADATA_PAIRS = 16  # OpenAI's bounds: keys up to 64 characters, values up to 512
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
TEXT_PARTS = {"system": ("input_text",), "user": ("input_text", "input_image"),
              "assistant": ("output_text", "text")}  # fmt: skip


@dataclass(frozen=True)
class ItemReference:
    """An ``input`` entry naming an item of the session by its id."""

    id: str
    path: str  # where it was, for an error about it


@dataclass(frozen=True)
class ResponsePlan:
    changes: Mapping[str, Any]  # SessionConfig fields this response overrides
    out_of_band: bool = False  # conversation "none"
    input: tuple[Message | ItemReference, ...] | None = None  # None: the conversation
    metadata: Mapping[str, str] | None = None


def plan_response(response: Mapping[str, Any]) -> ResponsePlan:
    """The plan for a response.create's ``response`` object (EventError naming the field)."""
    refuse_unknown(response, RESPONSE_KEYS, "response.")
    conversation = response.get("conversation", "auto")
    if conversation not in ("auto", "none"):
        message = f"Invalid value: {conversation!r}. Supported values are: 'auto', 'none'."
        raise EventError("invalid_value", message, "response.conversation")
    entries = None if "input" not in response else _input(response["input"])
    if entries is not None and conversation != "none":
        message = "input makes a context of its own: give it with conversation 'none'"
        raise EventError("invalid_value", message, "response.input")
    return ResponsePlan(_overrides(response), conversation == "none", entries, _metadata(response))


def _overrides(response: Mapping[str, Any]) -> Mapping[str, Any]:
    """The settings in ``response``, read by the session.update parser."""
    session: dict[str, Any] = {key: response[key] for key in AS_IN_A_SESSION if key in response}
    audio = response.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            raise EventError("invalid_type", "response.audio must be an object", "response.audio")
        refuse_unknown(audio, frozenset({"output"}), "response.audio.")
        output = audio.get("output") or {}
        if not isinstance(output, dict):
            path = "response.audio.output"
            raise EventError("invalid_type", f"{path} must be an object", path)
        refuse_unknown(output, frozenset({"format", "voice"}), "response.audio.output.")
        if "voice" in output:
            session["audio"] = {"output": {"voice": output["voice"]}}
    event = {"type": "session.update", "session": {"type": "realtime", **session}}
    try:
        update = parse_client_event(json.dumps(event))
    except EventError as error:
        raise as_response_error(error) from None
    assert isinstance(update, SessionUpdate)
    return update.changes


def as_response_error(error: EventError) -> EventError:
    """A session setting's error (the parser's or the policy's), naming the field as it is in
    the response."""
    param = error.param
    if param is not None and param.startswith("session."):
        param = "response." + param.removeprefix("session.")
    return EventError(error.code, error.message.replace("'session.", "'response."), param)


def _input(value: Any) -> tuple[Message | ItemReference, ...]:
    if not isinstance(value, list):
        raise EventError("invalid_type", "response.input must be an array", "response.input")
    return tuple(_entry(item, f"response.input[{i}]") for i, item in enumerate(value))


def _entry(item: Any, path: str) -> Message | ItemReference:
    if not isinstance(item, dict):
        raise EventError("invalid_type", f"{path} must be an object", path)
    kind = item.get("type")
    if kind == "item_reference":
        refuse_unknown(item, frozenset({"type", "id"}), path + ".")
        reference = item.get("id")
        if not isinstance(reference, str):
            raise EventError("invalid_type", f"{path}.id must be a string", path + ".id")
        return ItemReference(reference, path + ".id")
    if kind != "message":
        supported = "'message', 'item_reference'"
        message = f"Invalid value: {kind!r}. Supported values are: {supported}."
        raise EventError("invalid_value", message, path + ".type")
    refuse_unknown(
        item, frozenset({"type", "id", "object", "role", "content", "status"}), path + "."
    )
    role = item.get("role")
    if role not in TEXT_PARTS:
        message = f"Invalid value: {role!r}. Supported values are: 'system', 'user', 'assistant'."
        raise EventError("invalid_value", message, path + ".role")
    text, images = _content(item.get("content"), TEXT_PARTS[role], path + ".content")
    return Message(role, text, images=images)


def _content(content: Any, kinds: tuple[str, ...], path: str) -> tuple[str, tuple[ImagePart, ...]]:
    """A message's words, and its images (a user's ``input_image`` parts, checked)."""
    if not isinstance(content, list) or not content:
        raise EventError("invalid_type", f"{path} must be a non-empty array", path)
    texts, images = [], []
    for i, part in enumerate(content):
        where = f"{path}[{i}]"
        if not isinstance(part, dict) or part.get("type") not in kinds:
            names = ", ".join(repr(kind) for kind in kinds)
            raise EventError(
                "invalid_value", f"{where}.type must be one of {names}", where + ".type"
            )
        if part["type"] == "input_image":
            images.append(image_part(part, where + "."))
            continue
        text = part.get("text")
        if not isinstance(text, str):
            raise EventError("invalid_type", f"{where}.text must be a string", where + ".text")
        texts.append(text)
    return " ".join(texts), tuple(images)


def _metadata(response: Mapping[str, Any]) -> Mapping[str, str] | None:
    value = response.get("metadata")
    path = "response.metadata"
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA_PAIRS:
        message = f"{path} must be an object of at most {MAX_METADATA_PAIRS} string pairs"
        raise EventError("invalid_value", message, path)
    for key, text in value.items():
        fits = len(key) <= MAX_METADATA_KEY_CHARS
        if not isinstance(text, str) or not fits or len(text) > MAX_METADATA_VALUE_CHARS:
            message = (
                f"{path} keys are strings of up to {MAX_METADATA_KEY_CHARS} characters, "
                f"values of up to {MAX_METADATA_VALUE_CHARS}"
            )
            raise EventError("invalid_value", message, f"{path}.{key}")
    return dict(value)
