"""The netfilter queue protocol (nfnetlink_queue) over netlink: the messages a userspace reader
sends and the ones it reads. Pure: bytes in, dataclasses out; no sockets.

A reader binds a queue number (``NFQNL_MSG_CONFIG`` with ``NFQA_CFG_CMD`` bind), sets how much
of each packet it wants (``NFQA_CFG_PARAMS``: copy mode and range), then reads one
``NFQNL_MSG_PACKET`` per packet the ruleset queued (``nft ... queue num N``) and answers each
with a ``NFQNL_MSG_VERDICT`` naming the packet's id. Until it answers, the kernel holds the
packet: that is how ``loadtest.delay_queue`` delays traffic where ``tc netem`` is missing.

Layout (include/uapi/linux/netlink.h, netfilter/nfnetlink.h, netfilter/nfnetlink_queue.h):
a ``nlmsghdr`` (length, type, flags, sequence, port id; host byte order), a ``nfgenmsg``
(family, version, queue number in network order), then attributes (``nlattr``: length and
type in host order, the value padded to 4 bytes; nfqueue's values are in network order).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, port id
NFGEN_HEADER = struct.Struct("!BBH")  # family, version, res_id (the queue number)
ATTRIBUTE_HEADER = struct.Struct("=HH")  # length, type
ALIGN_BYTES = 4
MAX_DATAGRAM_BYTES = 65_536 + 4_096  # a whole packet (at most 64 KiB) and its metadata
MAX_QUEUE = 65_535  # res_id is 16 bits
MAX_ATTRIBUTE_BYTES = 65_535  # nla_len is 16 bits, header included
MAX_ATTRIBUTE_VALUE_BYTES = MAX_ATTRIBUTE_BYTES - 4

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQNL_MSG_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NF_DROP, NF_ACCEPT = 0, 1

PACKET_HEADER = struct.Struct("!IHB")  # packet id, hardware protocol, hook
VERDICT_HEADER = struct.Struct("!II")  # verdict, packet id
CONFIG_COMMAND = struct.Struct("!BxH")  # command, pad, protocol family
CONFIG_PARAMS = struct.Struct("!IB")  # copy range, copy mode
ERROR_CODE = struct.Struct("=i")

# Netfilter hooks a packet can be queued from (include/uapi/linux/netfilter.h)
HOOK_LOCAL_IN = 1
HOOK_LOCAL_OUT = 3


class NetlinkFormatError(ValueError):
    """A netlink datagram that does not parse: truncated, or lengths that do not add up."""


@dataclass(frozen=True)
class QueuedPacket:
    """A packet the kernel holds until it is given a verdict."""

    queue: int
    packet_id: int
    hook: int
    payload: bytes  # the first copy-range bytes of the IP packet


@dataclass(frozen=True)
class Acknowledgement:
    """``NLMSG_ERROR``: the answer to a request sent with ``NLM_F_ACK`` (error 0: success)."""

    seq: int
    errno: int  # positive; 0 is an acknowledgement


@dataclass(frozen=True)
class Unrecognised:
    """Any other message: ``NLMSG_NOOP``, ``NLMSG_DONE``, ``NLMSG_OVERRUN``, another kind."""

    message_type: int


Message = QueuedPacket | Acknowledgement | Unrecognised


def _align(length: int) -> int:
    return (length + ALIGN_BYTES - 1) & ~(ALIGN_BYTES - 1)


def _attribute(kind: int, value: bytes) -> bytes:
    length = ATTRIBUTE_HEADER.size + len(value)
    if length > MAX_ATTRIBUTE_BYTES:
        raise ValueError(f"an attribute of {len(value)} bytes is over {MAX_ATTRIBUTE_VALUE_BYTES}")
    return ATTRIBUTE_HEADER.pack(length, kind) + value + b"\0" * (_align(length) - length)


def _message(kind: int, flags: int, seq: int, queue: int, attributes: bytes) -> bytes:
    if not 0 <= queue <= MAX_QUEUE:
        raise ValueError(f"queue number {queue} is not in 0..{MAX_QUEUE}")
    body = NFGEN_HEADER.pack(socket.AF_UNSPEC, 0, queue) + attributes
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, flags, seq, 0) + body


def bind_request(queue: int, seq: int) -> bytes:
    """Bind ``queue`` to this socket (acknowledged)."""
    command = CONFIG_COMMAND.pack(NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC)
    flags = NLM_F_REQUEST | NLM_F_ACK
    return _message(NFQNL_MSG_CONFIG, flags, seq, queue, _attribute(NFQA_CFG_CMD, command))


def copy_packet_request(queue: int, copy_range_bytes: int, seq: int) -> bytes:
    """Have ``queue`` copy the first ``copy_range_bytes`` of each packet (acknowledged)."""
    if not 0 < copy_range_bytes <= 0xFFFF:
        raise ValueError(f"copy range {copy_range_bytes} is not in 1..65535 bytes")
    params = CONFIG_PARAMS.pack(copy_range_bytes, NFQNL_COPY_PACKET)
    flags = NLM_F_REQUEST | NLM_F_ACK
    return _message(NFQNL_MSG_CONFIG, flags, seq, queue, _attribute(NFQA_CFG_PARAMS, params))


def verdict(queue: int, packet_id: int, accept: bool, seq: int) -> bytes:
    """Release (``accept``) or drop a held packet (not acknowledged: errors still come back)."""
    header = VERDICT_HEADER.pack(NF_ACCEPT if accept else NF_DROP, packet_id)
    attributes = _attribute(NFQA_VERDICT_HDR, header)
    return _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, seq, queue, attributes)


def parse_messages(datagram: bytes) -> list[Message]:
    """Every message in one netlink datagram, in order; NetlinkFormatError if any is malformed."""
    messages: list[Message] = []
    offset = 0
    while offset < len(datagram):
        length, kind, _, seq, _ = _message_header(datagram, offset)
        body = datagram[offset + NLMSG_HEADER.size : offset + length]
        messages.append(_parse_one(kind, seq, body))
        offset += _align(length)
    return messages


def _message_header(datagram: bytes, offset: int) -> tuple[int, int, int, int, int]:
    if len(datagram) - offset < NLMSG_HEADER.size:
        raise NetlinkFormatError(f"{len(datagram) - offset} bytes left, less than a header")
    fields: tuple[int, int, int, int, int] = NLMSG_HEADER.unpack_from(datagram, offset)
    length = fields[0]
    if length < NLMSG_HEADER.size or length > len(datagram) - offset:
        raise NetlinkFormatError(f"message length {length} with {len(datagram) - offset} left")
    return fields


def _parse_one(kind: int, seq: int, body: bytes) -> Message:
    if kind == NLMSG_ERROR:
        if len(body) < ERROR_CODE.size:
            raise NetlinkFormatError(f"error message of {len(body)} bytes has no error code")
        return Acknowledgement(seq, -ERROR_CODE.unpack_from(body)[0])
    if kind == NFQNL_MSG_PACKET:
        return _packet(body)
    return Unrecognised(kind)


def _packet(body: bytes) -> QueuedPacket:
    if len(body) < NFGEN_HEADER.size:
        raise NetlinkFormatError(f"packet message of {len(body)} bytes has no nfgenmsg")
    queue = NFGEN_HEADER.unpack_from(body)[2]
    attributes = parse_attributes(body[NFGEN_HEADER.size :])
    header = attributes.get(NFQA_PACKET_HDR)
    if header is None or len(header) < PACKET_HEADER.size:
        raise NetlinkFormatError("packet message without a whole NFQA_PACKET_HDR")
    packet_id, _, hook = PACKET_HEADER.unpack_from(header)
    return QueuedPacket(queue, packet_id, hook, attributes.get(NFQA_PAYLOAD, b""))


def parse_attributes(data: bytes) -> dict[int, bytes]:
    """``{type: value}`` of a run of attributes (the last one of a type wins)."""
    attributes: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < ATTRIBUTE_HEADER.size:
            raise NetlinkFormatError(f"{len(data) - offset} bytes left, less than an attribute")
        length, kind = ATTRIBUTE_HEADER.unpack_from(data, offset)
        if length < ATTRIBUTE_HEADER.size or length > len(data) - offset:
            raise NetlinkFormatError(f"attribute length {length} with {len(data) - offset} left")
        attributes[kind & NLA_TYPE_MASK] = data[offset + ATTRIBUTE_HEADER.size : offset + length]
        offset += _align(length)
    return attributes


def packet_message(queue: int, packet_id: int, hook: int, payload: bytes, seq: int = 0) -> bytes:
    """A ``NFQNL_MSG_PACKET`` as the kernel sends it (the tests' and the fuzzers' input)."""
    header = PACKET_HEADER.pack(packet_id, 0x0800, hook)
    attributes = _attribute(NFQA_PACKET_HDR, header) + _attribute(NFQA_PAYLOAD, payload)
    return _message(NFQNL_MSG_PACKET, 0, seq, queue, attributes)
