"""What the local language model reads and what we read back from it.

Pure protocol layer: our ``Message``/``ToolSpec`` values become the OpenAI-style chat request
that llama.cpp renders through the model's own Jinja template, and the model's text becomes
text or tool calls again.

Qwen2.5-Coder's template asks for ``<tool_call>{...}</tool_call>``, but the model often writes
the call its own way: in a Markdown fence (```json ... ```), bare, or with every brace doubled
(``{{"name": ...}}``, as if it were a format string). ``parse_tool_calls`` accepts each of
these; ``ToolCallGate`` decides, from the first characters of an answer, whether it is text to
speak at once or a call to hold until it is complete.

The system prompt says what the model cannot do: a coder model otherwise claims abilities it
has not got ("yes, I can set a timer").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.clock_words import clock_of, spoken_time
from pipeline.providers import Message, ToolCall, ToolSpec
from pipeline.untrusted_json import JsonInputError, decode

SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Your replies are spoken: one or two short sentences, "
    "no lists or code. You can only talk: you cannot set timers or alarms, make calls, send "
    "messages or browse the web; say so plainly when asked. For the time, call current_time."
)
# Worded, and the facts placed after it, as measured best on Qwen2.5-Coder-1.5B: with the facts
# first it guessed the time instead of calling the tool; without them it seldom looked up
# the knowledge file and made up its answers.
TOOLS_PROMPT = (
    " For questions about {topics}, call lookup_knowledge. Answer anything else yourself."
)
FACTS_PROMPT = "\n\nNotes for lookup_knowledge: {facts}"
MAX_FACTS_CHARS = 3000  # a larger knowledge file is only searched, not read out to the model
# Characters per token of English text for Qwen's tokenizer, rounded down: a safe estimate
# when trimming the history to the context window.
CHARS_PER_TOKEN = 3
_OPENERS = ("```", "<tool_call>", "<tool_response>", "{", "[")
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)\s*```", re.DOTALL)
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_NAMED = re.compile(r'"name"\s*:\s*"([^"\\]+)"')


def system_prompt(
    topics: Sequence[str] = (), facts: Sequence[str] = (), instructions: str = ""
) -> str:
    """Ours first (the same for every call, so its tokens stay cached), the session's after.
    ``facts`` (the knowledge file's entries) go in whole when they are short."""
    prompt = SYSTEM_PROMPT
    if topics:
        prompt += TOOLS_PROMPT.format(topics=_spoken_list([topic.lower() for topic in topics]))
    if holds_facts(facts):
        prompt += FACTS_PROMPT.format(facts=" ".join(facts))
    return f"{prompt}\n\n{instructions.strip()}" if instructions.strip() else prompt


def holds_facts(facts: Sequence[str]) -> bool:
    """Whether the system prompt reads these facts to the model (they are short enough)."""
    return 0 < len(" ".join(facts)) <= MAX_FACTS_CHARS


def _spoken_list(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else "".join(items)


def chat_messages(messages: Sequence[Message], system: str) -> list[dict[str, Any]]:
    """The request's ``messages``: one system message (``system`` plus any of the
    conversation's), then the conversation as the chat template expects it."""
    extra = [m.content for m in messages if m.role == "system" and m.content.strip()]
    head = "\n\n".join([system, *extra])
    return [{"role": "system", "content": head}] + [
        _chat_message(m) for m in messages if m.role != "system"
    ]


def _chat_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        item["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ]
    return item


def chat_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": dict(tool.parameters),
            },
        }
        for tool in tools
    ]


