"""What each thread of a process is doing, read from ``/proc/self/task``, for the probes that
check a model starts no thread and leaves none running.

A probe is a script run by a fresh interpreter (``run_probe``), so that only the threads its
own imports and model start are counted, not those of the test process; the script imports
this module (``from thread_states import states``) to read them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def states() -> dict[str, str]:
    """Each thread of this process (its task id) -> its state letter (``R`` running, ``S``
    asleep, ...), the field after the name in its ``stat``."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        stat = Path(f"/proc/self/task/{task}/stat").read_text()
        found[task] = stat[stat.rindex(")") + 2]
    return found


def others(found: dict[str, str]) -> dict[str, str]:
    """The threads in ``found`` but the main one."""
    return {task: state for task, state in found.items() if task != str(os.getpid())}


def run_probe(script: str, *arguments: str) -> str:
    """``script`` run by a fresh interpreter at the repository's root, able to import this
    module; its standard output (AssertionError with its errors if it failed)."""
    paths = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    done = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *paths])},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout
