"""The recent items' audio kept for ``conversation.item.retrieved``: bounded in seconds across
items (``TRANSCEIVER_REALTIME_ITEM_AUDIO_S``), the oldest items' audio dropped whole, a
truncated item's cut to what is left."""

from __future__ import annotations

import base64
import json

import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from transceiver.config import ConfigError, TransceiverConfig
from transceiver.metrics import RealtimeMetrics
from transceiver.realtime.item_audio import PROCESS_BOUND, ItemAudio, ItemAudioBudget
from transceiver.realtime.limits import RealtimeLimits
from transceiver.realtime.pipeline_agent import ItemAudioCollector
from transceiver.realtime.policy import SessionPolicy
from transceiver.realtime.session import RealtimeSession

RATE_HZ = 16_000
KEYS = "1:" + "5b" * 32


def pcm_s(seconds: float, value: int = 1, rate_hz: int = RATE_HZ) -> bytes:
    return value.to_bytes(2, "little", signed=True) * int(seconds * rate_hz)


def test_an_item_keeps_its_audio_in_pieces_at_its_rate() -> None:
    audio = ItemAudio(max_audio_s=10)
    audio.keep("a", pcm_s(0.5, 1), RATE_HZ)
    audio.keep("a", pcm_s(0.25, 2), RATE_HZ)
    assert audio.clip("a") == (pcm_s(0.5, 1) + pcm_s(0.25, 2), RATE_HZ)
    assert audio.audio_s == pytest.approx(0.75)
    assert audio.clip("b") is None
    with pytest.raises(ValueError, match="item a: audio at 24000 Hz after 16000"):
        audio.keep("a", pcm_s(0.1), 24_000)


def test_over_the_bound_the_oldest_items_lose_their_audio_whole() -> None:
    audio = ItemAudio(max_audio_s=3)
    audio.keep("old", pcm_s(1.5), RATE_HZ)
    audio.keep("mid", pcm_s(1), RATE_HZ)
    audio.keep("new", pcm_s(1), RATE_HZ)
    assert audio.clip("old") is None and audio.clip("mid") is not None
    assert audio.audio_s == pytest.approx(2)
    audio.keep("old", pcm_s(0.1), RATE_HZ)  # dropped: nothing more of it is kept
    assert audio.clip("old") is None
    audio.keep("long", pcm_s(4), RATE_HZ)  # longer than the bound on its own
    assert [audio.clip(i) for i in ("mid", "new", "long")] == [None, None, None]
    assert audio.audio_s == pytest.approx(0)


def test_a_cut_keeps_what_is_left_and_a_forgotten_item_frees_its_share() -> None:
    audio = ItemAudio(max_audio_s=10)
    audio.keep("a", pcm_s(1, 3), 24_000)
    audio.cut("a", 250)
    assert audio.clip("a") == (pcm_s(0.25, 3, 24_000), 24_000)
    audio.cut("a", 900)  # past its end: nothing changes
    assert audio.audio_s == pytest.approx(0.25)
    audio.forget("a")
    assert audio.clip("a") is None and audio.audio_s == pytest.approx(0)


def test_a_negative_bound_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_audio_s must be 0 or above, got -1"):
        ItemAudio(max_audio_s=-1)


def test_the_bound_comes_from_the_environment_or_its_flag() -> None:
    env = {"TRANSCEIVER_KEYS": KEYS}
    assert TransceiverConfig.load([], env).realtime.item_audio_s == 60
    env["TRANSCEIVER_REALTIME_ITEM_AUDIO_S"] = "12.5"
    assert TransceiverConfig.load([], env).realtime.item_audio_s == 12.5
    assert TransceiverConfig.load(["--realtime-item-audio-s", "0"], env).realtime.item_audio_s == 0
    env["TRANSCEIVER_REALTIME_ITEM_AUDIO_S"] = "-1"
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_ITEM_AUDIO_S=-1 is below 0.0"):
        TransceiverConfig.load([], env)
    with pytest.raises(ValueError, match="realtime limits: item_audio_s must be 0 or above"):
        RealtimeLimits(item_audio_s=-1)


def test_the_process_s_byte_bound_drops_the_oldest_clip_of_any_session() -> None:
    """Two sessions share a budget of 3 s of 16 kHz audio (96,000 bytes): the oldest clip goes,
    whichever session holds it, and says which bound took it; the session's own bound and a
    cut hand their bytes back, and so does a session's release."""
    budget = ItemAudioBudget(max_bytes=96_000)
    first, second = ItemAudio(max_audio_s=10, budget=budget), ItemAudio(10, budget)
    first.keep("a1", pcm_s(1), RATE_HZ)
    second.keep("b1", pcm_s(1), RATE_HZ)
    first.keep("a2", pcm_s(0.5), RATE_HZ)
    assert budget.held_bytes == 80_000 and budget.dropped_clips == 0
    second.keep("b2", pcm_s(1), RATE_HZ)  # 112,000 bytes: a1, the oldest, goes
    assert first.clip("a1") is None and first.dropped_reason("a1") == PROCESS_BOUND
    assert "TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES" in PROCESS_BOUND
    assert first.audio_s == pytest.approx(0.5) and budget.held_bytes == 80_000
    assert [second.clip(i) is not None for i in ("b1", "b2")] == [True, True]
    assert first.dropped_reason("a2") is None and second.dropped_reason("b9") is None
    second.cut("b2", 250)  # 24,000 bytes back
    assert budget.held_bytes == 56_000
    first.keep("a1", pcm_s(0.1), RATE_HZ)  # dropped: nothing more of it is kept
    assert first.clip("a1") is None and budget.held_bytes == 56_000
    second.release()
    assert budget.held_bytes == 16_000 and budget.dropped_clips == 1
    first.forget("a2")
    assert budget.held_bytes == 0


