"""The transceiver's garbage-collector metrics cost a scrape nothing that grows with the heap:
the frozen start-up heap is counted once, when it is frozen, not at every scrape of /metrics
(``gc.get_freeze_count()`` walks every frozen object: ~10 ms for a transceiver's, seen by
sampling a transceiver's stacks while /metrics was scraped). In a child process: freezing
changes the collector for the whole process."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import gc, sys
from prometheus_client import CollectorRegistry, generate_latest
from transceiver.metrics import GcPauses, freeze_heap

registry = CollectorRegistry()
GcPauses(registry)
held = [[i] for i in range(50_000)]
count = freeze_heap()
walks = []
def watch(frame, event, arg):
    if event == "c_call" and arg is gc.get_freeze_count:
        walks.append(arg)
sys.setprofile(watch)
text = generate_latest(registry).decode()
sys.setprofile(None)
line = next(l for l in text.splitlines() if l.startswith("transceiver_gc_frozen_objects "))
print(count, len(walks), float(line.split()[1]))
"""


def test_the_frozen_heap_is_counted_once_not_at_every_scrape() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    count, walks, reported = done.stdout.split()
    assert int(count) >= 50_000  # the list's tracked lists at least
    assert int(walks) == 0, "a scrape walked the frozen heap"
    assert float(reported) == int(count)
