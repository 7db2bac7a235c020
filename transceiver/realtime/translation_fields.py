"""A Realtime translation session's fields (``client.realtime.translations``), read and reported.

Pure protocol layer. OpenAI's translation session (the SDK's ``RealtimeTranslationSession``,
``...SessionCreateRequestParam`` and ``...SessionUpdateRequestParam``) has a ``model`` (fixed
at creation) and ``audio``: ``input.transcription`` ``{model}`` (source-language transcript
deltas on, or ``null``: off), ``input.noise_reduction`` ``{type, strength}`` (or ``null``) and
``output.language`` (the target language, a tag such as ``"es"``). A ``session.update`` may
change ``audio`` only. Anything else is ``unknown_parameter`` naming it, a bad value
``invalid_value``/``invalid_type`` naming it, and the update is discarded whole.

Here a translation session is a Realtime session (``as_realtime``: the fields it runs on) whose
language model is told, in ``instruction``, to give back the user's words in the target
language and nothing else; noise reduction is the Realtime session's own (validated by its
parser, so its errors name the same paths). The transcription model is reported as asked: the
words come from the deployment's speech-to-text, which a translation needs either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from transceiver.realtime.event_errors import EventError, json_object, refuse_unknown

TRANSLATION = "translation"  # the session type, and its stored contract's
DEFAULT_MODEL = "gpt-realtime-translate"
DEFAULT_LANGUAGE = "en"
SESSION_LIFETIME_S = 3600  # the expires_at reported; sessions are not cut off here
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}")  # BCP 47's common shapes
LANGUAGE_NAMES = {
    "ar": "Arabic", "bn": "Bengali", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch", "no": "Norwegian",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese",
    "zh": "Chinese",
}  # fmt: skip
INSTRUCTION = (
    "You are an interpreter. Translate what the user says into {language}. Reply with the "
    "translation alone, as it would be spoken: never answer, comment on or refuse what is "
    "said, and keep names and numbers as they are."
)
UTTERANCE = "Translate these words, and only these: «{words}»"
CREATE_KEYS = frozenset({"model", "audio", "type"})
UPDATE_KEYS = frozenset({"audio"})
AUDIO_KEYS = frozenset({"input", "output"})
INPUT_KEYS = frozenset({"transcription", "noise_reduction"})


@dataclass(frozen=True)
class TranslationConfig:
    """What a translation session does beyond the Realtime session under it."""

    model: str = DEFAULT_MODEL
    language: str = DEFAULT_LANGUAGE
    transcription_model: str | None = None  # None: no source-language transcript deltas


@dataclass(frozen=True)
class TranslationUpdate:
    """A validated update: the translation's own fields, and the Realtime session's audio
    input fields it sets (``noise_reduction``), for the Realtime parser to apply."""

    changes: Mapping[str, Any]
    realtime: Mapping[str, Any]

    def apply(self, config: TranslationConfig) -> TranslationConfig:
        return replace(config, **self.changes)


def language_name(tag: str) -> str:
    """The target language as the model is told it: its English name when known."""
    primary = tag.split("-", 1)[0].lower()
    name = LANGUAGE_NAMES.get(primary)
    return f"the language tagged {tag!r}" if name is None else name


def instruction(config: TranslationConfig) -> str:
    return INSTRUCTION.format(language=language_name(config.language))


def utterance_instruction(config: TranslationConfig, words: str) -> str:
    """The instruction for one utterance's translation, naming its words: the model is sent
    the conversation so far, and more may have been heard since."""
    return f"{instruction(config)} {UTTERANCE.format(words=words)}"


def created(session: Any) -> tuple[str, TranslationUpdate]:
    """A create request's ``session`` (a client secret's): its model and fields (EventError)."""
    fields = json_object(session, "session")
    refuse_unknown(fields, CREATE_KEYS, "session.")
    if fields.get("type", TRANSLATION) != TRANSLATION:
        message = (
            f"Invalid value: {fields['type']!r}. A translation session's type is 'translation'."
        )
        raise EventError("invalid_value", message, "session.type")
    model = fields.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise EventError("invalid_value", "session.model must be a model name", "session.model")
    audio = {"audio": fields["audio"]} if "audio" in fields else {}
    return model, updated(audio)


def updated(session: Any) -> TranslationUpdate:
    """A ``session.update``'s ``session``, validated whole (EventError naming the field)."""
    fields = json_object(session, "session")
    refuse_unknown(fields, UPDATE_KEYS, "session.")
    audio = json_object(fields.get("audio", {}), "session.audio")
    refuse_unknown(audio, AUDIO_KEYS, "session.audio.")
    audio_in = json_object(audio.get("input", {}), "session.audio.input")
    refuse_unknown(audio_in, INPUT_KEYS, "session.audio.input.")
    output = json_object(audio.get("output", {}), "session.audio.output")
    refuse_unknown(output, frozenset({"language"}), "session.audio.output.")
    changes: dict[str, Any] = {}
    if "language" in output:
        changes["language"] = _language(output["language"])
    if "transcription" in audio_in:
        changes["transcription_model"] = _transcription(audio_in["transcription"])
    realtime = {k: audio_in[k] for k in ("noise_reduction",) if k in audio_in}
    return TranslationUpdate(changes, realtime)


