"""The lean media path: a call's audio carried without aiortc's RTP machinery once DTLS is up.

I/O layer; with ``ice`` and ``rtp_tuning`` the only place that touches aiortc/aioice internals
(``tests/test_lean_media_contract.py`` fails loudly if an upgrade moves them).

aiortc and aioice keep ICE (checks, nomination, consent), DTLS (handshake, fingerprint check,
SRTP key export) and the data channel. Audio leaves them when DTLS is connected: aiortc then
calls ``RTCRtpSender.send`` and ``RTCRtpReceiver.receive`` of the call's audio transceiver,
which this module has replaced, on those two instances only, by coroutines that keep the
negotiated parameters and start a :class:`LeanCall` instead of aiortc's RTP/RTCP tasks, encoder
executor hop, decoder thread and jitter buffer. Their ``stop()`` stays a no-op (never started);
``pc.close()`` still ends DTLS and ICE, which ends the lean call.

Inbound, per datagram, straight from the nominated aioice ``StunProtocol.datagram_received``
(wrapped on the instance): a first byte of 128..191 is SRTP/SRTCP and stays here, anything else
(STUN, DTLS) goes on to aioice and aiortc as before. SRTP is unprotected with the DTLS
transport's own pylibsrtp session (``_rx_srtp``, through :class:`SrtpReceiver`), the RTP
header read (:func:`rtp_fields`), the packet put in order by a small reorder window
(:class:`Reorder`); a lost packet is rebuilt with Opus in-band FEC from the next one when
it carries LBRR data, else concealed (Opus PLC); the payload is decoded inline by libopus
(PyAV's bundled copy, through ctypes) straight at the consumer's rate when Opus decodes at it
(8, 12, 16, 24 or 48 kHz: the pipeline's 16 kHz; else at 48 kHz, then soxr) and pushed to it:
the same ``push`` that ``audio.pump_input`` feeds (see ``audio.PcmSource``), or queued
as frames for a ``recv()`` consumer (the echo agent).

The caller's silence (``LeanMedia.feed_silence``: the answer asked for Opus DTX, RFC 7587's
``usedtx=1``): a silent caller sends a packet every ~400 ms, its sequence numbers
consecutive and its RTP timestamp jumping over the gap (no loss, no PLC: the next packet
decodes in order). So that the agent still hears the pause in real time (the turn's end is
decided on it), once ``SILENCE_AFTER_TICKS`` ticks passed without a packet the tick feeds a
``feed_pcm`` consumer's ``silence`` the frames since (one held back for jitter), a tick at
a time (``ConversationEngine.push_silence``: no packet, SRTP or decode); a packet then tops
the silence up to the frames its timestamp skipped (fewer: jitter, the timeline carries on),
and those frames stand for any packet lost in the gap (counted ``lost_in_silence``, not
concealed). Not after speech: the consumer refuses while its last frame was speech, so an
outage mid-word is concealed when the packets come back, as before.

Outbound: one process-wide 20 ms loop timer (:class:`LeanMedia`) sends for every lean call: the
next frame of the agent's voice (``AgentVoiceTrack.take``, whose bookkeeping of
``first_frame_sent_s``, ``frames_played`` and ``clear()`` is the one aiortc's path uses) is
Opus-encoded inline, given a 12-byte RTP header and the negotiated MID header extension,
protected with ``_tx_srtp`` and sent on the nominated pair's transport. A talkspurt ends
with one frame of encoded silence (it carries the encoder's tail of the last speech); while the
agent is silent a frame of silence (one 3-byte packet encoded once per process:
``silence_packet``) goes out once ``KEEPALIVE_S`` (200 ms) has passed without one, by the
loop's clock, so a receiver can tell a silent agent from a dead path (see
``KEEPALIVE_S`` for why not Opus DTX's 400 ms); the RTP timestamp keeps advancing and the next
talkspurt's first packet has the marker bit. RTCP: every ~2 s an SR
(an RR before anything was sent) with one report block for the caller's stream, plus SDES
CNAME; inbound SR/RR give the round-trip time and the caller's reported loss, which sets the
encoder's expected loss (its FEC).

Why ctypes libopus and not PyAV's codec API (measured here, 2 vCPUs, load ~1.2, a µ-benchmark
of 2 000 frames): encode 76 vs 102 us a frame, decode 25 us (16 kHz out) vs 39 us (48 kHz out);
PyAV builds a frame object per packet and offers no FEC decode.

The encoder is Opus's ``audio`` application, not ``voip``: the agent's voice is clean synthetic
speech, and at 32 kbit/s ``audio`` codes it with CELT alone, about a third of the CPU (24 kHz
TTS speech, a µ-benchmark under load ~9: 53 against 165 us a frame at complexity 5; a frame of
silence 25 against 128 us, 3 bytes against 32). In-band FEC stays on: once the caller's RTCP
reports enough loss (10 % here) the encoder moves to hybrid frames that carry it.

Complexity 3, not 5: below 5 CELT skips its pitch pre-filter's search, a quarter to a third of
the encode (piper's speech at 24 kHz, ~1,600 frames a round, interleaved rounds, median; two
runs, load 6-15: 63 and 79 against 94 and 106 us a frame; 0 would be 46, without transient and
TF analysis too). The words come through as well: pocketsphinx hears piper's sentences coded
at 3 as it hears them uncoded (``tests/test_lean_media_voice_coding.py``; Chromium's answer in
``tests/test_browser_e2e.py`` too), and the coded speech's SNR is within 0.7 dB (16.2 against
16.8). Not listened to side by side.

Header extensions (``rtp_extensions``): each packet sent carries the MID and the audio level
of its frame (RFC 6464: -dBov, V set on a frame of the agent's voice that is not silent) when
the answer negotiated them, as Chromium sends and reads; the caller's are skipped unread.

Not carried: NACK/RTX, BWE, jitter-buffer playout, header extensions other than those two,
renegotiation (the first parameters stay), more than one audio track. A bug here is logged
with its traceback, counted in ``transceiver_task_crashes_total{task="lean media"}`` and ends
that call's media: its input track fails, so the agent's audio task crashes and the call ends.

Size (over 400 lines): the codec bindings, the packet formats, the per-call state machine and
the shared tick are one hot path over the same per-call state; apart, each would reach into
the others' fields on every packet.
"""

from __future__ import annotations

import asyncio
import ctypes
import fractions
import functools
import glob
import logging
import math
import os
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

import av
import numpy as np
import pylibsrtp
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from pylibsrtp._binding import ffi as _srtp_ffi
from pylibsrtp._binding import lib as _srtp_lib

