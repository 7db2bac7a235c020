"""relay.routing with an injected clock: learning rules, never-overwrite, expiry, rate limit."""

from __future__ import annotations

import pytest
from stun_samples import binding_request, signed_request

from relay.routing import (
    MAX_RATE_SOURCES,
    Control,
    Drop,
    Forward,
    Router,
    RouteTable,
    SendToClient,
    StunRateLimit,
)
from relay.wire.header import ControlMessage, ControlType, header_for
from relay.wire.ufrag import Keyring, derive_password, mint_ufrag

RING = Keyring.parse("2:" + "22" * 32 + ",1:" + "11" * 32)
OLD_RING = Keyring.parse("1:" + "11" * 32)
T1, T2 = ("127.0.0.1", 7000), ("127.0.0.1", 7001)
CLIENT = ("198.51.100.7", 40000)
CLIENT6 = ("2001:db8::7", 40000, 0, 0)
SRTP = b"\x80\x6f" + b"s" * 198
DTLS = b"\x16\xfe\xfd" + b"d" * 40
IDLE_S = 30.0


def make_router(rate: float = 20.0) -> Router:
    return Router(RING, [T1, T2], [4, 6], RouteTable(IDLE_S), StunRateLimit(rate, 2 * rate))


def link_datagram(client: tuple[str, int], payload: bytes) -> bytes:
    return header_for(client) + payload


def control(kind: ControlType, *clients: tuple[str, int]) -> bytes:
    return bytes(ControlMessage(kind, clients))


def test_authenticated_stun_learns_then_media_follows() -> None:
    router = make_router()
    request = signed_request(RING, T1)
    assert router.on_public(request, CLIENT, 0, 10.0) == Forward(T1, header_for(CLIENT) + request)
    assert router.on_public(SRTP, CLIENT, 0, 11.0) == Forward(T1, header_for(CLIENT) + SRTP)
    route = router.routes.inbound[CLIENT]
    assert (route.link, route.header, route.seen_s, route.socket_index) == (
        T1,
        header_for(CLIENT),
        11.0,
        0,
    )
    assert router.routes.outbound == {header_for(CLIENT): (0, CLIENT)}


def test_previous_key_still_routes() -> None:
    router = make_router()
    ufrag = mint_ufrag(OLD_RING, T2)
    request = binding_request(ufrag, derive_password(OLD_RING, ufrag))
    assert router.on_public(request, CLIENT, 0, 0.0) == Forward(T2, header_for(CLIENT) + request)


def test_v6_client_learns_with_socket_index() -> None:
    router = make_router()
    request = signed_request(RING, T2)
    action = router.on_public(request, CLIENT6, 1, 0.0)
    assert action == Forward(T2, header_for(CLIENT6[:2]) + request)
    assert router.routes.inbound[CLIENT6].socket_index == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (SRTP, "unknown_address"),
        (DTLS, "unknown_address"),
        (b"", "not_webrtc"),
        (b"\x40junk", "not_webrtc"),
        (b"\xffjunk", "not_webrtc"),
        (b"\x01\x01" + signed_request(RING, T1)[2:], "unknown_address"),  # a response
        (signed_request(RING, T1)[:60], "bad_ufrag_stun_length"),  # truncated
        (signed_request(RING, T1)[:12], "bad_ufrag_stun_short"),
        (binding_request("evtj", "VOkJxbRl1RmTxUk/WvJxBt"), "bad_ufrag_length"),
        (binding_request("AQIE" + "A" * 32, "x" * 22), "bad_ufrag_mac"),
        (binding_request("A-" * 18, "x" * 22), "bad_ufrag_charset"),
    ],
    # named, not shown: the requests carry random transaction ids, and every test worker must
    # collect the same test names
    ids=[
        "srtp",
        "dtls",
        "empty",
        "0x40",
        "0xff",
        "stun_response",
        "truncated",
        "header_only",
        "ufrag_length",
        "ufrag_mac",
        "ufrag_charset",
    ],
)
def test_public_drops(data: bytes, reason: str) -> None:
    router = make_router()
    assert router.on_public(data, CLIENT, 0, 0.0) == Drop(reason)
    assert router.routes.inbound == {}


