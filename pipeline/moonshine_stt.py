"""MoonshineSpeechToText: Moonshine tiny-en (MIT, Moonshine AI) speech recognition, offline.

I/O layer: ctypes into the native library of the ``moonshine-voice`` wheel, which brings its own
onnxruntime. Version 0.0.4 of that wheel is the last to ship the tiny English model; its three
files' sizes and sha256 are pinned here (``TINY_EN``). They are read once, checked, and the
checked bytes are what the library loads (``moonshine_load_transcriber_from_memory``): a file
that differs is refused, never loaded, and nothing is read from disk after the check.

Decoding: Moonshine transcribes a whole stretch of audio at once, in time proportional to its
length. An utterance's audio is kept as it arrives; the final transcript is one pass over all
of it once the input ends, on a stream of its own (created, fed, asked once, freed: the
library's non-streaming call keeps state between calls, and an utterance's words then
depended on the one before: a "Yes." or "You" came first, and audio under ~75 ms failed in
onnxruntime). The model is loaded with an automatic transcription interval longer than any
utterance, so a stream transcribes only when asked. A partial is the same pass over the audio
so far, after each ``partial_interval_ms`` of new audio, and only when a decoder is idle at
that moment: partials never queue in front of finals (0 turns them off). Unlike a streaming
recogniser, it would start the final only when the input ends, after the VAD's silence window:
so once the speech pauses (``quiet_decode_ms`` of audio under ``quiet_level`` after louder
audio) the utterance so far is decoded at once, while the window runs out, and if nothing loud
came after it by the end, that decode is the final: no pass is left to make at the end.

Threads: ctypes releases the GIL for the native calls. A decoder is one loaded model (~150 MB)
with one thread of its own (a model handle keeps its transcript between calls, so its calls
must not overlap), shared by every caller: one per process, whatever ``workers`` says, as the
library takes one decode at a time (``NATIVE_CALLS``) and a second model's waits would hide in
the lock instead of showing in the pool's STT stage. The library's
onnxruntime would size its own intra-op pool by the cores (version 0.0.4 has no option to
change it), whose threads busy-wait between a decode's operators: a 3 s question cost 0.34-1.1
CPU-s so, against 0.18-0.27 on the decoder's thread alone (``/proc`` per thread, load 12-17).
``pipeline.moonshine_threads`` makes its sessions single-threaded before any model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moonshine_voice
import numpy as np
import soxr

from pipeline.config import MoonshineConfig
from pipeline.moonshine_threads import limit_session_threads, onnxruntime_library
from pipeline.pinned_bytes import mismatch
from pipeline.pool import StageLoad
from pipeline.providers import (
    NO_HINTS,
    REVISED_PARTIALS,
    AudioChunk,
    ProviderError,
    Transcript,
    TranscriptionHints,
)
from pipeline.thread_names import named_executor

log = logging.getLogger(__name__)
SAMPLE_RATE_HZ = 16000
HEADER_VERSION = 20000  # the C API version of moonshine-voice 0.0.4
MODEL_ARCH_TINY = 0
FORCE_UPDATE = 1  # moonshine_transcribe_stream: transcribe now, whatever the interval
# A stream transcribes by itself after this much audio: never, for our utterances
OPTIONS = ((b"transcription_interval", b"3600"),)
PROVIDER = "moonshine"


@dataclass(frozen=True)
class ModelFile:
    name: str
    size_bytes: int
    sha256: str


TINY_EN = (
    ModelFile(
        "encoder_model.ort",
        13_238_168,
        "e091ae52fc2a912197af8f7b7ae2e8365b656ff58463313e0660cce59d9e81d3",
    ),
    ModelFile(
        "decoder_model_merged.ort",
        58_327_168,
        "b40193912d8f4af041f2f3e9f7ff23d45b63a1c15a9c7d35fcbebeab3c4273b2",
    ),
    ModelFile(
        "tokenizer.bin", 249_974, "6884b35fd6377d4c4d32336a0bc152f36b64d1e45b6503683cdc238250a8472d"
    ),
)


class MoonshineModelError(Exception):
    """The model's files are missing or not the pinned ones, or the library refused them."""


def package_folder() -> Path:
    return Path(moonshine_voice.__file__).resolve().parent


def default_model_folder() -> Path:
    """The tiny English model inside the installed wheel."""
    return package_folder() / "assets" / "tiny-en"


