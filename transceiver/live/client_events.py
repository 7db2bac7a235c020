"""GPT-Live client events (``openai.types.live``): parse and validate, strictly.

Pure protocol layer: JSON text in, dataclasses out. The contract is strict: a field the SDK's
types do not define is refused (``unknown_parameter``, ``Unknown parameter: 'session.x'.``); a
field they define that this server does not implement is refused too (``unsupported_parameter``,
saying so), never silently ignored. Every rejection is an ``EventError`` (the Realtime layer's),
which becomes a Live ``error`` event.

``LiveConfig`` is the session a ``session.start`` asks for: its Live resource (``resource``,
what ``session.started``/``updated`` carry) and the Realtime session it runs as (``realtime``:
instructions, function tools, tool choice and voice for the same engine). With Responses
delegation the backend's instructions and tools are the language model stage's: one model
answers, so the Live instructions and the backend's are joined.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from transceiver.realtime.client_events import (
    AUDIO_RATE_HZ,
    MAX_OUTPUT_TOKENS,
    MAX_WEBSOCKET_EVENT_BYTES,
    EventError,
    FunctionTool,
    audio_bytes,
    event_object,
)

MAX_LIVE_EVENT_BYTES = MAX_WEBSOCKET_EVENT_BYTES
DEFAULT_VOICE = "marin"
MAX_INPUT_ITEMS = 128
Json = Mapping[str, Any]
# "auto", "none", "required", or {"type": "function", "name": ...} (the Realtime session's)
ToolChoice = str | Mapping[str, str]
TOOL_CHOICES = ("auto", "none", "required")
# Types the SDK defines that this server refuses for now (with a clear error, not "unknown").
LATER_EVENTS = (
    "session.output_audio.fixture.play",
    "session.thinking.append",
    "session.commentary.append",
    "decision.create",
    "decision.item.create",
    "decision.item.delete",
)


# --- the session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponsesDelegation:
    """``delegation: {type: "responses", responses: {...}}``: the language model stage."""

    model: str
    instructions: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = "auto"
    acknowledgement_delay_ms: int | None = None
    max_output_tokens: int | None = None  # per answer; None: no limit

    def __post_init__(self) -> None:
        forced = self.tool_choice
        if isinstance(forced, Mapping) and forced["name"] not in {t.name for t in self.tools}:
            path = "session.delegation.responses.tool_choice.name"
            message = f"tool_choice names {forced['name']!r}, which is not one of the tools"
            raise EventError("invalid_value", message, path)

    def to_json(self) -> dict[str, Any]:
        choice = self.tool_choice
        responses: dict[str, Any] = {"model": self.model}
        responses["tool_choice"] = choice if isinstance(choice, str) else dict(choice)
        if self.instructions is not None:
            responses["instructions"] = self.instructions
        if self.max_output_tokens is not None:
            responses["max_output_tokens"] = self.max_output_tokens
        responses["tools"] = [tool.to_json() for tool in self.tools]
        body: dict[str, Any] = {"type": "responses", "responses": responses}
        if self.acknowledgement_delay_ms is not None:
            body["acknowledgement_delay_ms"] = self.acknowledgement_delay_ms
        return body


@dataclass(frozen=True)
class LiveConfig:
    model: str
    instructions: str | None = None
    voice: str | None = None  # None: not asked for, the deployment's own
    delegation: ResponsesDelegation | None = None
    input: tuple[tuple[str, str], ...] = ()  # (role, text): developer, user, assistant
    safety_identifier: str | None = None

    def resource(self, session_id: str, expires_at: int) -> dict[str, Any]:
        """The ``SessionResource`` of ``session.started``, ``.updated`` and ``.closed``."""
        body: dict[str, Any] = {
            "id": session_id,
            "expires_at": expires_at,
            "model": self.model,
            "status": "active",
            "audio": {
                "format": {"type": "audio/pcm", "rate": AUDIO_RATE_HZ},
                "output": {"voice": self.voice or DEFAULT_VOICE},
            },
            "delegation": None if self.delegation is None else self.delegation.to_json(),
            "instructions": self.instructions,
            "store": False,
            "triggers": [],
        }
        if self.safety_identifier is not None:
            body["safety_identifier"] = self.safety_identifier
        return body

    def stored(self) -> dict[str, Any]:
        """This config as a ``session.start``'s ``session`` (``parse_stored``), without its
        ``input``: the stored conversation holds it."""
        session: dict[str, Any] = {"model": self.model}
        if self.instructions is not None:
            session["instructions"] = self.instructions
        if self.voice is not None:
            session["audio"] = {"output": {"voice": self.voice}}
        if self.delegation is not None:
            session["delegation"] = self.delegation.to_json()
        if self.safety_identifier is not None:
            session["safety_identifier"] = self.safety_identifier
        return session

    def realtime(self) -> dict[str, Any]:
        """The same session as a Realtime ``session`` object (``policy.session_update_from``)."""
        session: dict[str, Any] = {}
        if self.voice is not None:
            session["audio"] = {"output": {"voice": self.voice}}
        delegation = self.delegation
        parts = [self.instructions, None if delegation is None else delegation.instructions]
        joined = "\n\n".join(part for part in parts if part and part.strip())
        if joined:
            session["instructions"] = joined
        if delegation is not None:
            session["tools"] = [tool.to_json() for tool in delegation.tools]
            session["tool_choice"] = delegation.to_json()["responses"]["tool_choice"]
            session["max_output_tokens"] = delegation.max_output_tokens or "inf"
        return session


# --- client events --------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStart:
    event_id: str | None
    config: LiveConfig


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    delegation: Json | None  # the sparse update, validated; None: unchanged

    def apply(self, config: LiveConfig) -> LiveConfig:
        if self.delegation is None:
            return config
        current = config.delegation
        if current is None:
            raise EventError(
                "invalid_value",
                "the delegation type cannot change: this session has no delegation",
                "session.delegation.type",
            )
        changes = dict(self.delegation)
        return replace(config, delegation=replace(current, **changes))


@dataclass(frozen=True)
class AudioAppend:
    event_id: str | None
    pcm: bytes


@dataclass(frozen=True)
class Command:
    """An event with nothing but its type: mute, unmute, response.create, session.close."""

    event_id: str | None
    type: str


@dataclass(frozen=True)
class InstructionsAppend:
    event_id: str | None
    content: str


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    output: str


@dataclass(frozen=True)
class UserMessage:
    text: str


@dataclass(frozen=True)
class ResponseItemCreate:
    event_id: str | None
    item: ToolOutput | UserMessage


LiveClientEvent = (
    SessionStart | SessionUpdate | AudioAppend | Command | InstructionsAppend | ResponseItemCreate
)


def parse_live_event(data: str | bytes, max_bytes: int = MAX_LIVE_EVENT_BYTES) -> LiveClientEvent:
    """One WebSocket message of at most ``max_bytes``; raises EventError naming the problem."""
    raw = event_object(data, max_bytes)
    kind = _str(raw, "type", "", required=True)
    if kind in LATER_EVENTS:
        raise EventError(
            "unsupported_event", f"{kind!r} is not supported by this server yet", "type"
        )
    parser = _PARSERS.get(kind or "")
    if parser is None:
        supported = ", ".join(repr(name) for name in _PARSERS)
        raise EventError(
            "invalid_value", f"Invalid value: {kind!r}. Supported values are: {supported}.", "type"
        )
    allowed, parse = parser
    _only(raw, "", ("type", "event_id", *allowed))
    return parse(raw, _str(raw, "event_id", ""))


def parse_webrtc_create(raw: Json) -> tuple[LiveConfig, str]:
    """The body of ``POST /v1/live/sessions`` (``client.live.create``): ``{session, transport:
    {type: "webrtc", sdp}}``, as strictly as ``session.start``; the config and the SDP offer.
    The media session's own fields: no ``audio.format`` (WebRTC negotiates it); ``client``,
    ``idle_timeout_s`` and ``wake_policy`` are refused as not supported yet."""
    _only(raw, "", ("session", "transport"))
    transport = _obj(raw, "transport", "", required=True) or {}
    _only(transport, "transport.", ("type", "sdp"))
    kind = _str(transport, "type", "transport.", required=True)
    if kind != "webrtc":
        message = f"Invalid value: {kind!r}. Supported values are: 'webrtc'."
        raise EventError("invalid_value", message, "transport.type")
    sdp = _str(transport, "sdp", "transport.", required=True) or ""
    session = _obj(raw, "session", "", required=True) or {}
    audio = _obj(session, "audio", "session.")
    if audio is not None:
        _only(audio, "session.audio.", ("output",))
    for name, why in (
        ("client", "frontend data-channel permissions are not supported yet"),
        ("idle_timeout_s", "idle pauses are not supported yet"),
        ("wake_policy", "speech wake policies are not supported yet"),
    ):
        if session.get(name) is not None:
            raise _unsupported("session." + name, why)
    media_only = ("idle_timeout_s", "wake_policy")  # null here: not session.start fields
    start = {key: value for key, value in session.items() if key not in media_only}
    return _parse_start({"session": start}, None).config, sdp


def parse_stored(contract: Json) -> tuple[LiveConfig, tuple[str, ...]]:
    """The contract part a Live session stored (``LiveContract.stored``): its config, checked
    as a ``session.start``'s, and the instructions appended; EventError when it is not one."""
    _only(contract, "voicerelay_contract.", ("type", "session", "instructions_appended"))
    session = _obj(contract, "session", "voicerelay_contract.", required=True) or {}
    appended = _list(contract, "instructions_appended", "voicerelay_contract.") or []
    if not all(isinstance(text, str) for text in appended):
        where = "voicerelay_contract.instructions_appended"
        raise EventError("invalid_type", f"{where} must be strings", where)
    return _parse_start({"session": session}, None).config, tuple(appended)


