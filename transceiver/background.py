"""One owned background task per object: ``start()`` spawns ``_run()``, ``aclose()`` ends it.

I/O support for the Redis-facing loops (lease heartbeat, write-behind flusher, catch-up, Redis
health check, route publishing). ``aclose`` sets ``_closing`` as well as cancelling: redis-py
8.1 can swallow a cancellation that lands while a pipeline hands back its connection (redis-py
issues #2028, #2551), so every ``_run`` loop also checks the flag and ends on its own.

A loop that crashes (``_run`` raises) is never lost silently: the crash is logged with its
traceback, counted in ``crash_counts`` (served as ``transceiver_task_crashes_total{task}``) and
the loop is started again after a pause that grows from ``RESTART_FIRST_S`` to
``RESTART_MAX_S`` and starts over once a run has lasted ``HEALTHY_AFTER_S``. Restarting is
right for every loop here: each keeps its state (held leases, queued writes, pending routes) on
the object, not in the task, and each pass is idempotent, so a new run picks up where the dead
one stopped. A loop that keeps crashing (``FAILING_AFTER_CRASHES`` in a row, none healthy) is
``failing``; whether that turns ``/readyz`` red is each loop's ``unready_when_failing``,
decided (with the reason) on the subclass.

An owned task that is not restarted (a session's tasks: their owner ends what they served)
reports its crash with ``report_crash``: the same log line with its traceback and the same
counter.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Self

log = logging.getLogger(__name__)
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0  # a run this long resets the pause and the crash streak
FAILING_AFTER_CRASHES = 3

# Process-wide, by task name; only grows (a Prometheus counter reads it at scrape time).
crash_counts: collections.Counter[str] = collections.Counter()


def report_crash(task_name: str, error: BaseException, logger: logging.Logger, then: str) -> None:
    """Log an owned task's crash with its traceback and count it under ``task_name`` (a label
    of few values: never a session id); ``then`` says what happens next."""
    crash_counts[task_name] += 1
    logger.error("%s crashed; %s", task_name, then, exc_info=error)


class RestartBackoff:
    """Pure: the pause before restarting a crashed loop, given how long its run lasted."""

    def __init__(
        self,
        first_s: float = RESTART_FIRST_S,
        max_s: float = RESTART_MAX_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.healthy_after_s = healthy_after_s
        self.in_a_row = 0

    def crashed(self, ran_s: float) -> float:
        """Record a crash after a run of ``ran_s``; the seconds to wait before the next run."""
        if ran_s >= self.healthy_after_s:
            self.in_a_row = 0
        self.in_a_row += 1
        return min(self.max_s, self.first_s * 2.0 ** (self.in_a_row - 1))


class BackgroundLoop:
    task_name = "background loop"
    # Whether a loop that keeps crashing turns /readyz red; subclasses say why they choose.
    unready_when_failing = False

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.backoff = RestartBackoff()
        self._run_started_s = 0.0

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._supervise(), name=self.task_name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._closing = True
            self._wake()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def failing(self) -> bool:
        """Crashed ``FAILING_AFTER_CRASHES`` times in a row and not yet running healthy."""
        if self.backoff.in_a_row < FAILING_AFTER_CRASHES:
            return False
        ran_s = asyncio.get_running_loop().time() - self._run_started_s
        return ran_s < self.backoff.healthy_after_s

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._run_started_s = loop.time()
            try:
                await self._run()
                return
            except Exception as error:  # a bug or an unforeseen error: seen, counted, restarted
                if self._closing:
                    log.error("%s failed while closing", self.task_name, exc_info=error)
                    return
                await asyncio.sleep(self._crashed(error, loop.time() - self._run_started_s))

    def _crashed(self, error: Exception, ran_s: float) -> float:
        delay_s = self.backoff.crashed(ran_s)
        crash_counts[self.task_name] += 1
        log.error(
            "%s crashed (%d in a row); restarting in %.1f s",
            self.task_name, self.backoff.in_a_row, delay_s, exc_info=error,
        )  # fmt: skip
        return delay_s

    def _wake(self) -> None:
        """Hook: nudge a loop that waits on an event, so it sees ``_closing`` at once."""

    async def _run(self) -> None:
        raise NotImplementedError
