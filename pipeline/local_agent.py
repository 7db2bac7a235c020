"""LocalRuleBasedAgent: an honest, offline, rule-based agent behind the LanguageModel Protocol.

It is not a language model and does not pretend to be one: it recognises a few intents by
keywords and answers from a knowledge file (format: ``pipeline/knowledge.py`` and the sample
``pipeline/data/knowledge.md``). It goes through the same tool path as a hosted LLM:

- "what time is it" -> a ``current_time`` tool call; the answer is worded from its result;
- any other question -> a ``lookup_knowledge`` tool call; the answer is the entry found
  (when that tool is not offered, the agent searches its own copy of the knowledge file);
- "what did I just ask?" -> read back from the conversation (the previous user message);
- a greeting -> a greeting and the list of topics.

Replies stream word by word. ``tokens_per_s`` paces them like a hosted model writes (0: as fast
as they are produced); "tokens" are words here, and the Usage counts words.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from pipeline.clock_words import clock_of, spoken_time
from pipeline.config import LocalAgentConfig
from pipeline.knowledge import KnowledgeBase, words_of
from pipeline.providers import (
    ForcedTool,
    LanguageModelEvent,
    Message,
    TextDelta,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from pipeline.untrusted_json import JsonInputError, decode

RECALL_VERBS = frozenset({"ask", "asked", "say", "said"})
GREETINGS = frozenset({"hello", "hi", "hey", "morning", "evening"})
TIME_WORDS = frozenset({"time", "clock", "hour"})
Reply = str | ToolCall
FIRST_GREETING = "Hello. Ask me a question."
NOT_CAUGHT = "Sorry, I did not catch that."
NOT_LOOKED_UP = "Sorry, I could not look that up."
TIME_UNREADABLE = "Sorry, I could not read the time."


class LocalRuleBasedAgent:
    name = "local-rule-based"

    def __init__(
        self,
        knowledge: KnowledgeBase,
        config: LocalAgentConfig | None = None,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.knowledge = knowledge
        self.config = config or LocalAgentConfig()
        self._sleep = sleep

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], choice: ToolChoice = "auto"
    ) -> AsyncIterator[LanguageModelEvent]:
        reply = _chosen(self.decide(messages, {tool.name for tool in tools}), tools, choice)
        input_tokens = sum(len(message.content.split()) for message in messages)
        if isinstance(reply, ToolCall):
            yield reply
            yield Usage(input_tokens, 1)
            return
        pieces = reply_pieces(reply)
        interval_s = 1 / self.config.tokens_per_s if self.config.tokens_per_s else 0.0
        for piece in pieces:
            if interval_s:
                await self._sleep(interval_s)
            yield TextDelta(piece)
        yield Usage(input_tokens, len(pieces))

    def fixed_replies(self) -> list[str]:
        """Every reply whose words do not depend on the moment or the conversation: the
        greetings, each knowledge answer, the refusals (not the time, not a recall)."""
        replies = [
            FIRST_GREETING,
            self._greeting(),
            *(entry.answer for entry in self.knowledge.entries),
            self._unknown(),
            NOT_CAUGHT,
            NOT_LOOKED_UP,
            TIME_UNREADABLE,
        ]
        return list(dict.fromkeys(replies))

    def decide(self, messages: Sequence[Message], tool_names: set[str]) -> Reply:
        """The whole policy, pure: the next reply to this conversation."""
        if not messages:
            return FIRST_GREETING
        last = messages[-1]
        if last.role == "tool":
            return self._answer_from_tools(messages)
        return self._answer_question(last.content, messages[:-1], tool_names)

    def _answer_question(self, question: str, earlier: Sequence[Message], tools: set[str]) -> Reply:
        words = set(words_of(question))
        if not words:
            return NOT_CAUGHT
        if "just" in words and words & RECALL_VERBS or {"previous", "question"} <= words:
            return _recall(earlier)
        if words & TIME_WORDS:
            if "current_time" in tools:
                return _tool_call("current_time", {})
            return "Sorry, I have no clock to tell the time."
        if words & GREETINGS and len(words) <= 3:
            return self._greeting()
        if "lookup_knowledge" in tools:
            return _tool_call("lookup_knowledge", {"query": question})
        entry = self.knowledge.search(question)
        return entry.answer if entry else self._unknown()

    def _answer_from_tools(self, messages: Sequence[Message]) -> str:
        calls = {call.call_id: call.name for m in messages for call in m.tool_calls}
        results = [m for m in reversed(messages) if m.role == "tool"]
        return self._word_result(calls.get(results[0].tool_call_id, ""), results[0].content)

    def _word_result(self, tool_name: str, output: str) -> str:
        try:
            result = decode(output)  # a client's tool may have answered: untrusted text
        except JsonInputError:
            result = None
        if tool_name == "current_time":
            clock = clock_of(result)
            if clock is None:
                return TIME_UNREADABLE
            return f"It is {spoken_time(*clock)}."
        if not isinstance(result, dict) or "error" in result:
            return NOT_LOOKED_UP
        if result.get("found"):
            answer = result.get("answer")
            return answer if isinstance(answer, str) and answer.strip() else self._unknown()
        return self._unknown()

    def _greeting(self) -> str:
        return f"Hello! You can ask me about {self._topics()}, or the time."

    def _unknown(self) -> str:
        return f"Sorry, I do not know that. I can tell you about {self._topics()}."

    def _topics(self) -> str:
        titles = [title.lower() for title in self.knowledge.titles]
        return ", ".join(titles[:-1]) + f" and {titles[-1]}" if len(titles) > 1 else titles[0]


def reply_pieces(reply: str) -> list[str]:
    """The text deltas a reply streams as: a word each, spaced as written."""
    return [f" {word}" if index else word for index, word in enumerate(reply.split())]


def _recall(earlier: Sequence[Message]) -> str:
    asked = [m.content for m in earlier if m.role == "user" and m.content.strip()]
    if not asked:
        return "This is your first question."
    return f"You asked: {asked[-1].rstrip('?.! ')}."


def _chosen(reply: Reply, tools: Sequence[ToolSpec], choice: ToolChoice) -> Reply:
    """The reply the tool choice allows: a call of the forced tool, or of some tool when one
    is required (with no arguments: the tool says what it lacks)."""
    if isinstance(choice, ForcedTool):
        keep = isinstance(reply, ToolCall) and reply.name == choice.name
        return reply if keep else _tool_call(choice.name, {})
    if choice == "required" and not isinstance(reply, ToolCall) and tools:
        return _tool_call(tools[0].name, {})
    return reply


def _tool_call(name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:12]}", name, json.dumps(arguments))