def test_changed_transceiver_hint_fails_mac() -> None:
    ufrag = mint_ufrag(RING, T1)
    forged = ufrag[:8] + ("B" if ufrag[8] != "B" else "C") + ufrag[9:]  # inside the address
    request = binding_request(forged, derive_password(RING, forged))
    assert make_router().on_public(request, CLIENT, 0, 0.0) == Drop("bad_ufrag_mac")


def test_wrong_password_fails_integrity() -> None:
    request = binding_request(mint_ufrag(RING, T1), "wrong-password-but-ice-chars")
    assert make_router().on_public(request, CLIENT, 0, 0.0) == Drop("bad_ufrag_integrity")


def test_signed_for_unconfigured_transceiver() -> None:
    request = signed_request(RING, ("10.9.9.9", 7000))
    assert make_router().on_public(request, CLIENT, 0, 0.0) == Drop("unknown_transceiver")


def test_rate_limit_unknown_sources_only() -> None:
    router = make_router(rate=5.0)
    bad = binding_request("AQIE" + "A" * 32, "x" * 22)
    reasons = [router.on_public(bad, CLIENT, 0, 0.0) for _ in range(12)]
    assert reasons == [Drop("bad_ufrag_mac")] * 10 + [Drop("rate_limited")] * 2
    assert router.on_public(bad, ("198.51.100.8", 1), 0, 0.0) == Drop("bad_ufrag_mac")
    assert router.on_public(bad, CLIENT, 0, 0.1) == Drop("rate_limited")  # 0.5 token
    assert router.on_public(bad, CLIENT, 0, 0.3) == Drop("bad_ufrag_mac")  # 1.5 tokens
    good = signed_request(RING, T1)
    assert router.on_public(good, CLIENT, 0, 0.3) == Drop("rate_limited")
    assert isinstance(router.on_public(good, CLIENT, 0, 1.0), Forward)
    assert all(isinstance(router.on_public(SRTP, CLIENT, 0, 1.0), Forward) for _ in range(50))


def test_rate_limit_sweep_and_cap() -> None:
    limit = StunRateLimit(10.0, 20.0)
    assert limit.allow(("a", 1), 0.0) and limit.allow(("b", 1), 1.0)
    assert limit.sweep(2.5) == 1 and list(limit.buckets) == [("b", 1)]
    for port in range(MAX_RATE_SOURCES - 1):
        limit.buckets[("x", port)] = [20.0, 2.5]
    assert not limit.allow(("new", 1), 2.6)  # full of fresh sources: refuse the newcomer
    assert limit.allow(("new", 1), 10.0)  # ... until the old buckets have refilled


def test_idle_expiry_and_refresh() -> None:
    router = make_router()
    router.on_public(signed_request(RING, T1), CLIENT, 0, 0.0)
    router.on_public(SRTP, CLIENT, 0, 20.0)
    assert router.routes.expire(49.0) == 0
    assert router.routes.expire(50.5) == 1
    assert router.routes.inbound == {} and router.routes.outbound == {}
    assert router.on_public(SRTP, CLIENT, 0, 51.0) == Drop("unknown_address")


def test_routes_message_learns_and_refreshes() -> None:
    router = make_router()
    result = router.on_link(control(ControlType.ROUTES, CLIENT[:2], CLIENT6[:2]), T1, 5.0)
    assert isinstance(result, Control) and result.changed == 2
    assert router.on_public(SRTP, CLIENT6, 1, 6.0) == Forward(T1, header_for(CLIENT6[:2]) + SRTP)
    assert router.routes.inbound[CLIENT6].socket_index == 1
    router.on_link(control(ControlType.ROUTES, CLIENT[:2]), T1, 30.0)
    assert router.routes.expire(50.0) == 1  # CLIENT6 idle since 6.0; CLIENT refreshed at 30.0
    assert list(router.routes.inbound) == [CLIENT]


def test_never_overwrite_a_live_route() -> None:
    router = make_router()
    router.on_public(signed_request(RING, T1), CLIENT, 0, 0.0)
    learned = router.on_link(control(ControlType.ROUTES, CLIENT), T2, 1.0)
    assert isinstance(learned, Control) and learned.changed == 0
    outbound = router.on_link(link_datagram(CLIENT, DTLS), T2, 1.0)
    assert outbound == SendToClient(0, CLIENT, DTLS)  # a known transceiver may still send
    assert router.on_public(SRTP, CLIENT, 0, 2.0) == Forward(T1, header_for(CLIENT) + SRTP)
    request_for_t2 = signed_request(RING, T2)  # a known address keeps its route
    assert router.on_public(request_for_t2, CLIENT, 0, 3.0) == Forward(
        T1, header_for(CLIENT) + request_for_t2
    )


