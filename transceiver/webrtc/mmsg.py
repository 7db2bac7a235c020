"""Batched datagram I/O for the link socket: ``sendmmsg``/``recvmmsg`` through ctypes, with the
plain ``sendto``/``recvfrom`` of the socket module where libc has neither.

I/O layer. One system call moves a batch: the link sends every datagram one event-loop pass
queued (the lean media tick's packets for all calls) with one ``sendmmsg``, and drains what the
relays forwarded with ``recvmmsg`` in batches, instead of a loop pass and a system call per
datagram. The message headers, their iovecs and the addresses live in numpy arrays set up
once; per batch, Python copies each datagram into or out of its slot and sets the lengths and
addresses with one array assignment each.

Both kinds (:class:`BatchedDatagrams`, :class:`PlainDatagrams`) do the same thing:

- ``send(datagrams)`` sends from the front of a list of ``(bytes, address)`` without blocking
  and says how many went out, whether the socket's buffer was full (EAGAIN: the rest waits for
  the caller) and which datagrams the kernel refused (an ``OSError`` each: skipped, counted by
  the caller);
- ``receive()`` reads what is waiting, up to one batch, without blocking: the datagrams with
  their senders, and how many were larger than ``slot_bytes`` (cut by the kernel: dropped here,
  never handed on truncated).

Linux's ``struct mmsghdr`` layout on 64-bit platforms; IPv4 and IPv6 sockets.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

Address = tuple[str, int]
Datagram = tuple[bytes, Address]

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
MAX_NAMES_CACHED = 4096  # sender addresses decoded and kept (the link hears a few relays)
_SOCKADDR_BYTES = {socket.AF_INET: 16, socket.AF_INET6: 28}
_BLOCKED = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)

# struct mmsghdr: struct msghdr (56 bytes) then unsigned msg_len, padded to 64.
HEADER_DTYPE = np.dtype(
    {
        "names": ["name", "namelen", "iov", "iovlen", "control", "controllen", "flags", "len"],
        "formats": ["<u8", "<u4", "<u8", "<u8", "<u8", "<u8", "<i4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56],
        "itemsize": 64,
    }
)
IOVEC_DTYPE = np.dtype({"names": ["base", "len"], "formats": ["<u8", "<u8"], "itemsize": 16})


class SendOutcome(NamedTuple):
    sent: int  # datagrams from the front of the list handled (sent, or refused below)
    blocked: bool  # the socket's buffer is full: the rest waits until it is writable
    refused: list[OSError]  # datagrams the kernel refused (skipped)


class Received(NamedTuple):
    datagrams: list[Datagram]
    oversized: int  # larger than a slot: cut by the kernel and dropped here


class Datagrams(Protocol):
    def send(self, datagrams: Sequence[Datagram]) -> SendOutcome: ...
    def receive(self) -> Received: ...


def _libc() -> ctypes.CDLL:
    """glibc by its soname; else whatever ``find_library`` finds (it runs ldconfig: slower)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _libc_functions() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        libc = _libc()
        send, receive = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError):
        return None
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    receive.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    receive.restype = ctypes.c_int
    return send, receive


_LIBC = _libc_functions()


def batched_available() -> bool:
    """Whether this platform has ``sendmmsg`` and ``recvmmsg`` (Linux, 64-bit)."""
    return _LIBC is not None


def datagrams_for(sock: socket.socket, batch: int, slot_bytes: int) -> Datagrams:
    """Batched I/O on ``sock`` when the platform has it and ``batch`` > 1, else plain."""
    if batch > 1 and batched_available():
        return BatchedDatagrams(sock, batch, slot_bytes)
    return PlainDatagrams(sock, slot_bytes)


def sockaddr(family: int, address: Address) -> bytes:
    """``struct sockaddr_in`` or ``sockaddr_in6`` (flow info and scope 0) of ``address``."""
    host, port = address
    if family == socket.AF_INET:
        packed = socket.inet_pton(socket.AF_INET, host)
        return struct.pack("=H", family) + struct.pack("!H", port) + packed + bytes(8)
    if ":" not in host:  # an IPv4 peer of a dual-stack socket
        host = "::ffff:" + host
    packed = socket.inet_pton(socket.AF_INET6, host)
    return struct.pack("=H", family) + struct.pack("!HI", port, 0) + packed + bytes(4)


