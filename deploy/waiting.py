"""Waiting for a condition with a deadline: the one way the tests, the benchmarks and the
deployment helpers wait (no sleep stands in for synchronisation).

- ``eventually`` polls a check (a plain function or a coroutine function) on the running loop
  until it holds and returns the seconds that took; ``wait_until`` does the same, blocking, for
  code without a loop. At the deadline both fail with an AssertionError naming what they waited
  for.
- ``poll`` reads a value until ``accept`` takes it and returns that reading; its failure
  message is made from the last reading, so it can say what was seen instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.02


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    what: str,
    interval_s: float = POLL_S,
) -> float:
    """Wait until ``check()`` holds; the seconds it took; AssertionError after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    await poll(check, bool, timeout_s, lambda _: _timed_out(timeout_s, what), interval_s)
    return loop.time() - start


async def poll(
    read: Callable[[], T | Awaitable[T]],
    accept: Callable[[T], bool],
    timeout_s: float,
    failure: Callable[[T], str],
    interval_s: float = POLL_S,
) -> T:
    """The first reading ``accept`` takes; AssertionError(``failure(last reading)``) once
    ``timeout_s`` has passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not accept(reading := await _result(read())):
        if loop.time() > deadline:
            raise AssertionError(failure(reading))
        await asyncio.sleep(interval_s)
    return reading


def wait_until(
    check: Callable[[], object], timeout_s: float, what: str, interval_s: float = POLL_S
) -> float:
    """Block until ``check()`` is truthy; the seconds it took; AssertionError after
    ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(_timed_out(timeout_s, what))
        time.sleep(interval_s)
    return time.monotonic() - start


def _timed_out(timeout_s: float, what: str) -> str:
    return f"timed out after {timeout_s} s waiting for {what}"


async def _result(value: T | Awaitable[T]) -> T:
    if isinstance(value, Awaitable):
        return await value
    return value