def test_a_session_s_own_bound_is_not_the_process_s() -> None:
    budget = ItemAudioBudget(max_bytes=10**9)
    audio = ItemAudio(max_audio_s=1, budget=budget)
    audio.keep("old", pcm_s(1), RATE_HZ)
    audio.keep("new", pcm_s(0.5), RATE_HZ)
    assert audio.clip("old") is None and audio.dropped_reason("old") is None
    assert budget.held_bytes == 16_000 and budget.dropped_clips == 0


def test_the_byte_bound_comes_from_the_environment_and_0_is_none() -> None:
    env = {"TRANSCEIVER_KEYS": KEYS}
    assert TransceiverConfig.load([], env).realtime.item_audio_bytes == 64 * 1024 * 1024
    env["TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES"] = "0"
    assert TransceiverConfig.load([], env).realtime.item_audio_bytes == 0
    unbounded = ItemAudioBudget(0)
    ItemAudio(budget=unbounded).keep("a", pcm_s(30), RATE_HZ)
    assert unbounded.held_bytes == 960_000 and unbounded.dropped_clips == 0
    env["TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES"] = "-1"
    with pytest.raises(ConfigError, match="TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES=-1 is below 0"):
        TransceiverConfig.load([], env)
    with pytest.raises(ValueError, match="item_audio_bytes must be 0 or above"):
        RealtimeLimits(item_audio_bytes=-1)
    with pytest.raises(ValueError, match="max_bytes must be 0 or above, got -1"):
        ItemAudioBudget(-1)


def one_session(budget: ItemAudioBudget) -> RealtimeSession:
    config = EngineConfig(input_sample_rate_hz=16000, output_sample_rate_hz=24000)
    tts = EspeakTextToSpeech()
    llm = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(config, PocketsphinxSpeechToText(), llm, tts)
    policy = SessionPolicy(config, voices=tts.voices)
    metrics = RealtimeMetrics(CollectorRegistry())
    return RealtimeSession(engine, policy, policy.initial(None), metrics, item_audio=budget)


def said(item_id: str, seconds: float) -> str:
    """A user item with ``seconds`` of 24 kHz audio."""
    audio = base64.b64encode(pcm_s(seconds, 5, 24_000)).decode()
    content = [{"type": "input_audio", "audio": audio}]
    item = {"id": item_id, "type": "message", "role": "user", "content": content}
    return json.dumps({"type": "conversation.item.create", "item": item})


async def test_an_item_whose_audio_the_process_dropped_is_retrieved_without_it_and_told_why() -> (
    None
):
    """Two sessions, a budget of 1.5 s of 24 kHz audio: the second session's item takes the
    first's audio; the first's retrieve gets the item without audio and an error naming the
    bound. A session's end hands its bytes back."""
    budget = ItemAudioBudget(max_bytes=72_000)
    first, second = one_session(budget), one_session(budget)
    try:
        first.on_message(said("item_a", 1))
        second.on_message(said("item_b", 1))
        first.on_message(json.dumps({"type": "conversation.item.retrieve", "item_id": "item_a"}))
        second.on_message(json.dumps({"type": "conversation.item.retrieve", "item_id": "item_b"}))
        told = [e for e in first._pending if e["type"] in ("error", "conversation.item.retrieved")]
        kept = [e for e in second._pending if e["type"] == "conversation.item.retrieved"]
    finally:
        await first.aclose()
        assert budget.held_bytes == 48_000  # the second's item alone
        await second.aclose()
    assert budget.held_bytes == 0 and budget.dropped_clips == 1
    error, retrieved = told
    assert (error["error"]["code"], error["error"]["param"]) == ("item_audio_dropped", "item_id")
    assert "TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES" in error["error"]["message"], error
    assert "audio" not in retrieved["item"]["content"][0], retrieved
    assert kept[0]["item"]["content"][0]["audio"], kept


def test_the_process_s_item_audio_is_measured() -> None:
    registry, budget = CollectorRegistry(), ItemAudioBudget(max_bytes=40_000)
    registry.register(ItemAudioCollector(budget))
    ItemAudio(budget=budget).keep("a", pcm_s(1), RATE_HZ)
    ItemAudio(budget=budget).keep("b", pcm_s(0.5), RATE_HZ)
    assert registry.get_sample_value("transceiver_item_audio_bytes") == 16_000
    assert registry.get_sample_value("transceiver_item_audio_dropped_clips_total") == 1
