"""The load test's host samplers (``loadtest.hosts``) on real things: child processes started
here (busy, idle, a parent waiting on a busy child), the kernel's UDP counters moved by
overflowing a tiny receive buffer on loopback, and a prometheus_client HTTP server on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from loadtest.hosts import (
    UDP_ERRORS,
    CoresBusy,
    ProcessCpu,
    ScrapedCpu,
    UdpErrors,
    generator_verdict,
    process_tree,
    read_stat,
    scrape_process_metrics,
    udp_errors,
)

WAIT_S = 15.0
BLOB_MB = 64
# Each child ends by itself after LIFETIME_S even if a test fails to stop it.
LIFETIME_S = 20
BUSY = f"""
import time
blob = b"x" * ({BLOB_MB} << 20)
print("ready", flush=True)
end = time.monotonic() + {LIFETIME_S}
while time.monotonic() < end:
    pass
"""
IDLE = f"""
import time
print("ready", flush=True)
time.sleep({LIFETIME_S})
"""
# The parent blocks in waitpid (bounded by the child's own lifetime): waiting with a timeout,
# Popen.wait polls every 50 ms, and a tick of that polling made its "no CPU" sample 0.083 once
PARENT_OF_BUSY = f"""
import subprocess, sys
subprocess.run([sys.executable, "-c", {BUSY!r}])
"""


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.02)


def sleeping(pid: int) -> bool:
    """State S in /proc/PID/stat: blocked in a system call, using no CPU."""
    line = Path(f"/proc/{pid}/stat").read_text()
    return line[line.rindex(")") + 2] == "S"


@contextmanager
def started(code: str) -> Iterator[subprocess.Popen[str]]:
    """A Python child that prints "ready" (its own or its child's) before the test samples it."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(5)
        if child.stdout is not None:
            child.stdout.close()


def _cpu_grew(cpu: ProcessCpu, by_s: float) -> Callable[[], bool]:
    start_s = sum(cpu.last_cpu_s.values())
    return lambda: cpu.cpu_s() - start_s >= by_s


def test_process_cpu_counts_a_busy_process_and_not_an_idle_one() -> None:
    with started(BUSY) as busy, started(IDLE) as idle:
        wait_until(lambda: sleeping(idle.pid), "the idle child sleeps")
        busy_cpu, idle_cpu = ProcessCpu([busy.pid]), ProcessCpu([idle.pid])
        wait_until(_cpu_grew(busy_cpu, 0.1), "the busy child used 0.1 CPU-s")
        assert busy_cpu.sample() > 0
        assert idle_cpu.sample() == 0.0
        assert busy_cpu.rss_mb() > BLOB_MB > idle_cpu.rss_mb() > 0
        busy.kill()
        busy.wait(5)
        assert busy_cpu.sample() == 0.0  # gone: nothing more to count
        assert busy_cpu.rss_mb() == 0.0


def test_descendants_count_a_supervisors_workers() -> None:
    with started(PARENT_OF_BUSY) as parent:
        tree = process_tree(parent.pid)
        assert len(tree) == 2 and tree[0] == parent.pid
        worker, worker_stat = tree[1], read_stat(tree[1])
        assert worker_stat is not None and worker_stat.ppid == parent.pid
        try:
            wait_until(lambda: sleeping(parent.pid), "the parent waits for its child")
            own, whole = ProcessCpu([parent.pid]), ProcessCpu([parent.pid], descendants=True)
            assert whole.pids() == tree
            wait_until(_cpu_grew(whole, 0.1), "the worker used 0.1 CPU-s")
            assert whole.sample() > 0
            assert own.sample() == 0.0
        finally:
            now = read_stat(worker)
            if now is not None and now.start_ticks == worker_stat.start_ticks:
                os.kill(worker, signal.SIGKILL)  # the child started here, by PID
    assert process_tree(parent.pid) == []


def test_udp_errors_count_what_a_full_receive_buffer_drops() -> None:
    assert set(udp_errors()) == set(UDP_ERRORS)
    assert all(value >= 0 for value in udp_errors().values())
    with (
        socket.socket(type=socket.SOCK_DGRAM) as sink,
        socket.socket(type=socket.SOCK_DGRAM) as out,
    ):
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        sink.bind(("127.0.0.1", 0))
        errors, before = UdpErrors(), udp_errors()
        sent = 200
        for _ in range(sent):
            out.sendto(b"x" * 1000, sink.getsockname())
        dropped = sent - _drain(sink)
        assert dropped > sent // 2
        wait_until(
            lambda: udp_errors()["RcvbufErrors"] - before["RcvbufErrors"] >= dropped,
            f"RcvbufErrors grew by the {dropped} dropped datagrams",
        )
        delta = errors.delta()
    # Other processes may add errors too; none are ever taken away.
    assert delta["RcvbufErrors"] >= dropped
    assert delta["InErrors"] >= dropped  # the kernel counts a buffer drop as an input error too


def _drain(sink: socket.socket) -> int:
    sink.setblocking(False)
    for received in range(10_000):
        try:
            sink.recv(2048)
        except BlockingIOError:
            return received
    raise AssertionError("more datagrams queued than were sent")


@contextmanager
def metrics_server(registry: CollectorRegistry) -> Iterator[str]:
    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_scrape_reads_a_real_process_collector() -> None:
    """The default registry describes this process, so /proc brackets what it exposes."""
    own = ProcessCpu([os.getpid()])
    with metrics_server(prometheus_client.REGISTRY) as url:
        before_s = own.cpu_s()
        scraped = scrape_process_metrics(url)
        after_s = own.cpu_s()
        assert before_s - 1e-9 <= scraped["cpu_seconds"] <= after_s + 1e-9
        assert 0 < scraped["rss_bytes"] / 2**20 < 2 * own.rss_mb()
        remote = ScrapedCpu(url)
        wait_until(_cpu_grew_here(remote.last["cpu_seconds"], 0.05), "this test used 0.05 CPU-s")
        assert remote.sample() > 0
        assert remote.rss_mb() > 0


def _cpu_grew_here(start_s: float, by_s: float) -> Callable[[], bool]:
    own = ProcessCpu([os.getpid()])

    def burned() -> bool:
        sum(range(200_000))  # some CPU per check
        return own.cpu_s() - start_s >= by_s

    return burned


def test_scrape_sums_the_lines_of_each_metric() -> None:
    registry = CollectorRegistry()
    cpu = Counter("process_cpu_seconds", "CPU", ["worker"], registry=registry)
    rss = Gauge("process_resident_memory_bytes", "RSS", ["worker"], registry=registry)
    decoy = Gauge("process_resident_memory_bytes_peak", "not RSS", registry=registry)
    cpu.labels("0").inc(1.5)
    cpu.labels("1").inc(2.25)
    rss.labels("0").set(1e6)
    rss.labels("1").set(3e6)
    decoy.set(9e9)
    with metrics_server(registry) as url:
        assert scrape_process_metrics(url) == {"cpu_seconds": 3.75, "rss_bytes": 4e6}


def test_scrape_names_a_missing_metric() -> None:
    registry = CollectorRegistry()
    Counter("process_cpu_seconds", "CPU", registry=registry).inc()
    with metrics_server(registry) as url, pytest.raises(ValueError, match="no process_resident"):
        scrape_process_metrics(url)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((25.0, 0, 0, 0.5, 2), "tick lag p99 25.0 ms > 20 ms"),
        ((3.0, 7, 0, 0.5, 2), "Udp RcvbufErrors +7"),
        ((3.0, 0, 1, 0.5, 2), "Udp SndbufErrors +1"),
        ((3.0, 0, 0, 1.9, 2), "generator CPU 1.90 cores > 90% of 2"),
        ((3.0, 0, 0, 0.3, 2, 0.95, 1), "generator's 1 pinned core(s) 0.95 busy > 90%"),
    ],
)
def test_generator_verdict_names_each_reason(
    args: tuple[float, int, int, float, float] | tuple[float, int, int, float, float, float, int],
    reason: str,
) -> None:
    valid, reasons = generator_verdict(*args)
    assert not valid
    assert len(reasons) == 1 and reason in reasons[0]


