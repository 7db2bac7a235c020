"""Keep a worker's owned task running: a crash is logged, counted and followed by a restart.

I/O layer (asyncio). ``run_restarting`` awaits the task's coroutine function again after each
crash (an exception other than cancellation), after a pause that grows from ``FIRST_S`` to
``MAX_S`` and starts over once a run lasted ``HEALTHY_AFTER_S``. Each crash is logged with its
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

log = logging.getLogger(__name__)
FIRST_S = 0.5
MAX_S = 30.0
HEALTHY_AFTER_S = 60.0


async def run_restarting(
    name: str, run: Callable[[], Awaitable[None]], crashed: Callable[[], None]
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
            in_a_row = 1 if loop.time() - started_s >= HEALTHY_AFTER_S else in_a_row + 1
            delay_s = min(MAX_S, FIRST_S * 2.0 ** (in_a_row - 1))
            crashed()
            log.exception("%s crashed (%d in a row); restarting in %.1f s", name, in_a_row, delay_s)
        await asyncio.sleep(delay_s)
