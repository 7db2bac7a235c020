"""The client's own heard time (``voicerelay.turn.heard``) and each turn's retries and fallbacks
in the call record: the event's strict parser (also at the data channel's size limit), and the
recorder's turns as a real redis-server stores them, a report before its turn and one after."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from sized_inputs import around, mutated, padded_json
from test_call_records_store import (  # noqa: F401 (the fixtures)
    SESSION,
    STAGES,
    Clocks,
    recorder,
    redis_server,
    store,
    store_all,
    talk,
)

from pipeline import events as ev
from pipeline.resilience import Detour
from transceiver.realtime.client_events import (
    MAX_EVENT_BYTES,
    EventError,
    TurnHeard,
    parse_client_event,
)
from transceiver.store.call_log import CallRecordStore

HEARD = "voicerelay.turn.heard"


def heard_event(size: int) -> bytes:
    """A valid voicerelay.turn.heard of exactly ``size`` bytes (its event_id fills it)."""
    prefix = f'{{"type": "{HEARD}", "response_id": "resp_1", "after_output_started_ms": 95.5, '
    return padded_json(prefix + '"event_id": ', "}", size)


def refusal(event: dict[str, object]) -> tuple[str, str | None]:
    with pytest.raises(EventError) as info:
        parse_client_event(json.dumps({"type": HEARD, **event}))
    return info.value.code, info.value.param


def test_the_heard_event_parses_strictly() -> None:
    event = {"type": HEARD, "response_id": "resp_1", "after_speech_stopped_ms": 812.25}
    assert parse_client_event(json.dumps(event)) == TurnHeard(None, "resp_1", 812.25, None)
    both = {**event, "event_id": "e1", "after_output_started_ms": 0}
    assert parse_client_event(json.dumps(both)) == TurnHeard("e1", "resp_1", 812.25, 0.0)
    assert refusal({"after_output_started_ms": 1}) == ("missing_required_parameter", "response_id")
    assert refusal({"response_id": "resp_1"}) == (
        "missing_required_parameter",
        "after_output_started_ms",
    )
    assert refusal({"response_id": "r 1", "after_output_started_ms": 1}) == (
        "invalid_value",
        "response_id",
    )
    assert refusal({"response_id": "r" * 65, "after_output_started_ms": 1})[1] == "response_id"
    for bad in (-1, 600_001, True, "12", None):
        got = refusal({"response_id": "resp_1", "after_speech_stopped_ms": bad})
        assert got[1] in ("after_speech_stopped_ms", "after_output_started_ms"), (bad, got)
    assert refusal({"response_id": "resp_1", "after_output_started_ms": 1, "at": 2}) == (
        "unknown_parameter",
        "at",
    )


def test_a_heard_event_of_exactly_the_limit_parses_and_one_byte_more_is_refused() -> None:
    event = parse_client_event(heard_event(MAX_EVENT_BYTES))
    assert isinstance(event, TurnHeard) and event.after_output_started_ms == 95.5
    with pytest.raises(EventError) as info:
        parse_client_event(heard_event(MAX_EVENT_BYTES + 1))
    assert info.value.code == "event_too_large"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(around(MAX_EVENT_BYTES).flatmap(lambda size: mutated(heard_event(size))))
def test_mutated_heard_events_at_the_size_limit_parse_or_get_their_error(data: bytes) -> None:
    try:
        parse_client_event(data)
    except EventError as exc:
        assert exc.code and exc.message
        assert (exc.code == "event_too_large") == (len(data) > MAX_EVENT_BYTES)
    else:
        assert len(data) <= MAX_EVENT_BYTES


async def test_heard_times_and_detours_land_in_their_turns_early_or_late(
    store: CallRecordStore,  # noqa: F811
) -> None:
    clocks = Clocks()
    made = recorder(clocks, "sess_heard", "rtc_heard")
    made.client_response_id = {"r1": "resp_A"}.get  # the translator's, while it knows r1
    made.start(SESSION, STAGES)
    made.observe(ev.ResponseStarted("r1", 1))
    made.heard(TurnHeard(None, "resp_A", 900.0, 230.0))  # before its turn is stored
    with pytest.raises(EventError, match="reported already"):
        made.heard(TurnHeard(None, "resp_A", 901.0, None))
    retry = Detour("llm", "retry", "openai-llm/m", "openai-llm/m", "injected 503", 2, True)
    fallback = Detour("tts", "fallback", "openai-tts/t", "piper", "injected 400", 1, True)
    made.detour(1, retry)
    made.detour(1, fallback)
    made.detour(7, retry)  # another turn's
    talk(clocks, made, 1)
    made.client_response_id = {"r1": "resp_B"}.get  # r1 of the next turn (engine ids recur)
    talk(clocks, made, 2)
    with pytest.raises(EventError, match="no recent response 'resp_C'"):
        made.heard(TurnHeard(None, "resp_C", None, 10.0))
    await store_all(store, clocks)
    made.heard(TurnHeard(None, "resp_B", None, 120.5))  # after its turn was stored
    with pytest.raises(EventError, match="reported already"):
        made.heard(TurnHeard(None, "resp_B", None, 120.5))
    await store_all(store, clocks)

    record = await store.get("sess_heard")
    assert record is not None
    first, second = record["turns"]
    assert first["heard"] == {
        "after_origin_ms": 900.0,  # a spoken turn: the client's own time after speech stopped
        "after_speech_stopped_ms": 900.0,
        "after_output_started_ms": 230.0,
    }
    assert first["detours"] == [retry.to_json(), fallback.to_json()]
    assert retry.to_json() == {"stage": "llm", "kind": "retry", "from": "openai-llm/m",
                               "to": "openai-llm/m", "reason": "injected 503", "attempts": 2,
                               "served": True}  # fmt: skip
    first_out = second["timeline_ms"]["first_frame_out"]
    assert second["heard"] == {
        "after_origin_ms": round(first_out + 120.5, 1),  # first frame out + the playout delay
        "after_speech_stopped_ms": None,
        "after_output_started_ms": 120.5,
    }
    assert second["detours"] == []