def recent_history(messages: Sequence[Message], budget_tokens: int) -> list[Message]:
    """The newest messages whose text fits ``budget_tokens`` (system messages always kept),
    starting at a user message so no tool result is left without its call."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    budget_chars = budget_tokens * CHARS_PER_TOKEN - sum(_size(m) for m in system)
    kept: list[Message] = []
    for message in reversed(rest):
        budget_chars -= _size(message)
        if budget_chars < 0 and kept:
            break
        kept.insert(0, message)
    while len(kept) > 1 and kept[0].role != "user":
        kept.pop(0)
    return system + kept


def _size(message: Message) -> int:
    calls = sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    return len(message.content) + calls + 16  # the template's role markers


# --- reading the answer ---------------------------------------------------------------------


@dataclass
class ToolCallGate:
    """Holds an answer's first characters until they show whether it is a tool call.

    ``push`` returns the text that may be spoken now ("" while undecided or holding a call);
    once the answer is complete, ``finish`` returns what is left to speak and ``held`` is the
    whole answer if it looked like a call."""

    tools_offered: bool
    decided: bool = False
    holding: bool = False
    held: str = ""

    def push(self, text: str) -> str:
        if self.decided and not self.holding:
            return text
        self.held += text
        start = self.held.lstrip()
        if self.decided or not start:
            return ""
        if self.tools_offered and start.startswith(_OPENERS):
            self.decided = self.holding = True
            return ""
        if self.tools_offered and any(opener.startswith(start) for opener in _OPENERS):
            return ""  # too short to tell: "`", "<tool"
        self.decided = True
        return self.finish()

    def finish(self) -> str:
        """The text not yet spoken, unless it is held as a call."""
        if self.holding:
            return ""
        text, self.held = self.held, ""
        return text


def bare_tools(tools: Sequence[ToolSpec]) -> frozenset[str]:
    """The names of the tools that take no arguments."""
    return frozenset(tool.name for tool in tools if not tool.parameters.get("properties"))


def settled_call(held: str, bare: Collection[str]) -> ToolCall | None:
    """The call being written in ``held``, once nothing more the model writes can change it:
    one call (not a list), its name complete and one of ``bare``, the tools that take no
    arguments. None otherwise.

    Qwen2.5-Coder writes a call to current_time in 20 tokens (a Markdown fence around
    pretty-printed JSON) at a tenth of a second or more each on one shared core; about half
    of them come after the name (``",\n  "arguments": {}\n}\n```"``)."""
    match = _NAMED.search(held)
    if match is None or match.group(1) not in bare or "[" in held[: match.start()]:
        return None
    if held.lstrip().startswith("<tool_response>"):  # an echoed result, not a call
        return None
    return ToolCall(_call_id(), match.group(1), "{}")


# A question about the time or the day, as people ask it aloud ("what time is it now", "what's
# the time", "do you know what time it is", "what day is it today", "what's the date", "what
# year is it", "what's today?"), not one about a time ("what time does the library open", "a
# time machine"). The model answered "got the time?", "what time do you have?" and "how late
# is it?" with a made-up time, and "what year is it?" with 2023.
_ASKS_THE_TIME = re.compile(
    r"\btime\s+is\s+it\b|\bwhat\s+time\s+it\s+is\b|\bwhat(?:'s|\s+is)\s+the\s+(?:time|date)\b|"
    r"\b(?:tell|give)\s+me\s+the\s+(?:time|date)\b|\bknow\s+the\s+(?:time|date)\b|"
    r"\bcurrent\s+(?:time|date)\b|\bwhat\s+day\s+(?:is\s+it|is\s+today|today)\b|"
    r"\b(?:what's|what\s+is)\s+today's\s+date\b|\bgot\s+the\s+time\b|"
    r"\bwhat\s+time\s+do\s+you\s+have\b|\bhow\s+late\s+is\s+it\b|\bwhat\s+hour\s+is\s+it\b|"
    r"\bwhat\s+(?:year|month|date)\s+is\s+it\b|\bwhat(?:'s|\s+is)\s+today\b(?!')",
    re.IGNORECASE,
)


def time_call(messages: Sequence[Message], tools: Collection[str]) -> ToolCall | None:
    """A call of ``current_time`` for a turn whose words ask the time, when it is offered; else
    None. Qwen2.5-Coder-1.5B does not always call it: asked again later in a conversation, or
    with a word before the question ("So, what time is it?"), it made a time up (measured:
    "14:30 and Wednesday" on a Sunday evening) or repeated its earlier answer. Asked here, the
    call needs none of the model's tokens either (it writes one in ~20)."""
    if "current_time" not in tools:
        return None
    last = next((m for m in reversed(messages) if m.role != "system"), None)
    if last is None or last.role != "user" or not _ASKS_THE_TIME.search(last.content):
        return None
    return ToolCall(_call_id(), "current_time", "{}")


