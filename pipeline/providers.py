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
class TokenLogprob:
    """How sure the speech-to-text was of one token of its transcript (natural log)."""

    token: str
    token_bytes: tuple[int, ...]  # the token's UTF-8 bytes
    logprob: float


@dataclass(frozen=True)
class SpeakerSegment:
    """A stretch of one speaker's words (diarized transcription); seconds from the audio's
    start."""

    id: str
    speaker: str  # "A", "B", ... in order of first speaking
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """The words so far (partial) or all of them (final); ``logprobs`` and ``segments`` so
    far, when the hints asked for them and the speech-to-text gives them (else empty)."""

    text: str
    final: bool
    logprobs: tuple[TokenLogprob, ...] = ()
    segments: tuple[SpeakerSegment, ...] = ()


@dataclass(frozen=True)
class TranscriptionHints:
    """What the client said about its speech: ``language`` (ISO-639-1, e.g. "en") and a
    ``prompt`` (words or style to expect); ``languages``, several it may be in (none named:
    any); whether it wants each token's ``logprobs`` and the speakers told apart
    (``diarize``). A speech-to-text that cannot use one ignores it (the session refuses what
    its speech-to-text cannot give: ``details``)."""

    language: str | None = None
    prompt: str | None = None
    languages: tuple[str, ...] = ()
    logprobs: bool = False
    diarize: bool = False


LOGPROBS = "logprobs"  # a speech-to-text's ``details``: it gives each token's logprob
DIARIZATION = "diarization"  # ... it tells speakers apart
# ... its partials are new guesses at the whole utterance, which may revise earlier words
# (not only growing, as OpenAI's streamed transcript does)
REVISED_PARTIALS = "revised_partials"


def transcription_details(stt: object) -> frozenset[str]:
    """What ``stt`` can give beyond words (``LOGPROBS``, ``DIARIZATION``) or how it gives
    them (``REVISED_PARTIALS``); none unless it says (its ``details``)."""
    details: frozenset[str] = getattr(stt, "details", frozenset())
    return frozenset(details)


NO_HINTS = TranscriptionHints()


@runtime_checkable
class SpeechToText(Protocol):
    name: str

    def transcribe(self, audio: AsyncIterator[AudioChunk]) -> AsyncIterator[Transcript]:
        """Partials as the audio arrives; exactly one final Transcript after the input ends.
        One that takes hints takes them as a second argument (``transcribe_with``)."""
        ...


def transcribe_with(
    stt: SpeechToText, audio: AsyncIterator[AudioChunk], hints: TranscriptionHints = NO_HINTS
) -> AsyncIterator[Transcript]:
    """``stt.transcribe``, with the hints as its second argument when there are any."""
    if hints == NO_HINTS:
        return stt.transcribe(audio)
    transcribe: Any = stt.transcribe
    transcripts: AsyncIterator[Transcript] = transcribe(audio, hints)
    return transcripts


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


IMAGE_DETAILS = ("auto", "low", "high")  # how closely the model looks (OpenAI's ``detail``)


@dataclass(frozen=True)
class ImagePart:
    """An image the user shows the model: a data URL (``data:image/png;base64,...``), already
    checked, and its ``detail`` (one of ``IMAGE_DETAILS``)."""

    data_url: str
    detail: str = "auto"


@dataclass(frozen=True)
class Message:
    """One message of the conversation; a user's may show images after its text (only a
    model that ``sees_images`` is sent one)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""  # for role == "tool": the call this is the result of
    images: tuple[ImagePart, ...] = ()


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


@dataclass(frozen=True)
class ForcedTool:
    """A tool choice: the model must call this tool."""

    name: str


# "auto": the model decides; "required": it must call one of the tools; ForcedTool: that one.
ToolChoice = Literal["auto", "required"] | ForcedTool


@runtime_checkable
class LanguageModel(Protocol):
    name: str

    def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        """Stream text deltas and complete tool calls; at most one Usage, last. A model that
        honours a tool choice takes it as a third argument (``generate_with``)."""
        ...


def generate_with(
    llm: LanguageModel,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec],
    tool_choice: ToolChoice = "auto",
) -> AsyncIterator[LanguageModelEvent]:
    """``llm.generate`` with a tool choice: "auto" (or no tools) is the two-argument call every
    model takes; any other choice is passed on as the third argument."""
    if tool_choice == "auto" or not tools:
        return llm.generate(messages, tools)
    generate: Any = llm.generate  # a model that honours choices takes it third
    stream: AsyncIterator[LanguageModelEvent] = generate(messages, tools, tool_choice)
    return stream


def warm_with(llm: LanguageModel, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> None:
    """Let ``llm`` read the start of the request it will get (the user's words so far) while
    the user still speaks: a model with a prompt cache has ``warm(messages, tools)`` (the local
    model), which returns at once and decides itself whether and when to read. Any other has
    nothing to gain and is not asked."""
    warm = getattr(llm, "warm", None)
    if warm is not None:
        warm(messages, tools)


def sees_images(llm: object) -> bool:
    """Whether ``llm`` takes a user message's images (its ``sees_images``: the OpenAI models;
    the offline ones take text alone)."""
    return bool(getattr(llm, "sees_images", False))


@dataclass(frozen=True)
class ModelOptions:
    """What a response asks of the model beyond its messages, tools and tool choice: whether it
    may call several tools in one turn, and how hard to reason (None: the model's default)."""

    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None


DEFAULT_OPTIONS = ModelOptions()


def with_options(llm: LanguageModel, options: ModelOptions) -> LanguageModel:
    """``llm`` for a response with these ``options``.

    A provider that sends them has ``with_model_options(options)``: a view of itself that puts
    them in each request (the OpenAI models; the resilience wrapper hands them to its
    providers). Any other (the rule-based agent, the local model) answers as itself: it has no
    such settings, and the engine keeps to one call per turn itself (``pipeline.response``)."""
    bind = getattr(llm, "with_model_options", None)
    if bind is None or options == DEFAULT_OPTIONS:
        return llm
    bound: LanguageModel = bind(options)
    return bound


def answering_as(llm: LanguageModel, model: str) -> LanguageModel:
    """``llm`` for a session that names the model it wants (GPT-Live's delegation ``model``).

    A provider that serves models by name has ``as_model(model)``: a view of itself that sends
    that name with each request (the same client, breaker and budget; nothing global changes).
    Any other (the rule-based agent, the local model) is an alias for every name and answers
    as itself: a client written for OpenAI names OpenAI's models, and refusing them would turn
    away every such client of an offline deployment."""
    bind = getattr(llm, "as_model", None)
    if bind is None:
        return llm
    bound: LanguageModel = bind(model)
    return bound


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
        streaming audio as it is produced. One that changes its pace takes a speed (a multiple
        of its normal rate) as a third argument (``synthesize_with``)."""
        ...


def synthesize_with(
    tts: TextToSpeech, text: str, voice: str | None = None, speed: float = 1.0
) -> AsyncIterator[AudioChunk]:
    """``tts.synthesize``: with the speed as its third argument unless it is the normal 1.0."""
    if speed == 1.0:
        return tts.synthesize(text) if voice is None else tts.synthesize(text, voice)
    synthesize: Any = tts.synthesize
    audio: AsyncIterator[AudioChunk] = synthesize(text, voice, speed)
    return audio
