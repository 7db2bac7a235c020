"""``python -m loadtest.media_stages``: the lean media path's per-packet CPU, stage by stage.

A µ-benchmark beside ``loadtest.media_cost`` (which measures whole calls): the same code a
call runs, without the network. A ``LeanCall`` is given real pylibsrtp sessions (a random key,
AES-256-GCM: the profile aiortc's DTLS-SRTP offers first) and the pipeline's per-frame consumer
(a ``TurnDetector`` with webrtcvad at 16 kHz, the rate the path decodes at), and is fed SRTP
packets of piper's speech encoded as a browser sends it (mono voip Opus, 32 kbit/s); outbound,
the stages of a tick that sends the agent's voice (24 kHz, as the TTS gives it). The decode is
also timed on the same speech coded no wider than wideband, as a browser codes it when the
answer says ``maxplaybackrate=16000`` (``transceiver.webrtc.sdp.opus_fmtp``). Each stage is
timed alone, then the whole inbound path (``LeanCall.on_media``: unprotect, parse, reorder,
decode, VAD), and an ablation of it: as it was (48 kHz and soxr), then its stages taken away
one by one, which gives each one's cost in place.

CPU time of this process (``time.process_time``), per packet, in µs: a shared machine's other
load shows up as noise, not as our cost (the machine's load average is printed beside).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import soxr

from loadtest.voice_calls import opus_packets
from pipeline.config import VadConfig
from pipeline.vad import TurnDetector, webrtc_classifier
from transceiver.webrtc import lean_media
from transceiver.webrtc.audio import AgentVoiceTrack

PAYLOAD_TYPE = 111
INPUT_RATE_HZ = 16_000
VOICE_RATE_HZ = 24_000
WIDEBAND_CUTOFF_HZ = 8_000  # a browser told maxplaybackrate=16000 codes this wide
# The profile aiortc offers first (and Chromium takes): AES-256-GCM, a 32-byte key, 12-byte salt.
SRTP_PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM
SRTP_KEY_BYTES = 32 + 12
TEXT = "Tell me about the moon. It is about four hundred thousand kilometres away."


def srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    """A sender's and a receiver's session on one random key (as DTLS-SRTP would set up)."""
    key = os.urandom(SRTP_KEY_BYTES)
    outbound = pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, SRTP_PROFILE)
    inbound = pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_INBOUND, SRTP_PROFILE)
    return pylibsrtp.Session(outbound), pylibsrtp.Session(inbound)


async def speech(rate_hz: int) -> bytes:
    from loadtest.voice_audio import Speaker

    async with Speaker() as speaker:
        return await speaker.speak(TEXT, rate_hz)


def protected(packets: list[bytes], sender: pylibsrtp.Session) -> list[bytes]:
    out = []
    for sequence, payload in enumerate(packets):
        header = lean_media.rtp_header(False, PAYLOAD_TYPE, sequence, sequence * 960, 4242)
        out.append(sender.protect(header + payload))
    return out


def receiving_call(receiver: pylibsrtp.Session, detector: TurnDetector) -> lean_media.LeanCall:
    """A ``LeanCall`` wired as ``_configure`` leaves it, without aiortc: SRTP in, frames out."""
    transceiver = SimpleNamespace(sender=SimpleNamespace(_ssrc=1))
    heard = lean_media.LeanInputTrack()
    heard.push, heard.rate_hz = lambda pcm: _feed(detector, pcm), INPUT_RATE_HZ
    call = lean_media.LeanCall(lean_media.LeanMedia(), transceiver, heard, None)
    call._dtls = SimpleNamespace(_rx_srtp=receiver)
    call._accepted_types = frozenset({PAYLOAD_TYPE})
    return call


def _feed(detector: TurnDetector, pcm: bytes) -> None:
    step = 2 * INPUT_RATE_HZ // 50
    for start in range(0, len(pcm) - step + 1, step):
        detector.push(pcm[start : start + step])


def per_run_us(work: Callable[[int], Any], runs: int) -> float:
    started = time.process_time()
    for index in range(runs):
        work(index)
    return (time.process_time() - started) / runs * 1e6


def inbound_stages(packets: list[bytes], runs: int, wideband: list[bytes]) -> dict[str, float]:
    sender, receiver = srtp_pair()
    srtp = protected([packets[i % len(packets)] for i in range(runs)], sender)
    detector = TurnDetector(
        VadConfig(), INPUT_RATE_HZ, webrtc_classifier(VadConfig(), INPUT_RATE_HZ), time.monotonic
    )
    call = receiving_call(receiver, detector)
    whole = per_run_us(lambda i: call.on_media(srtp[i]), runs)
    decoder = lean_media.OpusDecoder(lean_media.RTP_CLOCK_HZ)
    decoder16 = lean_media.OpusDecoder(INPUT_RATE_HZ)
    wideband_decoder = lean_media.OpusDecoder(INPUT_RATE_HZ)
    decoded = [decoder.decode(p) or b"" for p in packets]
    resampler = soxr.ResampleStream(lean_media.RTP_CLOCK_HZ, INPUT_RATE_HZ, 1, dtype="int16")
    pcm16 = b"".join(lean_media._resample(resampler, pcm) for pcm in decoded)
    step = 2 * INPUT_RATE_HZ // 50
    frames16 = [pcm16[i : i + step] for i in range(0, len(pcm16) - step + 1, step)]
    plain = [p[:-10] for p in srtp]  # the sizes and bytes a parse sees (not valid SRTP)
    sender3, receiver3 = srtp_pair()
    again = protected([packets[i % len(packets)] for i in range(runs)], sender3)
    return {
        "srtp unprotect": per_run_us(lambda i: receiver3.unprotect(again[i]), runs),
        "rtp parse": per_run_us(lambda i: lean_media.parse_rtp(plain[i]), runs),
        "opus decode 48 kHz": per_run_us(lambda i: decoder.decode(packets[i % len(packets)]), runs),
        "opus decode 16 kHz (what the path does)": per_run_us(
            lambda i: decoder16.decode(packets[i % len(packets)]), runs
        ),
        "opus decode 16 kHz, caller coding wideband (maxplaybackrate=16000)": per_run_us(
            lambda i: wideband_decoder.decode(wideband[i % len(wideband)]), runs
        ),
        "resample 48 -> 16 kHz (soxr)": per_run_us(
            lambda i: lean_media._resample(resampler, decoded[i % len(decoded)]), runs
        ),
        "VAD + turn detector (20 ms)": per_run_us(
            lambda i: detector.push(frames16[i % len(frames16)]), runs
        ),
        "whole inbound path (on_media)": whole,
    }


def inbound_ablation(packets: list[bytes], runs: int, rounds: int = 5) -> dict[str, float]:
    """The whole inbound path as it is (decoding at 16 kHz) and as it was (48 kHz, then soxr),
    then with its stages taken away one by one (the consumer, then the decode), each variant on
    a fresh call, the variants interleaved ``rounds`` times: the median µs per packet. The
    differences are each stage's cost in place (its caches shared with the others), which the
    stages timed alone understate."""
    steps = (
        "whole inbound path",
        "whole, decoded at 48 kHz + soxr",
        "- consumer (VAD, turns)",
        "- opus decode",
    )
    timings: dict[str, list[float]] = {step: [] for step in steps}
    for _ in range(rounds):
        for step in steps:
            sender, receiver = srtp_pair()
            srtp = protected([packets[i % len(packets)] for i in range(runs)], sender)
            call = _ablated(receiver, step)
            timings[step].append(per_run_us(_feeding(call, srtp), runs))
    return {f"ablation: {step}": statistics.median(us) for step, us in timings.items()}


def _feeding(call: lean_media.LeanCall, srtp: list[bytes]) -> Callable[[int], None]:
    return lambda index: call.on_media(srtp[index])


def _ablated(receiver: pylibsrtp.Session, step: str) -> lean_media.LeanCall:
    config = VadConfig()
    classify = webrtc_classifier(config, INPUT_RATE_HZ)
    call = receiving_call(receiver, TurnDetector(config, INPUT_RATE_HZ, classify, time.monotonic))
    decoder = call._new_decoder(INPUT_RATE_HZ)
    if step == "whole, decoded at 48 kHz + soxr":
        call._decoder = lean_media.OpusDecoder(lean_media.RTP_CLOCK_HZ)
        call._resampler = soxr.ResampleStream(
            lean_media.RTP_CLOCK_HZ, INPUT_RATE_HZ, 1, dtype="int16"
        )
    if step.startswith("-"):
        call.heard.push = lambda pcm: None
    if step == "- opus decode":
        frame = bytes(2 * INPUT_RATE_HZ // 50)
        decoder.decode = lambda payload: frame  # type: ignore[method-assign]
    return call


def outbound_stages(voice_pcm: bytes, runs: int) -> dict[str, float]:
    step = 2 * VOICE_RATE_HZ // 50
    frames = [voice_pcm[i : i + step] for i in range(0, len(voice_pcm) - step + 1, step)]
    encoder = lean_media.OpusEncoder(VOICE_RATE_HZ, VOICE_RATE_HZ // 50)
    sender, _ = srtp_pair()
    payload = encoder.encode(frames[0])
    packets = [
        lean_media.rtp_header(False, PAYLOAD_TYPE, i, i * 960, 3) + payload for i in range(runs)
    ]  # each its own sequence number: SRTP refuses to protect one twice
    silence = bytes(step)
    return {
        "opus encode 24 kHz speech": per_run_us(
            lambda i: encoder.encode(frames[i % len(frames)]), runs
        ),
        "opus encode 24 kHz silence": per_run_us(lambda i: encoder.encode(silence), runs),
        "audio level (RFC 6464)": per_run_us(
            lambda i: lean_media.level_dbov(frames[i % len(frames)]), runs
        ),
        "srtp protect": per_run_us(lambda i: sender.protect(packets[i]), runs),
        "voice track take (AgentVoiceTrack)": _take_us(frames, runs),
    }


def _take_us(frames: list[bytes], runs: int) -> float:
    async def timed() -> float:
        track = AgentVoiceTrack(VOICE_RATE_HZ)
        for index in range(runs):
            track.play("resp", frames[index % len(frames)])
        return per_run_us(lambda _: track.take(), runs)

    return asyncio.run(timed())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.media_stages", description=__doc__)
    parser.add_argument("--packets", type=int, default=3000)
    args = parser.parse_args(argv)
    said = asyncio.run(speech(lean_media.RTP_CLOCK_HZ))
    caller, wideband = opus_packets(said), opus_packets(said, cutoff_hz=WIDEBAND_CUTOFF_HZ)
    voice = asyncio.run(speech(VOICE_RATE_HZ))
    with open("/proc/loadavg") as load:
        print(f"load average {load.read().strip()}")
    for name, us in {
        **inbound_stages(caller, args.packets, wideband),
        **inbound_ablation(caller, args.packets // 2),
        **outbound_stages(voice, args.packets),
    }.items():
        print(f"{us:8.1f} us  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
