"""OpenTelemetry traces of calls (``transceiver.realtime.call_tracing``), end to end.

A real transceiver process (the WebSocket harness: the official ``openai`` SDK, the fake OpenAI
server, pocketsphinx) runs with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at an OTLP/HTTP receiver
on loopback, which decodes each ``ExportTraceServiceRequest`` with ``opentelemetry-proto``'s
classes. One session speaks a question and makes a client tool call; the receiver gets the call
span, a turn span per turn under it, and STT, LLM (with the GenAI attributes), TTS and tool spans
under those. Without ``OTEL_*`` a process never loads the SDK nor starts an exporter thread.

The signalling and the relay: an aiortc client sends its offer with a W3C ``traceparent``
through a real relay to a pipeline transceiver, both tracing. The ``voicerelay.offer`` span
continues the client's trace, with the admission and the SDP answer under it; the call span is
its child and carries the ICE and DTLS phases as events; the relay worker's
``voicerelay.relay.route`` span names the transceiver it learned the client's route for. A
resume with a wrong credential has its own offer span (403) with the failed claim under it.
Without ``OTEL_*`` the relay's worker loads no trace SDK and no exporter.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from websocket_harness import (
    EventLog,
    ask_in_text,
    openai_client,
    spoken_question,
    transceiver_process_with,
)

from deploy.fake_openai import FakeOpenAIServer
from deploy.processes import Stack, text
from deploy.redis_server import RedisServer
from deploy.survival import redis_env
from loadtest.realtime_client import TOKEN_HEADER, RealtimeClient, call
from relay.wire.redis_config import RedisConfig

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "vr-otel-" + os.urandom(12).hex()
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
RECEIVE_TIMEOUT_S = 20.0


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: every span it is sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                spans = [
                    {**_span(span), "service": _attributes(resource.resource.attributes)}
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                with receiver.changed:
                    receiver.paths.append(self.path)
                    receiver.spans.extend(spans)
                    receiver.changed.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, name: str) -> dict[str, Any]:
        """The first span named ``name``, once it has come."""
        with self.changed:
            found = self.changed.wait_for(
                lambda: [s for s in self.spans if s["name"] == name], RECEIVE_TIMEOUT_S
            )
        assert found, f"no {name} span among {[s['name'] for s in self.spans]}"
        return found[0]


def _attributes(pairs: Any) -> dict[str, Any]:
    found = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind)
    return found


def _span(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "attributes": _attributes(span.attributes),
        "error": span.status.code == span.status.STATUS_CODE_ERROR,
        "events": [event.name for event in span.events],
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    thread = threading.Thread(target=running.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.server.shutdown()
        running.server.server_close()
        thread.join()


@pytest.fixture
def traced(receiver: Receiver, tmp_path: Path) -> Iterator[str]:
    """A transceiver sending its traces to the receiver: its HTTP base URL."""
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "voicerelay-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with (
        FakeOpenAIServer() as fake,
        transceiver_process_with(fake.base_url, API_KEY, 1, tmp_path, otel) as base_url,
    ):
        yield base_url


@pytest.fixture
def question() -> bytes:
    return spoken_question()


async def test_a_call_sends_its_span_tree_to_the_otlp_receiver(
    receiver: Receiver, traced: str, question: bytes
) -> None:
    client = openai_client(traced, API_KEY)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        events = EventLog(connection)
        await events.next("session.created")
        await connection.session.update(session={"type": "realtime", "tools": [TOOL]})
        await events.next("session.updated")
        step = 24_000 * 2 // 5  # 200 ms per append
        for start in range(0, len(question), step):
            chunk = base64.b64encode(question[start : start + step]).decode()
            await connection.input_audio_buffer.append(audio=chunk)
        await events.next("conversation.item.input_audio_transcription.completed")
        assert (await events.next("response.done"))["response"]["status"] == "completed"
        await ask_in_text(connection, "Use get_weather for Oslo")
        called = await events.next("response.function_call_arguments.done")
        await events.next("response.done")
        output = {"type": "function_call_output", "call_id": called["call_id"], "output": "ok"}
        await connection.conversation.item.create(item=output)
        await connection.response.create()
        await events.next("response.done")
    # the call span ends when the connection closes
    call = await asyncio.to_thread(receiver.wait_for, "voicerelay.call")

    spans = [s for s in receiver.spans if s["trace_id"] == call["trace_id"]]
    assert {s["trace_id"] for s in receiver.spans} == {call["trace_id"]}  # one leg, one trace
    assert set(receiver.paths) == {"/v1/traces"}
    assert call["service"]["service.name"] == "voicerelay-test"
    assert call["parent"] == "" and call["attributes"]["voicerelay.call_id"].startswith("ws_")
    assert call["attributes"]["voicerelay.end_reason"] == "hangup"
    by_id = {s["span_id"]: s for s in spans}
    turns = [s for s in spans if s["name"] == "voicerelay.turn"]
    assert len(turns) == 3  # the spoken question, the tool call, its answer
    assert all(t["parent"] == call["span_id"] for t in turns)
    assert all(call["start"] <= t["start"] <= t["end"] <= call["end"] for t in turns)
    children = [s for s in spans if s["name"] not in ("voicerelay.call", "voicerelay.turn")]
    for child in children:
        turn = by_id[child["parent"]]
        assert turn["name"] == "voicerelay.turn", child
        assert turn["start"] <= child["start"] <= child["end"] <= turn["end"], child

    def under(turn: dict[str, Any]) -> list[str]:
        return sorted(c["name"].split()[0] for c in children if c["parent"] == turn["span_id"])

    spoken, asked, answered = sorted(turns, key=lambda t: t["attributes"]["voicerelay.turn"])
    assert under(spoken) == ["chat", "voicerelay.stt", "voicerelay.tts"]
    assert "chat" in under(asked)
    assert under(answered) == ["chat", "execute_tool", "voicerelay.tts"]
    stt = next(c for c in children if c["name"] == "voicerelay.stt")
    assert stt["attributes"]["voicerelay.provider"] == "pocketsphinx"
    (tool,) = [c for c in children if c["name"] == "execute_tool get_weather"]
    assert tool["attributes"] == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get_weather",
        "gen_ai.tool.call.id": called["call_id"],
        "voicerelay.tool.side": "client",
    }
    for llm in [c for c in children if c["name"].startswith("chat ")]:
        attributes = llm["attributes"]
        model = attributes["gen_ai.request.model"]
        assert llm["name"] == f"chat {model}" and model
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "openai"
        assert attributes["gen_ai.usage.input_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] > 0


UNTRACED = """
import sys, threading, time
from pipeline.turns import TurnRecorder
from transceiver.realtime.call_recording import Untraced, recorder_for
from transceiver.realtime.call_tracing import call_trace

