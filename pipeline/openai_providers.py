"""OpenAI (or any OpenAI-compatible server) behind the three provider Protocols.

I/O layer. Each provider is one small streaming method; it maps the ``openai`` package's
exceptions, and an answer not of the API's shape (``streamed_json``: a chunk or event that is
not a JSON object, a field of another type), to ``ProviderError`` and nothing more. Retries,
timeouts, circuit breaking and fallback belong to ``pipeline.resilience``: the client is
therefore used with ``max_retries=0``, so a failing call reaches the wrapper once instead of
being retried twice inside the SDK behind the retry budget's back. The providers' requests go
by the lean client (``openai_http``: the SDK's same requests and exceptions at a fraction of
its CPU) when their client is ``openai_client``'s with ``http="lean"``, else by the SDK's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any, Self

import httpx
import httpx2
import openai
from openai.types.chat import (
    ChatCompletionContentPartParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionToolChoiceOptionParam,
)
from openai.types.chat.chat_completion_message_function_tool_call_param import Function
from openai.types.shared_params import FunctionDefinition

from pipeline.asyncio_network import AsyncioHTTPTransport
from pipeline.event_stream import EventStreamReader
from pipeline.http1 import FormFile
from pipeline.openai_http import LeanRequests, lean_requests
from pipeline.provider_http import ProviderHTTP, ProviderResponse
from pipeline.providers import (
    DEFAULT_OPTIONS,
    DIARIZATION,
    LOGPROBS,
    NO_HINTS,
    AudioChunk,
    ForcedTool,
    LanguageModelEvent,
    Message,
    ModelOptions,
    ProviderError,
    SpeakerSegment,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Transcript,
    TranscriptionHints,
    Usage,
)
from pipeline.streamed_json import (
    StreamShapeError,
    count_field,
    json_object,
    list_field,
    number_field,
    object_field,
    text_field,
)
from pipeline.wav import wav_bytes

# The built-in voices of the speech endpoint (``openai.types.audio.speech_create_params``).
SPEECH_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
    "verse", "marin", "cedar",
)  # fmt: skip
SPEECH_SAMPLE_RATE_HZ = 24_000  # response_format="pcm": 24 kHz, 16-bit signed LE, mono
RETRYABLE_STATUS = frozenset({408, 409, 429})

TRANSPORT_ERRORS = (httpx2.TransportError, httpx.TransportError)
DIARIZE_MODEL = "gpt-4o-transcribe-diarize"  # OpenAI's one speech-to-text that tells speakers apart
# The speech-to-text models that take ``languages`` (several the audio may be in); another is
# told none of several, so it detects the language itself.
LANGUAGES_MODELS = frozenset({"gpt-transcribe", "gpt-live-transcribe"})
LOGPROBS_MODELS = frozenset(
    {"gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15"}
)  # the models OpenAI gives logprobs with (``include[]``)


class WholeBodyTransport(httpx2.AsyncBaseTransport):
    """Sends a request's body in one socket write. httpx writes a streamed body a piece at a
    time, and a multipart form is streamed: each field's boundary, headers and value apart,
    ~22 writes for a transcription request, each a system call that on loopback also runs
    the receiver's side (measured: 6.7 of the request's 9.2 CPU-ms on the event loop). The
    bodies here are small (an utterance's WAV, a chat request), so each is read whole first."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, lean: ProviderHTTP | None = None) -> None:
        self._inner = inner
        self.lean = lean  # the providers' lean path (``openai_http``), closed with this

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()  # the stream becomes one piece: the joined body
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        if self.lean is not None:
            await self.lean.aclose()
        await self._inner.aclose()


NETWORKS = ("asyncio", "anyio")  # httpcore's network backend: ours, or httpx's own (anyio)
PROVIDER_HTTP = ("lean", "sdk")  # the providers' requests: ``openai_http``, or the SDK's


def openai_client(api_key: str, network: str = "asyncio", http: str = "lean") -> openai.AsyncOpenAI:
    """The SDK's client (its base URL from ``OPENAI_BASE_URL``) with its default limits and
    timeouts, sending each body in one write (``WholeBodyTransport``), its connections on
    asyncio itself (``asyncio_network``; ``network="anyio"``: httpx's own transport).
    ``http="lean"``: the providers made with it send their requests with ``openai_http``
    (the same requests, without the SDK's and httpx's per-request work); ``"sdk"``: through
    the SDK, as any other request of the client."""
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
    if http not in PROVIDER_HTTP:
        raise ValueError(f"http must be one of {', '.join(PROVIDER_HTTP)}, not {http!r}")
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)  # the SDK's
    inner: httpx2.AsyncBaseTransport = (
        AsyncioHTTPTransport(limits)
        if network == "asyncio"
        else httpx2.AsyncHTTPTransport(limits=limits)
    )
    lean = ProviderHTTP() if http == "lean" else None
    http_client = openai.DefaultAsyncHttpxClient(transport=WholeBodyTransport(inner, lean))
    return openai.AsyncOpenAI(api_key=api_key, http_client=http_client)


