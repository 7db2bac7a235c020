"""Both media paths in a real browser, whichever one is the default.

The transceiver carries a call's audio with aiortc's RTP machinery or with the lean path
(``TRANSCEIVER_MEDIA_PATH``, per process). The rest of the suite runs on the path its
environment selects (the default unless set); this test is parametrized over every path and
runs the ones the rest of the suite does not, so each path keeps an end-to-end check with
Chromium, the peer that matters most, at the cost of one call. The suite's own path is skipped
here: tests/test_browser_e2e.py's echo call is this same call on it.

The call: `make run`'s stack with the echo agent, the web client in headless Chromium sending a
440 Hz tone through the real relay, which must come back (the echo is decoded and re-encoded by
the transceiver, so audio goes both ways); the transceiver's ``/metrics`` must show the path
that carried it.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
from test_browser_e2e import assert_stopped_cleanly, loud_part, open_client, wait_recorded

from deploy.launched import launched
from deploy.processes import metric_values
from loadtest.browser import chromium, dominant_frequency_hz, recorded_audio
from loadtest.voice_audio import tone_pcm, write_wav
from transceiver.config import TransceiverConfig
from transceiver.webrtc.calls import MEDIA_PATHS

pytestmark = pytest.mark.slow
LEAN_EVENTS = "transceiver_lean_media_events_total"
DEFAULT_PATH = next(f.default for f in fields(TransceiverConfig) if f.name == "media_path")
SUITE_PATH = os.environ.get("TRANSCEIVER_MEDIA_PATH") or DEFAULT_PATH  # every other test's


@pytest.mark.parametrize("media_path", MEDIA_PATHS)
async def test_a_chromium_echo_call_hears_its_tone_back_on_each_media_path(
    tmp_path: Path, media_path: str
) -> None:
    if media_path == SUITE_PATH:
        pytest.skip(f"{media_path} is the suite's path: tests/test_browser_e2e.py makes this call")
    wav = write_wav(tmp_path / "tone.wav", tone_pcm(440.0, 6.0))
    with launched(["--agent", "echo"], env={"TRANSCEIVER_MEDIA_PATH": media_path}) as stack:
        async with chromium(wav) as browser:
            page, errors = await open_client(browser, stack.url)
            await page.evaluate("window.voicerelay.connect({record: true})")
            assert await page.text_content("#state-connection") == "connected"
            await wait_recorded(page, 3.0, timeout_s=20.0)
            samples, rate_hz = await recorded_audio(page)
            async with httpx.AsyncClient(timeout=10) as http:
                exposition = (await http.get(stack.url + "metrics")).text
            await page.evaluate("window.voicerelay.hangup()")
            assert errors == []
    assert_stopped_cleanly(stack)
    heard = loud_part(samples, rate_hz)
    assert len(heard) > rate_hz, "less than a second of the tone came back"
    assert abs(dominant_frequency_hz(heard, rate_hz) - 440.0) < 5.0
    lean = metric_values(exposition, LEAN_EVENTS)
    if media_path == "lean":
        assert lean["rtp_in"] > 0 and lean["rtp_out"] > 0, lean
        assert lean["srtp_rejected"] == 0, lean
    else:
        assert not lean, "the lean path carried a call it was not asked to"
