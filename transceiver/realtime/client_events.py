"""OpenAI Realtime (GA) client events on the ``oai-events`` data channel: parse and validate.

Pure protocol layer: JSON text in, dataclasses out (the server events the session sends back
are built in ``server_events``). No asyncio, no aiortc. Every rejection is an ``EventError`` whose
``code`` and ``param`` end up in an ``error`` server event, so a client learns exactly which
field was wrong and the session goes on.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.providers import ImagePart
from pipeline.untrusted_json import JsonInputError, decode
from transceiver.realtime.event_errors import EventError as EventError  # its home; re-exported
from transceiver.realtime.event_errors import refuse_unknown
from transceiver.realtime.image_urls import image_part
from transceiver.realtime.session_fields import LOGPROBS, Truncation, parse_fields

MAX_EVENT_BYTES = 256 * 1024
# Over WebSocket the client's audio rides in the events (base64 PCM16 in
# ``input_audio_buffer.append``): 4 MiB holds about 60 s of 24 kHz audio in one event.
MAX_WEBSOCKET_EVENT_BYTES = 4 * 1024 * 1024
AUDIO_RATE_HZ = 24000


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


# --- session configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class TurnDetection:
    """``server_vad`` knobs, or ``semantic_vad`` (its ``eagerness``; the policy maps it onto
    the detector's silence window)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    type: str = "server_vad"
    idle_timeout_ms: int | None = None  # server_vad: answer after this much silence
    eagerness: str = "auto"  # semantic_vad

    def to_json(self) -> dict[str, Any]:
        common = {"create_response": self.create_response}
        common["interrupt_response"] = self.interrupt_response
        if self.type == "semantic_vad":
            return {"type": self.type, "eagerness": self.eagerness, **common}
        return {
            "type": self.type,
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "idle_timeout_ms": self.idle_timeout_ms,
            **common,
        }


@dataclass(frozen=True)
class Transcription:
    """Input transcription as the client asked for it (``model`` is reported, the deployment's
    speech-to-text runs); ``language`` and ``prompt`` go to a speech-to-text that takes them,
    ``keywords`` after the prompt and ``languages`` as the language when it names one alone
    (``policy``); ``delay`` is reported, no speech-to-text here has such a knob."""

    model: str = "pocketsphinx"
    language: str | None = None
    prompt: str | None = None
    keywords: tuple[str, ...] | None = None
    languages: tuple[str, ...] | None = None
    delay: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        for key in ("language", "prompt", "keywords", "languages", "delay"):
            value = getattr(self, key)
            if value is not None:
                body[key] = list(value) if isinstance(value, tuple) else value
        return body


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True)
class ForcedFunction:
    """``tool_choice`` ``{"type": "function", "name": ...}``: the model must call it."""

    name: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name}


ToolChoiceSetting = str | ForcedFunction  # "auto", "none", "required", or a forced function


@dataclass(frozen=True)
class SessionConfig:
    """The effective session, as session.created/updated report it."""

    id: str
    model: str = "voicerelay-local"
    instructions: str = ""
    voice: str = "joe"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoiceSetting = "auto"
    transcription: Transcription | None = field(default_factory=Transcription)  # None: off
    output_modalities: tuple[str, ...] = ("audio",)
    max_output_tokens: int | None = None  # None: "inf"
    speed: float = 1.0
    noise_reduction: str | None = None  # "near_field", "far_field"; None: off
    noise_reduction_strength: float = 1.0  # OpenAI's default; an update without one keeps it
    truncation: Truncation = Truncation()  # see session_fields
    reasoning_effort: str | None = None  # reported; None: no reasoning object
    parallel_tool_calls: bool = True  # not reported (OpenAI's session object has no such field)
    tracing: str | dict[str, Any] | None = None  # reported as set
    include_logprobs: bool = False  # ``include``: the input transcription's logprobs

    def to_json(self) -> dict[str, Any]:
        audio_format = {"type": "audio/pcm", "rate": AUDIO_RATE_HZ}
        detection = None if self.turn_detection is None else self.turn_detection.to_json()
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions,
            "tool_choice": tool_choice_json(self.tool_choice),
            "tools": [t.to_json() for t in self.tools],
            "max_output_tokens": self.max_output_tokens or "inf",
            "audio": {
                "input": {
                    "format": audio_format,
                    "noise_reduction": None
                    if self.noise_reduction is None
                    else {"type": self.noise_reduction, "strength": self.noise_reduction_strength},
                    "turn_detection": detection,
                    "transcription": None
                    if self.transcription is None
                    else self.transcription.to_json(),
                },
                "output": {"format": audio_format, "voice": self.voice, "speed": self.speed},
            },
            **self._fields_json(),
        }

    def _fields_json(self) -> dict[str, Any]:
        """The session_fields' part; a session here never expires (``expires_at`` null)."""
        effort = self.reasoning_effort
        return {
            "truncation": self.truncation.to_json(),
            "reasoning": None if effort is None else {"effort": effort},
            "tracing": self.tracing,
            "prompt": None,
            "include": [LOGPROBS] if self.include_logprobs else None,
            "expires_at": None,
        }


