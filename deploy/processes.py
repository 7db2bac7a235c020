"""Test support: real relay and transceiver processes and a loopback relay shim.

- ``Process`` starts a ``python -m ...`` process, waits for its ready line with a deadline, and
  ends it by PID (SIGTERM or SIGKILL), never by name.
- ``LoopbackRelay`` is a minimal in-test relay (one public socket, one link socket, header
  on/off, a keyed HELLO like a real worker's) for transceiver tests that need no real relay.
- ``Stack`` is a relay (N workers) in front of M transceivers on free loopback ports with a
  shared random keyring (and a random client-secret keyring). Tone clients live in ``tones``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx

from deploy.waiting import poll
from relay.timing import RelayTiming
from relay.wire.header import HEADER_BYTES, HeaderError, header_for, parse_header
from relay.wire.hello import seal_hello
from relay.wire.ufrag import Keyring

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE_HZ = 48_000
FRAME_SAMPLES = 960  # 20 ms
Address = tuple[str, int]


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` for ``kind`` (UDP by default, ``socket.SOCK_STREAM``
    for TCP); another process may take it before it is bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive free UDP ports (a pod's workers bind link + i)."""
    for _ in range(200):
        first = free_port(socket.SOCK_DGRAM, host)
        if first + count <= 65536 and all(_free_udp(host, first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no {count} consecutive free UDP ports on {host}")


def _free_udp(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def random_keys() -> str:
    return f"7:{os.urandom(32).hex()}"


def random_secret_keys() -> str:
    """A client-secret keyring (TRANSCEIVER_SECRET_KEYS), never the ufrag one."""
    return f"4:{os.urandom(32).hex()}"


def text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Process:
    """A child process we started; its stdout is scanned for a ready line."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_text: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.ready_text = name, argv, ready_text
        self.env = env or {}  # added to (overriding) this process's environment
        self.log_path = log_dir / f"{name}.log"
        self.lines: list[str] = []
        self.ready_at: float | None = None  # time.monotonic() when the ready line was read
        self._ready = threading.Event()
        self._popen: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    def start(self) -> Process:
        self._ready.clear()
        log = self.log_path.open("a")
        self._popen = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **self.env},
        )
        log.close()
        threading.Thread(target=self._read, args=(self._popen,), daemon=True).start()
        return self

    def _read(self, popen: subprocess.Popen[str]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(self.ready_text) and not self._ready.is_set():
                self.ready_at = time.monotonic()
                self._ready.set()

    async def ready(self, timeout_s: float = 20.0) -> Process:
        return await asyncio.to_thread(self.wait_ready, timeout_s)

    def wait_ready(self, timeout_s: float = 20.0) -> Process:
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"{self.name} not ready in {timeout_s} s:\n{self.log_tail()}")
        return self

    def ready_line(self) -> str:
        return next(line for line in self.lines if line.startswith(self.ready_text))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    async def exited(self, timeout_s: float) -> int:
        """Wait for the process to exit on its own; its exit code."""
        assert self._popen is not None
        return await asyncio.to_thread(self._popen.wait, timeout_s)

    async def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 15.0) -> int | None:
        """Signal the process by PID and wait for it; SIGKILL if it outlives the deadline."""
        if self._popen is None:
            return None
        self.send_signal(signum)
        try:
            return await asyncio.to_thread(self._popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return await asyncio.to_thread(self._popen.wait, 5)


def transceiver_process(
    name: str,
    link: Address,
    http: Address,
    public: str,
    keys: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
    **flags: Any,
) -> Process:
    """A transceiver; auth is off unless ``flags``/``env`` say otherwise (media and lifecycle
    tests need no keys; tests/test_client_secrets_http.py covers auth)."""
    argv = ["-m", "transceiver", "--link", text(link), "--http", text(http)]
    argv += ["--public", public, "--keys", keys]
    flags.setdefault("auth", (env or {}).get("TRANSCEIVER_AUTH", "off"))
    flags.setdefault("agent", "echo")  # media tests hear their tone; pass agent="pipeline"
    for flag, value in flags.items():
        argv += ["--" + flag.replace("_", "-"), str(value)]
    return Process(name, argv, "transceiver ready", log_dir, env)


def relay_process(
    public: str, transceivers: list[Address], keys: str, http: Address, log_dir: Path, **flags: Any
) -> Process:
    argv = ["-m", "relay", "--public", public, "--keys", keys, "--http", text(http)]
    argv += ["--transceivers", ",".join(text(t) for t in transceivers)]
    for flag, value in flags.items():
        argv += ["--" + flag.replace("_", "-"), str(value)]
    return Process("relay", argv, "relay ready", log_dir)


class _Forward(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.on_datagram(data, (addr[0], addr[1]))


class LoopbackRelay:
    """A one-worker relay stand-in: client datagrams get the header, link datagrams lose it.

    Like a relay worker it proves the keyring (``keys``, the transceiver's) with a HELLO: before
    the first datagram it forwards, then again when ``hello_interval_s`` has passed (checked as
    datagrams pass, so no timer task; a relay's own by default)."""

    def __init__(
        self, transceiver: Address, keys: str, hello_interval_s: float | None = None
    ) -> None:
        self.transceiver = transceiver
        self.hello_interval_s = hello_interval_s or RelayTiming().hello_interval_s
        self.keyring = Keyring.parse(keys)
        self.public = _Forward(self._from_client)
        self.link = _Forward(self._from_transceiver)
        self._hello_at_s = -self.hello_interval_s

    async def start(self, host: str = "127.0.0.1") -> Address:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self.public, local_addr=(host, 0))
        await loop.create_datagram_endpoint(lambda: self.link, local_addr=("127.0.0.1", 0))
        assert self.public.transport is not None
        host, port = self.public.transport.get_extra_info("sockname")[:2]
        return host, port

    def hello(self) -> None:
        """A keyed HELLO as a relay worker's: the transceiver now answers this link socket
        (the ROUTES it sends back are ignored)."""
        assert self.link.transport is not None
        hello = seal_hello(self.keyring, self.transceiver, time.time())
        self.link.transport.sendto(hello, self.transceiver)
        self._hello_at_s = time.monotonic()

    def _from_client(self, data: bytes, client: Address) -> None:
        assert self.link.transport is not None
        if time.monotonic() - self._hello_at_s >= self.hello_interval_s:
            self.hello()  # same socket, sent first: the transceiver reads it first
        self.link.transport.sendto(header_for(client) + data, self.transceiver)

    def _from_transceiver(self, data: bytes, _: Address) -> None:
        try:
            header = parse_header(data)
        except HeaderError:
            return
        if not header.is_control and self.public.transport is not None:
            self.public.transport.sendto(data[HEADER_BYTES:], header.client)

    def close(self) -> None:
        for side in (self.public, self.link):
            if side.transport is not None:
                side.transport.close()


def _free_v6(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", port))
    except OSError:
        return False
    return True


def udp_socket_count(pid: int) -> int:
    """UDP sockets a process holds: its socket fd inodes found in /proc/net/udp and udp6."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            udp.add(line.split()[9])
    return len(inodes & udp)


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{label value or "": value}`` of one Prometheus metric in an exposition text."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            label = head.partition('="')[2].rstrip('"}') if "{" in head else ""
            values[label] = float(value)
    return values


async def gauge(http: httpx.AsyncClient, base_url: str, name: str) -> float:
    return metric_values((await http.get(base_url + "/metrics")).text, name).get("", 0.0)


class Stack:
    """A relay (N workers, one public port) in front of M transceivers, on free loopback ports."""

    def __init__(
        self,
        log_dir: Path,
        transceivers: int = 2,
        workers: int = 2,
        dual_stack: bool = False,
        agent: str = "echo",
    ) -> None:
        self.keys = random_keys()
        self.secret_keys = random_secret_keys()
        self.log_dir = log_dir
        self.public = ("127.0.0.1", free_port())
        # The same port on ::1 too (dual stack), when it is free there.
        self.public_v6 = (
            ("::1", self.public[1]) if dual_stack and _free_v6(self.public[1]) else None
        )
        self.public_text = ",".join(text(a) for a in self.public_addresses)
        self.relay_http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.workers = workers
        self.links = [("127.0.0.1", free_port()) for _ in range(transceivers)]
        self.transceivers = [
            transceiver_process(
                f"transceiver{i}",
                link,
                ("127.0.0.1", free_port(socket.SOCK_STREAM)),
                self.public_text,
                self.keys,
                log_dir,
                {"TRANSCEIVER_SECRET_KEYS": self.secret_keys},
                agent=agent,
            )
            for i, link in enumerate(self.links)
        ]
        self.relay = self._relay()

    def _relay(self, **flags: Any) -> Process:
        return relay_process(
            self.public_text,
            self.links,
            self.keys,
            self.relay_http,
            self.log_dir,
            workers=self.workers,
            **flags,
        )

    @property
    def public_addresses(self) -> list[Address]:
        return [self.public] + ([self.public_v6] if self.public_v6 else [])

    def base_url(self, index: int) -> str:
        argv = self.transceivers[index].argv
        return "http://" + argv[argv.index("--http") + 1]

    async def start(self) -> Stack:
        for process in [*self.transceivers, self.relay]:
            process.start()
        for process in [*self.transceivers, self.relay]:
            await process.ready()
        await self.keyed()
        return self

    async def keyed(self, timeout_s: float = 5.0) -> None:
        """Wait until every transceiver takes data from every relay worker: a worker's first
        HELLO is lost if it went out before that transceiver bound its link (the next follows
        within the relay's ``hello_interval_s``)."""
        async with httpx.AsyncClient(timeout=timeout_s) as http:

            async def keyed() -> list[float]:
                urls = [self.base_url(index) for index in range(len(self.transceivers))]
                return [await gauge(http, url, "transceiver_link_keyed_relays") for url in urls]

            def unkeyed(counts: list[float]) -> str:
                index = next(i for i, n in enumerate(counts) if n < self.workers)
                return f"transceiver{index} never keyed the relay"

            await poll(keyed, lambda counts: min(counts) >= self.workers, timeout_s, unkeyed, 0.05)

    async def heal(self, ready_timeout_s: float = 20.0) -> Stack:
        """The stack made whole again after a step killed part of it (tests sharing one stack):
        each dead transceiver and a dead relay started again in its place (same ports, same
        keys), then every transceiver keyed by every relay worker."""
        for process in self.transceivers:
            if not process.alive():
                await process.start().ready(ready_timeout_s)
        if not self.relay.alive():
            await self.restart_relay()
        await self.keyed()
        return self

    async def restart_relay(self, **flags: Any) -> Process:
        """Start a fresh relay on the same public and HTTP ports (extra relay ``flags``)."""
        self.relay = self._relay(**flags)
        return await self.relay.start().ready()

    async def relay_metrics(self, http: httpx.AsyncClient) -> str:
        return (await http.get(f"http://{text(self.relay_http)}/metrics")).text

    async def stop(self) -> None:
        for process in [self.relay, *self.transceivers]:
            await process.stop()
