"""Which message of the model's history each conversation item is, and edits of that history
by item: what ``conversation.item.create`` (at ``previous_item_id``), ``.delete`` and
``.truncate`` change is what the model sees next.

Pure protocol layer. The engine's history (``list[Message]``) is edited in place; an item is
tied to its message by identity. Items the client creates are tied when they are made; items
the engine made (a transcribed user turn, an answer, a model's function call) are tied on the
next edit (``sync``) to the first untied message that says the same thing, so two equal
answers are told apart by their order. A function call is a call within an assistant message
that may carry several; a server tool's call and result have no item and stay where they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pipeline.providers import Message

Item = Mapping[str, Any]


def item_words(item: Item) -> str:
    """A message item's words: its parts' text or transcript, joined."""
    parts = item.get("content") or ()
    return " ".join(str(p.get("text") or p.get("transcript") or "") for p in parts)


def matches(item: Item, message: Message) -> bool:
    kind = item.get("type")
    if kind == "function_call":
        calls = message.tool_calls if message.role == "assistant" else ()
        return any(call.call_id == item.get("call_id") for call in calls)
    if kind == "function_call_output":
        return message.role == "tool" and message.tool_call_id == item.get("call_id")
    if kind != "message" or message.role != item.get("role") or message.tool_calls:
        return False
    return message.content.split() == item_words(item).split()


class ItemMessages:
    def __init__(self, history: list[Message]) -> None:
        self.history = history  # the engine's: what the model is sent
        self._tied: dict[str, Message] = {}  # item id -> its message (by identity)

    def tie(self, item_id: str, message: Message) -> None:
        self._tied[item_id] = message

    def untie(self, item_id: str) -> None:
        self._tied.pop(item_id, None)

    def sync(self, items: Sequence[Item]) -> None:
        """Tie each untied item (in conversation order) to the first untied message it
        matches; several function calls may share one message."""
        known = {item["id"] for item in items}
        present = {id(m) for m in self.history}
        for item_id, message in list(self._tied.items()):
            if item_id not in known or id(message) not in present:  # forgotten, or its message
                del self._tied[item_id]  # replaced by the engine (an answer cut by a barge-in)
        taken = {id(m) for m in self._tied.values()}
        for item in items:
            if item["id"] in self._tied:
                continue
            shared = item.get("type") == "function_call"
            for message in self.history:
                if (shared or id(message) not in taken) and matches(item, message):
                    self._tied[item["id"]] = message
                    taken.add(id(message))
                    break

    def index(self, item_id: str) -> int | None:
        """Where the item's message is in the history (None: it has none there)."""
        message = self._tied.get(item_id)
        if message is None:
            return None
        return next((i for i, m in enumerate(self.history) if m is message), None)

    def insert(
        self, order: Sequence[str], previous: str | None, item_id: str, message: Message
    ) -> None:
        """``message`` right after the message of ``previous`` (or of the nearest item before it
        that has one); ``previous`` None: at the start."""
        at = 0
        if previous is not None:
            earlier = order[: order.index(previous) + 1]
            found = (self.index(i) for i in reversed(earlier))
            at = next((i + 1 for i in found if i is not None), 0)
        self.history.insert(at, message)
        self._tied[item_id] = message

    def delete(self, item: Item) -> None:
        """The item's message leaves the history (a function call: its call leaves its
        message, which goes when nothing is left in it)."""
        index = self.index(item["id"])
        message = self._tied.pop(item["id"], None)
        if index is None or message is None:
            return
        if item.get("type") != "function_call":
            del self.history[index]
            return
        calls = tuple(c for c in message.tool_calls if c.call_id != item.get("call_id"))
        if calls or message.content:
            self.replace_message(message, replace(message, tool_calls=calls))
        else:
            del self.history[index]

    def replace(self, item_id: str, content: str) -> None:
        """The item's message now says ``content`` (a truncated answer)."""
        message = self._tied.get(item_id)
        if message is not None:
            self.replace_message(message, replace(message, content=content))

    def replace_message(self, old: Message, new: Message) -> None:
        for i, message in enumerate(self.history):
            if message is old:
                self.history[i] = new
        for item_id, message in list(self._tied.items()):
            if message is old:
                self._tied[item_id] = new
