"""Native thread names for the pipeline's threads, so /proc tells where a call's CPU goes.

I/O layer (ctypes into libc). CPython 3.11 names a thread only for Python
(``thread_name_prefix``): the kernel sees every thread as ``python``, and so does anything that
reads ``/proc/PID/task/*/comm`` (``loadtest.media_cost``'s per-thread CPU). ``name_thread``
sets the kernel's name of the calling thread (``prctl(PR_SET_NAME)``, at most 15 bytes); the
threads a native library starts from it later (onnxruntime's intra-op pool) inherit it, so a
model loaded on a named thread has its helpers counted under the same name.

``named_executor`` is a ``ThreadPoolExecutor`` whose threads take their name as they start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)
PR_SET_NAME = 15  # linux/prctl.h
MAX_NAME_BYTES = 15  # the kernel's TASK_COMM_LEN (16) less the terminating NUL


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def name_thread(name: str) -> None:
    """The calling thread's kernel name becomes ``name`` (cut to 15 bytes); a kernel without
    ``prctl`` (not Linux) keeps its names, logged once per call."""
    encoded = name.encode()[:MAX_NAME_BYTES]
    try:
        failed = _libc().prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) != 0
    except (AttributeError, OSError):
        failed = True
    if failed:
        log.warning("cannot name native thread %r: %s", name, ctypes.get_errno())


def named_executor(workers: int, name: str) -> ThreadPoolExecutor:
    """``workers`` threads, each named ``name`` for Python and for the kernel."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=name_thread, initargs=(name,)
    )
