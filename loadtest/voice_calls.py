"""Lean WebRTC voice calls for the load tester, and the driver process that runs many of them.

A ``VoiceCall`` is a real aiortc peer (ICE, DTLS, SRTP, Opus, the ``oai-events`` channel) made
cheap where a load generator can be:

- It sends **pre-encoded Opus**: every question is spoken by piper and encoded once per run
  (``Questions``); the track hands aiortc ``av.Packet`` s, so aiortc packs them (no encoder,
  no executor hop, no audio-level loop). Between questions it sends one pre-encoded silence
  packet per 20 ms, as a browser's microphone would: the server's VAD needs the silence to end
  a turn; or, when the answer asks for Opus DTX (``usedtx=1``: the lean media path), as a
  browser's encoder then does: after 200 ms of silence one packet every 400 ms, sequence
  numbers consecutive and the RTP timestamp advancing over the gaps.
- Sending is **batched on one clock**: every call's track waits on the same ``Metronome`` tick,
  so the loop wakes once per 20 ms for all calls, not once per call.
- With ``--client lean`` (``loadtest.lean_client``), its audio leaves aiortc once DTLS is up:
  one 20 ms timer sends every call's next packet (RTP header, SRTP, ``sendto``) and received
  RTP is unprotected and read for its audio level straight off the ICE socket; with
  ``--client aiortc`` aiortc's sender tasks send it and its RTP path receives.
- It **decodes nothing**: aiortc's receive path (jitter buffer, decoder thread, frame queue)
  is bypassed per receiver. The answer's onset is read from the RFC 6465 audio level the
  server puts in every RTP header; only when a packet lacks it is that packet decoded (and
  only while a turn waits for its answer).

A turn: speak a question, then silence; latency = the first loud packet after the last speech
packet left, at the client (loop clock). The user transcript and the answer's transcript come
from the channel's events; a turn is over at ``response.done`` once the answer's audio has
gone quiet again. A failed turn is reported with what the client saw of it: the server events
of the turn (types and ms from the speech end), packets received, the connection's state.

**Resume.** The server sends a packet every 20 ms, answer or silence; a call that hears none
for ``--silence-s`` (1 s) takes its transceiver for gone, cuts the turn in flight, resumes the
session on a new peer connection (its session id and resume token, through the front door)
and asks the cut question again (``VoiceCall``, which says why silence and not aiortc's
connection state; ``Driver``). Each resume is one ``{"ev": "resume", ...}`` line.

**Why a driver process** (Locust cannot run asyncio code inside its gevent-patched process,
locust#1251): ``python -m loadtest.voice_calls`` is one asyncio process per Locust worker,
spoken to over its stdin/stdout in JSON lines (``{"op": "call", ...}`` in, ``{"ev": "turn",
...}`` out). A thread with its own loop would share the patched ``socket``/``select``/
``threading`` modules and the worker's GIL (aiortc's per-receiver threads under gevent's
patches); a non-asyncio handshake would mean rewriting aiortc. A child process has its own
GIL, its CPU is exactly the client's cost (read from /proc by the worker), and a crash in it
is a counted failure, not a dead worker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fractions
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket

from loadtest.hosts import process_tree, rss_mb
from loadtest.lean_client import LeanClientMedia, LeanLeg

RATE_HZ = 48_000
FRAME_SAMPLES = 960  # 20 ms
FRAME_S = FRAME_SAMPLES / RATE_HZ
TIME_BASE = fractions.Fraction(1, RATE_HZ)
LOUD_LEVEL = 40  # RFC 6465 level (-dBov): 40 and below is louder than -40 dBov (RMS 0.01)
WIDEBAND_CUTOFF_HZ = 8_000  # libopus's cutoff for wideband: what maxplaybackrate=16000 asks
MAX_PLAYBACK_RATE = re.compile(r"^a=fmtp:\d+ .*\bmaxplaybackrate=(\d+)", re.MULTILINE)
USE_DTX = re.compile(r"^a=fmtp:\d+ .*\busedtx=1\b", re.MULTILINE)
# Opus DTX as a browser's encoder sends it (the answer said usedtx=1): after this many packets
# of silence (its 200 ms hangover), one every DTX_INTERVAL_PACKETS (400 ms); speech at once
DTX_HANGOVER_PACKETS = 10
DTX_INTERVAL_PACKETS = 20
QUIET_PACKETS = 10  # this many quiet packets in a row: the answer has stopped playing
QUIET_GAP_S = 0.2  # or no packet at all for this long (a sender that pauses while silent)
QUESTIONS = ("What time is it?", "Tell me about coffee.", "When does the library open?")
API_KEY_ENV = "TRANSCEIVER_API_KEY"  # sent as Authorization: Bearer, when set
SETUP_TIMEOUT_S = 20.0
TURN_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0
SILENCE_RESUME_S = 1.0  # no RTP from the server for this long: its transceiver is gone
WATCH_S = 0.1  # how often the driver looks at every call's last packet
STALL_S = 0.3  # a look this late: the driver's own loop stalled, packets may wait unread
RESUME_ATTEMPTS = 3  # a refused connection, 502 or 503 is tried again, RESUME_RETRY_S apart
RESUME_RETRY_S = 0.5
MAX_TURN_EVENTS = 60  # server events kept per turn for a failed turn's report row
CLIENTS = ("aiortc", "lean")  # the calls' media path (``--client``)
SESSION_HEADER = "X-Voicerelay-Session"
TOKEN_HEADER = "X-Voicerelay-Resume-Token"
Event = dict[str, Any]


# --- the questions, spoken and encoded once ------------------------------------------------


@dataclass(frozen=True)
class Question:
    text: str
    packets: list[bytes]  # 20 ms Opus packets
    # the same, coded no wider than wideband: what a browser sends when the answer says
    # maxplaybackrate=16000 (empty: the full-band packets go in any case)
    wideband: list[bytes] = field(default_factory=list)

    def coded_for(self, max_playback_rate_hz: int | None) -> list[bytes]:
        """The packets a browser would send under the answer's ``maxplaybackrate``."""
        narrow = max_playback_rate_hz is not None and max_playback_rate_hz <= 16_000
        return self.wideband if narrow and self.wideband else self.packets


