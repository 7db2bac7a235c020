"""Transcription deltas from a recogniser that revises its guesses (``stable_words``): only
settled words are sent, never taken back, and with the final transcript they add up to it."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from pipeline import events as ev
from transceiver.realtime.stable_words import StableWords
from transceiver.realtime.translation import EngineEventTranslator

GUESSES = ["Tell me a", "Tell me abut the", "Tell me about the moo", "Tell me about the moon"]
FINAL = "Tell me about the moon."


def test_words_two_guesses_agree_on_settle_but_the_newest_last_word() -> None:
    words = StableWords()
    assert [words.guess(g) for g in GUESSES] == ["", "Tell me", "Tell me", "Tell me about the"]
    assert words.guess("Tell me") == "Tell me about the"  # a shorter guess takes nothing back
    assert words.guess("Tell me about the moon") == "Tell me about the"
    assert StableWords().guess("one") == ""  # a single word may be cut short


def test_a_revision_of_a_settled_word_adds_nothing_until_the_guesses_go_past_it() -> None:
    words = StableWords()
    for guess in ("I am me and", "I am me and you"):
        words.guess(guess)
    assert words.text == "I am me and"
    assert words.guess("I am meadow and you") == "I am me and"  # not "me" made longer
    assert words.guess("I am meadow and you too") == "I am me and"
    assert words.guess("I am me and you too") == "I am me and"
    assert words.guess("I am me and you too now") == "I am me and you too"


@given(st.lists(st.lists(st.sampled_from(["a", "b", "ab", "c"]), max_size=6), max_size=8))
def test_the_settled_text_only_grows_and_is_what_two_guesses_in_a_row_began_with(
    guesses: list[list[str]],
) -> None:
    words, before, previous = StableWords(), "", ""
    for guess in (" ".join(g) for g in guesses):
        settled = words.guess(guess)
        assert settled.startswith(before) and (settled == before or not before or
                                              settled[len(before)] == " ")  # fmt: skip
        if settled != before:
            assert guess.startswith(settled) and previous.split()[: len(settled.split())] == (
                settled.split()
            )
        before, previous = settled, guess


def transcription(partials: list[str], final: str) -> list[dict[str, Any]]:
    translator = EngineEventTranslator(media_track=False)
    translator.settled_partials = True
    events = translator.translate(ev.SpeechStartedEvent(0.0, 0, turn=1))
    events += translator.translate(ev.SpeechStoppedEvent(1.0, 2000, turn=1))
    for text in partials:
        events += translator.translate(ev.InputTranscript(1, text, final=False))
    events += translator.translate(ev.InputTranscript(1, final, final=True))
    kinds = ("delta", "completed")
    prefix = "conversation.item.input_audio_transcription."
    return [e for e in events if e["type"] in [prefix + kind for kind in kinds]]


def test_revised_partials_give_deltas_that_add_up_to_the_completed_transcript() -> None:
    events = transcription(GUESSES, FINAL)
    *deltas, completed = events
    assert [e["delta"] for e in deltas] == ["Tell me", " about the", " moon."]
    assert completed["transcript"] == FINAL == "".join(e["delta"] for e in deltas)


def test_a_final_that_revises_a_settled_word_sends_no_delta_and_completes_with_itself() -> None:
    *deltas, completed = transcription(["Tell me abut the", "Tell me abut the moon"], FINAL)
    assert [e["delta"] for e in deltas] == ["Tell me abut the"]  # as heard twice; not retracted
    assert completed["transcript"] == FINAL  # OpenAI's completed transcript is the final one


def test_growing_partials_are_sent_as_they_come_when_the_recogniser_never_revises() -> None:
    plain = EngineEventTranslator(media_track=False)  # settled_partials off: OpenAI's stream
    plain.translate(ev.SpeechStartedEvent(0.0, 0, turn=1))
    plain.translate(ev.SpeechStoppedEvent(1.0, 2000, turn=1))
    sent = [
        e["delta"]
        for text in ("Tell me a", "Tell me about")
        for e in plain.translate(ev.InputTranscript(1, text, final=False))
        if e["type"].endswith(".delta")
    ]
    assert sent == ["Tell me a", "bout"]
