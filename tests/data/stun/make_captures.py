"""How the STUN captures next to this file were made (run once; the tests read the .bin files).

    PYTHONPATH=. .venv/bin/python tests/data/stun/make_captures.py

- rfc5769-request.bin: RFC 5769 §2.1 sample request, bytes typed in from the RFC.
- aioice-request.bin: a binding request built by aioice 0.13.0's own ``aioice.stun.Message``
  (as aiortc sends it), USERNAME = a ufrag minted for transceiver 127.0.0.1:7000 with the test
  keyring below and a fixed nonce, MESSAGE-INTEGRITY keyed with ``derive_password``.
- chrome-request.bin: a request laid out as Chrome sends it (USERNAME, GOOG-NETWORK-INFO
  0xC057, ICE-CONTROLLING, USE-CANDIDATE, PRIORITY, MESSAGE-INTEGRITY, FINGERPRINT), same
  ufrag scheme for transceiver [::1]:7001.
- chromium-request.bin: a real capture from Debian Chromium; see capture_chromium.py.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from pathlib import Path

import aioice.stun

from relay.wire.ufrag import Keyring, derive_password, mint_ufrag

HERE = Path(__file__).parent
TEST_KEYS = "7:" + "5a" * 32
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e20746573742063"
    "6c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68"
    "36765920202000080014 9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf".replace(" ", "")
)


def aioice_request(ring: Keyring) -> bytes:
    ufrag = mint_ufrag(ring, ("127.0.0.1", 7000), nonce=b"aioice!!")
    message = aioice.stun.Message(
        aioice.stun.Method.BINDING,
        aioice.stun.Class.REQUEST,
        transaction_id=bytes.fromhex("0102030405060708090a0b0c"),
    )
    message.attributes["USERNAME"] = f"{ufrag}:Ab3d"
    message.attributes["PRIORITY"] = 1853759231
    message.attributes["ICE-CONTROLLED"] = 0x1122334455667788
    message.add_message_integrity(derive_password(ring, ufrag).encode("ascii"))
    message.add_fingerprint()
    return bytes(message)


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def _with_length(body: bytes, extra: int) -> bytes:
    return body[:2] + struct.pack("!H", len(body) - 20 + extra) + body[4:]


def chrome_request(ring: Keyring) -> bytes:
    ufrag = mint_ufrag(ring, ("::1", 7001), nonce=b"chrome!!")
    body = struct.pack("!HHI", 1, 0, 0x2112A442) + bytes.fromhex("4a6f8b1c2d3e4f5061728394")
    body += _attr(0x0006, f"{ufrag}:pQ9x".encode())  # USERNAME
    body += _attr(0xC057, bytes.fromhex("0001000a"))  # GOOG-NETWORK-INFO: id 1, cost 10
    body += _attr(0x802A, bytes.fromhex("0f1e2d3c4b5a6978"))  # ICE-CONTROLLING
    body += _attr(0x0025, b"")  # USE-CANDIDATE
    body += _attr(0x0024, struct.pack("!I", 1845501695))  # PRIORITY
    password = derive_password(ring, ufrag).encode("ascii")
    body = _with_length(body, 24)
    body += _attr(0x0008, hmac.new(password, body, hashlib.sha1).digest())
    body = _with_length(body, 8)
    crc = (binascii.crc32(body) ^ 0x5354554E) & 0xFFFFFFFF
    return body + _attr(0x8028, struct.pack("!I", crc))


if __name__ == "__main__":
    ring = Keyring.parse(TEST_KEYS)
    (HERE / "rfc5769-request.bin").write_bytes(RFC5769_REQUEST)
    (HERE / "aioice-request.bin").write_bytes(aioice_request(ring))
    (HERE / "chrome-request.bin").write_bytes(chrome_request(ring))