def _language(value: Any) -> str:
    path = "session.audio.output.language"
    if not isinstance(value, str):
        raise EventError("invalid_type", f"{path} must be a string", path)
    if LANGUAGE_TAG.fullmatch(value) is None:
        message = f"Invalid value: {value!r}. Expected a language tag such as 'es' or 'pt-BR'."
        raise EventError("invalid_value", message, path)
    return value


def _transcription(value: Any) -> str | None:
    path = "session.audio.input.transcription"
    if value is None:
        return None
    refuse_unknown(json_object(value, path), frozenset({"model"}), path + ".")
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise EventError("invalid_value", f"{path}.model must be a model name", path + ".model")
    return model


def as_realtime(config: TranslationConfig, update: TranslationUpdate) -> dict[str, Any]:
    """The Realtime session fields a translation session runs on: the interpreter's
    instruction, no tools, and turn detection that answers nothing itself (each utterance is
    translated by a response of its own, ``utterance_instruction``) and cuts nothing off."""
    detection = {"type": "server_vad", "create_response": False, "interrupt_response": False}
    audio_in: dict[str, Any] = {"turn_detection": detection, **update.realtime}
    return {
        "type": "realtime",
        "instructions": instruction(config),
        "tools": [],
        "output_modalities": ["audio"],
        "audio": {"input": audio_in},
    }


def session_json(
    config: TranslationConfig, session_id: str, noise: Mapping[str, Any] | None, created_s: int
) -> dict[str, Any]:
    """The session as OpenAI reports one (``RealtimeTranslationSession``); ``noise``: the
    Realtime session's ``noise_reduction`` as it reports it."""
    transcription = None if config.transcription_model is None else {
        "model": config.transcription_model
    }  # fmt: skip
    return {
        "id": session_id,
        "type": TRANSLATION,
        "model": config.model,
        "expires_at": created_s + SESSION_LIFETIME_S,
        "audio": {
            "input": {"transcription": transcription, "noise_reduction": noise},
            "output": {"language": config.language},
        },
    }


class TranscriptStream:
    """Append-only text made of pieces: a new segment's first piece gets the space that
    separates it from the text before (clients are told not to add spaces)."""

    def __init__(self) -> None:
        self._last_char = ""
        self._segment: str | None = None

    def piece(self, segment: str, text: str) -> str:
        new_segment, self._segment = segment != self._segment, segment
        if new_segment and self._last_char and not self._last_char.isspace():
            text = text if text[:1].isspace() else " " + text
        if text:
            self._last_char = text[-1]
        return text
