"""A process's measured CPU, per call: what admission and the load gauge compare with a budget.

I/O-free policy over two injected clocks (wall and the process's own CPU time, all threads:
``time.process_time``). ``calls_changed`` is told every change of the number of calls, so the
meter integrates call-seconds exactly; a reading (``measure``) takes a sample at most every
``sample_s`` and compares the newest with the oldest one inside ``window_s``:

- ``cores``: CPU seconds per wall second over the window (1.0: one core busy);
- ``cores_per_call``: ``cores`` over the time-weighted mean number of calls in the window,
  known once that mean is ``MIN_MEAN_CALLS`` (a call that has just begun would otherwise carry
  the whole window's CPU: a second call was refused at "0.8 cores per call" on the aiortc
  path before this rule). The process's idle cost (its loops and timers) and each call's
  set-up (negotiation, DTLS) are counted in it, so at few calls the figure is pessimistic:
  admission errs towards refusing, never towards overloading.

Admission (``refusal``): with ``n`` calls running, one more is refused when ``cores_per_call x
(n + 1)`` would exceed ``budget_cores``. The first call is never refused by cost (nothing
measures a call's cost before there is one); a budget of 0 turns the rule off. The fixed
capacity (``TRANSCEIVER_CAPACITY``) stays the upper bound, checked by ``Calls``.

No task: samples are taken as readings come (every offer, readiness probe and scrape); a
reading after a long quiet spell spans that spell, which is still the truth about it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
MIN_SPAN_S = 1.0  # a window shorter than this says nothing yet
MIN_MEAN_CALLS = 0.5  # fewer calls on average in the window say nothing of a call's cost


@dataclass(frozen=True)
class CpuBudget:
    budget_cores: float = 0.85  # 0: no admission by measured cost
    window_s: float = 10.0
    sample_s: float = 0.5

    def __post_init__(self) -> None:
        if self.budget_cores < 0:
            raise ValueError(f"budget_cores must be >= 0, got {self.budget_cores}")
        if self.window_s < MIN_SPAN_S or not 0 < self.sample_s <= self.window_s:
            raise ValueError(
                f"window_s must be >= {MIN_SPAN_S} and sample_s within (0, window_s], got "
                f"{self.window_s}, {self.sample_s}"
            )


@dataclass(frozen=True)
class CpuReading:
    cores: float | None  # None until a window of MIN_SPAN_S is covered
    mean_calls: float
    cores_per_call: float | None  # None without calls in the window

    def projected_cores(self, calls: int) -> float | None:
        """The CPU ``calls`` calls would take at the measured cost per call."""
        return None if self.cores_per_call is None else self.cores_per_call * calls


class CpuMeter:
    def __init__(
        self,
        budget: CpuBudget,
        wall: Clock = time.monotonic,
        cpu: Clock = time.process_time,
    ) -> None:
        self.budget = budget
        self._wall, self._cpu = wall, cpu
        now_s = wall()
        self._calls = 0
        self._call_s = 0.0  # integral of the number of calls over wall time
        self._changed_at_s = now_s
        # (wall s, cpu s, call-seconds), oldest first
        self._samples: collections.deque[tuple[float, float, float]] = collections.deque()
        self._samples.append((now_s, cpu(), 0.0))

    def calls_changed(self, count: int) -> None:
        """The number of calls is now ``count``."""
        now_s = self._wall()
        self._call_s = self._call_seconds(now_s)
        self._changed_at_s = now_s
        self._calls = count

    def _call_seconds(self, now_s: float) -> float:
        return self._call_s + self._calls * (now_s - self._changed_at_s)

    def measure(self) -> CpuReading:
        now = self._sample()
        first = self._samples[0]
        span_s = now[0] - first[0]
        if span_s < MIN_SPAN_S:
            return CpuReading(None, float(self._calls), None)
        cores = max(0.0, now[1] - first[1]) / span_s
        mean_calls = (now[2] - first[2]) / span_s
        per_call = cores / mean_calls if mean_calls >= MIN_MEAN_CALLS else None
        return CpuReading(cores, mean_calls, per_call)

    def _sample(self) -> tuple[float, float, float]:
        """Now, kept as a sample when the newest is ``sample_s`` old; samples older than the
        window dropped, except the one that still anchors a window of ``MIN_SPAN_S``."""
        now_s = self._wall()
        now = (now_s, self._cpu(), self._call_seconds(now_s))
        if now_s - self._samples[-1][0] >= self.budget.sample_s:
            self._samples.append(now)
        horizon_s = now_s - self.budget.window_s
        while len(self._samples) > 1 and self._samples[1][0] <= horizon_s:
            self._samples.popleft()
        return now

    def refusal(self, calls: int) -> str | None:
        """Why one more call is refused by measured cost, or None."""
        if calls == 0 or self.budget.budget_cores == 0:
            return None
        reading = self.measure()
        projected = reading.projected_cores(calls + 1)
        if projected is None or projected <= self.budget.budget_cores:
            return None
        assert reading.cores_per_call is not None
        return (
            f"measured {reading.cores_per_call:.4f} cores per call: {calls + 1} calls would "
            f"take {projected:.3f} cores, over the budget of {self.budget.budget_cores} cores"
        )

    def load(self, calls: int, capacity: int) -> float:
        """The fraction of this process's room in use: the larger of calls over capacity and
        the measured CPU over the budget (1.0: no room for another call)."""
        by_count = calls / capacity
        reading = self.measure()
        if self.budget.budget_cores == 0 or reading.cores is None:
            return by_count
        return max(by_count, reading.cores / self.budget.budget_cores)
