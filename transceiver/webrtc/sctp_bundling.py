"""Data-channel messages sent together leave in one SCTP packet (aiortc pinned;
tests/test_sctp_bundling.py checks the internals this relies on).

I/O layer; touches aiortc internals (``RTCSctpTransport``), like ``rtp_tuning``.

aiortc's SCTP sends every DATA chunk in a packet of its own ("no bundling for now"), and each
``RTCDataChannel.send`` schedules a flush task of its own. A Realtime turn sends its events in
bursts (``response.created`` and the items it opens, the answer's ``.done`` events together), so
the transceiver paid, per message: a task, a packet's CRC32c, a DTLS record and a ``sendto``, and
decrypted and parsed the SACKs the peer sent for those packets (aiortc's peer: one a packet).
:class:`BundlingSctpTransport` changes two things and nothing else:

- ``send``: one flush task per burst (the messages queued before it runs), not one a message.
  The first of aiortc's tasks drained the whole queue anyway; the others found it empty.
- the flush: the new DATA chunks it hands to aiortc's ``_transmit`` (which still decides, by
  the congestion window, which chunks may go) are packed in order into packets of at most
  ``SCTP_MAX_PACKET_LENGTH`` bytes (RFC 9260 6.10: DATA chunks may be bundled). Any other
  chunk (a retransmission outside a flush, SACK, FORWARD-TSN, RE-CONFIG) goes alone, as before,
  after the DATA chunks gathered before it. Timers, counters and retransmissions stay aiortc's.

``install`` makes ``RTCPeerConnection`` build these instead of aiortc's (idempotent).
"""

from __future__ import annotations

import asyncio
from struct import pack
from typing import Any

import aiortc.rtcpeerconnection
from aiortc.rtcsctptransport import (  # type: ignore[attr-defined]  # crc32c: aiortc's import
    SCTP_MAX_PACKET_LENGTH,
    WEBRTC_BINARY,
    WEBRTC_BINARY_EMPTY,
    WEBRTC_STRING,
    WEBRTC_STRING_EMPTY,
    Chunk,
    DataChunk,
    RTCSctpTransport,
    crc32c,
)

AIORTC_SCTP_TRANSPORT = RTCSctpTransport  # aiortc's own, for the contract test
_CHECKSUM_PLACEHOLDER = b"\x00\x00\x00\x00"


def bundled_packets(header: bytes, chunks: list[bytes]) -> list[bytes]:
    """``chunks`` (serialised, padded) in order in as few packets of at most
    ``SCTP_MAX_PACKET_LENGTH`` bytes as they fill; each packet is ``header`` (source port,
    destination port, verification tag), its CRC32c (RFC 9260 appendix B) and its chunks."""
    packets: list[bytes] = []
    body: list[bytes] = []
    size = len(header) + len(_CHECKSUM_PLACEHOLDER)
    for chunk in chunks:
        if body and size + len(chunk) > SCTP_MAX_PACKET_LENGTH:
            packets.append(_packet(header, body))
            body, size = [], len(header) + len(_CHECKSUM_PLACEHOLDER)
        body.append(chunk)
        size += len(chunk)
    if body:
        packets.append(_packet(header, body))
    return packets


def _packet(header: bytes, chunks: list[bytes]) -> bytes:
    data = b"".join(chunks)
    checksum = crc32c(header + _CHECKSUM_PLACEHOLDER + data)
    return header + pack("<L", checksum) + data


def payload(data: bytes | str) -> tuple[int, bytes]:
    """A message's SCTP payload protocol identifier and bytes (RFC 8831 section 8)."""
    if data == "":
        return WEBRTC_STRING_EMPTY, b"\x00"
    if isinstance(data, str):
        return WEBRTC_STRING, data.encode("utf8")
    if data == b"":
        return WEBRTC_BINARY_EMPTY, b"\x00"
    return WEBRTC_BINARY, data


class BundlingSctpTransport(RTCSctpTransport):
    """aiortc's SCTP association, with one flush task per burst of messages and the DATA
    chunks of a flush bundled into packets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bundle: list[bytes] | None = None  # a flush's DATA chunks, serialised, in order
        self._flush_due = False  # a flush task is scheduled and has not started yet
        self._flushes: set[asyncio.Task[None]] = set()

    def _data_channel_send(self, channel: Any, data: bytes | str) -> None:
        pp_id, user_data = payload(data)
        limit = self._remote_max_message_size
        if limit and len(user_data) > limit:
            raise ValueError(
                f"Cannot send message of {len(user_data)} bytes, the remote party "
                f"only supports messages up to {limit} bytes"
            )
        channel._addBufferedAmount(len(user_data))
        self._data_channel_queue.append((channel, pp_id, user_data))
        if not self._flush_due:
            self._flush_due = True
            task = asyncio.ensure_future(self._flush_burst())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_burst(self) -> None:
        self._flush_due = False  # a message queued from here on schedules the next flush
        await self._data_channel_flush()

    async def _data_channel_flush(self) -> None:
        if self._bundle is not None:  # a flush within a flush: the outer one sends
            await super()._data_channel_flush()
            return
        self._bundle = []
        try:
            await super()._data_channel_flush()
        finally:
            await self._send_bundle()

    async def _send_chunk(self, chunk: Chunk) -> None:
        if self._bundle is not None and isinstance(chunk, DataChunk):
            self._bundle.append(bytes(chunk))
            return
        await self._send_bundle(keep_bundling=self._bundle is not None)
        await super()._send_chunk(chunk)

    async def _send_bundle(self, keep_bundling: bool = False) -> None:
        """The DATA chunks gathered so far, in bundled packets; bundling goes on only when
        ``keep_bundling`` (an unbundled chunk must leave after them, within a flush)."""
        chunks, self._bundle = self._bundle or [], [] if keep_bundling else None
        if not chunks:
            return
        header = pack("!HHL", self._local_port, self._remote_port, self._remote_verification_tag)
        for packet in bundled_packets(header, chunks):
            await self.transport._send_data(packet)


def install() -> None:
    """Have ``RTCPeerConnection`` build :class:`BundlingSctpTransport` (idempotent)."""
    aiortc.rtcpeerconnection.RTCSctpTransport = BundlingSctpTransport  # type: ignore[attr-defined]