from transceiver.background import report_crash
from transceiver.webrtc.audio import InputResampler, audio_frames
from transceiver.webrtc.rtp_extensions import (
    AUDIO_LEVEL_URI,
    MID_URI,
    SILENT_LEVEL_DBOV,
    Element,
    OutgoingExtensions,
    audio_level_byte,
    one_byte_block,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

FRAME_MS = 20
RTP_CLOCK_HZ = 48_000  # Opus's RTP clock, whatever the coded bandwidth (RFC 7587)
TICK_SAMPLES = RTP_CLOCK_HZ * FRAME_MS // 1000
OPUS_RATES_HZ = (8_000, 12_000, 16_000, 24_000, 48_000)
ENCODER_BITRATE = 32_000
ENCODER_COMPLEXITY = 3  # see the module's docstring
MAX_CONCEALED_FRAMES = 5  # a longer gap is not filled (the speech-to-text loses nothing by it)
REORDER_WINDOW = 2  # packets held past a gap before it is declared lost (20 ms at 50 pkt/s)
STALE_TICKS = 3  # a held packet older than this is released even if nothing follows it
RESYNC_PACKETS = 3000  # a sequence jump larger than this is a new stream, not loss
# A caller in Opus DTX sends nothing while it is silent (a packet every 400 ms): once this many
# ticks passed without a packet, the consumer is fed silence for the frames since (one held
# back for jitter), a tick at a time; a packet then tops it up to its RTP timestamp's gap.
SILENCE_AFTER_TICKS = 3
MAX_SILENCE_TOP_UP = 50  # frames fed at once at most (1 s: a stalled loop, a long refusal)
RTCP_INTERVAL_TICKS = 100  # ~2 s
# While the agent is silent, a frame of encoded silence goes out when this long has passed since
# the last RTP packet (by the loop's clock, so the first tick after a stall sends one at once).
# A client that takes 1 s without media for a dead server (loadtest.voice_calls) then still
# hears one through a 600 ms stall of this process: the gap is at most 200 ms before the stall,
# the stall, and the first tick after it (<= 840 ms with a tick's 20 ms and another 20 ms of
# backlog). Opus DTX's 400 ms, counted in ticks (which a stall does not advance), made it up to
# 400 + 600 + 400 ms: a dead path to that client.
KEEPALIVE_S = 0.2
LATE_TICK_S = 0.1  # the tick fell this far behind (a blocked loop): restart its clock
MAX_QUEUED_FRAMES = 50  # frames waiting for a recv() consumer, or pulled from a track
NTP_EPOCH_OFFSET_S = 2_208_988_800
RTCP_SR, RTCP_RR, RTCP_SDES = 200, 201, 202
_RTP = struct.Struct("!BBHII")
_FULL_SCALE = 32_768.0
_RTCP_HEAD = struct.Struct("!BBHI")
_BLOCK = struct.Struct("!IIIIII")


# --- libopus, PyAV's own copy, through ctypes ------------------------------------------------

_OPUS_APPLICATION_AUDIO = 2049
_OPUS_SET_BITRATE = 4002
_OPUS_SET_COMPLEXITY = 4010
_OPUS_SET_INBAND_FEC = 4012
_OPUS_SET_PACKET_LOSS_PERC = 4014


def libopus_path() -> str:
    """The libopus PyAV bundles (its wheel's ``av.libs``), else the system's."""
    here = os.path.dirname(os.path.dirname(av.__file__))
    found = sorted(glob.glob(os.path.join(here, "av.libs", "libopus*.so*")))
    return found[0] if found else "libopus.so.0"


def _load_opus() -> ctypes.CDLL:
    lib = ctypes.CDLL(libopus_path())
    pointer, integer, buffer = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    lib.opus_encoder_create.restype = pointer
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, integer, integer, ctypes.POINTER(integer)]
    lib.opus_decoder_create.restype = pointer
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, integer, ctypes.POINTER(integer)]
    lib.opus_encode.argtypes = [pointer, buffer, integer, buffer, ctypes.c_int32]
    lib.opus_decode.argtypes = [pointer, buffer, ctypes.c_int32, buffer, integer, integer]
    lib.opus_packet_has_lbrr.argtypes = [buffer, ctypes.c_int32]
    lib.opus_encoder_destroy.argtypes = [pointer]
    lib.opus_decoder_destroy.argtypes = [pointer]
    lib.opus_get_version_string.restype = ctypes.c_char_p
    return lib


OPUS = _load_opus()


class OpusEncoder:
    """Mono Opus (the ``audio`` application, 32 kbit/s, complexity 3, in-band FEC) of one frame
    size."""

    def __init__(self, rate_hz: int, frame_samples: int) -> None:
        error = ctypes.c_int()
        self._state = OPUS.opus_encoder_create(rate_hz, 1, _OPUS_APPLICATION_AUDIO, error)
        if not self._state or error.value != 0:
            raise RuntimeError(f"opus_encoder_create({rate_hz}) failed: {error.value}")
        for request, value in (
            (_OPUS_SET_BITRATE, ENCODER_BITRATE),
            (_OPUS_SET_COMPLEXITY, ENCODER_COMPLEXITY),
            (_OPUS_SET_INBAND_FEC, 1),
        ):
            OPUS.opus_encoder_ctl(ctypes.c_void_p(self._state), request, ctypes.c_int(value))
        self.frame_samples = frame_samples
        self._out = ctypes.create_string_buffer(1500)
        self._out_bytes = memoryview(self._out).cast("B")
        self.silence = silence_packet(rate_hz, frame_samples)

    def expect_loss(self, percent: int) -> None:
        value = ctypes.c_int(max(0, min(100, percent)))
        OPUS.opus_encoder_ctl(ctypes.c_void_p(self._state), _OPUS_SET_PACKET_LOSS_PERC, value)

    def encode(self, pcm: bytes) -> bytes:
        size = OPUS.opus_encode(self._state, pcm, self.frame_samples, self._out, 1500)
        if size < 0:
            raise RuntimeError(f"opus_encode failed: {size}")
        return self._out_bytes[:size].tobytes()  # not .raw: a copy of the whole buffer

    def close(self) -> None:
        if self._state:
            OPUS.opus_encoder_destroy(self._state)
            self._state = None


@functools.cache
def silence_packet(rate_hz: int, frame_samples: int) -> bytes:
    """A frame of digital silence as a fresh encoder codes it (3 bytes; the same for every
    call): a keepalive's payload, so that a silent call's keepalive costs no encode (~25-40
    us each, 5 a second). Between keepalives the receiver conceals 180 ms anyway, so its
    decoder's state never followed the call's encoder's through a silence."""
    state = OPUS.opus_encoder_create(rate_hz, 1, _OPUS_APPLICATION_AUDIO, ctypes.c_int())
    if not state:
        raise RuntimeError(f"opus_encoder_create({rate_hz}) failed")
    try:
        out = ctypes.create_string_buffer(1500)
        size = OPUS.opus_encode(state, bytes(2 * frame_samples), frame_samples, out, 1500)
        if size < 0:
            raise RuntimeError(f"opus_encode failed: {size}")
        return ctypes.string_at(out, size)
    finally:
        OPUS.opus_encoder_destroy(state)


