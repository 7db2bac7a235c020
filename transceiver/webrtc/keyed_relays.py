"""Which relay link addresses the link takes data from: those whose keyed HELLO verified.

No sockets and no asyncio; both clocks are passed in. The link (``transceiver.webrtc.link``) asks
``admit`` for every HELLO and checks ``sources`` (one dict membership test) for every data
datagram. A relay worker sends a HELLO every second by default
(``relay.timing.RelayTiming.hello_interval_s``); an address whose last good HELLO is older than
``ttl_s`` (the link policy's ``keyed_ttl_s``) is forgotten, as silent workers are.
"""

from __future__ import annotations

from relay.wire.hello import Hello, ReplayGuard, open_hello
from relay.wire.ufrag import Keyring

Address = tuple[str, int]


class KeyedRelays:
    """The link addresses that proved a key of ``keyring``, with the time of their last proof."""

    def __init__(self, keyring: Keyring, ttl_s: float) -> None:
        self.keyring = keyring
        self.ttl_s = ttl_s
        self.sources: dict[Address, float] = {}  # relay link address -> loop time of last HELLO
        self._replays = ReplayGuard()

    def admit(
        self, payload: bytes, source: Address, own: Address, wall_s: float, now_s: float
    ) -> Hello:
        """Verify the HELLO ``payload`` (after the header) sent to ``own``; on success ``source``
        is keyed until ``now_s + ttl_s``. Raises ``relay.wire.hello.HelloError``."""
        hello = open_hello(self.keyring, payload, own, wall_s)
        self._replays.check(hello, wall_s)
        self.sources[source] = now_s
        return hello

    def expire(self, now_s: float) -> list[Address]:
        """Forget the addresses not keyed again within ``ttl_s``; returns them."""
        stale = [a for a, last_s in self.sources.items() if now_s - last_s > self.ttl_s]
        for address in stale:
            del self.sources[address]
        return stale
