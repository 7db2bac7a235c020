"""Headless Debian Chromium driven by Playwright, set up for WebRTC on loopback.

The flags are the ones DESIGN.md records as working on this machine: loopback candidates
allowed, no mDNS hiding of local IPs, every host name but 127.0.0.1 unresolvable, a fake
microphone playing a WAV file once, and none of Chromium's background networking.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Runs in the page: captures `seconds` of the remote audio as mono float samples.
CAPTURE_JS = """
async ([seconds]) => {
  const audio = document.getElementById("remote");
  const deadline = Date.now() + 10000;
  while (!audio.srcObject && Date.now() < deadline) await new Promise(r => setTimeout(r, 50));
  if (!audio.srcObject) throw new Error("no remote stream");
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(audio.srcObject);
  const node = ctx.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  node.onaudioprocess = (e) => chunks.push(Array.from(e.inputBuffer.getChannelData(0)));
  source.connect(node); node.connect(ctx.destination);
  await new Promise(r => setTimeout(r, seconds * 1000));
  node.disconnect(); source.disconnect(); await ctx.close();
  return { rate: ctx.sampleRate, samples: chunks.flat() };
}
"""

# Installed before the page's scripts: getUserMedia answers with a clone of one WebAudio
# stream (silence until a clip plays), and __testMic.say(wav_b64) plays a clip into it,
# resolving once it has been played.
MIC_JS = """
(() => {
  const ctx = new AudioContext({ sampleRate: 48000 });
  const out = ctx.createMediaStreamDestination();
  // Chromium sends no audio at all while nothing plays into the destination: keep a silent
  // source connected so that the microphone sends silence between questions, as a real one.
  const hush = new ConstantSourceNode(ctx, { offset: 0 });
  hush.connect(out);
  hush.start();
  window.__testMic = {
    async say(b64) {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const buffer = await ctx.decodeAudioData(bytes.buffer);
      await ctx.resume();
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(out);
      const ended = new Promise((done) => { source.onended = done; });
      source.start();
      await ended;
      return buffer.duration;
    },
  };
  navigator.mediaDevices.getUserMedia = async () =>
    new MediaStream(out.stream.getAudioTracks().map((track) => track.clone()));
})();
"""


def chromium_args(fake_audio: Path | None) -> list[str]:
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-loopback-in-peer-connection",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]
    if fake_audio is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_audio}%noloop")
    return args


@contextlib.asynccontextmanager
async def chromium(fake_audio: Path | None = None) -> AsyncIterator[Browser]:
    """A browser with a fresh profile (Playwright makes and removes it)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(fake_audio)
        )
        try:
            yield browser
        finally:
            await browser.close()


async def capture_remote_audio(page: Page, seconds: float) -> tuple[np.ndarray[Any, Any], int]:
    result = await page.evaluate(CAPTURE_JS, [seconds])
    return np.asarray(result["samples"], dtype=np.float32), int(result["rate"])


async def recorded_audio(page: Page) -> tuple[np.ndarray[Any, Any], int]:
    """Everything the web client heard since it connected (connect with ``record: true`` or
    load the page with ``?record=1``), as float samples in [-1, 1] and the sample rate."""
    result = await page.evaluate("window.voicerelay.recording()")
    pcm = np.frombuffer(base64.b64decode(result["pcm16_b64"]), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, int(result["rate"])


def dominant_frequency_hz(samples: np.ndarray[Any, Any], rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate_hz)[int(np.argmax(spectrum))])
