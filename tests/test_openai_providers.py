"""The OpenAI providers against a real OpenAI-compatible HTTP server on loopback."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest

from deploy.fake_openai import FakeOpenAIServer, speech_pcm
from pipeline.asyncio_network import AsyncioHTTPTransport
from pipeline.openai_providers import (
    SPEECH_SAMPLE_RATE_HZ,
    OpenAILanguageModel,
    OpenAISpeechToText,
    OpenAITextToSpeech,
    WholeBodyTransport,
    even_length,
    message_param,
    openai_client,
    tool_param,
)
from pipeline.providers import (
    AudioChunk,
    LanguageModel,
    Message,
    ProviderError,
    SpeechToText,
    TextDelta,
    TextToSpeech,
    ToolCall,
    ToolSpec,
    Usage,
)
from pipeline.wav import wav_bytes

LOOKUP = ToolSpec(
    "lookup",
    "Look a word up in the knowledge file.",
    {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
)


async def utterance(duration_ms: int, rate_hz: int = 16_000) -> AsyncIterator[AudioChunk]:
    frame = b"\x01\x00" * (rate_hz // 50)  # 20 ms
    for _ in range(duration_ms // 20):
        yield AudioChunk(frame, rate_hz)


def test_the_providers_implement_the_protocols(client: openai.AsyncOpenAI) -> None:
    assert isinstance(OpenAISpeechToText(client), SpeechToText)
    assert isinstance(OpenAILanguageModel(client), LanguageModel)
    assert isinstance(OpenAITextToSpeech(client), TextToSpeech)


# --- chat -----------------------------------------------------------------------------------


async def test_chat_text_deltas_arrive_while_the_server_is_still_sending(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["chat"])
    events = OpenAILanguageModel(client).generate([Message("user", "hello there")], [])
    first = await anext(events)
    # The server holds the rest of the stream until released: the first delta came early.
    assert (await server.stats())["finished"].get("chat", 0) == 0
    await server.release("chat")
    rest = [event async for event in events]
    deltas = [first, *rest[:-1]]
    assert all(isinstance(event, TextDelta) for event in deltas)
    assert len([d for d in deltas if isinstance(d, TextDelta) and d.text]) == 4
    assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "You said: hello there "
    assert rest[-1] == Usage(input_tokens=2, output_tokens=5)


async def test_chat_assembles_a_streamed_tool_call(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    question = "please lookup the opening hours"
    events = [
        e async for e in OpenAILanguageModel(client).generate([Message("user", question)], [LOOKUP])
    ]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert calls == [ToolCall("call_fake_1", "lookup", json.dumps({"query": question}))]
    assert isinstance(events[-1], Usage)
    sent = (await server.stats())["last_request"]["chat"]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": LOOKUP.description,
                "parameters": dict(LOOKUP.parameters),
            },
        }
    ]
    assert sent["stream_options"] == {"include_usage": True}


async def test_chat_sends_assistant_tool_calls_and_tool_results(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    call = ToolCall("call_7", "lookup", '{"query": "hours"}')
    history = [
        Message("system", "Be brief."),
        Message("user", "please lookup the hours"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "nine to five", tool_call_id="call_7"),
    ]
    events = [e async for e in OpenAILanguageModel(client).generate(history, [LOOKUP])]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.strip() == "The lookup tool says nine to five."
    sent = (await server.stats())["last_request"]["chat"]["messages"]
    assert sent[2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_7",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"query": "hours"}'},
            }
        ],
    }
    assert sent[3] == {"role": "tool", "tool_call_id": "call_7", "content": "nine to five"}


async def test_chat_posts_the_body_the_sdks_own_create_would_send(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """The request skips the SDK's per-message transformer (its cost grows with the history):
    what reaches the server is byte for byte what ``chat.completions.create`` sends."""
    call = ToolCall("call_7", "lookup", '{"query": "hours"}')
    history = [Message("system", "Be brief.")]
    for turn in range(40):
        history += [Message("user", f"question {turn}"), Message("assistant", f"answer {turn}")]
    history += [
        Message("user", "please lookup the hours"),
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "nine to five", tool_call_id="call_7"),
    ]
    _ = [e async for e in OpenAILanguageModel(client, "gpt-test").generate(history, [LOOKUP])]
    ours = (await server.stats())["last_request"]["chat"]
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=[message_param(message) for message in history],
        tools=[tool_param(LOOKUP)],
        stream=True,
        stream_options={"include_usage": True},
    )
    async with stream:
        _ = [chunk async for chunk in stream]
    sdks = (await server.stats())["last_request"]["chat"]
    assert ours == sdks
    assert len(ours["messages"]) == len(history)


async def test_a_tool_result_without_its_call_is_rejected_by_the_server(
    client: openai.AsyncOpenAI,
) -> None:
    history = [Message("user", "hi"), Message("tool", "orphan", tool_call_id="call_x")]
    with pytest.raises(ProviderError) as caught:
        _ = [e async for e in OpenAILanguageModel(client).generate(history, [])]
    assert not caught.value.retryable
    assert "tool_call_id" in str(caught.value)


# --- speech ---------------------------------------------------------------------------------


async def test_speech_streams_pcm_before_the_server_finishes(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["speech"])
    text = "the quick brown fox jumps"
    chunks = OpenAITextToSpeech(client).synthesize(text)
    first = await anext(chunks)
    assert (await server.stats())["finished"].get("speech", 0) == 0
    await server.release("speech")
    received = [first, *[chunk async for chunk in chunks]]
    assert len(received) > 1
    assert all(c.sample_rate_hz == SPEECH_SAMPLE_RATE_HZ for c in received)
    assert all(len(c.pcm) % 2 == 0 and c.pcm for c in received)
    assert b"".join(c.pcm for c in received) == speech_pcm(text)
    sent = (await server.stats())["last_request"]["speech"]
    assert sent == {
        "model": "gpt-4o-mini-tts",
        "voice": "alloy",
        "input": text,
        "response_format": "pcm",
    }


async def test_speech_sends_a_voice_and_speed_asked_for(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """The body ``audio.speech.create`` would send: ``speed`` only when it is not 1.0."""
    chunks = OpenAITextToSpeech(client).synthesize("one two", voice="nova", speed=1.25)
    assert b"".join([c.pcm async for c in chunks]) == speech_pcm("one two")
    sent = (await server.stats())["last_request"]["speech"]
    assert (sent["voice"], sent["speed"]) == ("nova", 1.25)


class RecordingTransport(httpx2.AsyncBaseTransport):
    """The pipeline's own transport, each request's method, URL, headers and body noted on
    its way to the server."""

    def __init__(self) -> None:
        self._inner = WholeBodyTransport(AsyncioHTTPTransport(httpx2.Limits()))
        self.sent: list[tuple[str, str, dict[str, str], bytes]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        self.sent.append((request.method, str(request.url), dict(request.headers), body))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("speed", [1.0, 1.25])
async def test_speech_posts_the_request_the_sdks_own_create_would_send(
    server: FakeOpenAIServer, speed: float
) -> None:
    """The request skips the SDK's transformer and streamed-response wrapper: what reaches the
    server is, header for header and byte for byte, what
    ``audio.speech.with_streaming_response.create`` sends (but the SDK's marker of its own
    wrapper), and the PCM read back is the same."""
    await server.reset()
    transport = RecordingTransport()
    http_client = openai.DefaultAsyncHttpxClient(transport=transport)
    url = f"{server.base_url}/v1"
    async with openai.AsyncOpenAI(api_key="sk-test", base_url=url, http_client=http_client) as sdk:
        chunks = OpenAITextToSpeech(sdk).synthesize("one two three", "nova", speed)
        ours = b"".join([chunk.pcm async for chunk in chunks])
        async with sdk.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts",
            voice="nova",
            input="one two three",
            response_format="pcm",
            speed=openai.omit if speed == 1.0 else speed,
        ) as response:
            sdks = b"".join([piece async for piece in response.iter_bytes()])
    assert ours == sdks == speech_pcm("one two three")
    (method, address, headers, body), (sdk_method, sdk_address, sdk_headers, sdk_body) = (
        transport.sent
    )
    assert (method, address, body) == (sdk_method, sdk_address, sdk_body)
    assert sdk_headers.pop("x-stainless-raw-response") == "stream"
    assert headers == sdk_headers
    assert headers["accept"] == "application/octet-stream"


async def test_closing_the_speech_iterator_closes_the_http_stream(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["speech"])
    chunks = OpenAITextToSpeech(client).synthesize("one two three")
    await anext(chunks)
    await chunks.aclose()
    await server.wait_for("disconnected", "speech", 1)
    assert (await server.stats())["finished"].get("speech", 0) == 0


async def test_closing_the_chat_iterator_closes_the_http_stream(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(hold=["chat"])
    events = OpenAILanguageModel(client).generate([Message("user", "tell me more")], [])
    await anext(events)
    await events.aclose()
    await server.wait_for("disconnected", "chat", 1)


async def test_even_length_recuts_odd_pieces_on_sample_boundaries() -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"\x01", b"\x02\x03\x04", b"\x05", b"\x06\x07"):
            yield piece

    out = [chunk async for chunk in even_length(pieces())]
    assert out == [b"\x01\x02\x03\x04", b"\x05\x06"]


# --- transcription --------------------------------------------------------------------------


async def test_transcription_streams_partials_then_one_final(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    transcripts = [t async for t in OpenAISpeechToText(client).transcribe(utterance(500))]
    assert [t.final for t in transcripts] == [False] * 6 + [True]
    assert transcripts[0].text == "heard"
    assert transcripts[-1].text == "heard 500 milliseconds at 16000 hertz"
    assert (await server.stats())["last_request"]["transcriptions"] == {
        "model": "gpt-4o-mini-transcribe",
        "stream": "true",
    }


async def test_a_transcription_body_goes_to_the_wire_in_one_piece() -> None:
    """The SDK's multipart form reaches the transport in pieces (each a socket write); through
    ``WholeBodyTransport`` it is one piece, the same bytes. Under it, a transport that keeps
    the pieces as a connection would be handed them, and answers."""
    bodies: dict[str, list[bytes]] = {}

    class Pieces(httpx2.AsyncBaseTransport):
        def __init__(self, name: str) -> None:
            self.name = name

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            stream: Any = request.stream
            bodies[self.name] = [piece async for piece in stream]
            return httpx2.Response(200, json={"text": "heard"})

    for name, wrap in (("sdk", False), ("whole", True)):
        transport = WholeBodyTransport(Pieces(name)) if wrap else Pieces(name)
        http = openai.DefaultAsyncHttpxClient(transport=transport)
        sdk = openai.AsyncOpenAI(api_key="sk-test", base_url="http://x/v1", http_client=http)
        async with sdk:
            (heard,) = [t async for t in OpenAISpeechToText(sdk).transcribe(utterance(200))]
            assert heard.text == "heard" and heard.final
    assert len(bodies["sdk"]) > 5 and len(bodies["whole"]) == 1
    assert bodies["whole"][0].count(b"Content-Disposition") == 3  # model, stream and the file
    assert len(bodies["whole"][0]) == sum(len(piece) for piece in bodies["sdk"])


async def test_transcriptions_one_after_another_share_a_connection(
    server: FakeOpenAIServer,
) -> None:
    """Each transcription's stream is read to its end, so its connection goes back to the
    pool and the next request rides it (left mid-body, it was closed: a connect a turn)."""
    streams: list[object] = []

    class Noting(httpx2.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            response = await self.inner.handle_async_request(request)
            streams.append(response.extensions["network_stream"])
            return response

        async def aclose(self) -> None:
            await self.inner.aclose()

    http = openai.DefaultAsyncHttpxClient(transport=Noting())
    base_url = f"{server.base_url}/v1"
    async with openai.AsyncOpenAI(api_key="sk-test", base_url=base_url, http_client=http) as sdk:
        for _ in range(2):
            heard = [t async for t in OpenAISpeechToText(sdk).transcribe(utterance(300))]
            assert heard[-1].final and heard[-1].text.startswith("heard 300")
    assert len(streams) == 2 and streams[0] is streams[1]


async def test_the_pipelines_client_talks_to_the_server(server: FakeOpenAIServer) -> None:
    async with openai_client("sk-test").with_options(base_url=f"{server.base_url}/v1") as sdk:
        transcripts = [t async for t in OpenAISpeechToText(sdk).transcribe(utterance(500))]
        assert transcripts[-1].text == "heard 500 milliseconds at 16000 hertz"
        words = [e async for e in OpenAILanguageModel(sdk).generate([Message("user", "hi")], [])]
        assert words


async def test_transcription_from_a_server_that_does_not_stream(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(ignore_stream=True)
    stt = OpenAISpeechToText(client, model="whisper-1")
    transcripts = [t async for t in stt.transcribe(utterance(240, rate_hz=24_000))]
    assert [(t.text, t.final) for t in transcripts] == [
        ("heard 240 milliseconds at 24000 hertz", True)
    ]


async def test_an_empty_utterance_is_not_sent(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    transcripts = [t async for t in OpenAISpeechToText(client).transcribe(utterance(0))]
    assert [(t.text, t.final) for t in transcripts] == [("", True)]
    assert (await server.stats())["hits"] == {}


def test_wav_bytes_is_a_mono_16_bit_wav() -> None:
    data = wav_bytes(b"\x00\x01" * 160, 8_000)
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert int.from_bytes(data[24:28], "little") == 8_000
    assert len(data) == 44 + 320


# --- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(408, True), (409, True), (429, True), (500, True), (503, True)]
    + [(400, False), (401, False), (404, False), (422, False)],
)
async def test_http_errors_map_to_provider_errors(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, status: int, retryable: bool
) -> None:
    await server.control(fail={"speech": [status]})
    tts = OpenAITextToSpeech(client)
    with pytest.raises(ProviderError) as caught:
        _ = [chunk async for chunk in tts.synthesize("hello")]
    assert caught.value.retryable is retryable
    assert caught.value.provider == tts.name
    assert f"HTTP {status}" in str(caught.value)
    assert (await server.stats())["hits"]["speech"] == 1  # the SDK did not retry on its own


async def test_a_refused_connection_is_retryable() -> None:
    async with openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-test") as closed:
        with pytest.raises(ProviderError) as caught:
            _ = [e async for e in OpenAILanguageModel(closed).generate([Message("user", "hi")], [])]
    assert caught.value.retryable


# --- a server's answer of the wrong shape -----------------------------------------------------


def raw(body: bytes, content_type: str) -> dict[str, str]:
    """An answer for the fake server to send as it is."""
    return {"body_base64": base64.b64encode(body).decode(), "content_type": content_type}


def sse(*data: str | bytes) -> dict[str, str]:
    """A raw answer for the fake server: each piece as one SSE event's data, as it is."""
    pieces = (piece.encode() if isinstance(piece, str) else piece for piece in data)
    return raw(b"".join(b"data: " + piece + b"\n\n" for piece in pieces), "text/event-stream")


