"""The load tester's lean client media: a ``VoiceCall``'s audio without aiortc's RTP machinery
once DTLS is up, so that one load-generator core drives many more calls.

aiortc keeps ICE, DTLS (and so the SRTP keys) and the data channel, as on the transceiver's
lean path (``transceiver.webrtc.lean_media``, whose packet functions this reuses): aiortc calls
``RTCRtpSender.send`` and ``RTCRtpReceiver.receive`` of the call's audio transceiver when DTLS
connects, and ``take_over`` has replaced them, on those two instances only, by coroutines that
start a ``LeanLeg`` instead of aiortc's per-call RTP/RTCP tasks.

- **Sending**: one 20 ms timer for every call of the process (``LeanClientMedia``): each call's
  next pre-encoded Opus packet (``OpusSpeechTrack.next_payload``: the question, else silence,
  in Opus DTX none on most ticks of silence) gets a 12-byte RTP header and the negotiated MID
  extension, is protected with the DTLS transport's own SRTP session and sent on the
  nominated ICE pair. No encoder, no ``av.Packet``, no task or future per packet.
- **Receiving**: datagrams whose first byte is 128..191 (RTP/RTCP) are taken off the nominated
  aioice protocol before aioice and aiortc see them; RTP is unprotected and its RFC 6464 audio
  level read (``AnswerMeter.heard``: the answer's onset without decoding); RTCP is counted and
  dropped. STUN and DTLS go on to aioice as before.

Not sent: RTCP (no reports; the server learns nothing of the client's reception), NACK. A
lean leg ends when its DTLS transport closes or its call closes it.

Measured on the 2-core machine: see ``python -m loadtest voice --client lean|aiortc`` and the
report's ``client.cpu_ms_per_call_s``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pylibsrtp

from transceiver.webrtc.lean_media import (
    divert_media,
    mid_extension,
    parse_rtp,
    restore_media,
    rtp_header,
    with_extension,
)
from transceiver.webrtc.rtp_extensions import (
    AUDIO_LEVEL_URI,
    MID_URI,
    audio_level,
    rtp_extensions,
)

FRAME_S = 0.02
TICK_SAMPLES = 960  # 20 ms at Opus's 48 kHz RTP clock
LATE_TICK_S = 0.2  # a tick this late restarts the clock rather than bursting to catch up

PayloadSource = Callable[[float], bytes | None]  # loop time -> the next 20 ms packet (DTX: None)
Heard = Callable[[int | None, bytes], None]  # (RFC 6464 level or None, Opus payload)


class LeanLeg:
    """One peer connection's audio, once DTLS is up: send the source's packets, hear RTP."""

    def __init__(
        self, media: LeanClientMedia, transceiver: Any, source: PayloadSource, heard: Heard
    ) -> None:
        self.media, self.transceiver = media, transceiver
        self.source, self.heard = source, heard
        self.counters = media.counters
        self.send_parameters: Any = None
        self.receive_parameters: Any = None
        self.started = self.closed = False
        self._dtls: Any = None
        self._connection: Any = None
        self._hooked: list[Any] = []
        self._payload_type = 0
        self._extension = b""
        self._level_id: int | None = None
        self._accepted: frozenset[int] = frozenset()
        self._sequence = random.getrandbits(16)
        self._timestamp = random.getrandbits(32)
        self.ssrc = int(transceiver.sender._ssrc)

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
        if not self.started:
            self._dtls = self.transceiver.sender.transport
            if self._dtls.state != "connected" or self._dtls._tx_srtp is None:
                raise RuntimeError(f"lean client media started with DTLS {self._dtls.state}")
            self._connection = self._dtls.transport._connection
            self._dtls.on("statechange", self._dtls_state_changed)
            for protocol in list(self._connection._protocols):
                self._hook(protocol)
            self.started = True
            self.media.add(self)
        if self.send_parameters is not None and not self._payload_type:
            self._configure_sending(self.send_parameters)
        if self.receive_parameters is not None and not self._accepted:
            self._configure_receiving(self.receive_parameters)

    def _configure_sending(self, parameters: Any) -> None:
        self._payload_type = parameters.codecs[0].payloadType
        ids = {extension.uri: extension.id for extension in parameters.headerExtensions}
        if MID_URI in ids and parameters.muxId:
            self._extension = mid_extension(ids[MID_URI], parameters.muxId)

    def _configure_receiving(self, parameters: Any) -> None:
        self._accepted = frozenset(codec.payloadType for codec in parameters.codecs)
        ids = {extension.uri: extension.id for extension in parameters.headerExtensions}
        self._level_id = ids.get(AUDIO_LEVEL_URI)

    def _hook(self, protocol: Any) -> None:
        divert_media(protocol, self.on_media)
        self._hooked.append(protocol)

    def _dtls_state_changed(self) -> None:
        if self._dtls.state in ("closed", "failed"):
            self.close()

    def on_media(self, data: bytes) -> None:
        if self.closed:
            return
        if len(data) > 1 and 192 <= data[1] <= 223:
            self.counters["rtcp_in"] += 1  # reports about us: not read
            return
        try:
            packet = self._dtls._rx_srtp.unprotect(data)
        except pylibsrtp.Error:
            self.counters["srtp_rejected"] += 1
            return
        view = parse_rtp(packet)
        if view is None or view.payload_type not in self._accepted:
            self.counters["rtp_dropped"] += 1
            return
        self.counters["rtp_in"] += 1
        self.heard(self._level(packet), packet[view.start : view.end])

    def _level(self, packet: bytes) -> int | None:
        """The RFC 6464 level (-dBov) the sender put in the packet, if it did."""
        if self._level_id is None or not packet[0] & 0x10:
            return None
        for element in rtp_extensions(packet) or ():
            if element.extension_id == self._level_id and (level := audio_level(element.value)):
                return level[1]
        return None

    def tick(self, now_s: float) -> None:
        """Send this tick's packet, if the source has one (in DTX, a silent tick has none:
        the RTP timestamp advances over it, the sequence number does not), once both
        directions are configured."""
        if not self._payload_type:
            return
        payload = self.source(now_s)
        if payload is not None:
            header = rtp_header(
                False, self._payload_type, self._sequence, self._timestamp, self.ssrc
            )
            self._send(with_extension(header, self._extension) + payload)
            self._sequence = (self._sequence + 1) & 0xFFFF
        self._timestamp = (self._timestamp + TICK_SAMPLES) & 0xFFFFFFFF

    def _send(self, packet: bytes) -> None:
        pair = self._connection._nominated.get(1)
        if pair is None:
            self.counters["send_no_pair"] += 1
            return
        pair.protocol.transport.sendto(self._dtls._tx_srtp.protect(packet), pair.remote_addr)
        self.counters["rtp_out"] += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.media.remove(self)
        restore_media(self._hooked)


class LeanClientMedia:
    """Every lean leg of the process and the one 20 ms tick that sends for all of them."""

    def __init__(self) -> None:
        self.legs: list[LeanLeg] = []
        self.counters: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self._next_s = 0.0

    def take_over(self, transceiver: Any, source: PayloadSource, heard: Heard) -> LeanLeg:
        """The lean path for ``transceiver``'s audio from the moment DTLS connects: aiortc's
        sender and receiver of it never start (``send``/``receive`` replaced on them)."""
        leg = LeanLeg(self, transceiver, source, heard)
        transceiver.sender.send = leg.capture_send
        transceiver.receiver.receive = leg.capture_receive
        return leg

    def add(self, leg: LeanLeg) -> None:
        self.legs.append(leg)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._next_s = loop.time() + FRAME_S
            self._timer = loop.call_at(self._next_s, self._tick)

    def remove(self, leg: LeanLeg) -> None:
        if leg in self.legs:
            self.legs.remove(leg)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        for leg in list(self.legs):
            try:
                leg.tick(now_s)
            except OSError:
                self.counters["send_error"] += 1  # the path is going: its DTLS close ends it
        if not self.legs:
            self._timer = None
            return
        self._next_s += FRAME_S
        if now_s - self._next_s > LATE_TICK_S:
            self.counters["tick_restarts"] += 1
            self._next_s = now_s
        self._timer = loop.call_at(self._next_s, self._tick)

    def close(self) -> None:
        for leg in list(self.legs):
            leg.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
