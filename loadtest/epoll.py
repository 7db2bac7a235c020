"""epoll through ctypes, for the socket-per-session mode of the packet engine.

The engine runs on a plain OS thread inside a Locust worker, where gevent has replaced the
``select`` module's blocking calls; the kernel interface is used directly instead. Level
triggered, ``EPOLLIN`` only: ``wait`` returns the file descriptors with datagrams waiting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

import numpy as np

EPOLLIN = 0x001
EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
# struct epoll_event is packed on x86-64: uint32 events, uint64 data.
EVENT_DTYPE = np.dtype({"names": ["events", "data"], "formats": ["<u4", "<u8"], "itemsize": 12})

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.epoll_create1.argtypes = [ctypes.c_int]
_libc.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.epoll_wait.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]


def _check(result: int) -> int:
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


class Epoll:
    """An epoll set of file descriptors; ``wait()`` returns the readable ones without blocking."""

    def __init__(self, max_events: int = 1024) -> None:
        self.fd = _check(_libc.epoll_create1(0o2000000))  # EPOLL_CLOEXEC
        self.events = np.zeros(max_events, EVENT_DTYPE)
        self._one = np.zeros(1, EVENT_DTYPE)

    def add(self, fd: int) -> None:
        self._one["events"] = EPOLLIN
        self._one["data"] = fd
        _check(_libc.epoll_ctl(self.fd, EPOLL_CTL_ADD, fd, self._one.ctypes.data))

    def remove(self, fd: int) -> None:
        result = _libc.epoll_ctl(self.fd, EPOLL_CTL_DEL, fd, self._one.ctypes.data)
        if result < 0 and ctypes.get_errno() not in (errno.ENOENT, errno.EBADF):
            _check(result)

    def wait(self) -> list[int]:
        while True:
            count = _libc.epoll_wait(self.fd, self.events.ctypes.data, len(self.events), 0)
            if count >= 0:
                return [int(fd) for fd in self.events["data"][:count]]
            if ctypes.get_errno() != errno.EINTR:
                _check(count)

    def close(self) -> None:
        os.close(self.fd)
