"""LLM deltas -> speakable chunks: early first chunk, sentence cuts, nothing lost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.chunker import SpeechChunker
from pipeline.config import ChunkerConfig


def chunk_all(deltas: list[str], config: ChunkerConfig | None = None) -> list[str]:
    chunker = SpeechChunker(config)
    chunks = [chunk for delta in deltas for chunk in chunker.push(delta)]
    return chunks + chunker.flush()


def words(text: str) -> list[str]:
    return [f" {w}" if i else w for i, w in enumerate(text.split())]


def test_sentences_become_chunks_as_soon_as_the_next_token_arrives() -> None:
    chunker = SpeechChunker()
    assert chunker.push("The moon is far away.") == []
    assert chunker.push(" It") == ["The moon is far away."]
    assert chunker.push(" has no air!") == []
    assert chunker.flush() == ["It has no air!"]


def test_the_first_chunk_is_cut_early_at_a_clause_boundary_later_ones_are_not() -> None:
    text = "Well, the library is open now, and it closes at six. Bring a card, please."
    assert chunk_all(words(text)) == [
        "Well, the library is open now,",
        "and it closes at six.",
        "Bring a card, please.",
    ]


def test_the_first_chunk_may_end_before_a_clause_conjunction_once_the_word_is_whole() -> None:
    chunker = SpeechChunker()
    assert chunker.push("The library is open every day") == []
    assert chunker.push(" and") == []  # "and" or "android": not yet known
    assert chunker.push(" closes") == ["The library is open every day"]
    assert chunker.push(" at six and then it shuts.") == []  # later chunks: sentences only
    assert chunker.flush() == ["and closes at six and then it shuts."]


def test_no_conjunction_cut_for_a_short_head_or_a_word_that_only_starts_like_one() -> None:
    assert chunk_all(words("It is cold and wet. Bring a coat.")) == [
        "It is cold and wet.",
        "Bring a coat.",
    ]
    assert chunk_all(words("Sand is made of rock and android is not.")) == [
        "Sand is made of rock",
        "and android is not.",
    ]
    assert chunk_all(words("Two hundred robots andante android.")) == [
        "Two hundred robots andante android."
    ]


def test_the_first_chunk_may_end_before_a_preposition_but_not_before_of_or_to() -> None:
    assert chunk_all(words("The library opens at nine in the morning. It is big.")) == [
        "The library opens",
        "at nine in the morning.",
        "It is big.",
    ]
    assert chunk_all(words("Coffee is made from roasted beans.")) == [
        "Coffee is made",
        "from roasted beans.",
    ]
    assert chunk_all(words("It is in the box.")) == ["It is in the box."]  # a short head
    assert chunk_all(words("A big cup of coffee wants to cool.")) == [
        "A big cup of coffee wants to cool."
    ]


def test_with_first_words_the_first_chunk_ends_after_them_once_the_last_is_whole() -> None:
    chunker = SpeechChunker(ChunkerConfig(first_words=3))
    assert chunker.push("The capital of") == []  # "of" leans on the next word
    assert chunker.push(" France") == []  # "France" or "Frances": not yet known
    assert chunker.push(" is Paris,") == ["The capital of France"]
    assert chunker.push(" a city of two million people. It") == [
        "is Paris, a city of two million people."
    ]
    assert chunker.flush() == ["It"]
    assert chunk_all(words("I am sorry, I cannot set timers."), ChunkerConfig(first_words=3)) == [
        "I am sorry,",  # a clause end still cuts sooner
        "I cannot set timers.",
    ]
    assert chunk_all(words("Yes."), ChunkerConfig(first_words=3)) == ["Yes."]


def test_without_first_words_the_first_chunk_waits_for_a_clause() -> None:
    assert chunk_all(words("The capital of France is Paris. It is big.")) == [
        "The capital of France is Paris.",
        "It is big.",
    ]


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence() -> None:
    text = "Then Dr. Smith met J. Doe. Then they left."
    assert chunk_all(words(text)) == ["Then Dr. Smith met J. Doe.", "Then they left."]
    text = "Dr. Smith met J. Doe at 3.5 km from St. Mary. Then they left."
    assert chunk_all(words(text))[1:] == [  # (the first chunk ends before "at")
        "at 3.5 km from St. Mary.",
        "Then they left.",
    ]


def test_a_run_on_sentence_is_cut_at_max_chars_on_a_space() -> None:
    config = ChunkerConfig(max_chars=30)
    chunks = chunk_all(
        words("one two three four five six seven eight nine ten eleven twelve"), config
    )
    assert all(len(chunk) <= 30 for chunk in chunks)
    assert " ".join(chunks) == "one two three four five six seven eight nine ten eleven twelve"


def test_empty_and_whitespace_input_gives_no_chunks() -> None:
    assert chunk_all(["", "  ", "\n"]) == []


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="chunker sizes"):
        ChunkerConfig(min_chars=0)
    with pytest.raises(ValueError, match="chunker sizes"):
        ChunkerConfig(first_min_chars=500, max_chars=100)
    with pytest.raises(ValueError, match="first_words"):
        ChunkerConfig(first_words=-1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet="abc .,!?;:\n", min_size=0, max_size=12),
        min_size=0,
        max_size=30,
    ),
    st.sampled_from([0, 2]),
)
def test_chunking_loses_and_reorders_nothing(deltas: list[str], first_words: int) -> None:
    chunks = chunk_all(deltas, ChunkerConfig(max_chars=40, first_words=first_words))

    def letters(text: str) -> str:
        return "".join(text.split())

    assert letters("".join(chunks)) == letters("".join(deltas))  # nothing lost or reordered
    assert all(len(chunk) <= 40 for chunk in chunks)
    assert all(chunk and chunk == chunk.strip() for chunk in chunks)