def tool_choice_json(choice: ToolChoiceSetting) -> str | dict[str, Any]:
    return choice.to_json() if isinstance(choice, ForcedFunction) else choice


# --- client events --------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    changes: Mapping[str, Any]  # SessionConfig field name -> new value, already validated

    def apply(self, config: SessionConfig) -> SessionConfig:
        return replace(config, **self.changes)


@dataclass(frozen=True)
class UserText:
    """A user message's words, and its images (``input_image`` parts, checked:
    ``image_urls``), the first at ``item.content[first_image]``; with images, ``parts`` are
    its parts' words and images in the client's order."""

    text: str
    images: tuple[ImagePart, ...] = ()
    first_image: int = 0
    parts: tuple[str | ImagePart, ...] = ()


@dataclass(frozen=True)
class FunctionCallOutput:
    call_id: str
    output: str


@dataclass(frozen=True)
class SystemText:
    text: str


@dataclass(frozen=True)
class AssistantText:
    text: str
    audio: bool  # an ``output_audio`` part (its transcript), else ``output_text``


@dataclass(frozen=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class UserAudio:
    """A user ``input_audio`` item: PCM16 mono at ``AUDIO_RATE_HZ``; its ``transcript`` is the
    client's note (OpenAI does not send it to the model)."""

    pcm: bytes
    transcript: str | None


NewItem = UserText | SystemText | AssistantText | FunctionCall | FunctionCallOutput | UserAudio


@dataclass(frozen=True)
class ConversationItemCreate:
    event_id: str | None
    item: NewItem
    item_id: str
    previous_item_id: str | None = None  # None: last; "root": first


@dataclass(frozen=True)
class ResponseCreate:
    """``response`` as sent (an object); its fields are read by ``responses.plan_response``."""

    event_id: str | None
    instructions: str | None = None
    response: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None = None


@dataclass(frozen=True)
class BufferCommand:
    """input_audio_buffer.clear / .commit and output_audio_buffer.clear."""

    event_id: str | None
    type: str


@dataclass(frozen=True)
class AudioAppend:
    """input_audio_buffer.append: PCM16 mono at ``AUDIO_RATE_HZ`` (WebSocket sessions)."""

    event_id: str | None
    pcm: bytes


@dataclass(frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemTruncate:
    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class TurnHeard:
    """``voicerelay.turn.heard``: when the client itself first heard a response's audio, in ms
    after it received that turn's ``input_audio_buffer.speech_stopped`` and/or the response's
    ``output_audio_buffer.started`` (at least one of them)."""

    event_id: str | None
    response_id: str
    after_speech_stopped_ms: float | None
    after_output_started_ms: float | None


ClientEvent = (
    SessionUpdate
    | ConversationItemCreate
    | ResponseCreate
    | ResponseCancel
    | BufferCommand
    | AudioAppend
    | ItemRetrieve
    | ItemTruncate
    | ItemDelete
    | TurnHeard
)


def parse_client_event(data: str | bytes, max_bytes: int = MAX_EVENT_BYTES) -> ClientEvent:
    """Parse one message (a data-channel message, a WebSocket frame of at most ``max_bytes``);
    raises EventError naming the problem."""
    raw = event_object(data, max_bytes)
    kind = _str(raw, "type", required=True)
    parser = _PARSERS.get(kind or "")
    if parser is None:  # OpenAI's code and wording for an unknown type
        supported = ", ".join(repr(name) for name in _PARSERS)
        message = f"Invalid value: {kind!r}. Supported values are: {supported}."
        raise EventError("invalid_value", message, "type")
    if (keys := EVENT_KEYS.get(kind or "")) is not None:  # (the others check their own)
        refuse_unknown(raw, keys, "")
    return parser(raw, _str(raw, "event_id"))


def event_object(data: str | bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object a message of at most ``max_bytes`` holds (the GPT-Live events' too);
    raises EventError: too large, not JSON, not an object."""
    size = _size_bytes(data, max_bytes)
    if size > max_bytes:
        raise EventError("event_too_large", f"event of {size} bytes exceeds {max_bytes}")
    try:
        raw = decode(data)
    except JsonInputError as exc:
        raise EventError("invalid_json", f"event is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise EventError("invalid_event", "event must be a JSON object")
    return raw


def event_id_of(data: str | bytes) -> str | None:
    """The client's event_id, when the message is a JSON object that has one (for errors)."""
    try:
        raw = decode(data)
    except JsonInputError:
        return None
    event_id = raw.get("event_id") if isinstance(raw, dict) else None
    return event_id if isinstance(event_id, str) else None


def audio_bytes(encoded: str) -> bytes:
    """The PCM of an audio append's base64 ``audio`` (strict: no stray characters)."""
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):
        raise EventError(
            "invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio"
        ) from None


def _size_bytes(data: str | bytes, max_bytes: int) -> int:
    """As it came over the channel: text counts its UTF-8 bytes, not its characters."""
    if isinstance(data, bytes) or len(data) <= max_bytes // 4 or len(data) > max_bytes:
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


def _str(obj: Mapping[str, Any], key: str, *, required: bool = False, path: str = "") -> str | None:
    value = obj.get(key)
    name = f"{path}{key}"
    if value is None:
        if required:
            raise EventError("missing_required_parameter", f"missing {name}", name)
        return None
    if not isinstance(value, str):
        raise EventError("invalid_type", f"{name} must be a string", name)
    return value


def _obj(obj: Mapping[str, Any], key: str, path: str = "") -> Mapping[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise EventError("invalid_type", f"{path}{key} must be an object", f"{path}{key}")
    return value


def _number(obj: Mapping[str, Any], key: str, path: str, lo: float, hi: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise EventError(
            "invalid_value", f"{path}{key} must be a number in [{lo}, {hi}]", f"{path}{key}"
        )
    return float(value)


# The fields of OpenAI's GA session (``openai.types.realtime``'s request TypedDicts; the tests
# hold these to the SDK). Any other key, e.g. a beta-shaped ``session.voice``, is an
# ``unknown_parameter`` error naming it, and the whole update is discarded, as OpenAI does.
SESSION_KEYS = frozenset({
    "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
    "max_output_tokens", "tracing", "truncation", "prompt", "include", "parallel_tool_calls",
    "reasoning",
})  # fmt: skip
AUDIO_KEYS = frozenset({"input", "output"})
AUDIO_INPUT_KEYS = frozenset({"format", "noise_reduction", "transcription", "turn_detection"})
AUDIO_OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
NOISE_REDUCTION_KEYS = frozenset({"type", "strength"})
NOISE_REDUCTION_TYPES = ("near_field", "far_field")
EAGERNESS = ("low", "medium", "high", "auto")
TOOL_CHOICES = ("auto", "none", "required")
SPEED_RANGE = (0.25, 1.5)  # OpenAI's bounds for audio.output.speed
IDLE_TIMEOUT_MS_RANGE = (5_000, 30_000)  # OpenAI's bounds for idle_timeout_ms
TRANSCRIPTION_KEYS = frozenset({"model", "language", "prompt", "keywords", "languages", "delay"})
TRANSCRIPTION_DELAYS = ("minimal", "low", "medium", "high", "xhigh")
SERVER_VAD_KEYS = frozenset({
    "type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
    "interrupt_response", "idle_timeout_ms",
})  # fmt: skip
SEMANTIC_VAD_KEYS = frozenset({"type", "eagerness", "create_response", "interrupt_response"})
FUNCTION_TOOL_KEYS = frozenset({"type", "name", "description", "parameters"})
MAX_OUTPUT_TOKENS = 4096  # OpenAI's bound: an integer in [1, 4096], or "inf"


# The fields of each client event (OpenAI's: ``unknown_parameter`` for any other), of its item
# by type and of a message's content parts by role; session.update, response.create and our
# voicerelay.turn.heard check theirs as they parse.
_BARE = frozenset({"type", "event_id"})
EVENT_KEYS = {
    "input_audio_buffer.append": _BARE | {"audio"},
    "input_audio_buffer.clear": _BARE,
    "input_audio_buffer.commit": _BARE,
    "output_audio_buffer.clear": _BARE,
    "response.cancel": _BARE | {"response_id"},
    "conversation.item.create": _BARE | {"item", "previous_item_id"},
    "conversation.item.retrieve": _BARE | {"item_id"},
    "conversation.item.delete": _BARE | {"item_id"},
    "conversation.item.truncate": _BARE | {"item_id", "content_index", "audio_end_ms"},
}
_ITEM = frozenset({"type", "id", "object", "status"})
ITEM_KEYS = {
    "message": _ITEM | {"role", "content"},
    "function_call": _ITEM | {"call_id", "name", "arguments"},
    "function_call_output": _ITEM | {"call_id", "output"},
}
PART_KEYS = {
    "user": frozenset({"type", "text", "audio", "transcript", "image_url", "detail"}),
    "system": frozenset({"type", "text"}),
    "assistant": frozenset({"type", "text", "audio", "transcript"}),
}


def _parse_session_update(raw: Mapping[str, Any], event_id: str | None) -> SessionUpdate:
    refuse_unknown(raw, frozenset({"type", "event_id", "session"}), "")
    session = _obj(raw, "session")
    if session is None:
        raise EventError("missing_required_parameter", "missing session", "session")
    if session.get("type") == "transcription":  # OpenAI's words: a session's type is fixed
        message = "Passing a transcription session update event to a realtime session is "
        raise EventError("invalid_value", message + "not allowed.", "session.type")
    if session.get("type") == "translation":  # a translation session's (a client secret's)
        message = "a translation session is not a realtime session: open it at "
        raise EventError("invalid_value", message + "/v1/realtime/translations", "session.type")
    refuse_unknown(session, SESSION_KEYS, "session.")
    changes: dict[str, Any] = {}
    if (value := _str(session, "instructions", path="session.")) is not None:
        changes["instructions"] = value
    if session.get("tool_choice") is not None:
        changes["tool_choice"] = _parse_tool_choice(session["tool_choice"])
    if "tools" in session:
        changes["tools"] = _parse_tools(session["tools"])
    if "output_modalities" in session:
        changes["output_modalities"] = _parse_modalities(session["output_modalities"])
    if "max_output_tokens" in session:
        changes["max_output_tokens"] = _parse_max_tokens(session["max_output_tokens"])
    changes.update(parse_fields(session))
    audio = _obj(session, "audio", "session.") or {}
    refuse_unknown(audio, AUDIO_KEYS, "session.audio.")
    changes.update(_parse_audio_input(_obj(audio, "input", "session.audio.") or {}))
    output = _obj(audio, "output", "session.audio.") or {}
    refuse_unknown(output, AUDIO_OUTPUT_KEYS, "session.audio.output.")
    if (voice := _str(output, "voice", path="session.audio.output.")) is not None:
        changes["voice"] = voice
    if (speed := _number(output, "speed", "session.audio.output.", *SPEED_RANGE)) is not None:
        changes["speed"] = speed
    return SessionUpdate(event_id, changes)


def _parse_tool_choice(value: Any) -> ToolChoiceSetting:
    path = "session.tool_choice"
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise EventError("invalid_value", _invalid(value, TOOL_CHOICES), path)
        return value
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path} must be a string or an object", path)
    if value.get("type") != "function":  # an MCP tool choice, like MCP tools, is refused
        raise EventError(
            "invalid_value", _invalid(value.get("type"), ("function",)), path + ".type"
        )
    refuse_unknown(value, frozenset({"type", "name"}), path + ".")
    return ForcedFunction(_str(value, "name", required=True, path=path + ".") or "")


def _invalid(value: Any, supported: tuple[str, ...]) -> str:
    """OpenAI's words for a value outside a set."""
    names = ", ".join(repr(name) for name in supported)
    return f"Invalid value: {value!r}. Supported values are: {names}."


def _parse_modalities(value: Any) -> tuple[str, ...]:
    path = "session.output_modalities"
    if value not in (["audio"], ["text"]):
        message = "output_modalities must be ['audio'] or ['text'] (one of them, not both)"
        raise EventError("invalid_value", message, path)
    return tuple(value)


def _parse_max_tokens(value: Any) -> int | None:
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_OUTPUT_TOKENS:
        message = f"max_output_tokens must be an integer in [1, {MAX_OUTPUT_TOKENS}] or 'inf'"
        raise EventError("invalid_value", message, "session.max_output_tokens")
    return value


def _parse_audio_input(audio_in: Mapping[str, Any]) -> dict[str, Any]:
    path = "session.audio.input."
    refuse_unknown(audio_in, AUDIO_INPUT_KEYS, path)
    changes: dict[str, Any] = {}
    if "turn_detection" in audio_in:
        changes["turn_detection"] = _parse_turn_detection(audio_in["turn_detection"], path)
    if "transcription" in audio_in:
        changes["transcription"] = _parse_transcription(audio_in["transcription"], path)
    if "noise_reduction" in audio_in:
        changes.update(_parse_noise_reduction(audio_in["noise_reduction"], path))
    return changes


def _parse_noise_reduction(value: Any, path: str) -> dict[str, Any]:
    """The changes: its type (None: off) and its strength when given (else kept)."""
    if value is None:
        return {"noise_reduction": None}
    path += "noise_reduction"
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path} must be an object or null", path)
    refuse_unknown(value, NOISE_REDUCTION_KEYS, path + ".")
    strength = _number(value, "strength", path + ".", 0.0, 1.0)
    kind = value.get("type")
    if kind not in NOISE_REDUCTION_TYPES:
        raise EventError("invalid_value", _invalid(kind, NOISE_REDUCTION_TYPES), path + ".type")
    changes: dict[str, Any] = {"noise_reduction": str(kind)}
    if strength is not None:
        changes["noise_reduction_strength"] = strength
    return changes


def _parse_transcription(value: Any, path: str) -> Transcription | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        message = f"{path}transcription must be an object or null"
        raise EventError("invalid_type", message, path + "transcription")
    transcription: Mapping[str, Any] = value
    path += "transcription."
    refuse_unknown(transcription, TRANSCRIPTION_KEYS, path)
    delay = _str(transcription, "delay", path=path)
    if delay is not None and delay not in TRANSCRIPTION_DELAYS:
        raise EventError("invalid_value", _invalid(delay, TRANSCRIPTION_DELAYS), path + "delay")
    return Transcription(
        _str(transcription, "model", path=path) or Transcription.model,
        _str(transcription, "language", path=path),
        _str(transcription, "prompt", path=path),
        _strings(transcription, "keywords", path),
        _strings(transcription, "languages", path),
        delay,
    )


def _strings(obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise EventError("invalid_type", f"{path}{key} must be an array of strings", path + key)
    return tuple(value)


def _parse_turn_detection(value: Any, path: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path}turn_detection must be an object or null")
    path += "turn_detection."
    # semantic_vad (what @openai/agents-realtime asks for by default) runs on the same
    # webrtcvad turn detector here, its eagerness setting the silence that ends a turn.
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise EventError(
            "invalid_value", "turn detection must be server_vad or semantic_vad", path + "type"
        )
    refuse_unknown(value, SERVER_VAD_KEYS if kind == "server_vad" else SEMANTIC_VAD_KEYS, path)
    knobs: dict[str, Any] = {}
    if (threshold := _number(value, "threshold", path, 0.0, 1.0)) is not None:
        knobs["threshold"] = threshold
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        if (ms := _number(value, key, path, 0, 10_000)) is not None:
            knobs[key] = int(ms)
    for key in ("create_response", "interrupt_response"):
        if key in value and not isinstance(value[key], bool):
            raise EventError("invalid_type", f"{path}{key} must be a boolean", path + key)
        if key in value:
            knobs[key] = value[key]
    if (idle_ms := _number(value, "idle_timeout_ms", path, *IDLE_TIMEOUT_MS_RANGE)) is not None:
        knobs["idle_timeout_ms"] = int(idle_ms)
    if (eagerness := value.get("eagerness")) is not None:
        if eagerness not in EAGERNESS:
            raise EventError("invalid_value", _invalid(eagerness, EAGERNESS), path + "eagerness")
        knobs["eagerness"] = eagerness
    return TurnDetection(**knobs, type=kind)


def _parse_tools(value: Any) -> tuple[FunctionTool, ...]:
    if not isinstance(value, list):
        raise EventError("invalid_type", "session.tools must be an array", "session.tools")
    return tuple(_parse_tool(tool, f"session.tools[{i}].") for i, tool in enumerate(value))


def _parse_tool(tool: Any, path: str) -> FunctionTool:
    if not isinstance(tool, dict):
        raise EventError("invalid_type", f"{path[:-1]} must be an object", path[:-1])
    if tool.get("type", "function") != "function":  # e.g. "mcp": no MCP client here
        raise EventError("invalid_value", _invalid(tool.get("type"), ("function",)), path + "type")
    refuse_unknown(tool, FUNCTION_TOOL_KEYS, path)
    name = _str(tool, "name", required=True, path=path) or ""
    parameters = _obj(tool, "parameters", path) or {"type": "object", "properties": {}}
    return FunctionTool(name, _str(tool, "description", path=path) or "", parameters)


def _parse_item_create(raw: Mapping[str, Any], event_id: str | None) -> ConversationItemCreate:
    item = _obj(raw, "item")
    if item is None:
        raise EventError("missing_required_parameter", "missing item", "item")
    item_id = _str(item, "id", path="item.") or new_id("item")
    previous = _str(raw, "previous_item_id")
    return ConversationItemCreate(event_id, _new_item(item), item_id, previous)


def _new_item(item: Mapping[str, Any]) -> NewItem:
    kind = _str(item, "type", required=True, path="item.")
    if kind in ITEM_KEYS:
        refuse_unknown(item, ITEM_KEYS[kind], "item.")
    if kind == "function_call_output":
        call_id = _str(item, "call_id", required=True, path="item.") or ""
        return FunctionCallOutput(call_id, _str(item, "output", required=True, path="item.") or "")
    if kind == "function_call":
        call_id = _str(item, "call_id", required=True, path="item.") or ""
        name = _str(item, "name", required=True, path="item.") or ""
        return FunctionCall(call_id, name, _str(item, "arguments", path="item.") or "{}")
    if kind == "message":
        return _message(item)
    supported = ("message", "function_call", "function_call_output")
    raise EventError("invalid_value", _invalid(kind, supported), "item.type")


_PART_TYPES = {
    "user": ("input_text", "input_audio", "input_image", "text"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


def _message(item: Mapping[str, Any]) -> NewItem:
    role = item.get("role")
    if role not in _PART_TYPES:
        raise EventError("invalid_value", _invalid(role, tuple(_PART_TYPES)), "item.role")
    parts = _parts(item, _PART_TYPES[role])
    for i, part in enumerate(parts):
        refuse_unknown(part, PART_KEYS[role], f"item.content[{i}].")
    kinds = {part["type"] for part in parts}
    if "input_audio" in kinds:
        if len(kinds) > 1:
            message = "a user message is either input_audio or input_text parts"
            raise EventError("invalid_value", message, "item.content")
        return _user_audio(parts)
    if "input_image" in kinds:
        return _user_with_images(parts)
    texts = [_part_text(part, f"item.content[{i}].") for i, part in enumerate(parts)]
    if role == "system":
        return SystemText(" ".join(texts))
    if role == "assistant":
        return AssistantText(" ".join(texts), "output_audio" in kinds)
    return UserText(" ".join(texts))


def _parts(item: Mapping[str, Any], allowed: tuple[str, ...]) -> list[Mapping[str, Any]]:
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise EventError("invalid_type", "item.content must be a non-empty array", "item.content")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in allowed:
            kind = part.get("type") if isinstance(part, dict) else part
            raise EventError("invalid_value", _invalid(kind, allowed), f"item.content[{i}].type")
    return content


def _user_with_images(parts: list[Mapping[str, Any]]) -> UserText:
    read: list[str | ImagePart] = []
    for i, part in enumerate(parts):
        path = f"item.content[{i}]."
        if part["type"] == "input_image":
            read.append(image_part(part, path))
        else:
            read.append(_part_text(part, path))
    texts = [piece for piece in read if isinstance(piece, str)]
    images = tuple(piece for piece in read if isinstance(piece, ImagePart))
    first = next(i for i, part in enumerate(parts) if part["type"] == "input_image")
    return UserText(" ".join(texts), images, first, tuple(read))


def _part_text(part: Mapping[str, Any], path: str) -> str:
    """An ``output_audio`` part's words are its transcript; any other part's, its text."""
    key = "transcript" if part["type"] == "output_audio" else "text"
    return _str(part, key, required=True, path=path) or ""


def _user_audio(parts: list[Mapping[str, Any]]) -> UserAudio:
    pcm, notes = b"", []
    for i, part in enumerate(parts):
        path = f"item.content[{i}]."
        try:
            pcm += audio_bytes(_str(part, "audio", required=True, path=path) or "")
        except EventError as error:
            raise EventError(error.code, error.message, path + "audio") from None
        if (note := _str(part, "transcript", path=path)) is not None:
            notes.append(note)
    return UserAudio(pcm, " ".join(notes) if notes else None)


def _parse_response_create(raw: Mapping[str, Any], event_id: str | None) -> ResponseCreate:
    refuse_unknown(raw, frozenset({"type", "event_id", "response"}), "")
    response = _obj(raw, "response") or {}
    return ResponseCreate(event_id, _str(response, "instructions", path="response."), response)


def _parse_response_cancel(raw: Mapping[str, Any], event_id: str | None) -> ResponseCancel:
    return ResponseCancel(event_id, _str(raw, "response_id"))


def _item_id(raw: Mapping[str, Any]) -> str:
    return _str(raw, "item_id", required=True) or ""


def _parse_truncate(raw: Mapping[str, Any], event_id: str | None) -> ItemTruncate:
    index = _number(raw, "content_index", "", 0, 1_000) or 0.0
    end_ms = _number(raw, "audio_end_ms", "", 0, 86_400_000)
    if end_ms is None:
        raise EventError("missing_required_parameter", "missing audio_end_ms", "audio_end_ms")
    return ItemTruncate(event_id, _item_id(raw), int(index), int(end_ms))


def _parse_append(raw: Mapping[str, Any], event_id: str | None) -> AudioAppend:
    return AudioAppend(event_id, audio_bytes(_str(raw, "audio", required=True) or ""))


MAX_HEARD_MS = 600_000.0  # a heard time over 10 minutes is no measurement
HEARD_KEYS = frozenset(
    {"type", "event_id", "response_id", "after_speech_stopped_ms", "after_output_started_ms"}
)
_RESPONSE_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _parse_turn_heard(raw: Mapping[str, Any], event_id: str | None) -> TurnHeard:
    refuse_unknown(raw, HEARD_KEYS, "")
    response_id = _str(raw, "response_id", required=True) or ""
    if not 0 < len(response_id) <= 64 or not set(response_id) <= _RESPONSE_ID_CHARS:
        message = "response_id must be 1-64 of A-Z a-z 0-9 _ -"
        raise EventError("invalid_value", message, "response_id")
    stopped = _number(raw, "after_speech_stopped_ms", "", 0.0, MAX_HEARD_MS)
    started = _number(raw, "after_output_started_ms", "", 0.0, MAX_HEARD_MS)
    if stopped is None and started is None:
        message = "give after_speech_stopped_ms or after_output_started_ms (or both)"
        raise EventError("missing_required_parameter", message, "after_output_started_ms")
    return TurnHeard(event_id, response_id, stopped, started)


def _buffer_command(kind: str) -> _Parser:
    return lambda raw, event_id: BufferCommand(event_id, kind)


_Parser = Callable[[Mapping[str, Any], str | None], ClientEvent]
_PARSERS: dict[str, _Parser] = {
    "session.update": _parse_session_update,
    "conversation.item.create": _parse_item_create,
    "response.create": _parse_response_create,
    "response.cancel": _parse_response_cancel,
    "input_audio_buffer.append": _parse_append,
    "input_audio_buffer.clear": _buffer_command("input_audio_buffer.clear"),
    "input_audio_buffer.commit": _buffer_command("input_audio_buffer.commit"),
    "output_audio_buffer.clear": _buffer_command("output_audio_buffer.clear"),
    "conversation.item.retrieve": lambda raw, event_id: ItemRetrieve(event_id, _item_id(raw)),
    "conversation.item.delete": lambda raw, event_id: ItemDelete(event_id, _item_id(raw)),
    "conversation.item.truncate": _parse_truncate,
    "voicerelay.turn.heard": _parse_turn_heard,
}
