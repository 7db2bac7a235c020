"""loadtest.answer_audio: an answer's audio from the speech's pieces to SRTP packets, measured
by stage; the frames the lean tick takes are the speech's PCM, to the bit."""

from __future__ import annotations

import pytest

from loadtest import answer_audio


def test_every_calls_answer_leaves_as_spoken_and_each_stage_is_measured() -> None:
    result = answer_audio.measure(calls=2, words=10)
    assert result["bit_exact"], "the PCM the tick took is not the speech's"
    assert result["answer_s"] == pytest.approx(2 * 1.0)  # 10 words, 0.1 s each, both calls
    assert result["frames"] == {"read": 2 * 50, "taken": 2 * 50}
    assert result["rtp_packets"] > 2 * 50  # every frame, and each talkspurt's end
    stages = result["ms_per_answer_s"]
    assert set(stages) == {
        "all", "tick", "session", "engine and loop", "opus encode alone"
    }  # fmt: skip
    assert all(ms > 0 for ms in stages.values()), stages
    assert len(result["load"]) == 2


def test_the_quick_bench_figures_are_there() -> None:
    metrics = answer_audio.bench_metrics(quick=True)
    assert metrics["PCM taken as spoken"] is True
    assert metrics["runs"] == 1 and metrics["calls"] == 2
    assert metrics["engine and loop: / opus encode"] > 0
    assert metrics["opus encode alone: / opus encode"] == pytest.approx(1.0)
    target = f"target: engine and loop <= {answer_audio.TARGET_RATIO}x opus encode"
    assert metrics[target] in {"met", "missed"}


@pytest.mark.parametrize("flag", ["--calls", "--words", "--runs"])
def test_a_count_below_one_is_refused_by_name(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        answer_audio.main([flag, "0"])
    assert exited.value.code == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
