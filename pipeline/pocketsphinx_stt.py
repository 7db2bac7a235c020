"""PocketsphinxSpeechToText: streaming offline speech recognition in worker processes.

I/O layer. pocketsphinx holds the GIL while it decodes, so decoding runs in a small pool of
persistent worker processes (``spawn``), each holding one ``Decoder`` with the English model
the package ships (~90 MB each, so not one per call). The pool is shared by every caller of
the process. An utterance holds a decoder while its audio streams; the event loop only writes
audio to the worker's pipe and reads results when the pipe is readable (``loop.add_reader``);
it never waits on a decode.

A caller's audio can stop mid-utterance (a stalled client, a dropped connection not yet
noticed): no end of speech ever comes. Such an utterance must not keep its decoder from the
other calls until its call ends, so once no audio has come for ``stall_release_ms`` and another
utterance waits for a decoder, it gives its decoder up; the utterance's audio is kept, and
replayed from the start on a decoder if more comes.

Pipe messages (tuples, pickled by ``multiprocessing.Connection``)::

    parent -> worker: ("start", utt) ("audio", utt, pcm16k) ("end", utt) ("stop",)
    worker -> parent: ("ready",) ("partial", utt, text) ("final", utt, text)

Workers are started with ``spawn`` (never ``fork`` a process that holds onnxruntime threads),
so, as for any ``spawn`` user, a script must guard its entry point with
``if __name__ == "__main__":``. Audio writes go straight to the pipe; the worker drains it
continuously, and a pipe holds ~2 s of 16 kHz audio, so a write does not block in practice.

Results carry the id of the run (one utterance on one decoder), so a worker whose previous run
was abandoned mid-way (barge-in, cancellation, a stall) is reusable at once: stale results are
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import soxr

from pipeline.config import PocketsphinxConfig
from pipeline.pool import StageLoad
from pipeline.providers import (
    NO_HINTS,
    REVISED_PARTIALS,
    AudioChunk,
    ProviderError,
    Transcript,
    TranscriptionHints,
)

DECODER_SAMPLE_RATE_HZ = 16000


def _decode_forever(conn: Connection, partial_interval_ms: int) -> None:
    """Worker process main: one Decoder, one utterance at a time."""
    from pocketsphinx import Decoder

    decoder = Decoder(loglevel="FATAL")
    conn.send(("ready",))
    current, since_partial, last_partial = None, 0, ""
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "start":
            if current is not None:
                decoder.end_utt()
            decoder.start_utt()
            current, since_partial, last_partial = message[1], 0, ""
        elif kind == "audio" and message[1] == current:
            decoder.process_raw(message[2], False, False)
            since_partial += len(message[2]) * 500 // DECODER_SAMPLE_RATE_HZ
            if since_partial >= partial_interval_ms:
                since_partial = 0
                text = decoder.hyp().hypstr if decoder.hyp() else ""
                if text and text != last_partial:
                    last_partial = text
                    conn.send(("partial", current, text))
        elif kind == "end" and message[1] == current:
            decoder.end_utt()
            conn.send(("final", current, decoder.hyp().hypstr if decoder.hyp() else ""))
            current = None


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError) as error:
            raise ProviderError(
                "pocketsphinx", f"decoder process gone: {error}", retryable=True
            ) from None

    def recv_now(self) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = self.conn.recv()
        except (EOFError, OSError):
            raise ProviderError("pocketsphinx", "decoder process exited", retryable=True) from None
        return message

    async def recv(self) -> tuple[Any, ...]:
        while not self.conn.poll():
            await self.readable(None, None)
        return self.recv_now()

    async def readable(self, wake: asyncio.Future[Any] | None, deadline_s: float | None) -> None:
        """Until the pipe has data, ``wake`` completes or the deadline passes."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.conn.fileno()

        def wake_up() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake_up)
        waits: set[asyncio.Future[Any]] = {ready}
        if wake is not None and not wake.done():
            waits.add(wake)
        timeout_s = None if deadline_s is None else max(0.0, deadline_s - loop.time())
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
            ready.cancel()


