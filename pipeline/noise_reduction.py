"""Noise reduction on the input: a Wiener-like spectral gate against a tracked noise floor.

No I/O: numpy on PCM frames (numpy keeps it off the package's ``Pure:`` list). What a
session's ``audio.input.noise_reduction`` turns on; the engine runs it on every input frame
before the VAD, so the VAD, the speech-to-text and the utterance a committed turn carries all
get the filtered audio.

Per 20 ms frame (320 samples at 16 kHz): two 20 ms sqrt-Hann windows at 50% overlap, one
batched FFT of both, a gain per bin ``max(floor, 1 - over * noise / power)``, the inverse
FFT and overlap-add. The output lags the input by one hop (half a frame, 10 ms at 20 ms
frames); at a gain of 1 it is the input, delayed.

The noise floor per bin follows the minimum of the smoothed power: it drops to it at once
and rises at most ``rise_db_per_s`` while the power stays above it (minimum tracking, needing
no VAD): steady noise is learned within a frame or two of the start and speech, which comes
and goes in every bin, lifts it little. ``over`` makes up for a minimum lying below the
noise's mean.

The kinds: ``near_field`` (a headset: speech well above the noise) gates harder, its floor at
``-12 dB * strength`` (at OpenAI's default strength, 1), ``over`` 3.0, its floor rising up to
6 dB/s; ``far_field`` (a laptop or room microphone: quieter, reverberant speech whose tails a
fast floor would learn as noise) is gentler, its floor at ``-9 dB * strength``,
``over`` 2.0, rising up to 3 dB/s.

Settling: webrtcvad, fed a stream that starts in noise, calls its first few hundred ms speech
whatever the filter leaves (its own noise model adapts meanwhile), so a call opening on steady
noise would start a short turn. For a suppressor's first ``SETTLE_MS`` (``settled`` false) the
engine lets the VAD hear the frames but takes no speech from it (a turn starting just after
keeps its prefix padding of the audio before).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.config import NoiseReduction, over_subtraction

SETTLE_MS = 500  # the VAD's first moments on a filtered stream: see ``settled``
_SMOOTHING = 0.7  # of the power the floor follows, per frame
_EPSILON = 1e-3  # power below this is silence (int16 scale), never divided by


class NoiseSuppressor:
    """One input stream's filter. Frames of ``frame_ms`` of 16-bit mono PCM in and out."""

    def __init__(self, config: NoiseReduction, sample_rate_hz: int, frame_ms: int) -> None:
        size = sample_rate_hz * frame_ms // 1000
        if size < 32 or size % 2:
            raise ValueError(f"noise reduction needs an even frame of >= 32 samples: {size}")
        self.config = config
        self._size, self._hop = size, size // 2
        self._floor, self._over = config.floor_gain, over_subtraction(config)
        self._rise = config.rise_per_frame(frame_ms)
        f64 = np.float64
        self._window = np.sqrt(np.hanning(size + 1)[:size]).astype(f64)  # periodic sqrt-Hann
        self._input = np.zeros(size + self._hop, f64)
        self._frames = np.lib.stride_tricks.sliding_window_view(self._input, size)[:: self._hop]
        self._windowed = np.zeros((2, size), f64)
        bins = size // 2 + 1
        self._spectrum = np.zeros((2, bins), np.complex128)
        self._power = np.zeros((2, bins), f64)
        self._gain = np.zeros((2, bins), f64)
        self._smoothed = np.zeros(bins, f64)
        self._both = np.zeros(bins, f64)
        self._noise = np.full(bins, np.inf, f64)
        self._output = np.zeros((2, size), f64)
        self._sum = np.zeros(size + self._hop, f64)
        self._pcm = np.zeros(size, np.int16)
        self._started = False
        self._unsettled_frames = SETTLE_MS // frame_ms

    @property
    def settled(self) -> bool:
        """Past its first ``SETTLE_MS``, in which the VAD should hear no speech."""
        return self._unsettled_frames <= 0

    def process(self, frame: bytes) -> bytes:
        """The frame filtered (lagging one hop); ValueError for a frame of another size."""
        if len(frame) != 2 * self._size:
            raise ValueError(f"noise reduction frame must be {2 * self._size} bytes: {len(frame)}")
        hop = self._hop
        self._unsettled_frames -= 1
        self._input[:hop] = self._input[self._size :]
        self._input[hop:] = np.frombuffer(frame, np.int16)
        np.multiply(self._frames, self._window, out=self._windowed)
        np.fft.rfft(self._windowed, axis=1, out=self._spectrum)
        np.abs(self._spectrum, out=self._power)
        np.square(self._power, out=self._power)
        self._track(self._power)
        self._apply_gain()
        return self._overlap_add()

    def _track(self, power: npt.NDArray[np.float64]) -> None:
        """The floor: the minimum of the smoothed power, rising at most ``_rise`` a frame."""
        both = self._both
        np.add(power[0], power[1], out=both)  # twice the frame's mean power
        if not self._started:
            np.multiply(both, 0.5, out=self._smoothed)
            self._started = True
        self._smoothed *= _SMOOTHING
        both *= 0.5 * (1.0 - _SMOOTHING)
        self._smoothed += both
        self._noise *= self._rise
        np.minimum(self._noise, self._smoothed, out=self._noise)

    def _apply_gain(self) -> None:
        gain = self._gain
        np.add(self._power, _EPSILON, out=gain)
        np.divide(self._noise, gain, out=gain)
        gain *= -self._over
        gain += 1.0
        np.maximum(gain, self._floor, out=gain)
        self._spectrum *= gain
        np.fft.irfft(self._spectrum, n=self._size, axis=1, out=self._output)

    def _overlap_add(self) -> bytes:
        size, hop, total = self._size, self._hop, self._sum
        total[:hop] = total[size:]
        total[hop:] = 0.0
        self._output *= self._window
        total[:size] += self._output[0]
        total[hop:] += self._output[1]
        np.clip(total[:size], -32768.0, 32767.0, out=total[:size])
        np.copyto(self._pcm, total[:size], casting="unsafe")
        return self._pcm.tobytes()
