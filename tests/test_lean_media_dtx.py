"""A lean call's caller in Opus DTX, packet by packet and tick by tick: real SRTP (pylibsrtp)
and Opus, the call wired as ``LeanCall._configure`` leaves it once DTLS is up, and a started
``ConversationEngine`` (webrtcvad) hearing it as a Realtime session does (``push_audio``, and
``push_silence`` for the silence the caller did not send). A DTX gap (sequence numbers
consecutive, the RTP timestamp jumping over it) is silence the engine hears in real time,
with no loss counted, concealed or reported; an outage mid-speech is not fed as silence and
is concealed when the packets come back, as before."""

from __future__ import annotations

import math
import os
import struct
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pylibsrtp
import pytest
from prometheus_client import CollectorRegistry
from test_lean_media import KEYRING, KEYS, TIMEOUT_S, VoiceAgent

from deploy.processes import LoopbackRelay
from loadtest import recorded_speech
from loadtest.frame_stages import CollectingSpeechToText
from loadtest.tones import ToneClient
from pipeline.config import EngineConfig, VadConfig
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.vad import webrtc_classifier
from transceiver.webrtc import ice
from transceiver.webrtc.calls import MEDIA_PATHS, CallLimits, Calls
from transceiver.webrtc.lean_media import (
    MAX_SILENCE_TOP_UP,
    SILENCE_AFTER_TICKS,
    TICK_SAMPLES,
    LeanCall,
    LeanInputTrack,
    LeanMedia,
    OpusDecoder,
    OpusEncoder,
    ReceptionStats,
    rtp_header,
)
from transceiver.webrtc.link import Link

RATE_HZ = 16_000
FRAME_SAMPLES = RATE_HZ // 50
PAYLOAD_TYPE = 111
CALLER_SSRC = 0x0BAD_CAFE
PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM
DTX_GAP_FRAMES = 19  # a DTX sender's packets are 400 ms apart: 19 frames unsent between


def caller_packets(tone_frames: int, quiet_frames: int) -> list[bytes]:
    """A 300 Hz tone (webrtcvad calls it speech), then digital silence, coded as a caller
    codes its microphone, 20 ms a packet."""
    encoder = OpusEncoder(RATE_HZ, FRAME_SAMPLES)
    packets = []
    for index in range(tone_frames + quiet_frames):
        loud = 6000 if index < tone_frames else 0
        samples = (
            int(loud * math.sin(2 * math.pi * 300 * (index * FRAME_SAMPLES + n) / RATE_HZ))
            for n in range(FRAME_SAMPLES)
        )
        packets.append(encoder.encode(struct.pack(f"<{FRAME_SAMPLES}h", *samples)))
    return packets


class DtxCaller:
    """The far end's SRTP sender, and a lean call whose caller's audio a started engine
    hears; ``send`` one packet (``skip`` sequence numbers or frames first), ``tick`` the
    call as the shared 20 ms tick does."""

    def __init__(self, engine: ConversationEngine) -> None:
        key = os.urandom(32 + 12)
        self._sender = pylibsrtp.Session(
            pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, PROFILE)
        )
        receiver = pylibsrtp.Session(
            pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, PROFILE)
        )
        track = LeanInputTrack()
        track.push, track.rate_hz, track.silence = (
            engine.push_audio,
            RATE_HZ,
            engine.push_silence,
        )
        self.media = LeanMedia(feed_silence=True)
        self.call = LeanCall(
            self.media, SimpleNamespace(sender=SimpleNamespace(_ssrc=1)), track, None
        )
        self.call._dtls = SimpleNamespace(_rx_srtp=receiver)
        self.call._accepted_types = frozenset({PAYLOAD_TYPE})
        self.call._rtcp_countdown = 10**9  # no RTCP sent: this call has no way out
        self.sequence, self.timestamp = 65_530, 4_294_960_000  # both wrap in the test
        self.ticks = 0

    def send(self, payload: bytes, lost: int = 0, unsent: int = 0) -> None:
        """The next packet, after ``lost`` packets lost (sequence numbers and frames
        skipped) or ``unsent`` frames a DTX sender did not send (frames only)."""
        self.sequence = (self.sequence + lost) & 0xFFFF
        self.timestamp = (self.timestamp + (lost + unsent) * TICK_SAMPLES) & 0xFFFFFFFF
        header = rtp_header(False, PAYLOAD_TYPE, self.sequence, self.timestamp, CALLER_SSRC)
        self.call.on_media(self._sender.protect(header + payload))
        self.sequence = (self.sequence + 1) & 0xFFFF
        self.timestamp = (self.timestamp + TICK_SAMPLES) & 0xFFFFFFFF

    def tick(self, count: int = 1) -> None:
        for _ in range(count):
            self.ticks += 1
            self.call.tick(self.ticks, float(self.ticks) / 50)


