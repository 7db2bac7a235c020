"""Call records against a real redis-server, in process: the recorder's turns, legs and config
versions as stored, read back whole or listed with filters and a cursor; retention and bounds;
the writer's bounded queue; and what a turn costs in Redis (``MEMORY USAGE``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from deploy.redis_server import RedisServer, redis_server_binary
from deploy.waiting import eventually
from pipeline import events as ev
from pipeline.pricing import DEFAULT_PRICES, PriceTable
from pipeline.providers import Message, ToolCall, ToolResult
from pipeline.turns import DecisionTiming, TurnRecord, TurnRecorder
from relay.wire.redis_config import RedisConfig
from transceiver.config import ConfigError, TransceiverConfig
from transceiver.realtime.call_recording import CallRecorder, Untraced, end_reason
from transceiver.store.call_log import CallRecordLog, CallRecordStore
from transceiver.store.call_records import (
    AppendTurn,
    CallRecordKeys,
    CallRecordPolicy,
    RecordWrite,
    index_key,
)
from transceiver.store.connection import open_redis

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")
OPENAI = (
    "openai-stt/gpt-4o-mini-transcribe",
    "openai-llm/gpt-4o-mini",
    "openai-tts/gpt-4o-mini-tts",
)
SESSION = {
    "model": "voicerelay-local",
    "instructions": "Answer briefly.",
    "tools": [],
    "tool_choice": "auto",
    "output_modalities": ["audio"],
    "audio": {
        "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
        "output": {"voice": "joe"},
    },
}
STAGES = dict(zip(("stt", "llm", "tts"), OPENAI, strict=True))
USER = "Could you tell me what time it is in Paris right now, and whether it is raining?"
ANSWER = (
    "It is a quarter past three in the afternoon in Paris. Light rain is expected until the "
    "evening, so take an umbrella if you go out; it should clear up by tomorrow morning."
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[CallRecordStore]:
    connection = open_redis(RedisConfig(url=redis_server.url))
    policy = CallRecordPolicy(ttl_s=3600, max_turns=50)
    try:
        yield CallRecordStore(connection.client, f"t{uuid.uuid4().hex[:8]}", policy)
    finally:
        await connection.aclose()


@dataclass
class Clocks:
    loop_s: float = 100.0
    wall_s: float = 1_760_000_000.0
    writes: list[RecordWrite] = field(default_factory=list)

    def submit(self, write: RecordWrite) -> bool:
        self.writes.append(write)
        return True

    def advance(self, seconds: float) -> None:
        self.loop_s += seconds
        self.wall_s += seconds


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Traced(Untraced):
    """A leg's trace as the recorder sees it: the trace id its call span began."""

    def begin(self, session_id: str, call_id: str, transceiver: str) -> str:
        return TRACE_ID


def recorder(
    clocks: Clocks, session_id: str, call_id: str, transcripts: str = "full"
) -> CallRecorder:
    policy = CallRecordPolicy(transcripts=transcripts)
    made = CallRecorder(
        clocks, session_id, "host-a1", policy,
        lambda: clocks.loop_s, lambda: clocks.wall_s, PriceTable(DEFAULT_PRICES),
    )  # fmt: skip
    made.began(call_id)
    return made


def turn_record(turn: int, at_s: float, *, interrupted: bool = False) -> TurnRecord:
    made = TurnRecorder(turn, *OPENAI, transcript=USER, heard_text=ANSWER)
    made.input_audio_s, made.llm_input_tokens, made.llm_output_tokens = 4.2, 812, 64
    made.tool_calls, made.tts_chars, made.output_audio_s = 1, len(ANSWER), 9.6
    moments = {"speech_started": -4.2, "speech_stopped": 0.0, "stt_final": 0.181,
               "llm_first_token": 0.463, "first_tts_request": 0.52, "first_tts_audio": 0.641,
               "first_frame_out": 0.66, "llm_last_token": 0.93, "response_done": 10.3}  # fmt: skip
    for moment, offset in moments.items():
        made.mark(moment, at_s + offset)
    made.provider_busy(at_s, at_s + 0.181)
    made.provider_busy(at_s + 0.2, at_s + 0.641)
    return made.finish(interrupted=interrupted, estimate_cost=lambda _: 0.00123)


