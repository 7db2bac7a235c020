"""WAV files of 16-bit mono PCM: the OpenAI speech-to-text upload (``wav_bytes``), the answer
file of ``python -m pipeline`` and the spoken fixtures of the tests and benchmarks
(``write_wav``).

I/O layer only in that ``write_wav`` writes the file it is given (so not listed as pure).
"""

from __future__ import annotations

import io
import wave
from pathlib import Path


def wav_bytes(pcm: bytes, sample_rate_hz: int) -> bytes:
    """A RIFF/WAVE file holding 16-bit mono PCM."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate_hz)
        wav.writeframes(pcm)
    return buffer.getvalue()


def write_wav(path: Path, pcm: bytes, sample_rate_hz: int) -> Path:
    """``pcm`` (16-bit mono) as a WAV file at ``path``; returns ``path``."""
    path.write_bytes(wav_bytes(pcm, sample_rate_hz))
    return path
