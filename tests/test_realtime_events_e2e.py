"""The ``oai-events`` protocol against a real transceiver process running the offline pipeline:
bad input gets ``error`` events naming the problem and the session goes on; text turns, cancel,
buffer commands and item commands answer in OpenAI's GA shapes. The client stays silent.

Over WebRTC a response is done when its generation ends and its audio plays on, as OpenAI's:
``response.done`` first, ``output_audio_buffer.stopped`` when it has played ("emitted after the
full response data has been sent to the client (response.done)", OpenAI's reference); a
``response.create`` meanwhile starts the next response, and ``output_audio_buffer.clear`` cuts
the answers to what was played. A played answer's item is truncated as over WebSocket, and
retrieved with its audio as played (PCM16 at 24 kHz), cut to what is left; audio more than a
data channel message carries is refused by name (the item retrieved without it).
"""

from __future__ import annotations

import array
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deploy.processes import metric_values
from loadtest.realtime_client import (
    PipelineTransceiver,
    RealtimeClient,
    connected,
    error_for,
    pipeline_transceiver,
    user_text,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PipelineTransceiver]:
    async with pipeline_transceiver(tmp_path_factory.mktemp("events")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: PipelineTransceiver) -> AsyncIterator[RealtimeClient]:
    async with connected(server.base_url) as peer:  # silent microphone: offers must carry audio
        yield peer


async def test_bad_input_gets_named_errors_and_the_session_goes_on(
    server: PipelineTransceiver, client: RealtimeClient
) -> None:
    invalid = await error_for(client, "{not json")
    assert invalid["code"] == "invalid_json" and invalid["type"] == "invalid_request_error"
    unknown = await error_for(client, {"type": "session.explode", "event_id": "evt_1"})
    assert (unknown["code"], unknown["param"], unknown["event_id"]) == (
        "invalid_value", "type", "evt_1"
    )  # fmt: skip
    wrong = await error_for(client, {"type": "session.update", "session": {"instructions": 5}})
    assert (wrong["code"], wrong["param"]) == ("invalid_type", "session.instructions")
    knob = {"audio": {"input": {"turn_detection": {"silence_duration_ms": "long"}}}}
    bad_knob = await error_for(client, {"type": "session.update", "session": knob})
    assert bad_knob["param"] == "session.audio.input.turn_detection.silence_duration_ms"
    cancel = await error_for(client, {"type": "response.cancel"})
    assert cancel["code"] == "response_cancel_not_active"
    output = {"type": "function_call_output", "call_id": "call_nope", "output": "{}"}
    orphan = await error_for(client, {"type": "conversation.item.create", "item": output})
    assert (orphan["code"], orphan["param"]) == ("invalid_value", "item.call_id")
    commit = await error_for(client, {"type": "input_audio_buffer.commit"})
    assert commit["code"] == "input_audio_buffer_commit_empty"

    start = len(client.events)
    client.send(user_text("Tell me about water."))
    added = await client.wait_for("conversation.item.added", after=start)
    assert added["item"]["content"] == [{"type": "input_text", "text": "Tell me about water."}]
    client.send({"type": "response.create"})
    done = await client.wait_for("response.done", after=start, timeout_s=30)
    (item,) = done["response"]["output"]
    assert item["content"][0]["transcript"].startswith("Water covers")
    async with httpx.AsyncClient(timeout=10) as http:
        exposition = (await http.get(server.base_url + "/metrics")).text
    counted = metric_values(exposition, "transceiver_realtime_events_total")
    assert counted.get("client", 0) or any(counted.values()), exposition
    assert 'type="invalid"' in exposition and 'direction="server",type="error"' in exposition


