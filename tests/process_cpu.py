"""Test support: CPU time (utime + stime) of processes and of each of their threads, from /proc.

``snapshot(pid)`` reads ``/proc/PID/stat`` (every thread of the process, including ones that
have already exited) and ``/proc/PID/task/TID/stat`` for each live thread with its name
(``comm``). Two snapshots and the wall time between them give the cores a process used and
which of its threads used them (``ProcessUsage``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# proc(5) numbers the fields of a stat line from 1: ppid is 4, utime 14, stime 15. The
# fields after the ``(comm)`` part start at field 3.
_AFTER_COMM = 3
_PPID, _UTIME, _STIME = 4 - _AFTER_COMM, 14 - _AFTER_COMM, 15 - _AFTER_COMM


@dataclass(frozen=True)
class Stat:
    name: str
    ppid: int
    cpu_s: float


def read_stat(path: Path) -> Stat | None:
    """One stat file; None when the process or thread is gone."""
    try:
        line = path.read_text()
    except OSError:
        return None
    close = line.rindex(")")  # a comm may itself hold ") "
    fields = line[close + 2 :].split()
    cpu_ticks = int(fields[_UTIME]) + int(fields[_STIME])
    return Stat(
        line[line.index("(") + 1 : close], int(fields[_PPID]), cpu_ticks / CLOCK_TICKS_PER_S
    )


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := read_stat(entry / "stat")) is not None:
            parents[int(entry.name)] = stat.ppid
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.decode(errors="replace").split("\0")).strip()


@dataclass(frozen=True)
class Snapshot:
    pid: int
    cpu_s: float  # the whole process
    threads: dict[int, Stat]  # live threads by TID


def snapshot(pid: int) -> Snapshot | None:
    process = read_stat(PROC / str(pid) / "stat")
    if process is None:
        return None
    threads = {}
    for task in (PROC / str(pid) / "task").iterdir():
        if (stat := read_stat(task / "stat")) is not None:
            threads[int(task.name)] = stat
    return Snapshot(pid, process.cpu_s, threads)


@dataclass(frozen=True)
class ProcessUsage:
    """What one process used between two snapshots, in cores (CPU seconds per wall second)."""

    pid: int
    command: str
    cores: float
    threads: list[tuple[float, str, int]]  # (cores, name, tid), busiest first

    def describe(self, top: int = 8) -> str:
        lines = [f"  pid {self.pid} ({self.command[:90]}): {self.cores:.3f} cores"]
        for cores, name, tid in self.threads[:top]:
            main = ", the main thread" if tid == self.pid else ""
            lines.append(f"    {cores:.3f}  {name} (tid {tid}{main})")
        return "\n".join(lines)


def usage(before: Snapshot, after: Snapshot, wall_s: float) -> ProcessUsage:
    """Cores per process and per thread; a thread born in between counts from zero."""
    threads = []
    for tid, stat in after.threads.items():
        earlier = before.threads.get(tid)
        cpu_s = stat.cpu_s - (earlier.cpu_s if earlier is not None else 0.0)
        threads.append((cpu_s / wall_s, stat.name, tid))
    threads.sort(reverse=True)
    cores = (after.cpu_s - before.cpu_s) / wall_s
    return ProcessUsage(after.pid, command_line(after.pid), cores, threads)
