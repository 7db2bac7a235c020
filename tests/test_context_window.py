"""What a model request is sent of the conversation (``pipeline.context_window``): the cut of
OpenAI's ``truncation``, reckoned as if a request followed every message, in the tokens of the
model's encoding (quicktok's o200k_base and cl100k_base; the counts below are tiktoken's)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from pipeline.assembly import preload_encoding
from pipeline.config import PipelineConfig
from pipeline.context_window import (
    CL100K_BASE,
    O200K_BASE,
    ContextWindow,
    encoding_for_model,
    estimated_tokens,
    message_tokens,
    token_counter,
)
from pipeline.providers import Message, ToolCall

# 80 digits are 27 tokens (numbers go by three digits); with the role's token and the
# message's three, 31 a message
TURNS = [Message("user" if i % 2 == 0 else "assistant", f"{i:02d}" * 40) for i in range(8)]
MIXED = "Bonjour, ça va ? 日本語のテキスト 😀"


def test_texts_are_counted_in_the_encodings_tokens() -> None:
    o200k, cl100k = token_counter(O200K_BASE), token_counter(CL100K_BASE)
    assert o200k is not None and cl100k is not None
    assert list(o200k.encode_ordinary("hello world")) == [24912, 2375]  # type: ignore[attr-defined]
    assert list(cl100k.encode_ordinary("hello world")) == [15339, 1917]  # type: ignore[attr-defined]
    assert cl100k.count("tiktoken is great!") == o200k.count("tiktoken is great!") == 6
    assert (o200k.count(MIXED), cl100k.count(MIXED)) == (12, 14)
    assert (o200k.count("noon"), cl100k.count("noon")) == (2, 1)
    # a special token's name in a message is text, counted as its characters
    assert o200k.count("<|endoftext|>") == cl100k.count("<|endoftext|>") == 7


def test_a_message_is_its_roles_token_its_texts_and_three_for_its_framing() -> None:
    assert message_tokens(Message("user", "hello world"), O200K_BASE) == 3 + 1 + 2
    assert message_tokens(TURNS[1], O200K_BASE) == 31
    assert message_tokens(Message("user", MIXED), CL100K_BASE) == 3 + 1 + 14
    call = ToolCall("call_1", "current_time", "{}")
    assert message_tokens(Message("assistant", tool_calls=(call,)), O200K_BASE) == 3 + 1 + 2 + 1


def test_a_lone_surrogate_is_counted_as_the_replacement_character() -> None:
    text = json.loads('"a\\ud800b"')  # JSON gives Python a string UTF-8 cannot encode
    replaced = message_tokens(Message("user", "a\ufffdb"), O200K_BASE)
    assert message_tokens(Message("user", text), O200K_BASE) == replaced
    assert ContextWindow(5).view([Message("user", text)] * 2) == [Message("user", text)]


def test_the_model_names_its_encoding() -> None:
    for model in ["gpt-4o-mini", "gpt-realtime", "gpt-5", "gpt-4.1-nano", "o3", "o4-mini"]:
        assert encoding_for_model(model) == O200K_BASE, model
    for model in ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "ft:gpt-4-0613:acme::x"]:
        assert encoding_for_model(model) == CL100K_BASE, model
    assert encoding_for_model("qwen2.5-coder") == O200K_BASE  # not OpenAI's: as its current
    assert PipelineConfig(llm="openai", openai_llm_model="gpt-4").engine_config().context == (
        ContextWindow(encoding=CL100K_BASE)
    )
    with pytest.raises(ValueError, match="encoding must be one of"):
        ContextWindow(100, encoding="p50k_base")


def test_the_context_grows_back_to_its_budget_before_the_next_cut() -> None:
    window = ContextWindow(100, 0.5)  # 31 tokens a message: the fourth is over 100
    assert window.view(TURNS[:3]) == TURNS[:3]
    assert window.view(TURNS[:4]) == TURNS[3:4]  # cut to at most 50
    assert window.view(TURNS[:5]) == TURNS[3:5]  # the same start: grown back, not cut again
    assert window.view(TURNS[:6]) == TURNS[3:6]
    assert window.view(TURNS[:7]) == TURNS[6:7]  # over 100 again: the next cut
    assert window.view(TURNS) == TURNS[6:]


def test_the_cut_is_in_the_models_encoding() -> None:
    history = [Message("user", MIXED), Message("assistant", MIXED), Message("user", "Yes.")]
    # o200k: 16 + 16 + 6 tokens, cl100k: 18 + 18 + 6
    assert ContextWindow(38, 1.0, O200K_BASE).view(history) == history
    assert ContextWindow(38, 1.0, CL100K_BASE).view(history) == history[1:]


def test_the_newest_message_is_always_sent_and_a_tool_result_keeps_its_call() -> None:
    long_question = Message("user", "x" * 4000)
    assert ContextWindow(10, 0.5).view([TURNS[0], long_question]) == [long_question]
    call = ToolCall("call_1", "current_time", "{}")
    answer = Message("assistant", "y" * 400, tool_calls=(call,))
    result = Message("tool", "noon", tool_call_id="call_1")
    assert ContextWindow(20, 1.0).view([TURNS[0], answer, result]) == [answer, result]


def test_without_its_encoding_a_message_is_estimated_and_that_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "quicktok", None)  # the import fails, as if not installed
    token_counter.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.context_window"):
            assert message_tokens(TURNS[0], O200K_BASE) == 4 + 80 // 4 == estimated_tokens(TURNS[0])
            assert ContextWindow(50, 0.5).view(TURNS[:3]) == TURNS[2:3]  # 24 a message
        assert [record.getMessage() for record in caplog.records] == [
            "the o200k_base encoding did not load (import of quicktok halted; None in "
            "sys.modules): tokens are estimated at 4 characters a token"
        ]
    finally:
        token_counter.cache_clear()


async def test_the_encoding_is_loaded_before_any_call_when_asked() -> None:
    token_counter.cache_clear()
    config = PipelineConfig.from_env({"PIPELINE_ENCODING_PRELOAD": "1", "PIPELINE_LLM": "openai",
                                      "PIPELINE_OPENAI_LLM_MODEL": "gpt-4"})  # fmt: skip
    await preload_encoding(config)
    assert token_counter.cache_info().currsize == 1
    assert token_counter(CL100K_BASE) is not None and token_counter.cache_info().hits == 1
    assert not PipelineConfig().encoding_preload  # off unless asked (the image asks)


def test_disabled_sends_everything() -> None:
    assert ContextWindow(None).view(TURNS * 100) == TURNS * 100