async def test_a_text_turn_in_ga_order_then_cancel_and_item_commands(
    client: RealtimeClient,
) -> None:
    start = len(client.events)
    client.send(user_text("Tell me about the moon."))
    client.send({"type": "response.create", "event_id": "evt_go"})
    created = await client.wait_for("response.created", after=start)
    busy = await error_for(client, {"type": "response.create"})
    assert busy["code"] == "conversation_already_has_active_response"
    await client.wait_for("response.output_audio_transcript.delta", after=start)
    client.send({"type": "response.cancel", "response_id": created["response"]["id"]})
    done = await client.wait_for("response.done", after=start, timeout_s=30)
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"]["reason"] == "client_cancelled"
    metrics = await client.wait_for("voicerelay.turn.metrics", after=start)
    assert metrics["speech_stopped_ms"] is None  # a text turn: no speech to measure from
    types = client.types(start)
    order = ["conversation.item.added", "conversation.item.done", "response.created",
             "response.output_item.added", "response.content_part.added",
             "response.output_audio_transcript.delta", "response.output_audio_transcript.done",
             "response.content_part.done", "response.output_item.done", "response.done",
             "voicerelay.turn.metrics"]  # fmt: skip
    firsts = [types.index(kind) for kind in order]
    assert firsts == sorted(firsts), types

    user_item = client.events[start + types.index("conversation.item.added")]["item"]["id"]
    client.send({"type": "conversation.item.retrieve", "item_id": user_item})
    retrieved = await client.wait_for("conversation.item.retrieved", after=start)
    assert retrieved["item"]["content"][0]["text"] == "Tell me about the moon."
    client.send({"type": "conversation.item.delete", "item_id": user_item})
    assert (await client.wait_for("conversation.item.deleted", after=start))["item_id"] == user_item
    gone = await error_for(client, {"type": "conversation.item.retrieve", "item_id": user_item})
    assert gone["code"] == "item_not_found"
    client.send({"type": "input_audio_buffer.clear"})
    await client.wait_for("input_audio_buffer.cleared", after=start)
    client.send({"type": "output_audio_buffer.clear"})
    await client.wait_for("output_audio_buffer.cleared", after=start)
    json.dumps(client.events)  # every event was plain JSON


async def test_a_response_is_done_before_its_audio_has_played_and_the_next_may_start(
    client: RealtimeClient,
) -> None:
    start = len(client.events)
    client.send(user_text("Tell me about the moon."))
    client.send({"type": "response.create"})
    first = await client.wait_for("response.done", after=start, timeout_s=30)
    body = first["response"]
    assert body["status"] == "completed", body
    full = body["output"][0]["content"][0]["transcript"]
    item_id = body["output"][0]["id"]
    assert full.startswith("The moon"), full
    client.send(user_text("Tell me about water."))
    client.send({"type": "response.create"})  # while the moon answer plays: OpenAI starts it
    second = await client.wait_for("response.created", after=client.index(first))
    second_id = second["response"]["id"]
    assert "error" not in client.types(client.index(first)), client.events[client.index(first) :]
    types = client.types(start)
    assert "output_audio_buffer.started" in types[: types.index("response.done")]
    assert "output_audio_buffer.stopped" not in client.types(start)[: client.index(second) - start]
    done = await client.wait_for(
        "response.done", lambda e: e["response"]["id"] == second_id, timeout_s=30
    )
    assert done["response"]["status"] == "completed", done

    mark = len(client.events)
    client.send({"type": "output_audio_buffer.clear"})
    cleared = await client.wait_for("output_audio_buffer.cleared", after=mark)
    assert cleared["response_id"] == body["id"]
    truncated = await client.wait_for(
        "conversation.item.truncated", lambda e: e["item_id"] == item_id, after=mark
    )
    assert truncated["audio_end_ms"] > 0
    queued = await client.wait_for(  # the water answer had not begun to play
        "output_audio_buffer.cleared", lambda e: e["response_id"] == second_id, after=mark
    )
    client.send({"type": "conversation.item.retrieve", "item_id": item_id})
    retrieved = await client.wait_for("conversation.item.retrieved", after=client.index(queued))
    cut = retrieved["item"]["content"][0]["transcript"]
    assert full.startswith(cut) and len(cut) < len(full), (cut, full)
    assert "output_audio_buffer.stopped" not in client.types(start)