class OpusDecoder:
    """Mono s16 PCM at ``rate_hz`` (any Opus rate) from Opus packets, FEC and PLC included."""

    def __init__(self, rate_hz: int) -> None:
        error = ctypes.c_int()
        self._state = OPUS.opus_decoder_create(rate_hz, 1, error)
        if not self._state or error.value != 0:
            raise RuntimeError(f"opus_decoder_create({rate_hz}) failed: {error.value}")
        self.rate_hz = rate_hz
        # passed to every decode as the c_void_p it is converted to anyway (not an int that
        # ctypes converts at every call)
        self._state_arg = ctypes.c_void_p(self._state)
        self._max_samples = rate_hz * 120 // 1000  # the longest Opus packet
        self._pcm = ctypes.create_string_buffer(2 * self._max_samples)
        # what was decoded is copied out through a view: string_at is a foreign call of its
        # own, ~0.9 against ~0.3 us a frame (a 2-vCPU µ-benchmark)
        self._pcm_bytes = memoryview(self._pcm).cast("B")
        self.last_samples = rate_hz * FRAME_MS // 1000

    def decode(self, payload: bytes) -> bytes | None:
        """The packet's audio; None if libopus refuses it."""
        samples = OPUS.opus_decode(
            self._state_arg, payload, len(payload), self._pcm, self._max_samples, 0
        )
        if samples < 0:
            return None
        self.last_samples = samples
        return self._pcm_bytes[: 2 * samples].tobytes()

    def recover(self, following: bytes | None) -> bytes | None:
        """One lost frame: from ``following``'s in-band FEC if given, else concealed (PLC)."""
        if following is None:
            samples = OPUS.opus_decode(self._state_arg, None, 0, self._pcm, self.last_samples, 0)
        else:
            samples = OPUS.opus_decode(
                self._state_arg, following, len(following), self._pcm, self.last_samples, 1
            )
        return None if samples < 0 else self._pcm_bytes[: 2 * samples].tobytes()

    def close(self) -> None:
        if self._state:
            OPUS.opus_decoder_destroy(self._state)
            self._state = None


def has_fec(payload: bytes) -> bool:
    """Whether an Opus packet carries LBRR (in-band FEC) data for the frame before it."""
    return bool(payload) and OPUS.opus_packet_has_lbrr(payload, len(payload)) == 1


class SrtpReceiver:
    """``unprotect`` of one pylibsrtp session (the DTLS transport's ``_rx_srtp``) without the
    set-up pylibsrtp's does at every packet (a cffi ``int *`` allocated, the type checked):
    libsrtp's ``srtp_unprotect`` on the session's own context and buffer, as its does, with
    one length pointer kept (1.3 against 2.1 us a packet, a 2-vCPU µ-benchmark). A packet
    longer than the session's buffer, or not ``bytes``, goes to pylibsrtp's own ``unprotect``
    (its errors as they were). pylibsrtp 1.0.0's layout (``tests/test_lean_media_contract.py``)."""

    def __init__(self, session: pylibsrtp.Session) -> None:
        self._session = session  # keeps the context and the buffer alive
        self._unprotect = _srtp_lib.srtp_unprotect
        self._context = session._srtp[0]
        self._buffer = session._cdata
        self._bytes = session._buffer
        self._capacity = len(session._cdata)
        self._length = _srtp_ffi.new("int *")

    def unprotect(self, packet: bytes) -> bytes | None:
        """The RTP packet, or None if libsrtp refuses it (forged, damaged, or a replay)."""
        size = len(packet)
        if size > self._capacity or type(packet) is not bytes:
            try:
                return self._session.unprotect(packet)
            except pylibsrtp.Error:
                return None
        self._bytes[0:size] = packet
        length = self._length
        length[0] = size
        if self._unprotect(self._context, self._buffer, length):
            return None
        unprotected: bytes = self._bytes[0 : length[0]]
        return unprotected


# --- packets (pure: bytes in, values out) ------------------------------------------------------


class RtpView(NamedTuple):
    """Where an RTP packet's fields and payload are (the bytes are not copied)."""

    marker: int
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    start: int  # payload slice
    end: int


def parse_rtp(packet: bytes) -> RtpView | None:
    """The header of an RTP packet (RFC 3550 §5.1: CSRCs, extension and padding skipped), or
    None when the bytes are not one. Never raises on any input."""
    fields = rtp_fields(packet)
    if fields is None:
        return None
    second, sequence, timestamp, ssrc, start, end = fields
    return RtpView(second >> 7, second & 0x7F, sequence, timestamp, ssrc, start, end)


def rtp_fields(packet: bytes) -> tuple[int, int, int, int, int, int] | None:
    """``parse_rtp``'s answer as a plain tuple, the marker and payload type still in one byte:
    ``(second byte, sequence, timestamp, ssrc, payload start, payload end)`` (the inbound
    path's every packet: no named tuple built, ~0.3 us)."""
    size = len(packet)
    if size < 12 or packet[0] >> 6 != 2:
        return None
    first, second, sequence, timestamp, ssrc = _RTP.unpack_from(packet)
    start = 12 + 4 * (first & 0x0F)
    if first & 0x10:
        if start + 4 > size:
            return None
        start += 4 + 4 * int.from_bytes(packet[start + 2 : start + 4], "big")
    end = size
    if first & 0x20:
        padding = packet[-1]
        if padding == 0:
            return None
        end -= padding
    if start > end:
        return None
    return second, sequence, timestamp, ssrc, start, end


def rtp_header(marker: bool, payload_type: int, sequence: int, timestamp: int, ssrc: int) -> bytes:
    """A 12-byte RTP header (no CSRC); the X bit is the caller's (``with_extension``)."""
    second = (0x80 if marker else 0) | payload_type
    return _RTP.pack(0x80, second, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc)


def divert_media(protocol: Any, on_media: Callable[[bytes], None]) -> None:
    """RTP and RTCP (first byte 128-191, RFC 7983) that reach an ICE protocol go to
    ``on_media``; STUN and DTLS go on to the protocol's own handler."""
    passed_on = protocol.datagram_received

    def datagram_received(data: bytes, addr: tuple[Any, ...]) -> None:
        if data and 127 < data[0] < 192:
            on_media(data)
        else:
            passed_on(data, addr)

    protocol.datagram_received = datagram_received


def restore_media(protocols: list[Any]) -> None:
    """Undo ``divert_media``: each protocol's class handler again; the list is emptied."""
    for protocol in protocols:
        vars(protocol).pop("datagram_received", None)
    protocols.clear()


def mid_extension(extension_id: int, mid: str) -> bytes:
    """An RFC 8285 one-byte-header extension block carrying the MID, padded to 32 bits."""
    try:
        return one_byte_block([Element(extension_id, mid.encode("ascii"))])
    except (ValueError, UnicodeEncodeError) as error:
        raise ValueError(
            f"no one-byte MID extension for id {extension_id} and mid {mid!r}"
        ) from error


