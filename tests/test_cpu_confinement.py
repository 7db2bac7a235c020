"""A real child process confined by ``loadtest.cpu_confinement``: a busy loop given 0.25 core in
a cgroup of its own is throttled by the kernel (its share observed in the group's ``cpu.stat``
and in /proc), pinned to the core it was given, and the group is gone afterwards with the
process back in its parent group. Skips only where cgroups are not writable (not root, or no cpu
controller)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.cpu_confinement import (
    CGROUP_ROOT,
    CgroupUnavailable,
    Confinement,
    CpuLimit,
    cgroup_version,
    parse_cpus,
    pin_threads,
)
from loadtest.hosts import read_stat

DEADLINE_S = 20.0
THROTTLED_PERIODS = 20  # periods the busy loop must be seen throttled in
CPU_SLACK = 1.5  # over the quota: /proc's clock ticks are coarse, a window's ends not aligned


def _writable() -> str:
    try:
        version = cgroup_version()
    except CgroupUnavailable as why:
        return str(why)
    top = CGROUP_ROOT / "cpu" if version == 1 else CGROUP_ROOT
    return "" if os.access(top, os.W_OK) else f"{top} is not writable"


@pytest.fixture
def busy_loop() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


def _group_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(",") or (names == "" and controller == "unified"):
            return path
    return ""


def _cpu_s(pid: int) -> float:
    stat = read_stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat.cpu_s


@pytest.mark.skipif(bool(_writable()), reason=_writable() or "cgroups writable")
def test_a_confined_busy_loop_gets_its_quota_and_its_core(
    busy_loop: subprocess.Popen[bytes],
) -> None:
    core = max(os.sched_getaffinity(0))  # the last core this machine lets us use
    limit = CpuLimit(cores=0.25, period_us=10_000, cpus=str(core))
    name = f"voicerelay-test-{os.getpid()}"
    with Confinement(limit, name) as group:
        assert group.add(busy_loop.pid) == [busy_loop.pid]
        assert group.members() == [busy_loop.pid]
        allowed = Path(f"/proc/{busy_loop.pid}/status").read_text()
        assert f"Cpus_allowed_list:\t{core}\n" in allowed
        start_cpu_s, start_s = _cpu_s(busy_loop.pid), time.monotonic()
        deadline_s = start_s + DEADLINE_S
        while group.throttling()["throttled"] < THROTTLED_PERIODS:
            assert time.monotonic() < deadline_s, group.throttling()
            time.sleep(0.05)  # polling a condition, with a deadline
        while (wall_s := time.monotonic() - start_s) < 1.0:  # a window /proc can resolve
            time.sleep(0.05)
        share = (_cpu_s(busy_loop.pid) - start_cpu_s) / wall_s
        stat = group.throttling()
        assert stat["throttled_ms"] > 0 and stat["periods"] >= stat["throttled"]
        assert share <= limit.cores * CPU_SLACK, share  # unconfined, a busy loop takes a core
    assert not any(path.exists() for path in group.dirs) and group.dirs == []
    version = cgroup_version()
    assert name not in _group_of(busy_loop.pid, "cpu" if version == 1 else "unified")


def test_a_limit_says_what_it_confines_to() -> None:
    assert CpuLimit(cores=0.25).quota_us == 2500
    assert CpuLimit(cores=0.5, cpus="1").confined_cores == 0.5
    assert CpuLimit(cpus="0-1").confined_cores == 2.0
    assert parse_cpus("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="not a cpuset list: 'x'"):
        parse_cpus("x")
    with pytest.raises(ValueError, match="needs cores .a quota. or cpus .a cpuset., or favoured"):
        CpuLimit()
    with pytest.raises(ValueError, match="under the kernel's 1000 us"):
        CpuLimit(cores=0.05, period_us=10_000)


THREADED_CHILD = """
import os, sys, threading
event = threading.Event()
for _ in range(2):
    threading.Thread(target=event.wait, daemon=True).start()
print("started", flush=True)
sys.stdin.readline()
seen = []
later = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))
later.start()
later.join()
print(seen[0], flush=True)
"""


def _allowed(pid: int) -> set[str]:
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to one")
def test_pinning_a_process_pins_every_thread_and_the_threads_it_starts_later() -> None:
    """What ``--generator-cpus`` does to the processes that are not the transceivers."""
    core = min(os.sched_getaffinity(0))
    child = subprocess.Popen(
        [sys.executable, "-c", THREADED_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "started"
        assert len(list(Path(f"/proc/{child.pid}/task").iterdir())) == 3
        assert _allowed(child.pid) != {str(core)}  # not pinned before
        assert pin_threads([child.pid, 2**22 + 7], [core]) == [child.pid]  # the other is gone
        assert _allowed(child.pid) == {str(core)}
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == f"[{core}]"
    finally:
        child.kill()
        child.wait(timeout=10)