async def test_a_cancel_and_a_clear_at_once_cut_the_answer_once(client: RealtimeClient) -> None:
    """agents-js's ``interrupt()`` sends ``response.cancel`` and ``output_audio_buffer.clear``
    together: one ``output_audio_buffer.cleared`` and one ``conversation.item.truncated`` for
    the answer, whether it was still generated (the cancel cuts it) or done and playing."""
    start = len(client.events)
    client.send(user_text("Tell me about the moon."))
    client.send({"type": "response.create"})
    response_id = (await client.wait_for("response.created", after=start))["response"]["id"]
    await client.wait_for("output_audio_buffer.started", after=start)
    client.send({"type": "response.cancel"})
    client.send({"type": "output_audio_buffer.clear"})
    done = await client.wait_for(
        "response.done", lambda e: e["response"]["id"] == response_id, after=start
    )
    item_id = done["response"]["output"][0]["id"]
    await client.wait_for("output_audio_buffer.cleared", after=start)
    mark = len(client.events)
    client.send(user_text("Tell me about water."))
    client.send({"type": "response.create"})
    await client.wait_for("response.created", after=mark)  # after anything the cut made
    cuts = [
        e["type"]
        for e in client.events[start:]
        if e.get("response_id") == response_id or e.get("item_id") == item_id
    ]
    assert cuts.count("output_audio_buffer.cleared") == 1, cuts
    assert cuts.count("conversation.item.truncated") == 1, cuts


async def test_a_played_answer_is_truncated_to_the_words_heard_over_webrtc(
    client: RealtimeClient,
) -> None:
    start = len(client.events)
    client.send(user_text("Tell me about water."))
    client.send({"type": "response.create"})
    done = await client.wait_for("response.done", after=start, timeout_s=30)
    (item,) = done["response"]["output"]
    response_id, full = done["response"]["id"], item["content"][0]["transcript"]
    await client.wait_for(
        "output_audio_buffer.stopped", lambda e: e["response_id"] == response_id, timeout_s=60
    )
    assert client.types(start).index("response.done") < client.types(start).index(
        "output_audio_buffer.stopped"
    )
    past = {"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0}
    too_far = await error_for(client, {**past, "audio_end_ms": 600_000})
    assert (too_far["code"], too_far["param"]) == ("invalid_value", "audio_end_ms")
    audio_ms = int(too_far["message"].split("the item's ")[1].split(" ms")[0])
    assert audio_ms > 4500, too_far  # more audio than one data channel message carries
    *errors, whole = await _retrieved(client, item["id"])
    assert [e["error"]["code"] for e in errors] == ["item_audio_too_large"], errors
    assert "audio" not in whole["item"]["content"][0], whole  # (base64: 256 KiB is ~4 s)
    mark = len(client.events)
    client.send({**past, "audio_end_ms": 1500})
    await client.wait_for("conversation.item.truncated", after=mark)
    *_, retrieved = await _retrieved(client, item["id"])
    cut = retrieved["item"]["content"][0]["transcript"]
    assert cut and full.startswith(cut) and len(cut) < len(full), (cut, full)
    left = base64.b64decode(retrieved["item"]["content"][0]["audio"])
    assert len(left) == 1500 * 48, len(left)  # what is left of it, PCM16 at 24 kHz
    assert max(map(abs, array.array("h", left))) > 1000  # speech, not silence


async def _retrieved(client: RealtimeClient, item_id: str) -> list[dict[str, Any]]:
    """The events a retrieve of ``item_id`` gets, up to its ``conversation.item.retrieved``."""
    mark = len(client.events)
    client.send({"type": "conversation.item.retrieve", "item_id": item_id})
    await client.wait_for("conversation.item.retrieved", after=mark)
    return client.events[mark:]
