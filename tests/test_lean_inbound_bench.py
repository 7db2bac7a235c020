"""``loadtest.lean_inbound`` runs: one short round measures every stage of the inbound path,
every packet having gone through the lean path into the engine (the run refuses otherwise),
and a bad setting is refused with what was wrong."""

from __future__ import annotations

import pytest

from loadtest import lean_inbound


def test_a_short_round_measures_every_stage() -> None:
    result = lean_inbound.run_lean_inbound_bench(rounds=1, seconds=2.0, batch=3)
    assert result["rounds"] == 1 and result["packets"] >= 90, result
    stages = result["stages"]
    assert set(stages) == {
        lean_inbound.REFERENCE,
        "srtp unprotect",
        "engine.push_audio",
        lean_inbound.WHOLE,
        "whole path, no codec nor engine",
        "python around them",
        "from the link socket",
        "link, recvmmsg and demux",
    }
    assert stages[lean_inbound.REFERENCE]["ratio"] == 1.0
    for name in (lean_inbound.REFERENCE, lean_inbound.WHOLE, "from the link socket"):
        assert stages[name]["us_per_packet"] > 0, (name, stages)
    assert len(result["load"].split()) == 5


@pytest.mark.parametrize(
    ("rounds", "seconds", "batch"), [(0, 1.0, 4), (1, 0.0, 4), (1, 1.0, 0), (1, 1.0, 65)]
)
def test_bad_settings_are_refused(rounds: int, seconds: float, batch: int) -> None:
    with pytest.raises(ValueError, match="rounds >= 1, seconds > 0, batch 1-64"):
        lean_inbound.run_lean_inbound_bench(rounds, seconds, batch)
