"""The agent's outgoing track (transceiver/webrtc/audio.py) as aiortc's sender drives it.

Real aiortc Opus encoder and decoder, the track's own loop-clock pacing: an answer's first
frame leaves in the packet encoded right after it was queued (nothing held back for a frame),
and the first loud frame of each answer is logged in the form the browser benchmark reads.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from av import AudioFrame

from loadtest.bench_transport import server_first_audio
from transceiver.webrtc.audio import ENCODER_RATE_HZ, AgentVoiceTrack, EncoderFrames

RATE_HZ = 24_000  # the pipeline's output rate
FRAME_SAMPLES = RATE_HZ // 50
LOUD, QUIET = 1_000, 60  # RMS of a decoded 20 ms packet


def tone(amplitude: float, samples: int = FRAME_SAMPLES, rate_hz: int = RATE_HZ) -> bytes:
    t = np.arange(samples) / rate_hz
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes()


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0


def decoded_rms(decoder: OpusDecoder, payloads: list[bytes]) -> float:
    assert len(payloads) == 1, "one Opus packet per 20 ms frame"
    frames = decoder.decode(JitterFrame(data=payloads[0], timestamp=0))
    assert all(isinstance(frame, AudioFrame) for frame in frames)
    return rms(
        b"".join(bytes(frame.planes[0]) for frame in frames if isinstance(frame, AudioFrame))
    )


async def test_the_answer_s_first_frame_is_in_the_next_packet_aiortc_encodes() -> None:
    track = AgentVoiceTrack(RATE_HZ)
    encoder, decoder = OpusEncoder(), OpusDecoder()
    for _ in range(5):  # the call's silence before the answer
        payloads, _ = encoder.encode(await track.recv())
        assert decoded_rms(decoder, payloads) < QUIET
    track.play("resp_1", tone(12_000))
    frame = await track.recv()
    assert (frame.sample_rate, frame.layout.name) == (ENCODER_RATE_HZ, "stereo")
    payloads, _ = encoder.encode(frame)
    assert decoded_rms(decoder, payloads) > LOUD
    assert track.first_frame_sent_s.keys() == {"resp_1"}


def test_encoder_frames_give_one_whole_frame_for_each_frame_in() -> None:
    frames = EncoderFrames(RATE_HZ, 20)
    out = [frames.convert(bytes(2 * FRAME_SAMPLES)) for _ in range(3)]
    out += [frames.convert(tone(12_000)) for _ in range(3)]
    assert {len(frame) for frame in out} == {2 * 2 * ENCODER_RATE_HZ // 50}
    assert [rms(frame) > LOUD for frame in out] == [False] * 3 + [True] * 3
    left, right = np.frombuffer(out[-1], np.int16).reshape(-1, 2).T
    assert np.array_equal(left, right)


def test_frames_at_the_encoder_rate_are_only_made_stereo_at_minus_3_db() -> None:
    frames = EncoderFrames(ENCODER_RATE_HZ, 20)
    pcm = tone(9_000, ENCODER_RATE_HZ // 50, ENCODER_RATE_HZ)
    stereo = np.frombuffer(frames.convert(pcm), np.int16).reshape(-1, 2)
    expected = np.frombuffer(pcm, np.int16) * np.sqrt(0.5)
    assert np.abs(stereo[:, 0] - expected).max() <= 1  # no delay, no filtering
    assert np.array_equal(stereo[:, 0], stereo[:, 1])


async def test_an_answer_s_first_loud_frame_is_logged_as_the_benchmark_reads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    track = AgentVoiceTrack(RATE_HZ)
    for pcm in (bytes(2 * FRAME_SAMPLES), tone(50), tone(12_000), tone(12_000)):
        track.play("resp_1", pcm)
    with caplog.at_level(logging.INFO, logger="transceiver.webrtc.audio"):
        taken = [track.take() for _ in range(5)]
    assert taken[-1] is None
    found = server_first_audio([record.getMessage() for record in caplog.records])
    assert [entry["response"] for entry in found] == ["resp_1"]
    assert found[0]["queued_wait_ms"] >= 0 and found[0]["quiet_lead_ms"] >= 0


async def test_an_answer_with_no_loud_frame_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    track = AgentVoiceTrack(RATE_HZ)
    track.play("resp_1", tone(50))
    with caplog.at_level(logging.INFO, logger="transceiver.webrtc.audio"):
        assert track.take() is not None
    assert server_first_audio([record.getMessage() for record in caplog.records]) == []
