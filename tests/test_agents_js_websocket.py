"""OpenAI's Agents SDK for JavaScript, in Node, against our Realtime WebSocket.

``tests/agents_sdk/websocket_agent.mjs`` runs ``@openai/agents-realtime``'s ``RealtimeSession``
on its own WebSocket transport (in Node, the ``ws`` package with ``Authorization: Bearer``),
unchanged but for the URL, against a transceiver process (``--agent pipeline``, auth required)
whose language model is the fake OpenAI server (it answers "You said: …" and calls a tool whose
name the user says), its speech-to-text pocketsphinx and its speech piper. A text message gets
its answer; a spoken question, sent with ``sendAudio`` in 100 ms chunks, is transcribed, makes
the model call the agent's function tool, the SDK runs it and sends its output back, and the
answer after it comes as audio in which pocketsphinx recognises the words.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import pytest
from agents_sdk import SDK_DIR, NodeUnavailable, node_argv
from openai.types.realtime import RealtimeServerEvent
from websocket_harness import heard_words, spoken_question, transceiver_process_with

from deploy.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.slow
API_KEY = "vr-agents-js-" + os.urandom(12).hex()
CAPACITY = 1
QUESTION = "What is the weather in Paris?"
STEP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 4 * STEP_TIMEOUT_S + 30.0  # the script's own steps (four) time out first


@pytest.fixture(scope="module")
def transceiver(
    server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The transceiver's HTTP base URL; it speaks with piper, so its answers can be heard."""
    log_dir = tmp_path_factory.mktemp("agents-js")
    speech = {"PIPELINE_TTS": "piper"}
    with transceiver_process_with(server.base_url, API_KEY, CAPACITY, log_dir, speech) as url:
        yield url


@pytest.fixture(scope="module")
def script() -> list[str]:
    try:
        return node_argv("websocket_agent.mjs")
    except NodeUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def question_pcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("agents-js-question") / "question.pcm"
    path.write_bytes(spoken_question(QUESTION))
    return path


@dataclass(frozen=True)
class Run:
    """What the script printed, one JSON object a line."""

    lines: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["kind"] == kind]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line["event"] for line in self.of("event") if line["event"]["type"] == kind]

    def audio(self, response_id: str) -> bytes:
        pieces = [a["pcm"] for a in self.of("audio") if a["response_id"] == response_id]
        return b"".join(base64.b64decode(piece) for piece in pieces)


async def run_script(
    argv: list[str], options: dict[str, Any], env: Mapping[str, str] | None = None
) -> Run:
    process = await asyncio.create_subprocess_exec(
        *argv, json.dumps(options), cwd=SDK_DIR, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    run = Run([json.loads(line) for line in out.decode().splitlines()])
    kinds = [line["event"]["type"] for line in run.of("event")]
    assert process.returncode == 0, (run.of("failed"), kinds[-40:], err.decode()[-2000:])
    return run


def transcript(response_done: dict[str, Any]) -> list[str]:
    """The words of a ``response.done``'s assistant message."""
    (message,) = [i for i in response_done["response"]["output"] if i["type"] == "message"]
    return " ".join(part["transcript"] for part in message["content"]).split()


async def test_a_text_message_and_a_spoken_question_through_a_tool(
    transceiver: str, script: list[str], question_pcm: Path
) -> None:
    url = transceiver.replace("http://", "ws://", 1) + "/v1/realtime?model=gpt-realtime"
    options: dict[str, Any] = {"url": url, "apiKey": API_KEY, "text": "hi there"}
    options |= {"questionPcm": str(question_pcm)}
    options |= {"toolName": "weather", "toolOutput": "sunny"}
    options |= {"stepTimeoutMs": STEP_TIMEOUT_S * 1000}
    run = await run_script(script, options)
    steps = [step["name"] for step in run.of("step")]
    assert steps == ["connected", "text answered", "tool ended", "spoken question answered"]
    assert run.of("error") == [] and run.events("error") == [], run.of("error")
    text_answer, _, spoken_answer = run.events("response.done")
    assert transcript(text_answer) == ["You", "said:", "hi", "there"]

    (heard,) = run.events("conversation.item.input_audio_transcription.completed")
    assert "weather" in heard["transcript"].split(), heard
    (started,), (ended,) = run.of("tool_start"), run.of("tool_end")
    assert started["name"] == ended["name"] == "weather"
    assert json.loads(ended["arguments"]) == {"query": heard["transcript"]}
    assert ended["output"] == "sunny"
    (sent,) = [e["item"] for e in run.events("conversation.item.added")
               if e["item"]["type"] == "function_call_output"]  # fmt: skip
    assert sent["output"] == "sunny", sent

    assert transcript(spoken_answer) == ["The", "weather", "tool", "says", "sunny."]
    words = await heard_words(run.audio(spoken_answer["response"]["id"]))
    assert "weather" in words, words
    (history,) = run.of("history")
    assert history["history"][-1]["content"][0]["transcript"].split()[:2] == ["The", "weather"]


# --- openai-node's OpenAIRealtimeWS ---------------------------------------------------------

SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (openssl), and the key."""
    cert, key = directory / "front.pem", directory / "front-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def tls_in_front(target: str, directory: Path) -> AsyncIterator[tuple[str, Path]]:
    """TLS in front of ``target`` (``host:port``), as the production ingress puts it before the
    transceivers (``self_signed``), the bytes copied both ways. Yields the ``https`` base URL
    and the certificate a client must trust."""
    cert, key = await asyncio.to_thread(self_signed, directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    host, port = target.rsplit(":", 1)

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(
            copy(reader, up_writer), copy(up_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0, ssl=context)
    async with server:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", cert


async def test_openai_nodes_realtime_ws_takes_a_text_and_a_spoken_turn(
    transceiver: str, question_pcm: Path, tmp_path: Path
) -> None:
    """The ``openai`` npm package's ``OpenAIRealtimeWS`` (Node, the ``ws`` package), unchanged
    but for its client's ``baseURL``: a typed message is answered, and the spoken question is
    transcribed and answered aloud."""
    try:
        argv = node_argv("openai_node_ws.mjs")
    except NodeUnavailable as exc:
        pytest.skip(str(exc))
    async with tls_in_front(transceiver.removeprefix("http://"), tmp_path) as (url, cert):
        options: dict[str, Any] = {"baseURL": url + "/v1", "apiKey": API_KEY}
        options |= {"text": "hi there", "questionPcm": str(question_pcm)}
        options |= {"stepTimeoutMs": STEP_TIMEOUT_S * 1000}
        run = await run_script(argv, options, {"NODE_EXTRA_CA_CERTS": str(cert)})
    steps = [step["name"] for step in run.of("step")]
    assert steps == ["connected", "text answered", "spoken question answered"], run.of("failed")
    assert run.of("error") == [] and run.events("error") == [], run.of("error")
    for line in run.of("event"):
        event = line["event"]
        if (
            not event["type"].startswith("voicerelay.")
            and "output_audio.delta" not in event["type"]
        ):
            SERVER_EVENT.validate_python(event)
    text_answer, spoken_answer = run.events("response.done")
    assert transcript(text_answer) == ["You", "said:", "hi", "there"]
    (heard,) = run.events("conversation.item.input_audio_transcription.completed")
    assert "weather" in heard["transcript"].split(), heard
    assert transcript(spoken_answer)[:2] == ["You", "said:"], spoken_answer
    assert "weather" in transcript(spoken_answer), spoken_answer
    spoken_id = spoken_answer["response"]["id"]
    audio = run.events("response.output_audio.delta")
    assert sum(d["delta"] for d in audio if d["response_id"] == spoken_id) > 0
