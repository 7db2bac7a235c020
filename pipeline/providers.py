"""The three provider roles of the voice pipeline, and the values that cross them.

Pure protocol layer: dataclasses and Protocols only, no I/O. Implementations are named for their
technology (``PocketsphinxSpeechToText``, ``OpenAILanguageModel``, ``PiperTextToSpeech``);
wrappers (timeout, retry, circuit breaker, fallback, metrics) implement the same Protocols.

Audio is 16-bit signed little-endian mono PCM. Every call is one unit of work (one utterance to
transcribe, one response to generate, one text chunk to speak) and yields as it goes; the
consumer cancels the work by closing or abandoning the iterator (``aclose()``), so a provider
must release what it holds in ``finally``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


class ProviderError(Exception):
    """A provider failed; ``retryable`` says whether trying again may help (429, 5xx, timeouts)."""

    def __init__(self, provider: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.retryable = retryable


@dataclass(frozen=True)
class AudioChunk:
    pcm: bytes
    sample_rate_hz: int

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate_hz


# --- speech to text -------------------------------------------------------------------------


@dataclass(frozen=True)
class Transcript:
    text: str
    final: bool


@runtime_checkable
class SpeechToText(Protocol):
    name: str

    def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncIterator[Transcript]:
        """Partials as the audio arrives; exactly one final Transcript after the input ends."""
        ...


# --- language model -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolResult:
    call: ToolCall
    output: str  # what the model reads: JSON text
    ok: bool


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""  # for role == "tool": the call this is the result of


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


LanguageModelEvent = TextDelta | ToolCall | Usage


@runtime_checkable
class LanguageModel(Protocol):
    name: str

    def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        """Stream text deltas and complete tool calls; at most one Usage, last."""
        ...


# --- text to speech -------------------------------------------------------------------------


@runtime_checkable
class TextToSpeech(Protocol):
    name: str

    @property
    def voices(self) -> tuple[str, ...]:
        """The voices it speaks in, its default first."""
        ...

    def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[AudioChunk]:
        """Speak one chunk of text in ``voice`` (one of ``voices``; None: the default),
        streaming audio as it is produced."""
        ...
