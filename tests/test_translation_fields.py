"""A translation session's fields (``transceiver.realtime.translation_fields``, pure): what a
create or update request may say, the session as reported (validated as the SDK's type), the
instruction the language model is given, and transcript deltas that add up with no client-side
spaces. The session itself, end to end: ``test_realtime_translation.py``."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.realtime import RealtimeTranslationSession

from transceiver.realtime.event_errors import EventError
from transceiver.realtime.translation_fields import (
    TranscriptStream,
    TranslationConfig,
    as_realtime,
    created,
    instruction,
    language_name,
    session_json,
    updated,
    utterance_instruction,
)


def test_a_create_request_sets_the_model_language_and_transcription() -> None:
    source = {"transcription": {"model": "gpt-realtime-whisper"}, "noise_reduction": None}
    audio = {"input": source, "output": {"language": "es"}}
    model, update = created({"model": "m", "audio": audio})
    config = update.apply(TranslationConfig(model=model))
    assert config == TranslationConfig("m", "es", "gpt-realtime-whisper")
    assert update.realtime == {"noise_reduction": None}  # the Realtime parser's to check
    reported = session_json(config, "sess_1", None, 1_000)
    RealtimeTranslationSession.model_validate(reported)
    assert set(reported) == set(RealtimeTranslationSession.model_fields)
    assert reported["expires_at"] == 1_000 + 3600
    assert reported["audio"]["input"]["transcription"] == {"model": "gpt-realtime-whisper"}


def test_an_update_changes_only_what_it_names() -> None:
    config = TranslationConfig(language="fr", transcription_model="whisper")
    assert updated({}).apply(config) == config
    off = updated({"audio": {"input": {"transcription": None}}}).apply(config)
    assert (off.language, off.transcription_model) == ("fr", None)
    assert updated({"audio": {"output": {"language": "pt-BR"}}}).apply(config).language == "pt-BR"


@pytest.mark.parametrize(
    ("session", "code", "param"),
    [
        ([], "invalid_type", "session"),
        ({"type": "realtime"}, "unknown_parameter", "session.type"),
        ({"model": "m"}, "unknown_parameter", "session.model"),  # fixed at creation
        ({"audio": {"output": {"voice": "x"}}}, "unknown_parameter", "session.audio.output.voice"),
        ({"audio": {"input": {"turn_detection": None}}}, "unknown_parameter",
         "session.audio.input.turn_detection"),
        ({"audio": {"output": {"language": ""}}}, "invalid_value", "session.audio.output.language"),
        ({"audio": {"output": {"language": "en_US"}}}, "invalid_value",
         "session.audio.output.language"),
        ({"audio": {"input": {"transcription": {"model": 1}}}}, "invalid_value",
         "session.audio.input.transcription.model"),
        ({"audio": {"input": {"transcription": {"model": "w", "language": "en"}}}},
         "unknown_parameter", "session.audio.input.transcription.language"),
    ],
)  # fmt: skip
def test_a_bad_update_is_refused_naming_its_field(session: Any, code: str, param: str) -> None:
    with pytest.raises(EventError) as refused:
        updated(session)
    assert (refused.value.code, refused.value.param) == (code, param)


def test_a_create_request_names_only_a_translation_session() -> None:
    with pytest.raises(EventError) as refused:
        created({"type": "realtime", "model": "m"})
    assert (refused.value.code, refused.value.param) == ("invalid_value", "session.type")
    with pytest.raises(EventError) as refused:
        created({"model": "m", "instructions": "x"})
    assert refused.value.param == "session.instructions"


def test_the_model_is_told_the_language_by_name_and_each_utterances_words() -> None:
    assert language_name("es") == "Spanish" and language_name("pt-BR") == "Portuguese"
    assert language_name("tlh") == "the language tagged 'tlh'"
    config = TranslationConfig(language="de")
    assert "Translate what the user says into German." in instruction(config)
    fields = as_realtime(config, updated({}))
    assert fields["tools"] == [] and fields["instructions"] == instruction(config)
    detection = fields["audio"]["input"]["turn_detection"]
    assert (detection["create_response"], detection["interrupt_response"]) == (False, False)
    told = utterance_instruction(config, "Guten Tag")
    assert told.startswith(instruction(config)) and told.endswith("«Guten Tag»"), told


def test_transcript_pieces_add_up_with_a_space_between_segments_only() -> None:
    stream = TranscriptStream()
    pieces = [
        stream.piece("r1", "Hola "),
        stream.piece("r1", "mundo."),
        stream.piece("r2", "Adiós"),  # a new segment after text with no trailing space
        stream.piece("r2", "."),
        stream.piece("r3", " Ya"),  # it brings its own space
    ]
    assert pieces == ["Hola ", "mundo.", " Adiós", ".", " Ya"]
    assert "".join(pieces) == "Hola mundo. Adiós. Ya"
