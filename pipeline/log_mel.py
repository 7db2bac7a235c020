"""Whisper-style log-mel features of the last seconds of an utterance (what smart-turn reads).

Protocol layer, pure numpy. The end-of-turn model (``pipeline.end_of_turn``) is a Whisper-tiny
encoder with a classifier head, so it expects exactly Whisper's input: 16 kHz mono, a window of
``WINDOW_S`` seconds (older audio dropped, a shorter utterance padded with zeros in front, so
its end is always at the right edge), the waveform scaled to zero mean and unit variance, then
a 400-point STFT with a periodic Hann window every 160 samples (10 ms; the signal reflected by
200 samples at both ends, and the last frame dropped), power spectrum, 80 mel bands (Slaney's
mel scale and area normalisation, 0-8 kHz), ``log10`` floored at 1e-10, clipped to 8 decades
below its maximum, and mapped by ``(x + 4) / 4``.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

SAMPLE_RATE_HZ = 16000
WINDOW_S = 8
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE_HZ
FFT_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
MEL_BANDS = 80
FRAMES = WINDOW_SAMPLES // HOP_SAMPLES  # 800
NORMALISE_EPSILON = 1e-7
POWER_FLOOR = 1e-10
DYNAMIC_RANGE_DECADES = 8.0

Floats = npt.NDArray[np.float64]


def pcm16_to_float(pcm: bytes) -> Floats:
    """16-bit little-endian mono PCM as samples in [-1, 1)."""
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM has an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0


def last_window(samples: Floats) -> Floats:
    """The last ``WINDOW_S`` seconds; a shorter input zero-padded at its start."""
    if len(samples) >= WINDOW_SAMPLES:
        return samples[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - len(samples)), samples])


def log_mel_features(samples: Floats) -> npt.NDArray[np.float32]:
    """``(MEL_BANDS, FRAMES)`` features of the last window of 16 kHz ``samples``."""
    window = last_window(samples)
    normalised = (window - window.mean()) / np.sqrt(window.var() + NORMALISE_EPSILON)
    power = _power_spectrogram(normalised)  # (FRAMES, FFT_SAMPLES // 2 + 1)
    mel = _mel_filters() @ power.T  # (MEL_BANDS, FRAMES)
    log_mel = np.log10(np.maximum(mel, POWER_FLOOR))
    log_mel = np.maximum(log_mel, log_mel.max() - DYNAMIC_RANGE_DECADES)
    features: npt.NDArray[np.float32] = ((log_mel + 4.0) / 4.0).astype(np.float32)
    return features


def _power_spectrogram(samples: Floats) -> Floats:
    half = FFT_SAMPLES // 2
    padded = np.pad(samples, half, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, FFT_SAMPLES)[::HOP_SAMPLES]
    spectrum = np.fft.rfft(frames[:FRAMES] * _hann(), axis=1)  # the last frame dropped
    power: Floats = spectrum.real**2 + spectrum.imag**2
    return power


@functools.cache
def _hann() -> Floats:
    """The periodic Hann window (as for spectral analysis, not the symmetric filter one)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FFT_SAMPLES) / FFT_SAMPLES)


def hz_to_mel(hz: Floats) -> Floats:
    """Slaney's mel scale: linear to 1 kHz (15 mel), logarithmic above."""
    linear = hz / (200.0 / 3)
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27)
    return np.where(hz < 1000.0, linear, logarithmic)


def mel_to_hz(mel: Floats) -> Floats:
    linear = mel * (200.0 / 3)
    logarithmic = 1000.0 * np.exp((np.log(6.4) / 27) * (mel - 15.0))
    return np.where(mel < 15.0, linear, logarithmic)


@functools.cache
def _mel_filters() -> Floats:
    """``(MEL_BANDS, FFT bins)`` triangles between mel-spaced edges, each of unit area."""
    bin_hz = np.linspace(0.0, SAMPLE_RATE_HZ / 2, FFT_SAMPLES // 2 + 1)
    top_mel = hz_to_mel(np.array([SAMPLE_RATE_HZ / 2]))[0]
    edges_hz = mel_to_hz(np.linspace(0.0, top_mel, MEL_BANDS + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz - lower) / (centre - lower)
    falling = (upper - bin_hz) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    filters: Floats = triangles * (2.0 / (upper - lower))
    return filters


def mel_band_of(frequency_hz: float) -> int:
    """The band whose triangle peaks nearest ``frequency_hz`` (for checks and tests)."""
    top_mel = hz_to_mel(np.array([SAMPLE_RATE_HZ / 2]))[0]
    centres_hz = mel_to_hz(np.linspace(0.0, top_mel, MEL_BANDS + 2))[1:-1]
    return int(np.argmin(np.abs(centres_hz - frequency_hz)))