# --- fields ---------------------------------------------------------------------------------


def _only(obj: Json, path: str, allowed: Sequence[str]) -> None:
    for key in obj:
        if key not in allowed:
            name = f"{path}{key}"
            raise EventError("unknown_parameter", f"Unknown parameter: {name!r}.", name)


def _unsupported(name: str, why: str) -> EventError:
    return EventError("unsupported_parameter", f"Unsupported parameter: {name!r}: {why}.", name)


def _str(obj: Json, key: str, path: str, *, required: bool = False) -> str | None:
    value: str | None = _typed(obj, key, path, str, "a string", required)
    return value


def _obj(obj: Json, key: str, path: str, *, required: bool = False) -> Json | None:
    value: Json | None = _typed(obj, key, path, dict, "an object", required)
    return value


def _typed(obj: Json, key: str, path: str, kind: type, what: str, required: bool) -> Any:
    """``obj[key]`` if it is a ``kind``; None if absent or null (refused if ``required``)."""
    value = obj.get(key)
    name = f"{path}{key}"
    if value is None:
        if required:
            raise EventError(
                "missing_required_parameter", f"Missing required parameter: {name!r}.", name
            )
        return None
    if not isinstance(value, kind):
        raise EventError("invalid_type", f"{name} must be {what}", name)
    return value


