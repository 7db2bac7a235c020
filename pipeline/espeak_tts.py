"""EspeakTextToSpeech: the light offline voice, espeak-ng through ``espeakng-loader``'s library.

I/O layer. The shared library and its data ship in the ``espeakng-loader`` wheel; it is driven
through ctypes in synchronous mode: ``espeak_Synth`` calls back with each block of samples, and
the callback hands them to the event loop as they come (streamed). espeak-ng is one global
engine per process, so synthesis is serialised by a process-wide lock and runs on a thread;
the callback returns 1 (abort) once the consumer has gone away.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import EspeakConfig
from pipeline.providers import AudioChunk, ProviderError

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
POSITION_CHARACTER = 1
SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_LIBRARY_LOCK = threading.RLock()
_library: dict[str, Any] = {}


def _load_library() -> tuple[Any, int]:
    """Initialise espeak-ng once per process; returns the library and its sample rate."""
    with _LIBRARY_LOCK:
        if "lib" not in _library:
            _library.update(_initialise())
        return _library["lib"], int(_library["rate_hz"])


def _initialise() -> dict[str, Any]:
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    data = espeakng_loader.get_data_path().encode()
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    rate_hz = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 200, data, 0)
    if rate_hz <= 0:
        raise ProviderError("espeak", f"espeak_Initialize failed ({rate_hz})", retryable=False)
    lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    return {"lib": lib, "rate_hz": rate_hz}


class EspeakTextToSpeech:
    name = "espeak"

    def __init__(self, config: EspeakConfig | None = None) -> None:
        self.config = config or EspeakConfig()
        self.voices = (self.config.voice,)
        self._executor: ThreadPoolExecutor | None = None
        self.sample_rate_hz = 0

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        loop = asyncio.get_running_loop()
        _, self.sample_rate_hz = await loop.run_in_executor(self._executor, _load_library)

    async def aclose(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None

    async def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[AudioChunk]:
        """``speed`` multiplies the configured words per minute (within espeak's 80..450)."""
        if voice not in (None, *self.voices):
            raise ProviderError(self.name, f"no voice {voice!r}", retryable=False)
        if self._executor is None:
            raise ProviderError(self.name, "not started", retryable=False)
        loop = asyncio.get_running_loop()
        blocks: asyncio.Queue[bytes | None] = asyncio.Queue()
        abort = threading.Event()
        rate = min(450, max(80, round(self.config.words_per_minute * speed)))
        done = loop.run_in_executor(self._executor, self._speak, text, rate, loop, blocks, abort)
        try:
            while (block := await blocks.get()) is not None:
                yield AudioChunk(block, self.sample_rate_hz)
            await done
        finally:
            abort.set()

    def _speak(
        self,
        text: str,
        words_per_minute: int,
        loop: asyncio.AbstractEventLoop,
        blocks: asyncio.Queue[bytes | None],
        abort: threading.Event,
    ) -> None:
        def on_samples(samples: Any, count: int, _events: Any) -> int:
            if count > 0 and samples:
                block = ctypes.string_at(samples, count * 2)
                loop.call_soon_threadsafe(blocks.put_nowait, block)
            return 1 if abort.is_set() else 0

        callback = SYNTH_CALLBACK(on_samples)
        encoded = text.encode("utf-8") + b"\0"
        try:
            with _LIBRARY_LOCK:
                lib, _ = _load_library()
                lib.espeak_SetSynthCallback(callback)
                lib.espeak_SetVoiceByName(self.config.voice.encode())
                lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE
                status = lib.espeak_Synth(encoded, len(encoded), 0, POSITION_CHARACTER, 0,
                                          ESPEAK_CHARS_UTF8, None, None)  # fmt: skip
            if status != 0:
                raise ProviderError(self.name, f"espeak_Synth failed ({status})", retryable=False)
        finally:
            loop.call_soon_threadsafe(blocks.put_nowait, None)
