"""A small OpenAI-compatible HTTP server for tests and local load runs, on loopback (uvicorn).

The only fake in the suite: it stands in for the paid OpenAI API. It speaks the real wire
shapes (SSE chat chunks with tool-call deltas and usage, the Responses API's streamed events
(``deploy.fake_responses``), raw PCM speech, multipart transcription) and validates requests
the way the API does, so a wrong mapping fails here. Its chat model answers "You said: …"; told
to interpret (a translation session's instruction), "In <language>: …" with the words it names.

Control endpoints (tests drive them through ``FakeOpenAIServer``):
  POST /__control  {"fail": {route: [status, ...]}, "hold": [route], "stall_s": {route: s},
                    "chunk_delay_s": s, "ignore_stream": bool,
                    "responses_ending": "completed" | "failed" | "error" | "cut",
                    "calls_per_turn": n,  -- a chat turn that calls a tool calls it n times,
                    whatever parallel_tool_calls says (n > 1: ids numbered on from the
                    conversation's calls, so each is new; 1: call_fake_1)
                    "raw": {route: [{"body_base64": b64, "content_type": type}, ...]}}  -- the
                    next requests on route are answered 200 with these bodies byte for byte
                    (a malformed stream: not UTF-8, not JSON, or JSON of the wrong shape)
  POST /__release  {"route": route}  -- let a held stream continue after its first chunk
  POST /__reset
  GET  /__stats    hits, finished and disconnected streams, last request per route
Routes: "chat", "responses", "speech", "transcriptions"; a failure key "route:model" fails
only that model.

Run as a script it binds 127.0.0.1 on a free port and prints the port on stdout.
"""

from __future__ import annotations

import array
import asyncio
import base64
import email.parser
import email.policy
import functools
import io
import json
import math
import re
import select
import socket
import subprocess
import sys
import time
import wave
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from deploy.fake_responses import responses_problem, responses_sse
from deploy.waiting import poll

if TYPE_CHECKING:  # the SDK's client, for tests that talk to the fake through it: 0.9 s of
    import openai  # imports the server process does not need

SPEECH_SAMPLES_PER_WORD = 2_400  # 0.1 s at 24 kHz
INTERPRETER = re.compile(r"You are an interpreter\. Translate what the user says into ([^.]+)\.")
UTTERANCE = re.compile(r"Translate these words, and only these: «(.*)»", re.DOTALL)
SPEECH_CHUNKS = 4


@dataclass
class ServerState:
    failures: dict[str, deque[int]] = field(default_factory=dict)
    raw: dict[str, deque[tuple[bytes, str]]] = field(default_factory=dict)  # body, content type
    hold: set[str] = field(default_factory=set)
    released: dict[str, asyncio.Event] = field(default_factory=dict)
    stall_s: dict[str, float] = field(default_factory=dict)
    chunk_delay_s: float = 0.01
    ignore_stream: bool = False
    responses_ending: str = "completed"  # or "failed", "error", "cut" (``fake_responses``)
    calls_per_turn: int = 1  # a chat tool call made this many times in one turn
    hits: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)
    disconnected: Counter[str] = field(default_factory=Counter)
    last_request: dict[str, Any] = field(default_factory=dict)

    def release_event(self, route: str) -> asyncio.Event:
        return self.released.setdefault(route, asyncio.Event())


app = FastAPI()
state = ServerState()


