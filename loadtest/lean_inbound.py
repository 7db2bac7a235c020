"""``python -m loadtest.lean_inbound``: a caller's packet through the lean path into the engine.

A µ-benchmark of the inbound path end to end in one process, with the real objects a call
runs: recorded human speech (``loadtest.recorded_speech``, its ten recordings at 16 kHz, taken
to 48 kHz with soxr) coded as a browser codes it (``loadtest.voice_calls.opus_packets``: mono
voip Opus, 32 kbit/s), each packet given an RTP header and protected by a real pylibsrtp
session (AES-256-GCM, the profile aiortc's DTLS-SRTP offers first), then handed, as the link
hands it, to an ICE protocol that ``lean_media.divert_media`` has diverted to a ``LeanCall``
(wired as ``LeanCall._configure`` leaves it), which unprotects, parses, orders, decodes at
16 kHz and pushes each frame into a started ``ConversationEngine`` (webrtcvad, turn detection,
the open stretch's audio queue).

Stages, per packet, each over every packet of a round, taking turns in each round:

- ``opus decode 16 kHz``: ``OpusDecoder.decode`` alone, the reference the ratios are taken
  against (libopus's own work, which nothing here can make cheaper);
- ``srtp unprotect``: pylibsrtp's ``unprotect`` alone;
- ``engine.push_audio``: the decoded frames pushed into a started engine alone;
- ``whole path``: the packets through the diverted protocol into the engine;
- ``python around them``: the whole path less the three above (what the lean path's own
  Python costs a packet, with what the stages cost more in turn than alone: caches);
- ``whole path, no codec nor engine``: the whole path with the decode answering a frame
  decoded before and the engine taken away (SRTP, RTP, order, stats and the calls between);
- ``from the link socket``: the whole path from a real link socket on loopback: each packet
  behind the relay's header, sent by a keyed relay's socket (outside the time), ``--batch`` of
  them at a time (a 30-call transceiver reading every 2 ms finds ~3), read with ``recvmmsg``
  and demultiplexed by ``Link`` to the call's session (``Link._drain``, as a readable socket
  is read);
- ``link, recvmmsg and demux``: that less the whole path.

CPU time of this process (``time.process_time``), µs a packet, the median of ``--rounds``;
``ratio`` is a stage's cost over the decode's in the same round: what ``make bench`` reads
(``bench_metrics``), its target the whole path without codec nor engine (``TARGET_RATIO``).
The load average is printed beside: a shared machine's other load shows up as noise in both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import soxr

from loadtest import recorded_speech
from loadtest.frame_stages import (
    CollectingSpeechToText,
    SilentLanguageModel,
    SilentTextToSpeech,
)
from loadtest.rounds import flat_metrics, load_average, stage_medians
from loadtest.voice_calls import opus_packets
from pipeline.config import EngineConfig, VadConfig
from pipeline.engine import ConversationEngine
from relay.wire.header import MAX_LINK_DATAGRAM_BYTES, header_for
from relay.wire.ufrag import Keyring
from transceiver.webrtc import lean_media
from transceiver.webrtc.link import Link
from transceiver.webrtc.mmsg import datagrams_for

RATE_HZ = recorded_speech.SAMPLE_RATE_HZ
PAYLOAD_TYPE = 111
CALLER_SSRC = 0x5EED_CA11
SRTP_PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM
SRTP_KEY_BYTES = 32 + 12
REFERENCE = "opus decode 16 kHz"
WHOLE = "whole path"
# make bench's target: the lean path's own work a packet (SRTP, RTP, order, stats and the calls
# between), over the decode's (0.16-0.18x measured after 1ed37e3, 0.22-0.26x before, load <4)
TARGET_STAGE = "whole path, no codec nor engine"
TARGET_RATIO = 0.2
PUSHED_PER_PASS = 50  # packets pushed between loop passes (the engine's stretches drained)
CLIENT = ("192.0.2.7", 50_000)
LINK_BATCH = 4  # datagrams waiting at each read of the link socket


def caller_packets(seconds: float) -> list[bytes]:
    """Opus packets of the recordings back to back, at most ``seconds`` of them."""
    folder = recorded_speech.fetch()  # nothing is downloaded when checked copies are there
    pcm16 = b"".join(recorded_speech.read_pcm(r, folder) for r in recorded_speech.RECORDINGS)
    pcm16 = pcm16[: int(2 * RATE_HZ * seconds)]
    resampler = soxr.ResampleStream(RATE_HZ, lean_media.RTP_CLOCK_HZ, 1, dtype="int16")
    pcm48 = lean_media._resample(resampler, pcm16)
    return opus_packets(pcm48)


def protected(payloads: Sequence[bytes]) -> tuple[list[bytes], pylibsrtp.Session]:
    """The payloads as SRTP packets of one stream, and a receiving session for them."""
    key = os.urandom(SRTP_KEY_BYTES)
    sender = pylibsrtp.Session(
        pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, SRTP_PROFILE)
    )
    receiver = pylibsrtp.Session(
        pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, SRTP_PROFILE)
    )
    packets = []
    for index, payload in enumerate(payloads):
        header = lean_media.rtp_header(
            False, PAYLOAD_TYPE, index & 0xFFFF, 960 * index, CALLER_SSRC
        )
        packets.append(sender.protect(header + payload))
    return packets, receiver


class IceProtocol:
    """Stands where aioice's ``StunProtocol`` stands: what is not media reaches it."""

    def __init__(self) -> None:
        self.passed_on = 0

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.passed_on += 1


