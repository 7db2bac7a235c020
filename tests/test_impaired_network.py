"""A spoken two-turn call through a bad network, under each of issue 17's conditions alone.

The client, an aiortc Realtime peer, lives in a network namespace of its own, joined to the
host by a veth pair (``loadtest.impairment``); the relay (a real one, one worker) and a pipeline
transceiver with the offline defaults run on the host, reached at the veth's host address
(``loadtest.impaired_call``). On the client's UDP, both directions: 5 % random loss
(nftables), 40 ± 8 ms of delay (netfilter's queue, read by ``loadtest.delay_queue``), or a
300 ms outage mid-answer. Each call asks two spoken questions; each turn must complete, the
question must be recognised (its key word in the transcript), and the answer the client heard
must be recognised again by pocketsphinx (two of the answer's words). The condition must have
hit the call: datagrams dropped or held, in both directions.

One stack serves every condition; each condition is a new call. The transceiver carries media
on the path the rest of the suite uses (``TRANSCEIVER_MEDIA_PATH``, else the default): the
test prints the lean path's losses, FEC recoveries and PLC concealments when it runs there.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import fields

import aiortc.rtcrtpreceiver
import numpy as np
import pytest
import pytest_asyncio
from aiortc.jitterbuffer import JitterBuffer
from test_lean_media import client_sends_fec

from loadtest.impaired_call import ImpairedStack, impaired_stack, spoken_turn
from loadtest.impairment import CONDITIONS, Impairment, nft_available
from loadtest.realtime_client import RATE_HZ, hear, silence, speak
from loadtest.voice_audio import voiced
from pipeline.config import PocketsphinxConfig
from pipeline.piper_tts import PiperTextToSpeech
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from transceiver.config import TransceiverConfig

UNAVAILABLE = nft_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
]
DEFAULT_PATH = str(next(f.default for f in fields(TransceiverConfig) if f.name == "media_path"))
SUITE_PATH = os.environ.get("TRANSCEIVER_MEDIA_PATH") or DEFAULT_PATH  # the rest of the suite's
RECOGNISED_TIMEOUT_S = 60.0  # a loaded machine decodes ten seconds of answer slowly
module_fixture = pytest_asyncio.fixture(loop_scope="module", scope="module")
__all__ = ["client_sends_fec"]  # the fixture, imported to be used here

# (question, a word its transcript must hold, words of the rule-based agent's answer)
TURNS = (
    ("Tell me about coffee.", "coffee", {"coffee", "beans", "plant", "people", "awake", "roasted"}),
    ("Tell me about the moon.", "moon",
     {"moon", "thousand", "kilometres", "earth", "days", "air", "weather", "around"}),
)  # fmt: skip


@module_fixture
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ImpairedStack]:
    log_dir = tmp_path_factory.mktemp("impaired")
    async with impaired_stack(log_dir, media_path=SUITE_PATH) as running:
        yield running


@module_fixture
async def questions(piper: PiperTextToSpeech) -> list[bytes]:
    return [await speak(piper, words) + silence(600) for words, _, _ in TURNS]


@module_fixture
async def sphinx() -> AsyncIterator[PocketsphinxSpeechToText]:
    stt = PocketsphinxSpeechToText(PocketsphinxConfig(final_timeout_s=RECOGNISED_TIMEOUT_S))
    await stt.start()
    yield stt
    await stt.aclose()


@pytest.fixture
def client_skips_lost_packets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The aiortc client's audio jitter buffer as a browser's: a lost packet is given up once
    three later ones are in (60 ms), and one frame is enough to play. aiortc's own (16 slots,
    4 prefetched) waits for 15 later packets, then holds them: 300 ms of every answer's end
    stay in it while a sender is quiet between talkspurts, as the lean path is, so the turn's
    last words were never heard (seen: 3.5 of 5.8 s heard at 5 % loss)."""

    def jitter_buffer(capacity: int, prefetch: int = 0, is_video: bool = False) -> JitterBuffer:
        if is_video:
            return JitterBuffer(capacity, prefetch, is_video)
        return JitterBuffer(capacity=4, prefetch=1)

    monkeypatch.setattr(aiortc.rtcrtpreceiver, "JitterBuffer", jitter_buffer)


@pytest.mark.parametrize("impairment", CONDITIONS, ids=lambda c: c.name.split()[0])
async def test_a_spoken_two_turn_call_is_understood_both_ways_through_the_condition(
    stack: ImpairedStack,
    impairment: Impairment,
    questions: list[bytes],
    sphinx: PocketsphinxSpeechToText,
    client_sends_fec: None,
    client_skips_lost_packets: None,
) -> None:
    await stack.path.apply(impairment)
    async with stack.call() as (netns, client):
        for question, (_, asked, answer_words) in zip(questions, TURNS, strict=True):
            turn = await spoken_turn(stack, netns, client, question)
            assert turn.done["response"]["status"] == "completed", turn.done
            assert asked in turn.question["transcript"].split(), turn.question
            words = await hear(sphinx, voiced_pcm(turn.heard))
            assert len(answer_words & set(words)) >= 2, (impairment.name, words)
    hits = await stack.path.hits()
    print(f"{impairment.name}: {hits}; lean media: {await stack.lean_events()}")
    assert hits.to_host >= 1 and hits.from_host >= 1, hits


def voiced_pcm(heard: bytes) -> bytes:
    """The answer in what the client heard: the silence before and after it cut off."""
    samples = np.frombuffer(heard, np.int16).astype(np.float32) / 32768
    return (voiced(samples, RATE_HZ) * 32767).astype("<i2").tobytes()
