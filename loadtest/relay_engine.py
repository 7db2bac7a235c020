"""The packet engine of the ``relay`` scenario: every session of one load-generator process,
driven by one loop on a timer wheel.

A session is what a browser's ICE agent does towards the relay, without the DTLS/SRTP payload
semantics the relay never sees: a STUN binding request with a signed server ufrag and
MESSAGE-INTEGRITY (retried until answered: the relay learns the route from it), then a consent
check every ``consent_s`` (RFC 7675), and, for the "canary" share, one RTP-sized packet every
20 ms that the far end echoes. Canaries carry ``(session, sequence, send time)`` after a 12-byte
RTP header; their echoes give round-trip time (kernel receive stamps, ``SO_TIMESTAMPNS``), loss
and RFC 3550 interarrival jitter per session.

One loop, not a task per session (LOADTEST.md: a task or greenlet per session silently dropped
15-98 % of the echoes in the generator's own socket buffer): each tick (2 ms) sends the due
setups, consents and media of every session with one ``sendmmsg`` per kind and drains the socket
with ``recvmmsg``; numpy does the per-packet bookkeeping. The loop runs on its own OS thread
(``run``); the rest of the process (Locust's gevent users) talks to it only through
``commands`` and ``outbox`` deques, which are safe to share under the GIL.

Client addresses: ``pktinfo`` — one socket, each session sending from its own 127.x.y.z source
(``IP_PKTINFO``), loopback or a generator-owned subnet; ``sockets`` — one connected socket per
session, for a pod with one IP (one fd and ~2.6 KB of kernel memory each).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

from loadtest import hdr
from loadtest.epoll import Epoll
from loadtest.mmsg import (
    PKTINFO_SPACE,
    TIMESTAMP_SPACE,
    Messages,
    enable_timestamps,
    pktinfo_cmsg,
)
from loadtest.stun_messages import binding_request
from relay.wire.ufrag import Keyring, derive_password, mint_ufrag

Address = tuple[str, int]
FREE, SETTING_UP, UP, FAILED = 0, 1, 2, 3
STUN_ROW_BYTES = 160
MEDIA_PERIOD_S = 0.020
RTP_HEADER_BYTES = 12
TRAILER = struct.Struct("<IIq")  # session, sequence, send time (ns, CLOCK_REALTIME)
MIN_PAYLOAD_BYTES = RTP_HEADER_BYTES + TRAILER.size
RECEIVE_BATCH = 512
RECEIVE_ROW_BYTES = 64  # enough for a STUN response's header and an echo's trailer
MAX_RECEIVE_BATCHES = 64  # per tick: bounded, so a flood cannot starve sending
SOCKET_BUFFER_BYTES = 8 << 20
SETUP_RETRY_S = 0.25
EXPIRY_EVERY_TICKS = 25
LOOPBACK_SOURCE_BASE = (127 << 24) | (16 << 16)  # 127.16.0.0: worker w uses 127.(16+w).x.y

MEDIA_DTYPE = np.dtype(
    {
        "names": ["rtp_seq", "rtp_ts", "ssrc", "session", "seq", "send_ns"],
        "formats": [">u2", ">u4", ">u4", "<u4", "<u4", "<i8"],
        "offsets": [2, 4, 8, 12, 16, 20],
        "itemsize": MIN_PAYLOAD_BYTES,
    }
)


@dataclass
class EngineConfig:
    target: Address  # the relay's public address
    transceiver: Address  # the link address every session's ufrag names (the lab transceiver)
    keyring: Keyring
    capacity: int  # sessions this process may hold at once
    media_capacity: int  # canaries this process may hold at once
    worker_index: int = 0
    address_mode: str = "pktinfo"  # or "sockets"
    tick_s: float = 0.004  # 5 slots per 20 ms frame; receive stamps come from the kernel
    consent_s: float = 5.0
    setup_timeout_s: float = 6.0
    payload_bytes: int = 172  # a 20 ms Opus frame in SRTP is ~100-180 bytes
    drain_s: float = 0.5  # how long the final flush keeps receiving after sending stops


@dataclass
class Interval:
    """What happened since the previous interval (histograms are handed over, not copied)."""

    rtt_us: HdrHistogram
    setup_us: HdrHistogram
    tick_lag_us: HdrHistogram
    counters: dict[str, int]
    gauges: dict[str, int]
    loss_by_session: dict[str, Any] = field(default_factory=dict)


class SessionEngine:
    """All sessions of one process. ``open``/``close``/``request_*`` may be called from any
    thread; ``run`` is the loop's thread body."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        n, m = config.capacity, config.media_capacity
        if config.payload_bytes < MIN_PAYLOAD_BYTES:
            raise ValueError(f"payload_bytes must be at least {MIN_PAYLOAD_BYTES}")
        if config.address_mode == "pktinfo" and n > 65_536:
            raise ValueError("pktinfo mode gives each process at most 65,536 source addresses")
        self.commands: deque[tuple[str, int]] = deque()
        self.outbox: deque[tuple[str, Any]] = deque()
        self.free: deque[int] = deque(range(n))
        self.free_media: deque[int] = deque(range(m))
        self.tag = os.urandom(4)
        self.state = np.zeros(n, np.uint8)
        self.opened_at = np.zeros(n, np.float64)
        self.retry_at = np.zeros(n, np.float64)
        self.stun_length = np.zeros(n, np.int64)
        self.media_of = np.full(n, -1, np.int64)
        self.consent_sent = np.zeros(n, np.int64)
        self.consent_answered = np.zeros(n, np.int64)
        self.last_answer = np.zeros(n, np.float64)
        self.media_session = np.full(m, -1, np.int64)
        self.media_on = np.zeros(m, bool)
        self.media_seq = np.zeros(m, np.int64)
        self.media_sent = np.zeros(m, np.int64)
        self.media_received = np.zeros(m, np.int64)
        self.jitter_ns = np.zeros(m, np.float64)
        self.last_transit = np.zeros(m, np.int64)
        self.has_transit = np.zeros(m, bool)
        # the longest silence of each canary's echoes across which packets were lost, for fault
        # runs: its length, when it began
        # (receive stamp of the echo before it), the first sequence number after it, and how
        # many echoes arrived from then on
        self.last_arrival = np.zeros(m, np.int64)
        self.max_gap_ns = np.zeros(m, np.int64)
        self.gap_began_ns = np.zeros(m, np.int64)
        self.seq_after_gap = np.zeros(m, np.int64)
        self.received_after_gap = np.zeros(m, np.int64)
        self.last_seq = np.zeros(m, np.int64)
        self.lost_in_gap = np.zeros(m, np.int64)  # sequence numbers skipped across that silence
        self.counters = dict.fromkeys(
            (
                "setups_sent",
                "setups_ok",
                "setups_failed",
                "consents_sent",
                "consents_answered",
                "media_sent",
                "media_received",
                "unknown_received",
                "send_short",
            ),
            0,
        )
        self.rtt = hdr.new_histogram()
        self.setup = hdr.new_histogram()
        self.tick_lag = hdr.new_histogram()
        self.paused = False
        self.stopping = False
        self.epoll: Epoll | None = None
        self.sockets: dict[int, socket.socket] = {}
        self.fd_of = np.full(n, -1, np.int64)
        self.live: list[int] = []  # open sessions, oldest first: close() ends the newest
        self.setting_up = 0  # sessions waiting for their first STUN answer
        self._open_transport()

    # -- transport ---------------------------------------------------------------------------
    def _open_transport(self) -> None:
        c = self.config
        self.stun_out = Messages(c.capacity, STUN_ROW_BYTES, PKTINFO_SPACE)
        self.media_out = Messages(c.media_capacity, c.payload_bytes, PKTINFO_SPACE)
        # each canary's RTP and trailer fields, seen in place in its send buffer row
        self.media_fields = np.ndarray(
            (c.media_capacity,), MEDIA_DTYPE, buffer=self.media_out.data, strides=(c.payload_bytes,)
        )
        self.inbox = Messages(RECEIVE_BATCH, RECEIVE_ROW_BYTES, TIMESTAMP_SPACE)
        self.sock: socket.socket | None = None
        if c.address_mode == "pktinfo":
            self.sock = self._socket(("0.0.0.0", 0))
            self.stun_out.send_to(*c.target)
            self.media_out.send_to(*c.target)
        elif c.address_mode == "sockets":
            self.epoll = Epoll()
            for messages in (self.stun_out, self.media_out):
                messages.headers["control"] = 0
                messages.headers["controllen"] = 0
        else:
            raise ValueError(f"address_mode is pktinfo or sockets, not {c.address_mode!r}")

    def _socket(self, bind: Address) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        enable_timestamps(sock)
        sock.bind(bind)
        return sock

    def source_of(self, session: int) -> int:
        """The session's source address in pktinfo mode (host order)."""
        return LOOPBACK_SOURCE_BASE + (self.config.worker_index << 16) + session + 1

    # -- commands (any thread) ---------------------------------------------------------------
    def open(self, media: bool) -> None:
        """Start one session (a canary when ``media``); its setup result reaches ``outbox``."""
        self.commands.append(("open", 1 if media else 0))

    def close(self) -> None:
        """End the most recently opened live session."""
        self.commands.append(("close", 0))

    def request_interval(self) -> None:
        self.commands.append(("interval", 0))

    def request_final(self) -> None:
        """Stop sending, keep receiving for ``drain_s``, then post per-session quality."""
        self.commands.append(("final", 0))

    def stop(self) -> None:
        self.stopping = True

    # -- the loop ----------------------------------------------------------------------------
    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """The loop: until ``stop()``; exceptions are posted to ``outbox`` and re-raised."""
        try:
            self._loop(sleep)
        except BaseException as error:
            self.outbox.append(("crashed", repr(error)))
            raise
        finally:
            self._close_transport()

    def _loop(self, sleep: Callable[[float], None]) -> None:
        tick_s = self.config.tick_s
        media_slots = max(1, round(MEDIA_PERIOD_S / tick_s))
        consent_slots = max(1, round(self.config.consent_s / tick_s))
        tick = 0
        next_at = time.monotonic()
        final_at: float | None = None
        lag: list[int] = []
        while not self.stopping:
            now = time.monotonic()
            lag.append(int(max(0.0, now - next_at) * 1e6))
            if len(lag) >= 256:
                hdr.record(self.tick_lag, lag)
                lag.clear()
            self._apply_commands(now)
            if not self.paused:
                if self.setting_up:
                    self._send_setups(now)
                self._send_consents(tick % consent_slots, consent_slots, now)
                self._send_media(tick % media_slots, media_slots)
            self._receive(now)
            if self.setting_up and tick % EXPIRY_EVERY_TICKS == 0:
                self._expire_setups(now)
            if self.paused and final_at is None:
                final_at = now + self.config.drain_s
            if final_at is not None and now >= final_at:
                hdr.record(self.tick_lag, lag)
                lag.clear()
                self.outbox.append(("final", self._final()))
                final_at = None
            tick += 1
            next_at += tick_s
            delay = next_at - time.monotonic()
            if delay > 0:
                sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # a long stall: resynchronise, the lag is recorded

    def _apply_commands(self, now: float) -> None:
        for _ in range(len(self.commands)):
            kind, value = self.commands.popleft()
            if kind == "open":
                self._open(bool(value), now)
            elif kind == "close":
                self._close_last()
            elif kind == "interval":
                self.outbox.append(("interval", self._interval()))
            elif kind == "final":
                self.paused = True

    def _open(self, media: bool, now: float) -> None:
        if not self.free:
            self.outbox.append(("setup", (False, 0.0, "capacity")))
            return
        session = self.free.popleft()
        self.live.append(session)
        request = self._binding_request(session)
        self.stun_out.data[session, : len(request)] = np.frombuffer(request, np.uint8)
        self.stun_length[session] = len(request)
        if self.config.address_mode == "pktinfo":
            self.stun_out.control[session, :PKTINFO_SPACE] = np.frombuffer(
                pktinfo_cmsg(self.source_of(session)), np.uint8
            )
        else:
            sock = self._socket(("0.0.0.0", 0))
            sock.connect(self.config.target)
            self.sockets[sock.fileno()] = sock
            self.fd_of[session] = sock.fileno()
            assert self.epoll is not None
            self.epoll.add(sock.fileno())
        self.state[session] = SETTING_UP
        self.setting_up += 1
        self.opened_at[session] = time.monotonic()  # after building: setup time is the wire's
        self.retry_at[session] = now
        self.consent_sent[session] = self.consent_answered[session] = 0
        self.media_of[session] = -1
        if media and self.free_media:
            index = self.free_media.popleft()
            self.media_of[session] = index
            self.media_session[index] = session
            self._reset_media(index, session)

    def _close_last(self) -> None:
        if not self.live:
            return
        session = self.live.pop()
        index = int(self.media_of[session])
        if index >= 0:
            self.media_on[index] = False
            self.media_session[index] = -1
            self.free_media.append(index)
        fd = int(self.fd_of[session])
        if fd >= 0:
            assert self.epoll is not None
            self.epoll.remove(fd)
            self.sockets.pop(fd).close()
            self.fd_of[session] = -1
        if self.state[session] == SETTING_UP:
            self.setting_up -= 1
        self.state[session] = FREE
        self.media_of[session] = -1
        self.free.append(session)

    def _binding_request(self, session: int) -> bytes:
        """What a browser's first connectivity check through the relay looks like."""
        c = self.config
        ufrag = mint_ufrag(c.keyring, c.transceiver)
        transaction = struct.pack("!I", session) + self.tag + os.urandom(4)
        return binding_request(
            transaction,
            f"{ufrag}:lt{c.worker_index}x{session}",
            derive_password(c.keyring, ufrag).encode("ascii"),
            priority=1853817087,
            tiebreaker=int.from_bytes(os.urandom(8), "big"),
        )

    def _reset_media(self, index: int, session: int) -> None:
        row = self.media_out.data[index]
        row[:] = 0
        row[0], row[1] = 0x80, 111  # RTP version 2, dynamic payload type (Opus)
        view = row[:MIN_PAYLOAD_BYTES].view(MEDIA_DTYPE)
        view["ssrc"] = session + 1
        view["session"] = session
        if self.config.address_mode == "pktinfo":
            self.media_out.control[index, :PKTINFO_SPACE] = np.frombuffer(
                pktinfo_cmsg(self.source_of(session)), np.uint8
            )
        self.media_seq[index] = self.media_sent[index] = self.media_received[index] = 0
        self.jitter_ns[index] = 0.0
        self.has_transit[index] = False
        self.max_gap_ns[index] = self.gap_began_ns[index] = 0
        self.seq_after_gap[index] = self.received_after_gap[index] = 0
        self.last_seq[index] = self.lost_in_gap[index] = 0
        self.media_on[index] = False  # starts when the session is up

    # -- sending -----------------------------------------------------------------------------
    def _send(self, messages: Messages, slots: npt.NDArray[np.intp], lengths: Any) -> int:
        if self.sock is not None:
            sent = messages.send(self.sock.fileno(), slots, lengths)
        else:
            sent = 0
            sessions = (
                slots if messages is self.stun_out else self.media_session[slots].astype(np.intp)
            )
            for position, (slot, session) in enumerate(zip(slots, sessions, strict=True)):
                one = np.array([slot], np.intp)
                size: Any = lengths if np.isscalar(lengths) else lengths[position : position + 1]
                sent += messages.send(int(self.fd_of[session]), one, size)
        if sent < len(slots):
            self.counters["send_short"] += len(slots) - sent
        return sent

    def _send_setups(self, now: float) -> None:
        due = np.flatnonzero((self.state == SETTING_UP) & (self.retry_at <= now))
        if due.size == 0:
            return
        self.retry_at[due] = now + SETUP_RETRY_S
        self.counters["setups_sent"] += self._send(self.stun_out, due, self.stun_length[due])

    def _send_consents(self, slot: int, slots: int, now: float) -> None:
        candidates = np.arange(slot, self.config.capacity, slots)
        due = candidates[self.state[candidates] == UP]
        if due.size:
            self.consent_sent[due] += 1
            self.counters["consents_sent"] += self._send(self.stun_out, due, self.stun_length[due])

    def _send_media(self, slot: int, slots: int) -> None:
        candidates = np.arange(slot, self.config.media_capacity, slots)
        due = candidates[self.media_on[candidates]]
        if due.size == 0:
            return
        seq = self.media_seq[due]
        fields = self.media_fields  # views into the send buffers: written in place
        fields["rtp_seq"][due] = seq & 0xFFFF
        fields["rtp_ts"][due] = (seq * 960) & 0xFFFFFFFF
        fields["seq"][due] = seq
        fields["send_ns"][due] = time.time_ns()
        sent = self._send(self.media_out, due, self.config.payload_bytes)
        self.media_seq[due] += 1
        self.media_sent[due[:sent]] += 1
        self.counters["media_sent"] += sent

    # -- receiving ---------------------------------------------------------------------------
    def _receive(self, now: float) -> None:
        if self.sock is not None:
            fds = [self.sock.fileno()]
        else:
            assert self.epoll is not None
            fds = self.epoll.wait()
        for fd in fds:
            for _ in range(MAX_RECEIVE_BATCHES):
                count = self.inbox.receive(fd)
                if count == 0:
                    break
                self._handle(count, now)
                if count < RECEIVE_BATCH:
                    break

    def _handle(self, count: int, now: float) -> None:
        data = self.inbox.data[:count]
        stamps = self.inbox.timestamps_ns(count)
        stamps = np.where(stamps > 0, stamps, time.time_ns())
        first = data[:, 0]
        stun_rows = np.flatnonzero((first == 0x01) & (data[:, 1] == 0x01))
        media_rows = np.flatnonzero((first & 0xC0) == 0x80)
        self.counters["unknown_received"] += count - len(stun_rows) - len(media_rows)
        if stun_rows.size:
            self._stun_answers(data[stun_rows], now)
        if media_rows.size:
            self._echoes(data[media_rows], stamps[media_rows])

    def _stun_answers(self, rows: npt.NDArray[np.uint8], now: float) -> None:
        tags_ok = (rows[:, 12:16] == np.frombuffer(self.tag, np.uint8)).all(axis=1)
        sessions = rows[tags_ok, 8:12].copy().view(">u4")[:, 0].astype(np.int64)
        self.counters["unknown_received"] += int((~tags_ok).sum())
        sessions = sessions[sessions < self.config.capacity]
        state = self.state[sessions]
        setting_up = sessions[state == SETTING_UP]
        if setting_up.size:
            setting_up = np.unique(setting_up)
            self.state[setting_up] = UP
            self.setting_up -= int(setting_up.size)
            answered = time.monotonic()  # not the tick's start: opens built in this tick are later
            took_us = ((answered - self.opened_at[setting_up]) * 1e6).astype(np.int64)
            hdr.record(self.setup, took_us)
            self.counters["setups_ok"] += int(setting_up.size)
            for took in took_us:
                self.outbox.append(("setup", (True, float(took) / 1000, "")))
            media = self.media_of[setting_up]
            self.media_on[media[media >= 0]] = True
        up = sessions[state == UP]
        if up.size:
            self.consent_answered[up] += 1
            self.counters["consents_answered"] += int(up.size)
        self.last_answer[sessions] = now

    def _echoes(self, rows: npt.NDArray[np.uint8], stamps: npt.NDArray[np.int64]) -> None:
        fields = rows[:, :MIN_PAYLOAD_BYTES].copy().view(MEDIA_DTYPE)[:, 0]
        sessions = fields["session"].astype(np.int64)
        valid = sessions < self.config.capacity
        sessions, fields, stamps = sessions[valid], fields[valid], stamps[valid]
        index = self.media_of[sessions]
        live = index >= 0
        index, fields, stamps = index[live], fields[live], stamps[live]
        self.counters["unknown_received"] += int((~valid).sum() + (~live).sum())
        transit = stamps - fields["send_ns"]
        hdr.record(self.rtt, np.maximum(transit, 0) // 1000)
        np.add.at(self.media_received, index, 1)
        self.counters["media_received"] += len(index)
        # RFC 3550 §6.4.1 interarrival jitter, in arrival order, one packet per session per pass
        order = np.arange(len(index))
        while order.size:
            _, first = np.unique(index[order], return_index=True)
            take = order[first]
            i, t = index[take], transit[take]
            seen = self.has_transit[i]
            d = np.abs(t - self.last_transit[i]).astype(np.float64)
            self.jitter_ns[i] = np.where(seen, self.jitter_ns[i] + (d - self.jitter_ns[i]) / 16, 0)
            self.last_transit[i] = t
            arrived = stamps[take]
            gap = np.where(seen, arrived - self.last_arrival[i], 0)
            seq = fields["seq"][take].astype(np.int64)
            skipped = seq - self.last_seq[i] - 1
            # only silences that lost packets count: a stall of the generator delays, not loses
            longer = (gap > self.max_gap_ns[i]) & (skipped > 0)
            j = i[longer]
            self.max_gap_ns[j] = gap[longer]
            self.gap_began_ns[j] = self.last_arrival[j]
            self.seq_after_gap[j] = seq[longer]
            self.lost_in_gap[j] = skipped[longer]
            self.received_after_gap[j] = 0
            self.received_after_gap[i] += 1
            self.last_seq[i] = np.maximum(self.last_seq[i], seq)
            self.last_arrival[i] = arrived
            self.has_transit[i] = True
            order = np.setdiff1d(order, take, assume_unique=True)

    def _expire_setups(self, now: float) -> None:
        late = np.flatnonzero(
            (self.state == SETTING_UP) & (now - self.opened_at > self.config.setup_timeout_s)
        )
        if late.size:
            self.state[late] = FAILED
            self.setting_up -= int(late.size)
            self.counters["setups_failed"] += int(late.size)
            for _ in late:
                self.outbox.append(("setup", (False, 0.0, "stun_timeout")))

    # -- reports -----------------------------------------------------------------------------
    def gauges(self) -> dict[str, int]:
        now = time.monotonic()
        up = self.state == UP
        stale = up & (now - self.last_answer > 3 * self.config.consent_s)
        return {
            "sessions_up": int(up.sum()),
            "sessions_setting_up": int((self.state == SETTING_UP).sum()),
            "sessions_failed": int((self.state == FAILED).sum()),
            "media_sessions": int(self.media_on.sum()),
            "consent_stale": int(stale.sum()),
        }

    def _interval(self) -> Interval:
        interval = Interval(self.rtt, self.setup, self.tick_lag, dict(self.counters), self.gauges())
        self.rtt, self.setup, self.tick_lag = (hdr.new_histogram() for _ in range(3))
        for name in self.counters:
            self.counters[name] = 0
        return interval

    def _final(self) -> dict[str, Any]:
        """Per-canary quality after sending stopped and the echoes in flight drained."""
        canaries = np.flatnonzero(self.media_session >= 0)
        sent = self.media_sent[canaries]
        received = np.minimum(self.media_received[canaries], sent)
        return {
            "interval": self._interval(),
            "canaries": int(canaries.size),
            "media_sent": sent.tolist(),
            "media_received": received.tolist(),
            "jitter_ms": (self.jitter_ns[canaries] / 1e6).round(4).tolist(),
            "max_gap_ms": (self.max_gap_ns[canaries] / 1e6).round(3).tolist(),
            "gap_began_unix_s": (self.gap_began_ns[canaries] / 1e9).round(4).tolist(),
            "sent_after_gap": np.maximum(sent - self.seq_after_gap[canaries], 0).tolist(),
            "received_after_gap": self.received_after_gap[canaries].tolist(),
            "lost_in_gap": self.lost_in_gap[canaries].tolist(),
            "last_echo_unix_s": (self.last_arrival[canaries] / 1e9).round(4).tolist(),
            "consents_sent": int(self.consent_sent.sum()),
            "consents_answered": int(self.consent_answered.sum()),
            "gauges": self.gauges(),
        }

    def _close_transport(self) -> None:
        if self.sock is not None:
            self.sock.close()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if self.epoll is not None:
            self.epoll.close()