class _Utterance:
    """One utterance's audio at 16 kHz, kept so a decoder can be given it again from the start;
    ``arrived`` completes when more audio (or the end) comes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended = False
        self.last_audio_s = asyncio.get_running_loop().time()
        self.arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, pcm: bytes) -> None:
        self.chunks.append(pcm)
        self.last_audio_s = asyncio.get_running_loop().time()
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if not self.arrived.done():
            self.arrived.set_result(None)

    def rearm(self) -> None:
        if self.arrived.done():
            self.arrived = asyncio.get_running_loop().create_future()


class PocketsphinxSpeechToText:
    """``workers`` decoder processes shared by every caller. An utterance holds a decoder while
    it streams; one whose audio has stopped arriving (``stall_release_ms``) gives its decoder
    up to an utterance that waits for one, and replays its audio on a decoder when it resumes.
    ``load`` (the process pool's STT stage) counts utterances waiting for and holding one."""

    name = "pocketsphinx"
    details = frozenset({REVISED_PARTIALS})  # a partial is a new guess at the utterance so far

    def __init__(self, config: PocketsphinxConfig | None = None, load: StageLoad | None = None):
        self.config = config or PocketsphinxConfig()
        self.load = load or StageLoad("stt", self.config.workers)
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: list[_Worker] = []
        self._runs = itertools.count(1)
        self._waiters = 0

    async def start(self) -> None:
        workers = [self._spawn() for _ in range(self.config.workers)]
        async with asyncio.timeout(self.config.start_timeout_s):
            for worker in workers:
                await worker.recv()  # ("ready",)
                self._idle.put_nowait(worker)

    async def aclose(self) -> None:
        for worker in self._all:
            with contextlib.suppress(ProviderError):
                worker.send(("stop",))
        await asyncio.to_thread(self._join_all)

    def _join_all(self) -> None:
        for worker in self._all:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._all.clear()

    def _spawn(self) -> _Worker:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_decode_forever,
            args=(child, self.config.partial_interval_ms),
            name="pocketsphinx-decoder",
            daemon=True,
        )
        process.start()
        child.close()
        worker = _Worker(process, parent)
        self._all.append(worker)
        return worker

    async def transcribe(
        self, audio: AsyncIterator[AudioChunk], hints: TranscriptionHints = NO_HINTS
    ) -> AsyncIterator[Transcript]:
        """``hints`` are taken and not used: one English model, which takes no prompt."""
        if not self._all:
            raise ProviderError("pocketsphinx", "not started", retryable=False)
        utterance = _Utterance()
        feeder = asyncio.create_task(self._feed(utterance, audio))
        try:
            async for transcript in self._decode(utterance, feeder):
                yield transcript
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _feed(self, utterance: _Utterance, audio: AsyncIterator[AudioChunk]) -> None:
        resampler: Any = None
        try:
            async for chunk in audio:
                pcm = chunk.pcm
                if chunk.sample_rate_hz != DECODER_SAMPLE_RATE_HZ:
                    resampler = resampler or soxr.ResampleStream(
                        chunk.sample_rate_hz, DECODER_SAMPLE_RATE_HZ, 1, dtype="int16"
                    )
                    pcm = resampler.resample_chunk(np.frombuffer(pcm, np.int16)).tobytes()
                utterance.add(pcm)
        finally:
            utterance.end()  # or failed: the decoding side sees the feeder's error

    async def _decode(
        self, utterance: _Utterance, feeder: asyncio.Task[None]
    ) -> AsyncIterator[Transcript]:
        """Runs of the utterance on a decoder: one, unless it stalls while others wait."""
        last_partial = ""
        while True:
            worker = await self._acquire()
            run = _Run(worker, next(self._runs), utterance)
            try:
                async for transcript in self._results(run, feeder):
                    if transcript.final or transcript.text != last_partial:
                        last_partial = transcript.text
                        yield transcript
                    if transcript.final:
                        return
            finally:
                self._release(worker)
            # Stalled and handed over: wait for more audio (or its end) before a new run.
            if len(utterance.chunks) == run.sent and not utterance.ended:
                utterance.rearm()
                await utterance.arrived

    async def _acquire(self) -> _Worker:
        ticket = self.load.queued()
        self._waiters += 1
        try:
            worker = await self._idle.get()
        except BaseException:
            self.load.abandoned(ticket)
            raise
        finally:
            self._waiters -= 1
        self.load.started(ticket)
        return worker

    async def _results(self, run: _Run, feeder: asyncio.Task[None]) -> AsyncIterator[Transcript]:
        """The run's transcripts; returns without a final when the utterance stalled and
        another one waits for a decoder."""
        loop = asyncio.get_running_loop()
        worker, utterance = run.worker, run.utterance
        stall_s = self.config.stall_release_ms / 1000
        worker.send(("start", run.run_id))
        deadline_s: float | None = None
        while True:
            run.forward()
            if deadline_s is None and feeder.done():
                feeder.result()  # the audio source failed: raise its error
                run.forward()
                worker.send(("end", run.run_id))
                deadline_s = loop.time() + self.config.final_timeout_s
            if not worker.conn.poll():
                now = loop.time()
                if deadline_s is not None and now >= deadline_s:
                    raise ProviderError(
                        "pocketsphinx", "no final transcript in time", retryable=True
                    )
                stalled_at_s = utterance.last_audio_s + stall_s
                if deadline_s is None and now >= stalled_at_s:
                    if self._waiters:
                        return  # stalled: the decoder goes to one that has audio
                    stalled_at_s = now + stall_s  # look again then
                utterance.rearm()
                wake = feeder if deadline_s is not None else utterance.arrived
                await worker.readable(wake, deadline_s or stalled_at_s)
                continue
            kind, *rest = worker.recv_now()
            if kind == "ready" or rest[0] != run.run_id:
                continue
            yield Transcript(rest[1], final=kind == "final")
            if kind == "final":
                return

    def _release(self, worker: _Worker) -> None:
        self.load.finished()
        if worker.process.is_alive():
            self._idle.put_nowait(worker)
            return
        self._all.remove(worker)
        worker.conn.close()
        self._idle.put_nowait(self._spawn())  # its ("ready",) is skipped by _results


class _Run:
    """An utterance on one decoder: the audio it has been sent so far."""

    def __init__(self, worker: _Worker, run_id: int, utterance: _Utterance) -> None:
        self.worker, self.run_id, self.utterance = worker, run_id, utterance
        self.sent = 0

    def forward(self) -> None:
        chunks = self.utterance.chunks
        while self.sent < len(chunks):
            self.worker.send(("audio", self.run_id, chunks[self.sent]))
            self.sent += 1
