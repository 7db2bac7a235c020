"""Binding requests as a WebRTC client sends them (built with aioice's own STUN encoder)."""

from __future__ import annotations

import aioice.stun

from relay.wire.ufrag import Keyring, derive_password, mint_ufrag


def binding_request(
    ufrag: str,
    password: str,
    client_ufrag: str = "cLnT",
    transaction_id: bytes | None = None,
    filler: bytes | None = None,
) -> bytes:
    """``filler``: a DATA attribute before MESSAGE-INTEGRITY (covered by it), to make it big."""
    message = aioice.stun.Message(
        aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST, transaction_id=transaction_id
    )
    message.attributes["USERNAME"] = f"{ufrag}:{client_ufrag}"
    message.attributes["PRIORITY"] = 1853759231
    message.attributes["ICE-CONTROLLING"] = 0x0102030405060708
    message.attributes["USE-CANDIDATE"] = None
    if filler is not None:
        message.attributes["DATA"] = filler
    message.add_message_integrity(password.encode("ascii"))
    message.add_fingerprint()
    return bytes(message)


def signed_request(
    ring: Keyring, transceiver: tuple[str, int], nonce: bytes | None = None
) -> bytes:
    """A request whose ufrag names ``transceiver`` and whose MESSAGE-INTEGRITY is valid."""
    ufrag = mint_ufrag(ring, transceiver, nonce)
    return binding_request(ufrag, derive_password(ring, ufrag))


def signed_request_of_size(ring: Keyring, transceiver: tuple[str, int], size: int) -> bytes:
    """A signed request of exactly ``size`` bytes (a multiple of 4, at least 4 bytes more than
    the plain one): a DATA attribute fills the room."""
    ufrag = mint_ufrag(ring, transceiver)
    password = derive_password(ring, ufrag)
    room = size - len(binding_request(ufrag, password)) - 4  # DATA's own type and length
    if room < 0 or size % 4:
        raise ValueError(f"no signed request of {size} bytes")
    return binding_request(ufrag, password, filler=b"\xa5" * room)
