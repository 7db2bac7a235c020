"""The lean media path (transceiver/webrtc/lean_media.py) with real peers on loopback.

In-process and real: a ``Link`` behind a ``LoopbackRelay`` (or a lossy one), ``Calls`` on the
lean path answering a stock aiortc client that sends a tone. Two agents: one with the voice
pipeline's audio contract and no pipeline (``pump_input`` into a buffer at 16 kHz, an
``AgentVoiceTrack`` at 24 kHz out: what ``RealtimeSession`` uses), and the echo agent (any
outgoing track, read by a task). Audio is judged by its spectrum, never by timing.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiortc.codecs.opus
import numpy as np
import pytest
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from metric_samples import served_samples
from prometheus_client import CollectorRegistry

from deploy.processes import Address, LoopbackRelay, random_keys
from deploy.waiting import eventually
from loadtest.tones import SAMPLE_RATE_HZ, ToneClient
from relay.wire.ufrag import Keyring
from transceiver.webrtc import ice
from transceiver.webrtc.audio import AgentVoiceTrack, pump_input
from transceiver.webrtc.calls import CallAgent, CallLimits, Calls
from transceiver.webrtc.echo import EchoAgent
from transceiver.webrtc.lean_media import (
    FRAME_MS,
    KEEPALIVE_S,
    TICK_SAMPLES,
    LeanMedia,
    OpusDecoder,
    OpusEncoder,
    keepalive_due,
    parse_rtp,
    silence_packet,
)
from transceiver.webrtc.link import Link
from transceiver.webrtc.rtp_extensions import (
    AUDIO_LEVEL_URI,
    MID_URI,
    SILENT_LEVEL_DBOV,
    audio_level,
    rtp_extensions,
)

TIMEOUT_S = 15.0
KEYS = random_keys()
KEYRING = Keyring.parse(KEYS)
CALLER_HZ = 440.0
AGENT_HZ = 660.0
INPUT_RATE_HZ = 16_000  # the pipeline's defaults
OUTPUT_RATE_HZ = 24_000
LOSS = 0.05


class VoiceAgent:
    """The Realtime session's audio contract without a pipeline: the caller's audio through
    ``pump_input`` at 16 kHz into ``heard``; ``voice`` is an ``AgentVoiceTrack`` at 24 kHz."""

    made: list[VoiceAgent] = []

    def __init__(self, requested: Mapping[str, Any] | None = None) -> None:
        self.voice = AgentVoiceTrack(OUTPUT_RATE_HZ)
        self.heard = bytearray()
        self.remote: MediaStreamTrack | None = None
        self.pump: asyncio.Task[None] | None = None
        VoiceAgent.made.append(self)

    def attach_audio(self, track: MediaStreamTrack) -> MediaStreamTrack | None:
        self.remote = track
        return self.voice

    def attach_channel(self, channel: Any) -> None:
        return None

    async def start(self) -> None:
        assert self.remote is not None
        self.pump = asyncio.create_task(pump_input(self.remote, self.heard.extend, INPUT_RATE_HZ))

    async def aclose(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            await asyncio.gather(self.pump, return_exceptions=True)
        self.voice.stop()

    def say(self, response_id: str, seconds: float, hz: float = AGENT_HZ) -> None:
        step = OUTPUT_RATE_HZ // 50
        t = np.arange(int(seconds * OUTPUT_RATE_HZ)) / OUTPUT_RATE_HZ
        pcm = (8_000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()
        for start in range(0, len(pcm) - 2 * step + 1, 2 * step):
            self.voice.play(response_id, pcm[start : start + 2 * step])


def dominant_hz(samples: np.ndarray[Any, Any], rate_hz: int) -> float:
    power = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) ** 2
    return float(np.fft.rfftfreq(len(samples), 1 / rate_hz)[int(np.argmax(power[1:])) + 1])


def agent_hears(agent: VoiceAgent, hz: float) -> bool:
    """The last half second the agent heard is loud and its loudest frequency is ``hz``."""
    last = np.frombuffer(bytes(agent.heard[-INPUT_RATE_HZ:]), np.int16).astype(np.float64)
    if len(last) < INPUT_RATE_HZ // 2 or np.sqrt(np.mean(last**2)) < 1_000:
        return False
    return abs(dominant_hz(last, INPUT_RATE_HZ) - hz) <= 15


def client_hears(client: ToneClient, hz: float, frames: int = 25) -> bool:
    if len(client.recent) < frames:
        return False
    samples = np.concatenate(list(client.recent)[-frames:])
    loud = np.sqrt(np.mean(samples**2)) >= 1_000
    return bool(loud) and abs(dominant_hz(samples, SAMPLE_RATE_HZ) - hz) <= 15


class LossyRelay(LoopbackRelay):
    """A ``LoopbackRelay`` that drops ``loss`` of the SRTP/SRTCP datagrams each way (seeded, a
    generator per direction, so one direction's traffic does not move the other's losses; STUN
    and DTLS pass, so the call sets up as usual)."""

    def __init__(self, transceiver: Address, keys: str, loss: float) -> None:
        super().__init__(transceiver, keys)
        self.loss = loss
        # A pure tone is mostly coded as CELT, which carries no FEC: whether a loss can be
        # rebuilt depends on which packets are dropped. Seed 7 drops, within seconds, packets
        # whose successors carry FEC (others were seen to need longer than the test waits).
        self.inbound, self.outbound = random.Random(7), random.Random(8)
        self.dropped_from_client = self.dropped_to_client = 0

    def _lost(self, media: bytes, draw: random.Random) -> bool:
        return bool(media) and 127 < media[0] < 192 and draw.random() < self.loss

    def _from_client(self, data: bytes, client: Address) -> None:
        if self._lost(data, self.inbound):
            self.dropped_from_client += 1
        else:
            super()._from_client(data, client)

    def _from_transceiver(self, data: bytes, source: Address) -> None:
        if self._lost(data[20:], self.outbound):
            self.dropped_to_client += 1
        else:
            super()._from_transceiver(data, source)


@asynccontextmanager
async def lean_calls(
    agents: Callable[[Mapping[str, Any] | None], CallAgent],
    loss: float = 0.0,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[Calls]:
    ice.install()
    link = Link(("127.0.0.1", 0), KEYRING)
    address = await link.start()
    relay = LossyRelay(address, KEYS, loss) if loss else LoopbackRelay(address, KEYS)
    public = await relay.start()
    relay.hello()
    limits = CallLimits(capacity=4, connect_timeout_s=TIMEOUT_S)
    registry = registry or CollectorRegistry()
    calls = Calls(ice.RelayedIce(link, KEYRING, (public,)), limits, registry, agents, "lean")
    try:
        yield calls
    finally:
        await calls.aclose()
        relay.close()
        await link.aclose()
        # The calls' reference cycles are collected here. Left to a later collection, one that
        # fell inside pytest's first import of hypothesis (this file run alone) made CPython
        # 3.11 fail that import's parse with "AST constructor recursion depth mismatch".
        gc.collect()


@asynccontextmanager
async def tone_client(calls: Calls) -> AsyncIterator[ToneClient]:
    client = ToneClient(CALLER_HZ)
    try:
        await client.pc.setLocalDescription(await client.pc.createOffer())
        with calls.reserve() as reservation:
            call, answer = await calls.create(reservation, client.pc.localDescription.sdp)
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await eventually(call.connected.is_set, TIMEOUT_S, "the call to connect")
        yield client
    finally:
        await client.close()


def media(calls: Calls) -> LeanMedia:
    assert calls.lean_media is not None
    return calls.lean_media


def captured(lean: LeanMedia) -> list[bytes]:
    """Every RTP packet the call sends from now on, before SRTP (its RTCP is not kept)."""
    (call,) = lean.calls
    sent: list[bytes] = []
    send = call._send

    def keep(packet: bytes, protected: bool = False) -> None:
        if not protected:
            sent.append(packet)
        send(packet, protected)

    call._send = keep  # type: ignore[method-assign]
    return sent


def keepalives_after_the_last_talkspurt(sent: list[bytes]) -> list[float]:
    """The RMS (of full scale) of each keepalive after the last talkspurt, all packets decoded
    in order as a receiver would; a keepalive is a packet after a gap in RTP time (the frames of
    a talkspurt, its last frame of silence included, are 20 ms apart)."""
    decoder = OpusDecoder(SAMPLE_RATE_HZ)
    levels: list[tuple[bool, float]] = []
    previous: int | None = None
    for packet in sent:
        view = parse_rtp(packet)
        assert view is not None
        pcm = decoder.decode(packet[view.start : view.end])
        assert pcm is not None
        samples = np.frombuffer(pcm, np.int16) / 32768
        if view.marker:  # a talkspurt's first packet
            levels.clear()
        gap = not view.marker and previous is not None and view.timestamp - previous > TICK_SAMPLES
        levels.append((gap, float(np.sqrt(np.mean(samples**2)))))
        previous = view.timestamp
    return [level for gap, level in levels if gap]


def assert_levels_carried(lean: LeanMedia, sent: list[bytes], voiced_dbov: int) -> None:
    """Every packet carries the MID and its frame's audio level (RFC 6464) at the ids the
    answer negotiated: the agent's voice with the V bit at its level (the median frame: a
    talkspurt's ends are partial), silence without it at 127."""
    (call,) = lean.calls
    ids = {e.uri: e.id for e in call.send_parameters.headerExtensions}
    levels = []
    for packet in sent:
        elements = dict(rtp_extensions(packet) or [])
        assert elements.keys() == {ids[MID_URI], ids[AUDIO_LEVEL_URI]}, elements
        assert elements[ids[MID_URI]] == call.send_parameters.muxId.encode()
        levels.append(audio_level(elements[ids[AUDIO_LEVEL_URI]]))
    voiced = sorted(level for voice, level in filter(None, levels) if voice)
    assert voiced and voiced[len(voiced) // 2] == voiced_dbov, voiced
    assert (False, SILENT_LEVEL_DBOV) in levels and None not in levels


async def a_stall_is_followed_by_a_keepalive_at_once(lean: LeanMedia) -> None:
    """The loop blocked for ``STALL_S`` while the agent is silent: the first tick after it
    sends a keepalive (not the tick a count of ticks would reach, up to 200 ms later)."""
    (call,) = lean.calls
    keepalive_ticks: list[int] = []
    send_silence = call._send_silence

    def noted(kind: str, now_s: float, payload: bytes | None = None) -> None:
        if kind == "rtp_keepalive":
            keepalive_ticks.append(lean.ticks)
        send_silence(kind, now_s, payload)

    call._send_silence = noted  # type: ignore[method-assign]
    try:
        await eventually(lambda: len(keepalive_ticks) >= 1, TIMEOUT_S, "a keepalive")
        block_the_loop(STALL_S)
        stalled_at = lean.ticks
        await eventually(lambda: lean.ticks > stalled_at, TIMEOUT_S, "a tick after the stall")
    finally:
        del call._send_silence  # the class's own again
    assert stalled_at + 1 in keepalive_ticks, (stalled_at, keepalive_ticks)


async def test_audio_both_ways_barge_in_and_the_next_answer() -> None:
    VoiceAgent.made.clear()
    async with lean_calls(VoiceAgent) as calls, tone_client(calls) as client:
        (agent,) = VoiceAgent.made
        lean = media(calls)
        packets = captured(lean)
        await eventually(lambda: agent_hears(agent, CALLER_HZ), TIMEOUT_S, "the caller's tone")
        assert lean.counters["rtp_out"] == 0  # the agent is silent: no voice is sent...
        await eventually(lambda: lean.counters["rtp_keepalive"] >= 2, TIMEOUT_S, "keepalives")
        assert client.frames_received <= lean.counters["rtp_keepalive"]  # ...only silence
        assert not client_hears(client, AGENT_HZ)
        await a_stall_is_followed_by_a_keepalive_at_once(lean)

        agent.say("resp_1", 10.0)  # a long answer...
        await eventually(lambda: client_hears(client, AGENT_HZ), TIMEOUT_S, "the agent's tone")
        assert "resp_1" in agent.voice.first_frame_sent_s
        played = agent.voice.frames_played
        assert played > 0 and lean.counters["rtp_out"] >= played

        assert agent.voice.clear() > 0  # ...cut short by a barge-in
        played, sent = agent.voice.frames_played, lean.counters["rtp_out"]
        await asyncio.sleep(0.2)  # whatever was queued is gone: nothing more is played or sent
        assert (agent.voice.frames_played, lean.counters["rtp_out"]) == (played, sent)

        received = client.frames_received
        agent.say("resp_2", 1.0, hz=880.0)  # the next answer is a new talkspurt
        await eventually(lambda: client_hears(client, 880.0), TIMEOUT_S, "the next answer")
        assert client.frames_received > received and "resp_2" in agent.voice.first_frame_sent_s

        # Its end: one frame of silence carries the encoder's tail of the answer out at once,
        # so the keepalives after it decode silent (not a blip of the answer 400 ms later).
        await eventually(lambda: lean.counters["rtp_talkspurt_end"] >= 2, TIMEOUT_S, "its end")
        keepalives = lean.counters["rtp_keepalive"]
        await eventually(lambda: lean.counters["rtp_keepalive"] >= keepalives + 2, TIMEOUT_S, "")
        after = keepalives_after_the_last_talkspurt(packets)
        assert len(after) >= 2 and max(after) < 0.01, after
        assert_levels_carried(lean, packets, voiced_dbov=15)  # the tone: 8 000 peak, RMS -15 dBov
        assert lean.counters["srtp_rejected"] == 0
    assert not lean.calls  # the call's media ended with it


async def test_any_outgoing_track_is_carried_the_echo_agent() -> None:
    async with lean_calls(EchoAgent) as calls, tone_client(calls) as client:
        await eventually(lambda: client.hears_own_tone([]), TIMEOUT_S, "its own tone back")
        assert media(calls).counters["rtp_in"] > 0 and media(calls).counters["rtp_out"] > 0


@pytest.fixture
def client_sends_fec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The aiortc client's encoder as a browser's: 32 kbit/s with in-band FEC (aiortc's own
    is 96 kbit/s CELT, which carries none). The transceiver's lean path uses no aiortc codec."""
    original = aiortc.codecs.opus.OpusEncoder.__init__

    def with_fec(self: aiortc.codecs.opus.OpusEncoder) -> None:
        original(self)
        self.codec.bit_rate = 32_000
        self.codec.options = {"application": "voip", "fec": "1", "packet_loss": "10"}

    monkeypatch.setattr(aiortc.codecs.opus.OpusEncoder, "__init__", with_fec)


async def test_five_percent_loss_is_recovered_by_fec_and_concealed(
    client_sends_fec: None,
) -> None:
    VoiceAgent.made.clear()
    registry = CollectorRegistry()
    async with lean_calls(VoiceAgent, LOSS, registry) as calls, tone_client(calls) as client:
        (agent,) = VoiceAgent.made
        counters = media(calls).counters
        await eventually(
            lambda: counters["recovered_fec"] >= 2 and agent_hears(agent, CALLER_HZ),
            TIMEOUT_S,
            "losses rebuilt from FEC while the caller is heard",
        )
        agent.say("resp_1", 3.0)
        await eventually(lambda: client_hears(client, AGENT_HZ), TIMEOUT_S, "the agent's tone")
        lost = counters["lost"]
        assert lost >= 2 and counters["recovered_fec"] + counters["concealed_plc"] >= lost
        assert counters["decode_errors"] == 0
        await eventually(
            lambda: (
                served_samples(registry).get("transceiver_lean_media_rtt_seconds_count", 0) >= 1
            ),
            TIMEOUT_S,
            "a round trip measured from RTCP",
        )
        metrics = served_samples(registry)  # /metrics as the app serves it: the calls' registry
        for kind in ("lost", "recovered_fec", "concealed_plc", "srtp_rejected"):
            assert (
                metrics[f'transceiver_lean_media_events_total{{kind="{kind}"}}'] <= counters[kind]
            )
        assert metrics['transceiver_lean_media_events_total{kind="lost"}'] >= 2
        assert metrics['transceiver_lean_media_events_total{kind="recovered_fec"}'] >= 2
        assert metrics['transceiver_lean_media_events_total{kind="srtp_rejected"}'] == 0


STALL_S = 0.6  # a stall of the transceiver's loop that a client's 1 s dead-media rule survives


def block_the_loop(seconds: float) -> None:
    """The stall itself: called from the loop, it runs nothing else meanwhile (no tick)."""
    time.sleep(seconds)


def test_a_silent_agent_sends_every_200_ms_and_at_once_after_a_stall() -> None:
    tick_s = FRAME_MS / 1000
    now_s, last_s, sent_at = 1000.0, 1000.0, []
    for tick in range(1, 101):  # 2 s of ticks on a float clock, as the loop's
        now_s += tick_s
        if keepalive_due(now_s, last_s):
            sent_at.append(tick)
            last_s = now_s
    assert sent_at == list(range(10, 101, 10))  # every 200 ms, never a tick early or late
    assert not keepalive_due(last_s + KEEPALIVE_S - tick_s, last_s)
    # The first tick after a stall sends: the gap is the stall plus at most KEEPALIVE_S
    # before it and a tick after it, under a 1 s dead-media rule.
    assert keepalive_due(last_s + STALL_S, last_s)
    assert KEEPALIVE_S + STALL_S + 2 * tick_s < 1.0


def test_a_keepalive_is_one_packet_of_digital_silence_encoded_once() -> None:
    frame_samples = OUTPUT_RATE_HZ * FRAME_MS // 1000
    packet = silence_packet(OUTPUT_RATE_HZ, frame_samples)
    assert len(packet) <= 3
    assert OpusEncoder(OUTPUT_RATE_HZ, frame_samples).silence is packet  # the same bytes object
    decoder = OpusDecoder(SAMPLE_RATE_HZ)
    for _ in range(3):
        assert decoder.decode(packet) == bytes(2 * SAMPLE_RATE_HZ * FRAME_MS // 1000)
