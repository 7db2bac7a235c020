"""What a Realtime session config means for the engine: VAD knobs, instructions, tools.

Policy layer, pure. ``SessionPolicy`` holds the process's base ``EngineConfig`` and the
server's built-in tools; from a ``SessionConfig`` (as session.update leaves it) it derives the
engine config and the tool registry, and checks what the deployment decides: the voice must
be one the TTS has (``voices``, its default first). Client tools are executed by the client: a
declared tool replaces a built-in of the same name, and a call to it ends the response
(OpenAI's flow: function_call item, then the client's function_call_output and
response.create).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import EngineConfig
from pipeline.providers import ToolSpec
from pipeline.tools import Tool, ToolRegistry
from transceiver.realtime.client_events import (
    EventError,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    new_id,
    parse_client_event,
)
from transceiver.store.keys import MAX_CONFIG_BYTES, encode_json


@dataclass(frozen=True)
class SessionPolicy:
    base: EngineConfig
    builtin_tools: Sequence[Tool] = ()
    model: str = "voicerelay-local"
    voices: tuple[str, ...] = ("joe",)  # the TTS's, its default first

    def check_voice(self, config: SessionConfig) -> None:
        """EventError unless the session's voice is one the TTS speaks in."""
        if config.voice not in self.voices:
            supported = ", ".join(repr(voice) for voice in self.voices)
            message = f"Invalid value: {config.voice!r}. Supported values are: {supported}."
            raise EventError("invalid_value", message, "session.audio.output.voice")

    def initial(self, requested: Mapping[str, Any] | None = None) -> SessionConfig:
        """The session a new call starts with; ``requested`` as in a session.update's
        ``session`` (from the calls request or a client secret). Raises EventError."""
        vad = self.base.vad
        detection = TurnDetection(
            threshold=vad.threshold,
            prefix_padding_ms=vad.prefix_padding_ms,
            silence_duration_ms=vad.silence_duration_ms,
        )
        config = SessionConfig(
            new_id("sess"),
            model=self.model,
            instructions=self.base.instructions,
            voice=self.voices[0],
            turn_detection=detection,
        )
        if requested:
            config = session_update_from(requested).apply(config)
            self.check_voice(config)
            check_storable(config)
        return config

    def engine_config(self, config: SessionConfig) -> EngineConfig:
        detection = config.turn_detection
        vad = self.base.vad
        if detection is not None:
            vad = replace(
                vad,
                threshold=detection.threshold,
                prefix_padding_ms=detection.prefix_padding_ms,
                silence_duration_ms=detection.silence_duration_ms,
            )
        return replace(
            self.base,
            instructions=config.instructions,
            vad=vad,
            turn_detection=detection is not None,
            create_response=detection is not None and detection.create_response,
            interrupt_response=detection is not None and detection.interrupt_response,
            # A voice the TTS lacks (a GPT-Live name on a one-voice TTS): its default.
            voice=config.voice if config.voice in self.voices else None,
            speak="audio" in config.output_modalities,
            max_output_tokens=config.max_output_tokens,
        )

    def tools(self, config: SessionConfig) -> ToolRegistry:
        if config.tool_choice == "none":
            return ToolRegistry()
        declared = {tool.name for tool in config.tools}
        if len(declared) < len(config.tools):
            raise EventError("invalid_value", "tool names must be unique", "session.tools")
        client = [
            Tool(ToolSpec(tool.name, tool.description, tool.parameters)) for tool in config.tools
        ]
        kept = [tool for tool in self.builtin_tools if tool.spec.name not in declared]
        return ToolRegistry([*kept, *client])


def session_update_from(session: Mapping[str, Any]) -> SessionUpdate:
    """A ``session`` object validated exactly as a session.update event's (EventError)."""
    event = parse_client_event(json.dumps({"type": "session.update", "session": dict(session)}))
    assert isinstance(event, SessionUpdate)
    return event


RESPONSE_ONLY_KEYS = ("object", "id")  # in a session as reported, never in a request


def stored_session_update(stored: Mapping[str, Any]) -> SessionUpdate:
    """A session as ``SessionConfig.to_json`` reported it (the session store's copy), validated
    as a request (EventError)."""
    return session_update_from({k: v for k, v in stored.items() if k not in RESPONSE_ONLY_KEYS})


def check_storable(config: SessionConfig) -> None:
    """Refuse (EventError) a session larger than the session store keeps. The same limit holds
    with or without Redis, so a call behaves alike on every deployment."""
    try:
        encode_json(config.to_json(), MAX_CONFIG_BYTES, "session config")
    except ValueError as exc:
        raise EventError("session_too_large", str(exc), "session") from None
