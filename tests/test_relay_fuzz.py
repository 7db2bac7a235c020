"""Property tests: random and mutated datagrams never raise and never forward unauthenticated.

Sizes go up to and just past the datagram limits of the wire contract (``MAX_PAYLOAD_BYTES``
from a client, ``MAX_LINK_DATAGRAM_BYTES`` on the link): the parsers see what the sockets can
hand them, and the worker drops anything longer before a parser sees it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around
from stun_samples import binding_request, signed_request, signed_request_of_size

from relay.counters import DROP_REASONS
from relay.routing import Control, Drop, Forward, Router, RouteTable, SendToClient, StunRateLimit
from relay.wire.header import (
    ENTRY_BYTES,
    FLAG_CONTROL,
    HEADER_BYTES,
    MAX_LINK_DATAGRAM_BYTES,
    MAX_PAYLOAD_BYTES,
    ControlMessage,
    ControlType,
    HeaderError,
    encode_header,
    header_for,
    pack_address,
    parse_header,
)
from relay.wire.hello import HelloError, open_hello, seal_hello
from relay.wire.stun import (
    MAGIC_COOKIE,
    StunError,
    classify,
    integrity_ok,
    message_class,
    peek_server_ufrag,
    read_binding_request,
)
from relay.wire.ufrag import Keyring, UfragError, decode_ufrag, derive_password, mint_ufrag

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
def edited(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid datagram with 1-4 edits: a bit flipped, a byte set, cut short, bytes inserted
    (up to 8, so a datagram at a limit ends up just past it) or deleted."""
    data = bytearray(draw(valid))
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


def mutated_requests() -> st.SearchStrategy[bytes]:
    return edited(st.sampled_from(VALID))


@FUZZ
@given(st.binary(max_size=MAX_PAYLOAD_BYTES + 1))
def test_random_public_datagrams(data: bytes) -> None:
    classify(data)
    check_public(data)


@FUZZ
@given(st.binary(max_size=MAX_PAYLOAD_BYTES - 1).map(lambda tail: b"\x00\x01" + tail))
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
@given(st.binary(max_size=MAX_PAYLOAD_BYTES + 1), st.booleans())
def test_random_link_datagrams(data: bytes, with_header: bool) -> None:
    router = fresh_router()
    datagram = header_for(CLIENT) + data if with_header else data
    action = router.on_link(datagram, T1, 0.0)
    assert isinstance(action, SendToClient | Drop | Control)
    if isinstance(action, Drop):
        assert action.reason in DROP_REASONS
    assert router.on_link(datagram, ("127.0.0.1", 9), 0.0) == Drop("unknown_link_source")


# --- at the datagram size limits ------------------------------------------------------------

# Every size a well-formed STUN message (a multiple of 4) has near the limit, signed and valid.
BIG = {size: signed_request_of_size(RING, T1, size) for size in range(1984, 2116, 4)}
NOW_S = 1_700_000_000.0
HELLO_DATAGRAM = seal_hello(RING, T1, NOW_S)
CONTROL_HEADER = encode_header(b"\x00" * ENTRY_BYTES, FLAG_CONTROL)
# As many routes as fit in a link datagram (113): more than a transceiver sends in one (64).
MOST_ROUTES = (MAX_LINK_DATAGRAM_BYTES - HEADER_BYTES - 3) // ENTRY_BYTES
# The largest link datagram of each kind (a HELLO has only one size).
LINK_LARGEST = [
    header_for(CLIENT) + b"\x80" + b"m" * (MAX_PAYLOAD_BYTES - 1),
    header_for(CLIENT) + BIG[MAX_PAYLOAD_BYTES],
    bytes(ControlMessage(ControlType.ROUTES, tuple(("10.0.0.1", p) for p in range(1, 65)))),
    CONTROL_HEADER
    + bytes([ControlType.GONE])
    + MOST_ROUTES.to_bytes(2, "big")
    + b"".join(pack_address(("2001:db8::1", p)) for p in range(1, MOST_ROUTES + 1)),
    HELLO_DATAGRAM,
]


