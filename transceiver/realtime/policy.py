"""What a Realtime session config means for the engine: VAD knobs, instructions, tools.

Policy layer, pure. ``SessionPolicy`` holds the process's base ``EngineConfig`` and the
server's built-in tools; from a ``SessionConfig`` (as session.update leaves it) it derives the
engine config and the tool registry, and checks what the deployment decides: the voice must
be one the TTS has (``voices``, its default first).

Tools are the session's ``tools``, no others (``tools: []``: none). The server's built-ins are
listed there like any other function tool: a new session starts with them, as
``session.created`` shows, and a client keeps one by declaring it exactly as listed (name,
description, parameters); then the server runs it. Any other declared tool is the client's: a
call to it ends the response (OpenAI's flow: function_call item, then the client's
function_call_output and response.create). ``tool_choice``: "none" offers no tools, "required"
makes the first model call of a response call one, a forced function makes it call that one.

Turn detection: ``semantic_vad`` runs the same webrtcvad detector, its ``eagerness`` choosing
the silence that ends a turn (``EAGERNESS_SILENCE_MS``), and asks the end-of-turn model at a
shorter pause (``VadConfig.semantic``, ``pipeline.end_of_turn``): a turn it calls complete
ends there. ``noise_reduction`` filters the input before the VAD
(``pipeline.noise_reduction``, at the session's ``strength``) and also makes the detector one
webrtcvad step stricter (``threshold`` + 0.25; webrtcvad decides then, not Silero, whose
``threshold`` a server_vad session's otherwise is: ``pipeline.silero_vad``), so noise starts
fewer turns. ``speed`` and
the transcription's ``language``/``prompt`` go to the TTS and the speech-to-text that take
them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import EngineConfig, NoiseReduction
from pipeline.providers import (
    DIARIZATION,
    LOGPROBS,
    ForcedTool,
    ModelOptions,
    ToolChoice,
    ToolSpec,
    TranscriptionHints,
)
from pipeline.tools import Tool, ToolRegistry
from transceiver.realtime.client_events import (
    EventError,
    ForcedFunction,
    FunctionTool,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    new_id,
    parse_client_event,
)
from transceiver.store.keys import MAX_CONFIG_BYTES, encode_json

# semantic_vad's eagerness -> the silence that ends a turn (OpenAI's own waits at most 8, 4
# and 2 s for low, medium and high; a fixed window here).
EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 350}
NOISE_REDUCTION_THRESHOLD_STEP = 0.25  # one webrtcvad aggressiveness step
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"  # OpenAI's speech-to-text that tells speakers apart


@dataclass(frozen=True)
class SessionPolicy:
    base: EngineConfig
    builtin_tools: Sequence[Tool] = ()
    model: str = "voicerelay-local"
    voices: tuple[str, ...] = ("joe",)  # the TTS's, its default first
    stt: str = "pocketsphinx"  # the speech-to-text's name, for the errors naming it
    stt_details: frozenset[str] = frozenset()  # what it gives beyond words (``providers``)

    def check_transcription(self, config: SessionConfig) -> None:
        """EventError unless the speech-to-text gives what the session asks of it: logprobs
        (``include``), speakers (the diarizing model); and unless the session asks what OpenAI
        takes with the diarizing model (no prompt or keywords, no logprobs)."""
        transcription = config.transcription
        if config.include_logprobs and LOGPROBS not in self.stt_details:
            message = f"logprobs are not available: the speech-to-text here ({self.stt}) gives none"
            raise EventError("invalid_value", message, "session.include")
        if transcription is None or transcription.model != DIARIZE_MODEL:
            return
        path = "session.audio.input.transcription"
        if DIARIZATION not in self.stt_details:
            message = f"the speech-to-text here ({self.stt}) does not tell speakers apart"
            raise EventError("invalid_value", message, path + ".model")
        for key in ("prompt", "keywords"):
            if getattr(transcription, key):
                message = f"{key} is not supported with the {DIARIZE_MODEL} model"
                raise EventError("invalid_value", message, f"{path}.{key}")
        if config.include_logprobs:
            message = f"logprobs are not supported with the {DIARIZE_MODEL} model"
            raise EventError("invalid_value", message, "session.include")

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
            tools=tuple(_listed(tool) for tool in self.builtin_tools),
        )
        if requested:
            config = session_update_from(requested).apply(config)
            self.check_voice(config)
            self.check_transcription(config)
            check_storable(config)
        return config

    def engine_config(self, config: SessionConfig) -> EngineConfig:
        detection = config.turn_detection
        vad = self.base.vad
        if detection is not None:
            silence_ms = detection.silence_duration_ms
            if detection.type == "semantic_vad":
                silence_ms = EAGERNESS_SILENCE_MS[detection.eagerness]
            threshold, model = detection.threshold, vad.model
            if config.noise_reduction is not None:
                threshold = min(1.0, threshold + NOISE_REDUCTION_THRESHOLD_STEP)
                model = "webrtc" if model == "auto" else model  # the step is webrtcvad's
            vad = replace(
                vad,
                threshold=threshold,
                model=model,
                prefix_padding_ms=detection.prefix_padding_ms,
                silence_duration_ms=silence_ms,
                semantic=detection.type == "semantic_vad",
            )
        return replace(
            self.base,
            instructions=config.instructions,
            vad=vad,
            noise_reduction=None
            if config.noise_reduction is None
            else NoiseReduction(config.noise_reduction, config.noise_reduction_strength),
            turn_detection=detection is not None,
            create_response=detection is not None and detection.create_response,
            interrupt_response=detection is not None and detection.interrupt_response,
            # A voice the TTS lacks (a GPT-Live name on a one-voice TTS): its default.
            voice=config.voice if config.voice in self.voices else None,
            speak="audio" in config.output_modalities,
            max_output_tokens=config.max_output_tokens,
            tool_choice=_engine_choice(config),
            model_options=ModelOptions(config.parallel_tool_calls, config.reasoning_effort),
            speed=config.speed,
            transcription=transcription_hints(config),
            context=replace(  # counted in the base's encoding, the language model's
                self.base.context,
                budget_tokens=config.truncation.budget_tokens,
                retention_ratio=config.truncation.retention_ratio,
            ),
        )

    def tools(self, config: SessionConfig) -> ToolRegistry:
        """The session's tools: a built-in where one is declared as listed, else the client's
        (EventError: names not unique, or a forced function that is not among them)."""
        declared = {tool.name for tool in config.tools}
        if len(declared) < len(config.tools):
            raise EventError("invalid_value", "tool names must be unique", "session.tools")
        choice = config.tool_choice
        if isinstance(choice, ForcedFunction) and choice.name not in declared:
            message = f"tool_choice names {choice.name!r}, which is not among the tools"
            raise EventError("invalid_value", message, "session.tool_choice.name")
        if choice == "none":
            return ToolRegistry()
        return ToolRegistry(self._builtin(tool) or _client_tool(tool) for tool in config.tools)

    def _builtin(self, declared: FunctionTool) -> Tool | None:
        listed = (tool for tool in self.builtin_tools if _listed(tool) == declared)
        return next(listed, None)


def transcription_hints(config: SessionConfig) -> TranscriptionHints:
    """What the speech-to-text is told: the language (or the one ``languages`` names; several
    are the languages it may be in), the prompt with the ``keywords`` after it, whether to
    give logprobs (``include``) and to tell speakers apart (the diarizing model)."""
    transcription = config.transcription
    if transcription is None:
        return TranscriptionHints()
    language, languages = transcription.language, transcription.languages or ()
    if language is None and len(languages) == 1:
        language = languages[0]
    parts = [transcription.prompt or "", ", ".join(transcription.keywords or ())]
    prompt = " ".join(part for part in parts if part) or None
    diarize = transcription.model == DIARIZE_MODEL
    return TranscriptionHints(language, prompt, languages, config.include_logprobs, diarize)


def _listed(tool: Tool) -> FunctionTool:
    """A built-in as the session lists it."""
    spec = tool.spec
    return FunctionTool(spec.name, spec.description, spec.parameters)


def _client_tool(tool: FunctionTool) -> Tool:
    return Tool(ToolSpec(tool.name, tool.description, tool.parameters))


def _engine_choice(config: SessionConfig) -> ToolChoice:
    choice = config.tool_choice
    if isinstance(choice, ForcedFunction):
        return ForcedTool(choice.name)
    return "required" if choice == "required" else "auto"  # "none": no tools are offered


def session_update_from(session: Mapping[str, Any]) -> SessionUpdate:
    """A ``session`` object validated exactly as a session.update event's (EventError)."""
    event = parse_client_event(json.dumps({"type": "session.update", "session": dict(session)}))
    assert isinstance(event, SessionUpdate)
    return event


RESPONSE_ONLY_KEYS = ("object", "id", "expires_at")  # in a session as reported, never in a request


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