def _list(obj: Json, key: str, path: str) -> list[Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, list):
        raise EventError("invalid_type", f"{path}{key} must be an array", f"{path}{key}")
    return value


def _int(obj: Json, key: str, path: str, lo: int, hi: int) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        name = f"{path}{key}"
        raise EventError("invalid_value", f"{name} must be an integer in [{lo}, {hi}]", name)
    return value


# --- session.start --------------------------------------------------------------------------

_SESSION_FIELDS = (
    "model", "audio", "client", "delegation", "input", "instructions", "safety_identifier",
    "store", "triggers",
)  # fmt: skip
_RESPONSES_FIELDS = (
    "model", "instructions", "max_output_tokens", "parallel_tool_calls", "reasoning",
    "service_tier", "text", "tool_choice", "tools",
)  # fmt: skip
_RESPONSES_LATER = ("parallel_tool_calls", "reasoning", "service_tier", "text")


def _parse_start(raw: Json, event_id: str | None) -> SessionStart:
    path = "session."
    session = _obj(raw, "session", "", required=True) or {}
    _only(session, path, _SESSION_FIELDS)
    model = _str(session, "model", path, required=True) or ""
    if session.get("client") is not None:
        raise _unsupported(path + "client", "frontend data-channel permissions are for WebRTC")
    if session.get("store") not in (None, False):
        raise _unsupported(path + "store", "sessions are not stored for forks or recordings")
    if _list(session, "triggers", path):
        raise _unsupported(path + "triggers", "Decisions triggers are not supported yet")
    return SessionStart(
        event_id,
        LiveConfig(
            model,
            instructions=_str(session, "instructions", path),
            voice=_parse_audio(_obj(session, "audio", path), path + "audio."),
            delegation=_parse_delegation(session.get("delegation"), path + "delegation."),
            input=_parse_input(_list(session, "input", path) or [], path + "input"),
            safety_identifier=_str(session, "safety_identifier", path),
        ),
    )