def provider_error(provider: str, error: Exception) -> ProviderError:
    """Map an SDK or transport exception: 408/409/429/5xx, connection errors, timeouts retry."""
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        retryable = status in RETRYABLE_STATUS or status >= 500
        return ProviderError(provider, f"HTTP {status}: {error.message}", retryable=retryable)
    if isinstance(error, (openai.APIConnectionError, *TRANSPORT_ERRORS)):
        return ProviderError(provider, f"{type(error).__name__}: {error}", retryable=True)
    if isinstance(error, StreamShapeError):  # the server's answer is not the API's shape
        return ProviderError(provider, f"malformed answer: {error}", retryable=False)
    # An error event inside an otherwise healthy stream is the server's failure, not ours.
    retryable = type(error) is openai.APIError
    return ProviderError(provider, f"{type(error).__name__}: {error}", retryable=retryable)


def without_sdk_retries(client: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
    return client.with_options(max_retries=0)


StreamedResponse = httpx2.Response | ProviderResponse


async def post_streamed(
    client: openai.AsyncOpenAI,
    lean: LeanRequests | None,
    path: str,
    body: dict[str, Any],
    *,
    files: Sequence[FormFile] = (),
    headers: dict[str, str] | None = None,
    security: dict[str, bool] | None = None,
) -> StreamedResponse:
    """A POST's response once its head has come, its body still to read: by ``lean`` when
    the client has one (``openai_client(http="lean")``), else as the SDK's ``client.post``
    with ``stream=True`` (the same request; the same errors either way)."""
    if lean is not None:
        return await lean.post(path, body, files=files, headers=headers, security=security)
    options: Any = {"headers": headers or {}}  # the SDK's RequestOptions
    if security is not None:
        options["security"] = security
    sent = [(f.field, (f.filename, f.data, f.content_type)) for f in files] if files else None
    response: httpx2.Response = await client.post(
        path, body=body, files=sent, options=options, cast_to=httpx2.Response, stream=True
    )
    return response


# --- speech to text -------------------------------------------------------------------------


class OpenAISpeechToText:
    """One utterance in, one WAV upload; partials when the server streams transcript deltas.

    Asked for ``logprobs``, it asks the endpoint for them (``include[]=logprobs``: OpenAI
    gives them with the gpt-4o-transcribe models, in JSON, so only a ``model`` among
    ``LOGPROBS_MODELS`` says it gives them); asked to ``diarize``, it sends the
    utterance to ``diarize_model`` for ``diarized_json`` and passes on its speaker segments
    (that model takes no prompt and gives no logprobs: the session refuses those first)."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        model: str = "gpt-4o-mini-transcribe",
        diarize_model: str = DIARIZE_MODEL,
    ) -> None:
        self._client = without_sdk_retries(client)
        self._lean = lean_requests(self._client)
        self.model = model
        self.diarize_model = diarize_model
        self.name = f"openai-stt/{model}"
        # what OpenAI gives beyond words with these models (``providers.transcription_details``)
        self.details = frozenset({DIARIZATION, *([LOGPROBS] if model in LOGPROBS_MODELS else [])})

    async def transcribe(
        self, audio: AsyncIterator[AudioChunk], hints: TranscriptionHints = NO_HINTS
    ) -> AsyncGenerator[Transcript, None]:
        """``hints`` go to the endpoint as its ``language`` and ``prompt``."""
        pcm, sample_rate_hz = await self._collect(audio)
        if not pcm:
            yield Transcript("", final=True)
            return
        try:
            async for transcript in self._request(wav_bytes(pcm, sample_rate_hz), hints):
                yield transcript
        except (openai.OpenAIError, StreamShapeError, *TRANSPORT_ERRORS) as error:
            raise provider_error(self.name, error) from error

    async def _collect(self, audio: AsyncIterator[AudioChunk]) -> tuple[bytes, int]:
        parts: list[bytes] = []
        rates: set[int] = set()
        async for chunk in audio:
            parts.append(chunk.pcm)
            rates.add(chunk.sample_rate_hz)
        if len(rates) > 1:
            raise ProviderError(self.name, f"mixed sample rates {sorted(rates)}", retryable=False)
        return b"".join(parts), rates.pop() if rates else 16_000

    def _fields(self, hints: TranscriptionHints) -> dict[str, Any]:
        """The request's fields beyond the file and ``stream``."""
        fields: dict[str, Any] = {"model": self.model}
        if hints.language is not None:
            fields["language"] = hints.language
        elif hints.languages and self.model in LANGUAGES_MODELS:
            fields["languages"] = list(hints.languages)
        if hints.diarize:  # no prompt, no logprobs: that model refuses them
            fields.update(
                model=self.diarize_model, response_format="diarized_json", chunking_strategy="auto"
            )
            return fields
        if hints.prompt is not None:
            fields["prompt"] = hints.prompt
        if hints.logprobs:
            fields.update(include=["logprobs"], response_format="json")
        return fields

    async def _request(self, wav: bytes, hints: TranscriptionHints) -> AsyncIterator[Transcript]:
        # The request ``audio.transcriptions.create`` makes, with its events read as the JSON
        # objects they are (the SDK's model of each cost more than the rest of reading it).
        response = await post_streamed(
            self._client,
            self._lean,
            "/audio/transcriptions",
            {**self._fields(hints), "stream": True},
            files=[FormFile("file", "utterance.wav", "audio/wav", wav)],
            headers={"Content-Type": "multipart/form-data"},
        )
        try:
            async for transcript in self._read(response):
                yield transcript
        finally:
            await response.aclose()

    async def _read(self, response: StreamedResponse) -> AsyncIterator[Transcript]:
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:
            # The server ignored stream=True (whisper-1 does): one JSON or text body.
            body = await response.aread()
            yield Transcript(_transcript_text(body, content_type), final=True)
            return
        streamed, final = _StreamedTranscript(), False
        events = event_values(response, "transcription event")
        async for event in events:  # to its end: a connection left mid-body is not reused
            if not final and (transcript := streamed.add(event)) is not None:
                final = transcript.final
                yield transcript
        if not final:
            raise ProviderError(
                self.name, "stream ended without transcript.text.done", retryable=True
            )


class _StreamedTranscript:
    """A transcription stream's words, logprobs and speaker segments so far."""

    def __init__(self) -> None:
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.segments: list[SpeakerSegment] = []

    def add(self, value: object) -> Transcript | None:
        """The transcript after the event ``value`` (None: nothing new; StreamShapeError:
        not an event of the documented shape)."""
        where = "transcription event"
        event = json_object(value, where)
        kind = text_field(event, "type", where)
        if kind == "transcript.text.delta":
            self.text += text_field(event, "delta", where)
            self.logprobs.extend(_logprobs(event, where))
            return self._transcript(self.text, final=False)
        if kind == "transcript.text.segment":
            self.segments.append(_segment(event))
            return self._transcript(self.text, final=False)
        if kind == "transcript.text.done":
            if logprobs := _logprobs(event, where):  # the whole transcript's, sent again
                self.logprobs = logprobs
            return self._transcript(text_field(event, "text", where), final=True)
        return None

    def _transcript(self, text: str, final: bool) -> Transcript:
        return Transcript(text, final, tuple(self.logprobs), tuple(self.segments))


def _segment(event: dict[str, Any]) -> SpeakerSegment:
    """A ``transcript.text.segment`` event's speaker segment."""
    where = "transcript.text.segment"
    start_s, end_s = number_field(event, "start", where), number_field(event, "end", where)
    speaker = text_field(event, "speaker", where)
    text = text_field(event, "text", where)
    return SpeakerSegment(text_field(event, "id", where), speaker, start_s, end_s, text)


def _logprobs(event: dict[str, Any], where: str) -> list[TokenLogprob]:
    """The event's ``logprobs`` ([] when it has none)."""
    logprobs = []
    for number, value in enumerate(list_field(event, "logprobs", where)):
        at = f"{where}.logprobs[{number}]"
        item = json_object(value, at)
        token, logprob = text_field(item, "token", at), number_field(item, "logprob", at)
        logprobs.append(TokenLogprob(token, _bytes(item, at), logprob))
    return logprobs


def _bytes(item: dict[str, Any], where: str) -> tuple[int, ...]:
    """A logprob's token ``bytes``: each an integer 0-255."""
    values = list_field(item, "bytes", where)
    if not all(type(byte) is int and 0 <= byte <= 255 for byte in values):
        raise StreamShapeError(f"{where}.bytes holds something other than bytes (0-255)")
    return tuple(values)


def _transcript_text(body: bytes, content_type: str) -> str:
    """The transcript of a body that is not a stream: text, or a JSON object's ``text``."""
    try:
        text = body.decode("utf-8")
        if "json" not in content_type:
            return text.strip()
        value = json.loads(text)
    except ValueError as error:  # not UTF-8, not JSON
        raise StreamShapeError(f"transcription body is not {content_type}: {error}") from None
    return text_field(json_object(value, "transcription body"), "text", "transcription body")


async def event_values(response: StreamedResponse, what: str) -> AsyncIterator[object]:
    """The JSON value of each server-sent event of a streamed answer, read as the SDK's
    ``AsyncStream`` reads them (same values, same errors) at less cost: its SSE decoder and
    per-event bookkeeping were ~15 % of a chat request's CPU (``event_stream``). An event
    ``[DONE]`` ends them (the body is still read to its end, so the connection is reused);
    an object with an ``error`` is the server's ``openai.APIError``; text that is not JSON (or
    not UTF-8) a StreamShapeError."""
    reader, done = EventStreamReader(), False
    async for piece in response.aiter_bytes():
        for data in () if done else reader.feed(piece):
            if data.startswith(b"[DONE]"):
                done = True
                break
            yield _event_value(data, what, response)


def _event_value(data: bytes, what: str, response: StreamedResponse) -> object:
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError, a huge integer
        raise StreamShapeError(f"{what} is not JSON: {error}") from None
    if isinstance(value, dict) and value.get("error"):
        said = value["error"]
        message = said.get("message") if isinstance(said, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"  # the SDK's words
        raise openai.APIError(message, response.request, body=said)
    return value


async def decoded(stream: AsyncIterator[object], what: str) -> AsyncIterator[object]:
    """The SDK's stream of JSON values, its text that is not JSON (or not UTF-8) a
    StreamShapeError rather than the decoder's ValueError."""
    values = aiter(stream)
    while True:
        try:
            value = await anext(values)
        except StopAsyncIteration:
            return
        except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError, a huge integer
            raise StreamShapeError(f"{what} is not JSON: {error}") from None
        yield value


# --- language model -------------------------------------------------------------------------


class OpenAIModelClient:
    """What the OpenAI language models share: a client without the SDK's own retries, the model
    they name in each request, and views of them naming another one or asking with a response's
    options.

    The options in a request: ``parallel_tool_calls: false`` when the response asks for one
    call per turn and tools are offered (OpenAI refuses it without tools; OpenAI's model then
    makes one call); the reasoning effort only when the model takes one (a model without it
    refuses the field), else it is not sent. Whether it does: ``reasoning`` when the deployment
    says (True or False), else (None) its name's family (``takes_reasoning``), the name of the
    model each request names (a view ``as_model`` asks by its own)."""

    KIND = "openai-llm"  # the provider's name is KIND/model
    sees_images = True  # a user message's images are sent as image parts

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        model: str = "gpt-4o-mini",
        *,
        reasoning: bool | None = None,
    ) -> None:
        self._client = without_sdk_retries(client)
        self._lean = lean_requests(self._client)
        self.model = model
        self.name = f"{self.KIND}/{model}"
        self.reasoning_said = reasoning
        self.options = DEFAULT_OPTIONS

    @property
    def reasoning(self) -> bool:
        """Whether the model takes a reasoning effort."""
        if self.reasoning_said is not None:
            return self.reasoning_said
        return takes_reasoning(self.model)

    def with_model_options(self, options: ModelOptions) -> Self:
        """This provider asking with ``options`` (``providers.with_options``)."""
        view = copy.copy(self)
        view.options = options
        return view

    def option_fields(self, tools: Sequence[ToolSpec]) -> dict[str, Any]:
        """The request's fields for its options (none when they are the defaults)."""
        fields: dict[str, Any] = {}
        if tools and not self.options.parallel_tool_calls:
            fields["parallel_tool_calls"] = False
        effort = self.options.reasoning_effort
        if self.reasoning and effort is not None:
            fields.update(self.effort_field(effort))
        return fields

    def effort_field(self, effort: str) -> dict[str, Any]:
        """A reasoning effort as the API takes it (chat completions: ``reasoning_effort``)."""
        return {"reasoning_effort": effort}

    def as_model(self, model: str) -> Self:
        """This provider sending ``model`` instead of its own (``providers.answering_as``)."""
        view = copy.copy(self)
        view.model, view.name = model, f"{self.KIND}/{model}"
        return view


# OpenAI's model families that take a reasoning effort; a model's name is one of them, or
# one of them and a variant after "-" or "." (o4-mini, gpt-5.1, o3-2025-04-16).
REASONING_FAMILIES = ("o1", "o3", "o4", "gpt-5")
# variants of those that take none: o1's first previews, the chat-tuned gpt-5 models
UNREASONING_VARIANTS = ("o1-mini", "o1-preview", "-chat")


def takes_reasoning(model: str) -> bool:
    """Whether OpenAI's model of this name takes a reasoning effort, by its family's name (a
    compatible server's own model names say nothing: the deployment says, or none is sent)."""
    name = model.rsplit("/", 1)[-1].lower()
    if any(variant in name for variant in UNREASONING_VARIANTS):
        return False
    return any(name == f or name.startswith((f + "-", f + ".")) for f in REASONING_FAMILIES)


class OpenAILanguageModel(OpenAIModelClient):
    """Chat completions, streamed: text deltas as they come, tool calls once complete, usage.
    ``pipeline.openai_responses`` is the same over the Responses API."""

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], choice: ToolChoice = "auto"
    ) -> AsyncGenerator[LanguageModelEvent, None]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [message_param(message) for message in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = [tool_param(tool) for tool in tools]
            if choice != "auto":
                body["tool_choice"] = tool_choice_param(choice)
        body.update(self.option_fields(tools))
        try:
            # The SDK's ``chat.completions.create`` first walks the whole body through its
            # TypedDict transformer: ~0.2 ms of CPU per message on this machine, 130 ms on the
            # event loop at turn 300. The body is already in wire shape, so it is posted as is
            # (same client, auth, base URL and stream parsing).
            # read here (``event_values``), not by the SDK
            response = await post_streamed(self._client, self._lean, "/chat/completions", body)
            try:
                async for event in chat_events(event_values(response, "chat chunk")):
                    yield event
            finally:
                await response.aclose()
        except (openai.OpenAIError, StreamShapeError, *TRANSPORT_ERRORS) as error:
            raise provider_error(self.name, error) from error


async def chat_events(chunks: AsyncIterator[object]) -> AsyncIterator[LanguageModelEvent]:
    """The streamed chunks (``chat.completion.chunk`` JSON objects) as our events;
    StreamShapeError at the first value that is not such a chunk."""
    calls = ToolCallAssembler()
    usage: Usage | None = None
    async for value in chunks:
        chunk = json_object(value, "chat chunk")
        for event in _chunk_events(chunk, calls):
            yield event
        if chunk.get("usage") is not None:
            usage = _usage(object_field(chunk, "usage", "chat chunk"))
    for call in calls.flush():
        yield call
    if usage is not None:
        yield usage


def _usage(used: dict[str, Any]) -> Usage:
    where = "chat chunk.usage"
    return Usage(
        count_field(used, "prompt_tokens", where), count_field(used, "completion_tokens", where)
    )


def _chunk_events(
    chunk: dict[str, Any], calls: ToolCallAssembler
) -> Iterator[ToolCall | TextDelta]:
    for value in list_field(chunk, "choices", "chat chunk")[:1]:
        choice = json_object(value, "chat chunk.choices[0]")
        delta = object_field(choice, "delta", "chat chunk.choices[0]")
        where = "chat chunk.choices[0].delta"
        if content := text_field(delta, "content", where):
            yield TextDelta(content)
        for number, part in enumerate(list_field(delta, "tool_calls", where)):
            _add_tool_call(json_object(part, f"{where}.tool_calls[{number}]"), calls)
        if choice.get("finish_reason") is not None:
            yield from calls.flush()


def _add_tool_call(part: dict[str, Any], calls: ToolCallAssembler) -> None:
    """A streamed tool call's fragment, added to the calls being assembled."""
    where = "chat chunk's tool call"
    function = object_field(part, "function", where)
    name = text_field(function, "name", f"{where}.function")
    arguments = text_field(function, "arguments", f"{where}.function")
    calls.add(count_field(part, "index", where), text_field(part, "id", where), name, arguments)


class ToolCallAssembler:
    """Joins streamed tool-call fragments (keyed by index) into complete ``ToolCall`` values."""

    def __init__(self) -> None:
        self._parts: dict[int, list[str]] = {}  # index -> [call_id, name, arguments]

    def add(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> None:
        part = self._parts.setdefault(index, ["", "", ""])
        part[0] = call_id or part[0]
        part[1] = name or part[1]
        part[2] += arguments or ""

    def flush(self) -> list[ToolCall]:
        calls = [ToolCall(*self._parts[index]) for index in sorted(self._parts)]
        self._parts.clear()
        return calls


def message_param(message: Message) -> ChatCompletionMessageParam:
    """A ``Message`` in the chat completions wire shape."""
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == "assistant":
        if not message.tool_calls:
            return {"role": "assistant", "content": message.content}
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [_tool_call_param(call) for call in message.tool_calls],
        }
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.images:
        return {"role": "user", "content": _user_parts(message)}
    return {"role": "user", "content": message.content}


def _user_parts(message: Message) -> list[ChatCompletionContentPartParam]:
    """A user message's text, then its images, as chat ``content`` parts."""
    parts: list[ChatCompletionContentPartParam] = []
    if message.content:
        parts.append({"type": "text", "text": message.content})
    for image in message.images:
        detail: Any = image.detail
        parts.append({"type": "image_url", "image_url": {"url": image.data_url, "detail": detail}})
    return parts


def _tool_call_param(call: ToolCall) -> ChatCompletionMessageFunctionToolCallParam:
    function: Function = {"name": call.name, "arguments": call.arguments}
    return {"id": call.call_id, "type": "function", "function": function}


def tool_choice_param(choice: ToolChoice) -> ChatCompletionToolChoiceOptionParam:
    """A tool choice in the chat completions wire shape."""
    if isinstance(choice, ForcedTool):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def tool_param(tool: ToolSpec) -> ChatCompletionFunctionToolParam:
    """A ``ToolSpec`` as a function tool definition."""
    function: FunctionDefinition = {
        "name": tool.name,
        "description": tool.description,
        "parameters": dict(tool.parameters),
    }
    return {"type": "function", "function": function}


# --- text to speech -------------------------------------------------------------------------


class OpenAITextToSpeech:
    """Speech as raw 24 kHz PCM, streamed: each chunk is yielded as its bytes arrive."""

    def __init__(
        self, client: openai.AsyncOpenAI, model: str = "gpt-4o-mini-tts", voice: str = "alloy"
    ) -> None:
        self._client = without_sdk_retries(client)
        self._lean = lean_requests(self._client)
        self.model = model
        self.voice = voice
        self.voices = (voice, *(name for name in SPEECH_VOICES if name != voice))
        self.name = f"openai-tts/{model}"

    async def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> AsyncGenerator[AudioChunk, None]:
        """``speed`` is the endpoint's (0.25 to 4.0; sent only when it is not 1.0)."""
        if voice not in (None, *self.voices):
            raise ProviderError(self.name, f"no voice {voice!r}", retryable=False)
        body: dict[str, Any] = {
            "model": self.model,
            "input": text,
            "voice": voice or self.voice,
            "response_format": "pcm",
        }
        if speed != 1.0:
            body["speed"] = speed
        try:
            # The request ``audio.speech.with_streaming_response.create`` makes, posted as it
            # is: without the SDK's TypedDict transformer and streamed-response wrapper a
            # speech request costs 0.82-0.86 of its CPU. Each piece is handed on as it arrives.
            response = await post_streamed(
                self._client,
                self._lean,
                "/audio/speech",
                body,
                headers={"Accept": "application/octet-stream"},
                security={"bearer_auth": True},
            )
            try:
                async for pcm in even_length(response.aiter_bytes()):
                    yield AudioChunk(pcm, SPEECH_SAMPLE_RATE_HZ)
            finally:
                await response.aclose()
        except (openai.OpenAIError, *TRANSPORT_ERRORS) as error:
            raise provider_error(self.name, error) from error


async def even_length(data: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-cut a byte stream so no 16-bit sample is split; a dangling last byte is dropped."""
    carry = b""
    async for piece in data:
        joined = carry + piece
        cut = len(joined) - len(joined) % 2
        carry = joined[cut:]
        if cut:
            yield joined[:cut]
