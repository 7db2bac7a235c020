"""Property tests: random and mutated datagrams never raise and never forward unauthenticated."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stun_samples import binding_request, signed_request

from relay.counters import DROP_REASONS
from relay.header import ControlMessage, ControlType, header_for
from relay.routing import Control, Drop, Forward, Router, RouteTable, SendToClient, StunRateLimit
from relay.stun import StunError, classify, integrity_ok, read_binding_request
from relay.ufrag import Keyring, UfragError, decode_ufrag, derive_password, mint_ufrag

RING = Keyring.parse("2:" + "22" * 32 + ",1:" + "11" * 32)
T1, T2 = ("127.0.0.1", 7000), ("::1", 7001)
CLIENT = ("203.0.113.9", 5000)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = [signed_request(RING, T1), signed_request(RING, T2)]


def fresh_router() -> Router:
    # A huge rate so the limiter never hides what the parser decides.
    return Router(RING, [T1, T2], [4, 6], RouteTable(30.0), StunRateLimit(1e9, 1e9))


def authenticated(data: bytes) -> bool:
    """An independent check: does ``data`` carry a valid ufrag MAC and MESSAGE-INTEGRITY?"""
    try:
        request = read_binding_request(data)
        ufrag = request.server_ufrag
        decode_ufrag(RING, ufrag)
        password = derive_password(RING, ufrag.decode("ascii"))
    except (StunError, UfragError):
        return False
    return integrity_ok(data, request, password.encode("ascii"))


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


def check_public(data: bytes) -> None:
    router = fresh_router()
    action = router.on_public(data, CLIENT, 0, 0.0)
    if isinstance(action, Forward):
        assert authenticated(data), "forwarded an unauthenticated datagram"
        assert action.datagram == header_for(CLIENT) + data
        assert action.link in (T1, T2)
    else:
        assert isinstance(action, Drop) and action.reason in DROP_REASONS
        assert router.routes.inbound == {}


@FUZZ
@given(st.binary(max_size=300))
def test_random_public_datagrams(data: bytes) -> None:
    classify(data)
    check_public(data)


@FUZZ
@given(st.binary(max_size=200).map(lambda tail: b"\x00\x01" + tail))
def test_random_stun_looking_datagrams(data: bytes) -> None:
    check_public(data)


@FUZZ
@given(mutated_requests())
def test_mutated_valid_requests(data: bytes) -> None:
    check_public(data)


@FUZZ
@given(st.text(alphabet="ABCDEFGHIJabcdefghij0123456789+/", min_size=36, max_size=36))
def test_random_ufrags_with_matching_password_shape(ufrag: str) -> None:
    """Even a well-formed request whose MI uses a password of the right shape is refused."""
    check_public(binding_request(ufrag, "p" * 32))


def test_unmutated_requests_do_forward() -> None:
    """The properties above are not vacuous: the unmutated requests pass the same check."""
    for data in VALID:
        assert authenticated(data)
        assert isinstance(fresh_router().on_public(data, CLIENT, 0, 0.0), Forward)
    ufrag = mint_ufrag(RING, T1)
    assert not authenticated(binding_request(ufrag, derive_password(RING, ufrag)[:-1] + "!"))


@FUZZ
@given(st.binary(max_size=120), st.booleans())
def test_random_link_datagrams(data: bytes, with_header: bool) -> None:
    router = fresh_router()
    datagram = header_for(CLIENT) + data if with_header else data
    action = router.on_link(datagram, T1, 0.0)
    assert isinstance(action, SendToClient | Drop | Control)
    if isinstance(action, Drop):
        assert action.reason in DROP_REASONS
    assert router.on_link(datagram, ("127.0.0.1", 9), 0.0) == Drop("unknown_link_source")


clients = st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "::5"]), st.integers(1, 3))
operations = st.lists(
    st.tuples(
        st.sampled_from(["stun", "routes", "gone", "media", "expire"]), clients, st.booleans()
    ),
    max_size=40,
)


@FUZZ
@given(operations)
def test_route_table_stays_consistent(ops: list[tuple[str, tuple[str, int], bool]]) -> None:
    """Whatever happens, the outbound cache mirrors the inbound table exactly."""
    router, now = fresh_router(), 0.0
    for op, client, first in ops:
        now += 7.0
        link = T1 if first else T2
        key = (client[0], client[1], 0, 0) if ":" in client[0] else client
        if op == "stun":
            router.on_public(signed_request(RING, link), key, 1 if ":" in client[0] else 0, now)
        elif op in ("routes", "gone"):
            kind = ControlType.ROUTES if op == "routes" else ControlType.GONE
            router.on_link(bytes(ControlMessage(kind, (client,))), link, now)
        elif op == "media":
            router.on_link(header_for(client) + b"\x80" * 40, link, now)
        else:
            router.routes.expire(now)
        table = router.routes
        assert {r.header: k for k, r in table.inbound.items()} == {
            h: k for h, (_, k) in table.outbound.items()
        }
