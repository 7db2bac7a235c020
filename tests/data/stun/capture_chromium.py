"""Captures a real Chromium STUN binding request into chromium-request.bin (run once).

    PYTHONPATH=. .venv/bin/python tests/data/stun/capture_chromium.py

Debian Chromium makes an offer; the page is handed an answer whose ICE credentials are a ufrag
minted with make_captures.TEST_KEYS for transceiver 127.0.0.1:7000 and its derived password,
and whose one candidate is a UDP socket of this script. The first datagram Chromium sends
there is its connectivity check, saved byte for byte.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from make_captures import TEST_KEYS  # noqa: E402

from loadtest.browser import chromium  # noqa: E402
from relay.wire.ufrag import Keyring, derive_password, mint_ufrag  # noqa: E402

HERE = Path(__file__).parent
FINGERPRINT = ":".join(["AB"] * 32)

PAGE_JS = """
async ([ufrag, pwd, port, fingerprint]) => {
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.createDataChannel("capture");
  await pc.setLocalDescription(await pc.createOffer());
  const mid = pc.localDescription.sdp.match(/a=mid:(\\S+)/)[1];
  const answer = [
    "v=0", "o=- 1 1 IN IP4 127.0.0.1", "s=-", "t=0 0", `a=group:BUNDLE ${mid}`,
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0",
    `a=mid:${mid}`, `a=ice-ufrag:${ufrag}`, `a=ice-pwd:${pwd}`,
    `a=fingerprint:sha-256 ${fingerprint}`, "a=setup:passive", "a=sctp-port:5000",
    `a=candidate:1 1 udp 2130706431 127.0.0.1 ${port} typ host`, "",
  ].join("\\r\\n");
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  window.capturePc = pc;
}
"""


async def capture() -> bytes:
    ring = Keyring.parse(TEST_KEYS)
    ufrag = mint_ufrag(ring, ("127.0.0.1", 7000), nonce=b"chromium")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto("about:blank")
        args = [ufrag, derive_password(ring, ufrag), sock.getsockname()[1], FINGERPRINT]
        await page.evaluate(PAGE_JS, args)
        data, _ = await asyncio.to_thread(sock.recvfrom, 2048)
    sock.close()
    return data


if __name__ == "__main__":
    packet = asyncio.run(capture())
    (HERE / "chromium-request.bin").write_bytes(packet)
    print(f"captured {len(packet)} bytes: {packet[:2].hex()} ...")
