"""pipeline.noise_reduction on piper's speech mixed with seeded noise at about 5 dB SNR: the
filter raises the segmental SNR by a clear margin and leaves clean speech nearly as it was."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio

from loadtest.voice_audio import spoken_pcm
from pipeline.config import NoiseReduction
from pipeline.noise_reduction import NoiseSuppressor
from pipeline.piper_tts import PiperTextToSpeech

RATE_HZ = 16000
FRAME = 320  # 20 ms
LAG = FRAME // 2  # the filter's output lags one hop
SNR_DB = 5.0
on_module_loop = pytest.mark.asyncio(loop_scope="module")
Signal = npt.NDArray[np.float64]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def speech(piper: PiperTextToSpeech) -> Signal:
    pcm = await spoken_pcm(piper, "Tell me about the weather in Berlin tomorrow.", RATE_HZ)
    words = np.frombuffer(pcm, np.int16).astype(np.float64)
    quiet = np.zeros(RATE_HZ)  # a second before and after: the noise alone
    return np.concatenate([quiet, words, quiet])


def white(size: int, rng: np.random.Generator) -> Signal:
    return rng.standard_normal(size)


def pink(size: int, rng: np.random.Generator) -> Signal:
    """1/f power: white noise shaped by 1/sqrt(f) in frequency."""
    spectrum = np.fft.rfft(rng.standard_normal(size))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1.0))
    return np.fft.irfft(spectrum, n=size)


def mixed(speech: Signal, noise: Signal) -> Signal:
    """Noise scaled to ``SNR_DB`` below the speech's power where it speaks."""
    active = np.abs(speech) > 0
    speech_power = np.mean(speech[active] ** 2)
    noise *= np.sqrt(speech_power / 10 ** (SNR_DB / 10) / np.mean(noise**2))
    return speech + noise


def filtered(signal: Signal, config: NoiseReduction) -> Signal:
    suppressor = NoiseSuppressor(config, RATE_HZ, 20)
    pcm = np.clip(signal, -32768, 32767).astype(np.int16)
    usable = len(pcm) // FRAME * FRAME
    out = [suppressor.process(pcm[at : at + FRAME].tobytes()) for at in range(0, usable, FRAME)]
    result = np.frombuffer(b"".join(out), np.int16).astype(np.float64)
    return result[LAG:]  # aligned with the input


def segmental_snr_db(clean: Signal, signal: Signal) -> float:
    """The mean SNR of the 20 ms frames where the clean speech is loud (within 30 dB of its
    loudest frame), each clamped to -10..35 dB."""
    usable = min(len(clean), len(signal)) // FRAME * FRAME
    frames = clean[:usable].reshape(-1, FRAME)
    errors = (signal[:usable] - clean[:usable]).reshape(-1, FRAME)
    power = np.sum(frames**2, axis=1)
    loud = power > power.max() / 1000
    ratios = power[loud] / np.maximum(np.sum(errors[loud] ** 2, axis=1), 1e-9)
    return float(np.mean(np.clip(10 * np.log10(ratios), -10, 35)))


@on_module_loop
@pytest.mark.parametrize("shape", [white, pink])
@pytest.mark.parametrize("kind", ["near_field", "far_field"])
async def test_the_filter_raises_the_segmental_snr_of_noisy_speech(
    speech: Signal, shape: Callable[[int, np.random.Generator], Signal], kind: str
) -> None:
    noisy = mixed(speech, shape(len(speech), np.random.default_rng(7)))
    before = segmental_snr_db(speech, noisy)
    after = segmental_snr_db(speech, filtered(noisy, NoiseReduction(kind)))
    assert after - before > 3.0, (kind, before, after)


@on_module_loop
@pytest.mark.parametrize("kind", ["near_field", "far_field"])
async def test_clean_speech_keeps_its_energy(speech: Signal, kind: str) -> None:
    out = filtered(speech, NoiseReduction(kind, strength=1.0))
    kept_db = 10 * np.log10(np.sum(out**2) / np.sum(speech[: len(out)] ** 2))
    assert -1.5 < kept_db < 0.5, kept_db
    assert segmental_snr_db(speech, out) > 25.0  # the waveform too, not only its energy


def test_at_strength_zero_the_output_is_the_input_delayed() -> None:
    rng = np.random.default_rng(3)
    noise = np.clip(np.round(rng.normal(0, 3000, 50 * FRAME)), -32768, 32767)
    out = filtered(noise, NoiseReduction(strength=0.0))
    assert np.max(np.abs(out - noise[: len(out)])) <= 1.0


def test_bad_settings_and_frames_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseReduction("loud")
    with pytest.raises(ValueError, match="strength must be within 0..1"):
        NoiseReduction(strength=1.5)
    suppressor = NoiseSuppressor(NoiseReduction(), RATE_HZ, 20)
    with pytest.raises(ValueError, match="frame must be 640 bytes: 320"):
        suppressor.process(b"\0" * 320)