@dataclass(frozen=True)
class Questions:
    questions: list[Question]
    silence: bytes  # one 20 ms Opus packet of digital silence
    wideband_silence: bytes = b""  # the same coded no wider than wideband (Question.wideband)

    def silence_for(self, max_playback_rate_hz: int | None) -> bytes:
        """The silence a browser would send under the answer's ``maxplaybackrate``."""
        narrow = max_playback_rate_hz is not None and max_playback_rate_hz <= 16_000
        return self.wideband_silence if narrow and self.wideband_silence else self.silence

    def to_json(self) -> str:
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        spoken = [
            {
                "text": q.text,
                "packets": [b64(p) for p in q.packets],
                "wideband": [b64(p) for p in q.wideband],
            }
            for q in self.questions
        ]
        silences = {"silence": b64(self.silence), "wideband_silence": b64(self.wideband_silence)}
        return json.dumps({"questions": spoken, **silences})

    @classmethod
    def from_json(cls, text: str) -> Questions:
        data = json.loads(text)
        spoken = [
            Question(
                q["text"],
                [base64.b64decode(p) for p in q["packets"]],
                [base64.b64decode(p) for p in q.get("wideband", [])],
            )
            for q in data["questions"]
        ]
        wideband_silence = base64.b64decode(data.get("wideband_silence", ""))
        return cls(spoken, base64.b64decode(data["silence"]), wideband_silence)


def answer_uses_dtx(sdp: str) -> bool:
    """Whether an answer's Opus format line asks the caller for DTX (RFC 7587 ``usedtx``)."""
    return USE_DTX.search(sdp) is not None


def answer_playback_rate_hz(sdp: str) -> int | None:
    """The ``maxplaybackrate`` an answer's format line asks for (RFC 7587: Opus), else None."""
    match = MAX_PLAYBACK_RATE.search(sdp)
    return None if match is None else int(match.group(1))


def opus_packets(pcm: bytes, bitrate: int = 32_000, cutoff_hz: int | None = None) -> list[bytes]:
    """48 kHz mono s16 PCM as 20 ms Opus packets (as a browser sends: mono voip); with
    ``cutoff_hz`` (8000: wideband) coded no wider, as a browser does when the answer says
    ``maxplaybackrate`` (16000)."""
    codec: Any = av.CodecContext.create("libopus", "w")
    codec.bit_rate, codec.format, codec.layout = bitrate, "s16", "mono"
    codec.sample_rate, codec.time_base = RATE_HZ, TIME_BASE
    options = {"application": "voip"}
    codec.options = options if cutoff_hz is None else {**options, "cutoff": str(cutoff_hz)}
    step = 2 * FRAME_SAMPLES
    pcm += b"\0" * (-len(pcm) % step)
    packets: list[bytes] = []
    for start in range(0, len(pcm), step):
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm[start : start + step])
        frame.sample_rate, frame.pts = RATE_HZ, start // 2
        packets += [bytes(p) for p in codec.encode(frame)]
    return packets + [bytes(p) for p in codec.encode(None)]


async def spoken_questions(texts: Sequence[str] = QUESTIONS) -> Questions:
    """Each text spoken by piper (noise off: the same audio every run), encoded once."""
    from loadtest.voice_audio import Speaker

    async with Speaker() as speaker:
        spoken = []
        for text in texts:
            pcm = await speaker.speak(text)
            wideband = opus_packets(pcm, cutoff_hz=WIDEBAND_CUTOFF_HZ)
            spoken.append(Question(text, opus_packets(pcm), wideband))
    quiet = b"\0" * 2 * FRAME_SAMPLES * 10
    silence = opus_packets(quiet)[5]  # past the encoder's start-up
    return Questions(spoken, silence, opus_packets(quiet, cutoff_hz=WIDEBAND_CUTOFF_HZ)[5])


# --- sending: one clock for every call ----------------------------------------------------