def _error(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def _injected_failure(route: str, model: object) -> Response | None:
    """Count the request; answer with the next injected status for "route:model" or "route",
    else the next raw body for route."""
    state.hits[route] += 1
    state.hits[f"{route}:{model}"] += 1
    for key in (f"{route}:{model}", route):
        queue = state.failures.get(key)
        if queue:
            status = queue.popleft()
            return _error(status, f"injected {status} on {key}")
    if raw := state.raw.get(route):
        body, content_type = raw.popleft()
        return Response(body, media_type=content_type)
    return None


async def _paced(route: str, pieces: list[bytes]) -> AsyncIterator[bytes]:
    """Send pieces with a delay between them; stall first and hold after the first if told."""
    try:
        await asyncio.sleep(state.stall_s.get(route, 0.0))
        for number, piece in enumerate(pieces):
            if number:
                await asyncio.sleep(state.chunk_delay_s)
            yield piece
            if number == 0 and route in state.hold:
                await state.release_event(route).wait()
        state.finished[route] += 1
    except asyncio.CancelledError:
        state.disconnected[route] += 1
        raise


def _sse(events: list[Any], done: bool) -> list[bytes]:
    lines = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
    return [*lines, b"data: [DONE]\n\n"] if done else lines


# --- chat completions -----------------------------------------------------------------------


@app.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    body = await request.json()
    if (failure := _injected_failure("chat", body.get("model"))) is not None:
        return failure
    state.last_request["chat"] = body
    problem = _chat_problem(body)
    if problem:
        return _error(400, problem)
    chunks = list(_chat_chunks(body))
    if body.get("stream_options", {}).get("include_usage"):
        chunks.append(_chunk(body, [], usage=_usage(body, len(chunks))))
    return StreamingResponse(
        _paced("chat", _sse(chunks, done=True)), media_type="text/event-stream"
    )


def _chat_problem(body: dict[str, Any]) -> str:
    if body.get("stream") is not True:
        return "this fake serves stream=true only"
    if not isinstance(body.get("model"), str):
        return "model: required"
    known_calls: dict[str, str] = {}
    for index, message in enumerate(body.get("messages") or [None]):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "user",
            "assistant",
            "tool",
        ):
            return f"messages[{index}]: invalid message"
        for call in message.get("tool_calls") or []:
            known_calls[call["id"]] = call["function"]["name"]
        if message["role"] == "tool" and message.get("tool_call_id") not in known_calls:
            return f"messages[{index}].tool_call_id: no preceding assistant tool call has it"
        if problem := _parts_problem(message, f"messages[{index}].content"):
            return problem
    return _tool_choice_problem(body)


def _parts_problem(message: dict[str, Any], where: str) -> str:
    """Content parts as OpenAI checks them: text, and (in a user message) images."""
    if not isinstance(message.get("content"), list):
        return ""
    for index, part in enumerate(message["content"]):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind != "image_url" or message["role"] != "user":
            return f"{where}[{index}]: invalid content part"
        image = part.get("image_url") or {}
        if not str(image.get("url", "")).startswith("data:image/"):
            return f"{where}[{index}].image_url.url: invalid image URL"
        if image.get("detail", "auto") not in ("auto", "low", "high"):
            return f"{where}[{index}].image_url.detail: invalid"
    return ""


def content_text(content: Any) -> str:
    """A message's words; a list of parts: its text parts', and how many images it shows."""
    if not isinstance(content, list):
        return str(content or "")
    text = " ".join(str(part.get("text", "")) for part in content if part["type"] == "text")
    images = sum(part["type"] in ("image_url", "input_image") for part in content)
    return f"{text} (and {images} image{'s' * (images != 1)})" if images else text


def _tool_choice_problem(body: dict[str, Any]) -> str:
    if "parallel_tool_calls" in body and not body.get("tools"):
        return "parallel_tool_calls is only allowed when 'tools' are specified"
    choice = body.get("tool_choice")
    if choice is None:
        return ""
    if not body.get("tools"):
        return "tool_choice is only allowed when tools are specified"
    names = {tool["function"]["name"] for tool in body["tools"]}
    if isinstance(choice, dict):
        if choice.get("type") != "function" or choice.get("function", {}).get("name") not in names:
            return "tool_choice: a function among the tools"
        return ""
    return "" if choice in ("auto", "none", "required") else "tool_choice: invalid"


