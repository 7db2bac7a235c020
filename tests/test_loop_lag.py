"""The event-loop lag monitor (``relay.loop_lag``): a loop blocked for 200 ms by a named
function shows in the lag histogram and in a warning that names that function; the relay's
shared-memory histogram reads back what its processes counted. (The served metrics of a real
transceiver and relay: tests/test_call_records.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array

import pytest
from prometheus_client import CollectorRegistry, Histogram

from deploy.waiting import eventually
from relay.loop_lag import (
    BUCKETS_S,
    SHARED_ROW,
    LoopLagMonitor,
    LoopLagPolicy,
    shared_histogram,
    shared_observer,
)


def block_the_loop_for_200_ms() -> None:
    time.sleep(0.2)  # what a blocking call in a coroutine does to every call on the loop


async def test_a_blocked_loop_is_measured_and_the_warning_names_the_blocker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "test", buckets=BUCKETS_S, registry=registry)
    logger = logging.getLogger("test.loop_lag")
    policy = LoopLagPolicy(interval_s=0.05, warn_s=0.1)
    with caplog.at_level(logging.WARNING, logger="test.loop_lag"):
        async with LoopLagMonitor(policy, lag.observe, logger, "test loop") as monitor:
            await asyncio.sleep(0.12)  # a few healthy ticks first
            block_the_loop_for_200_ms()
            await eventually(lambda: monitor.stalls >= 1, 5, "the stall to be seen")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "test loop blocked for" in warnings[0]
    assert "in block_the_loop_for_200_ms (test_loop_lag.py:" in warnings[0]
    assert "time.sleep(0.2)" in warnings[0]  # the stack, down to the blocking line
    over = registry.get_sample_value("lag_seconds_bucket", {"le": "+Inf"}) or 0
    under = registry.get_sample_value("lag_seconds_bucket", {"le": "0.1"}) or 0
    assert over - under == 1  # the one stall is past the threshold
    assert under >= 1  # the healthy ticks are counted too


def test_the_shared_histogram_reads_back_what_each_process_counted() -> None:
    shared = array("Q", [0] * 3 * SHARED_ROW)
    worker = shared_observer(shared, 2)
    for late_s in (0.0004, 0.003, 0.003, 0.3, 9.0):
        worker(late_s)
    buckets, total_s = shared_histogram(shared, 2)
    assert dict(buckets)["0.001"] == 1 and dict(buckets)["0.005"] == 3
    assert dict(buckets)["0.25"] == 3 and dict(buckets)["0.5"] == 4
    assert buckets[-1] == ("+Inf", 5.0)
    assert total_s == pytest.approx(9.3064)
    assert shared_histogram(shared, 1) == ([(b, 0.0) for b, _ in buckets], 0.0)


def test_the_threshold_comes_from_the_environment_and_a_bad_one_is_named() -> None:
    assert LoopLagPolicy.from_env({"RELAY_LOOP_LAG_WARN_MS": "250"}, "RELAY_").warn_s == 0.25
    assert LoopLagPolicy.from_env({}, "RELAY_").warn_s == 0.1
    with pytest.raises(ValueError, match="RELAY_LOOP_LAG_WARN_MS"):
        LoopLagPolicy.from_env({"RELAY_LOOP_LAG_WARN_MS": "soon"}, "RELAY_")