def read_verified(folder: Path, files: tuple[ModelFile, ...] = TINY_EN) -> dict[str, bytes]:
    """Each file's bytes, once checked against its pinned size and sha256."""
    contents: dict[str, bytes] = {}
    for pinned in files:
        path = folder / pinned.name
        try:
            content = path.read_bytes()
        except OSError as error:
            raise MoonshineModelError(f"{path}: cannot read: {error.strerror}") from None
        problem = mismatch(content, pinned.sha256, pinned.size_bytes)
        if problem is not None:
            raise MoonshineModelError(f"{path}: {problem}")
        contents[pinned.name] = content
    return contents


class _Line(ctypes.Structure):
    _fields_ = [
        ("text", ctypes.c_char_p),
        ("audio_data", ctypes.POINTER(ctypes.c_float)),
        ("audio_data_count", ctypes.c_size_t),
        ("start_time", ctypes.c_float),
        ("duration", ctypes.c_float),
        ("id", ctypes.c_uint64),
        ("is_complete", ctypes.c_int8),
        ("is_updated", ctypes.c_int8),
        ("is_new", ctypes.c_int8),
        ("has_text_changed", ctypes.c_int8),
    ]


class _Transcript(ctypes.Structure):
    _fields_ = [("lines", ctypes.POINTER(_Line)), ("line_count", ctypes.c_uint64)]


