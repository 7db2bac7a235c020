"""The netfilter queue protocol (loadtest.nfqueue) and the delay line's schedule
(loadtest.jitter), pure: messages captured from this kernel parse; every request is the bytes
the kernel expects; malformed datagrams, at and around every length field's limit, raise
NetlinkFormatError and nothing else.

tests/data/nfqueue_*.bin were read from a netlink socket bound to a queue in a network
namespace: the acknowledgement of a bind, a queued UDP datagram (``voicerelay`` to the host's
port 3478, queued from the output hook) and a second socket's bind refused (EPERM).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sized_inputs import around, mutated

from loadtest import nfqueue
from loadtest.delay_queue import DelayQueueConfig
from loadtest.impairment import Impairment, queue_rules, ruleset
from loadtest.jitter import JitterPolicy, JitterSchedule

DATA = Path(__file__).parent / "data"
CAPTURED_PACKET = (DATA / "nfqueue_packet.bin").read_bytes()
MAX_VALUE = nfqueue.MAX_ATTRIBUTE_VALUE_BYTES


def test_a_captured_packet_parses_to_its_queue_id_hook_and_payload() -> None:
    (packet,) = nfqueue.parse_messages(CAPTURED_PACKET)
    assert isinstance(packet, nfqueue.QueuedPacket)
    assert (packet.queue, packet.packet_id, packet.hook) == (7, 1, nfqueue.HOOK_LOCAL_OUT)
    assert packet.payload[0] >> 4 == 4 and packet.payload[9] == 17  # IPv4, UDP
    assert packet.payload.endswith(b"voicerelay") and len(packet.payload) == 38


def test_captured_acknowledgements_and_a_refusal() -> None:
    ack = nfqueue.parse_messages((DATA / "nfqueue_ack.bin").read_bytes())
    refused = nfqueue.parse_messages((DATA / "nfqueue_refused.bin").read_bytes())
    assert ack == [nfqueue.Acknowledgement(seq=1, errno=0)]
    assert refused == [nfqueue.Acknowledgement(seq=9, errno=1)]  # EPERM: bound elsewhere


def test_requests_are_the_bytes_the_kernel_takes() -> None:
    header = struct.pack("=IHHII", 28, 0x0302, 0x5, 1, 0) + bytes([0, 0, 0, 7])
    assert nfqueue.bind_request(7, seq=1) == header + struct.pack("=HH", 8, 1) + b"\x01\x00\x00\x00"
    params = nfqueue.copy_packet_request(7, 64, seq=2)
    assert params[16:] == bytes([0, 0, 0, 7]) + struct.pack("=HH", 9, 2) + b"\0\0\0\x40\x02\0\0\0"
    verdict = nfqueue.verdict(7, 0x01020304, accept=True, seq=3)
    assert verdict[4:6] == b"\x01\x03" and verdict[6:8] == b"\x01\x00"  # VERDICT, REQUEST only
    assert verdict[20:] == struct.pack("=HH", 12, 2) + b"\0\0\0\x01\x01\x02\x03\x04"
    assert nfqueue.verdict(7, 1, accept=False, seq=4)[24:28] == b"\0\0\0\0"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nfqueue.bind_request(65_536, 1), "queue number 65536 is not in 0..65535"),
        (lambda: nfqueue.verdict(-1, 1, True, 1), "queue number -1 is not in 0..65535"),
        (lambda: nfqueue.copy_packet_request(0, 0, 1), "copy range 0 is not in 1..65535 bytes"),
        (lambda: nfqueue.copy_packet_request(0, 65_536, 1), "copy range 65536 is not in"),
        (lambda: nfqueue.packet_message(0, 1, 3, bytes(MAX_VALUE + 1)), "65532 bytes is over"),
    ],
)
def test_requests_out_of_range_are_refused_by_name(call: Callable[[], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=60, deadline=None)
@given(size=around(MAX_VALUE, spread=8).filter(lambda n: n <= MAX_VALUE) | st.integers(0, 70))
def test_payloads_up_to_the_attribute_limit_round_trip(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    datagram = nfqueue.packet_message(3, 42, nfqueue.HOOK_LOCAL_IN, payload)
    assert nfqueue.parse_messages(datagram) == [
        nfqueue.QueuedPacket(3, 42, nfqueue.HOOK_LOCAL_IN, payload)
    ]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6))
def test_messages_one_after_another_in_one_datagram_all_parse(sizes: list[int]) -> None:
    messages = [nfqueue.packet_message(1, i, 3, b"x" * n) for i, n in enumerate(sizes)]
    parsed = nfqueue.parse_messages(b"".join(messages))
    assert [p.packet_id for p in parsed if isinstance(p, nfqueue.QueuedPacket)] == list(
        range(len(sizes))
    )


def test_every_cut_inside_a_message_is_a_format_error() -> None:
    for cut in range(1, len(CAPTURED_PACKET)):
        with pytest.raises(nfqueue.NetlinkFormatError):
            nfqueue.parse_messages(CAPTURED_PACKET[:cut])


@pytest.mark.parametrize(
    ("length", "message"),
    [(15, "message length 15 with 82 left"), (83, "message length 83 with 82 left"),
     (0, "message length 0 with 82 left")],
)  # fmt: skip
def test_a_message_length_that_does_not_fit_is_named(length: int, message: str) -> None:
    datagram = struct.pack("=I", length) + CAPTURED_PACKET[4:]
    with pytest.raises(nfqueue.NetlinkFormatError, match=message):
        nfqueue.parse_messages(datagram)


def test_attributes_whose_lengths_do_not_fit_are_named() -> None:
    good = struct.pack("=HH", 8, 1) + b"abcd"
    assert nfqueue.parse_attributes(good) == {1: b"abcd"}
    for bad, message in [
        (struct.pack("=HH", 3, 1), "attribute length 3 with 4 left"),
        (struct.pack("=HH", 9, 1) + b"abcd", "attribute length 9 with 8 left"),
        (good + b"\0\0", "2 bytes left, less than an attribute"),
    ]:
        with pytest.raises(nfqueue.NetlinkFormatError, match=message):
            nfqueue.parse_attributes(bad)


def test_a_packet_without_its_header_attribute_or_error_code_is_refused() -> None:
    bare = nfqueue.packet_message(1, 1, 3, b"")
    no_header = bare[:20] + bare[32:]  # the NFQA_PACKET_HDR attribute (12 bytes) taken out
    no_header = struct.pack("=I", len(no_header)) + no_header[4:]
    with pytest.raises(nfqueue.NetlinkFormatError, match="without a whole NFQA_PACKET_HDR"):
        nfqueue.parse_messages(no_header)
    short_error = struct.pack("=IHHII", 18, nfqueue.NLMSG_ERROR, 0, 1, 0) + b"\0\0"
    with pytest.raises(nfqueue.NetlinkFormatError, match="has no error code"):
        nfqueue.parse_messages(short_error)


def test_other_messages_are_passed_on_as_unrecognised() -> None:
    done = struct.pack("=IHHII", 20, nfqueue.NLMSG_DONE, 0, 1, 0) + b"\0\0\0\0"
    assert nfqueue.parse_messages(done) == [nfqueue.Unrecognised(nfqueue.NLMSG_DONE)]


@settings(max_examples=300, deadline=None)
@given(datagram=mutated(CAPTURED_PACKET) | st.binary(max_size=200))
def test_any_bytes_parse_or_raise_a_format_error_and_nothing_else(datagram: bytes) -> None:
    try:
        messages = nfqueue.parse_messages(datagram)
    except nfqueue.NetlinkFormatError:
        return
    assert all(isinstance(m, nfqueue.Message) for m in messages)


def test_jitter_is_drawn_within_its_bounds_and_never_reorders_a_direction() -> None:
    schedule = JitterSchedule(JitterPolicy(delay_ms=40, jitter_ms=8, seed=1))
    arrivals = [i * 0.02 for i in range(500)]
    releases = [schedule.release_at_s(3, t) for t in arrivals]
    delays_ms = [(r - t) * 1000 for r, t in zip(releases, arrivals, strict=True)]
    assert releases == sorted(releases)
    assert min(delays_ms) >= 32 - 1e-9 and max(delays_ms) <= 48 + 16  # held behind the one before
    assert min(delays_ms) < 34 and max(delays_ms) > 46  # the whole range is drawn
    other = JitterSchedule(JitterPolicy(40, 8, seed=1))
    assert [other.release_at_s(3, t) for t in arrivals] == releases  # seeded: repeatable


def test_settings_out_of_range_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"jitter 9 ms must be in 0..delay \(8 ms\)"):
        JitterPolicy(delay_ms=8, jitter_ms=9)
    with pytest.raises(ValueError, match="loss 100 % is not in 0..99"):
        Impairment("all", loss_percent=100)
    with pytest.raises(SystemExit):
        DelayQueueConfig.from_args(["--netns", "n", "--queue", "70000"], {})
    config = DelayQueueConfig.from_args(["--netns", "n"], {"IMPAIR_DELAY_MS": "20"})
    assert config.jitter == JitterPolicy(delay_ms=20, jitter_ms=8, seed=0)


def test_rules_impair_only_udp_to_and_from_the_host() -> None:
    loss = ruleset(Impairment("loss", loss_percent=5), "10.203.0.1", "vri1c")
    assert 'type filter hook egress device "vri1c"' in loss
    assert "meta l4proto udp ip saddr 10.203.0.1 numgen random mod 100 < 5 counter drop" in loss
    assert "numgen" not in ruleset(Impairment("outage", outage_ms=300), "10.203.0.1", "vri1c")
    delay = queue_rules(Impairment("delay", delay_ms=40, jitter_ms=8), "10.203.0.1")
    assert "-A INPUT -p udp -s 10.203.0.1 -j NFQUEUE --queue-num 7" in delay
    assert "NFQUEUE" not in queue_rules(Impairment("loss", loss_percent=5), "10.203.0.1")