trace = call_trace(time.monotonic, time.time)
recorder = recorder_for(None, "sess_untraced", time.monotonic, time.time, trace)
recorder.start({}, {"stt": "pocketsphinx", "llm": "openai-llm/gpt-x", "tts": "piper"})
turn = TurnRecorder(1, llm_provider="openai-llm/gpt-x")
now = time.monotonic()
for moment in ("speech_started", "speech_stopped", "stt_final", "llm_first_token"):
    turn.mark(moment, now)
recorder.turn(turn.finish(interrupted=False), "resp_1", now)
recorder.end("hangup")
print(json.dumps({
    "untraced": isinstance(trace, Untraced),
    "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
    "threads": [t.name for t in threading.enumerate()],
}))
"""


def test_without_otel_variables_nothing_is_set_up() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + UNTRACED],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout)
    assert found == {"untraced": True, "sdk": [], "threads": ["MainThread"]}, done.stderr


CLIENT_TRACE_ID = os.urandom(16).hex()
CLIENT_SPAN_ID = os.urandom(8).hex()


async def test_the_offer_the_call_and_the_relays_route_are_one_traced_story(
    receiver: Receiver, server: FakeOpenAIServer, tmp_path: Path
) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    redis = RedisServer(tmp_path, "redis").start()
    stack = Stack(tmp_path, transceivers=1, workers=1, agent="pipeline")
    stack.transceivers[0].env.update({
        **redis_env(RedisConfig(url=redis.url)),
        "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url + "/v1",
        "PIPELINE_STT": "pocketsphinx", "PIPELINE_LLM": "openai", "PIPELINE_TTS": "openai",
        "OTEL_SERVICE_NAME": "voicerelay-test", **otel,
        "TRANSCEIVER_CPU_BUDGET_CORES": "0",  # admission by capacity alone: the host is busy
    })  # fmt: skip
    stack.relay.env.update(otel)
    client, intruder = RealtimeClient(), RealtimeClient()
    try:
        for process in [*stack.transceivers, stack.relay]:
            process.start()
        for process in [*stack.transceivers, stack.relay]:
            await process.ready(timeout_s=90)
        await stack.keyed()
        parent = {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
        async with httpx.AsyncClient(timeout=30) as http:
            created = await call(client, http, stack.base_url(0), parent)
            assert created.status_code == 201, created.text
            session_id = created.headers["X-Voicerelay-Session"]
            wrong = {TOKEN_HEADER: "not-the-token"}
            refused = await call(
                intruder, http, stack.base_url(0), wrong, {"session_id": session_id}
            )
            assert refused.status_code == 403, refused.text
            hung_up = await http.delete(stack.base_url(0) + created.headers["Location"])
            assert hung_up.status_code == 204
    finally:
        await client.close()
        await intruder.close()
        await stack.stop()
        redis.stop()
    call_span = await asyncio.to_thread(receiver.wait_for, "voicerelay.call")
    offer = receiver.wait_for("voicerelay.offer")
    route = receiver.wait_for("voicerelay.relay.route")
    call_id = created.headers["Location"].rsplit("/", 1)[1]

    assert (offer["trace_id"], offer["parent"]) == (CLIENT_TRACE_ID, CLIENT_SPAN_ID)
    assert offer["attributes"] == {
        "http.request.method": "POST",
        "url.path": "/v1/realtime/calls",
        "voicerelay.endpoint": "realtime",
        "http.response.status_code": 201,
        "voicerelay.call_id": call_id,
        "voicerelay.session_id": session_id,
    }
    steps = {s["name"]: s for s in receiver.spans if s["parent"] == offer["span_id"]}
    assert set(steps) == {"voicerelay.admission", "voicerelay.answer", "voicerelay.call"}
    assert steps["voicerelay.admission"]["attributes"] == {"voicerelay.verdict": "admitted"}
    for step in steps.values():
        assert step["trace_id"] == CLIENT_TRACE_ID and offer["start"] <= step["start"]
    assert call_span["span_id"] == steps["voicerelay.call"]["span_id"]
    assert call_span["attributes"]["voicerelay.call_id"] == call_id
    phases = call_span["events"]
    assert phases.index("voicerelay.ice.connected") < phases.index("voicerelay.dtls.connected")

    assert route["service"]["service.name"] == "voicerelay-relay"
    assert route["trace_id"] != CLIENT_TRACE_ID  # the relay knows no call: its own trace
    assert route["attributes"]["voicerelay.verdict"] == "learned"
    assert route["attributes"]["voicerelay.transceiver"] == text(stack.links[0])
    assert route["attributes"]["voicerelay.relay.worker"] == 0

    (attempt,) = [s for s in receiver.spans if s["attributes"].get("error.type")]
    assert attempt["name"] == "voicerelay.offer" and attempt["trace_id"] != CLIENT_TRACE_ID
    assert attempt["attributes"]["http.response.status_code"] == 403 and not attempt["error"]
    claims = [s for s in receiver.spans if s["parent"] == attempt["span_id"]]
    assert [(s["name"], s["error"]) for s in claims] == [("voicerelay.admission", False),
                                                         ("voicerelay.resume", True)]  # fmt: skip
    assert claims[1]["attributes"] == {"voicerelay.session_id": session_id}


UNTRACED_RELAY = """
import json, os, sys, threading
from relay.tracing import route_tracer
import relay.worker, relay.supervisor
tracing = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
print(json.dumps({
    "tracer": route_tracer(os.environ, 0) is None,
    "sdk": sorted(m for m in sys.modules if m.startswith(tracing)),
    "threads": [t.name for t in threading.enumerate()],
}))
"""


def test_without_otel_variables_the_relay_loads_no_tracing_sdk() -> None:
    """(redis-py 8 imports OpenTelemetry's API and metrics SDK on its own when they are
    installed; the trace SDK and the exporter are ours to load, and stay out.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", UNTRACED_RELAY],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout)
    assert found == {"tracer": True, "sdk": [], "threads": ["MainThread"]}, done.stderr