def address_of(raw: bytes) -> Address:
    """The ``(host, port)`` of a ``sockaddr_in``/``sockaddr_in6`` as the kernel wrote it."""
    (family,) = struct.unpack_from("=H", raw)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def _pointer(array: npt.NDArray[Any]) -> int:
    return int(array.ctypes.data)


class BatchedDatagrams:
    """``sendmmsg``/``recvmmsg`` on a non-blocking socket, ``batch`` datagrams per call."""

    def __init__(self, sock: socket.socket, batch: int, slot_bytes: int) -> None:
        assert _LIBC is not None, "BatchedDatagrams needs sendmmsg/recvmmsg (datagrams_for)"
        self._sendmmsg, self._recvmmsg = _LIBC
        self._fd = sock.fileno()
        self._plain = PlainDatagrams(sock, slot_bytes, batch)
        self._family = sock.family
        self.batch = batch
        self.slot_bytes = slot_bytes
        self._name_bytes = _SOCKADDR_BYTES[sock.family]
        self._out = _Slots(batch, slot_bytes, self._name_bytes)
        self._in = _Slots(batch, slot_bytes, self._name_bytes)
        self._in.headers["name"] = _pointer(self._in.names) + self._in.offsets(self._name_bytes)
        self._senders: dict[bytes, Address] = {}
        self._used = 0  # slots the last receive filled
        self._names: dict[Address, int] = {}  # destination -> its sockaddr's address
        self._kept: list[npt.NDArray[np.uint8]] = []  # those sockaddrs, alive while we are

    def send(self, datagrams: Sequence[Datagram]) -> SendOutcome:
        if len(datagrams) == 1:  # one alone: the plain call costs less than a batch's set-up
            return self._plain.send(datagrams)
        count = min(len(datagrams), self.batch)
        out, size, known = self._out, self.slot_bytes, self._names
        view, iov, headers = out.view, out.iov_words, out.header_words
        for i in range(count):
            data, address = datagrams[i]
            length = min(len(data), size)  # the link never queues a larger one
            view[i * size : i * size + length] = data[:length]
            iov[2 * i + 1] = length
            headers[8 * i] = known.get(address) or self._name_for(address)
        return self._send_slots(count)

    def _send_slots(self, count: int) -> SendOutcome:
        done, base = 0, self._out.headers_address
        refused: list[OSError] = []
        while done < count:  # each pass sends at least one datagram or ends the loop
            sent = self._sendmmsg(self._fd, base + 64 * done, count - done, MSG_DONTWAIT)
            if sent >= 0:
                done += sent
                continue
            error = ctypes.get_errno()
            if error == errno.EINTR:
                continue
            if error in _BLOCKED:
                return SendOutcome(done, True, refused)
            refused.append(OSError(error, os.strerror(error)))
            done += 1  # the kernel refused the first one of the rest: skip it
        return SendOutcome(done, False, refused)

    def _name_for(self, address: Address) -> int:
        raw = np.frombuffer(sockaddr(self._family, address), np.uint8).copy()
        if len(self._names) >= MAX_NAMES_CACHED:
            self._names.clear()
            self._kept.clear()
        self._kept.append(raw)
        self._names[address] = pointer = _pointer(raw)
        return pointer

    def receive(self) -> Received:
        slots = self._in
        words, name_bytes = slots.header_words_32, self._name_bytes
        for i in range(self._used):  # the kernel wrote the names' lengths of the last batch
            words[16 * i + 2] = name_bytes
        headers = slots.headers_address
        while True:
            count = self._recvmmsg(self._fd, headers, self.batch, MSG_DONTWAIT, None)
            if count >= 0:
                break
            error = ctypes.get_errno()
            if error == errno.EINTR:
                continue
            if error in _BLOCKED:
                return Received([], 0)
            raise OSError(error, os.strerror(error))
        return self._unpack(count)

    def _unpack(self, count: int) -> Received:
        slots, size, name_size = self._in, self.slot_bytes, self._name_bytes
        self._used = count
        words, view, names, senders = (
            slots.header_words_32,
            slots.view,
            slots.names_view,
            self._senders,
        )
        datagrams, oversized = [], 0
        for i in range(count):
            if words[16 * i + 12] & MSG_TRUNC:  # msg_flags
                oversized += 1
                continue
            raw = bytes(names[i * name_size : (i + 1) * name_size])
            sender = senders.get(raw)
            if sender is None:
                sender = self._sender(raw)
            length = words[16 * i + 14]  # msg_len
            datagrams.append((bytes(view[i * size : i * size + length]), sender))
        return Received(datagrams, oversized)

    def _sender(self, raw: bytes) -> Address:
        if len(self._senders) >= MAX_NAMES_CACHED:
            self._senders.clear()
        self._senders[raw] = sender = address_of(raw)
        return sender


