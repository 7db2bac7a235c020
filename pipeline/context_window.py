"""How much of the conversation the language model is sent: OpenAI's Realtime ``truncation``.

Pure. When the conversation (everything after the instructions) holds more than
``budget_tokens``, its oldest messages are left out until it holds at most
``retention_ratio`` of the budget, so the next turns fit without another cut; the newest
message is always sent. A cut never starts the context inside a tool round: a tool result
whose call was left out is left out too (the newest one keeps its call). The conversation
itself keeps every message (the client's items, the stored history); only what one model
request is sent is cut.

Tokens are estimated, not counted with the model's tokenizer: ``CHARS_PER_TOKEN`` characters
of a message's text, tool calls and arguments per token, and ``MESSAGE_OVERHEAD_TOKENS`` for
each message's framing (OpenAI's rule of thumb for English text is four characters a token);
an image is ``IMAGE_TOKENS`` by its detail (OpenAI's: 85 at low detail, 85 and 170 a 512-pixel
tile at high: 765 for a 1024-pixel square, taken for high and auto alike).

The cut is where OpenAI's would be had a model request followed every message: the context
grows back to the budget before it is cut again, so its start stays put between cuts (and
the model's prompt cache with it). Reckoned from the whole conversation at each request, it
needs no state, and an edited conversation (an item deleted, inserted, truncated) is cut as
it now is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.providers import Message

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}


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
        if self.budget_tokens is None:
            return list(history)
        return list(history[self._start(history, self.budget_tokens) :])

    def _start(self, history: Sequence[Message], budget_tokens: int) -> int:
        """The first message kept: each message in turn is added, and once the kept ones are
        over the budget the oldest are left out until the retained share remains."""
        target = self.retention_ratio * budget_tokens
        start, total = 0, 0
        for end, message in enumerate(history):
            total += estimated_tokens(message)
            if total <= budget_tokens:
                continue
            while start < end and (total > target or history[start].role == "tool"):
                total -= estimated_tokens(history[start])
                start += 1
        while start > 0 and history[start].role == "tool":  # the newest: keep its call
            start -= 1
        return start


def estimated_tokens(message: Message) -> int:
    chars = len(message.content)
    chars += sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    images = sum(IMAGE_TOKENS[image.detail] for image in message.images)
    return MESSAGE_OVERHEAD_TOKENS + images + -(-chars // CHARS_PER_TOKEN)