def test_stale_route_can_be_replaced() -> None:
    router = make_router()
    router.on_public(signed_request(RING, T1), CLIENT, 0, 0.0)
    result = router.on_link(control(ControlType.ROUTES, CLIENT), T2, IDLE_S + 1.0)
    assert isinstance(result, Control) and result.changed == 1
    assert router.routes.inbound[CLIENT].link == T2
    assert router.routes.outbound == {header_for(CLIENT): (0, CLIENT)}


def test_gone_only_from_the_owner() -> None:
    router = make_router()
    router.on_public(signed_request(RING, T1), CLIENT, 0, 0.0)
    assert router.on_link(control(ControlType.GONE, CLIENT), T2, 1.0) == Control(
        ControlMessage(ControlType.GONE, (CLIENT,)), 0
    )
    assert CLIENT in router.routes.inbound
    assert router.on_link(control(ControlType.GONE, CLIENT), T1, 1.0) == Control(
        ControlMessage(ControlType.GONE, (CLIENT,)), 1
    )
    assert router.routes.inbound == {} and router.routes.outbound == {}


def test_outbound_media_learns_route() -> None:
    router = make_router()
    assert router.on_link(link_datagram(CLIENT, DTLS), T2, 0.0) == SendToClient(0, CLIENT, DTLS)
    assert router.routes.inbound[CLIENT].link == T2
    assert router.on_link(link_datagram(CLIENT, SRTP), T2, 0.0) == SendToClient(0, CLIENT, SRTP)
    assert router.on_public(SRTP, CLIENT, 0, 0.5) == Forward(T2, header_for(CLIENT) + SRTP)


def test_outbound_v6_uses_v6_socket() -> None:
    router = make_router()
    action = router.on_link(link_datagram(CLIENT6[:2], SRTP), T1, 0.0)
    assert action == SendToClient(1, CLIENT6, SRTP)


def test_outbound_stun_is_sent_but_not_learned() -> None:
    router = make_router()
    stun = signed_request(RING, T1)
    assert router.on_link(link_datagram(CLIENT, stun), T1, 0.0) == SendToClient(0, CLIENT, stun)
    assert router.routes.inbound == {}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed_link"),
        (b"\x01\x00\x00", "malformed_link"),
        (b"\x02" + header_for(CLIENT)[1:] + SRTP, "malformed_link"),
        (bytes(ControlMessage(ControlType.HELLO))[:20], "malformed_link"),
        (bytes(ControlMessage(ControlType.HELLO))[:20] + b"\x07", "malformed_link"),
        (bytes(ControlMessage(ControlType.ROUTES, (CLIENT,)))[:-1], "malformed_link"),
        (link_datagram(CLIENT, b""), "not_webrtc"),
        (link_datagram(CLIENT, b"\x50nope"), "not_webrtc"),
        (link_datagram(("198.51.100.7", 0), SRTP), "malformed_link"),
    ],
)
def test_link_drops(data: bytes, reason: str) -> None:
    assert make_router().on_link(data, T1, 0.0) == Drop(reason)


def test_link_only_from_configured_transceivers() -> None:
    router = make_router()
    router.on_public(signed_request(RING, T1), CLIENT, 0, 0.0)
    for source in [("127.0.0.1", 7002), ("127.0.0.2", 7000), CLIENT]:
        assert router.on_link(link_datagram(CLIENT, SRTP), source, 0.0) == Drop(
            "unknown_link_source"
        )


def test_v4_only_relay_drops_v6_destinations() -> None:
    router = Router(RING, [T1], [4], RouteTable(IDLE_S), StunRateLimit(20, 40))
    assert router.on_link(link_datagram(CLIENT6[:2], SRTP), T1, 0.0) == Drop("malformed_link")
    routes = router.on_link(control(ControlType.ROUTES, CLIENT6[:2]), T1, 0.0)
    assert isinstance(routes, Control) and routes.changed == 0


def test_hello_from_a_transceiver_changes_nothing() -> None:
    router = make_router()
    hello = bytes(ControlMessage(ControlType.HELLO))
    assert router.on_link(hello, T1, 0.0) == Control(ControlMessage(ControlType.HELLO), 0)