def level_dbov(pcm: bytes) -> int:
    """The level of s16 mono PCM as RFC 6465 Appendix A computes it: the RMS in dB of full
    scale, negated and rounded; 127 for silence or an empty frame (integer sums: no BLAS)."""
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.int64)
    energy = int(samples @ samples)  # ~5 us a 24 kHz frame, against ~6.5 for square().sum()
    if energy == 0:
        return SILENT_LEVEL_DBOV
    power = energy / (samples.size * _FULL_SCALE * _FULL_SCALE)
    return max(0, min(SILENT_LEVEL_DBOV, round(-10 * math.log10(power))))


def with_extension(header: bytes, extension: bytes) -> bytes:
    return bytes([header[0] | 0x10]) + header[1:] + extension if extension else header


class ReportBlock(NamedTuple):
    ssrc: int
    fraction_lost: int  # of 256
    cumulative_lost: int
    highest_sequence: int
    jitter: int
    last_sr: int
    delay_since_last_sr: int


class RtcpReport(NamedTuple):
    kind: int  # RTCP_SR or RTCP_RR
    ssrc: int
    ntp_middle: int  # an SR's NTP time, middle 32 bits (0 for an RR)
    blocks: tuple[ReportBlock, ...]


def report_block(block: ReportBlock) -> bytes:
    lost = block.cumulative_lost & 0xFFFFFF  # 24-bit two's complement (RFC 3550 §6.4.1)
    return _BLOCK.pack(
        block.ssrc,
        (block.fraction_lost & 0xFF) << 24 | lost,
        block.highest_sequence & 0xFFFFFFFF,
        block.jitter & 0xFFFFFFFF,
        block.last_sr & 0xFFFFFFFF,
        block.delay_since_last_sr & 0xFFFFFFFF,
    )


