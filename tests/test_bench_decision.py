"""``loadtest.bench_decision``'s first chunks: the rule brain's answers to the browser bench's
questions, as a call gets them, and the few words the early answer speaks first."""

from __future__ import annotations

from loadtest.bench_decision import first_chunk, rule_answer
from loadtest.bench_e2e import QUESTIONS


def test_the_time_question_is_answered_from_the_benchs_fixed_clock() -> None:
    assert rule_answer("What time is it?") == "It is two twenty in the afternoon."


def test_each_answers_first_chunk_is_a_few_words_where_the_answer_goes_on() -> None:
    for question in QUESTIONS:
        answer = rule_answer(question)
        chunk = first_chunk(answer)
        assert answer.startswith(chunk)
        if len(answer.split(".")[0].split()) > 6:  # a sentence longer than a few words
            assert 2 <= len(chunk.split()) <= 4, (question, chunk)


def test_a_one_sentence_answer_without_a_cut_is_its_own_first_chunk() -> None:
    assert first_chunk("Sorry, I did not catch that.") == "Sorry, I did not catch that."
