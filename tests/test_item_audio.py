"""The recent items' audio kept for ``conversation.item.retrieved``: bounded in seconds across
items (``TRANSCEIVER_REALTIME_ITEM_AUDIO_S``), the oldest items' audio dropped whole, a
truncated item's cut to what is left."""

from __future__ import annotations

import pytest

from transceiver.config import ConfigError, TransceiverConfig
from transceiver.realtime.item_audio import ItemAudio
from transceiver.realtime.limits import RealtimeLimits

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
