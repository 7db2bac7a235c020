"""``python -m loadtest.answer_audio``: the transceiver's CPU per second of an answer's audio,
stage by stage, with every call of the process answering at once.

Each call has what a lean-path call of the transceiver has on its way out: a started
``ConversationEngine`` (its model writes one sentence; its speech is the fake OpenAI speech
endpoint's PCM, 24 kHz, in that endpoint's pieces, ``deploy.fake_openai``), its events read as
the session reads them (each ``OutputAudio`` frame into an ``AgentVoiceTrack`` and kept with its
item, ``ItemAudio``), and a ``LeanCall`` sending from the process's one ``LeanMedia`` tick: Opus
at the path's complexity, pylibsrtp (AES-256-GCM, a random key), to a UDP socket on loopback.

CPU of this process (``time.process_time``) per second of answer audio sent, in ms:

- ``tick``: the lean path's tick, every call (take a frame, Opus encode, level, RTP, SRTP,
  sendto, RTCP);
- ``session``: the frames' handling where the session takes them (the track, the item's audio);
- ``engine and loop``: the rest of the run: the answer's audio through the engine (its speech's
  pieces cut into frames, paced one per 20 ms, each an event through the engine's queue), and
  the event loop's own work for all of it;
- ``opus encode alone``: the same frames encoded again, outside the run: the reference each
  stage's ratio is taken against (a ratio, not ms, is what compares runs on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import uvloop

from deploy.fake_openai import SPEECH_CHUNKS, speech_pcm
from loadtest.frame_stages import CollectingSpeechToText
from pipeline import events as ev
from pipeline.chunker import SpeechChunker
from pipeline.config import EngineConfig
from pipeline.engine import ConversationEngine
from pipeline.providers import AudioChunk, LanguageModelEvent, Message, TextDelta, ToolSpec
from transceiver.realtime.item_audio import ItemAudio
from transceiver.webrtc import lean_media
from transceiver.webrtc.audio import AgentVoiceTrack

VOICE_RATE_HZ = 24_000  # the speech endpoint's, the engine's output and the encoder's rate
FRAME_BYTES = 2 * VOICE_RATE_HZ // 50
PAYLOAD_TYPE = 111
SRTP_PROFILE = pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM
SRTP_KEY_BYTES = 32 + 12
PIECE_DELAY_S = 0.01  # between the speech endpoint's pieces (its default chunk delay)
MAX_RUN_S = 120.0
# make bench's target: the answer's audio through the engine and the loop, at most this many
# times the Opus encoding of the same audio (the median of 3 runs: 0.62-0.79x measured at 30
# calls, load 2.9-8.6; single runs 0.47-1.11x)
TARGET_STAGE = "engine and loop"
TARGET_RATIO = 1.0


def answer_text(words: int) -> str:
    """A sentence of ``words`` words: the fake speaks 0.1 s a word, five frames."""
    return " ".join(["moon"] * words) + "."


class SentenceModel:
    """Writes one sentence, whatever it is asked."""

    name = "sentence"

    def __init__(self, text: str) -> None:
        self.text = text

    async def generate(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> AsyncIterator[LanguageModelEvent]:
        yield TextDelta(self.text)


class FakeEndpointSpeech:
    """The fake speech endpoint's PCM for a text, in its pieces (odd-sized), paced as it sends
    them; ``made`` keeps each text's (its sine is Python, not the transceiver's cost: made
    before the run), ``spoken`` what this one said, in order."""

    name = "fake-endpoint"
    voices = ("alloy",)

    def __init__(self, made: dict[str, bytes]) -> None:
        self.made = made
        self.spoken: list[bytes] = []

    async def synthesize(self, text: str, voice: str | None = None) -> AsyncIterator[AudioChunk]:
        pcm = self.made.get(text) or self.made.setdefault(text, speech_pcm(text))
        self.spoken.append(pcm)
        size = len(pcm) // SPEECH_CHUNKS + 1
        for start in range(0, len(pcm), size):
            await asyncio.sleep(PIECE_DELAY_S)
            yield AudioChunk(pcm[start : start + size], VOICE_RATE_HZ)


@dataclass
class Spent:
    """CPU seconds by stage, and what the tick took (each call's frames, in order)."""

    cpu_s: dict[str, float] = field(default_factory=lambda: {"tick": 0.0, "session": 0.0})
    taken: list[list[bytes]] = field(default_factory=list)

    def timed(self, stage: str, work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            started = time.process_time()
            try:
                work()
            finally:
                self.cpu_s[stage] += time.process_time() - started

        return run


class RecordedVoice(AgentVoiceTrack):
    """The agent's track, keeping each frame the tick takes (for the check, not the cost);
    ``drained`` once the tick has found it empty."""

    def __init__(self, taken: list[bytes]) -> None:
        super().__init__(VOICE_RATE_HZ)
        self.taken = taken
        self.drained = asyncio.Event()

    def take(self) -> bytes | None:
        pcm = super().take()
        if pcm is None:
            self.drained.set()
        else:
            self.taken.append(pcm)
        return pcm


def sending_call(
    media: lean_media.LeanMedia, voice: AgentVoiceTrack, ssrc: int, out: socket.socket
) -> lean_media.LeanCall:
    """A ``LeanCall`` wired as ``_configure`` leaves it once DTLS is up, without aiortc: its
    voice out through SRTP to ``out``'s own address (nobody reads it: the kernel drops what
    overflows)."""
    key = os.urandom(SRTP_KEY_BYTES)
    policy = pylibsrtp.Policy(key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND, SRTP_PROFILE)
    transport = SimpleNamespace(sendto=out.sendto)
    pair = SimpleNamespace(protocol=SimpleNamespace(transport=transport))
    pair.remote_addr = out.getsockname()
    owner = SimpleNamespace(sender=SimpleNamespace(_ssrc=ssrc))
    call = lean_media.LeanCall(media, owner, lean_media.LeanInputTrack(), voice)
    call._dtls = SimpleNamespace(_tx_srtp=pylibsrtp.Session(policy))
    call._connection = SimpleNamespace(_nominated={1: pair})
    opus = SimpleNamespace(
        mimeType="audio/opus", clockRate=lean_media.RTP_CLOCK_HZ, payloadType=PAYLOAD_TYPE
    )
    parameters = SimpleNamespace(
        codecs=[opus], rtcp=SimpleNamespace(cname="answer-audio"), headerExtensions=[], muxId=""
    )
    call._configure_sending(parameters)
    call.started = True
    return call


@dataclass
class Call:
    engine: ConversationEngine
    speech: FakeEndpointSpeech
    voice: RecordedVoice
    sender: lean_media.LeanCall
    kept: ItemAudio = field(default_factory=ItemAudio)
    frames: int = 0  # OutputAudio events read
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


async def read_events(call: Call, spent: Spent) -> None:
    """The engine's events as the session reads them: a frame to the track and the item."""
    async for event in call.engine.events():
        if isinstance(event, ev.OutputAudio):
            started = time.process_time()
            call.voice.play(event.response_id, event.pcm)
            call.kept.keep("item", event.pcm, event.sample_rate_hz)
            spent.cpu_s["session"] += time.process_time() - started
            call.frames += 1
        elif isinstance(event, ev.OutputStopped):  # (its frames are all in the track now)
            call.voice.drained.clear()
            call.stopped.set()


def premade(config: EngineConfig, text: str) -> dict[str, bytes]:
    """The fake's PCM for each piece of ``text`` the engine will speak, made now."""
    chunker = SpeechChunker(config.chunker)
    return {chunk: speech_pcm(chunk) for chunk in [*chunker.push(text), *chunker.flush()]}


async def answer_all(calls: int, words: int) -> dict[str, Any]:
    """Every call answers ``words`` words at once; CPU by stage, per second of answer audio."""
    config, text, spent = EngineConfig(), answer_text(words), Spent()
    made = premade(config, text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.bind(("127.0.0.1", 0))
        out.setblocking(False)
        media = lean_media.LeanMedia()
        media._tick = spent.timed("tick", media._tick)  # type: ignore[method-assign]
        started = [await _start_call(config, text, made, media, out, ssrc) for ssrc in range(calls)]
        readers = [asyncio.create_task(read_events(call, spent)) for call in started]
        try:
            return await _measure(started, spent, text)
        finally:
            for call in started:
                await call.engine.aclose()
            await asyncio.gather(*readers, return_exceptions=True)
            await media.aclose()


async def _start_call(
    config: EngineConfig,
    text: str,
    made: dict[str, bytes],
    media: lean_media.LeanMedia,
    out: socket.socket,
    ssrc: int,
) -> Call:
    speech = FakeEndpointSpeech(made)
    engine = ConversationEngine(config, CollectingSpeechToText(), SentenceModel(text), speech)
    await engine.start()
    voice = RecordedVoice([])
    sender = sending_call(media, voice, 1000 + ssrc, out)
    media.add(sender)
    return Call(engine, speech, voice, sender)


async def _measure(calls: list[Call], spent: Spent, text: str) -> dict[str, Any]:
    load = [_loadavg()]
    spent.cpu_s = dict.fromkeys(spent.cpu_s, 0.0)
    started_s = time.process_time()
    for call in calls:
        call.engine.add_user_text("Tell me about the moon.")
        call.engine.create_response()
    async with asyncio.timeout(MAX_RUN_S):
        for call in calls:
            await call.stopped.wait()
            await call.voice.drained.wait()  # the tick has taken the last frames
    cpu_s = time.process_time() - started_s
    load.append(_loadavg())
    taken = [b"".join(call.voice.taken) for call in calls]
    packets = sum(call.sender.packets_sent for call in calls)
    answer_s = sum(len(pcm) for pcm in taken) / (2 * VOICE_RATE_HZ)
    stages = {"all": cpu_s, **spent.cpu_s}
    stages["engine and loop"] = cpu_s - sum(spent.cpu_s.values())
    stages["opus encode alone"] = encode_cpu_s([call.voice.taken for call in calls])
    return {
        "calls": len(calls),
        "answer_s": answer_s,
        "frames": {
            "read": sum(call.frames for call in calls),
            "taken": sum(len(call.voice.taken) for call in calls),
        },
        "rtp_packets": packets,
        "load": load,
        "ms_per_answer_s": {name: 1000 * s / answer_s for name, s in stages.items()},
        "bit_exact": all(
            pcm == b"".join(call.speech.spoken) for pcm, call in zip(taken, calls, strict=True)
        ),
    }


def encode_cpu_s(frames_by_call: list[list[bytes]]) -> float:
    """CPU to encode the same frames again, each call's with an encoder of its own."""
    started_s = time.process_time()
    for frames in frames_by_call:
        encoder = lean_media.OpusEncoder(VOICE_RATE_HZ, FRAME_BYTES // 2)
        for frame in frames:
            encoder.encode(frame)
        encoder.close()
    return time.process_time() - started_s


def _loadavg() -> str:
    with open("/proc/loadavg") as load:
        return " ".join(load.read().split()[:3])


def measure(calls: int, words: int) -> dict[str, Any]:
    """One run on uvloop, as the transceiver runs."""
    result: dict[str, Any] = uvloop.run(answer_all(calls, words))
    return result


def bench_metrics(quick: bool = False) -> dict[str, Any]:
    """``make bench``'s figures, flat: each stage's ms per answer-second and its ratio to the
    Opus encoding of the same audio, the median of 3 runs of 30 calls (``quick``: one run of
    2 calls, 1 s each: it runs, it measures nothing), and whether the target was met."""
    runs = [measure(2, 10)] if quick else [measure(30, 40) for _ in range(3)]
    metrics: dict[str, Any] = {"calls": runs[0]["calls"], "runs": len(runs)}
    metrics["load average"] = "; ".join(" -> ".join(run["load"]) for run in runs)
    metrics["PCM taken as spoken"] = all(run["bit_exact"] for run in runs)
    ratios: dict[str, float] = {}
    for name in runs[0]["ms_per_answer_s"]:
        ms = statistics.median(run["ms_per_answer_s"][name] for run in runs)
        ratios[name] = statistics.median(_ratio(run, name) for run in runs)
        metrics[f"{name}: ms per answer-second"] = ms
        metrics[f"{name}: / opus encode"] = ratios[name]
    met = ratios[TARGET_STAGE] <= TARGET_RATIO
    metrics[f"target: {TARGET_STAGE} <= {TARGET_RATIO}x opus encode"] = "met" if met else "missed"
    return metrics


def _ratio(run: dict[str, Any], name: str) -> float:
    stages = run["ms_per_answer_s"]
    return float(stages[name] / stages["opus encode alone"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.answer_audio", description=__doc__)
    parser.add_argument("--calls", type=int, default=30, help="answers at once (>= 1)")
    parser.add_argument("--words", type=int, default=40, help="an answer's words, 0.1 s each")
    parser.add_argument("--runs", type=int, default=3, help="runs, one after another (>= 1)")
    args = parser.parse_args(argv)
    for name in ("calls", "words", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for _ in range(args.runs):
        result = measure(args.calls, args.words)
        load = " -> ".join(result["load"])
        print(f"{result['calls']} calls, {result['answer_s']:.1f} answer-seconds, load {load}")
        reference = result["ms_per_answer_s"]["opus encode alone"]
        for name, ms in result["ms_per_answer_s"].items():
            print(f"{ms:8.2f} ms  {ms / reference:5.2f}x  {name}")
        if not result["bit_exact"]:
            print("the PCM the tick took is NOT the speech's")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
