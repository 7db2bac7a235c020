"""LeadTrimmer: an answer's quiet lead-in dropped before its first frame out (pure)."""

from __future__ import annotations

import numpy as np

from pipeline.playout import LEAD_KEEP_MS, LEAD_MAX_TRIM_MS, LeadTrimmer

RATE_HZ = 24000


def quiet(ms: int, level: float = 0.0005) -> bytes:
    noise = np.random.default_rng(7).standard_normal(RATE_HZ * ms // 1000) * level
    return (noise * 32768).astype("<i2").tobytes()


def voice(ms: int) -> bytes:
    t = np.arange(RATE_HZ * ms // 1000) / RATE_HZ
    return (np.sin(2 * np.pi * 220 * t) * 0.3 * 32768).astype("<i2").tobytes()


def ms_of(pcm: bytes) -> float:
    return len(pcm) * 500 / RATE_HZ


def test_the_lead_in_goes_but_for_the_last_few_ms_before_the_voice() -> None:
    lead, spoken = quiet(50), voice(100)
    trimmer = LeadTrimmer(RATE_HZ)
    out = trimmer.push(lead + spoken)
    assert out.endswith(spoken) and ms_of(out) == 100 + LEAD_KEEP_MS
    assert ms_of(trimmer.flush()) == 0


def test_quiet_is_held_across_pushes_until_the_voice_comes_then_all_passes() -> None:
    trimmer = LeadTrimmer(RATE_HZ)
    assert trimmer.push(quiet(20)) == b"" and trimmer.push(quiet(20)) == b""
    out = trimmer.push(voice(40))
    assert ms_of(out) == 40 + LEAD_KEEP_MS
    later = quiet(30) + voice(20)
    assert trimmer.push(later) == later  # after the voice began, nothing is trimmed


def test_a_long_quiet_is_a_pause_meant_and_goes_out_whole() -> None:
    trimmer = LeadTrimmer(RATE_HZ)
    long_quiet = quiet(LEAD_MAX_TRIM_MS + 20)
    assert trimmer.push(long_quiet) == long_quiet


def test_audio_that_never_gets_loud_comes_out_at_its_end() -> None:
    trimmer = LeadTrimmer(RATE_HZ)
    held = quiet(60)
    assert trimmer.push(held) == b"" and trimmer.flush() == held