def sender_report(
    ssrc: int, ntp: int, rtp_timestamp: int, packets: int, octets: int, blocks: list[ReportBlock]
) -> bytes:
    body = struct.pack(
        "!QIII", ntp, rtp_timestamp & 0xFFFFFFFF, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF
    )
    body += b"".join(report_block(b) for b in blocks)
    return _RTCP_HEAD.pack(0x80 | len(blocks), RTCP_SR, (8 + len(body)) // 4 - 1, ssrc) + body


def receiver_report(ssrc: int, blocks: list[ReportBlock]) -> bytes:
    body = b"".join(report_block(b) for b in blocks)
    return _RTCP_HEAD.pack(0x80 | len(blocks), RTCP_RR, (8 + len(body)) // 4 - 1, ssrc) + body


def source_description(ssrc: int, cname: str) -> bytes:
    text = cname.encode("utf-8")[:255]
    chunk = struct.pack("!IBB", ssrc, 1, len(text)) + text + b"\0"
    chunk += b"\0" * (-len(chunk) % 4)
    return struct.pack("!BBH", 0x81, RTCP_SDES, (4 + len(chunk)) // 4 - 1) + chunk


def parse_rtcp(compound: bytes) -> list[RtcpReport]:
    """The SRs and RRs of a compound RTCP packet; other packets are skipped, and a malformed
    one ends the walk. Never raises on any input."""
    reports: list[RtcpReport] = []
    offset, size = 0, len(compound)
    while offset + 8 <= size:
        first, kind, words, ssrc = _RTCP_HEAD.unpack_from(compound, offset)
        end = offset + 4 * (words + 1)
        if first >> 6 != 2 or end > size:
            break
        head = 28 if kind == RTCP_SR else 8
        if kind in (RTCP_SR, RTCP_RR) and offset + head + 24 * (first & 0x1F) <= end:
            ntp_middle = 0
            if kind == RTCP_SR:
                ntp_middle = int.from_bytes(compound[offset + 10 : offset + 14], "big")
            blocks = []
            for index in range(first & 0x1F):
                fields = _BLOCK.unpack_from(compound, offset + head + 24 * index)
                lost = fields[1] & 0xFFFFFF
                lost = lost - (1 << 24) if lost & 0x800000 else lost
                blocks.append(ReportBlock(fields[0], fields[1] >> 24, lost, *fields[2:]))
            reports.append(RtcpReport(kind, ssrc, ntp_middle, tuple(blocks)))
        offset = end
    return reports


def ntp_now() -> int:
    now = time.time() + NTP_EPOCH_OFFSET_S
    seconds = int(now)
    return (seconds << 32) | int((now - seconds) * (1 << 32))


class Reorder(Generic[T]):
    """In-order release of packets with a small reorder window (pure).

    ``push`` returns what may go on now, as ``(missing_before, item)``: ``missing_before``
    packets were lost just before ``item``. A packet at or behind one already released is
    dropped (late or duplicate); packets past a gap wait until ``window`` of them are held (or
    ``release_all``), then the gap is declared lost. A jump of more than ``resync`` is a new
    stream. At most ``window - 1`` packets are held between calls.
    """

    def __init__(self, window: int = REORDER_WINDOW, resync: int = RESYNC_PACKETS) -> None:
        if window < 1:
            raise ValueError("the window holds at least one packet")
        self.window = window
        self.resync = resync
        self.next: int | None = None  # extended sequence number expected next
        self.highest = 0  # extended, of every packet accepted
        self.held: dict[int, T] = {}
        self.late = 0
        self.resyncs = 0

    def extend(self, sequence: int) -> int:
        """A 16-bit sequence number placed nearest to the highest one seen."""
        delta = ((sequence - self.highest + 0x8000) & 0xFFFF) - 0x8000
        return self.highest + delta

    def take_next(self, sequence: int) -> bool:
        """The usual packet: if ``sequence`` is the one expected and nothing is held, take it
        (it may go on at once, nothing missing before it) and say so; else change nothing and
        say no (``push`` it)."""
        expected = self.next
        if expected is None or self.held or sequence != expected & 0xFFFF:
            return False
        self.highest, self.next = expected, expected + 1  # nothing held: the highest was before
        return True

    def push(self, sequence: int, item: T) -> list[tuple[int, T]]:
        if self.take_next(sequence):
            return [(0, item)]
        if self.next is None:
            self.next, self.highest = sequence + 1, sequence
            return [(0, item)]
        extended = self.extend(sequence & 0xFFFF)
        ahead = extended - self.next
        if abs(ahead) > self.resync:
            self.resyncs += 1
            self.held.clear()
            self.next, self.highest = extended + 1, extended
            return [(0, item)]
        if ahead < 0 or extended in self.held:
            self.late += 1
            return []
        self.highest = max(self.highest, extended)
        if ahead == 0:
            self.next += 1
            return [(0, item), *self._in_order()]
        self.held[extended] = item
        released: list[tuple[int, T]] = []
        while len(self.held) >= self.window:
            released += self._skip_gap()
        return released

    def release_all(self) -> list[tuple[int, T]]:
        released: list[tuple[int, T]] = []
        while self.held:
            released += self._skip_gap()
        return released

    def _skip_gap(self) -> list[tuple[int, T]]:
        assert self.next is not None
        first = min(self.held)
        missing, self.next = first - self.next, first + 1
        return [(missing, self.held.pop(first)), *self._in_order()]

    def _in_order(self) -> list[tuple[int, T]]:
        assert self.next is not None
        released = []
        while self.next in self.held:
            released.append((0, self.held.pop(self.next)))
            self.next += 1
        return released


class ReceptionStats:
    """RFC 3550 A.3 and A.8: what an RR block says about the caller's stream."""

    def __init__(self) -> None:
        self._reset(0, None)

    def _reset(self, ssrc: int, base: int | None) -> None:
        self.ssrc = ssrc
        self.base = base
        self.highest = 0
        self.received = 0
        self.jitter = 0.0
        self._transit: float | None = None
        self._expected_prior = 0
        self._received_prior = 0
        self.last_sr = 0  # middle 32 bits of the last SR's NTP time
        self.last_sr_at_s = 0.0

    def packet(self, ssrc: int, extended: int, timestamp: int, arrival_s: float) -> None:
        if ssrc != self.ssrc or self.base is None:
            self._reset(ssrc, extended)
            self.highest = extended
        self.received += 1
        self.highest = max(self.highest, extended)
        transit = arrival_s * RTP_CLOCK_HZ - timestamp
        if self._transit is not None:
            self.jitter += (abs(transit - self._transit) - self.jitter) / 16
        self._transit = transit

    def block(self, now_s: float) -> ReportBlock | None:
        if self.base is None:
            return None
        expected = self.highest - self.base + 1
        expected_interval = expected - self._expected_prior
        received_interval = self.received - self._received_prior
        self._expected_prior, self._received_prior = expected, self.received
        lost_interval = expected_interval - received_interval
        fraction = (
            0
            if expected_interval <= 0 or lost_interval <= 0
            else ((lost_interval << 8) // expected_interval)
        )
        cumulative = max(-(1 << 23), min((1 << 23) - 1, expected - self.received))
        delay = int((now_s - self.last_sr_at_s) * 65536) if self.last_sr else 0
        return ReportBlock(
            self.ssrc,
            min(fraction, 255),
            cumulative,
            self.highest,
            int(self.jitter),
            self.last_sr,
            delay,
        )


# --- the call's tracks ---------------------------------------------------------------------


class LeanMediaFailed(MediaStreamError):
    """The call's lean media stopped on a bug (logged and counted where it happened)."""


class LeanInputTrack(MediaStreamTrack):
    """The caller's audio as the lean path decodes it: pushed as PCM to a ``feed_pcm``
    consumer (``audio.pump_input``) at its rate, or queued as 48 kHz mono frames for
    ``recv()`` (any other consumer). Ends with the call; fails if its lean media failed."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.push: Callable[[bytes], None] | None = None
        # a feed_pcm consumer's: ms of digital silence heard in the caller's stead; False (and
        # nothing heard) when its last frame was speech (``ConversationEngine.push_silence``)
        self.silence: Callable[[int], bool] | None = None
        self.rate_hz: int | None = None  # set by the first consumer
        self.failed: BaseException | None = None
        self._frames: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._pts = 0
        self.dropped = 0

    async def feed_pcm(
        self,
        push: Callable[[bytes], None],
        rate_hz: int,
        silence: Callable[[int], bool] | None = None,
    ) -> None:
        """Push mono PCM at ``rate_hz`` to ``push`` until the call ends (``audio.PcmSource``);
        the caller's silences in DTX to ``silence``, if given."""
        if self.rate_hz is not None:
            raise RuntimeError("the caller's audio has a consumer already")
        self.push, self.rate_hz, self.silence = push, rate_hz, silence
        await self._ended.wait()
        if self.failed is not None:
            raise LeanMediaFailed("the call's lean media failed") from self.failed

    async def recv(self) -> AudioFrame:
        if self.push is not None:
            raise RuntimeError("the caller's audio goes to feed_pcm")
        if self.rate_hz is None:
            self.rate_hz = RTP_CLOCK_HZ
        frame = None if self._ended.is_set() else await self._frames.get()
        if frame is None:
            self._frames.put_nowait(None)  # every later recv ends too
            raise LeanMediaFailed("failed") if self.failed is not None else MediaStreamError
        return frame

    def deliver(self, pcm: bytes) -> None:
        if self.push is not None:
            self.push(pcm)
            return
        if self._frames.qsize() >= MAX_QUEUED_FRAMES:
            self.dropped += 1
            return
        assert self.rate_hz is not None
        samples = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
        frame = AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.rate_hz
        frame.pts, frame.time_base = self._pts, fractions.Fraction(1, self.rate_hz)
        self._pts += len(pcm) // 2
        self._frames.put_nowait(frame)

    def end(self, failure: BaseException | None = None) -> None:
        if not self._ended.is_set():
            self.failed = failure
            self._ended.set()
            self._frames.put_nowait(None)
        self.stop()


@runtime_checkable
class FrameSource(Protocol):
    """A voice the tick can take frames from without waiting (``audio.AgentVoiceTrack``)."""

    sample_rate_hz: int
    readyState: str

    def take(self) -> bytes | None: ...


class PulledVoice:
    """Any other outgoing track (the echo agent's): a task reads its frames into a short queue
    of 48 kHz mono 20 ms frames the tick takes from."""

    sample_rate_hz = RTP_CLOCK_HZ
    readyState = "live"

    def __init__(self, track: MediaStreamTrack, failed: Callable[[BaseException], None]) -> None:
        self._track = track
        self._failed = failed
        self._frames: deque[bytes] = deque(maxlen=MAX_QUEUED_FRAMES)
        self._partial = b""
        self._task = asyncio.get_running_loop().create_task(self._pull(), name="lean media voice")

    async def _pull(self) -> None:
        step = 2 * TICK_SAMPLES
        resampler = InputResampler(RTP_CLOCK_HZ)
        try:
            async for frame in audio_frames(self._track):
                self._partial += resampler.convert(frame)
                while len(self._partial) >= step:
                    self._frames.append(self._partial[:step])
                    self._partial = self._partial[step:]
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._failed(error)

    def take(self) -> bytes | None:
        return self._frames.popleft() if self._frames else None

    def close(self) -> None:
        self._task.cancel()


# --- one call ------------------------------------------------------------------------------


class LeanCall:
    """One call's audio on the lean path: SRTP in and out, Opus, reorder, FEC/PLC, RTCP."""

    def __init__(
        self,
        media: LeanMedia,
        transceiver: Any,
        heard: LeanInputTrack,
        voice: MediaStreamTrack | None,
    ) -> None:
        self.media = media
        self.counters: Counter[str] = media.counters  # one set for the process
        self.transceiver = transceiver
        self.heard = heard
        self.voice_track = voice
        self.voice: FrameSource | PulledVoice | None = None
        self.send_parameters: Any = None
        self.receive_parameters: Any = None
        self.started = False
        self.closed = False
        self._dtls: Any = None
        self._connection: Any = None
        self._hooked: list[Any] = []
        # inbound
        self._accepted_types: frozenset[int] = frozenset()
        self._reorder: Reorder[bytes] = Reorder()
        self._stats = ReceptionStats()
        self._decoder: OpusDecoder | None = None
        self._resampler: Any = None
        self._held_since_tick = 0
        self._srtp_in: SrtpReceiver | None = None  # made at the first packet
        self._last_timestamp: int | None = None  # the caller's newest packet's RTP timestamp
        self._quiet_ticks = 0  # ticks since the caller's last packet
        self._silence_fed = 0  # frames of silence fed in the caller's stead since then
        self._silence_covered = 0  # frames a gap's packets released next need not conceal
        # outbound
        self.ssrc = int(transceiver.sender._ssrc)
        self._payload_type = 0
        self._extensions = OutgoingExtensions(None, "", None)
        self._cname = ""
        self._encoder: OpusEncoder | None = None
        self._encoder_resampler: Any = None
        self._encoder_bytes = 0
        self._pending = b""
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self._talking = False
        self._last_rtp_s = 0.0  # loop time of the last RTP packet sent
        self.packets_sent = 0
        self.octets_sent = 0
        self._rtcp_countdown = random.randint(RTCP_INTERVAL_TICKS // 2, RTCP_INTERVAL_TICKS)
        self.rtt_s: float | None = None
        self.remote_fraction_lost = 0

    # aiortc calls these in place of RTCRtpSender.send / RTCRtpReceiver.receive, DTLS connected

    async def capture_send(self, parameters: Any) -> None:
        if self.send_parameters is None:
            self.send_parameters = parameters
            self._start()

    async def capture_receive(self, parameters: Any) -> None:
        if self.receive_parameters is None:
            self.receive_parameters = parameters
            self._start()

    def _start(self) -> None:
        if self.closed:
            return
        try:
            self._configure()
        except Exception as error:
            self.fail(error)

    def _configure(self) -> None:
        if not self.started:
            self._dtls = self.transceiver.sender.transport
            if self._dtls.state != "connected" or self._dtls._rx_srtp is None:
                raise RuntimeError(f"lean media started with DTLS {self._dtls.state}")
            self._connection = self._dtls.transport._connection
            self._dtls.on("statechange", self._dtls_state_changed)
            for protocol in list(self._connection._protocols):
                self._hook(protocol)
            self.started = True
            self.media.add(self)
        if self.receive_parameters is not None and not self._accepted_types:
            opus = [c for c in self.receive_parameters.codecs if _is_opus(c)]
            self._accepted_types = frozenset(c.payloadType for c in opus)
        if self.send_parameters is not None and self._payload_type == 0:
            self._configure_sending(self.send_parameters)

    def _configure_sending(self, parameters: Any) -> None:
        codec = parameters.codecs[0]
        if not _is_opus(codec):
            raise RuntimeError(f"lean media sends Opus only, not {codec.mimeType}")
        self._payload_type = codec.payloadType
        self._cname = parameters.rtcp.cname or ""
        ids = {extension.uri: extension.id for extension in parameters.headerExtensions}
        mid = parameters.muxId or ""
        self._extensions = OutgoingExtensions(ids.get(MID_URI), mid, ids.get(AUDIO_LEVEL_URI))
        voice = self.voice_track
        if voice is None:
            return
        source: FrameSource | PulledVoice
        source = voice if isinstance(voice, FrameSource) else PulledVoice(voice, self.fail)
        rate = source.sample_rate_hz
        encoder_rate = rate if rate in OPUS_RATES_HZ else RTP_CLOCK_HZ
        if encoder_rate != rate:
            self._encoder_resampler = soxr.ResampleStream(rate, encoder_rate, 1, dtype="int16")
        self._encoder = OpusEncoder(encoder_rate, encoder_rate * FRAME_MS // 1000)
        self._encoder_bytes = 2 * encoder_rate * FRAME_MS // 1000
        self.voice = source

    def _hook(self, protocol: Any) -> None:
        divert_media(protocol, self.on_media)
        self._hooked.append(protocol)

    def _dtls_state_changed(self) -> None:
        if self._dtls.state in ("closed", "failed"):
            self.close()

    # inbound

    def on_media(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if len(data) > 1 and 192 <= data[1] <= 223:
                self._on_rtcp(data)
            else:
                self._on_rtp(data)
        except Exception as error:
            self.fail(error)

    def _on_rtp(self, data: bytes) -> None:
        counters = self.counters
        srtp = self._srtp_in
        if srtp is None:
            srtp = self._srtp_in = SrtpReceiver(self._dtls._rx_srtp)
        packet = srtp.unprotect(data)
        if packet is None:  # forged, damaged, or a replay
            counters["srtp_rejected"] += 1
            return
        fields = rtp_fields(packet)
        if fields is None:
            counters["rtp_dropped"] += 1
            return
        second, sequence, timestamp, ssrc, start, end = fields
        if second & 0x7F not in self._accepted_types or start == end:
            counters["rtp_dropped"] += 1
            return
        counters["rtp_in"] += 1
        self._quiet_ticks = 0
        if self._silence_fed:
            self._after_silence(timestamp)
        stats, reorder = self._stats, self._reorder
        if ssrc == stats.ssrc and reorder.take_next(sequence):
            # the usual packet, the next one with nothing held: decoded at once, without a
            # list of releases or the lateness and hold bookkeeping (of the ~7 us a packet
            # costs outside the codec, ~0.4 us: tests/test_lean_media_inbound.py's path)
            stats.packet(ssrc, reorder.highest, timestamp, time.monotonic())
            self._last_timestamp = timestamp
            self._silence_covered = 0
            self._play_next(packet[start:end])
            return
        if ssrc != stats.ssrc:
            self._reorder = reorder = Reorder()  # a new stream (first packet, or a new SSRC)
        late_before, held_before = reorder.late, len(reorder.held)
        released = reorder.push(sequence, packet[start:end])
        extended = reorder.extend(sequence)
        if extended == reorder.highest:  # the newest packet (not a late one)
            self._last_timestamp = timestamp
        stats.packet(ssrc, extended, timestamp, time.monotonic())
        counters["rtp_late"] += reorder.late - late_before
        if reorder.held and (released or not held_before):
            self._held_since_tick = self.media.ticks  # the oldest held packet is this recent
        self._play(released)

    def _play_next(self, payload: bytes) -> None:
        """``_play`` of one packet with nothing missing before it; its frame pushed straight
        to a ``feed_pcm`` consumer when nothing is resampled (``_deliver`` otherwise)."""
        decoder = self._decoder
        if decoder is None:
            if self.heard.rate_hz is None:
                self.counters["rtp_unheard"] += 1
                return
            decoder = self._new_decoder(self.heard.rate_hz)
        pcm = decoder.decode(payload)
        if pcm is None:
            self.counters["decode_errors"] += 1
            return
        push = self.heard.push
        if push is None or self._resampler is not None or not pcm:
            self._deliver(pcm)
        else:
            push(pcm)

    def _play(self, released: list[tuple[int, bytes]]) -> None:
        heard = self.heard
        if heard.rate_hz is None:
            self.counters["rtp_unheard"] += len(released)
            return
        decoder = self._decoder or self._new_decoder(heard.rate_hz)
        counters = self.counters
        for missing, payload in released:
            if missing:
                counters["lost"] += missing
                # frames the silence fed already stand for (lost in a DTX gap): not concealed
                covered = min(missing, self._silence_covered)
                self._silence_covered -= covered
                counters["lost_in_silence"] += covered
                missing -= covered
                if 0 < missing <= MAX_CONCEALED_FRAMES:
                    for _ in range(missing - 1):
                        self._deliver(decoder.recover(None))
                        counters["concealed_plc"] += 1
                    fec = has_fec(payload)
                    self._deliver(decoder.recover(payload if fec else None))
                    counters["recovered_fec" if fec else "concealed_plc"] += 1
            pcm = decoder.decode(payload)
            if pcm is None:
                counters["decode_errors"] += 1
            self._deliver(pcm)

    # the caller's silence (Opus DTX): fed from the tick, not decoded

    def _after_silence(self, timestamp: int) -> None:
        """The caller's first packet after silence was fed in its stead: the frames its RTP
        timestamp skipped since its last packet, less those fed, are fed now (fewer: jitter,
        the timeline carries on); the frames fed stand for any packet lost in the gap."""
        last = self._last_timestamp
        fed, self._silence_fed = self._silence_fed, 0
        if last is None:
            return
        gap = (timestamp - last) & 0xFFFFFFFF
        if gap >= 0x80000000:  # behind the newest packet: a late one
            return
        decoder = self._decoder
        last_ms = FRAME_MS if decoder is None else 1000 * decoder.last_samples // decoder.rate_hz
        skipped = (gap * 1000 // RTP_CLOCK_HZ - last_ms) // FRAME_MS
        rest = min(skipped, MAX_SILENCE_TOP_UP) - fed
        if rest > 0 and self._feed_silence(rest):
            fed += rest
        self._silence_covered = fed

    def _quiet_tick(self) -> None:
        """A tick without a packet: once ``SILENCE_AFTER_TICKS`` passed, the frames since the
        last packet, one held back for jitter, are fed as silence (the engine still hears
        its pause in real time while a caller in DTX sends nothing)."""
        due = self._quiet_ticks - 1 - self._silence_fed
        if due > MAX_SILENCE_TOP_UP:  # refused a long while (after speech): let the rest go
            self._silence_fed += due - MAX_SILENCE_TOP_UP
            due = MAX_SILENCE_TOP_UP
        if due > 0 and self._feed_silence(due):
            self._silence_fed += due

    def _feed_silence(self, frames: int) -> bool:
        """``frames`` of silence to the consumer, if it takes them: not before a first packet
        (no timeline yet), nor after speech (an outage mid-word is not a pause: PLC fills
        what ``MAX_CONCEALED_FRAMES`` allows when the packets come back, as before)."""
        silence = self.heard.silence
        if silence is None or self._last_timestamp is None or not silence(frames * FRAME_MS):
            return False
        self.counters["silence_fed"] += frames
        return True

    def _new_decoder(self, rate_hz: int) -> OpusDecoder:
        # Straight at the consumer's rate when libopus decodes at it (the pipeline's 16 kHz), else
        # at 48 kHz and then soxr: the whole inbound path 54 against 96 us a packet
        # (``loadtest.media_stages``; alone, decoding 29 against 42 us, plus soxr's 9). Of
        # the offline speech-to-text models, Moonshine (the default) heard the Chromium and Agents
        # SDK tests' questions either way; pocketsphinx heard "moment" for "moon" from a 16 kHz
        # decode of Chromium's stream each of the three times it was tried (from 48 kHz + soxr:
        # "moon"; offline, on the load tester's questions, the same words from both).
        decode_hz = rate_hz if rate_hz in OPUS_RATES_HZ else RTP_CLOCK_HZ
        if decode_hz != rate_hz:
            self._resampler = soxr.ResampleStream(decode_hz, rate_hz, 1, dtype="int16")
        self._decoder = OpusDecoder(decode_hz)
        return self._decoder

    def _deliver(self, pcm: bytes | None) -> None:
        if not pcm:
            return
        if self._resampler is not None:
            pcm = _resample(self._resampler, pcm)
        self.heard.deliver(pcm)

    def _on_rtcp(self, data: bytes) -> None:
        try:
            compound = self._dtls._rx_srtp.unprotect_rtcp(data)
        except pylibsrtp.Error:
            self.counters["srtp_rejected"] += 1
            return
        self.counters["rtcp_in"] += 1
        now_ntp = ntp_now()
        for report in parse_rtcp(compound):
            if report.kind == RTCP_SR and report.ssrc == self._stats.ssrc:
                self._stats.last_sr, self._stats.last_sr_at_s = report.ntp_middle, time.monotonic()
            for block in report.blocks:
                if block.ssrc == self.ssrc:
                    self._report_about_us(block, now_ntp)

    def _report_about_us(self, block: ReportBlock, now_ntp: int) -> None:
        if block.last_sr:
            middle = (now_ntp >> 16) & 0xFFFFFFFF
            self.rtt_s = ((middle - block.last_sr - block.delay_since_last_sr) & 0xFFFFFFFF) / 65536
            if self.media.on_rtt is not None:
                self.media.on_rtt(self.rtt_s)
        if block.fraction_lost != self.remote_fraction_lost and self._encoder is not None:
            self._encoder.expect_loss(block.fraction_lost * 100 // 256)
        self.remote_fraction_lost = block.fraction_lost

    # outbound, from the shared tick

    def tick(self, ticks: int, now_s: float) -> None:
        if self._reorder.held and ticks - self._held_since_tick >= STALE_TICKS:
            self._play(self._reorder.release_all())
        self._quiet_ticks += 1
        if self._quiet_ticks >= SILENCE_AFTER_TICKS and self.media.feed_silence:
            self._quiet_tick()
        self._send_frame(now_s)
        self._rtcp_countdown -= 1
        if self._rtcp_countdown <= 0:
            self._rtcp_countdown = RTCP_INTERVAL_TICKS
            self._send_rtcp()

    def _send_frame(self, now_s: float) -> None:
        pcm = self._next_pcm()
        if pcm is None:
            if self._talking:  # the talkspurt's end: its last frame of silence goes out now
                self._talking = False
                self._send_silence("rtp_talkspurt_end", now_s)
            elif keepalive_due(now_s, self._last_rtp_s) and self._encoder is not None:
                self._send_silence("rtp_keepalive", now_s, self._encoder.silence)
        else:
            self._last_rtp_s = now_s
            assert self._encoder is not None
            payload = self._encoder.encode(pcm)
            header = rtp_header(
                not self._talking, self._payload_type, self._sequence, self._timestamp, self.ssrc
            )
            extensions = self._extensions
            level = level_dbov(pcm) if extensions.carries_level else SILENT_LEVEL_DBOV
            block = extensions.block(audio_level_byte(level, level < SILENT_LEVEL_DBOV))
            self._send(with_extension(header, block) + payload)
            self._sequence = (self._sequence + 1) & 0xFFFF
            self.packets_sent += 1
            self.octets_sent += len(payload)
            self._talking = True
            self.counters["rtp_out"] += 1
        self._timestamp = (self._timestamp + TICK_SAMPLES) & 0xFFFFFFFF

    def _send_silence(self, kind: str, now_s: float, payload: bytes | None = None) -> None:
        """One frame of silence, no marker: the path is alive, the agent quiet. ``payload``:
        already encoded (a keepalive's, ``OpusEncoder.silence``), else encoded now.

        Encoded right after a talkspurt: the encoder carries the end of the last frame it
        coded into the next one (Opus's overlap), so the first frame of silence after speech
        holds the speech's tail (measured: RMS 0.075 of full scale after a 220 Hz tone, against
        0.0005 once flushed). Sent then, the tail ends the talkspurt as it would have with
        continuous encoding; left to the next keepalive, it was a blip 400 ms after the agent
        stopped, which a receiver hears (and the load tester took for the next answer)."""
        if self._encoder is None:
            return
        self._last_rtp_s = now_s
        if payload is None:
            payload = self._encoder.encode(bytes(self._encoder_bytes))
        header = rtp_header(False, self._payload_type, self._sequence, self._timestamp, self.ssrc)
        block = self._extensions.block(audio_level_byte(SILENT_LEVEL_DBOV, False))
        self._send(with_extension(header, block) + payload)
        self._sequence = (self._sequence + 1) & 0xFFFF
        self.packets_sent += 1
        self.octets_sent += len(payload)
        self.counters[kind] += 1

    def _next_pcm(self) -> bytes | None:
        """The next 20 ms at the encoder's rate (a talkspurt's short end padded), or None."""
        voice = self.voice
        if voice is None or voice.readyState != "live":
            return None
        need = self._encoder_bytes
        while len(self._pending) < need and (more := voice.take()) is not None:
            resampler = self._encoder_resampler
            self._pending += more if resampler is None else _resample(resampler, more)
        if not self._pending:
            return None
        pcm, self._pending = self._pending[:need].ljust(need, b"\0"), self._pending[need:]
        return pcm

    def _send_rtcp(self) -> None:
        block = self._stats.block(time.monotonic())
        blocks = [] if block is None else [block]
        if self.packets_sent:
            rtp_now = self._timestamp
            report = sender_report(
                self.ssrc, ntp_now(), rtp_now, self.packets_sent, self.octets_sent, blocks
            )
        else:
            report = receiver_report(self.ssrc, blocks)
        compound = report + source_description(self.ssrc, self._cname)
        self._send(self._dtls._tx_srtp.protect_rtcp(compound), protected=True)
        self.counters["rtcp_out"] += 1

    def _send(self, packet: bytes, protected: bool = False) -> None:
        pair = self._connection._nominated.get(1)
        if pair is None:
            self.counters["send_no_pair"] += 1
            return
        data = packet if protected else self._dtls._tx_srtp.protect(packet)
        pair.protocol.transport.sendto(data, pair.remote_addr)

    # end

    def fail(self, error: BaseException) -> None:
        """A bug: seen, counted, and this call's media ends (its agent's audio task fails)."""
        if self.closed:
            return
        report_crash("lean media", error, logger, "the call's media ends")
        self.close(error)

    def close(self, failure: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.media.remove(self)
        restore_media(self._hooked)
        if isinstance(self.voice, PulledVoice):
            self.voice.close()
        for codec in (self._encoder, self._decoder):
            if codec is not None:
                codec.close()
        self.heard.end(failure)


def keepalive_due(now_s: float, last_rtp_s: float) -> bool:
    """Whether a silent call's tick at ``now_s`` sends a keepalive: ``KEEPALIVE_S`` since its
    last RTP packet, less half a tick (the ticks' times are sums of floats)."""
    return now_s - last_rtp_s >= KEEPALIVE_S - FRAME_MS / 2000


def _is_opus(codec: Any) -> bool:
    return str(codec.mimeType).lower() == "audio/opus" and codec.clockRate == RTP_CLOCK_HZ


def _resample(stream: Any, pcm: bytes) -> bytes:
    return bytes(stream.resample_chunk(np.frombuffer(pcm, dtype=np.int16)).tobytes())


# --- the process's media engine --------------------------------------------------------------


class LeanMedia:
    """Every lean call of this process, and the one 20 ms tick that sends for all of them."""

    def __init__(
        self, on_rtt: Callable[[float], None] | None = None, feed_silence: bool = False
    ) -> None:
        self.calls: list[LeanCall] = []
        self.counters: Counter[str] = Counter()
        self.on_rtt = on_rtt  # each RTCP round trip measured (seconds), for the metrics
        # the callers were asked for Opus DTX: their silences are fed to the consumers
        self.feed_silence = feed_silence
        self.ticks = 0
        self._timer: asyncio.TimerHandle | None = None
        self._next_s = 0.0

    def take_over(self, transceiver: Any, heard: LeanInputTrack, voice: Any) -> LeanCall:
        """The lean path for ``transceiver``'s audio from the moment DTLS connects: aiortc's
        sender and receiver of it will never start (their ``send``/``receive`` replaced on
        these two instances)."""
        call = LeanCall(self, transceiver, heard, voice)
        transceiver.sender.send = call.capture_send
        transceiver.receiver.receive = call.capture_receive
        return call

    def add(self, call: LeanCall) -> None:
        self.calls.append(call)
        self.counters["calls"] += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._next_s = loop.time() + FRAME_MS / 1000
            self._timer = loop.call_at(self._next_s, self._tick)

    def remove(self, call: LeanCall) -> None:
        if call in self.calls:
            self.calls.remove(call)
        if not self.calls and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.ticks += 1
        loop = asyncio.get_running_loop()
        now_s = loop.time()  # after a stall, its length: a keepalive is due at once
        for call in list(self.calls):
            try:
                call.tick(self.ticks, now_s)
            except Exception as error:
                call.fail(error)
        if not self.calls:
            self._timer = None
            return
        self._next_s += FRAME_MS / 1000
        if loop.time() - self._next_s > LATE_TICK_S:
            self.counters["tick_restarts"] += 1
            self._next_s = loop.time()
        self._timer = loop.call_at(self._next_s, self._tick)

    async def aclose(self) -> None:
        for call in list(self.calls):
            call.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