def exactly(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


def stun_shaped(size: int) -> st.SearchStrategy[bytes]:
    """A binding request header whose length field is right, random attributes after it."""
    head = b"\x00\x01" + (size - 20).to_bytes(2, "big") + MAGIC_COOKIE.to_bytes(4, "big")
    return exactly(size - len(head)).map(lambda rest: head + rest)


@pytest.mark.parametrize("size", [MAX_PAYLOAD_BYTES - 4, MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES + 4])
def test_signed_requests_at_the_size_limit_authenticate(size: int) -> None:
    """The properties below are not vacuous at these sizes: the unedited requests forward."""
    assert len(BIG[size]) == size and authenticated(BIG[size])
    assert isinstance(fresh_router().on_public(BIG[size], CLIENT, 0, 0.0), Forward)


@FUZZ
@given(edited(st.sampled_from(list(BIG.values()))))
def test_edited_requests_at_the_size_limit(data: bytes) -> None:
    check_public(data)


@FUZZ
@given(around(MAX_PAYLOAD_BYTES).flatmap(lambda n: exactly(n) | stun_shaped(n - n % 4)))
def test_random_datagrams_at_the_size_limit(data: bytes) -> None:
    classify(data)
    check_public(data)


def stun_looking(size: int) -> st.SearchStrategy[bytes]:
    """First byte and magic cookie of STUN, anything else random: the peek walks it."""
    cookie = MAGIC_COOKIE.to_bytes(4, "big")
    return exactly(size - 4).map(lambda rest: rest[:1] + b"\x01" + rest[1:3] + cookie + rest[3:])


@settings(max_examples=200, deadline=None)
@given(around(MAX_PAYLOAD_BYTES).flatmap(lambda n: stun_looking(n) | exactly(n)))
def test_the_stun_peek_takes_any_payload_up_to_the_size_limit(payload: bytes) -> None:
    """What demuxes a forwarded datagram on the transceiver's link never raises, at the largest
    sizes a relay forwards."""
    kind = message_class(payload)
    assert kind is None or kind in (0x0000, 0x0010, 0x0100, 0x0110)
    ufrag = peek_server_ufrag(payload)
    assert ufrag is None or len(ufrag) < len(payload)


def test_the_stun_peek_finds_the_ufrag_of_a_request_at_the_size_limit() -> None:
    request = signed_request_of_size(RING, ("127.0.0.1", 7000), MAX_PAYLOAD_BYTES)
    assert message_class(request) == 0x0000
    assert peek_server_ufrag(request) == request[24:60]  # USERNAME comes first


def check_link(datagram: bytes) -> None:
    """The link's parsers raise only their own errors; the router answers with an action."""
    try:
        header = parse_header(datagram)
        if header.is_control and datagram[HEADER_BYTES : HEADER_BYTES + 1] == b"\x01":
            open_hello(RING, datagram[HEADER_BYTES:], T1, NOW_S)
        elif header.is_control:
            ControlMessage.parse(datagram[HEADER_BYTES:])
    except (HeaderError, HelloError):
        pass
    action = fresh_router().on_link(datagram, T1, 0.0)
    assert isinstance(action, SendToClient | Drop | Control)
    if isinstance(action, Drop):
        assert action.reason in DROP_REASONS


def test_link_datagrams_at_the_size_limit_parse() -> None:
    assert len(LINK_LARGEST[0]) == MAX_LINK_DATAGRAM_BYTES
    assert len(ControlMessage.parse(LINK_LARGEST[3][HEADER_BYTES:]).routes) == MOST_ROUTES
    assert open_hello(RING, HELLO_DATAGRAM[HEADER_BYTES:], T1, NOW_S).to == T1
    for datagram in LINK_LARGEST:
        check_link(datagram)


@FUZZ
@given(edited(st.sampled_from(LINK_LARGEST)))
def test_edited_link_datagrams_at_the_size_limit(datagram: bytes) -> None:
    check_link(datagram)


@FUZZ
@given(
    around(MAX_LINK_DATAGRAM_BYTES).flatmap(exactly),
    st.sampled_from([b"", header_for(CLIENT), CONTROL_HEADER + b"\x01", CONTROL_HEADER + b"\x02"]),
)
def test_random_link_datagrams_at_the_size_limit(data: bytes, prefix: bytes) -> None:
    check_link(prefix + data[len(prefix) :])


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
