"""Event-loop stalls: how late each tick of a process's loop runs, and what blocked it.

I/O layer (an asyncio task and one watchdog thread), shared by the relay (its workers and its
supervisor) and the transceiver: the one piece of process plumbing both use, so it imports
nothing of ours and takes its histogram as a callback. A tick sleeps ``interval_s`` and hands
how late it woke up to ``observe`` (seconds). A watchdog thread watches the ticks: while one is
overdue by more than half of ``warn_s`` it snapshots the loop thread's stack
(``sys._current_frames``), so when the loop comes back and the tick finds itself late by more
than ``warn_s`` it logs a warning naming the innermost function the loop was in and that
stack. A stall the watchdog could not see (the blocker held the GIL throughout, in C code)
is still warned of, without a stack.

The relay's workers are processes: ``shared_observer`` counts a row of a shared array (one row
per process) and ``shared_histogram`` reads one back for the supervisor's ``/metrics``.

Cost: a tick every ``interval_s`` (50 ms: 20 wake-ups a second) and a thread that wakes every
``interval_s / 2`` to compare two floats.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass

BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STACK_FRAMES = 12  # frames of the blocked stack in a warning, innermost last


@dataclass(frozen=True)
class LoopLagPolicy:
    interval_s: float = 0.05
    warn_s: float = 0.1  # a tick this late is a stall: warned of, with what blocked the loop

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.warn_s <= 0:
            raise ValueError(f"loop lag: interval and warning threshold must be > 0, got {self}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], prefix: str) -> LoopLagPolicy:
        """``<prefix>LOOP_LAG_WARN_MS`` (default 100); a bad value names the variable."""
        name = f"{prefix}LOOP_LAG_WARN_MS"
        text = environ.get(name, "100").strip()
        try:
            warn_ms = float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a number") from None
        if not warn_ms > 0:
            raise ValueError(f"{name}={text} must be above 0")
        return cls(warn_s=warn_ms / 1000)


@dataclass(frozen=True)
class Blocked:
    """What the loop thread was doing while a tick was overdue."""

    function: str  # the innermost frame: name (file:line)
    stack: str


class LoopLagMonitor:
    """Ticks on the running loop; ``start()`` in a coroutine, ``aclose()`` to stop."""

    def __init__(
        self,
        policy: LoopLagPolicy,
        observe: Callable[[float], None],
        logger: logging.Logger,
        name: str = "event loop",
    ) -> None:
        self.policy = policy
        self._observe = observe
        self._log = logger
        self.name = name
        self.stalls = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = 0
        self._due = 0.0  # monotonic time the current tick should run by (0: not sleeping)
        self._blocked: Blocked | None = None
        self._lock = threading.Lock()

    async def __aenter__(self) -> LoopLagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop lag")
        self._task.add_done_callback(self._ended)
        self._thread = threading.Thread(target=self._watch, name="loop-lag-watchdog", daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 1.0)
            self._thread = None

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error("%s lag monitor crashed; stalls go unseen", self.name, exc_info=error)

    async def _tick(self) -> None:
        interval_s = self.policy.interval_s
        while True:
            with self._lock:
                self._due, self._blocked = time.monotonic() + interval_s, None
            await asyncio.sleep(interval_s)
            late_s = max(0.0, time.monotonic() - self._due)
            with self._lock:
                blocked, self._due = self._blocked, 0.0
            self._observe(late_s)
            if late_s > self.policy.warn_s:
                self._stalled(late_s, blocked)

    def _stalled(self, late_s: float, blocked: Blocked | None) -> None:
        self.stalls += 1
        if blocked is None:
            self._log.warning(
                "%s blocked for %.0f ms (pid %d); no stack seen (the blocker held the GIL)",
                self.name, late_s * 1000, os.getpid(),
            )  # fmt: skip
            return
        self._log.warning(
            "%s blocked for %.0f ms (pid %d) in %s; the loop thread's stack:\n%s",
            self.name, late_s * 1000, os.getpid(), blocked.function, blocked.stack,
        )  # fmt: skip

    def _watch(self) -> None:
        """The watchdog thread: snapshot the loop thread's stack while a tick is overdue."""
        check_s = self.policy.interval_s / 2
        threshold_s = self.policy.warn_s / 2
        while not self._stop.wait(check_s):
            with self._lock:
                due, seen = self._due, self._blocked
            if due and seen is None and time.monotonic() - due > threshold_s:
                blocked = self._snapshot()
                with self._lock:
                    if self._due == due:  # still the same overdue tick
                        self._blocked = blocked

    def _snapshot(self) -> Blocked | None:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return None
        summary = traceback.extract_stack(frame)[-STACK_FRAMES:]
        inner = summary[-1]
        where = f"{inner.name} ({os.path.basename(inner.filename)}:{inner.lineno})"
        return Blocked(where, "".join(traceback.format_list(summary)).rstrip())


# --- a histogram in shared memory (the relay's workers are processes) --------------------------

SHARED_ROW = len(BUCKETS_S) + 2  # a count per bucket, the overflow (+Inf), the sum in microseconds


def shared_observer(shared: MutableSequence[int], row: int) -> Callable[[float], None]:
    """``observe`` for one process's row of a shared uint64 array (that process alone writes
    it; a reader may see one tick's counts a moment before its sum)."""
    base = row * SHARED_ROW

    def observe(late_s: float) -> None:
        index = bisect.bisect_left(BUCKETS_S, late_s)
        shared[base + index] += 1
        shared[base + SHARED_ROW - 1] += round(late_s * 1_000_000)

    return observe


def shared_histogram(shared: Sequence[int], row: int) -> tuple[list[tuple[str, float]], float]:
    """One row as Prometheus wants it: cumulative ``(le, count)`` buckets ending with +Inf,
    and the sum in seconds."""
    base = row * SHARED_ROW
    buckets, total = [], 0
    for index, bound in enumerate((*BUCKETS_S, float("inf"))):
        total += shared[base + index]
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return buckets, shared[base + SHARED_ROW - 1] / 1_000_000