def _parse_audio(audio: Json | None, path: str) -> str | None:
    if audio is None:
        return None
    _only(audio, path, ("format", "output"))
    audio_format = _obj(audio, "format", path)
    if audio_format is not None:
        where = path + "format."
        _only(audio_format, where, ("type", "rate"))
        kind = _str(audio_format, "type", where, required=True)
        if kind != "audio/pcm":
            raise _unsupported(where + "type", "only audio/pcm is supported")
        if audio_format.get("rate", AUDIO_RATE_HZ) != AUDIO_RATE_HZ:
            raise _unsupported(where + "rate", f"PCM audio is {AUDIO_RATE_HZ} Hz only")
    output = _obj(audio, "output", path)
    if output is None:
        return None
    _only(output, path + "output.", ("voice",))
    voice = output.get("voice")
    if isinstance(voice, dict):
        raise _unsupported(path + "output.voice", "custom voices are not supported")
    return _str(output, "voice", path + "output.")


def _parse_delegation(value: Any, path: str) -> ResponsesDelegation | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path[:-1]} must be an object or null", path[:-1])
    kind = _str(value, "type", path, required=True)
    if kind in ("client", "decisions"):
        raise _unsupported(path + "type", f"{kind} delegation is not supported yet")
    if kind != "responses":
        message = f"Invalid value: {kind!r}. Supported values are: 'responses'."
        raise EventError("invalid_value", message, path + "type")
    _only(value, path, ("type", "responses", "acknowledgement_delay_ms"))
    responses = _obj(value, "responses", path, required=True) or {}
    changes = _parse_responses(responses, path + "responses.", required=True)
    delay = _int(value, "acknowledgement_delay_ms", path, 0, 60_000)
    return ResponsesDelegation(**changes, acknowledgement_delay_ms=delay)


def _parse_responses(responses: Json, path: str, *, required: bool) -> dict[str, Any]:
    """The Responses backend's settings that were given (all known ones validated)."""
    _only(responses, path, _RESPONSES_FIELDS)
    for key in _RESPONSES_LATER:
        if responses.get(key) is not None:
            raise _unsupported(path + key, "not supported by this server yet")
    changes: dict[str, Any] = {}
    model = _str(responses, "model", path, required=required)
    if model is not None:
        changes["model"] = model
    if "instructions" in responses:
        changes["instructions"] = _str(responses, "instructions", path)
    if "max_output_tokens" in responses:  # null: no limit
        limit = _int(responses, "max_output_tokens", path, 1, MAX_OUTPUT_TOKENS)
        changes["max_output_tokens"] = limit
    if (tools := _list(responses, "tools", path)) is not None:
        changes["tools"] = _parse_tools(tools, path + "tools")
    if responses.get("tool_choice") is not None:
        changes["tool_choice"] = _parse_tool_choice(responses["tool_choice"], path + "tool_choice")
    return changes


