"""STUN messages the load tester sends and answers, built with struct and hmac (RFC 8489, RFC
8445 §7.1.2): a generator builds one per session and a lab transceiver one per consent check, so
they must cost microseconds, not the ~300 µs a general-purpose STUN library takes here with the
ufrag's own HMACs.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import zlib

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
USERNAME, PRIORITY, ICE_CONTROLLING = 0x0006, 0x0024, 0x802A
XOR_MAPPED_ADDRESS, MESSAGE_INTEGRITY, FINGERPRINT = 0x0020, 0x0008, 0x8028
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101


class StunError(ValueError):
    pass


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def integrity_key(password: bytes) -> hmac.HMAC:
    """An HMAC-SHA1 keyed with ``password``, copied per message (keying it costs more than
    hashing a short message)."""
    return hmac.new(password, digestmod=hashlib.sha1)


def _sealed(kind: int, transaction: bytes, body: bytes, password: bytes | hmac.HMAC) -> bytes:
    """``body`` followed by MESSAGE-INTEGRITY and FINGERPRINT, each over what precedes it with
    the length field counting it (RFC 8489 §14.5, §14.7)."""
    header = struct.pack("!HHI", kind, len(body) + 24, MAGIC_COOKIE) + transaction
    mac = integrity_key(password) if isinstance(password, bytes) else password.copy()
    mac.update(header + body)
    integrity = mac.digest()
    body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + integrity
    header = struct.pack("!HHI", kind, len(body) + 8, MAGIC_COOKIE) + transaction
    crc = (zlib.crc32(header + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return header + body + struct.pack("!HHI", FINGERPRINT, 4, crc)


def binding_request(
    transaction: bytes, username: str, password: bytes, priority: int, tiebreaker: int
) -> bytes:
    """An ICE connectivity check as a controlling browser agent sends it."""
    if len(transaction) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    body = _attribute(USERNAME, username.encode("ascii"))
    body += _attribute(PRIORITY, struct.pack("!I", priority))
    body += _attribute(ICE_CONTROLLING, struct.pack("!Q", tiebreaker))
    return _sealed(BINDING_REQUEST, transaction, body, password)


def mapped_address(client: tuple[str, int]) -> bytes:
    """The XOR-MAPPED-ADDRESS attribute telling an IPv4 ``client`` its address."""
    port = client[1] ^ (MAGIC_COOKIE >> 16)
    ip = int.from_bytes(socket.inet_aton(client[0]), "big") ^ MAGIC_COOKIE
    return _attribute(XOR_MAPPED_ADDRESS, struct.pack("!BBHI", 0, 1, port, ip))


def binding_success(
    transaction: bytes,
    client: tuple[str, int],
    password: bytes | hmac.HMAC,
    mapped: bytes | None = None,
) -> bytes:
    """A binding success response telling an IPv4 ``client`` its address (``mapped``: that
    attribute, when the caller has it already; ``password``: or its ``integrity_key``)."""
    body = mapped_address(client) if mapped is None else mapped
    return _sealed(BINDING_SUCCESS, transaction, body, password)


def read_username(request: bytes) -> bytes:
    """The USERNAME attribute of a binding request; raises StunError when there is none."""
    if len(request) < 20 or request[:2] != b"\x00\x01":
        raise StunError("not a binding request")
    end = min(len(request), 20 + int.from_bytes(request[2:4], "big"))
    offset = 20
    while offset + 4 <= end:
        kind, length = struct.unpack_from("!HH", request, offset)
        if kind == USERNAME:
            return request[offset + 4 : offset + 4 + length]
        offset += 4 + length + (-length % 4)
    raise StunError("no USERNAME")