class Metronome:
    """A 20 ms tick shared by every call's track: one timer wakes the loop for all of them.

    Each waiter gets a future of its own: a call's sender task cancelled while it waits (its
    peer connection closing) cancels that future only. (One future shared by all would be
    cancelled with it, and every other call's sender would end on that CancelledError: aiortc
    takes it as its own stop, silently.)"""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[float]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._next_s = 0.0

    def next_tick(self) -> asyncio.Future[float]:
        """A future resolved (with the loop time) at the next tick."""
        loop = asyncio.get_running_loop()
        if self._handle is None:
            self._next_s = max(self._next_s + FRAME_S, loop.time())
            self._handle = loop.call_at(self._next_s, self._fire)
        waiter = loop.create_future()
        self._waiters.append(waiter)
        return waiter

    def _fire(self) -> None:
        waiters, self._waiters, self._handle = self._waiters, [], None  # the next ask re-arms
        now_s = asyncio.get_running_loop().time()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(now_s)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters = []


class OpusSpeechTrack(MediaStreamTrack):
    """A microphone of pre-encoded packets: a queued question, else silence, one per tick;
    with ``dtx`` (the answer asked for it), silence as Opus DTX sends it: after
    ``DTX_HANGOVER_PACKETS`` a packet every ``DTX_INTERVAL_PACKETS`` ticks, nothing between
    (the RTP timestamp still advances a tick's worth at each)."""

    kind = "audio"

    def __init__(self, metronome: Metronome, silence: bytes) -> None:
        super().__init__()
        self._metronome, self.silence = metronome, silence  # the packet sent between questions
        self.dtx = False
        self._speech: list[bytes] = []
        self._next = 0
        self._pts = 0
        self._quiet = 0  # ticks of silence since the last speech packet
        self.speech_ended: asyncio.Future[float] | None = None

    def say(self, packets: list[bytes]) -> asyncio.Future[float]:
        """Queue a question; the future resolves when its last packet has gone out."""
        self._speech, self._next = packets, 0
        self.speech_ended = asyncio.get_running_loop().create_future()
        return self.speech_ended

    async def recv(self) -> av.Packet[Any]:
        payload = None
        for _ in range(DTX_INTERVAL_PACKETS):  # in DTX, the ticks without a packet
            if self.readyState != "live":
                raise MediaStreamError
            now_s = await self._metronome.next_tick()
            payload, pts = self.next_payload(now_s), self._pts
            self._pts += FRAME_SAMPLES  # aiortc's RTP timestamp: over the gap too
            if payload is not None:
                break
        packet = av.Packet(payload or self.silence)
        packet.pts, packet.time_base = pts, TIME_BASE
        return packet

    def next_payload(self, now_s: float) -> bytes | None:
        """This tick's packet: the queued question's next, else silence, or in DTX nothing
        (``now_s``: when it goes out, the question's end if it is its last)."""
        if self._next >= len(self._speech):
            self._quiet += 1
            if not self.dtx or self._quiet <= DTX_HANGOVER_PACKETS:
                return self.silence
            in_dtx = self._quiet - DTX_HANGOVER_PACKETS
            return self.silence if in_dtx % DTX_INTERVAL_PACKETS == 0 else None
        self._quiet = 0
        payload = self._speech[self._next]
        self._next += 1
        if self._next == len(self._speech) and self.speech_ended and not self.speech_ended.done():
            self.speech_ended.set_result(now_s)  # sent in this loop iteration
        return payload


# --- receiving: the answer's onset without decoding ---------------------------------------


class AnswerMeter:
    """Stands in for an audio receiver's RTP path: notes loud and quiet packets. A packet
    without the audio-level extension is decoded only while it matters: a turn waits for its
    answer, or the answer is playing. The answer has stopped when ``QUIET_PACKETS`` quiet packets
    came in a row, or none for ``QUIET_GAP_S`` (a sender that stays silent between talkspurts,
    as with Opus DTX, sends nothing: see ``idle``)."""

    def __init__(self) -> None:
        self.onset: asyncio.Future[float] | None = None  # the next loud packet's arrival
        self.quiet = asyncio.Event()  # QUIET_PACKETS quiet packets in a row
        self.packets = 0
        self.first_packet_s: float | None = None  # loop time of the first packet, the last
        self.last_packet_s: float | None = None
        self._quiet_run = 0
        self._decoder: Any = None

    def expect_answer(self) -> asyncio.Future[float]:
        self.onset = asyncio.get_running_loop().create_future()
        return self.onset

    async def handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int = 0) -> None:
        level = packet.extensions.audio_level
        self.heard(None if level is None else level[1], packet.payload)

    def heard(self, level: int | None, payload: bytes) -> None:
        """A packet of the answer's stream: its RFC 6464 level (-dBov) if it had one."""
        self.packets += 1
        self.last_packet_s = now_s = asyncio.get_running_loop().time()
        if self.first_packet_s is None:
            self.first_packet_s = now_s
        waiting = self.onset is not None and not self.onset.done()
        if self._loud(level, payload, decode=waiting or not self.quiet.is_set()):
            self._quiet_run = 0
            self.quiet.clear()
            if self.onset is not None and not self.onset.done():
                self.onset.set_result(now_s)
        else:
            self._quiet_run += 1
            if self._quiet_run >= QUIET_PACKETS:
                self.quiet.set()

    def idle(self, now_s: float) -> None:
        """Nothing came for ``QUIET_GAP_S``: whatever was playing has stopped."""
        if self.last_packet_s is not None and now_s - self.last_packet_s >= QUIET_GAP_S:
            self.quiet.set()

    def _loud(self, level: int | None, payload: bytes, decode: bool) -> bool:
        if level is not None:
            return level <= LOUD_LEVEL
        return decode and self._decoded_rms(payload) > 10 ** (-LOUD_LEVEL / 20)

    def _decoded_rms(self, payload: bytes) -> float:
        if self._decoder is None:
            self._decoder = av.CodecContext.create("libopus", "r")
            self._decoder.sample_rate, self._decoder.layout = RATE_HZ, "mono"
        frames = self._decoder.decode(av.Packet(payload))
        if not frames:
            return 0.0
        samples = np.concatenate([f.to_ndarray().ravel() for f in frames]).astype(np.float64)
        scale = 32768.0 if frames[0].format.name.startswith("s16") else 1.0
        return math.sqrt(float(np.mean(np.square(samples / scale)))) if samples.size else 0.0


