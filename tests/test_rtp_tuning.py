"""Contract test for transceiver/webrtc/rtp_tuning.py: the aiortc internals it replaces still exist
and behave as it assumes (aiortc is pinned; an upgrade that moves them fails here, loudly)."""

from __future__ import annotations

import fractions
import math
import struct

import aiortc.rtcrtpsender
import aiortc.rtp
import numpy as np
import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from av import AudioFrame

from transceiver.webrtc import rtp_tuning


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


@pytest.mark.parametrize("amplitude", [0, 1, 300, 12_000, 32_767])
def test_a_mono_level_equals_aiortcs(amplitude: int) -> None:
    samples = np.random.default_rng(amplitude).integers(-amplitude, amplitude + 1, 960)
    audio = frame(samples.astype(np.int16), "mono")
    assert rtp_tuning.audio_level_dbov(audio) == rtp_tuning.AIORTC_AUDIO_LEVEL(audio)


@pytest.mark.parametrize(
    ("value", "level"),
    [(32_767, 0), (-32_768, 0), (3_277, -20), (328, -40), (33, -60), (1, -90), (0, -127)],
)
def test_exact_levels_of_constant_frames(value: int, level: int) -> None:
    """20 log10(|value| / 32767), rounded and clamped to -127..0 (RFC 6465 Appendix A)."""
    assert rtp_tuning.audio_level_dbov(frame(np.full(960, value, np.int16), "mono")) == level


def test_a_stereo_level_averages_over_both_channels() -> None:
    """Left at -20 dBov, right silent: half the power, -23 dBov. aiortc divides the sum of
    both channels by one channel's samples and says -20."""
    audio = frame(np.column_stack([np.full(960, 3_277), np.zeros(960)]).astype(np.int16), "stereo")
    assert rtp_tuning.audio_level_dbov(audio) == -23
    assert rtp_tuning.AIORTC_AUDIO_LEVEL(audio) == -20


def test_a_planar_frame_is_measured_on_its_first_channel() -> None:
    audio = AudioFrame.from_ndarray(
        np.stack([np.full(960, 328), np.full(960, 32_767)]).astype(np.int16),
        format="s16p",
        layout="stereo",
    )
    assert rtp_tuning.audio_level_dbov(audio) == -40


def test_a_decoded_frame_is_measured_without_its_padding() -> None:
    """aiortc's Opus decoder gives 960 stereo samples in a plane with room for 120 ms: only
    the 1920 real values count."""
    encoder, decoder = OpusEncoder(), OpusDecoder()
    tone = (8_000 * np.sin(2 * np.pi * 440 * np.arange(960) / 48_000)).astype(np.int16)
    for index in range(5):  # past the codec's start-up
        source = frame(tone, "mono")
        source.pts, source.time_base = index * 960, fractions.Fraction(1, 48_000)
        payloads, timestamp = encoder.encode(source)
        (decoded,) = decoder.decode(JitterFrame(data=payloads[0], timestamp=timestamp))
    assert isinstance(decoded, AudioFrame)
    plane = bytes(decoded.planes[0])
    assert (decoded.samples, len(plane)) == (960, 23_040)
    real = struct.unpack("<1920h", plane[:3840])
    rms = math.sqrt(sum(v * v for v in real) / (1920 * 32_767**2))
    assert rtp_tuning.audio_level_dbov(decoded) == round(20 * math.log10(rms)) == -18


def test_levels_of_more_samples_than_a_frame_and_of_none() -> None:
    """Exact in int64 however long the frame (the CPU bound, with no BLAS thread spinning,
    is tests/test_call_cpu.py's)."""
    assert rtp_tuning.level_dbov(np.full(12_000, 3_277, np.int16)) == -20
    assert rtp_tuning.level_dbov(np.full(1_000_000, -32_768, np.int16)) == 0
    assert rtp_tuning.level_dbov(np.zeros(0, np.int16)) == -127


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
