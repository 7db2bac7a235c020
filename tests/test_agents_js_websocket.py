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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agents_sdk import SDK_DIR, NodeUnavailable, node_argv
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


async def run_script(argv: list[str], options: dict[str, Any]) -> Run:
    process = await asyncio.create_subprocess_exec(
        *argv, json.dumps(options), cwd=SDK_DIR,
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
    assert process.returncode == 0, (run.of("failed"), err.decode()[-2000:])
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