GOOD_CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ("[1, 2]", "chat chunk is an array, not an object"),
        ("42", "chat chunk is a number, not an object"),
        ("null", "chat chunk is null, not an object"),
        ('"text"', "chat chunk is a string, not an object"),
        ("{not json", "chat chunk is not JSON: "),
        ('{"choices": {"0": {}}}', "chat chunk.choices is an object, not an array"),
        ('{"choices": [7]}', "chat chunk.choices[0] is a number, not an object"),
        ('{"choices": [{"delta": []}]}', "chat chunk.choices[0].delta is an array, not an"),
        ('{"choices": [{"delta": {"content": 5}}]}', ".delta.content is a number, not a string"),
        ('{"choices": [{"delta": {"content": ["a"]}}]}', ".content is an array, not a string"),
        ('{"choices": [{"delta": {"tool_calls": {}}}]}', ".tool_calls is an object, not an array"),
        ('{"choices": [{"delta": {"tool_calls": [null]}}]}', "tool_calls[0] is null, not an"),
        ('{"choices": [{"delta": {"tool_calls": [{"index": "0"}]}}]}', ".index is a string"),
        ('{"choices": [{"delta": {"tool_calls": [{"index": -1}]}}]}', "not a non-negative"),
        ('{"choices": [{"delta": {"tool_calls": [{"function": 3}]}}]}', ".function is a number"),
        ('{"choices": [{"delta": {"tool_calls": [{"function": {"name": 1}}]}}]}', ".name is a"),
        ('{"choices": [], "usage": {"prompt_tokens": "2"}}', "usage.prompt_tokens is a string"),
        ('{"choices": [], "usage": [2, 5]}', "chat chunk.usage is an array, not an object"),
    ],
)
async def test_a_chat_chunk_of_the_wrong_shape_is_the_providers_failure_naming_it(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, data: str, said: str
) -> None:
    """Whatever the server streams, reading it raises a ProviderError that names what was
    wrong (not an AttributeError or TypeError from inside the reader), after what came
    before it; the next request on the same client is answered."""
    await server.control(raw={"chat": [sse(GOOD_CHUNK, data, "[DONE]")]})
    llm = OpenAILanguageModel(client)
    events, failure = await said_before_failing(llm)
    assert events == [TextDelta("Hi")]
    assert said in str(failure), failure
    assert str(failure).startswith(f"{llm.name}: malformed answer: ")
    assert failure.provider == llm.name and not failure.retryable
    after = [e async for e in llm.generate([Message("user", "hello")], [])]
    assert "".join(e.text for e in after if isinstance(e, TextDelta)) == "You said: hello "