def time_answer(messages: Sequence[Message]) -> str | None:
    """The answer to a turn that asked the time (``time_call``'s words), worded from the
    ``current_time`` result that ends ``messages``: "It is nine oh five in the morning, UTC.",
    "Today is Monday 2 March 2026.", "It is 2026."; None where the model should word it: the
    session has instructions of its own (a language, a persona), the question names a place
    ("what time is it in Tokyo?"), or the result is not in our tool's shape (a client's own
    tool).

    The model read the call and its result (~70 tokens) before its first word, which made a
    time turn the slowest of all (its first token ~0.95 s after the turn on an AMD EPYC, ~2 s
    on an Intel Xeon), and then read the result out whole ("The current time is 06:09, it is
    a Monday 7 December 2026, and the timezone is UTC.")."""
    if len(messages) < 3 or messages[-1].role != "tool":  # (every answer asks: this first)
        return None
    if any(m.role == "system" and m.content.strip() for m in messages):
        return None
    result, call, asked = messages[-1], messages[-2], messages[-3]
    calls = {c.call_id: c.name for c in call.tool_calls}
    if calls.get(result.tool_call_id) != "current_time" or len(calls) != 1:
        return None
    if asked.role != "user" or not _ASKS_THE_TIME.search(asked.content):
        return None
    if re.search(r"\b(?:in|at|for)\s+\w", asked.content):  # "... in Tokyo?": the model's
        return None
    try:
        value = decode(result.content)
    except JsonInputError:
        return None
    clock = clock_of(value)
    date = value.get("date") if isinstance(value, dict) else None
    words = date.split() if isinstance(date, str) else []
    if clock is None or len(words) != 4 or not re.fullmatch(r"\d{4}", words[3]):
        return None
    question = asked.content.lower()
    zone = value.get("timezone")
    zone_said = f", {zone}" if isinstance(zone, str) and zone.isalpha() and len(zone) < 8 else ""
    time_said = f"It is {spoken_time(*clock)}{zone_said}"
    if re.search(r"\byear\b", question):
        return f"It is {words[3]}."
    if re.search(r"\bmonth\b", question):
        return f"It is {words[2]} {words[3]}."
    if re.search(r"\b(?:date|day|today)\b", question):
        return f"{time_said}, {date}." if re.search(r"\btime\b", question) else f"Today is {date}."
    return f"{time_said}."


def parse_tool_calls(text: str, tool_names: Sequence[str]) -> list[ToolCall] | None:
    """The calls of the offered tools written in ``text``; None when ``text`` holds no call.

    Accepts ``<tool_call>`` tags, Markdown fences, bare JSON, a list of calls, doubled braces,
    ``arguments`` (or ``parameters``) as an object or as JSON text."""
    found = [call for value in _json_values(text) for call in _calls_in(value)]
    if not found:
        return None
    return [call for call in found if call.name in tool_names]


def _json_values(text: str) -> Iterator[Any]:
    bodies = _TAGGED.findall(text) or _FENCE.findall(text) or [text.strip()]
    for body in bodies:
        value = _lenient_json(body)
        if value is not None:
            yield value


def _lenient_json(body: str) -> Any:
    for candidate in (body, _undoubled(body)):
        try:
            return decode(candidate)
        except JsonInputError:
            continue
    return None


def _undoubled(body: str) -> str:
    """``{{"a": {{}}}}`` -> ``{"a": {}}``: a template's escaping written out by the model."""
    return body.replace("{{", "{").replace("}}", "}")


def _calls_in(value: Any) -> Iterator[ToolCall]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("function"), dict):  # the OpenAI shape
            item = item["function"]
        name = item.get("name")
        if not isinstance(name, str) or not name:
            continue
        yield ToolCall(_call_id(), name, _arguments(item))


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"


def _arguments(item: dict[str, Any]) -> str:
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = decode(arguments or "{}")
        except JsonInputError:
            return "{}"
    return json.dumps(arguments if isinstance(arguments, dict) else {})