# --- one call -----------------------------------------------------------------------------


class CallFailed(Exception):
    """A call or turn failed; the message is the reason counted in the report."""


class MediaLost(Exception):
    """The transceiver under the call went silent (or its connection failed): resume."""

    def __init__(self, stage: str, last_packet_s: float) -> None:
        super().__init__(f"media lost while the turn was at {stage}")
        self.stage = stage  # how far the cut turn had got (``VoiceCall.stage``)
        self.last_packet_s = last_packet_s  # loop time of the last packet heard


@dataclass
class TurnResult:
    turn: int
    latency_ms: float
    heard: str  # the server's transcript of the question
    answer: str  # the answer's transcript
    server_first_frame_ms: float | None = None  # the server's own speech-stopped -> first frame
    onset_s: float = 0.0  # loop time of the answer's first loud packet
    stages: dict[str, float] = field(default_factory=dict)  # turn_stages


def turn_stages(metrics: Event, latency_ms: float) -> dict[str, float]:
    """Where a turn's latency went, in ms, from the server's ``voicerelay.turn.metrics``:
    ``decision`` (its last voiced frame -> speech stopped: the silence window or the end-of-turn
    model), ``server`` (speech stopped -> first frame sent), its parts from speech stopped
    (``stt``, ``llm``: first token, ``tts``: first audio), and ``outside``: the rest of the
    client's latency (the question's tail after its last voiced frame, both ways on the wire,
    the link's reads and the client's own loop). A stage the event lacks is left out."""
    stages: dict[str, float] = {}
    last_voiced, first_out = metrics.get("last_voiced_ms"), metrics.get("first_frame_out_ms")
    named = {"stt": "stt_final_ms", "llm": "llm_first_token_ms", "tts": "first_audio_ms"}
    for stage, key in (("server", "first_frame_out_ms"), *named.items()):
        if isinstance(metrics.get(key), int | float):
            stages[stage] = float(metrics[key])
    if isinstance(last_voiced, int | float):
        stages["decision"] = -float(last_voiced)
        if isinstance(first_out, int | float):
            stages["outside"] = latency_ms - (float(first_out) - float(last_voiced))
    return stages


@dataclass
class _Waits:
    """What a turn waits for on the channel, resolved by ``VoiceCall._on_message``."""

    heard: asyncio.Future[str]
    done: asyncio.Future[Event]
    metrics: asyncio.Future[Event]
    stopped: asyncio.Future[Event]  # output_audio_buffer.stopped: the answer played to its end

    @classmethod
    def new(cls) -> _Waits:
        loop = asyncio.get_running_loop()
        futures = (loop.create_future() for _ in range(4))
        return cls(*futures)

    def fail(self, reason: str) -> None:
        for future in (self.heard, self.done, self.metrics, self.stopped):
            if not future.done():
                future.set_exception(CallFailed(reason))


class EventLog:
    """The server events of one turn, for the report row of a turn that fails: (loop time,
    type), a run of one type (transcript deltas) folded into one entry with its count; past
    ``MAX_TURN_EVENTS`` entries the rest are only counted."""

    def __init__(self, started_s: float) -> None:
        self.started_s = started_s
        self.speech_end_s: float | None = None
        self.entries: list[list[Any]] = []  # [loop time, type, count]
        self.not_kept = 0

    def add(self, now_s: float, kind: str) -> None:
        if self.entries and self.entries[-1][1] == kind:
            self.entries[-1][2] += 1
        elif len(self.entries) < MAX_TURN_EVENTS:
            self.entries.append([now_s, kind, 1])
        else:
            self.not_kept += 1

    def as_json(self) -> dict[str, Any]:
        """``events``: ``[ms, type, count]``, ms from the speech end (before it: negative), or
        from the turn's start when the question never finished (``from`` says which)."""
        zero = self.started_s if self.speech_end_s is None else self.speech_end_s
        return {
            "from": "turn_start" if self.speech_end_s is None else "speech_end",
            "events": [[round((t - zero) * 1000, 1), kind, n] for t, kind, n in self.entries],
            "not_kept": self.not_kept,
        }