@pytest.fixture(scope="module")
def speech_packets() -> list[bytes]:
    """A recording of human speech, coded as a caller codes its microphone."""
    folder = recorded_speech.fetch()
    pcm = recorded_speech.read_pcm(recorded_speech.RECORDINGS[0], folder)
    encoder = OpusEncoder(RATE_HZ, FRAME_SAMPLES)
    step = 2 * FRAME_SAMPLES
    return [encoder.encode(pcm[i : i + step]) for i in range(0, len(pcm) - step + 1, step)]


@pytest.fixture
async def engine() -> AsyncIterator[ConversationEngine]:
    config = EngineConfig(input_sample_rate_hz=RATE_HZ, create_response=False)
    engine = ConversationEngine(
        config,
        CollectingSpeechToText(),
        LocalRuleBasedAgent(load_knowledge()),
        EspeakTextToSpeech(),
    )
    await engine.start()
    yield engine
    await engine.aclose()


def talk(caller: DtxCaller, packets: list[bytes]) -> None:
    for packet in packets:
        caller.send(packet)
        caller.tick()


async def test_a_dtx_gap_is_heard_as_silence_in_real_time_and_not_as_loss(
    engine: ConversationEngine,
) -> None:
    caller = DtxCaller(engine)
    packets = caller_packets(tone_frames=25, quiet_frames=12)
    talk(caller, packets[:25])
    assert engine.user_speaking  # the tone is heard as speech...
    talk(caller, packets[25:])  # ...then the hangover's quiet packets, as Opus sends them
    assert engine.input_position_ms == 37 * 20
    for gap in range(3):  # a DTX sender: one packet every 400 ms
        caller.tick(DTX_GAP_FRAMES - 1)
        # meanwhile the engine heard the pause a tick at a time, a frame behind the ticks
        assert engine.input_position_ms == (37 + 20 * gap + DTX_GAP_FRAMES - 1) * 20
        caller.tick()
        caller.send(packets[-1], unsent=DTX_GAP_FRAMES)
        assert engine.input_position_ms == (37 + 20 * (gap + 1)) * 20  # the gap, exactly
        caller.tick()
    counters = caller.call.counters
    assert counters["silence_fed"] == 3 * DTX_GAP_FRAMES
    assert counters["rtp_in"] == 37 + 3
    for kind in ("lost", "concealed_plc", "recovered_fec", "lost_in_silence", "rtp_late"):
        assert counters[kind] == 0, kind
    block = caller.call._stats.block(0.0)
    assert block is not None and (block.cumulative_lost, block.fraction_lost) == (0, 0)
    assert not engine.user_speaking  # the turn ended in the silence fed


def mid_word(packets: list[bytes]) -> int:
    """How many of the packets to send for the last one heard to be speech, as the engine's
    classifier (webrtcvad at its default) hears them decoded, with more speech after it."""
    decoder, classify = OpusDecoder(RATE_HZ), webrtc_classifier(VadConfig(), RATE_HZ)
    voiced = [classify(decoder.decode(packet) or b"") for packet in packets]
    return next(i + 1 for i in range(25, len(voiced) - 4) if all(voiced[i : i + 4]))


async def test_an_outage_mid_speech_is_not_fed_as_silence_and_is_concealed_after(
    engine: ConversationEngine, speech_packets: list[bytes]
) -> None:
    caller = DtxCaller(engine)
    heard = mid_word(speech_packets)
    talk(caller, speech_packets[:heard])
    assert engine.user_speaking
    caller.tick(3 * SILENCE_AFTER_TICKS)  # the caller's packets stop mid-word
    assert engine.input_position_ms == heard * 20  # nothing was fed for them
    caller.send(speech_packets[heard + 3], lost=3)
    caller.tick()
    counters = caller.call.counters
    assert counters["silence_fed"] == 0
    assert counters["lost"] == 3 and counters["concealed_plc"] + counters["recovered_fec"] == 3
    assert engine.input_position_ms == (heard + 3 + 1) * 20  # concealed in place, as before


