"""loadtest.bench_turn_replay: a spoken question played into the offline engine in real time
comes back as one turn whose decision and server window are read from its record."""

from __future__ import annotations

from loadtest.bench_turn_replay import replay, summary


async def test_a_replayed_question_is_one_timed_turn() -> None:
    rows = await replay(1, ["Tell me about coffee."])
    assert len(rows) == 1, rows
    (turn,) = rows
    assert "coffee" in turn["transcript"].lower(), turn
    assert turn["decided_ms"] is not None and turn["decided_ms"] >= 0, turn
    assert turn["window_ms"] is not None and turn["window_ms"] >= 0, turn
    report = summary(rows)
    assert report["turns"] == 1 and report["decided_median_ms"] == turn["decided_ms"]
