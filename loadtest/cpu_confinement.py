"""Confine a process tree to a known CPU share: a child cgroup of its own, for the time a load
test runs, so that "calls per core" is measured against the cores the server was given and not
against whatever the load generator left it on a shared machine.

- **cgroup v1** (``/sys/fs/cgroup/cpu`` and ``/sys/fs/cgroup/cpuset`` hierarchies): the quota
  in ``cpu.cfs_quota_us`` per ``cpu.cfs_period_us``, ``cpu.shares`` so the group gets its quota
  whenever it wants it (a quota only caps; with a cpuset alone, the highest weight gives it
  its cores before other work), ``cpuset.cpus`` to pin it to cores. A *favoured* group has the
  highest ``cpu.shares`` and neither quota nor cpuset: on a machine shared with other work, what
  it holds (the load generator and the rest of the stack) runs first.
- **cgroup v2** (a unified hierarchy whose root lists the ``cpu`` controller): ``cpu.max``
  ("quota period"), ``cpu.weight`` and ``cpuset.cpus``.

The period is short (10 ms by default, not the kernel's 100 ms): a throttled group waits at most
the rest of a period, so at 0.25 core a stall is about 7.5 ms and not the 75 ms that would look
like network jitter in the turn latencies measured.

``Confinement`` is a context manager: it creates ``<hierarchy>/<name>`` (writable by root),
moves processes in by PID (``add``: a process and its live descendants; children forked later
inherit the group), reads the group's throttling (``throttling``), and on exit moves whatever is
left back to the parent group and removes the directory, within a bounded number of tries.
``CgroupUnavailable`` says why a host cannot confine (no hierarchy, not writable): the caller
falls back and says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from loadtest.hosts import process_tree

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PERIOD_US = 10_000
MIN_PERIOD_US, MAX_PERIOD_US = 1_000, 1_000_000  # the kernel's bounds on cfs_period_us
V1_MAX_SHARES, V2_MAX_WEIGHT = 262_144, 10_000  # the group wins contention up to its quota
REMOVE_TRIES = 50
REMOVE_WAIT_S = 0.02


class CgroupUnavailable(Exception):
    """This host cannot confine a process here; the message says why."""


@dataclass(frozen=True)
class CpuLimit:
    cores: float = 0.0  # the quota in cores (0: no quota)
    period_us: int = DEFAULT_PERIOD_US
    cpus: str = ""  # a cpuset list such as "1" or "0-1" ("": every core)
    favoured: bool = False  # the highest weight with no quota: first to run, never capped

    def __post_init__(self) -> None:
        if self.cores < 0:
            raise ValueError(f"cores must be >= 0, got {self.cores}")
        if not MIN_PERIOD_US <= self.period_us <= MAX_PERIOD_US:
            raise ValueError(f"period_us must be in {MIN_PERIOD_US}..{MAX_PERIOD_US}")
        if self.cores and self.quota_us < MIN_PERIOD_US:
            raise ValueError(f"a quota of {self.quota_us} us is under the kernel's 1000 us")
        if self.favoured and self.cores:
            raise ValueError("a favoured group has no quota (cores=0)")
        if not (self.cores or self.cpus or self.favoured):
            raise ValueError("a limit needs cores (a quota) or cpus (a cpuset), or favoured")

    @property
    def quota_us(self) -> int:
        return round(self.cores * self.period_us)

    @property
    def pinned_cores(self) -> int:
        """How many cores ``cpus`` names (0 when it names none)."""
        return len(parse_cpus(self.cpus)) if self.cpus else 0

    @property
    def confined_cores(self) -> float:
        """The CPU the group may use: its quota, else the cores it is pinned to."""
        if self.cores and self.pinned_cores:
            return min(self.cores, float(self.pinned_cores))
        return self.cores or float(self.pinned_cores)


def pin_threads(pids: list[int], cpus: list[int]) -> list[int]:
    """Every thread of each process in ``pids`` allowed only ``cpus`` (threads started later
    inherit their creator's); the PIDs pinned, without those gone meanwhile. A cpuset group is
    not the tool here: these processes stay in their groups (a favoured one, say)."""
    pinned = []
    for pid in pids:
        try:
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # gone
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)
        pinned.append(pid)
    return pinned


def parse_cpus(text: str) -> list[int]:
    """A cpuset list ("0-2,5") as core numbers; ValueError naming the text when malformed."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cores += range(int(first), int(last or first) + 1)
    except ValueError:
        raise ValueError(f"not a cpuset list: {text!r}") from None
    return cores


def cgroup_version(root: Path = CGROUP_ROOT) -> int:
    """1 or 2 for the hierarchy that holds the cpu controller here; CgroupUnavailable if none."""
    if (root / "cpu" / "cpu.cfs_quota_us").exists():
        return 1
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return 2
    raise CgroupUnavailable(f"no cgroup cpu controller under {root}")


class Confinement:
    """A child cgroup with ``limit``, named ``name``, for the duration of a ``with`` block."""

    def __init__(self, limit: CpuLimit, name: str, root: Path = CGROUP_ROOT) -> None:
        self.limit, self.name, self.root = limit, name, root
        self.version = 0
        self.dirs: list[Path] = []  # the group's directories (v1: one per hierarchy)

    def __enter__(self) -> Confinement:
        self.version = cgroup_version(self.root)
        try:
            self._create_v1() if self.version == 1 else self._create_v2()
        except OSError as error:
            self._remove()
            raise CgroupUnavailable(f"cannot create cgroup {self.name}: {error}") from None
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._remove()

    def _create_v1(self) -> None:
        cpu = self._make(self.root / "cpu" / self.name)
        if self.limit.cores:
            _write(cpu / "cpu.cfs_period_us", self.limit.period_us)
            _write(cpu / "cpu.cfs_quota_us", self.limit.quota_us)
        _write(cpu / "cpu.shares", V1_MAX_SHARES)  # it gets what it was given, first
        if self.limit.cpus:
            cpuset = self._make(self.root / "cpuset" / self.name)
            _write(cpuset / "cpuset.mems", (cpuset.parent / "cpuset.mems").read_text().strip())
            _write(cpuset / "cpuset.cpus", self.limit.cpus)

    def _create_v2(self) -> None:
        wanted = ["+cpu"] + (["+cpuset"] if self.limit.cpus else [])
        _write(self.root / "cgroup.subtree_control", " ".join(wanted))
        group = self._make(self.root / self.name)
        if self.limit.cores:
            _write(group / "cpu.max", f"{self.limit.quota_us} {self.limit.period_us}")
        _write(group / "cpu.weight", V2_MAX_WEIGHT)
        if self.limit.cpus:
            _write(group / "cpuset.cpus", self.limit.cpus)

    def _make(self, path: Path) -> Path:
        path.mkdir()
        self.dirs.append(path)
        return path

    def add(self, pid: int) -> list[int]:
        """Move ``pid`` and its live descendants in; the PIDs moved (those still alive)."""
        moved: list[int] = []
        for member in process_tree(pid):
            with contextlib.suppress(ProcessLookupError):
                for group in self.dirs:
                    _write(group / "cgroup.procs", member)
                moved.append(member)
        return moved

    def members(self) -> list[int]:
        """The PIDs now in the group (its first hierarchy)."""
        text = (self.dirs[0] / "cgroup.procs").read_text() if self.dirs else ""
        return [int(pid) for pid in text.split()]

    def throttling(self) -> dict[str, float]:
        """The group's throttling since it was made (``read_throttling``); {} without a quota."""
        return read_throttling(self.stat_path)

    @property
    def stat_path(self) -> str:
        """The group's ``cpu.stat`` ("" when it has no quota)."""
        if not (self.limit.cores and self.dirs):
            return ""
        return str(next(d for d in self.dirs if d.parent.name != "cpuset") / "cpu.stat")

    def describe(self) -> dict[str, object]:
        """What the report says about the confinement."""
        return {
            "cgroup": f"v{self.version}:{self.name}",
            "cores": self.limit.cores or None,
            "period_us": self.limit.period_us if self.limit.cores else None,
            "quota_us": self.limit.quota_us if self.limit.cores else None,
            "cpus": self.limit.cpus or None,
            "favoured": self.limit.favoured,
            "confined_cores": self.limit.confined_cores,
        }

    def _remove(self) -> None:
        """Members back to the parent group, then the directories removed (bounded tries)."""
        for group in reversed(self.dirs):
            for _ in range(REMOVE_TRIES):
                if _evacuated_and_removed(group):
                    break
                time.sleep(REMOVE_WAIT_S)  # a member forking while it was moved: look again
        self.dirs = [group for group in self.dirs if group.exists()]


def read_throttling(stat_path: str) -> dict[str, float]:
    """A group's ``cpu.stat``: periods, periods throttled, ms throttled (v2 counts microseconds,
    v1 nanoseconds); {} for "" or a group gone."""
    try:
        text = Path(stat_path).read_text() if stat_path else ""
    except OSError:
        return {}
    values = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
    if not values:
        return {}
    if "throttled_usec" in values:
        throttled_ms = int(values["throttled_usec"]) / 1000
    else:
        throttled_ms = int(values.get("throttled_time", 0)) / 1e6
    periods, throttled = int(values.get("nr_periods", 0)), int(values.get("nr_throttled", 0))
    return {"periods": periods, "throttled": throttled, "throttled_ms": round(throttled_ms, 1)}


def _evacuated_and_removed(group: Path) -> bool:
    if not group.exists():
        return True
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                _write(group.parent / "cgroup.procs", pid)
        group.rmdir()
        return True
    return False


def _write(path: Path, value: object) -> None:
    """One write of ``value`` to a cgroup file (the kernel takes each write whole)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)
