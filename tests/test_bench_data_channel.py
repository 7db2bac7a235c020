"""loadtest.bench_data_channel runs: a voice turn's events reach a stock aiortc peer in a child
process through either SCTP transport, and the packet counts it reports are the transports'."""

from __future__ import annotations

import json

import pytest

from loadtest.bench_data_channel import MESSAGES_PER_TURN, bench, voice_turn


def test_a_voice_turn_is_its_events_in_bursts() -> None:
    bursts = voice_turn(3)
    kinds = [json.loads(message)["type"] for burst in bursts for message in burst]
    assert len(kinds) == MESSAGES_PER_TURN == 22
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert kinds[-2:] == ["response.done", "output_audio_buffer.stopped"]
    assert max(len(burst) for burst in bursts) == 6  # the answer's .done events together


@pytest.mark.asyncio
async def test_two_turns_through_each_transport() -> None:
    result = await bench(turns=2, rounds=1, gap_s=0.005)
    assert result["packets_per_turn"]["aiortc"] == MESSAGES_PER_TURN  # one a message
    assert result["packets_per_turn"]["bundling"] < MESSAGES_PER_TURN
    assert set(result["cpu_ms_per_turn"]) == {"aiortc", "bundling"}
