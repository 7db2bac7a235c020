"""What a Realtime session's settings mean for the engine (``transceiver.realtime.policy``):
pure, no process. The same settings are driven end to end in ``test_realtime_settings.py``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pipeline.config import EngineConfig, NoiseReduction
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import (
    DIARIZATION,
    LOGPROBS,
    ForcedTool,
    ToolSpec,
    TranscriptionHints,
    transcription_details,
)
from pipeline.tools import Tool
from transceiver.realtime.client_events import EventError, SessionConfig
from transceiver.realtime.policy import SessionPolicy, session_update_from

CLOCK = Tool(ToolSpec("current_time", "The time."), lambda _: "{}")
POLICY = SessionPolicy(EngineConfig(), (CLOCK,))


def configured(session: dict[str, Any]) -> SessionConfig:
    return session_update_from({"type": "realtime", **session}).apply(POLICY.initial())


def detection(**knobs: Any) -> dict[str, Any]:
    return {"audio": {"input": {"turn_detection": knobs}}}


@pytest.mark.parametrize(
    ("eagerness", "silence_ms"), [("low", 1200), ("medium", 700), ("auto", 700), ("high", 350)]
)
def test_semantic_vad_eagerness_sets_the_silence_that_ends_a_turn(
    eagerness: str, silence_ms: int
) -> None:
    config = configured(detection(type="semantic_vad", eagerness=eagerness))
    assert POLICY.engine_config(config).vad.silence_duration_ms == silence_ms
    reported = config.to_json()["audio"]["input"]["turn_detection"]
    assert reported == {"type": "semantic_vad", "eagerness": eagerness,
                        "create_response": True, "interrupt_response": True}  # fmt: skip


def test_server_vad_keeps_its_own_silence_and_noise_reduction_makes_it_stricter() -> None:
    config = configured(detection(type="server_vad", silence_duration_ms=900))
    vad = POLICY.engine_config(config).vad
    assert (vad.silence_duration_ms, vad.aggressiveness) == (900, 2)
    reduced = configured({**detection(type="server_vad"), "audio": {
        "input": {"noise_reduction": {"type": "near_field"}}}})  # fmt: skip
    assert POLICY.engine_config(reduced).vad.aggressiveness == 3


def test_noise_reduction_reaches_the_engine_its_strength_kept_until_changed() -> None:
    assert POLICY.engine_config(configured({})).noise_reduction is None
    near = {"audio": {"input": {"noise_reduction": {"type": "near_field"}}}}
    config = configured(near)
    assert POLICY.engine_config(config).noise_reduction == NoiseReduction("near_field", 1.0)
    gentle = {"audio": {"input": {"noise_reduction": {"type": "far_field", "strength": 0.4}}}}
    config = session_update_from({"type": "realtime", **gentle}).apply(config)
    assert POLICY.engine_config(config).noise_reduction == NoiseReduction("far_field", 0.4)
    config = session_update_from({"type": "realtime", **near}).apply(config)
    assert POLICY.engine_config(config).noise_reduction == NoiseReduction("near_field", 0.4)
    reported = config.to_json()["audio"]["input"]["noise_reduction"]
    assert reported == {"type": "near_field", "strength": 0.4}


def test_hints_speed_and_tool_choice_reach_the_engine() -> None:
    transcription = {"model": "m", "language": "fr", "prompt": "Lune."}
    config = configured({
        "audio": {"input": {"transcription": transcription}, "output": {"speed": 0.75}},
        "tool_choice": {"type": "function", "name": "current_time"},
    })  # fmt: skip
    engine = POLICY.engine_config(config)
    assert engine.transcription == TranscriptionHints("fr", "Lune.")
    assert (engine.speed, engine.tool_choice) == (0.75, ForcedTool("current_time"))
    assert POLICY.engine_config(configured({"tool_choice": "required"})).tool_choice == "required"


def test_builtins_are_listed_and_run_by_the_server_only_when_declared_as_listed() -> None:
    listed = POLICY.initial().to_json()["tools"]
    assert listed == [{"type": "function", "name": "current_time", "description": "The time.",
                       "parameters": {"type": "object", "properties": {}}}]  # fmt: skip
    assert POLICY.tools(POLICY.initial()).specs() == [CLOCK.spec]
    assert not POLICY.tools(POLICY.initial()).is_client_side("current_time")
    assert POLICY.tools(configured({"tools": []})).specs() == []
    kept = POLICY.tools(configured({"tools": listed}))
    assert not kept.is_client_side("current_time")
    own = [{**listed[0], "description": "My clock."}]  # the client's tool of the same name
    assert POLICY.tools(configured({"tools": own})).is_client_side("current_time")
    assert POLICY.tools(configured({"tools": listed, "tool_choice": "none"})).specs() == []


def test_a_forced_function_must_be_among_the_tools() -> None:
    forced = {"tools": [], "tool_choice": {"type": "function", "name": "current_time"}}
    with pytest.raises(EventError) as refused:
        POLICY.tools(configured(forced))
    error = refused.value
    assert (error.code, error.param) == ("invalid_value", "session.tool_choice.name")


def test_logprobs_and_speakers_are_refused_naming_a_speech_to_text_without_them() -> None:
    """An offline speech-to-text gives neither: the session asking is refused by its name."""
    offline = PocketsphinxSpeechToText()
    details = transcription_details(offline)
    policy = SessionPolicy(EngineConfig(), stt=offline.name, stt_details=details)
    logprobs = {"include": ["item.input_audio_transcription.logprobs"]}
    diarize = {"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe-diarize"}}}}
    for session, param in [
        (logprobs, "session.include"),
        (diarize, "session.audio.input.transcription.model"),
    ]:
        with pytest.raises(EventError) as refused:
            policy.initial(session)
        assert (refused.value.code, refused.value.param) == ("invalid_value", param)
        assert offline.name in str(refused.value)
    openai_stt = frozenset({LOGPROBS, DIARIZATION})
    config = replace(policy, stt_details=openai_stt).initial(logprobs)
    assert config.to_json()["include"] == ["item.input_audio_transcription.logprobs"]
    hints = replace(policy, stt_details=openai_stt).engine_config(config).transcription
    assert (hints.logprobs, hints.diarize) == (True, False)