def test_generator_verdict_passes_a_generator_that_kept_up() -> None:
    assert generator_verdict(20.0, 0, 0, 1.8, 2) == (True, [])
    assert generator_verdict(20.0, 0, 0, 0.3, 2, 0.9, 1) == (True, [])
    assert generator_verdict(50.0, 1, 1, 2.0, 2)[1][0].startswith("tick lag")


STAT = """cpu  {0} 0 {1} {2} {3} 0 0 0 0 0
cpu0 {0} 0 {1} {2} {3} 0 0 0 0 0
cpu1 900 0 100 0 0 0 0 0 0 0
intr 1 2 3
"""


def test_busy_cores_count_every_process_on_the_pinned_cores_only(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT.format(100, 50, 1000, 10))
    busy = CoresBusy([0], stat)
    # cpu0: user +300, system +100, idle +80, iowait +20: 400 busy ticks of 500; cpu1 ignored
    stat.write_text(STAT.format(400, 150, 1080, 30))
    assert busy.sample() == pytest.approx(0.8)
    assert busy.sample() == 0.0  # no tick since


def test_busy_cores_of_this_host_are_between_none_and_all() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    busy = CoresBusy(cpus)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass  # this process keeps one core busy meanwhile
    assert 0.0 < busy.sample() <= len(cpus)
