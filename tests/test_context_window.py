"""What a model request is sent of the conversation (``pipeline.context_window``): the cut of
OpenAI's ``truncation``, reckoned as if a request followed every message."""

from __future__ import annotations

from pipeline.context_window import ContextWindow, estimated_tokens
from pipeline.providers import Message, ToolCall

TURNS = [Message("user" if i % 2 == 0 else "assistant", f"{i:02d}" * 40) for i in range(8)]


def test_a_message_is_estimated_at_four_characters_a_token_and_four_for_its_framing() -> None:
    assert estimated_tokens(TURNS[0]) == 4 + 80 // 4
    call = ToolCall("call_1", "current_time", "{}")
    assert estimated_tokens(Message("assistant", tool_calls=(call,))) == 4 + 4  # 14 characters


def test_the_context_grows_back_to_its_budget_before_the_next_cut() -> None:
    window = ContextWindow(100, 0.5)  # 24 tokens a message: the fifth is over 100
    assert window.view(TURNS[:4]) == TURNS[:4]
    assert window.view(TURNS[:5]) == TURNS[3:5]  # cut to at most 50
    assert window.view(TURNS[:6]) == TURNS[3:6]  # the same start: grown back, not cut again
    assert window.view(TURNS[:7]) == TURNS[3:7]
    assert window.view(TURNS) == TURNS[6:]  # over 100 again: the next cut


def test_the_newest_message_is_always_sent_and_a_tool_result_keeps_its_call() -> None:
    long_question = Message("user", "x" * 4000)
    assert ContextWindow(10, 0.5).view([TURNS[0], long_question]) == [long_question]
    call = ToolCall("call_1", "current_time", "{}")
    answer = Message("assistant", "y" * 400, tool_calls=(call,))
    result = Message("tool", "noon", tool_call_id="call_1")
    assert ContextWindow(20, 1.0).view([TURNS[0], answer, result]) == [answer, result]


def test_disabled_sends_everything() -> None:
    assert ContextWindow(None).view(TURNS * 100) == TURNS * 100