async def said_before_failing(llm: OpenAILanguageModel) -> tuple[list[object], ProviderError]:
    """What the model yields for "hello" before it raises, and the ProviderError it raises."""
    events: list[object] = []
    with pytest.raises(ProviderError) as caught:
        async for event in llm.generate([Message("user", "hello")], []):
            events.append(event)
    return events, caught.value


async def test_a_chat_stream_that_is_not_utf8_is_the_providers_failure(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    await server.control(raw={"chat": [sse(b'{"choices": [{"delta": {"content": "\xff"}}]}')]})
    with pytest.raises(ProviderError) as caught:
        _ = [e async for e in OpenAILanguageModel(client).generate([Message("user", "hi")], [])]
    assert "malformed answer: chat chunk is not JSON: " in str(caught.value), caught.value
    assert "utf-8" in str(caught.value)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ({"message": "overloaded", "type": "server_error"}, "APIError: overloaded"),
        ("busy", "APIError: An error occurred during streaming"),  # the SDK's words
    ],
)
async def test_an_error_event_in_a_stream_is_the_servers_retryable_failure(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, error: object, said: str
) -> None:
    """As the SDK's stream reads it: an event with an ``error`` is the server's failure, after
    what came before it, and retryable."""
    await server.control(raw={"chat": [sse(GOOD_CHUNK, json.dumps({"error": error}), GOOD_CHUNK)]})
    llm = OpenAILanguageModel(client)
    events, failure = await said_before_failing(llm)
    assert events == [TextDelta("Hi")]
    assert str(failure) == f"{llm.name}: {said}" and failure.retryable