class _Option(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_HANDLE = ctypes.c_int32
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {  # name: (result, arguments), C API 2.0
    "moonshine_load_transcriber_from_memory": (_HANDLE, [
        *(ctypes.c_char_p, ctypes.c_size_t) * 3,  # encoder, decoder, tokenizer
        ctypes.c_uint32, ctypes.POINTER(_Option), ctypes.c_uint64, ctypes.c_int32,
    ]),  # architecture, options, option count, header version
    "moonshine_free_transcriber": (None, [_HANDLE]),
    "moonshine_error_to_string": (ctypes.c_char_p, [ctypes.c_int32]),
    "moonshine_create_stream": (_HANDLE, [_HANDLE, ctypes.c_uint32]),
    "moonshine_start_stream": (ctypes.c_int32, [_HANDLE, _HANDLE]),
    "moonshine_stop_stream": (ctypes.c_int32, [_HANDLE, _HANDLE]),
    "moonshine_free_stream": (ctypes.c_int32, [_HANDLE, _HANDLE]),
    "moonshine_transcribe_add_audio_to_stream": (ctypes.c_int32, [
        _HANDLE, _HANDLE, ctypes.POINTER(ctypes.c_float), ctypes.c_uint64, ctypes.c_int32,
        ctypes.c_uint32,
    ]),
    "moonshine_transcribe_stream": (ctypes.c_int32, [
        _HANDLE, _HANDLE, ctypes.c_uint32, ctypes.POINTER(ctypes.POINTER(_Transcript)),
    ]),
}  # fmt: skip


def _library() -> Any:
    """The wheel's libmoonshine with the signatures of the calls used here; the sessions it
    creates run on their caller's thread alone (``pipeline.moonshine_threads``)."""
    runtime = onnxruntime_library(package_folder())
    if runtime is None or not limit_session_threads(runtime):
        log.warning("moonshine's onnxruntime keeps its own thread pool (busy-waiting per decode)")
    lib = ctypes.CDLL(str(package_folder() / "libmoonshine.so"))
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


# The library is not safe to call from two threads at once, even on two models: with three
# models decoding speech side by side its process died (SIGSEGV in libort-utils, the library's
# global registry of tensor views) within 240 decodes, with or without one-thread sessions,
# and so did a transceiver under 12 calls. Every native call of it holds this lock.
NATIVE_CALLS = threading.Lock()


class MoonshineModel:
    """One loaded model. Its native calls hold ``NATIVE_CALLS``: one decode at a time per
    process, whichever model makes it."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self._lib = _library()
        blobs = [contents[pinned.name] for pinned in TINY_EN]
        arguments = [part for blob in blobs for part in (blob, len(blob))]
        options = (_Option * len(OPTIONS))(*(_Option(*option) for option in OPTIONS))
        load = self._lib.moonshine_load_transcriber_from_memory
        with NATIVE_CALLS:
            handle = load(*arguments, MODEL_ARCH_TINY, options, len(OPTIONS), HEADER_VERSION)
        if handle < 0:
            raise MoonshineModelError(f"the library refused the model: {self._error(handle)}")
        self._handle: int | None = handle

    def _error(self, code: int) -> str:
        text = self._lib.moonshine_error_to_string(code)
        return f"{text.decode(errors='replace') if text else 'unknown error'} ({code})"

    def transcribe(self, samples: np.ndarray) -> str:
        """The words in ``samples`` (16 kHz float32 in -1..1), on a stream of their own."""
        with NATIVE_CALLS:
            return self._transcribe(samples)

    def _transcribe(self, samples: np.ndarray) -> str:
        if self._handle is None:
            raise ProviderError(PROVIDER, "model closed", retryable=False)
        stream = self._call("moonshine_create_stream", self._handle, 0)
        try:
            self._call("moonshine_start_stream", self._handle, stream)
            return self._stream_text(stream, np.ascontiguousarray(samples, dtype=np.float32))
        finally:
            self._lib.moonshine_stop_stream(self._handle, stream)
            self._lib.moonshine_free_stream(self._handle, stream)

    def _stream_text(self, stream: int, audio: np.ndarray) -> str:
        pointer = audio.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        add = "moonshine_transcribe_add_audio_to_stream"
        self._call(add, self._handle, stream, pointer, len(audio), SAMPLE_RATE_HZ, 0)
        out = ctypes.POINTER(_Transcript)()
        transcribe = "moonshine_transcribe_stream"
        self._call(transcribe, self._handle, stream, FORCE_UPDATE, ctypes.byref(out))
        return _text(out)

    def _call(self, name: str, *arguments: Any) -> int:
        """The native call's result; ProviderError when it is an error code (< 0)."""
        code: int = getattr(self._lib, name)(*arguments)
        if code < 0:
            raise ProviderError(PROVIDER, f"{name}: {self._error(code)}", retryable=False)
        return code

    def close(self) -> None:
        with NATIVE_CALLS:
            if self._handle is not None:
                self._lib.moonshine_free_transcriber(self._handle)
                self._handle = None


def _text(out: Any) -> str:
    """A stream's lines (its own voice detector splits the audio at pauses), joined."""
    if not out:
        return ""
    transcript = out.contents
    lines = (transcript.lines[index] for index in range(transcript.line_count))
    texts = (line.text.decode(errors="replace").strip() for line in lines if line.text)
    return " ".join(text for text in texts if text)


class _Decoder:
    """A model and the one thread that runs it, named ``moonshine`` for the kernel too: the
    model is loaded on it, so onnxruntime's own threads inherit the name."""

    def __init__(self, model: MoonshineModel, executor: ThreadPoolExecutor) -> None:
        self.model = model
        self.executor = executor

    @classmethod
    async def load(cls, contents: dict[str, bytes]) -> _Decoder:
        executor = named_executor(1, "moonshine")
        try:
            model = await asyncio.wrap_future(executor.submit(MoonshineModel, contents))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(model, executor)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.model.close()


class MoonshineSpeechToText:
    """One decoder shared by every caller; ``load`` (the process pool's STT stage)
    counts finals waiting for and holding one."""

    name = PROVIDER
    details = frozenset({REVISED_PARTIALS})  # a partial is a new guess at the utterance so far

    def __init__(self, config: MoonshineConfig | None = None, load: StageLoad | None = None):
        self.config = config or MoonshineConfig()
        self.load = load or StageLoad("stt", self.config.workers)
        self._idle: asyncio.Queue[_Decoder] = asyncio.Queue()
        self._all: list[_Decoder] = []

    async def start(self) -> None:
        folder = Path(self.config.model_dir) if self.config.model_dir else default_model_folder()
        contents = await asyncio.to_thread(read_verified, folder)
        if self.config.workers > 1:  # NATIVE_CALLS: a second model would only wait, unseen
            log.info("moonshine: one model for %d workers (one decode at a time per process)",
                     self.config.workers)  # fmt: skip
        decoder = await _Decoder.load(contents)
        self._all.append(decoder)
        self._idle.put_nowait(decoder)

    async def aclose(self) -> None:
        decoders, self._all = self._all, []
        for decoder in decoders:
            await asyncio.to_thread(decoder.close)

    async def transcribe(
        self, audio: AsyncIterator[AudioChunk], hints: TranscriptionHints = NO_HINTS
    ) -> AsyncIterator[Transcript]:
        """``hints`` are taken and not used: one English model, which takes no prompt."""
        if not self._all:
            raise ProviderError(PROVIDER, "not started", retryable=False)
        heard = _Samples(self.config.quiet_level)
        early: tuple[int, str] | None = None  # (loud audio it heard, its words)
        partial_every = self._every(self.config.partial_interval_ms)
        last_partial, partial_at = "", partial_every
        async for chunk in audio:
            heard.add(chunk)
            if self._early_due(heard, early):
                early = (heard.loud_until, await self._final(heard.all()))
                text = early[1]
            elif partial_every and heard.count >= partial_at and not self._idle.empty():
                partial_at = heard.count + partial_every
                text = await self._partial(heard.all())
            else:
                continue
            if text and text != last_partial:
                last_partial = text
                yield Transcript(text, final=False)
        if early is not None and early[0] == heard.loud_until:  # only quiet since: the same
            yield Transcript(early[1], final=True)
            return
        yield Transcript(await self._final(heard.all()), final=True)

    @staticmethod
    def _every(interval_ms: int) -> int:
        return interval_ms * SAMPLE_RATE_HZ // 1000

    def _early_due(self, heard: _Samples, early: tuple[int, str] | None) -> bool:
        """The speech has paused (``quiet_decode_ms`` of quiet after loud audio) and no
        decode has heard it all yet: decode now, while the silence window runs out, and the
        final is this decode's words if nothing loud comes before the input ends."""
        quiet_for = self._every(self.config.quiet_decode_ms)
        if not quiet_for or not heard.loud_until or heard.count - heard.loud_until < quiet_for:
            return False
        return early is None or early[0] != heard.loud_until

    async def _partial(self, samples: np.ndarray) -> str:
        try:
            return await self._decode(self._idle.get_nowait(), samples)
        except ProviderError as error:  # the final decides; this one is only logged
            log.warning("moonshine partial transcript failed: %s", error)
            return ""

    async def _final(self, samples: np.ndarray) -> str:
        if not len(samples):
            return ""
        ticket = self.load.queued()
        try:
            decoder = await self._idle.get()
        except BaseException:
            self.load.abandoned(ticket)
            raise
        self.load.started(ticket)
        try:
            return await self._decode(decoder, samples)
        finally:
            self.load.finished()

    async def _decode(self, decoder: _Decoder, samples: np.ndarray) -> str:
        """Runs on the decoder's thread; the decoder is idle again when the run ends, even if
        the caller stopped waiting for it (barge-in, a cancelled turn)."""
        future = decoder.executor.submit(decoder.model.transcribe, samples)
        future.add_done_callback(self._returner(decoder))
        return await asyncio.wrap_future(future)

    def _returner(self, decoder: _Decoder) -> Callable[[Future[str]], None]:
        loop = asyncio.get_running_loop()

        def back(_: Future[str]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._idle.put_nowait, decoder)

        return back


class _Samples:
    """An utterance's audio so far, at 16 kHz as float32; ``loud_until``: the samples up to
    the end of its last chunk above ``quiet_level`` (RMS, full scale 1)."""

    def __init__(self, quiet_level: float) -> None:
        self._parts: list[np.ndarray] = []
        self._resampler: Any = None
        self._quiet_level = quiet_level
        self.count = 0
        self.loud_until = 0

    def add(self, chunk: AudioChunk) -> None:
        pcm = np.frombuffer(chunk.pcm, np.int16)
        if chunk.sample_rate_hz != SAMPLE_RATE_HZ:
            self._resampler = self._resampler or soxr.ResampleStream(
                chunk.sample_rate_hz, SAMPLE_RATE_HZ, 1, dtype="int16"
            )
            pcm = self._resampler.resample_chunk(pcm)
        samples = pcm.astype(np.float32) / 32768.0
        self._parts.append(samples)
        self.count += len(samples)
        if len(samples) and float(np.sqrt(np.mean(np.square(samples)))) >= self._quiet_level:
            self.loud_until = self.count

    def all(self) -> np.ndarray:
        if len(self._parts) > 1:
            self._parts = [np.concatenate(self._parts)]
        return self._parts[0] if self._parts else np.zeros(0, np.float32)
