"""Two cheap, contained fixes to aiortc's audio path (aiortc pinned; tests/test_rtp_tuning.py).

I/O layer; the only place outside ``ice`` that touches aiortc internals.

- ``aiortc.rtp.compute_audio_level_dbov`` (RFC 6465 Appendix A level, called by every
  ``RTCRtpSender`` on every outgoing audio frame) is a per-sample Python loop: ~45% of a
  session's CPU. It also walks the whole of plane 0, which for frames from aiortc's Opus
  decoder is padded to 120 ms of stereo (11 520 samples for 960 real ones), and divides by
  the samples of one channel. :func:`audio_level_dbov` computes the level over the frame's
  actual samples, in integers. Not with a float ``np.dot``: that is a BLAS call, and above
  10 000 elements OpenBLAS hands it to its server threads, which then spin between the
  50-a-second calls (a whole core per call).
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
    """The RFC 6465 level of an s16 frame: every channel's samples, none of the plane's padding.

    A planar frame's plane 0 holds its first channel only, and that is what is measured.
    """
    values = frame.samples * (1 if frame.format.is_planar else len(frame.layout.channels))
    return level_dbov(np.frombuffer(frame.planes[0], dtype=np.int16, count=values))


def level_dbov(samples: np.ndarray[Any, np.dtype[np.int16]]) -> int:
    """RFC 6465 Appendix A: the RMS relative to full scale in dBov, rounded, within -127..0."""
    if samples.size == 0:
        return MIN_AUDIO_LEVEL_DBOV
    energy = int(np.square(samples, dtype=np.int64).sum())  # elementwise and exact: no BLAS
    if energy == 0:
        return MIN_AUDIO_LEVEL_DBOV
    rms = math.sqrt(energy / (samples.size * MAX_SAMPLE_VALUE * MAX_SAMPLE_VALUE))
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