def talk(clocks: Clocks, made: CallRecorder, turn: int, *, barge_in: bool = False) -> None:
    """One spoken turn with one server tool call (and a barge-in when asked)."""
    call = ToolCall(f"call_{turn}", "get_current_time", '{"city":"Paris"}')
    made.observe(ev.ToolCallStarted("r1", call))
    clocks.advance(0.012)
    made.observe(ev.ToolCallCompleted("r1", ToolResult(call, '{"time":"15:15"}', True)))
    if barge_in:
        made.observe(ev.OutputCleared("r1", 2400))
    clocks.advance(0.3)
    record = turn_record(turn, clocks.loop_s, interrupted=barge_in)
    clocks.advance(10.5)
    made.turn(record, "r1", clocks.loop_s - 10.5 + 0.672, [Message("user", USER)])


async def store_all(store: CallRecordStore, clocks: Clocks) -> None:
    for write in clocks.writes:
        await store.apply(write)
    clocks.writes.clear()


async def test_a_call_resumed_elsewhere_is_one_record_with_both_legs_and_every_turn(
    store: CallRecordStore,
) -> None:
    clocks = Clocks()
    first = recorder(clocks, "sess_one", "rtc_first")
    first.start(SESSION, STAGES)
    talk(clocks, first, 1)
    talk(clocks, first, 2, barge_in=True)
    await store_all(store, clocks)
    # The transceiver dies (no end); the client resumes on another one, with a new instruction.
    second = recorder(clocks, "sess_one", "rtc_second")
    second.transceiver = "host-b2"
    second.trace = Traced()  # the second transceiver traces its calls (OTEL_*)
    second.start(SESSION, STAGES)
    second.configured({**SESSION, "instructions": "Answer in French."}, STAGES)
    talk(clocks, second, 1)
    second.end(end_reason("hangup", handed_over=False))
    await store_all(store, clocks)

    record = await store.get("sess_one")
    assert record is not None
    assert record["call_ids"] == ["rtc_first", "rtc_second"]
    assert record["transceivers"] == ["host-a1", "host-b2"]
    assert [leg["end_reason"] for leg in record["legs"]] == ["resumed_elsewhere", "hangup"]
    assert record["legs"][1]["resumed_from"] == "rtc_first"
    assert [leg["trace_id"] for leg in record["legs"]] == [None, TRACE_ID]
    assert record["resumed_from"] == "rtc_first"
    assert (record["status"], record["end_reason"]) == ("ended", "hangup")
    assert [t["index"] for t in record["turns"]] == [1, 2, 3]
    assert [t["call_id"] for t in record["turns"]] == ["rtc_first", "rtc_first", "rtc_second"]
    turn = record["turns"][1]
    assert (turn["user"], turn["assistant"]) == (USER, ANSWER)
    assert turn["interrupted"]["by"] == "user" and turn["interrupted"]["played_ms"] == 2400
    assert record["turns"][0]["interrupted"] is None
    assert turn["tools"] == [{"name": "get_current_time", "call_id": "call_2", "side": "server",
                              "ms": 12.0, "ok": True}]  # fmt: skip
    assert turn["latency_ms"]["stt"] == 181.0 and turn["latency_ms"]["vad_silence"] == 500
    assert turn["latency_ms"]["voice_to_voice"] == 672.0
    assert turn["timeline_ms"]["first_tts_audio"] == 641.0
    assert turn["stages"]["llm"] == {"provider": "openai-llm", "model": "gpt-4o-mini"}
    assert turn["usage"]["input_tokens"] == 812
    assert turn["cost_usd"]["total"] == 0.00123 and turn["cost_usd"]["llm"] > 0
    assert record["max_latency_ms"] == 672.0
    assert (record["tool_calls"], record["interruptions"]) == (3, 1)
    assert record["cost_usd"] == pytest.approx(3 * 0.00123)
    versions = record["config_versions"]
    assert [v["from_turn"] for v in versions] == [1, 3]  # the resume kept the first one
    assert versions[1]["config"]["instructions"] == "Answer in French."
    assert versions[0]["config"]["stages"]["tts"] == OPENAI[2]
    assert await store.get("rtc_second") == record  # a call id finds its record too