def receiving_call(
    receiver: pylibsrtp.Session, push: Callable[[bytes], None]
) -> tuple[lean_media.LeanCall, IceProtocol]:
    """A ``LeanCall`` wired as ``_configure`` leaves it (no aiortc around it), its frames
    pushed to ``push``, and the ICE protocol diverted to it."""
    heard = lean_media.LeanInputTrack()
    heard.push, heard.rate_hz = push, RATE_HZ
    transceiver = SimpleNamespace(sender=SimpleNamespace(_ssrc=1))
    call = lean_media.LeanCall(lean_media.LeanMedia(), transceiver, heard, None)
    call._dtls = SimpleNamespace(_rx_srtp=receiver)
    call._accepted_types = frozenset({PAYLOAD_TYPE})
    protocol = IceProtocol()
    call._hook(protocol)
    return call, protocol


def _ignore(pcm: bytes) -> None:
    pass


async def started_engine() -> tuple[ConversationEngine, asyncio.Task[None]]:
    config = EngineConfig(input_sample_rate_hz=RATE_HZ, create_response=False, vad=VadConfig())
    engine = ConversationEngine(
        config, CollectingSpeechToText(), SilentLanguageModel(), SilentTextToSpeech()
    )
    await engine.start()
    return engine, asyncio.create_task(_drain(engine))


async def _drain(engine: ConversationEngine) -> None:
    async for _ in engine.events():
        pass


async def timed_us(work: Callable[[Any], Any], items: Sequence[Any]) -> float:
    """CPU µs per item of ``work``, the loop let run between passes (outside the time)."""
    cpu_s = 0.0
    for start in range(0, len(items), PUSHED_PER_PASS):
        started = time.process_time()
        for item in items[start : start + PUSHED_PER_PASS]:
            work(item)
        cpu_s += time.process_time() - started
        await asyncio.sleep(0)
    return cpu_s / len(items) * 1e6


async def one_round(payloads: Sequence[bytes], batch: int = LINK_BATCH) -> dict[str, float]:
    decoder = lean_media.OpusDecoder(RATE_HZ)
    frames = [decoder.decode(p) or b"" for p in payloads]
    timings: dict[str, float] = {}
    decoder = lean_media.OpusDecoder(RATE_HZ)
    timings[REFERENCE] = await timed_us(decoder.decode, payloads)
    packets, receiver = protected(payloads)
    timings["srtp unprotect"] = await timed_us(receiver.unprotect, packets)
    engine, drained = await started_engine()
    try:
        timings["engine.push_audio"] = await timed_us(engine.push_audio, frames)
    finally:
        await engine.aclose()
        await drained
    timings[WHOLE] = await _whole_us(payloads)
    timings[TARGET_STAGE] = await _whole_us(payloads, frames)
    rest = timings[WHOLE] - timings[REFERENCE] - timings["srtp unprotect"]
    timings["python around them"] = rest - timings["engine.push_audio"]
    timings["from the link socket"] = await _from_link_us(payloads, batch)
    timings["link, recvmmsg and demux"] = timings["from the link socket"] - timings[WHOLE]
    return timings


