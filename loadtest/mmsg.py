"""Batched UDP I/O for the load generator: ``sendmmsg``/``recvmmsg`` through ctypes, with every
message's buffers, addresses and control data in numpy arrays.

One system call moves a whole batch; the per-message work (sequence numbers, timestamps, parsing
echoes) is done on numpy views of the same memory, so Python never touches a datagram one at a
time on the hot path. Measured on a 2-core machine (LOADTEST.md): ~7-8 µs of client CPU per
packet sent and echoed, against 13-17 µs for a task per session, and no datagram lost in the
generator's own socket buffer.

A ``Messages`` block owns ``count`` slots. Slot ``i`` has a data row (``data[i]``), an optional
control row (``control[i]``: an ``IP_PKTINFO`` source address to send from, or room for a
``SO_TIMESTAMPNS`` receive stamp) and an optional address row (``names[i]``: ``sockaddr_in``).
``send(fd, slots, lengths)`` sends the given slots in one call (their headers are gathered into
a scratch array, so any subset goes out without copying data); ``receive(fd)`` fills the first
slots and returns how many arrived. Linux, IPv4.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

import numpy as np
import numpy.typing as npt

# struct mmsghdr and struct iovec as numpy records: the transceiver's link declares them
from transceiver.webrtc.mmsg import HEADER_DTYPE, IOVEC_DTYPE

IP_PKTINFO = 8  # <linux/in.h>; Python 3.11's socket module does not export it
SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>
SCM_TIMESTAMPNS = SO_TIMESTAMPNS
MSG_DONTWAIT = 0x40
PKTINFO_SPACE = 32  # CMSG_SPACE(sizeof(struct in_pktinfo)): 16-byte header + 12, aligned to 8
TIMESTAMP_SPACE = 32  # CMSG_SPACE(sizeof(struct timespec))
SOCKADDR_IN_BYTES = 16


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


def _address(array: npt.NDArray[np.generic]) -> int:
    return int(array.__array_interface__["data"][0])


def sockaddr_in(host: str, port: int) -> bytes:
    """A ``struct sockaddr_in`` for an IPv4 address."""
    return struct.pack("<H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host)


def pktinfo_cmsg(source_ip: int) -> bytes:
    """A control message that sends a datagram from ``source_ip`` (host order, e.g. 127.16.0.1).

    ``struct cmsghdr {size_t len; int level; int type}`` then ``struct in_pktinfo {int ifindex;
    in_addr spec_dst; in_addr addr}``; the kernel uses ``spec_dst`` as the source address."""
    header = struct.pack("<Qii", 16 + 12, socket.IPPROTO_IP, IP_PKTINFO)
    body = struct.pack("<i", 0) + struct.pack("!I", source_ip) + b"\0" * 4
    return (header + body).ljust(PKTINFO_SPACE, b"\0")


class Messages:
    """``count`` message slots over numpy buffers, sent and received with one call per batch."""

    def __init__(
        self, count: int, data_bytes: int, control_bytes: int = 0, names: bool = False
    ) -> None:
        self.count = count
        self.data_bytes = data_bytes
        self.control_bytes = control_bytes
        self.data = np.zeros((count, data_bytes), np.uint8)
        self.control = np.zeros((count, max(control_bytes, 8)), np.uint8)
        self.names = np.zeros((count, SOCKADDR_IN_BYTES), np.uint8)
        self.iov = np.zeros(count, IOVEC_DTYPE)
        self.headers = np.zeros(count, HEADER_DTYPE)
        self.iov["base"] = _address(self.data) + np.arange(count, dtype=np.uint64) * data_bytes
        self.iov["len"] = data_bytes
        self.headers["iov"] = _address(self.iov) + np.arange(count, dtype=np.uint64) * 16
        self.headers["iovlen"] = 1
        if control_bytes:
            self.headers["control"] = (
                _address(self.control) + np.arange(count, dtype=np.uint64) * self.control.shape[1]
            )
            self.headers["controllen"] = control_bytes
        self.with_names = names
        self.fixed_name: np.ndarray | None = None
        if names:
            self.headers["name"] = _address(self.names) + np.arange(count, dtype=np.uint64) * 16
            self.headers["namelen"] = SOCKADDR_IN_BYTES
        self._scratch = np.zeros(count, HEADER_DTYPE)
        self._scratch_address = _address(self._scratch)
        self._headers_address = _address(self.headers)

    def send_to(self, host: str, port: int) -> None:
        """Every slot sends to one destination (the relay): one shared ``sockaddr_in``."""
        self.fixed_name = np.frombuffer(sockaddr_in(host, port), np.uint8).copy()
        self.headers["name"] = _address(self.fixed_name)
        self.headers["namelen"] = SOCKADDR_IN_BYTES

    def send(
        self, fd: int, slots: npt.NDArray[np.intp], lengths: npt.NDArray[np.integer] | int
    ) -> int:
        """Send ``slots`` (``lengths`` bytes of each data row) in as few calls as the kernel
        allows; returns how many went out. A full socket buffer (EAGAIN) stops early."""
        total = len(slots)
        if total == 0:
            return 0
        self.iov["len"][slots] = lengths
        batch = self._scratch[:total]
        batch[:] = self.headers[slots]
        sent = 0
        base = self._scratch_address
        while sent < total:
            done = _sendmmsg(fd, base + sent * 64, total - sent, MSG_DONTWAIT)
            if done < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    continue
                if error in (errno.EAGAIN, errno.ENOBUFS):
                    break
                raise OSError(error, os.strerror(error))
            sent += done
        return sent

    def receive(self, fd: int, limit: int | None = None) -> int:
        """Read up to ``limit`` waiting datagrams into slots 0..n-1 without blocking; returns n.
        ``lengths(n)`` then gives their sizes (truncated to ``data_bytes``)."""
        limit = self.count if limit is None else min(limit, self.count)
        self.iov["len"][:limit] = self.data_bytes
        if self.control_bytes:
            self.headers["controllen"][:limit] = self.control_bytes
        if self.with_names:
            self.headers["namelen"][:limit] = SOCKADDR_IN_BYTES
        while True:
            done = _recvmmsg(fd, self._headers_address, limit, MSG_DONTWAIT, None)
            if done >= 0:
                return int(done)
            error = ctypes.get_errno()
            if error == errno.EINTR:
                continue
            if error in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise OSError(error, os.strerror(error))

    def lengths(self, n: int) -> npt.NDArray[np.uint32]:
        """Bytes each of the first ``n`` received datagrams really had (may exceed the row)."""
        return self.headers["len"][:n].copy()

    def timestamps_ns(self, n: int) -> npt.NDArray[np.int64]:
        """Kernel receive times (CLOCK_REALTIME ns) of the first ``n`` datagrams, from their
        ``SCM_TIMESTAMPNS`` control messages; 0 where none was delivered."""
        control = self.control[:n]
        stamped = (control[:, 12:16].view("<i4")[:, 0] == SCM_TIMESTAMPNS) & (
            self.headers["controllen"][:n] >= 32
        )
        seconds = control[:, 16:24].view("<i8")[:, 0]
        nanos = control[:, 24:32].view("<i8")[:, 0]
        return np.where(stamped, seconds * 1_000_000_000 + nanos, 0).astype(np.int64)

    def sources(self, n: int) -> list[tuple[str, int]]:
        """The senders of the first ``n`` received datagrams (needs ``names=True``)."""
        rows = self.names[:n]
        return [
            (socket.inet_ntoa(bytes(row[4:8])), int.from_bytes(bytes(row[2:4]), "big"))
            for row in rows
        ]


def enable_timestamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every received datagram (``SO_TIMESTAMPNS``)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
