"""Two cheap, contained fixes to aiortc's audio path (aiortc pinned; tests/test_rtp_tuning.py).

I/O layer; the only place outside ``ice`` that touches aiortc internals.

- ``aiortc.rtp.compute_audio_level_dbov`` (RFC 6465 Appendix A level, called by every
  ``RTCRtpSender`` on every outgoing audio frame) is a per-sample Python loop: ~45% of a
  session's CPU. :func:`audio_level_dbov` computes the same number with numpy.
- An audio ``RTCRtpReceiver`` holds 4 frames in its jitter buffer before it decodes the first
  (``prefetch=4``): ~60 ms on every turn. Speech-to-text needs no smoothing, so
  :func:`lower_audio_prefetch` makes it 1 frame per receiver.
"""

from __future__ import annotations

import math
from typing import Any

import aiortc.rtp
import numpy as np
from aiortc.jitterbuffer import JitterBuffer

MAX_SAMPLE_VALUE = 32767
MIN_AUDIO_LEVEL_DBOV = -127
_JITTER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"
AUDIO_PREFETCH_FRAMES = 1
AIORTC_AUDIO_LEVEL = aiortc.rtp.compute_audio_level_dbov  # the original, for the contract test


def audio_level_dbov(frame: Any) -> int:
    """What aiortc computes: sum of squares over plane 0, divided by ``frame.samples``."""
    samples = np.frombuffer(bytes(frame.planes[0]), dtype=np.int16).astype(np.float64)
    energy = float(np.dot(samples, samples))
    rms = math.sqrt(energy / (frame.samples * MAX_SAMPLE_VALUE * MAX_SAMPLE_VALUE))
    if rms <= 0:
        return MIN_AUDIO_LEVEL_DBOV
    return round(min(0.0, max(float(MIN_AUDIO_LEVEL_DBOV), 20 * math.log10(rms))))


def install() -> None:
    """Swap in the numpy audio level (idempotent)."""
    aiortc.rtp.compute_audio_level_dbov = audio_level_dbov


def lower_audio_prefetch(receiver: Any, frames: int = AUDIO_PREFETCH_FRAMES) -> None:
    """Give an audio receiver a jitter buffer that decodes after ``frames`` frames."""
    current = getattr(receiver, _JITTER_ATTRIBUTE, None)
    if not isinstance(current, JitterBuffer):
        raise RuntimeError("aiortc's RTCRtpReceiver no longer has the jitter buffer we tune")
    setattr(receiver, _JITTER_ATTRIBUTE, JitterBuffer(capacity=current.capacity, prefetch=frames))
