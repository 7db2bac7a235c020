"""Driving ``make run`` from tests and benchmarks: ``launched()`` starts ``python -m
deploy.local`` on free loopback ports, reads its announcement (the URL, the transceivers, every
child's PID), and on exit stops it with Ctrl-C (SIGINT) and records any child left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local import LAST_LINE, STOP_TIMEOUT_S, TRANSCEIVERS_LINE, URL_LINE


@dataclass
class Launched:
    """A ``python -m deploy.local`` we started: its output, URL and children's PIDs."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    url: str = ""
    up: threading.Event = field(default_factory=threading.Event)
    left_running: dict[str, int] = field(default_factory=dict)  # filled in after the stop

    @property
    def child_pids(self) -> dict[str, int]:
        """``{name: pid}`` of every process the launcher reported starting."""
        pids = {}
        for line in self.lines:
            if line.startswith("[stack] started "):
                name, _, rest = line.removeprefix("[stack] started ").partition(" (pid ")
                pids[name] = int(rest.rstrip(")"))
        return pids

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if URL_LINE in line:
                self.url = line.split(URL_LINE, 1)[1].strip()
            if LAST_LINE in line:  # the whole announcement has been read
                self.up.set()

    @property
    def transceiver_urls(self) -> list[str]:
        """The transceivers' own HTTP URLs (behind the front door when there are several)."""
        for line in self.lines:
            if line.strip().startswith(TRANSCEIVERS_LINE):
                return line.strip().removeprefix(TRANSCEIVERS_LINE).split(" (")[0].split()
        return []

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.lines[-lines:])


MAX_PORT_RUN = 9  # 8 transceivers and the front door use consecutive ports


def free_port_args(host: str = "127.0.0.1") -> list[str]:
    """Flags putting every listener of the stack on free loopback ports: the link and HTTP
    ports start runs of MAX_PORT_RUN free ports (one per transceiver, and the front door)."""
    with contextlib.ExitStack() as held:  # held open until all are chosen: no port twice
        public = _hold(held, host, socket.SOCK_DGRAM, 1)
        link = _hold(held, host, socket.SOCK_DGRAM, MAX_PORT_RUN)
        http = _hold(held, host, socket.SOCK_STREAM, MAX_PORT_RUN)
        relay_http = _hold(held, host, socket.SOCK_STREAM, 1)
    ports = {"--public-port": public, "--link-port": link, "--http-port": http}
    ports["--relay-http-port"] = relay_http
    return [arg for flag, port in ports.items() for arg in (flag, str(port))]


def _hold(held: contextlib.ExitStack, host: str, kind: int, count: int) -> int:
    """The first of ``count`` consecutive free ports, bound (and kept) in ``held``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        run = contextlib.ExitStack()
        first = run.enter_context(socket.socket(family, kind))
        first.bind((host, 0))
        base = int(first.getsockname()[1])
        try:
            for port in range(base + 1, base + count):
                run.enter_context(socket.socket(family, kind)).bind((host, port))
        except (OSError, OverflowError):  # taken, or past 65535
            run.close()
            continue
        held.enter_context(run)
        return base
    raise RuntimeError(f"no run of {count} free ports on {host}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def launched(
    args: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 90.0
) -> Iterator[Launched]:
    """Run the stack (on free ports) until its URL line; on exit Ctrl-C it (SIGINT), wait,
    and record in ``left_running`` any child still alive."""
    argv = [sys.executable, "-m", "deploy.local", *free_port_args(), *args]
    process = subprocess.Popen(
        argv,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    stack = Launched(process)
    threading.Thread(target=stack.read, name="stack output", daemon=True).start()
    try:
        if not stack.up.wait(timeout_s):
            raise RuntimeError(f"the stack did not come up in {timeout_s} s:\n{stack.tail()}")
        yield stack
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S * 3)
        except subprocess.TimeoutExpired:
            process.kill()  # the launcher itself hung: its children show up in left_running
            process.wait()
        stack.left_running = {n: pid for n, pid in stack.child_pids.items() if _alive(pid)}