@dataclass
class VoiceCall:
    """One lean call: connect (POST the offer, wait for session.created), turns, close; and,
    when its transceiver goes away, ``resume`` on another one over a new peer connection.

    Each peer connection (a *leg*) has its own track, meter, channel and ``lost`` future. The
    driver resolves ``lost`` when no RTP has come for ``silence_s`` (``check_media``): the
    transceiver's outgoing track sends a packet every 20 ms, answer or silence, so a gap of a
    second is a dead server, and it is seen within that second. aiortc's own signal,
    ``connectionState`` turning ``failed``, is watched too but comes much later (aioice's
    consent checks give up after about 30 s), and a SIGKILLed peer sends no DTLS or SCTP
    close. A turn in flight when ``lost`` resolves is cut (``MediaLost``)."""

    metronome: Metronome
    questions: Questions
    headers: dict[str, str] = field(default_factory=dict)
    turns_done: int = 0
    session_id: str = ""
    resume_token: str = ""
    ever_connected: bool = False
    legs: int = 0
    stage: str = "idle"  # of the turn in flight: question, answer_wait, answer; else idle
    lean: LeanClientMedia | None = None  # the lean client media, else aiortc's RTP path
    max_playback_rate_hz: int | None = None  # the answer's, for Opus: the questions' band

    def __post_init__(self) -> None:
        self._closing: set[asyncio.Task[None]] = set()  # legs left behind, closing
        self._lean_leg: LeanLeg | None = None
        self._open_leg()

    def _open_leg(self) -> None:
        loop = asyncio.get_running_loop()
        self.legs += 1
        leg = self.legs
        self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.track = OpusSpeechTrack(self.metronome, self.questions.silence)
        self.meter = AnswerMeter()
        transceiver = pc.addTransceiver(self.track, direction="sendrecv")
        if self._lean_leg is not None:
            self._lean_leg.close()  # the leg left behind sends no more
        if self.lean is not None:
            self._lean_leg = self.lean.take_over(
                transceiver, self.track.next_payload, self.meter.heard
            )
        else:
            transceiver.receiver._handle_rtp_packet = self.meter.handle_rtp_packet  # type: ignore[method-assign]
        self.channel = pc.createDataChannel("oai-events")
        self.channel.on("message", lambda data: self._on_message(leg, data))
        self._created: asyncio.Future[Event] = loop.create_future()
        self.lost: asyncio.Future[float] = loop.create_future()  # the last packet's loop time
        self.connected_s: float | None = None  # this leg's session.created
        self.restored_items = 0  # stored conversation items replayed on this leg
        self.log = EventLog(loop.time())
        self._excused_s = 0.0
        self._waits: _Waits | None = None

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "failed" and leg == self.legs:
                self._lose(loop.time())

    def _lose(self, now_s: float) -> None:
        if self.connected_s is not None and not self.lost.done():
            self.lost.set_result(self.meter.last_packet_s or self.connected_s or now_s)

    def check_media(self, now_s: float, silence_s: float, stalled: bool) -> None:
        """Resolve ``lost`` when nothing has come for ``silence_s`` (0: never). After a stall
        of the driver's own loop (``stalled``) packets may wait unread: the clock restarts."""
        self.meter.idle(now_s)
        if self.connected_s is None or self.lost.done() or silence_s <= 0:
            return
        if stalled:
            self._excused_s = now_s
            return
        heard_s = max(self.meter.last_packet_s or self.connected_s, self._excused_s)
        if now_s - heard_s > silence_s:
            self._lose(now_s)

    def _on_message(self, leg: int, data: str | bytes) -> None:
        if leg != self.legs:
            return  # a leg left behind (e.g. its session_taken_over error)
        event = json.loads(data)
        kind = event.get("type")
        now_s = asyncio.get_running_loop().time()
        self.log.add(now_s, str(kind))
        if kind == "session.created" and not self._created.done():
            ids = event.get("voicerelay") or {}
            self.session_id = str(ids.get("session_id") or self.session_id)
            self.resume_token = str(ids.get("resume_token") or self.resume_token)
            self.connected_s, self.ever_connected = now_s, True
            self._created.set_result(event)
        elif kind == "conversation.item.added" and _stored_item(event):
            self.restored_items += 1
        waits = self._waits
        if waits is None:
            return
        if kind == "conversation.item.input_audio_transcription.completed":
            _resolve(waits.heard, str(event.get("transcript", "")))
        elif kind == "response.done":
            _resolve(waits.done, event)
        elif kind == "voicerelay.turn.metrics":
            _resolve(waits.metrics, event)
        elif kind == "output_audio_buffer.stopped":
            _resolve(waits.stopped, event)
        elif kind == "error":
            waits.fail("error_event:" + str(event.get("error", {}).get("code")))

    async def connect(self, http: httpx.AsyncClient, base_url: str) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(
            _calls_url(base_url),
            content=self.pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **self.headers},
        )
        if response.status_code != 201:
            raise CallFailed(f"http_{response.status_code}")
        self.session_id = response.headers.get(SESSION_HEADER, "")
        self.resume_token = response.headers.get(TOKEN_HEADER, "")
        await self._answered(response.text, "no_session_created")

    async def _answered(self, sdp: str, reason: str) -> None:
        self.max_playback_rate_hz = answer_playback_rate_hz(sdp)
        self.track.silence = self.questions.silence_for(self.max_playback_rate_hz)
        self.track.dtx = answer_uses_dtx(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await self._created
        except TimeoutError:
            raise CallFailed(f"{reason}:{self.pc.connectionState}") from None

    async def resume(self, http: httpx.AsyncClient, base_url: str) -> dict[str, float]:
        """Move the session to a new leg: a new offer POSTed with the session id and resume
        token (to ``base_url``, i.e. the front door, which skips a dead transceiver; a refused
        connection, 502 or 503 is tried again), then its ``session.created``. Returns the loop
        times ``answered`` (the 201) and ``created``, and ``attempts``."""
        if not (self.session_id and self.resume_token):
            raise CallFailed("resume_no_token")  # no Redis behind the stack: nothing to resume
        old = self.pc
        self._open_leg()
        closing = asyncio.get_running_loop().create_task(_close_quietly(old))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        headers = {"Content-Type": "application/sdp", TOKEN_HEADER: self.resume_token}
        response, attempts = None, 0
        while response is None:
            attempts += 1
            try:
                answer = await http.post(
                    _calls_url(base_url),
                    params={"session_id": self.session_id},
                    content=self.pc.localDescription.sdp,
                    headers={**headers, **self.headers},
                )
            except httpx.ConnectError as error:
                reason = f"resume_http_error:{type(error).__name__}"
            except httpx.HTTPError as error:  # reached a server: not tried again
                raise CallFailed(f"resume_http_error:{type(error).__name__}") from None
            else:
                if answer.status_code == 201:
                    response = answer
                    break
                reason = f"resume_http_{answer.status_code}:{_error_code(answer)}"
                if answer.status_code not in (502, 503):
                    raise CallFailed(reason)
            if attempts >= RESUME_ATTEMPTS:
                raise CallFailed(reason)
            await asyncio.sleep(RESUME_RETRY_S)  # bounded: RESUME_ATTEMPTS tries in all
        answered_s = asyncio.get_running_loop().time()
        self.resume_token = response.headers.get(TOKEN_HEADER, self.resume_token)
        await self._answered(response.text, "resume_no_session_created")
        assert self.connected_s is not None
        return {"answered": answered_s, "created": self.connected_s, "attempts": attempts}

    async def turn(self, question: Question) -> TurnResult:
        """Speak ``question``; the latency to the answer's first loud packet, and transcripts.
        Raises ``MediaLost`` (the turn cut) when the leg's media stops first."""
        lost = self.lost
        body = asyncio.get_running_loop().create_task(self._turn(question))
        try:
            await asyncio.wait((body, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not body.done():
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, CallFailed):
                    await body
        if lost.done() and (body.cancelled() or body.exception() is not None):
            raise MediaLost(self.stage, lost.result())
        return body.result()

    async def _turn(self, question: Question) -> TurnResult:
        loop = asyncio.get_running_loop()
        self.log = EventLog(loop.time())
        self._waits = waits = _Waits.new()
        onset = self.meter.expect_answer()
        ended = self.track.say(question.coded_for(self.max_playback_rate_hz))
        self.stage = "question"
        try:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                speech_end_s = self.log.speech_end_s = await ended
                self.stage = "answer_wait"
                await _first(onset, waits.done, "no_answer_audio")
                self.stage = "answer"
                latency_ms = (onset.result() - speech_end_s) * 1000
                done = await waits.done
                if (status := done.get("response", {}).get("status")) != "completed":
                    raise CallFailed(f"response_{status}")
                heard = await _within(waits.heard, 1.0, "")
                metrics = await _within(waits.metrics, 1.0, {})
                # the answer has finished playing: the server says so, and its packets have
                # gone quiet (quiet alone was not enough: a pause between an answer's sentences
                # longer than QUIET_GAP_S ended the turn early, and the next question's latency
                # was then measured to the rest of this answer, negative)
                await waits.stopped
                await self.meter.quiet.wait()
        except TimeoutError:
            raise CallFailed(_timeout_reason(onset, waits)) from None
        finally:
            self._waits = None
        self.turns_done += 1
        self.stage = "idle"
        server_ms = metrics.get("first_frame_out_ms")
        answer, stages = _answer(done), turn_stages(metrics, latency_ms)
        return TurnResult(
            self.turns_done, latency_ms, heard, answer, server_ms, onset.result(), stages
        )

    def diagnosis(self) -> dict[str, Any]:
        """What the client saw of the turn in flight: for the report row of a failed turn."""
        last = self.meter.last_packet_s
        now_s = asyncio.get_running_loop().time()
        return {
            "stage": self.stage,
            "server_events": self.log.as_json(),
            "packets": self.meter.packets,
            "since_last_packet_ms": None if last is None else round((now_s - last) * 1000, 1),
            "connection": self.pc.connectionState,
            "leg": self.legs,
        }

    async def close(self) -> None:
        if self._lean_leg is not None:
            self._lean_leg.close()
        await _close_quietly(self.pc)
        await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(pc: RTCPeerConnection) -> None:
    """Close a peer connection, within CLOSE_TIMEOUT_S (its peer may be long gone)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await pc.close()


def _calls_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1/realtime/calls"


def _error_code(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json()["error"]["code"])
    return ""


def _stored_item(event: Event) -> bool:
    """A ``conversation.item.added`` replaying a stored item (ids ``h1``, ``h2``, ... on
    resume), not one of the live conversation."""
    item_id = str((event.get("item") or {}).get("id", ""))
    return item_id[:1] == "h" and item_id[1:].isdigit()


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


async def _first(onset: asyncio.Future[float], done: asyncio.Future[Event], reason: str) -> None:
    """Wait for the answer's onset; a response done (or failed) before any loud packet fails."""
    waiting: list[asyncio.Future[Any]] = [onset, done]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if done.done() and done.exception() is not None:
        raise done.exception()  # type: ignore[misc]
    if not onset.done():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):  # the done event may overtake the last packets
                await onset
    if not onset.done():
        raise CallFailed(reason)


async def _within(future: asyncio.Future[Any], timeout_s: float, default: Any) -> Any:
    try:
        async with asyncio.timeout(timeout_s):
            return await future
    except TimeoutError:
        return default


def _timeout_reason(onset: asyncio.Future[float], waits: _Waits) -> str:
    if not onset.done():
        return "timeout_no_answer_audio"
    if not waits.done.done():
        return "timeout_no_response_done"
    return "timeout_no_audio_stopped" if not waits.stopped.done() else "timeout_answer_not_quiet"


def _answer(done: Event) -> str:
    output = done.get("response", {}).get("output", [])
    parts = (p for item in output for p in item.get("content", ()))
    return " ".join(str(p.get("transcript") or p.get("text") or "") for p in parts).strip()


# --- the driver: many calls in one loop, spoken to in JSON lines --------------------------


def server_rss_mb(pids: Sequence[int]) -> float | None:
    """Resident memory (MiB) of ``pids`` and their descendants; None when none is alive."""
    tree = [pid for root in pids for pid in process_tree(root)]
    return round(sum(rss_mb(pid) for pid in tree), 2) if tree else None


class Driver:
    """Runs calls as told on stdin (``call``, ``hangup``, ``quit``), reports on stdout.

    A call whose media stops (``VoiceCall.check_media``, looked at every ``WATCH_S`` for
    every call at once) is resumed through ``base_url`` and its cut turn asked again; when
    that turn is over (or the call is) an ``{"ev": "resume", ...}`` line gives the moments
    (Unix time) and what was lost. A call that cannot resume fails with the reason."""

    def __init__(
        self,
        base_url: str,
        questions: Questions,
        headers: dict[str, str],
        server_pids: Sequence[int] = (),
        silence_s: float = SILENCE_RESUME_S,
        client: str = "aiortc",
    ) -> None:
        self.base_url, self.questions, self.headers = base_url, questions, headers
        self.server_pids = list(server_pids)
        self.silence_s = silence_s
        self.metronome = Metronome()
        self.lean = LeanClientMedia() if client == "lean" else None
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.live: dict[int, VoiceCall] = {}
        self._http: httpx.AsyncClient | None = None
        self._unix_offset_s = 0.0  # Unix time - loop time

    def emit(self, event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"ev": event, "t": round(time.time(), 3), **fields}) + "\n")
        sys.stdout.flush()

    def unix(self, loop_s: float | None) -> float | None:
        return None if loop_s is None else round(loop_s + self._unix_offset_s, 4)

    async def run(self, lines: asyncio.StreamReader) -> None:
        self._unix_offset_s = time.time() - asyncio.get_running_loop().time()
        watcher = asyncio.get_running_loop().create_task(self._watch())
        async with httpx.AsyncClient(timeout=SETUP_TIMEOUT_S) as self._http:
            self.emit("ready", pid=os.getpid())
            while line := await lines.readline():
                order = json.loads(line)
                if order["op"] == "quit":
                    break
                self._obey(order)
            await self._hang_up_all()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        self.metronome.close()
        if self.lean is not None:
            self.lean.close()

    async def _watch(self) -> None:
        """Every WATCH_S: has any call's media stopped? (One timer for all calls.)"""
        loop = asyncio.get_running_loop()
        due_s = loop.time() + WATCH_S
        while True:
            await asyncio.sleep(max(0.0, due_s - loop.time()))
            now_s = loop.time()
            stalled = now_s - due_s > STALL_S
            due_s = now_s + WATCH_S
            for call in list(self.live.values()):
                call.check_media(now_s, self.silence_s, stalled)

    def _obey(self, order: dict[str, Any]) -> None:
        call_id = int(order["id"])
        if order["op"] == "call":
            task = asyncio.get_running_loop().create_task(self._call(call_id, order))
            self.calls[call_id] = task
            task.add_done_callback(lambda _: self.calls.pop(call_id, None))
        elif order["op"] == "hangup" and (running := self.calls.get(call_id)) is not None:
            running.cancel()

    async def _hang_up_all(self) -> None:
        tasks = list(self.calls.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, call_id: int, order: dict[str, Any]) -> None:
        turns, first = int(order.get("turns", 0)), int(order.get("first_question", call_id))
        call = VoiceCall(self.metronome, self.questions, self.headers, lean=self.lean)
        self.live[call_id] = call
        resumed: dict[str, Any] | None = None  # a resume whose re-asked turn is not over yet
        outcome = "call_ended"  # what became of that turn, if the call ends first
        try:
            await self._set_up(call_id, call)
            while turns == 0 or call.turns_done < turns:
                question = self.questions.questions[
                    (first + call.turns_done) % len(self.questions.questions)
                ]
                try:
                    result = await call.turn(question)
                except MediaLost as lost:
                    if resumed is not None:
                        self._emit_resume(call, resumed, None, "lost_again")
                    resumed = None
                    resumed = await self._resume(call_id, call, lost)
                    continue
                if resumed is not None:
                    self._emit_resume(call, resumed, result, "answered")
                    resumed = None
                self._report_turn(call_id, result)
            self.emit("ended", id=call_id, ok=True, reason="")
        except CallFailed as failure:
            outcome = f"failed:{failure}"
            stage = "turn" if call.ever_connected else "setup"
            row = {"turn": call.turns_done + 1} | (call.diagnosis() if stage == "turn" else {})
            self.emit(stage, id=call_id, ok=False, reason=str(failure), **row)
            self.emit("ended", id=call_id, ok=False, reason=str(failure))
        except asyncio.CancelledError:
            outcome = "hangup"
            self.emit("ended", id=call_id, ok=True, reason="hangup")
        finally:
            self.live.pop(call_id, None)
            if resumed is not None:
                self._emit_resume(call, resumed, None, outcome)
            await call.close()

    async def _resume(self, call_id: int, call: VoiceCall, lost: MediaLost) -> dict[str, Any]:
        """Resume ``call`` after ``lost``: the row so far (the Unix times of the last packet,
        the detection, the 201, ``session.created``); a failed resume is emitted and raised."""
        now_s = asyncio.get_running_loop().time()
        row: dict[str, Any] = {
            "id": call_id,
            "cut_stage": lost.stage,  # "idle": between turns, nothing was cut
            "cut_turn": call.turns_done + 1 if lost.stage != "idle" else None,
            "turns_before": call.turns_done,
            "history_expected": 2 * call.turns_done,  # a question and its answer per turn
            "last_packet_unix_s": self.unix(lost.last_packet_s),
            "detected_unix_s": self.unix(now_s),
            "cut_events": call.log.as_json() if lost.stage != "idle" else None,
        }
        assert self._http is not None
        try:
            marks = await call.resume(self._http, self.base_url)
        except CallFailed as failure:
            self.emit("resume", ok=False, reason=str(failure), **row)
            raise
        row["answered_unix_s"] = self.unix(marks["answered"])
        row["created_unix_s"] = self.unix(marks["created"])
        row["attempts"] = int(marks["attempts"])
        return row

    def _emit_resume(
        self, call: VoiceCall, row: dict[str, Any], result: TurnResult | None, outcome: str
    ) -> None:
        """The resume's row, once its re-asked turn is over: media and answer times too."""
        self.emit(
            "resume",
            ok=True,
            reason="",
            **row,
            media_unix_s=self.unix(call.meter.first_packet_s),
            answer_unix_s=self.unix(result.onset_s) if result is not None else None,
            reasked=outcome,
            history_items=call.restored_items,
        )

    async def _set_up(self, call_id: int, call: VoiceCall) -> None:
        assert self._http is not None
        started_s = asyncio.get_running_loop().time()
        try:
            await call.connect(self._http, self.base_url)
        except (httpx.HTTPError, OSError) as error:
            raise CallFailed(f"http_error:{type(error).__name__}") from None
        setup_ms = (asyncio.get_running_loop().time() - started_s) * 1000
        self.emit("setup", id=call_id, ok=True, ms=round(setup_ms, 1))

    def _report_turn(self, call_id: int, result: TurnResult) -> None:
        self.emit(
            "turn",
            id=call_id,
            ok=True,
            turn=result.turn,
            ms=round(result.latency_ms, 1),
            heard=result.heard,
            answer=result.answer,
            server_ms=result.server_first_frame_ms,
            stages={k: round(v, 1) for k, v in result.stages.items()},
            server_rss_mb=server_rss_mb(self.server_pids) if self.server_pids else None,
        )


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _drive(args: argparse.Namespace) -> None:
    if args.questions:
        questions = Questions.from_json(await asyncio.to_thread(Path(args.questions).read_text))
    else:
        questions = await spoken_questions()
    api_key = os.environ.get(args.api_key_env, "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pids = [int(p) for p in args.server_pids.split(",") if p]
    driver = Driver(args.url, questions, headers, pids, args.silence_s, args.client)
    await driver.run(await _stdin())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.voice_calls", description=__doc__)
    parser.add_argument("--url", required=True, help="the stack's base URL")
    parser.add_argument("--questions", default="", help="a Questions JSON file (else: piper)")
    parser.add_argument(
        "--api-key-env", default=API_KEY_ENV, help="the variable holding the stack's API key"
    )
    parser.add_argument("--server-pids", default="", help="PIDs whose RSS each turn reports")
    parser.add_argument(
        "--silence-s",
        type=float,
        default=SILENCE_RESUME_S,
        help="no media from the server this long: resume the session elsewhere (0: never)",
    )
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="aiortc",
        help="the calls' media: aiortc's RTP path, or the lean one (loadtest.lean_client)",
    )
    asyncio.run(_drive(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
