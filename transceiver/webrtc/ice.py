"""The aiortc/aioice integration: the only module that touches their internals.

I/O layer. A relayed session's ICE agent has a signed ufrag naming this transceiver's link
address, a password derived from that ufrag, and exactly one host candidate per relay public
address, whose "socket" is a ``link.SessionTransport`` on the shared link socket.

Hooks used (aiortc 1.16.0 / aioice 0.13.0; ``tests/test_ice_contract.py`` fails if they move):

- ``aiortc.rtcicetransport.Connection``: the name ``RTCIceGatherer.__init__`` calls to build its
  aioice ``Connection``; ``install()`` replaces it with a factory that builds a
  ``RelayedConnection`` inside ``relayed_through(...)`` and a plain one everywhere else (so
  aiortc clients in the same process, e.g. tests, are untouched).
- ``aioice.Connection.__init__(local_username=, local_password=)``; aiortc passes the first
  gatherer's credentials to later gatherers of the same peer connection, so they are kept.
- ``aioice.Connection.get_component_candidates(component, addresses, timeout)`` and the private
  list ``Connection._protocols`` that pairs local candidates with remote ones.
- ``aioice.ice.StunProtocol(receiver)``, its ``local_candidate`` attribute and
  ``connection_made(transport)``; it calls ``transport.sendto`` and ``transport.close``.
- ``aioice.Connection.check_incoming(message, addr, protocol)`` (an authenticated check came
  in), ``StunProtocol.transactions`` (transaction id -> ``aioice.stun.Transaction``) and the
  transaction's private ``__request``/``__addr``: see ``RelayedConnection.check_incoming``.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice
import aioice.stun
from aioice.candidate import candidate_foundation, candidate_priority
from aiortc import rtcicetransport

from relay.wire.ufrag import Keyring, derive_password, mint_ufrag
from transceiver.webrtc.link import Link, LinkSession

Address = tuple[str, int]
PINNED_VERSIONS = {"aiortc": "1.16.0", "aioice": "0.13.0"}


@dataclass(frozen=True)
class RelayedIce:
    """What a relayed ICE agent needs: the link, the ufrag keys, the relay's public addresses."""

    link: Link
    keyring: Keyring
    public: tuple[Address, ...]


_CURRENT: ContextVar[RelayedIce | None] = ContextVar("relayed_ice", default=None)


class RelayedConnection(aioice.Connection):
    """An aioice Connection whose only candidates are the relay's, carried over the link."""

    def __init__(self, *args: Any, relayed: RelayedIce, **kwargs: Any) -> None:
        username = kwargs.pop("local_username", None)
        if username is None:
            username = mint_ufrag(relayed.keyring, relayed.link.address)
        password = kwargs.pop("local_password", None) or derive_password(relayed.keyring, username)
        kwargs.update(local_username=username, local_password=password)
        super().__init__(*args, **kwargs)
        self._relayed = relayed
        self._link_session: LinkSession | None = None
        self._rechecked: set[bytes] = set()  # transactions already resent by check_incoming
        self._max_rechecks = relayed.link.policy.max_rechecks  # the checks that matter come first

    async def get_component_candidates(
        self,
        component: int,
        addresses: list[str],
        timeout: int = 5,  # noqa: ASYNC109 (aioice's signature)
    ) -> list[aioice.Candidate]:
        """One host candidate per relay public address; no socket is opened."""
        if component != 1 or self._link_session is not None:
            raise ValueError("a relayed ICE agent has exactly one component (rtcp-mux)")
        session = self._link_session = self._relayed.link.open_session(self.local_username)
        return [
            self._relay_candidate(session, component, address) for address in self._relayed.public
        ]

    def _relay_candidate(
        self, session: LinkSession, component: int, address: Address
    ) -> aioice.Candidate:
        host, port = address
        protocol = aioice.ice.StunProtocol(self)
        transport = session.transport(ipaddress.ip_address(host).version, address)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.local_candidate = aioice.Candidate(
            foundation=candidate_foundation("host", "udp", host),
            component=component,
            transport="udp",
            priority=candidate_priority(component, "host"),
            host=host,
            port=port,
            type="host",
        )
        self._protocols.append(protocol)
        return protocol.local_candidate

    def check_incoming(
        self, message: aioice.stun.Message, addr: Address, protocol: aioice.ice.StunProtocol
    ) -> None:
        """An authenticated check from the client: also resend our own check to it, if one is
        still waiting for its answer (RFC 8445 §7.3.1.4 triggers a new check for such a pair;
        aioice instead waits for the retransmission, 500 ms later). At most the link policy's
        ``max_rechecks`` per connection.

        Through the relay this is the common case: our first check often reaches the client
        before the client's first check has reached the relay, so the relay, which does not
        know the client's address yet, drops the answer. The client's check that just arrived
        taught the relay the route, so the resent request (same transaction) is answered now.
        """
        super().check_incoming(message, addr, protocol)
        if len(self._rechecked) >= self._max_rechecks:
            return  # connected long ago: only consent checks are left
        for transaction in list(protocol.transactions.values()):
            request = getattr(transaction, "_Transaction__request", None)
            target = getattr(transaction, "_Transaction__addr", None)
            if request is None or target != addr or request.transaction_id in self._rechecked:
                continue
            self._rechecked.add(request.transaction_id)  # once per transaction: no storm
            protocol.send_stun(request, target)

    async def close(self) -> None:
        await super().close()
        if self._link_session is not None:
            self._link_session.close()


def _connection(*args: Any, **kwargs: Any) -> aioice.Connection:
    relayed = _CURRENT.get()
    if relayed is None:
        return aioice.Connection(*args, **kwargs)
    return RelayedConnection(*args, relayed=relayed, **kwargs)


def install() -> None:
    """Make aiortc build its ICE agents through ``_connection`` (idempotent)."""
    current = getattr(rtcicetransport, "Connection")  # noqa: B009 (not exported, mypy)
    if current is not aioice.Connection and current is not _connection:
        raise RuntimeError(f"aiortc.rtcicetransport.Connection is already replaced by {current!r}")
    setattr(rtcicetransport, "Connection", _connection)  # noqa: B010 (see above)


@contextlib.contextmanager
def relayed_through(relayed: RelayedIce) -> Iterator[None]:
    """Peer connections negotiated inside this block use relayed ICE agents."""
    token = _CURRENT.set(relayed)
    try:
        yield
    finally:
        _CURRENT.reset(token)
