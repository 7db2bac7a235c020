"""The local rule-based agent: knowledge answers, tool calls, memory of the conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import LocalAgentConfig
from pipeline.knowledge import KnowledgeBase, KnowledgeFormatError, load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent, spoken_time
from pipeline.providers import LanguageModelEvent, Message, TextDelta, ToolCall, Usage
from pipeline.tools import builtin_tools

KNOWLEDGE = load_knowledge()
TOOLS = [tool.spec for tool in builtin_tools(KNOWLEDGE)]


async def reply(
    agent: LocalRuleBasedAgent, messages: list[Message], tools: bool = True
) -> list[LanguageModelEvent]:
    return [event async for event in agent.generate(messages, TOOLS if tools else [])]


def text_of(events: list[LanguageModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def user(text: str) -> Message:
    return Message("user", text)


def tool_round(question: str, call: ToolCall, output: str) -> list[Message]:
    """``question``, the assistant's tool ``call`` for it and the client's ``output``."""
    answered = Message("tool", output, tool_call_id=call.call_id)
    return [user(question), Message("assistant", tool_calls=(call,)), answered]


async def test_answers_from_the_sample_knowledge_file_without_tools() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    events = await reply(agent, [user("tell me about the moon")], tools=False)
    assert text_of(events).startswith("The moon is about three hundred eighty thousand")
    assert isinstance(events[-1], Usage) and events[-1].output_tokens == len(events) - 1


async def test_matching_tolerates_recognition_errors() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    events = await reply(agent, [user("when does the libraries open")], tools=False)
    assert "opens at nine" in text_of(events)


async def test_a_knowledge_question_goes_through_the_lookup_tool_and_back() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    (call, usage) = await reply(agent, [user("what about coffee")])
    assert isinstance(call, ToolCall) and call.name == "lookup_knowledge"
    assert json.loads(call.arguments) == {"query": "what about coffee"}
    result = json.dumps({"found": True, "title": "Coffee", "answer": "Coffee keeps you awake."})
    messages = tool_round("what about coffee", call, result)
    assert text_of(await reply(agent, messages)) == "Coffee keeps you awake."


async def test_the_time_comes_from_the_current_time_tool() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    (call, _) = await reply(agent, [user("what time is it")])
    assert isinstance(call, ToolCall) and call.name == "current_time"
    messages = tool_round("what time is it", call, '{"hour": 21, "minute": 30}')
    assert text_of(await reply(agent, messages)) == "It is nine thirty in the evening."


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ('{"time": "07:05"}', "It is seven oh five in the morning."),
        ('{"hour": "15", "minute": 0}', "It is three o'clock in the afternoon."),
        ('{"time": "15:30", "weekday": "Friday"}', "It is three thirty in the afternoon."),
        ('{"minute": 30}', "Sorry, I could not read the time."),
        ('{"hour": 25, "minute": 0}', "Sorry, I could not read the time."),
        ('{"hour": true, "minute": 1e400}', "Sorry, I could not read the time."),
        ('{"hour": [], "minute": {}}', "Sorry, I could not read the time."),
        ('{"time": "noon"}', "Sorry, I could not read the time."),
        ('{"error": "no clock"}', "Sorry, I could not read the time."),
        ('"half past three"', "Sorry, I could not read the time."),
        ("half past three", "Sorry, I could not read the time."),
        ("", "Sorry, I could not read the time."),
    ],
)
async def test_any_current_time_output_from_a_client_gets_a_clear_answer(
    output: str, answer: str
) -> None:
    """A client's ``current_time`` tool may answer anything; the agent never raises on it."""
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    call = ToolCall("c1", "current_time", "{}")
    messages = tool_round("what time is it", call, output)
    assert text_of(await reply(agent, messages)) == answer


@pytest.mark.parametrize("output", ['{"found": true}', '{"found": true, "answer": 7}'])
async def test_a_found_lookup_without_an_answer_is_not_known(output: str) -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    call = ToolCall("c1", "lookup_knowledge", '{"query": "coffee"}')
    messages = tool_round("coffee", call, output)
    assert text_of(await reply(agent, messages)).startswith("Sorry, I do not know that.")


async def test_remembers_the_previous_question() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    history = [user("tell me about coffee"), Message("assistant", "Coffee is made from beans.")]
    # as pocketsphinx heard it: "what did they just asked"
    events = await reply(agent, [*history, user("what did they just asked")])
    assert text_of(events) == "You asked: tell me about coffee."
    assert (
        text_of(await reply(agent, [user("what did I just ask")])) == "This is your first question."
    )


async def test_unknown_topics_and_failed_tools_get_an_honest_answer() -> None:
    agent = LocalRuleBasedAgent(KNOWLEDGE)
    unknown = text_of(await reply(agent, [user("explain quantum chromodynamics")], tools=False))
    assert unknown.startswith("Sorry, I do not know that. I can tell you about the moon, coffee")
    failed = tool_round("coffee", ToolCall("c1", "lookup_knowledge", "{}"), '{"error": "boom"}')
    assert text_of(await reply(agent, failed)) == "Sorry, I could not look that up."
    assert text_of(await reply(agent, [user("")])) == "Sorry, I did not catch that."


async def test_tokens_are_paced_when_configured() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    agent = LocalRuleBasedAgent(KNOWLEDGE, LocalAgentConfig(tokens_per_s=20), sleep=sleep)
    events = await reply(agent, [user("hello")])
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert waits == [0.05] * len(deltas) and len(deltas) > 3


@pytest.mark.parametrize(
    ("hour", "minute", "spoken"),
    [
        (0, 0, "twelve o'clock in the morning"),
        (9, 5, "nine oh five in the morning"),
        (13, 45, "one forty five in the afternoon"),
        (23, 59, "eleven fifty nine in the evening"),
    ],
)
def test_spoken_time(hour: int, minute: int, spoken: str) -> None:
    assert spoken_time(hour, minute) == spoken


def test_knowledge_file_format_and_errors(tmp_path: Path) -> None:
    kb = KnowledgeBase.parse("## Tea\nkeywords: chai, leaves\nTea is brewed.\nFrom leaves.\n")
    (entry,) = kb.entries
    assert entry.title == "Tea" and entry.answer == "Tea is brewed. From leaves."
    assert entry.match_words == {"tea", "chai", "leaves"}
    with pytest.raises(KnowledgeFormatError, match="no '## Title' entries found"):
        KnowledgeBase.parse("just prose")
    with pytest.raises(KnowledgeFormatError, match="entry 'Empty' has no answer text"):
        KnowledgeBase.parse("## Empty\nkeywords: x\n")
    with pytest.raises(KnowledgeFormatError, match="cannot read knowledge file"):
        load_knowledge(tmp_path / "missing.md")
    assert len(KNOWLEDGE.entries) == 5