def _chat_chunks(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    messages = body["messages"]
    last = messages[-1]
    if last["role"] == "tool":
        name = _tool_name(messages, last["tool_call_id"])
        yield from _text_chunks(body, f"The {name} tool says {last['content']}.")
        return
    said = content_text(last.get("content"))
    language, words = _interpreting(messages)
    if language:
        yield from _text_chunks(body, f"In {language}: {words or said}")
        return
    tool = _requested_tool(body, said)
    if tool:
        yield from _tool_call_chunks(body, tool, json.dumps({"query": said}))
        return
    yield from _text_chunks(body, f"You said: {said}")


def _interpreting(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The language a translation session's instruction names (``translation_fields``) and
    the words it names, if it does, or ("", ""): told to interpret, this model "translates" by
    saying which language and the words."""
    for message in messages:
        text = content_text(message.get("content")) if message["role"] == "system" else ""
        if found := INTERPRETER.search(text):
            words = UTTERANCE.search(text)
            return found.group(1), "" if words is None else words.group(1)
    return "", ""


def _tool_name(messages: list[dict[str, Any]], call_id: str) -> str:
    for message in messages:
        for call in message.get("tool_calls") or []:
            if call["id"] == call_id:
                return str(call["function"]["name"])
    return ""


def _requested_tool(body: dict[str, Any], text: str) -> str:
    """The tool the last message names, or the one ``tool_choice`` makes it call."""
    choice = body.get("tool_choice", "auto")
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    tools = [str(tool["function"]["name"]) for tool in body.get("tools") or []]
    named = [name for name in tools if name in text and choice != "none"]
    if not named and choice == "required":
        named = tools
    return named[0] if named else ""


def _chunk(body: dict[str, Any], choices: list[Any], usage: Any = None) -> dict[str, Any]:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body["model"],
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[Any]:
    return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]


def _text_chunks(body: dict[str, Any], text: str) -> Iterator[dict[str, Any]]:
    for number, word in enumerate(text.split(" ")):
        role = {"role": "assistant"} if number == 0 else {}
        yield _chunk(body, _choice({**role, "content": word + " "}))
    yield _chunk(body, _choice({}, "stop"))


def _tool_call_chunks(body: dict[str, Any], name: str, arguments: str) -> Iterator[dict[str, Any]]:
    many = state.calls_per_turn > 1
    earlier = sum(len(m.get("tool_calls") or ()) for m in body["messages"]) if many else 0
    for index in range(state.calls_per_turn):
        first = {"index": index, "id": f"call_fake_{earlier + index + 1}", "type": "function"}
        role = {"role": "assistant"} if index == 0 else {}
        call = {**first, "function": {"name": name, "arguments": ""}}
        yield _chunk(body, _choice({**role, "tool_calls": [call]}))
        third = len(arguments) // 3 + 1
        for start in range(0, len(arguments), third):
            piece = {"index": index, "function": {"arguments": arguments[start : start + third]}}
            yield _chunk(body, _choice({"tool_calls": [piece]}))
    yield _chunk(body, _choice({}, "tool_calls"))


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    words = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
    return {
        "prompt_tokens": words,
        "completion_tokens": completion_tokens,
        "total_tokens": words + completion_tokens,
    }


# --- responses ------------------------------------------------------------------------------


@app.post("/v1/responses", response_model=None)
async def responses(request: Request) -> Response:
    body = await request.json()
    if (failure := _injected_failure("responses", body.get("model"))) is not None:
        return failure
    state.last_request["responses"] = body
    problem = responses_problem(body)
    if problem:
        return _error(400, problem)
    events = responses_sse(body, state.responses_ending)
    return StreamingResponse(_paced("responses", events), media_type="text/event-stream")


# --- speech ---------------------------------------------------------------------------------


@app.post("/v1/audio/speech", response_model=None)
async def speech(request: Request) -> Response:
    body = await request.json()
    if (failure := _injected_failure("speech", body.get("model"))) is not None:
        return failure
    state.last_request["speech"] = body
    if body.get("response_format") != "pcm":
        return _error(400, "response_format: this fake serves pcm only")
    if not body.get("input") or not body.get("voice") or not body.get("model"):
        return _error(400, "input, voice and model are required")
    pcm = speech_pcm(str(body["input"]))
    # Odd-sized pieces, so the client must re-cut them on sample boundaries.
    size = len(pcm) // SPEECH_CHUNKS + 1
    pieces = [pcm[start : start + size] for start in range(0, len(pcm), size)]
    return StreamingResponse(_paced("speech", pieces), media_type="application/octet-stream")


def speech_pcm(text: str) -> bytes:
    """A 440 Hz tone, 0.1 s per word, as 24 kHz 16-bit mono PCM."""
    return _tone(max(1, len(text.split())))


@functools.lru_cache(maxsize=64)
def _tone(words: int) -> bytes:
    # made once per length: computed sample by sample it was a tenth of this server's CPU in a
    # load run (where the load generator's share of the machine is what limits the run)
    count = SPEECH_SAMPLES_PER_WORD * words
    samples = (int(8000 * math.sin(2 * math.pi * 440 * n / 24_000)) for n in range(count))
    return array.array("h", samples).tobytes()


# --- transcription --------------------------------------------------------------------------


@app.post("/v1/audio/transcriptions", response_model=None)
async def transcriptions(request: Request) -> Response:
    fields = _multipart_fields(request.headers.get("content-type", ""), await request.body())
    model = fields.get("model", b"").decode()
    if (failure := _injected_failure("transcriptions", model)) is not None:
        return failure
    state.last_request["transcriptions"] = {k: v for k, v in fields.items() if k != "file"}
    if "file" not in fields or "model" not in fields:
        return _error(400, "file and model are required")
    try:
        text = _describe_wav(fields["file"])
    except (wave.Error, EOFError, ValueError) as error:
        return _error(400, f"file: not a 16-bit mono WAV ({error})")
    if (problem := _transcription_problem(fields)) is not None:
        return _error(400, problem)
    logprobs = fields.get("include[]") == b"logprobs"
    diarized = fields.get("response_format") == b"diarized_json"
    if fields.get("stream") == b"true" and not state.ignore_stream:
        events = _diarized_events(text) if diarized else _transcript_events(text, logprobs)
        return StreamingResponse(
            _paced("transcriptions", _sse(events, done=False)), media_type="text/event-stream"
        )
    state.finished["transcriptions"] += 1
    if fields.get("response_format") == b"text":
        return PlainTextResponse(text + "\n")
    return JSONResponse({"text": text})


LOGPROBS_MODELS = (
    b"gpt-4o-transcribe", b"gpt-4o-mini-transcribe", b"gpt-4o-mini-transcribe-2025-12-15",
)  # fmt: skip
DIARIZE_MODEL = b"gpt-4o-transcribe-diarize"
DIARIZE_FORMATS = (b"json", b"text", b"diarized_json")
DIARIZE_REFUSES = ("prompt", "include[]", "timestamp_granularities[]")


def _transcription_problem(fields: dict[str, bytes]) -> str | None:
    """What OpenAI refuses in a transcription request (``TranscriptionCreateParams``): logprobs
    but from the gpt-4o-transcribe models in JSON; with the diarizing model a prompt, logprobs,
    timestamps, another format, or over 30 s of audio without a chunking strategy."""
    model, response_format = fields["model"], fields.get("response_format", b"json")
    if model == DIARIZE_MODEL:
        refused = [key for key in DIARIZE_REFUSES if key in fields]
        if refused:
            return f"{refused[0]} is not supported with {DIARIZE_MODEL.decode()}"
        if response_format not in DIARIZE_FORMATS:
            return f"response_format {response_format.decode()!r} is not supported"
        if "chunking_strategy" not in fields and _duration_ms(fields["file"]) > 30_000:
            return "chunking_strategy is required for audio longer than 30 seconds"
        return None
    if response_format == b"diarized_json":
        return f"diarized_json is only supported with {DIARIZE_MODEL.decode()}"
    logprobs = fields.get("include[]") == b"logprobs"
    if logprobs and (model not in LOGPROBS_MODELS or response_format != b"json"):
        return "logprobs are only supported with gpt-4o-transcribe models in json"
    return None


def _duration_ms(data: bytes) -> int:
    with wave.open(io.BytesIO(data), "rb") as wav:
        return round(1000 * wav.getnframes() / wav.getframerate())


def _multipart_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """The form's fields by name. The plain form a client library writes (each part a
    Content-Disposition with its name, then the bytes as they are) is split directly; anything
    else goes to the e-mail parser (which was a fifth of this server's CPU in a load run)."""
    plain = _plain_multipart_fields(content_type, body)
    return plain if plain is not None else _parsed_multipart_fields(content_type, body)


MULTIPART_BOUNDARY = re.compile(
    r'^multipart/form-data;\s*boundary=("?)([0-9A-Za-z\'()+_,./:=?-]{1,70})\1$'
)
PART_NAME = re.compile(
    rb'^content-disposition: form-data; name="([^"\\]*)"(?:; filename="[^"\\]*")?$'
)
PART_HEADER = re.compile(rb"^content-type: [!-~]+$")


def _plain_multipart_fields(content_type: str, body: bytes) -> dict[str, bytes] | None:
    """``_multipart_fields`` of the plain form, or None where the part is not that plain."""
    boundary = MULTIPART_BOUNDARY.match(content_type.strip())
    if boundary is None:
        return None
    delimiter = b"--" + boundary.group(2).encode()
    pieces = body.split(b"\r\n" + delimiter)
    if not pieces[0].startswith(delimiter + b"\r\n") or pieces[-1] not in (b"--", b"--\r\n"):
        return None
    pieces[0] = pieces[0][len(delimiter) :]
    fields: dict[str, bytes] = {}
    for piece in pieces[:-1]:
        head, blank, payload = piece.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        if not blank or lines[0] != b"" or len(lines) > 3:
            return None
        named = PART_NAME.match(lines[1]) if len(lines) > 1 else None
        if named is None or not all(PART_HEADER.match(line) for line in lines[2:]):
            return None
        name = head.split(b"\r\n")[1][named.start(1) : named.end(1)].decode("latin-1")
        fields[name] = payload
    return fields


def _parsed_multipart_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, bytes] = {}
    parts: Iterator[Any] = message.iter_parts()
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = part.get_payload(decode=True) or b""
    return fields


def _describe_wav(data: bytes) -> str:
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"{wav.getnchannels()} channels, {wav.getsampwidth()} bytes")
        duration_ms = round(1000 * wav.getnframes() / wav.getframerate())
        return f"heard {duration_ms} milliseconds at {wav.getframerate()} hertz"