def _parse_tool_choice(choice: Any, path: str) -> ToolChoice:
    """A mode, or a function the model must call; other tool kinds are refused as unsupported."""
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            supported = ", ".join(repr(mode) for mode in TOOL_CHOICES)
            message = f"Invalid value: {choice!r}. Supported values are: {supported}."
            raise EventError("invalid_value", message, path)
        return choice
    if not isinstance(choice, dict):
        raise EventError("invalid_type", f"{path} must be a string or an object", path)
    kind = _str(choice, "type", path + ".", required=True)
    if kind != "function":
        raise _unsupported(path + ".type", f"{kind} tool choices are not supported (function only)")
    _only(choice, path + ".", ("type", "name"))
    return {"type": "function", "name": _str(choice, "name", path + ".", required=True) or ""}


def _parse_tools(tools: list[Any], path: str) -> tuple[FunctionTool, ...]:
    parsed = []
    for index, tool in enumerate(tools):
        where = f"{path}[{index}]."
        if not isinstance(tool, dict):
            raise EventError("invalid_type", f"{where[:-1]} must be an object", where[:-1])
        kind = _str(tool, "type", where, required=True)
        if kind != "function":
            raise _unsupported(where + "type", f"{kind} tools are not supported (function only)")
        _only(tool, where, ("type", "name", "description", "parameters", "strict"))
        if tool.get("strict") not in (None, False):
            raise _unsupported(where + "strict", "strict schemas are not enforced")
        name = _str(tool, "name", where, required=True) or ""
        parameters = _obj(tool, "parameters", where) or {"type": "object", "properties": {}}
        parsed.append(FunctionTool(name, _str(tool, "description", where) or "", parameters))
    if len({tool.name for tool in parsed}) < len(parsed):
        raise EventError("invalid_value", "tool names must be unique", path)
    return tuple(parsed)


def _parse_input(items: list[Any], path: str) -> tuple[tuple[str, str], ...]:
    if len(items) > MAX_INPUT_ITEMS:
        raise EventError("invalid_value", f"at most {MAX_INPUT_ITEMS} input messages", path)
    parsed = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]."
        if not isinstance(item, dict):
            raise EventError("invalid_type", f"{where[:-1]} must be an object", where[:-1])
        _only(item, where, ("role", "content", "id", "status", "type"))
        role = _str(item, "role", where, required=True)
        if role not in ("developer", "user", "assistant"):
            message = (
                f"Invalid value: {role!r}. Supported values are: 'developer', 'user', 'assistant'."
            )
            raise EventError("invalid_value", message, where + "role")
        if item.get("type", "message") != "message":
            raise EventError("invalid_value", "input items are messages", where + "type")
        parts = _list(item, "content", where)
        if not parts or len(parts) != 1 or not isinstance(parts[0], dict):
            raise EventError("invalid_value", "one text part per message", where + "content")
        part, part_path = parts[0], where + "content[0]."
        _only(part, part_path, ("text", "type"))
        if part.get("type", "input_text") not in ("input_text", "text", "output_text"):
            raise EventError("invalid_value", "text parts only", part_path + "type")
        parsed.append((role, _str(part, "text", part_path, required=True) or ""))
    return tuple(parsed)


# --- the other events -----------------------------------------------------------------------


