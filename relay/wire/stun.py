"""Just enough STUN for both sides of the link: first-byte demux, USERNAME, MESSAGE-INTEGRITY.

Pure: bytes in, decisions out. The relay never builds or answers STUN; it reads the USERNAME
of a binding request from an unknown address (to find the transceiver) and checks the
request's MESSAGE-INTEGRITY against the password derived from the ufrag. It does not parse the
message fully: it validates the 20-byte header and walks the attributes up to
MESSAGE-INTEGRITY, bounded by the message length.

The transceiver's link demuxes every forwarded datagram with the lighter peek: ``message_class``
(request, indication, success or error; None when not STUN) and ``peek_server_ufrag`` (the
server half of a request's USERNAME), which never raise; aioice validates what it is handed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER_BYTES = 20
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
INTEGRITY_BYTES = 20
MAX_USERNAME_BYTES = 513  # RFC 8489 §14.3: "MUST contain a UTF-8 encoded sequence of < 509 bytes"
# RFC 8489 §5: the class bits of the message type.
CLASS_MASK = 0x0110
CLASS_REQUEST, CLASS_INDICATION, CLASS_SUCCESS, CLASS_ERROR = 0x0000, 0x0010, 0x0100, 0x0110
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
_PEEK_BYTES = 1_500  # the peek reads attributes within this many bytes after the header
_PEEK_ATTRIBUTES = 64  # and walks at most this many of them

_HEADER = struct.Struct("!HHI")
_TLV = struct.Struct("!HH")


class Kind(IntEnum):
    """RFC 7983 §7: the first byte of a datagram on a multiplexed ICE port."""

    OTHER = 0
    STUN = 1
    DTLS = 2
    MEDIA = 3  # RTP or RTCP


def _first_byte_kinds() -> bytes:
    table = bytearray(256)
    table[0:4] = bytes([Kind.STUN]) * 4
    table[20:64] = bytes([Kind.DTLS]) * 44
    table[128:192] = bytes([Kind.MEDIA]) * 64
    return bytes(table)


# Indexed by the first byte: one lookup, no comparisons.
FIRST_BYTE_KINDS = _first_byte_kinds()


def classify(datagram: bytes) -> Kind:
    """RFC 7983 demux: 0-3 STUN, 20-63 DTLS, 128-191 RTP/RTCP, anything else (or empty) OTHER."""
    return Kind(FIRST_BYTE_KINDS[datagram[0]]) if datagram else Kind.OTHER


def message_class(datagram: bytes) -> int | None:
    """The class bits of a STUN message (RFC 8489 §5), or None when it is not STUN."""
    if len(datagram) < HEADER_BYTES or datagram[4:8] != _COOKIE_BYTES or datagram[0] > 3:
        return None
    return int.from_bytes(datagram[0:2], "big") & CLASS_MASK


def peek_server_ufrag(datagram: bytes) -> bytes | None:
    """The recipient's half of a request's USERNAME (``server:client``, RFC 8445 §7.2.2),
    without a full parse: a bounded walk over the attribute TLVs; None when there is none."""
    offset, end = HEADER_BYTES, min(len(datagram), HEADER_BYTES + _PEEK_BYTES)
    for _ in range(_PEEK_ATTRIBUTES):
        if offset + 4 > end:
            return None
        kind, size = _TLV.unpack_from(datagram, offset)
        if kind == ATTR_USERNAME:
            value = datagram[offset + 4 : offset + 4 + size]
            return value.partition(b":")[0] if len(value) == size else None
        offset += 4 + (size + 3) // 4 * 4
    return None


class StunError(ValueError):
    """A datagram that is not an acceptable binding request; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """What the relay needs from a binding request: USERNAME and where MESSAGE-INTEGRITY is."""

    username: bytes
    integrity_offset: int

    @property
    def server_ufrag(self) -> bytes:
        """RFC 8445 §7.2.2: USERNAME is ``recipient-ufrag:sender-ufrag``; we are the recipient."""
        return self.username.partition(b":")[0]


def read_binding_request(datagram: bytes) -> BindingRequest:
    """Validate the header, then walk attributes up to MESSAGE-INTEGRITY (RFC 8489 §14.5).

    Attributes after MESSAGE-INTEGRITY are not authenticated and are ignored (§14.5 / §15.4).
    """
    end = _check_header(datagram)
    username: bytes | None = None
    offset = HEADER_BYTES
    while offset < end:  # both multiples of 4, so a 4-byte attribute header always fits
        kind, size = _TLV.unpack_from(datagram, offset)
        value_end = offset + 4 + size
        if value_end > end:
            raise StunError("stun_attribute", f"attribute 0x{kind:04x} overruns the message")
        if kind == ATTR_MESSAGE_INTEGRITY:
            return _finish(username, offset, size)
        if kind == ATTR_USERNAME:
            username = datagram[offset + 4 : value_end]
        offset = value_end + (-size & 3)  # values are padded to a multiple of 4 (§14)
    raise StunError("no_integrity", "binding request without MESSAGE-INTEGRITY")


def _check_header(datagram: bytes) -> int:
    """RFC 8489 §5: type, length (a multiple of 4, equal to the rest), magic cookie."""
    if len(datagram) < HEADER_BYTES:
        raise StunError("stun_short", f"{len(datagram)} bytes is shorter than a STUN header")
    msg_type: int
    length: int
    cookie: int
    msg_type, length, cookie = _HEADER.unpack_from(datagram)
    if cookie != MAGIC_COOKIE:
        raise StunError("stun_cookie", f"magic cookie 0x{cookie:08x} is not 0x{MAGIC_COOKIE:08x}")
    if length % 4 or HEADER_BYTES + length != len(datagram):
        raise StunError(
            "stun_length", f"length field {length} does not match {len(datagram)} bytes"
        )
    if msg_type != BINDING_REQUEST:
        raise StunError("not_request", f"message type 0x{msg_type:04x} is not a binding request")
    return HEADER_BYTES + length


def _finish(username: bytes | None, integrity_offset: int, size: int) -> BindingRequest:
    if size != INTEGRITY_BYTES:
        raise StunError("stun_attribute", f"MESSAGE-INTEGRITY of {size} bytes, expected 20")
    if username is None:
        raise StunError("no_username", "no USERNAME before MESSAGE-INTEGRITY")
    if b":" not in username or len(username) > MAX_USERNAME_BYTES:
        raise StunError("username", "USERNAME is not server-ufrag:client-ufrag")
    return BindingRequest(username, integrity_offset)


def integrity_ok(datagram: bytes, request: BindingRequest, password: bytes) -> bool:
    """RFC 8489 §14.5 (RFC 5389 §15.4): HMAC-SHA1 keyed with the short-term password.

    The HMAC covers the message up to MESSAGE-INTEGRITY, with the header's length field set as
    if the message ended right after MESSAGE-INTEGRITY (so a FINGERPRINT after it is excluded).
    """
    offset = request.integrity_offset
    length = offset + 4 + INTEGRITY_BYTES - HEADER_BYTES
    covered = datagram[:2] + length.to_bytes(2, "big") + datagram[4:offset]
    expected = hmac.new(password, covered, hashlib.sha1).digest()
    received = datagram[offset + 4 : offset + 4 + INTEGRITY_BYTES]
    return hmac.compare_digest(expected, received)