def _transcript_events(text: str, logprobs: bool = False) -> list[dict[str, Any]]:
    """A delta a word; with ``logprobs`` each delta's token and the done event's all of them
    (the n-th word's logprob -0.05 n)."""
    deltas: list[dict[str, Any]] = []
    for i, word in enumerate(text.split(" ")):
        delta = word if i == 0 else " " + word
        deltas.append({"type": "transcript.text.delta", "delta": delta})
        if logprobs:
            token = {"token": delta, "bytes": list(delta.encode()), "logprob": -0.05 * (i + 1)}
            deltas[-1]["logprobs"] = [token]
    done: dict[str, Any] = {"type": "transcript.text.done", "text": text}
    if logprobs:
        done["logprobs"] = [delta["logprobs"][0] for delta in deltas]
    return [*deltas, done]


def _diarized_events(text: str) -> list[dict[str, Any]]:
    """Two speakers: "A" says the first half of the words, "B" the rest, each over its share of
    the audio (``text`` says how long it is); each segment's deltas name it, then the segment."""
    words = text.split(" ")
    duration_s = int(words[1]) / 1000  # "heard N milliseconds ..."
    half = len(words) // 2
    events: list[dict[str, Any]] = []
    for index, (speaker, part) in enumerate([("A", words[:half]), ("B", words[half:])]):
        segment_id = f"seg_{index}"
        for i, word in enumerate(part):
            delta = word if index == 0 and i == 0 else " " + word
            events.append(
                {"type": "transcript.text.delta", "delta": delta, "segment_id": segment_id}
            )
        start_s, end_s = index * duration_s / 2, (index + 1) * duration_s / 2
        events.append({
            "type": "transcript.text.segment", "id": segment_id, "speaker": speaker,
            "start": start_s, "end": end_s, "text": " ".join(part),
        })  # fmt: skip
    return [*events, {"type": "transcript.text.done", "text": text}]