class _Slots:
    """``count`` message headers, each with one iovec over its ``slot_bytes`` data row and
    room for one socket address."""

    def __init__(self, count: int, slot_bytes: int, name_bytes: int) -> None:
        self.data = np.zeros(count * slot_bytes, np.uint8)
        self.names = np.zeros(count * name_bytes, np.uint8)
        self.iov = np.zeros(count, IOVEC_DTYPE)
        self.headers = np.zeros(count, HEADER_DTYPE)
        self.iov["base"] = _pointer(self.data) + self.offsets(slot_bytes)
        self.iov["len"] = slot_bytes
        self.headers["iov"] = _pointer(self.iov) + self.offsets(IOVEC_DTYPE.itemsize)
        self.headers_address = _pointer(self.headers)  # once: numpy's .ctypes costs ~µs a call
        self.headers["iovlen"] = 1
        self.headers["namelen"] = name_bytes
        self.view = memoryview(self.data)  # type: ignore[arg-type]
        self.names_view = memoryview(self.names)  # type: ignore[arg-type]
        # The same memory as Python ints, one index each (numpy's per-item access costs more):
        # a header is 16 32-bit words (namelen 2, flags 12, len 14) or 8 64-bit (name 0); an
        # iovec 2 64-bit (len 1).
        self.header_words_32 = memoryview(self.headers.view(np.uint32))  # type: ignore[arg-type]
        self.header_words = memoryview(self.headers.view(np.uint64))  # type: ignore[arg-type]
        self.iov_words = memoryview(self.iov.view(np.uint64))  # type: ignore[arg-type]

    def offsets(self, stride: int) -> npt.NDArray[np.uint64]:
        return np.arange(len(self.headers), dtype=np.uint64) * np.uint64(stride)


class PlainDatagrams:
    """The socket module's ``sendto``/``recvfrom``, one datagram per call, for platforms
    without the batched calls."""

    def __init__(self, sock: socket.socket, slot_bytes: int, batch: int = 64) -> None:
        self._sock = sock
        self.slot_bytes = slot_bytes
        self.batch = batch

    def send(self, datagrams: Sequence[Datagram]) -> SendOutcome:
        refused: list[OSError] = []
        for done, (data, address) in enumerate(datagrams[: self.batch]):
            try:
                self._sock.sendto(data, address)
            except BlockingIOError:
                return SendOutcome(done, True, refused)
            except OSError as error:
                if error.errno in _BLOCKED:
                    return SendOutcome(done, True, refused)
                refused.append(error)
        return SendOutcome(min(len(datagrams), self.batch), False, refused)

    def receive(self) -> Received:
        datagrams, oversized = [], 0
        for _ in range(self.batch):
            try:
                data, sender = self._sock.recvfrom(self.slot_bytes + 1)
            except BlockingIOError:
                break
            if len(data) > self.slot_bytes:
                oversized += 1
            else:
                datagrams.append((data, (sender[0], sender[1])))
        return Received(datagrams, oversized)