async def test_a_stream_in_crlf_with_comments_and_split_data_reads_whole(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI
) -> None:
    """The standard's other shapes of the same events (some compatible servers send comments
    to keep a connection alive, and CRLF): the same text; nothing after ``[DONE]`` is read."""
    body = (
        b": keep-alive\r\n\r\n"
        b'data: {"choices": [{"delta":\r\ndata: {"content": "Hi "}}]}\r\n\r\n'
        b'event: chunk\r\ndata:{"choices": [{"delta": {"content": "there"}}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\ndata: not json\r\n\r\n"
    )
    await server.control(raw={"chat": [raw(body, "text/event-stream")]})
    events = [e async for e in OpenAILanguageModel(client).generate([Message("user", "hi")], [])]
    assert events == [TextDelta("Hi "), TextDelta("there")]


TRANSCRIPT_DELTA = {"type": "transcript.text.delta", "delta": "heard"}


@pytest.mark.parametrize(
    ("event", "said"),
    [
        ([TRANSCRIPT_DELTA], "transcription event is an array, not an object"),
        (None, "transcription event is null, not an object"),
        ("transcript.text.done", "transcription event is a string, not an object"),
        ({"type": 1}, "transcription event.type is a number, not a string"),
        ({"type": "transcript.text.delta", "delta": 3}, "event.delta is a number, not a string"),
        ({"type": "transcript.text.done", "text": {}}, "event.text is an object, not a string"),
        ({**TRANSCRIPT_DELTA, "logprobs": {}}, "event.logprobs is an object, not an array"),
        ({**TRANSCRIPT_DELTA, "logprobs": ["a"]}, "logprobs[0] is a string, not an object"),
        ({**TRANSCRIPT_DELTA, "logprobs": [{"logprob": "-1"}]}, ".logprob is a string, not a"),
        ({**TRANSCRIPT_DELTA, "logprobs": [{"token": 7}]}, "logprobs[0].token is a number"),
        ({**TRANSCRIPT_DELTA, "logprobs": [{"bytes": [300]}]}, "other than bytes (0-255)"),
        ({"type": "transcript.text.segment", "start": "0"}, "segment.start is a string, not a"),
        ({"type": "transcript.text.segment", "speaker": []}, "segment.speaker is an array"),
    ],
)
async def test_a_transcription_event_of_the_wrong_shape_is_the_providers_failure_naming_it(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, event: object, said: str
) -> None:
    await server.control(raw={"transcriptions": [sse(json.dumps(event))]})
    stt = OpenAISpeechToText(client)
    with pytest.raises(ProviderError) as caught:
        _ = [t async for t in stt.transcribe(utterance(200))]
    assert said in str(caught.value), caught.value
    assert str(caught.value).startswith(f"{stt.name}: malformed answer: ")
    assert not caught.value.retryable
    heard = [t async for t in stt.transcribe(utterance(200))]
    assert heard[-1].text == "heard 200 milliseconds at 16000 hertz"


@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        (b'["heard"]', "application/json", "transcription body is an array, not an object"),
        (b'{"text": 5}', "application/json", "transcription body.text is a number, not a string"),
        (b"{heard", "application/json", "transcription body is not application/json"),
        (b"\xffheard", "text/plain", "transcription body is not text/plain"),
    ],
)
async def test_a_transcription_body_of_the_wrong_shape_is_the_providers_failure_naming_it(
    server: FakeOpenAIServer, client: openai.AsyncOpenAI, body: bytes, content_type: str, said: str
) -> None:
    """A server that does not stream (whisper-1) answers one body: it too is checked."""
    await server.control(raw={"transcriptions": [raw(body, content_type)]})
    with pytest.raises(ProviderError) as caught:
        _ = [t async for t in OpenAISpeechToText(client, "whisper-1").transcribe(utterance(200))]
    assert said in str(caught.value), caught.value
