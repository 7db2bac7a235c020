"""A spoken turn on the lean media path through a network that loses 5 % of the media.

Real sockets and a real transceiver process: ``python -m transceiver --agent pipeline
--media-path lean`` (offline providers: pocketsphinx hears, piper speaks) behind
``test_lean_media.LossyRelay``, which drops 5 % of the SRTP/SRTCP datagrams in each direction
(seeded, one generator per direction). An aiortc Realtime client whose encoder sends in-band
FEC as a browser's does asks a spoken question; the turn must complete, the question must be
recognised (its key word in the transcript), the answer must reach the client, and the
transceiver must have seen losses and rebuilt or concealed every one (FEC, else PLC).

How many losses FEC rebuilds is not asserted here: most of the caller's packets are the
silence around the question, which carries no FEC (seen: 19 lost, 2 rebuilt from FEC, 17
concealed); tests/test_lean_media.py asserts FEC recovery with a steady tone.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from lean_stack import lean_stack
from test_lean_media import LossyRelay, client_sends_fec

from deploy.processes import Address, metric_values
from loadtest.realtime_client import RealtimeClient, connected, silence, speak
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech

pytestmark = pytest.mark.slow
LOSS = 0.05
TURN_TIMEOUT_S = 60.0
EVENTS = "transceiver_lean_media_events_total"
__all__ = ["client_sends_fec"]  # the fixture, imported to be used here


def lossy(link: Address, keys: str) -> LossyRelay:
    """A relay that loses ``LOSS`` of the media each way."""
    return LossyRelay(link, keys, LOSS)


@pytest.fixture
async def question() -> bytes:
    """The spoken question, made before the call."""
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        return await speak(tts, "Tell me about coffee.") + silence(600)
    finally:
        await tts.aclose()


async def lean_events(base_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=10) as http:
        return metric_values((await http.get(base_url + "/metrics")).text, EVENTS)


async def test_a_spoken_turn_through_five_percent_loss_both_ways_is_recognised(
    tmp_path: Path, question: bytes, client_sends_fec: None
) -> None:
    async with (
        lean_stack(tmp_path, lossy) as lean,
        connected(lean.base_url) as client,
    ):
        # The pipeline hears at 16 kHz: the answer asks the caller to code no wider.
        assert ";maxplaybackrate=16000;" in client.pc.remoteDescription.sdp
        await answered(client, question)
        events = await lean_events(lean.base_url)
    dropped = (lean.relay.dropped_from_client, lean.relay.dropped_to_client)
    print(f"dropped (from the client, to it): {dropped}; the transceiver's lean media: {events}")
    assert min(dropped) >= 2, dropped
    assert events["rtp_in"] > 0 and events["rtp_out"] > 0, events
    assert events["lost"] >= 2, events  # the transceiver saw the caller's losses...
    # ...and rebuilt (FEC) or concealed (PLC) each, or heard as the silence fed in a gap
    repaired = events["recovered_fec"] + events["concealed_plc"]
    assert repaired + events.get("lost_in_silence", 0) >= events["lost"], events
    assert events.get("decode_errors", 0) == 0 and events["srtp_rejected"] == 0, events


async def answered(client: RealtimeClient, question: bytes) -> None:
    start = len(client.events)
    heard_from = len(client.heard)
    client.mic.say(question)
    done = await client.wait_for("response.done", after=start, timeout_s=TURN_TIMEOUT_S)
    assert done["response"]["status"] == "completed", done
    completed = await client.wait_for(
        "conversation.item.input_audio_transcription.completed", after=start
    )
    assert "coffee" in re.findall(r"[a-z']+", completed["transcript"].lower()), completed
    await client.wait_for("output_audio_buffer.stopped", after=start, timeout_s=TURN_TIMEOUT_S)
    answer = client.heard[heard_from:]
    assert any(np.frombuffer(frame, np.int16).any() for frame in answer), "no answer was heard"
