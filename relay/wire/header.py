"""The relay ⇄ transceiver link header and its control messages.

Pure: bytes in, dataclasses out. Shared by the relay and the transceiver.

Every datagram on the link starts with a fixed 20-byte header in front of the untouched
payload::

    version:1 | flags:1 | client port:2 (big endian) | client IP:16 (IPv4 as ::ffff:a.b.c.d)

From the relay it means "this payload came from that client"; from a transceiver, "send this
payload to that client". With ``FLAG_CONTROL`` set the payload is a control message, never
forwarded to a client, and the address fields are zero::

    HELLO   relay worker -> transceiver: "I am a relay worker, here is proof I hold the keyring;
            tell me your live routes". body: signed, see ``relay.wire.hello``. The transceiver takes
            data only from link addresses whose HELLO verified, and answers a HELLO that asks
            for routes with ROUTES (possibly empty).
    ROUTES  transceiver -> relay worker: the client addresses of its live sessions.
            body: count:2 | count x (client IP:16 | client port:2)
    GONE    transceiver -> relay worker: these sessions ended; forget their routes.
            body: as ROUTES.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER_VERSION = 1
HEADER_BYTES = 20
# The largest client payload either end carries (WebRTC keeps datagrams under the path MTU,
# ~1,200-1,500 bytes), so a link datagram is at most HEADER_BYTES + MAX_PAYLOAD_BYTES. Both
# ends drop and count a larger datagram; neither forwards it truncated.
MAX_PAYLOAD_BYTES = 2048
MAX_LINK_DATAGRAM_BYTES = HEADER_BYTES + MAX_PAYLOAD_BYTES
FLAG_CONTROL = 0x01
ENTRY_BYTES = 18
# Keeps a ROUTES datagram under a 1,200-byte path MTU: 20 + 1 + 2 + 64 * 18 = 1,175 bytes.
MAX_ROUTES_PER_MESSAGE = 64

_HEADER = struct.Struct("!BBH16s")
_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"

Address = tuple[str, int]


class HeaderError(ValueError):
    """A link datagram that does not parse; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ControlType(IntEnum):
    HELLO = 1
    ROUTES = 2
    GONE = 3


@dataclass(frozen=True)
class Header:
    flags: int
    client: Address

    @property
    def is_control(self) -> bool:
        return bool(self.flags & FLAG_CONTROL)


@dataclass(frozen=True)
class ControlMessage:
    kind: ControlType
    routes: tuple[Address, ...] = ()

    def __bytes__(self) -> bytes:
        if len(self.routes) > MAX_ROUTES_PER_MESSAGE:
            raise ValueError(f"at most {MAX_ROUTES_PER_MESSAGE} routes per message")
        body = bytes([self.kind])
        if self.kind != ControlType.HELLO:
            body += len(self.routes).to_bytes(2, "big")
            body += b"".join(pack_address(a) for a in self.routes)
        return encode_header(b"\x00" * ENTRY_BYTES, FLAG_CONTROL) + body

    @classmethod
    def parse(cls, payload: bytes) -> ControlMessage:
        """Parse the payload that follows a control header."""
        if not payload:
            raise HeaderError("control", "empty control message")
        try:
            kind = ControlType(payload[0])
        except ValueError:
            raise HeaderError("control", f"unknown control type {payload[0]}") from None
        if kind == ControlType.HELLO:
            return cls(kind)
        return cls(kind, _parse_routes(payload[1:]))


def _parse_routes(body: bytes) -> tuple[Address, ...]:
    if len(body) < 2:
        raise HeaderError("control", "route list without a count")
    count = int.from_bytes(body[:2], "big")
    if len(body) != 2 + count * ENTRY_BYTES:
        raise HeaderError("control", f"route list of {count} has {len(body) - 2} bytes")
    entries = (body[2 + i * ENTRY_BYTES : 2 + (i + 1) * ENTRY_BYTES] for i in range(count))
    return tuple(unpack_address(e) for e in entries)


def pack_address(address: Address) -> bytes:
    """18 bytes: IP as 16 (IPv4 mapped into IPv6) then the port."""
    return ip16(address[0]) + address[1].to_bytes(2, "big")


def unpack_address(entry: bytes) -> Address:
    return ip_text(entry[:16]), int.from_bytes(entry[16:18], "big")


def ip16(host: str) -> bytes:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    return _V4_PREFIX + ip.packed if ip.version == 4 else ip.packed


def ip_text(raw16: bytes) -> str:
    if raw16[:12] == _V4_PREFIX:
        return str(ipaddress.IPv4Address(raw16[12:]))
    return str(ipaddress.IPv6Address(raw16))


def encode_header(entry: bytes, flags: int = 0) -> bytes:
    """The header for an 18-byte packed address (see pack_address), port first on the wire."""
    return _HEADER.pack(HEADER_VERSION, flags, int.from_bytes(entry[16:18], "big"), entry[:16])


def header_for(client: Address, flags: int = 0) -> bytes:
    return encode_header(pack_address(client), flags)


def parse_header(datagram: bytes) -> Header:
    if len(datagram) < HEADER_BYTES:
        raise HeaderError("short", f"{len(datagram)} bytes is shorter than the header")
    version, flags, port, raw_ip = _HEADER.unpack_from(datagram)
    if version != HEADER_VERSION:
        raise HeaderError("version", f"header version {version} is not {HEADER_VERSION}")
    return Header(flags, (ip_text(raw_ip), port))