async def test_a_retried_write_changes_nothing_and_the_turns_are_bounded(
    store: CallRecordStore,
) -> None:
    clocks = Clocks()
    made = recorder(clocks, "sess_two", "rtc_two")
    made.start(SESSION, STAGES)
    for turn in range(1, 56):
        talk(clocks, made, turn)
    writes = list(clocks.writes)
    await store_all(store, clocks)
    for write in writes[:5]:  # the writer retried these after a lost reply
        await store.apply(write)
    record = await store.get("sess_two")
    assert record is not None
    assert (record["turn_count"], record["turns_trimmed"], len(record["turns"])) == (55, 5, 50)
    assert record["turns"][0]["index"] == 6 and record["status"] == "in_progress"
    assert len(record["legs"]) == 1 and len(record["config_versions"]) == 1


def test_transcripts_can_be_redacted_or_left_out_and_a_text_turn_has_its_words() -> None:
    said = "Call me at 555 123 4567 or mail ana.b@example.org"
    record = replace(turn_record(1, 100.0), transcript=said)
    turns = {}
    for mode in ("redacted", "off"):
        clocks = Clocks()
        made = recorder(clocks, "sess_r", "rtc_r", transcripts=mode)
        made.start(SESSION, STAGES)
        made.turn(record, "r1", None)
        turns[mode] = next(w.turn for w in clocks.writes if isinstance(w, AppendTurn))
    assert turns["redacted"]["user"] == "Call me at [number] or mail [email]"
    assert turns["redacted"]["assistant"] == ANSWER
    assert turns["off"]["user"] is None and turns["off"]["assistant"] is None
    assert turns["off"]["user_chars"] == len(said)

    clocks = Clocks()
    made = recorder(clocks, "sess_t", "rtc_t")
    made.start(SESSION, STAGES)
    history = [Message("user", "Hello there."), Message("assistant", "Hi.")]
    typed = replace(record, transcript="")
    made.turn(typed, "r1", None, history)
    made.turn(typed, "r2", None, history)  # a response.create with nothing new said
    said_in = [w.turn["user"] for w in clocks.writes if isinstance(w, AppendTurn)]
    assert said_in == ["Hello there.", ""]


async def test_the_list_filters_by_time_end_reason_and_latency_and_pages_with_a_cursor(
    store: CallRecordStore,
) -> None:
    clocks = Clocks()
    for number in range(7):
        made = recorder(clocks, f"sess_{number}", f"rtc_{number}")
        made.start(SESSION, STAGES)
        if number % 2:
            talk(clocks, made, 1)  # voice to voice 672 ms
        made.end("hangup" if number < 5 else "error")
        clocks.advance(60)
        await store_all(store, clocks)

    page = await store.page(limit=3)
    assert [r["id"] for r in page.data] == ["sess_6", "sess_5", "sess_4"]
    assert page.has_more and page.next_cursor == "sess_4"
    rest = await store.page(limit=3, after=page.next_cursor)
    assert [r["id"] for r in rest.data] == ["sess_3", "sess_2", "sess_1"]
    last = await store.page(limit=3, after=rest.next_cursor)
    assert ([r["id"] for r in last.data], last.has_more, last.next_cursor) == (
        ["sess_0"],
        False,
        None,
    )
    assert "turns" not in page.data[0]

    errors = await store.page(end_reason="error")
    assert [r["id"] for r in errors.data] == ["sess_6", "sess_5"]
    slow = await store.page(min_latency_ms=600)
    assert [r["id"] for r in slow.data] == ["sess_5", "sess_3", "sess_1"]
    assert (await store.page(min_latency_ms=700)).data == []
    first_started = 1_760_000_000_000
    window = await store.page(since_ms=first_started + 60_000, until_ms=first_started + 200_000)
    assert [r["id"] for r in window.data] == ["sess_3", "sess_2", "sess_1"]
    exported = [r["id"] async for r in store.export()]
    assert exported == [f"sess_{n}" for n in range(7)]


