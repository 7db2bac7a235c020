"""Keep a worker's owned task running: a crash is logged, counted and followed by a restart.

I/O layer (asyncio). ``run_restarting`` awaits the task's coroutine function again after each
crash (an exception other than cancellation), after a pause that grows from ``first_s`` to
``max_s`` and starts over once a run lasted ``healthy_after_s`` (``relay.timing.RestartPauses``,
from the relay's configuration). Each crash is logged with its
traceback and reported through ``crashed`` (the worker counts it in its shared counter row,
served as ``relay_task_crashes_total{task}``). The relay's owned tasks keep their state on the
worker (routes, admission, queue), so a new run carries on where the dead one stopped.

Readiness does not follow these crashes: a worker whose route-cache lookups keep failing still
forwards every known route, and one whose ticker died keeps forwarding on a stale clock until
the restart; pulling the relay out of the load balancer would cost its clients more. The
counter is how a task that keeps crashing is seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from relay.timing import RestartPauses

log = logging.getLogger(__name__)


async def run_restarting(
    name: str,
    run: Callable[[], Awaitable[None]],
    crashed: Callable[[], None],
    pauses: RestartPauses,
) -> None:
    """Await ``run()`` until it returns or this task is cancelled; restart it when it raises."""
    loop = asyncio.get_running_loop()
    in_a_row = 0
    while True:
        started_s = loop.time()
        try:
            await run()
            return
        except Exception:
            healthy = loop.time() - started_s >= pauses.healthy_after_s
            in_a_row = 1 if healthy else in_a_row + 1
            delay_s = pauses.delay_s(in_a_row)
            crashed()
            log.exception("%s crashed (%d in a row); restarting in %.1f s", name, in_a_row, delay_s)
        await asyncio.sleep(delay_s)
