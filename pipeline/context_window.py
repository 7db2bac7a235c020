"""How much of the conversation the language model is sent: OpenAI's Realtime ``truncation``.

Pure. When the conversation (everything after the instructions) holds more than
``budget_tokens``, its oldest messages are left out until it holds at most
``retention_ratio`` of the budget, so the next turns fit without another cut; the newest
message is always sent. A cut never starts the context inside a tool round: a tool result
whose call was left out is left out too. The conversation itself keeps every message (the
client's items, the stored history); only what one model request is sent is cut.

Tokens are estimated, not counted with the model's tokenizer: ``CHARS_PER_TOKEN`` characters
of a message's text, tool calls and arguments per token, and ``MESSAGE_OVERHEAD_TOKENS`` for
each message's framing (OpenAI's rule of thumb for English text is four characters a token).

Each request is cut afresh from the whole conversation: one that is over the budget is cut to
the retained share every time (OpenAI keeps the point it cut at, so its context grows back to
the budget before the next cut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.providers import Message

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4


@dataclass(frozen=True)
class ContextWindow:
    budget_tokens: int | None = None  # None: never cut (OpenAI's truncation "disabled")
    retention_ratio: float = 1.0  # the share of the budget kept once over it

    def __post_init__(self) -> None:
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise ValueError(f"context budget_tokens must be >= 1, got {self.budget_tokens}")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"retention_ratio must be within 0..1, got {self.retention_ratio}")

    def view(self, history: Sequence[Message]) -> list[Message]:
        """The messages a model request is sent, oldest first."""
        kept = list(history)
        if self.budget_tokens is None or _tokens(kept) <= self.budget_tokens:
            return kept
        target = self.retention_ratio * self.budget_tokens
        total = _tokens(kept)
        while len(kept) > 1 and (total > target or kept[0].role == "tool"):
            total -= estimated_tokens(kept.pop(0))
        return kept


def estimated_tokens(message: Message) -> int:
    chars = len(message.content)
    chars += sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    return MESSAGE_OVERHEAD_TOKENS + -(-chars // CHARS_PER_TOKEN)


def _tokens(messages: Sequence[Message]) -> int:
    return sum(estimated_tokens(message) for message in messages)