async def test_every_key_expires_with_the_retention_and_the_list_forgets_expired_records(
    redis_server: RedisServer,
) -> None:
    connection = open_redis(RedisConfig(url=redis_server.url))
    prefix = "retention"
    try:
        store = CallRecordStore(connection.client, prefix, CallRecordPolicy(ttl_s=1))
        clocks = Clocks()
        made = recorder(clocks, "sess_ttl", "rtc_ttl")
        made.start(SESSION, STAGES)
        talk(clocks, made, 1)
        await store_all(store, clocks)
        redis = connection.client
        keys = [*CallRecordKeys.of(prefix, "sess_ttl").all(), index_key(prefix)]
        keys += [k.decode() for k in await redis.keys(f"{prefix}:call*:*") if b"{" not in k]
        assert len(keys) == 5  # meta, turns, index, config, alias
        for key in keys:
            assert 0 < await redis.pttl(key) <= 1000, key

        async def forgotten() -> bool:
            return (await store.page()).data == [] and not await redis.exists(*keys)

        await eventually(forgotten, 10, "the record to expire")
    finally:
        await connection.aclose()


def ended_by(detection: dict[str, object] | None, record: TurnRecord) -> object:
    """The ``end_of_turn`` a recorder configured with ``detection`` writes for ``record``."""
    clocks = Clocks()
    made = recorder(clocks, "sess_end", "rtc_end")
    audio = {**SESSION["audio"], "input": {"turn_detection": detection}}  # type: ignore[dict-item]
    made.start({**SESSION, "audio": audio}, STAGES)
    made.turn(record, "r1", None, [Message("user", USER)])
    (turn,) = [w.turn for w in clocks.writes if isinstance(w, AppendTurn)]
    return turn["end_of_turn"]


def test_a_turn_says_what_ended_it() -> None:
    """The silence window (server_vad, or semantic_vad's when the model said not yet), the
    end-of-turn model (its probability, the pause it ended), the client's commit; nothing for a
    turn without speech."""
    spoken = turn_record(1, 100.0)
    server = {"type": "server_vad", "silence_duration_ms": 500}
    assert ended_by(server, spoken) == {"kind": "server_vad", "silence_ms": 500}
    semantic = {"type": "semantic_vad", "silence_duration_ms": 1200}
    decided = DecisionTiming(1.0, 9.0, 40.0, 2, 0.93456, True)
    by_model = replace(spoken, decision=decided, last_voiced_s=99.7)
    assert ended_by(semantic, by_model) == {
        "kind": "semantic_vad", "silence_ms": 300.0, "model_probability": 0.935,
    }  # fmt: skip
    not_yet = replace(by_model, decision=replace(decided, probability=0.2, complete=False))
    assert ended_by(semantic, not_yet) == {
        "kind": "semantic_vad_timeout", "silence_ms": 300.0, "model_probability": 0.2,
    }  # fmt: skip
    assert ended_by(semantic, spoken)["kind"] == "semantic_vad_timeout"  # type: ignore[index]
    assert ended_by(None, spoken) == {"kind": "commit", "silence_ms": None}
    typed = replace(spoken, speech_started_s=None, speech_stopped_s=None)
    assert ended_by(server, typed) is None


async def test_a_turn_costs_at_most_2_kb_in_redis(store: CallRecordStore) -> None:
    clocks = Clocks()
    made = recorder(clocks, "sess_size", "rtc_size")
    made.start(SESSION, STAGES)
    for turn in range(1, 41):
        talk(clocks, made, turn, barge_in=turn % 4 == 0)
    await store_all(store, clocks)
    keys = CallRecordKeys.of(store._prefix, "sess_size")
    redis = store._redis
    used = sum([await redis.memory_usage(key, samples=0) or 0 for key in keys.all()])
    per_turn = used / 40
    print(f"\ncall record: {used} bytes for 40 turns, {per_turn:.0f} bytes per turn")
    assert per_turn <= 2048