async def test_silence_refused_for_long_is_fed_a_bounded_while_once_taken(
    engine: ConversationEngine, speech_packets: list[bytes]
) -> None:
    """A minute without packets after speech (the engine refusing its silence), then quiet
    frames heard (the engine takes silence again): the frames due are fed, at most
    ``MAX_SILENCE_TOP_UP`` at once (not the minute's 3,000, over what push_silence takes)."""
    caller = DtxCaller(engine)
    heard = mid_word(speech_packets)
    talk(caller, speech_packets[:heard])
    caller.tick(3_050)
    assert caller.call.counters["silence_fed"] == 0
    for _ in range(10):  # quiet frames from elsewhere (past webrtcvad's hangover)
        engine.push_audio(bytes(2 * FRAME_SAMPLES))
    caller.tick()
    assert not caller.call.closed
    assert caller.call.counters["silence_fed"] == MAX_SILENCE_TOP_UP
    caller.tick()
    assert caller.call.counters["silence_fed"] == MAX_SILENCE_TOP_UP + 1  # a tick at a time


async def test_packets_lost_in_a_dtx_gap_are_covered_by_the_silence_fed(
    engine: ConversationEngine,
) -> None:
    caller = DtxCaller(engine)
    packets = caller_packets(tone_frames=0, quiet_frames=15)
    talk(caller, packets)
    caller.tick(DTX_GAP_FRAMES)
    caller.send(packets[-1], unsent=DTX_GAP_FRAMES)
    caller.tick(DTX_GAP_FRAMES + 2)  # the next DTX packet, and the one after it, are lost
    caller.send(packets[-1], lost=2, unsent=2 * DTX_GAP_FRAMES)
    caller.tick(DTX_GAP_FRAMES + 1)  # it is held, then released alone; the next comes
    caller.send(packets[-1], unsent=DTX_GAP_FRAMES)
    counters = caller.call.counters
    assert counters["lost"] == counters["lost_in_silence"] == 2
    assert counters["concealed_plc"] == counters["recovered_fec"] == 0
    frames = 15 + (DTX_GAP_FRAMES + 1) + (2 * DTX_GAP_FRAMES + 2 + 1) + (DTX_GAP_FRAMES + 1)
    assert engine.input_position_ms == frames * 20  # the gaps once, not twice


@pytest.mark.parametrize("media_path", MEDIA_PATHS)
async def test_the_answer_asks_for_dtx_on_the_lean_path_only(media_path: str) -> None:
    ice.install()
    link = Link(("127.0.0.1", 0), KEYRING)
    relay = LoopbackRelay(await link.start(), KEYS)
    public = await relay.start()
    limits = CallLimits(capacity=1, connect_timeout_s=TIMEOUT_S)
    relayed = ice.RelayedIce(link, KEYRING, (public,))
    calls = Calls(relayed, limits, CollectorRegistry(), VoiceAgent, media_path)
    client = ToneClient(440.0)
    try:
        await client.pc.setLocalDescription(await client.pc.createOffer())
        with calls.reserve() as reservation:
            _, answer = await calls.create(reservation, client.pc.localDescription.sdp)
        (fmtp,) = [line for line in answer.split("\r\n") if line.startswith("a=fmtp:")]
        assert fmtp.endswith(";usedtx=1") == (media_path == "lean"), fmtp
    finally:
        await client.close()
        await calls.aclose()
        relay.close()
        await link.aclose()


def test_a_dtx_senders_gaps_are_neither_loss_nor_jitter_in_the_reception_report() -> None:
    stats = ReceptionStats()
    sequence, timestamp, arrival_s = 65_000, 1_000, 50.0
    for index in range(60):
        in_dtx = index >= 20  # 20 packets 20 ms apart, then one every 400 ms
        stats.packet(CALLER_SSRC, sequence + index, timestamp, arrival_s)
        step = 20 if in_dtx else 1
        timestamp += step * TICK_SAMPLES
        arrival_s += step * 0.02
    block = stats.block(arrival_s)
    assert block is not None
    assert (block.cumulative_lost, block.fraction_lost) == (0, 0)
    assert block.highest_sequence == 65_059
    assert block.jitter == 0