# --- control --------------------------------------------------------------------------------


@app.post("/__control")
async def control(request: Request) -> dict[str, bool]:
    body = await request.json()
    for route, statuses in body.get("fail", {}).items():
        state.failures.setdefault(route, deque()).extend(int(s) for s in statuses)
    for route, answers in body.get("raw", {}).items():
        bodies = ((base64.b64decode(a["body_base64"]), str(a["content_type"])) for a in answers)
        state.raw.setdefault(route, deque()).extend(bodies)
    state.hold.update(body.get("hold", []))
    state.stall_s.update(body.get("stall_s", {}))
    state.chunk_delay_s = float(body.get("chunk_delay_s", state.chunk_delay_s))
    state.ignore_stream = bool(body.get("ignore_stream", state.ignore_stream))
    state.responses_ending = str(body.get("responses_ending", state.responses_ending))
    state.calls_per_turn = int(body.get("calls_per_turn", state.calls_per_turn))
    return {"ok": True}


@app.post("/__release")
async def release(request: Request) -> dict[str, bool]:
    route = (await request.json())["route"]
    state.hold.discard(route)
    state.release_event(route).set()
    return {"ok": True}


@app.post("/__reset")
async def reset() -> dict[str, bool]:
    for event in state.released.values():
        event.set()  # free any stream still held by a previous test
    state.__init__()  # type: ignore[misc]
    return {"ok": True}


