"""Contract test for transceiver/rtp_tuning.py: the aiortc internals it replaces still exist and
behave as it assumes (aiortc is pinned; an upgrade that moves them fails here, loudly)."""

from __future__ import annotations

import aiortc.rtcrtpsender
import aiortc.rtp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket
from av import AudioFrame

from transceiver import rtp_tuning


def frame(samples: np.ndarray, layout: str) -> AudioFrame:
    channels = 2 if layout == "stereo" else 1
    out = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
    out.sample_rate = 48_000
    assert out.samples * channels == samples.size
    return out


def packet(sequence_number: int, timestamp: int) -> RtpPacket:
    rtp = RtpPacket(sequence_number=sequence_number, timestamp=timestamp, payload=b"x")
    rtp._data = b"x"  # the receiver sets the depacketized payload before the buffer sees it
    return rtp


@pytest.mark.parametrize("layout", ["mono", "stereo"])
@pytest.mark.parametrize("amplitude", [0, 1, 300, 12_000, 32_767])
def test_numpy_level_equals_aiortcs(layout: str, amplitude: int) -> None:
    rng = np.random.default_rng(amplitude)
    size = 960 * (2 if layout == "stereo" else 1)
    samples = rng.integers(-amplitude, amplitude + 1, size, dtype=np.int16)
    audio = frame(samples, layout)
    assert rtp_tuning.audio_level_dbov(audio) == rtp_tuning.AIORTC_AUDIO_LEVEL(audio)


def test_install_reaches_the_sender() -> None:
    rtp_tuning.install()
    assert aiortc.rtcrtpsender.rtp.compute_audio_level_dbov is rtp_tuning.audio_level_dbov


async def test_audio_receivers_get_a_one_frame_prefetch() -> None:
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio").receiver
        original = receiver._RTCRtpReceiver__jitter_buffer
        assert isinstance(original, JitterBuffer) and original._prefetch == 4
        rtp_tuning.lower_audio_prefetch(receiver)
        tuned = receiver._RTCRtpReceiver__jitter_buffer
        assert tuned._prefetch == 1 and tuned.capacity == original.capacity
        assert tuned.add(packet(1, 960))[1] is None
        _, first = tuned.add(packet(2, 1920))
        assert first is not None and first.timestamp == 960  # decoded one frame later, not four
    finally:
        await pc.close()


def test_a_receiver_without_the_buffer_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="no longer has the jitter buffer"):
        rtp_tuning.lower_audio_prefetch(object())
