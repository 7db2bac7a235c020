"""The lean media path's packet code on untrusted bytes, at the link's real size limit.

``parse_rtp`` and ``parse_rtcp`` read what a caller sent (after SRTP, so a caller holding the
keys can send anything), up to the largest payload a relay forwards (``MAX_PAYLOAD_BYTES``):
no input makes them raise, and what they return stays inside the packet. ``Reorder`` releases
packets in order, each at most once, holding fewer than its window, whatever sequence numbers
arrive. The builders and parsers agree with each other.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated

from relay.wire.header import MAX_PAYLOAD_BYTES
from transceiver.webrtc.lean_media import (
    RTCP_RR,
    RTCP_SR,
    Reorder,
    ReportBlock,
    mid_extension,
    parse_rtcp,
    parse_rtp,
    receiver_report,
    rtp_header,
    sender_report,
    source_description,
    with_extension,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sized_bytes(draw: st.DrawFn) -> bytes:
    """Any first bytes, then zeros, up to the limit, with a few bytes overwritten anywhere."""
    size = draw(around(MAX_PAYLOAD_BYTES) | st.integers(0, 64))
    head = draw(st.binary(min_size=min(size, 16), max_size=min(size, 16)))
    return bytes(draw(mutated(head + bytes(size - len(head)))))


@st.composite
def rtp_like(draw: st.DrawFn) -> bytes:
    """Real-looking RTP (CSRCs, extension, padding flags) of any size up to the limit, then
    a few bytes overwritten."""
    size = draw(around(MAX_PAYLOAD_BYTES) | st.integers(12, 200))
    first = 0x80 | draw(st.integers(0, 0x3F))
    header = struct.pack("!BBHII", first, draw(st.integers(0, 255)), 1, 2, 3)
    packet = header + draw(st.binary(min_size=0, max_size=64))
    packet = (packet + bytes(max(0, size - len(packet))))[:size]
    return bytes(draw(mutated(packet)))


@FUZZ
@given(st.one_of(sized_bytes(), rtp_like(), st.binary(max_size=40)))
def test_parse_rtp_never_raises_and_stays_inside(data: bytes) -> None:
    view = parse_rtp(data)
    if view is not None:
        assert 12 <= view.start <= view.end <= len(data)
        assert 0 <= view.payload_type < 128 and view.marker in (0, 1)


@FUZZ
@given(st.one_of(sized_bytes(), st.binary(max_size=200)))
def test_parse_rtcp_never_raises(data: bytes) -> None:
    for report in parse_rtcp(data):
        assert report.kind in (RTCP_SR, RTCP_RR) and len(report.blocks) < 32


@FUZZ
@given(
    st.lists(
        st.one_of(st.integers(0, 0xFFFF), st.integers(-8, 8).map(lambda d: (1000 + d) & 0xFFFF)),
        max_size=400,
    ),
    st.integers(1, 4),
)
def test_reorder_releases_in_order_once_and_holds_less_than_its_window(
    sequences: list[int], window: int
) -> None:
    reorder: Reorder[int] = Reorder(window=window)
    released: list[int] = []
    for index, sequence in enumerate(sequences):
        for missing, item in reorder.push(sequence, index):
            assert missing >= 0
            released.append(item)
        assert len(reorder.held) < window
    released += [item for _, item in reorder.release_all()]
    assert len(released) == len(set(released)) <= len(sequences)


def test_reorder_fills_a_gap_from_a_late_packet_and_declares_a_lost_one() -> None:
    reorder: Reorder[str] = Reorder(window=2)
    assert reorder.push(65_534, "a") == [(0, "a")]
    assert reorder.push(0, "c") == []  # 65535 is late: held, sequence numbers wrap
    assert reorder.push(65_535, "b") == [(0, "b"), (0, "c")]
    assert reorder.push(2, "e") == []
    assert reorder.push(3, "f") == [(1, "e"), (0, "f")]  # 1 never came: declared lost
    assert reorder.push(1, "d") == [] and reorder.late == 1
    assert reorder.push(40_000, "x") == [(0, "x")] and reorder.resyncs == 1


def test_rtp_header_with_mid_extension_parses_back() -> None:
    header = with_extension(
        rtp_header(True, 111, 70_000, 2**32 + 5, 0xDEADBEEF), mid_extension(1, "0")
    )
    packet = header + b"opus"
    view = parse_rtp(packet)
    assert view is not None
    assert (view.marker, view.payload_type, view.sequence, view.timestamp, view.ssrc) == (
        1,
        111,
        70_000 & 0xFFFF,
        5,
        0xDEADBEEF,
    )
    assert packet[view.start : view.end] == b"opus" and len(header) == 12 + 8


def test_sender_and_receiver_reports_parse_back() -> None:
    block = ReportBlock(0x1234, 12, -3, 70_001, 40, 0xAABBCCDD, 65_536)
    sr = sender_report(0x99, (5 << 32) | (0xABCD << 16), 960, 10, 400, [block])
    rr = receiver_report(0x98, [])
    sdes = source_description(0x99, "cname-of-us")
    parsed = parse_rtcp(sr + sdes + rr)
    assert [(r.kind, r.ssrc) for r in parsed] == [(RTCP_SR, 0x99), (RTCP_RR, 0x98)]
    assert parsed[0].blocks == (block,) and parsed[0].ntp_middle == (5 << 16) | 0xABCD
    assert len(sdes) % 4 == 0 and len(sr) == 28 + 24
