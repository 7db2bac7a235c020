"""The aiortc/aioice internals transceiver/webrtc/ice.py relies on are still where it expects them.

Fails loudly on an upgrade that moves them: read transceiver/webrtc/ice.py's docstring, re-check
each hook against the new source, then update the pins and this test together.
"""

from __future__ import annotations

import importlib.metadata
import inspect

import aioice
import aioice.ice
import aioice.stun
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, rtcicetransport

from relay.wire.ufrag import Keyring, decode_ufrag, derive_password
from transceiver.webrtc import ice
from transceiver.webrtc.link import Link

KEYRING = Keyring.parse("3:" + "ab" * 32)
PUBLIC = (("127.0.0.1", 3478), ("::1", 3478))


def test_pinned_versions() -> None:
    for package, version in ice.PINNED_VERSIONS.items():
        assert importlib.metadata.version(package) == version, f"{package} moved: re-check ice.py"


def test_gatherer_builds_its_connection_through_the_module_global() -> None:
    source = inspect.getsource(rtcicetransport.RTCIceGatherer.__init__)
    assert "self._connection = Connection(" in source
    assert "local_username=local_username" in source
    assert "local_password=local_password" in source
    assert getattr(rtcicetransport, "Connection") in (aioice.Connection, ice._connection)  # noqa: B009


def test_connection_hooks_have_the_expected_signatures() -> None:
    init = inspect.signature(aioice.Connection.__init__).parameters
    assert {"ice_controlling", "local_username", "local_password"} <= set(init)
    hook = inspect.signature(aioice.Connection.get_component_candidates).parameters
    assert list(hook) == ["self", "component", "addresses", "timeout"]
    assert "self.get_component_candidates(" in inspect.getsource(
        aioice.Connection.gather_candidates
    )
    assert list(inspect.signature(aioice.ice.StunProtocol.__init__).parameters) == [
        "self",
        "receiver",
    ]
    assert "local_candidate" in aioice.ice.StunProtocol.__annotations__


def test_protocol_io_goes_through_its_transport() -> None:
    send_data = inspect.getsource(aioice.ice.StunProtocol.send_data)
    assert "self.transport.sendto(data, addr)" in send_data
    assert "self.transport.sendto(bytes(message), addr)" in inspect.getsource(
        aioice.ice.StunProtocol.send_stun
    )
    assert "self.transport.close()" in inspect.getsource(aioice.ice.StunProtocol.close)
    assert "active_pair.protocol.send_data" in inspect.getsource(aioice.Connection.sendto)
    assert "self._protocols" in inspect.getsource(aioice.Connection.close)


async def test_relayed_connection_mints_credentials_and_uses_the_link() -> None:
    link = Link(("127.0.0.1", 0), KEYRING)
    address = await link.start()
    try:
        connection = ice.RelayedConnection(
            ice_controlling=False, relayed=ice.RelayedIce(link, KEYRING, PUBLIC)
        )
        assert isinstance(connection._protocols, list)
        await connection.gather_candidates()
        assert decode_ufrag(KEYRING, connection.local_username) == address
        assert connection.local_password == derive_password(KEYRING, connection.local_username)
        candidates = [(c.host, c.port, c.type) for c in connection.local_candidates]
        assert candidates == [(h, p, "host") for h, p in PUBLIC]
        assert link.session_count == 1
        await connection.close()
        assert link.session_count == 0
    finally:
        await link.aclose()


async def test_only_peer_connections_inside_relayed_through_are_relayed() -> None:
    ice.install()
    link = Link(("127.0.0.1", 0), KEYRING)
    address = await link.start()
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        offerer.addTransceiver("audio")
        await offerer.setLocalDescription(await offerer.createOffer())
        with ice.relayed_through(ice.RelayedIce(link, KEYRING, PUBLIC[:1])):
            await answerer.setRemoteDescription(offerer.localDescription)
            await answerer.setLocalDescription(await answerer.createAnswer())
        answer = answerer.localDescription.sdp
        ufrag = next(x for x in answer.splitlines() if x.startswith("a=ice-ufrag:")).split(":")[1]
        assert decode_ufrag(KEYRING, ufrag) == address
        assert "a=candidate:" in answer and " 127.0.0.1 3478 typ host" in answer
        offer_ufrag = next(
            x for x in offerer.localDescription.sdp.splitlines() if x.startswith("a=ice-ufrag:")
        )
        assert len(offer_ufrag.split(":")[1]) == 4  # the client side is a plain aioice agent
        await offerer.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    finally:
        await offerer.close()
        await answerer.close()
        await link.aclose()


async def test_recheck_hooks_are_where_relayed_connection_expects_them() -> None:
    assert list(inspect.signature(aioice.Connection.check_incoming).parameters) == [
        "self",
        "message",
        "addr",
        "protocol",
    ]
    assert "self.check_incoming(" in inspect.getsource(aioice.Connection.request_received)
    assert "self.transactions[request.transaction_id] = transaction" in inspect.getsource(
        aioice.ice.StunProtocol.request
    )
    request = aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST
    )
    transaction = aioice.stun.Transaction(request, ("127.0.0.1", 9), aioice.ice.StunProtocol(None))
    assert getattr(transaction, "_Transaction__request") is request  # noqa: B009
    assert getattr(transaction, "_Transaction__addr") == ("127.0.0.1", 9)  # noqa: B009