def _parse_update(raw: Json, event_id: str | None) -> SessionUpdate:
    path = "session."
    session = _obj(raw, "session", "", required=True) or {}
    _only(session, path, ("delegation", "triggers"))
    if _list(session, "triggers", path):
        raise _unsupported(path + "triggers", "Decisions triggers are not supported yet")
    delegation = _obj(session, "delegation", path)
    if delegation is None:
        return SessionUpdate(event_id, None)
    where = path + "delegation."
    kind = _str(delegation, "type", where, required=True)
    if kind != "responses":
        raise _unsupported(where + "type", f"{kind} delegation is not supported")
    _only(delegation, where, ("type", "responses", "acknowledgement_delay_ms"))
    responses = _obj(delegation, "responses", where) or {}
    changes = _parse_responses(responses, where + "responses.", required=False)
    if "acknowledgement_delay_ms" in delegation:
        delay = _int(delegation, "acknowledgement_delay_ms", where, 0, 60_000)
        changes["acknowledgement_delay_ms"] = delay
    return SessionUpdate(event_id, changes)


def _parse_append(raw: Json, event_id: str | None) -> AudioAppend:
    return AudioAppend(event_id, audio_bytes(_str(raw, "audio", "", required=True) or ""))


def _parse_instructions(raw: Json, event_id: str | None) -> InstructionsAppend:
    if "delegation_id" not in raw:
        raise EventError(
            "missing_required_parameter", "Missing required parameter: 'delegation_id'.",
            "delegation_id",
        )  # fmt: skip
    if raw["delegation_id"] is not None:
        raise EventError(
            "invalid_value", "delegation_id must be null: there are no client delegations here",
            "delegation_id",
        )  # fmt: skip
    content = _str(raw, "content", "", required=True) or ""
    if not content.strip():
        raise EventError("invalid_value", "content must not be empty", "content")
    return InstructionsAppend(event_id, content)


def _parse_item(raw: Json, event_id: str | None) -> ResponseItemCreate:
    path = "item."
    item = _obj(raw, "item", "", required=True) or {}
    kind = _str(item, "type", path) or "message"
    if kind == "function_call_output":
        _only(item, path, ("type", "call_id", "output", "id", "status"))
        call_id = _str(item, "call_id", path, required=True) or ""
        output = item.get("output")
        if not isinstance(output, str):
            raise _unsupported(path + "output", "a tool's output must be a string here")
        return ResponseItemCreate(event_id, ToolOutput(call_id, output))
    if kind != "message":
        raise _unsupported(path + "type", f"{kind} items are not supported")
    _only(item, path, ("type", "role", "content", "id", "status"))
    if item.get("role") != "user":
        raise _unsupported(path + "role", "only user messages can be added")
    content = item.get("content")
    if isinstance(content, str):
        return ResponseItemCreate(event_id, UserMessage(content))
    if not isinstance(content, list) or not content:
        raise EventError("invalid_type", "item.content must be a string or parts", path + "content")
    texts = []
    for index, part in enumerate(content):
        where = f"{path}content[{index}]."
        if not isinstance(part, dict) or part.get("type") != "input_text":
            raise _unsupported(where + "type", "only input_text parts are supported")
        _only(part, where, ("type", "text"))
        texts.append(_str(part, "text", where, required=True) or "")
    return ResponseItemCreate(event_id, UserMessage(" ".join(texts)))


def _command(kind: str) -> Callable[[Json, str | None], LiveClientEvent]:
    return lambda raw, event_id: Command(event_id, kind)


_Parser = tuple[tuple[str, ...], Callable[[Json, str | None], LiveClientEvent]]
_PARSERS: dict[str, _Parser] = {
    "session.start": (("session",), _parse_start),
    "session.update": (("session",), _parse_update),
    "session.input_audio.append": (("audio",), _parse_append),
    "session.input_audio.mute": ((), _command("session.input_audio.mute")),
    "session.input_audio.unmute": ((), _command("session.input_audio.unmute")),
    "session.instructions.append": (("content", "delegation_id"), _parse_instructions),
    "response.item.create": (("item",), _parse_item),
    "response.create": ((), _command("response.create")),
    "session.close": ((), _command("session.close")),
}
