"""Pathological client events on a real data channel to a real transceiver process: deeply
nested JSON and items or sessions larger than the session store keeps each get their ``error``
event when they arrive, the session keeps answering, and nothing reaches aiortc's SCTP path
(the process logs no traceback).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from loadtest.realtime_client import (
    PipelineTransceiver,
    RealtimeClient,
    connected,
    error_for,
    pipeline_transceiver,
    user_text,
)
from transceiver.store.keys import MAX_CONFIG_BYTES, MAX_ITEM_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PipelineTransceiver]:
    async with pipeline_transceiver(tmp_path_factory.mktemp("bad_input")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: PipelineTransceiver) -> AsyncIterator[RealtimeClient]:
    async with connected(server.base_url) as peer:
        yield peer


async def still_answers(client: RealtimeClient) -> None:
    start = len(client.events)
    client.send({"type": "session.update", "session": {"instructions": "Be brief."}})
    updated = await client.wait_for("session.updated", after=start)
    assert updated["session"]["instructions"] == "Be brief."


@pytest.mark.parametrize(
    "data",
    [
        "[" * 1000,
        '{"type": "session.update", "event_id": "evt_deep", "session": ' + "[" * 100_000,
        '{"type": "session.update", "session": {"tools": [{"name": "t", "parameters": '
        + '{"a":' * 200
        + "1"
        + "}" * 200
        + "}]}}",
    ],
)
async def test_deeply_nested_events_get_an_error_and_the_session_goes_on(
    server: PipelineTransceiver, client: RealtimeClient, data: str
) -> None:
    error = await error_for(client, data)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert "nested deeper than 64 levels" in error["message"]
    await still_answers(client)
    log = server.process.log_path.read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-4000:]


async def test_an_item_the_store_cannot_keep_is_refused_when_it_arrives(
    client: RealtimeClient,
) -> None:
    error = await error_for(client, user_text("x" * (MAX_ITEM_BYTES + 1)))
    assert (error["code"], error["param"]) == ("item_too_large", "item.content")
    assert f"over the {MAX_ITEM_BYTES}-byte limit" in error["message"]
    start = len(client.events)
    near_limit = "y" * (MAX_ITEM_BYTES - 200)
    client.send(user_text(near_limit))
    added = await client.wait_for("conversation.item.added", after=start)
    assert added["item"]["content"][0]["text"] == near_limit
    assert "error" not in client.types(start)


async def test_a_session_the_store_cannot_keep_is_refused_and_the_old_one_stays(
    client: RealtimeClient,
) -> None:
    start = len(client.events)
    client.send({"type": "session.update", "session": {"instructions": "Keep me."}})
    await client.wait_for("session.updated", after=start)
    huge = {"type": "session.update", "session": {"instructions": "z" * MAX_CONFIG_BYTES}}
    error = await error_for(client, huge)
    assert (error["code"], error["param"]) == ("session_too_large", "session")
    start = len(client.events)
    client.send({"type": "conversation.item.retrieve", "item_id": "nope"})
    await client.wait_for("error", after=start)
    client.send({"type": "session.update", "session": {}})
    updated = await client.wait_for("session.updated", after=start)
    assert updated["session"]["instructions"] == "Keep me."
    assert len(json.dumps(updated["session"])) < MAX_CONFIG_BYTES
