"""One onnxruntime thread per Moonshine decode: the session options moonshine-voice 0.0.4 lacks.

I/O layer (ctypes into the wheel's own onnxruntime). The library creates its encoder and decoder
sessions with onnxruntime's default options: an intra-op pool sized by the cores, whose threads
busy-wait between the operators of a run. The decoder runs one small step per token, so on
this 2-core machine a 3 s utterance cost 0.35-1.1 CPU-s instead of ~0.2, most of it a pool
thread spinning while the calling thread worked (per-thread ``/proc``, ``moonshine`` threads);
the library has no option to change it, and a server wants its parallelism from calls, not
from threads inside one decode.

``limit_session_threads`` therefore wraps the one entry of the library's onnxruntime C API
table that creates a session from memory (``OrtApi::CreateSessionFromArray``, which
``moonshine_load_transcriber_from_memory`` uses): the wrapper sets the options it is given to
one intra-op and one inter-op thread (``SetIntraOpNumThreads``, ``SetInterOpNumThreads``),
then creates the session as before. The table is the library's own (a separate copy of
onnxruntime, ``moonshine_voice.libs``; the ``onnxruntime`` package used by piper and smart-turn
is not touched). The entries' positions are those of onnxruntime's ``onnxruntime_c_api.h``,
which only appends; the version is checked (``ORT_VERSION``) and anything else is left alone,
logged. ``tests/test_moonshine_stt.py`` holds the effect: no onnxruntime thread after a load.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ORT_VERSION = b"1.23.2"  # moonshine-voice 0.0.4's bundled onnxruntime
ORT_API_VERSION = 23
# positions in struct OrtApi (onnxruntime_c_api.h)
CREATE_SESSION_FROM_ARRAY, SET_INTRA_OP_NUM_THREADS, SET_INTER_OP_NUM_THREADS = 8, 24, 25
SESSION_THREADS = 1

_Status = ctypes.c_void_p  # OrtStatus*: NULL on success
_FromArray = ctypes.CFUNCTYPE(
    _Status, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p
)
_SetThreads = ctypes.CFUNCTYPE(_Status, ctypes.c_void_p, ctypes.c_int)


class _ApiBase(ctypes.Structure):
    _fields_ = [
        ("GetApi", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)),
        ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p)),
    ]


_LOCK = threading.Lock()
_installed: list[Any] = []  # the wrapper, kept alive as long as the process (the table uses it)


def onnxruntime_library(package_folder: Path) -> Path | None:
    """The onnxruntime shared library the moonshine-voice wheel ships, or None."""
    found = sorted((package_folder.parent / "moonshine_voice.libs").glob("libonnxruntime-*.so*"))
    return found[0] if found else None


def limit_session_threads(library: Path) -> bool:
    """Sessions that ``library`` (onnxruntime) creates from memory from now on run on their
    caller's thread alone. True once done (in this process: once), False when the library is
    not the version whose table this knows."""
    with _LOCK:
        if _installed:
            return True
        lib = ctypes.CDLL(str(library))
        lib.OrtGetApiBase.restype = ctypes.POINTER(_ApiBase)
        base = lib.OrtGetApiBase().contents
        version = base.GetVersionString()
        if version != ORT_VERSION:
            log.warning("moonshine's onnxruntime is %r, not %r: its threads left as they are",
                        version, ORT_VERSION)  # fmt: skip
            return False
        table = (ctypes.c_void_p * (SET_INTER_OP_NUM_THREADS + 1)).from_address(
            base.GetApi(ORT_API_VERSION)
        )
        _installed.append(_wrapper(table))
        _write_entry(table, CREATE_SESSION_FROM_ARRAY, ctypes.cast(_installed[0], ctypes.c_void_p))
        return True


def _wrapper(table: Any) -> Any:
    create = _FromArray(table[CREATE_SESSION_FROM_ARRAY])
    set_intra = _SetThreads(table[SET_INTRA_OP_NUM_THREADS])
    set_inter = _SetThreads(table[SET_INTER_OP_NUM_THREADS])

    def create_with_one_thread(env: int, data: int, size: int, options: int, out: int) -> int:
        for setter in (set_intra, set_inter):
            if setter(options, SESSION_THREADS):  # a status: the options refused it
                log.error("moonshine session options refused %d thread(s)", SESSION_THREADS)
        return create(env, data, size, options, out) or 0

    return _FromArray(create_with_one_thread)


def _write_entry(table: Any, index: int, value: ctypes.c_void_p) -> None:
    """Writes a table entry in a page the loader made read-only after relocation (RELRO)."""
    address = ctypes.addressof(table) + index * ctypes.sizeof(ctypes.c_void_p)
    page = address - address % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE):
        raise OSError(ctypes.get_errno(), "mprotect of onnxruntime's API table failed")
    ctypes.c_void_p.from_address(address).value = value.value
    libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)