async def _whole_us(payloads: Sequence[bytes], decoded: Sequence[bytes] = ()) -> float:
    """The whole path into the engine; given ``decoded`` (the payloads' frames), without the
    codec (each decode answers the next of them) nor the engine."""
    packets, receiver = protected(payloads)
    engine, drained = await started_engine()
    call, protocol = receiving_call(receiver, _ignore if decoded else engine.push_audio)
    if decoded:
        frames = iter(decoded)
        call._new_decoder(RATE_HZ).decode = lambda payload: next(frames)  # type: ignore[method-assign]
    try:
        received = protocol.datagram_received
        us = await timed_us(lambda packet: received(packet, CLIENT), packets)
    finally:
        call.close()
        await engine.aclose()
        await drained
    counters = call.counters
    if counters["rtp_in"] != len(packets) or protocol.passed_on:
        raise RuntimeError(f"not every packet went through the lean path: {dict(counters)}")
    return us


async def _from_link_us(payloads: Sequence[bytes], batch: int) -> float:
    """The whole path from the link socket: ``batch`` datagrams sent, then read and handled."""
    packets, receiver = protected(payloads)
    engine, drained = await started_engine()
    call, protocol = receiving_call(receiver, engine.push_audio)
    link = Link(("127.0.0.1", 0), Keyring(1, {1: os.urandom(32)}), clock=time.monotonic)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as link_socket,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay,
    ):
        link_socket.bind(("127.0.0.1", 0))
        link_socket.setblocking(False)
        relay.bind(("127.0.0.1", 0))
        relay.connect(link_socket.getsockname())
        link._socket, link._io = (
            link_socket,
            datagrams_for(link_socket, link.policy.io_batch, MAX_LINK_DATAGRAM_BYTES),
        )
        link.keyed.sources[relay.getsockname()] = time.monotonic()  # as a verified HELLO leaves it
        session = link.open_session("benchufrag")
        header = header_for(CLIENT)
        link._learn(session, header[2:])  # as the call's first answer to the client teaches it
        session.receivers[4] = protocol  # type: ignore[assignment]
        cpu_s = 0.0
        try:
            for start in range(0, len(packets), batch):
                for packet in packets[start : start + batch]:
                    relay.send(header + packet)
                started = time.process_time()
                link._drain()
                cpu_s += time.process_time() - started
                if start % PUSHED_PER_PASS < batch:
                    await asyncio.sleep(0)
        finally:
            link._socket = link._io = None
            call.close()
            await engine.aclose()
            await drained
    if call.counters["rtp_in"] != len(packets) or link.counters["datagrams_in"] != len(packets):
        raise RuntimeError(f"not every datagram reached the call: {dict(link.counters)}")
    return cpu_s / len(packets) * 1e6


def run_lean_inbound_bench(
    rounds: int = 7, seconds: float = 60.0, batch: int = LINK_BATCH
) -> dict[str, Any]:
    """Each stage's median µs a packet and its median ratio to the decode's, and the load."""
    if rounds < 1 or seconds <= 0 or not 1 <= batch <= 64:
        raise ValueError(f"rounds >= 1, seconds > 0, batch 1-64: {rounds}, {seconds}, {batch}")
    payloads = caller_packets(seconds)
    timings = [asyncio.run(one_round(payloads, batch)) for _ in range(rounds)]
    stages = stage_medians(timings, REFERENCE, "packet", ratio_digits=3)
    return {"packets": len(payloads), "rounds": rounds, "load": load_average(), "stages": stages}


def bench_metrics(quick: bool = False) -> dict[str, Any]:
    """``make bench``'s figures, flat: each stage's µs a packet and its ratio to the decode's,
    and whether the target ratio was met (one round of 5 s when ``quick``: it runs, it
    measures nothing)."""
    result = run_lean_inbound_bench(rounds=1 if quick else 7, seconds=5.0 if quick else 60.0)
    flat = flat_metrics(result, "packet", "opus decode", TARGET_STAGE, TARGET_RATIO)
    return {"packets": result["packets"]} | flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.lean_inbound", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="rounds of every stage (>= 1)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of speech (> 0)")
    parser.add_argument(
        "--batch", type=int, default=LINK_BATCH, help="datagrams at each read of the link (>= 1)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 64:
        parser.error(f"--batch must be 1 to 64, got {args.batch}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0, got {args.seconds}")
    before = load_average()
    result = run_lean_inbound_bench(args.rounds, args.seconds, args.batch)
    print(f"{result['packets']} packets, {result['rounds']} rounds")
    print(f"load average before {before}, after {result['load']}")
    for name, stage in result["stages"].items():
        print(f"{stage['us_per_packet']:8.2f} us  {stage['ratio']:6.3f}x  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
