"""One owned background task per object: ``start()`` spawns ``_run()``, ``aclose()`` ends it.

I/O support for the Redis-facing loops (lease heartbeat, write-behind flusher, catch-up, Redis
health check, route publishing). ``aclose`` sets ``_closing`` as well as cancelling: redis-py
8.1 can swallow a cancellation that lands while a pipeline hands back its connection (redis-py
issues #2028, #2551), so every ``_run`` loop also checks the flag and ends on its own.

A loop that crashes (``_run`` raises) is never lost silently: the crash is logged with its
traceback, counted in ``crash_counts`` (served as ``transceiver_task_crashes_total{task}``) and
the loop is started again after a pause that grows and starts over as its ``RestartPolicy``
(``transceiver.restarts``, given to the loop's constructor) says. Restarting is
right for every loop here: each keeps its state (held leases, queued writes, pending routes) on
the object, not in the task, and each pass is idempotent, so a new run picks up where the dead
one stopped. A loop that keeps crashing (the policy's ``failing_after_crashes`` in a row) is
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
from collections.abc import Awaitable
from typing import Self

from transceiver.restarts import RestartPolicy

log = logging.getLogger(__name__)

# Process-wide, by task name; only grows (a Prometheus counter reads it at scrape time).
crash_counts: collections.Counter[str] = collections.Counter()


def report_crash(task_name: str, error: BaseException, logger: logging.Logger, then: str) -> None:
    """Log an owned task's crash with its traceback and count it under ``task_name`` (a label
    of few values: never a session id); ``then`` says what happens next."""
    crash_counts[task_name] += 1
    logger.error("%s crashed; %s", task_name, then, exc_info=error)


async def done_within(awaitable: Awaitable[object], timeout_s: float) -> bool:
    """Await ``awaitable`` for at most ``timeout_s``; whether it finished (a queue drained)."""
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        return False
    return True


class RestartBackoff:
    """Pure: the pause before restarting a crashed loop, given how long its run lasted."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.in_a_row = 0

    def crashed(self, ran_s: float) -> float:
        """Record a crash after a run of ``ran_s``; the seconds to wait before the next run."""
        if ran_s >= self.policy.healthy_after_s:
            self.in_a_row = 0
        self.in_a_row += 1
        return min(self.policy.max_s, self.policy.first_s * 2.0 ** (self.in_a_row - 1))


class BackgroundLoop:
    task_name = "background loop"
    # Whether a loop that keeps crashing turns /readyz red; subclasses say why they choose.
    unready_when_failing = False

    def __init__(self, restarts: RestartPolicy | None = None) -> None:
        """``restarts``: how this loop is restarted after a crash (``None``: the defaults)."""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.backoff = RestartBackoff(restarts or RestartPolicy())
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
        """Crashed ``failing_after_crashes`` times in a row and not yet running healthy."""
        if self.backoff.in_a_row < self.backoff.policy.failing_after_crashes:
            return False
        ran_s = asyncio.get_running_loop().time() - self._run_started_s
        return ran_s < self.backoff.policy.healthy_after_s

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