@app.get("/__stats")
async def stats() -> dict[str, Any]:
    return {
        "hits": dict(state.hits),
        "finished": dict(state.finished),
        "disconnected": dict(state.disconnected),
        "last_request": state.last_request,
    }


# --- the process, as seen from a test -------------------------------------------------------


class FakeOpenAIServer:
    """Starts this module as a uvicorn subprocess on loopback; stops it by PID."""

    def __init__(self, startup_timeout_s: float = 20.0) -> None:
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> FakeOpenAIServer:
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdout=subprocess.PIPE, text=True
        )
        self.base_url = f"http://127.0.0.1:{self._read_port()}"
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        assert self._process.stdout is not None
        self._process.stdout.close()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def _read_port(self) -> int:
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._process.stdout], [], [], remaining)
            if ready:
                line = self._process.stdout.readline()
                if not line:
                    break
                if line.startswith("port "):
                    return int(line.split()[1])
        raise RuntimeError("fake OpenAI server did not report its port")

    def openai_client(self, timeout_s: float = 30.0) -> openai.AsyncOpenAI:
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="sk-test", max_retries=0, timeout=timeout_s
        )

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
            (await http.post(path, json=body)).raise_for_status()

    async def control(self, **settings: Any) -> None:
        await self._post("/__control", settings)

    async def release(self, route: str) -> None:
        await self._post("/__release", {"route": route})

    async def reset(self) -> None:
        await self._post("/__reset", {})

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as http:
            response = await http.get("/__stats")
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def wait_for(self, key: str, route: str, count: int, timeout_s: float = 10.0) -> None:
        """Poll the stats until ``stats[key][route] >= count``, or fail at the deadline."""

        def reached(stats: dict[str, Any]) -> bool:
            return int(stats[key].get(route, 0)) >= count

        await poll(
            self.stats,
            reached,
            timeout_s,
            lambda _: f"{key}[{route}] did not reach {count} within {timeout_s} s",
        )


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"port {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
