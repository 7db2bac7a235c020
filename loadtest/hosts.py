"""Host samplers for a load test, read from /proc (Linux): the generator's health and the server's
CPU and memory.

- ``udp_errors()`` / ``UdpErrors``: the kernel's UDP drop counters of this network namespace
  (``/proc/net/snmp`` and ``/proc/net/snmp6``). A generator that drops echoes in its own socket
  buffers counts ``RcvbufErrors``; without them, its "loss" would be reported as the relay's.
- ``ProcessCpu``: cores (utime+stime per wall second) and RSS of some processes, optionally with
  their descendants (a supervisor and its workers), and ``process_tree()`` to list them.
- ``scrape_process_metrics()`` / ``ScrapedCpu``: the same figures from a Prometheus text endpoint,
  for a server on another host.
- ``CoresBusy``: how busy some of the host's cores were between samples (``/proc/stat``), every
  process on them counted: the cores a generator was pinned to may be filled by what shares them
  (a fake provider, the relay) while its own processes look idle.
- ``generator_verdict()``: whether the generator kept up, with the thresholds below.

Every sampler reads its baseline when it is made, and each ``sample()``/``delta()`` returns the
change since the previous one. MB here means MiB (2**20 bytes), as ``top`` and ``ps`` count.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
BYTES_PER_MB = 2**20
UDP_ERRORS = ("RcvbufErrors", "SndbufErrors", "InErrors")
SCRAPE_TIMEOUT_S = 5.0

# The generator is saturated (its figures describe itself, not the server) when:
TICK_LAG_P99_LIMIT_MS = 20.0  # its 1 ms wheel ran this late at p99: one audio frame is 20 ms
BUFFER_ERRORS_LIMIT = 0  # any datagram dropped in its own socket buffers
CPU_SHARE_LIMIT = 0.9  # its workers used more than this share of the cores they may use

Clock = Callable[[], float]


# --- UDP counters ---------------------------------------------------------------------------


def udp_errors(proc_net: Path = PROC / "net") -> dict[str, int]:
    """``RcvbufErrors``, ``SndbufErrors`` and ``InErrors`` of UDP over IPv4 plus IPv6 (when the
    kernel has it), since boot, for the network namespace of ``proc_net`` (``/proc/PID/net``
    reads another process's namespace)."""
    counters = _snmp_udp(proc_net / "snmp")
    snmp6 = proc_net / "snmp6"
    if snmp6.exists():
        for name, value in _snmp6_udp(snmp6).items():
            counters[name] += value
    return counters


def _snmp_udp(path: Path) -> dict[str, int]:
    """The ``Udp:`` header line names the columns of the ``Udp:`` value line after it."""
    rows = [line.split()[1:] for line in path.read_text().splitlines() if line.startswith("Udp:")]
    if len(rows) != 2:
        raise ValueError(f"{path}: expected a Udp: header and a Udp: value line, got {len(rows)}")
    table = dict(zip(rows[0], rows[1], strict=True))
    return {name: int(table[name]) for name in UDP_ERRORS}


def _snmp6_udp(path: Path) -> dict[str, int]:
    """``snmp6`` has one ``Udp6<Name> <value>`` line per counter."""
    table = dict(line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: int(table.get(f"Udp6{name}", 0)) for name in UDP_ERRORS}


class UdpErrors:
    """``udp_errors()`` as deltas: each ``delta()`` is the increase since the previous call (or
    since this object was made)."""

    def __init__(self, proc_net: Path = PROC / "net") -> None:
        self.proc_net = proc_net
        self.last = udp_errors(proc_net)

    def delta(self) -> dict[str, int]:
        now = udp_errors(self.proc_net)
        change = {name: now[name] - self.last[name] for name in UDP_ERRORS}
        self.last = now
        return change


# --- Processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """The parts of ``/proc/PID/stat`` used here. ``start_ticks`` tells a process from a later
    one that reuses its PID."""

    ppid: int
    cpu_s: float
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """None when the process is gone (or a zombie, whose CPU was handed to its parent)."""
    try:
        line = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # proc(5) numbers fields from 1; after the "(comm)" (which may hold ") ") come field 3 on.
    fields = line[line.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    ticks = int(fields[14 - 3]) + int(fields[15 - 3])  # utime + stime, all threads
    return ProcStat(int(fields[4 - 3]), ticks / CLOCK_TICKS_PER_S, int(fields[22 - 3]))


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (parents before children); [] when ``pid`` is gone."""
    if read_stat(pid) is None:
        return []
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            children.setdefault(stat.ppid, []).append(int(entry.name))
    tree, todo = [pid], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        tree += kids
        todo += kids
    return tree


def rss_mb(pid: int) -> float:
    """Resident memory of one process (``/proc/PID/statm``, field 2 in pages); 0 once gone."""
    try:
        resident_pages = int((PROC / str(pid) / "statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * PAGE_BYTES / BYTES_PER_MB


class ProcessCpu:
    """The cores some processes use between samples, and their resident memory.

    With ``descendants=True`` the tree under each PID is listed again at every sample, so
    workers started later are counted (from zero at the first sample that sees them). The CPU a
    process spent after the previous sample is lost if it exits before the next one.
    """

    def __init__(
        self, pids: Iterable[int], descendants: bool = False, clock: Clock = time.monotonic
    ) -> None:
        self.roots = tuple(pids)
        self.descendants = descendants
        self.clock = clock
        self.last_cpu_s = self._cpu_by_process()
        self.last_time_s = clock()

    def pids(self) -> list[int]:
        if not self.descendants:
            return list(self.roots)
        return list(dict.fromkeys(pid for root in self.roots for pid in process_tree(root)))

    def _cpu_by_process(self) -> dict[tuple[int, int], float]:
        """CPU seconds keyed by (PID, start time), for the live processes."""
        stats = {pid: read_stat(pid) for pid in self.pids()}
        return {(pid, s.start_ticks): s.cpu_s for pid, s in stats.items() if s is not None}

    def sample(self) -> float:
        """Cores used since the previous sample: CPU seconds per wall second."""
        now_cpu_s, now_s = self._cpu_by_process(), self.clock()
        used_s = sum(cpu_s - self.last_cpu_s.get(key, 0.0) for key, cpu_s in now_cpu_s.items())
        wall_s = now_s - self.last_time_s
        self.last_cpu_s, self.last_time_s = now_cpu_s, now_s
        return used_s / wall_s if wall_s > 0 else 0.0

    def cpu_s(self) -> float:
        """Total CPU seconds of the live processes so far (does not move the baseline)."""
        return sum(self._cpu_by_process().values())

    def rss_mb(self) -> float:
        """Resident memory of the live processes, summed (shared pages count once per process)."""
        return sum(rss_mb(pid) for pid in self.pids())


class CoresBusy:
    """Busy cores (non-idle time per wall second, summed) among ``cpus`` between samples."""

    IDLE_FIELDS = (3, 4)  # idle and iowait, after the "cpuN" label (proc(5))

    def __init__(self, cpus: Iterable[int], stat_path: Path = PROC / "stat") -> None:
        self.cpus = {f"cpu{cpu}" for cpu in cpus}
        self.stat_path = stat_path
        self.last = self._ticks()

    def _ticks(self) -> tuple[int, int]:
        """(busy, all) clock ticks of the cores, summed."""
        busy = total = 0
        for line in self.stat_path.read_text().splitlines():
            label, *fields = line.split()
            if label in self.cpus:
                ticks = [int(field) for field in fields[:8]]  # to steal; guests are in user
                idle = sum(ticks[i] for i in self.IDLE_FIELDS)
                busy, total = busy + sum(ticks) - idle, total + sum(ticks)
        return busy, total

    def sample(self) -> float:
        """Busy cores since the previous sample (0 when no tick passed)."""
        now = self._ticks()
        busy, total = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        return len(self.cpus) * busy / total if total > 0 else 0.0


# --- A server on another host ----------------------------------------------------------------

CPU_METRIC = "process_cpu_seconds_total"
RSS_METRIC = "process_resident_memory_bytes"


def scrape_process_metrics(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> dict[str, float]:
    """``{"cpu_seconds", "rss_bytes"}`` from a Prometheus text endpoint, each summed over its
    lines (one per worker process, say). Raises ``ValueError`` when either metric is absent."""
    response = httpx.get(url, timeout=timeout_s)
    response.raise_for_status()
    sums = process_metrics(response.text)
    missing = [name for name in (CPU_METRIC, RSS_METRIC) if name not in sums]
    if missing:
        raise ValueError(f"{url}: no {' or '.join(missing)} in the scraped metrics")
    return {"cpu_seconds": sums[CPU_METRIC], "rss_bytes": sums[RSS_METRIC]}


def metric_samples(text: str, prefix: str = "") -> dict[str, float]:
    """Every sample of an exposition text whose name starts with ``prefix``, by
    ``name{label=value,...}`` (Prometheus's own parser)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def process_metrics(text: str) -> dict[str, float]:
    """The sums of the ``CPU_METRIC`` and ``RSS_METRIC`` samples of an exposition text."""
    sums: dict[str, float] = {}
    for key, value in metric_samples(text, "process_").items():
        name = key.partition("{")[0]
        if name in (CPU_METRIC, RSS_METRIC):
            sums[name] = sums.get(name, 0.0) + value
    return sums


class ScrapedCpu:
    """``ProcessCpu`` for a server seen only through its metrics endpoint."""

    def __init__(self, url: str, clock: Clock = time.monotonic) -> None:
        self.url = url
        self.clock = clock
        self.last = scrape_process_metrics(url)
        self.last_time_s = clock()

    def sample(self) -> float:
        """Cores used since the previous sample (0 when the counter went back: a restart)."""
        now, now_s = scrape_process_metrics(self.url), self.clock()
        used_s = max(0.0, now["cpu_seconds"] - self.last["cpu_seconds"])
        wall_s = now_s - self.last_time_s
        self.last, self.last_time_s = now, now_s
        return used_s / wall_s if wall_s > 0 else 0.0

    def rss_mb(self) -> float:
        """Resident memory at the latest sample."""
        return self.last["rss_bytes"] / BYTES_PER_MB


# --- The generator's verdict -----------------------------------------------------------------


def generator_verdict(
    tick_lag_p99_ms: float,
    rcvbuf_delta: int,
    sndbuf_delta: int,
    cpu_cores: float,
    cores_available: float,
    pinned_busy: float = 0.0,
    pinned_cores: int = 0,
) -> tuple[bool, list[str]]:
    """(valid, reasons): the generator kept up during an interval unless its wheel ran late
    (``TICK_LAG_P99_LIMIT_MS``), its host dropped datagrams in socket buffers (any
    ``RcvbufErrors``/``SndbufErrors``), its workers used more than ``CPU_SHARE_LIMIT`` of
    ``cores_available`` (the cores its worker processes may use, one per single-threaded worker),
    or the ``pinned_cores`` it was pinned to were busier than that share (``pinned_busy`` busy
    cores, whoever used them: ``CoresBusy``).
    """
    reasons = []
    if tick_lag_p99_ms > TICK_LAG_P99_LIMIT_MS:
        reasons.append(f"tick lag p99 {tick_lag_p99_ms:.1f} ms > {TICK_LAG_P99_LIMIT_MS:g} ms")
    for name, delta in (("RcvbufErrors", rcvbuf_delta), ("SndbufErrors", sndbuf_delta)):
        if delta > BUFFER_ERRORS_LIMIT:
            reasons.append(f"generator host Udp {name} +{delta:,} (its own socket buffers)")
    if cpu_cores > CPU_SHARE_LIMIT * cores_available:
        reasons.append(
            f"generator CPU {cpu_cores:.2f} cores > {CPU_SHARE_LIMIT:.0%} of {cores_available:g}"
        )
    if pinned_cores and pinned_busy > CPU_SHARE_LIMIT * pinned_cores:
        reasons.append(
            f"generator's {pinned_cores} pinned core(s) {pinned_busy:.2f} busy"
            f" > {CPU_SHARE_LIMIT:.0%}"
        )
    return not reasons, reasons
