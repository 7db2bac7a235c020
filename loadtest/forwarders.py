"""The forwarders under test as real processes: start, wait ready, read their CPU, stop.

Three kinds share one command-line shape (public port, one transceiver, N workers): the relay
(``python -m relay``), the C reference (recvmmsg/sendmmsg, the physical limit) and the bare
Python loop. CPU is utime+stime from ``/proc/PID/stat`` summed over the process and every
descendant (supervisor and workers). Only processes started here are ever signalled, by PID.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.hosts import metric_samples, process_tree, read_stat

Address = tuple[str, int]
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"

C_REFERENCE = "c-reference"
BARE_PYTHON = "bare-python"
RELAY = "relay"


@dataclass(frozen=True)
class ForwarderSpec:
    """What to start: ``kind`` with ``workers`` forwarding ``public`` <-> ``transceiver``."""

    kind: str
    workers: int
    public: Address
    transceiver: Address
    keys: str
    http: Address = (LOOPBACK, 0)  # the relay's /metrics port; 0 = not served
    extra: tuple[str, ...] = ()  # more relay flags (e.g. --redis-url)


Command = Callable[[ForwarderSpec], list[str]]


def _relay_command(spec: ForwarderSpec) -> list[str]:
    return [
        *(sys.executable, "-m", "relay", "--public", _text(spec.public)),
        *("--internal-host", LOOPBACK, "--internal-port", "0", "--workers", str(spec.workers)),
        *("--transceivers", _text(spec.transceiver), "--keys", spec.keys),
        *("--http", _text(spec.http)),
        *spec.extra,
    ]


def _text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def relay_available() -> bool:
    return importlib.util.find_spec("relay.__main__") is not None


class PortTaken(RuntimeError):
    """The forwarder could not bind a port picked free a moment before: another process on
    the machine took it meanwhile (a test worker's connection, say). Start again on others."""


def command_for(spec: ForwarderSpec, reference_binary: Path) -> list[str]:
    common = ["--public", _text(spec.public), "--transceiver", _text(spec.transceiver)]
    common += ["--workers", str(spec.workers)]
    if spec.kind == C_REFERENCE:
        return [str(reference_binary), *common]
    if spec.kind == BARE_PYTHON:
        return [sys.executable, "-m", "loadtest.bare_forwarder", *common]
    if spec.kind == RELAY:
        return _relay_command(spec)
    raise ValueError(f"unknown forwarder kind {spec.kind!r}")


class RunningForwarder:
    """A started forwarder process tree; ``stop()`` ends exactly the PIDs it started."""

    def __init__(self, spec: ForwarderSpec, process: subprocess.Popen[bytes], log: Path) -> None:
        self.spec = spec
        self.process = process
        self.log = log
        self.pids: tuple[int, ...] = (process.pid,)
        self.start_ticks: dict[int, str] = {}

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while b" ready" not in self.log.read_bytes():
            if self.process.poll() is not None:
                # (asyncio says "address already in use", Python's OSError and C "Address ...")
                if b"address already in use" in self.log.read_bytes().lower():
                    raise PortTaken(f"{self.spec.kind}: a port was taken; see {self.log}")
                raise RuntimeError(f"{self.spec.kind} exited early; see {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.kind} not ready in {timeout_s} s; see {self.log}")
            time.sleep(0.02)
        self.refresh_pids()

    def refresh_pids(self) -> None:
        """Record the current process tree (call once the workers are up)."""
        self.pids = tuple(process_tree(self.process.pid)) or (self.process.pid,)
        self.start_ticks = {pid: _start_ticks(pid) for pid in self.pids}

    def cpu_s(self) -> float:
        """utime+stime of the supervisor and its workers, in CPU-seconds."""
        return sum(stat.cpu_s for pid in self.pids if (stat := read_stat(pid)) is not None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        for pid in self.pids[1:]:
            if _start_ticks(pid) == self.start_ticks.get(pid, "gone"):
                os.kill(pid, signal.SIGKILL)  # a worker the supervisor left behind


def _start_ticks(pid: int) -> str:
    """The start time in /proc: tells our process from a later one with its PID."""
    stat = read_stat(pid)
    return "gone" if stat is None else str(stat.start_ticks)


def start_forwarder(spec: ForwarderSpec, reference_binary: Path, log_dir: Path) -> RunningForwarder:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{spec.kind}-{spec.workers}w.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command_for(spec, reference_binary),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    running = RunningForwarder(spec, process, log)
    try:
        running.wait_ready()
    except BaseException:
        running.stop()
        raise
    return running


def scrape_counters(http: Address, prefix: str = "relay_") -> dict[str, float]:
    """Every sample of the relay's /metrics whose name starts with ``prefix``, by name{labels}."""
    url = f"http://{http[0]}:{http[1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return metric_samples(response.read().decode("utf-8"), prefix)
