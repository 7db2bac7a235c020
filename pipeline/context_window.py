"""How much of the conversation the language model is sent: OpenAI's Realtime ``truncation``.

Pure. When the conversation (everything after the instructions) holds more than
``budget_tokens``, its oldest messages are left out until it holds at most
``retention_ratio`` of the budget, so the next turns fit without another cut; the newest
message is always sent. A cut never starts the context inside a tool round: a tool result
whose call was left out is left out too (the newest one keeps its call). The conversation
itself keeps every message (the client's items, the stored history); only what one model
request is sent is cut.

Tokens are counted with the model's encoding (``encoding_for_model``: ``o200k_base`` for
OpenAI's gpt-4o, gpt-4.1, gpt-5, o-series and realtime models, ``cl100k_base`` for gpt-4 and
gpt-3.5) by ``quicktok``, whose wheels carry both encodings, so nothing is fetched at run time.
A message is its role, text, tool calls' names and arguments, and OpenAI's framing of
``MESSAGE_OVERHEAD_TOKENS`` a message (the OpenAI cookbook's count for chat models); an image
is ``IMAGE_TOKENS`` by its detail (OpenAI's: 85 at low detail, 85 and 170 a 512-pixel tile at
high: 765 for a 1024-pixel square, taken for high and auto alike). Text is read as text: a
special token's name (``<|endoftext|>``) in it is counted as the characters it is.

The encoding is loaded (1-2 s of CPU, holding the interpreter) only when a conversation may be
over its budget: a token is at least one byte, so a conversation whose UTF-8 bytes fit is sent
whole without counting. Where the encoding cannot be loaded, tokens are estimated at
``CHARS_PER_TOKEN`` characters a token (OpenAI's rule of thumb for English), logged once.

The cut is where OpenAI's would be had a model request followed every message: the context
grows back to the budget before it is cut again, so its start stays put between cuts (and
the model's prompt cache with it). Reckoned from the whole conversation at each request, it
needs no state, and an edited conversation (an item deleted, inserted, truncated) is cut as
it now is.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.providers import Message

log = logging.getLogger(__name__)

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"
ENCODINGS = (O200K_BASE, CL100K_BASE)
# gpt-4 (not gpt-4o, gpt-4.1, gpt-4.5) and gpt-3.5, fine-tuned or not, Azure's spelling too
CL100K_MODELS = re.compile(r"^(ft:)?(gpt-4(?![o.])|gpt-3\.5|gpt-35)")
O200K_MODELS = re.compile(r"^(ft:)?(gpt-4o|gpt-4\.[15]|gpt-5|gpt-realtime|gpt-audio|gpt-oss|"
                          r"chatgpt-4o|o[134]\b|o[134]-)")  # fmt: skip
MESSAGE_OVERHEAD_TOKENS = 3  # <|start|>{role}<|message|>{content}<|end|>: all but the role
CHARS_PER_TOKEN = 4  # the estimate, where no encoding loads
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
COUNTED_MESSAGES = 1024  # counts kept, by a message's texts: a request counts its new ones


class TokenCounter(Hashable, Protocol):
    def count(self, text: str) -> int: ...


@dataclass(frozen=True)
class ContextWindow:
    budget_tokens: int | None = None  # None: never cut (OpenAI's truncation "disabled")
    retention_ratio: float = 1.0  # the share of the budget kept once over it
    encoding: str = O200K_BASE  # the model's (encoding_for_model)

    def __post_init__(self) -> None:
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise ValueError(f"context budget_tokens must be >= 1, got {self.budget_tokens}")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise ValueError(f"retention_ratio must be within 0..1, got {self.retention_ratio}")
        if self.encoding not in ENCODINGS:
            raise ValueError(
                f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}"
            )

    def view(self, history: Sequence[Message]) -> list[Message]:
        """The messages a model request is sent, oldest first."""
        budget = self.budget_tokens
        if budget is None or sum(map(most_tokens, history)) <= budget:
            return list(history)
        return list(history[self._start(history, budget) :])

    def tokens(self, message: Message) -> int:
        return message_tokens(message, self.encoding)

    def _start(self, history: Sequence[Message], budget_tokens: int) -> int:
        """The first message kept: each message in turn is added, and once the kept ones are
        over the budget the oldest are left out until the retained share remains."""
        target = self.retention_ratio * budget_tokens
        start, total = 0, 0
        for end, message in enumerate(history):
            total += self.tokens(message)
            if total <= budget_tokens:
                continue
            while start < end and (total > target or history[start].role == "tool"):
                total -= self.tokens(history[start])
                start += 1
        while start > 0 and history[start].role == "tool":  # the newest: keep its call
            start -= 1
        return start


def encoding_for_model(model: str) -> str:
    """The encoding of an OpenAI model by its name; another model's is counted as OpenAI's
    current models' (``o200k_base``), logged once for each name."""
    if CL100K_MODELS.match(model):
        return CL100K_BASE
    if not O200K_MODELS.match(model):
        _log_unknown_model(model)
    return O200K_BASE


@functools.cache
def _log_unknown_model(model: str) -> None:
    log.info(
        "model %r has no known OpenAI encoding: its tokens are counted in %s", model, O200K_BASE
    )


def message_tokens(message: Message, encoding: str) -> int:
    """The message's tokens in the encoding (estimated where it cannot load)."""
    counter = token_counter(encoding)
    if counter is None:
        return estimated_tokens(message)
    counted = _text_tokens(counter, _texts(message))
    return MESSAGE_OVERHEAD_TOKENS + counted + _image_tokens(message)


def most_tokens(message: Message) -> int:
    """At least ``message_tokens`` in any byte-level encoding (a token is one byte or more),
    and at least the estimate (a role is four bytes or more)."""
    text_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in _texts(message))
    return MESSAGE_OVERHEAD_TOKENS + text_bytes + _image_tokens(message)


def estimated_tokens(message: Message) -> int:
    """Four characters a token, and four for the message's framing."""
    chars = len(message.content)
    chars += sum(len(call.name) + len(call.arguments) for call in message.tool_calls)
    return 4 + _image_tokens(message) + -(-chars // CHARS_PER_TOKEN)


def _texts(message: Message) -> tuple[str, ...]:
    calls = (text for call in message.tool_calls for text in (call.name, call.arguments))
    return (message.role, message.content, *calls)


@functools.lru_cache(maxsize=COUNTED_MESSAGES)
def _text_tokens(counter: TokenCounter, texts: tuple[str, ...]) -> int:
    return sum(_count(counter, text) for text in texts if text)


def _count(counter: TokenCounter, text: str) -> int:
    try:
        return counter.count(text)
    except TypeError:  # a lone surrogate (JSON's "\ud800" makes one), refused: read as U+FFFD
        return counter.count(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))


def _image_tokens(message: Message) -> int:
    return sum(IMAGE_TOKENS[image.detail] for image in message.images)


@functools.cache
def token_counter(encoding: str) -> TokenCounter | None:
    """The encoding, loaded once a process; None (logged, once) where it cannot be."""
    try:
        import quicktok

        counter: TokenCounter = quicktok.get_encoding(encoding)
    except (ImportError, RuntimeError, OSError) as error:
        log.warning(
            "the %s encoding did not load (%s): tokens are estimated at %d characters a token",
            encoding, error, CHARS_PER_TOKEN,
        )  # fmt: skip
        return None
    return counter
