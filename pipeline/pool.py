"""The process's pool for the offline pipeline's heavy stages, and how loaded it is.

I/O layer (threads). One ``PipelinePool`` per process, shared by every call of it: ``size``
slots per heavy stage (default: the cores this process may run on), i.e. ``size`` pocketsphinx
decoder processes (``pipeline.pocketsphinx_stt``) and ``size`` synthesis threads (``executor``,
used by ``pipeline.piper_tts``). Each stage counts its jobs in a ``StageLoad``: how many run,
how many wait, and how long each waited for a slot.

Back-pressure: ``saturation()`` names the reason the pool cannot take one more call, or None.
The pool is saturated while

* a job has waited (or is still waiting) longer than ``max_wait_s`` within the last
  ``window_s``: waiting is what a caller hears as a slower answer, whatever the job's size
  (a 20 ms frame and a whole sentence weigh the same in a depth, not in a wait); or
* more than ``max_queue`` jobs wait right now: a burst is seen before any of its jobs has
  waited long.

Transceivers refuse new calls (503) and turn their readiness red while it is; the calls
already in progress go on (their jobs still queue and run).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from pipeline.config import PoolPolicy
from pipeline.speech_cache import SpeechCache
from pipeline.thread_names import named_executor

# (stage, seconds a job waited for a slot)
WaitObserver = Callable[[str, float], None]


class StageLoad:
    """One stage's jobs: waiting (since when), running, and recent waits. Thread-safe: jobs
    are queued on the event loop and may start on a pool thread."""

    def __init__(self, stage: str, slots: int, clock: Callable[[], float] = time.monotonic):
        self.stage = stage
        self.slots = slots
        self.busy = 0
        self.jobs = 0
        self.observers: list[WaitObserver] = []
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: dict[int, float] = {}
        self._ids = itertools.count()
        self._recent: deque[tuple[float, float]] = deque()  # (started at, waited)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def queued(self) -> int:
        """A job waits for a slot from now; returns its ticket for ``started``."""
        with self._lock:
            ticket = next(self._ids)
            self._waiting[ticket] = self._clock()
            return ticket

    def started(self, ticket: int) -> float:
        """The job got its slot; returns how long it waited."""
        with self._lock:
            now = self._clock()
            waited = now - self._waiting.pop(ticket)
            self.busy += 1
            self.jobs += 1
            self._recent.append((now, waited))
        for observe in self.observers:
            observe(self.stage, waited)
        return waited

    def abandoned(self, ticket: int) -> None:
        """The job stopped waiting without a slot (its caller went away)."""
        with self._lock:
            self._waiting.pop(ticket, None)

    def finished(self) -> None:
        with self._lock:
            self.busy -= 1

    def longest_wait_s(self, window_s: float) -> float:
        """The longest wait of a job started within ``window_s``, or of one still waiting."""
        with self._lock:
            now = self._clock()
            while self._recent and now - self._recent[0][0] > window_s:
                self._recent.popleft()
            waited = max((w for _, w in self._recent), default=0.0)
            oldest = min(self._waiting.values(), default=now)
            return max(waited, now - oldest)


class PipelinePool:
    def __init__(
        self, policy: PoolPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = (policy or PoolPolicy()).resolved()
        self.size = self.policy.size
        self.stt = StageLoad("stt", self.size, clock)
        self.tts = StageLoad("tts", self.size, clock)
        self.stages = (self.stt, self.tts)
        self.executor = named_executor(self.size, "pipeline-pool")
        self.speech_cache: SpeechCache | None = None  # the TTS's, when it keeps speech (piper)

    def observe_waits(self, observer: WaitObserver) -> None:
        for stage in self.stages:
            stage.observers.append(observer)

    def saturation(self) -> str | None:
        """Why the pool cannot take another call now (a sentence), or None."""
        policy = self.policy
        for stage in self.stages:
            waited = stage.longest_wait_s(policy.window_s)
            if waited > policy.max_wait_s:
                return (
                    f"{stage.stage} jobs waited {waited:.2f} s for a slot "
                    f"(over {policy.max_wait_s:.2f} s)"
                )
            if stage.queue_depth > policy.max_queue:
                return (
                    f"{stage.queue_depth} {stage.stage} jobs wait for a slot "
                    f"(over {policy.max_queue})"
                )
        return None

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