async def test_the_writer_never_waits_a_full_queue_drops_and_a_dead_redis_fails_counted(
    redis_server: RedisServer,
) -> None:
    policy = CallRecordPolicy(max_pending=3, write_attempts=2, retry_interval_s=0.01)
    log = CallRecordLog.from_config(
        RedisConfig(url=redis_server.url, connect_timeout_s=0.2, socket_timeout_s=0.2), policy
    )
    clocks = Clocks()
    made = recorder(clocks, "sess_w", "rtc_w")
    made.start(SESSION, STAGES)
    writes = [*clocks.writes, *clocks.writes, *clocks.writes]
    assert [log.submit(w) for w in writes[:4]] == [True, True, True, False]
    assert log.outcomes["dropped"] == 1
    async with log:
        assert await log.drained(10)
        assert log.outcomes["written"] == 3
        redis_server.stop()
        assert log.submit(writes[0])
        await eventually(lambda: log.outcomes["failed"] == 1, 10, "the write to fail")
    await asyncio.sleep(0)


def test_record_and_webhook_settings_load_and_the_webhook_secret_is_never_a_flag() -> None:
    keys = {"TRANSCEIVER_KEYS": "1:" + "5b" * 32}
    env = {
        **keys,
        "TRANSCEIVER_CALL_RECORD_TRANSCRIPTS": "redacted",
        "TRANSCEIVER_CALL_RECORD_TTL_S": "86400",
        "TRANSCEIVER_LOOP_LAG_WARN_MS": "250",
    }
    config = TransceiverConfig.load(["--call-record-max-turns", "20"], env)
    records = config.survival.records
    assert (records.transcripts, records.ttl_s, records.max_turns) == ("redacted", 86400, 20)
    assert config.webhook is None and config.loop_lag_warn_s == 0.25
    url = {"TRANSCEIVER_WEBHOOK_URL": "https://hooks.example/voicerelay"}
    with pytest.raises(ConfigError, match="TRANSCEIVER_WEBHOOK_SECRET"):
        TransceiverConfig.load([], {**keys, **url})
    secret = {"TRANSCEIVER_WEBHOOK_SECRET": "a-long-enough-secret"}
    webhook = TransceiverConfig.load(["--webhook-max-attempts", "3"], {**keys, **url, **secret})
    assert webhook.webhook is not None and webhook.webhook.max_attempts == 3
    assert "a-long-enough-secret" not in repr(webhook)
    with pytest.raises(SystemExit):
        TransceiverConfig.load(["--webhook-secret", "x" * 20], keys)
    with pytest.raises(ConfigError, match="TRANSCEIVER_CALL_RECORD_TRANSCRIPTS"):
        TransceiverConfig.load([], {**keys, "TRANSCEIVER_CALL_RECORD_TRANSCRIPTS": "some"})


async def test_only_the_end_of_a_calls_last_leg_is_announced(redis_server: RedisServer) -> None:
    log = CallRecordLog.from_config(RedisConfig(url=redis_server.url), CallRecordPolicy())
    announced: list[tuple[str, str]] = []
    log.on_ended = lambda record, end: announced.append((record["id"], end.call_id))
    clocks = Clocks()
    old, new = recorder(clocks, "sess_x", "rtc_old"), recorder(clocks, "sess_x", "rtc_new")
    old.start(SESSION, STAGES)
    new.start(SESSION, STAGES)  # the call moved to a newer connection...
    old.end("taken_over")  # ...and the old one's end comes later
    new.end("hangup")
    async with log:
        for write in clocks.writes:
            assert log.submit(write)
        assert await log.drained(10)
        record = await log.store.get("sess_x")
    assert announced == [("sess_x", "rtc_new")]
    assert record is not None
    assert [leg["end_reason"] for leg in record["legs"]] == ["taken_over", "hangup"]
