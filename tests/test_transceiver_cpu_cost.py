"""transceiver.cpu_cost: CPU per call from the process's own CPU time, and admission by it."""

from __future__ import annotations

import pytest

from transceiver.cpu_cost import CpuBudget, CpuMeter


class Clocks:
    """A wall clock and a CPU clock the test moves."""

    def __init__(self) -> None:
        self.wall_s = 100.0
        self.cpu_s = 5.0

    def run(self, wall_s: float, cores: float) -> None:
        self.wall_s += wall_s
        self.cpu_s += wall_s * cores


def meter(clocks: Clocks, budget_cores: float = 0.85, window_s: float = 10.0) -> CpuMeter:
    budget = CpuBudget(budget_cores, window_s, sample_s=0.5)
    return CpuMeter(budget, lambda: clocks.wall_s, lambda: clocks.cpu_s)


def test_nothing_is_measured_before_a_second_has_passed() -> None:
    clocks = Clocks()
    cpu = meter(clocks)
    clocks.run(0.5, cores=0.3)
    reading = cpu.measure()
    assert reading.cores is None and reading.cores_per_call is None


def test_cores_and_cost_per_call_over_the_window() -> None:
    clocks = Clocks()
    cpu = meter(clocks, window_s=4.0)
    cpu.calls_changed(4)
    for _ in range(8):
        clocks.run(0.5, cores=0.2)
        cpu.measure()
    reading = cpu.measure()
    assert reading.cores == pytest.approx(0.2)
    assert reading.mean_calls == pytest.approx(4.0)
    assert reading.cores_per_call == pytest.approx(0.05)


def test_the_window_forgets_what_came_before_it() -> None:
    clocks = Clocks()
    cpu = meter(clocks, window_s=2.0)
    cpu.calls_changed(1)
    for _ in range(20):  # 10 s at 0.9 cores: long gone after the next 3 s
        clocks.run(0.5, cores=0.9)
        cpu.measure()
    cpu.calls_changed(2)
    for _ in range(6):
        clocks.run(0.5, cores=0.1)
        cpu.measure()
    reading = cpu.measure()
    assert reading.cores == pytest.approx(0.1)
    assert reading.cores_per_call == pytest.approx(0.05)


def test_mean_calls_is_time_weighted() -> None:
    clocks = Clocks()
    cpu = meter(clocks, window_s=10.0)
    cpu.measure()
    clocks.run(1.0, cores=0.0)
    cpu.calls_changed(3)  # 3 calls for the second half of two seconds
    clocks.run(1.0, cores=0.3)
    reading = cpu.measure()
    assert reading.mean_calls == pytest.approx(1.5)
    assert reading.cores_per_call == pytest.approx(0.15 / 1.5)


def test_a_call_is_refused_when_one_more_would_exceed_the_budget() -> None:
    clocks = Clocks()
    cpu = meter(clocks, budget_cores=0.5)
    cpu.calls_changed(4)
    for _ in range(4):
        clocks.run(0.5, cores=0.4)  # 0.1 core per call
        cpu.measure()
    assert cpu.refusal(3) is None  # 4 x 0.1 = 0.4: within the budget
    refused = cpu.refusal(5)
    assert refused is not None and "6 calls would take 0.600 cores" in refused
    assert "budget of 0.5 cores" in refused
    assert cpu.load(4, capacity=100) == pytest.approx(0.8)  # 0.4 of 0.5 cores


def test_the_first_call_and_a_zero_budget_are_never_refused_by_cost() -> None:
    clocks = Clocks()
    cpu = meter(clocks, budget_cores=0.001)
    clocks.run(2.0, cores=0.5)  # busy with no call at all
    assert cpu.refusal(0) is None
    off = meter(clocks, budget_cores=0.0)
    off.calls_changed(3)
    clocks.run(2.0, cores=1.0)
    assert off.refusal(3) is None
    assert off.load(3, capacity=4) == pytest.approx(0.75)  # by count alone


def test_a_call_just_begun_says_nothing_of_its_cost() -> None:
    """One call for the last 2 s of a 10 s window: a mean of 0.2 calls, too few to divide by
    (the window's CPU would all be charged to it)."""
    clocks = Clocks()
    cpu = meter(clocks, budget_cores=0.5, window_s=10.0)
    for _ in range(16):
        clocks.run(0.5, cores=0.05)
        cpu.measure()
    cpu.calls_changed(1)
    clocks.run(2.0, cores=0.1)
    reading = cpu.measure()
    assert reading.mean_calls == pytest.approx(0.2) and reading.cores_per_call is None
    assert cpu.refusal(1) is None


def test_load_is_the_count_until_cpu_is_measured() -> None:
    clocks = Clocks()
    assert meter(clocks).load(25, capacity=100) == pytest.approx(0.25)


def test_a_budget_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="budget_cores must be >= 0"):
        CpuBudget(-1.0)
    with pytest.raises(ValueError, match="window_s must be >= 1.0"):
        CpuBudget(0.85, window_s=0.5)
