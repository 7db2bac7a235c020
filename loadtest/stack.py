"""The local development stack behind `make run`: relay and transceiver(s) on loopback.

Starts every process itself, waits for each one's ready line with a deadline, prints the URL to
open, and on Ctrl-C (or SIGTERM) stops exactly the processes it started, by PID.
"""

from __future__ import annotations

import argparse
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StackConfig:
    host: str
    public_port: int
    http_port: int
    link_port: int
    relay_http_port: int
    transceivers: int
    relay_workers: int
    agent: str

    def link_addresses(self) -> list[str]:
        return [f"{self.host}:{self.link_port + i}" for i in range(self.transceivers)]


def parse_args(argv: Sequence[str]) -> StackConfig:
    parser = argparse.ArgumentParser(prog="python -m loadtest.stack", description=__doc__)
    parser.add_argument("--host", default=os.environ.get("STACK_HOST", "127.0.0.1"))
    parser.add_argument("--public-port", type=int, default=3478)
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--link-port", type=int, default=7000)
    parser.add_argument("--relay-http-port", type=int, default=9100)
    parser.add_argument("--transceivers", type=int, default=1)
    parser.add_argument("--relay-workers", type=int, default=2)
    parser.add_argument("--agent", default=os.environ.get("TRANSCEIVER_AGENT", "echo"))
    args = parser.parse_args(argv)
    if not 1 <= args.transceivers <= 8:
        parser.error("--transceivers must be between 1 and 8")
    return StackConfig(
        args.host,
        args.public_port,
        args.http_port,
        args.link_port,
        args.relay_http_port,
        args.transceivers,
        args.relay_workers,
        args.agent,
    )


def commands(config: StackConfig, keys: str) -> list[tuple[str, list[str]]]:
    py = sys.executable
    public = f"{config.host}:{config.public_port}"
    relay = [py, "-m", "relay", "--public", public, "--workers", str(config.relay_workers)]
    relay += ["--transceivers", ",".join(config.link_addresses()), "--keys", keys]
    relay += ["--http", f"{config.host}:{config.relay_http_port}"]
    procs = [("relay", relay)]
    for i, link in enumerate(config.link_addresses()):
        cmd = [py, "-m", "transceiver", "--link", link, "--public", public, "--keys", keys]
        cmd += ["--http", f"{config.host}:{config.http_port + i}", "--agent", config.agent]
        procs.append((f"transceiver-{i}", cmd))
    return procs


def start(name: str, cmd: list[str]) -> subprocess.Popen[str]:
    print(f"[stack] starting {name}: {' '.join(cmd[1:4])} ...", flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)


def wait_ready(name: str, proc: subprocess.Popen[str]) -> None:
    """Echo the process's stdout until its `... ready` line, within READY_TIMEOUT_S."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        if not selector.select(timeout=min(remaining, 1.0)):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        print(f"[{name}] {line.rstrip()}", flush=True)
        if line.strip().endswith("ready"):
            return
    raise RuntimeError(f"{name} did not become ready (exit code {proc.poll()})")


def stop_all(procs: list[tuple[str, subprocess.Popen[str]]]) -> None:
    for _, proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[stack] {name} (pid {proc.pid}) ignored SIGTERM; killing", flush=True)
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    keys = f"1:{secrets.token_hex(32)}"
    started: list[tuple[str, subprocess.Popen[str]]] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        for name, cmd in commands(config, keys):
            started.append((name, start(name, cmd)))
            wait_ready(name, started[-1][1])
        print(f"\n  voicerelay is up: open http://{config.host}:{config.http_port}/\n", flush=True)
        print("  Ctrl-C stops every process this started.\n", flush=True)
        while all(proc.poll() is None for _, proc in started):
            time.sleep(0.5)  # supervising, not synchronising: poll for a dead child
        print("[stack] a process exited; stopping the rest", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\n[stack] stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"[stack] {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_all(started)


if __name__ == "__main__":
    sys.exit(main())
