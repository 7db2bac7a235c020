"""``python -m loadtest relay``: authenticated sessions through a relay, at scale, on Locust.

Without ``--target`` it brings up a lab on this host first: a lab transceiver
(``loadtest.lab_transceiver``) and a relay (``python -m relay``) that lists it, with a fresh
keyring, and samples both from /proc. With ``--target`` it drives a relay someone else runs
(give the same keyring in ``LOADTEST_KEYS`` and the lab transceiver's link address the relay
knows in ``--transceiver``). Locust does the rest (``loadtest/locust_relay.py``): one user per
session, workers with one packet engine each, the report at the master.

    python -m loadtest relay --sessions 10000 --canaries 500 --spawn-rate 1000 --hold-s 60 \\
        --processes 2 --report-dir reports/relay
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

from deploy.processes import free_port
from deploy.redis_server import RedisServer
from loadtest.forwarders import (
    LOOPBACK,
    RELAY,
    ForwarderSpec,
    RunningForwarder,
    scrape_counters,
    start_forwarder,
)
from loadtest.sessions import new_keyring_spec

LOCUSTFILE = Path(__file__).resolve().parent / "locust_relay.py"
READY_TIMEOUT_S = 20.0
START_TIMEOUT_S = 120.0  # Locust's processes start and connect within this


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest relay", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="relay public HOST:PORT (default: start a local lab)")
    p.add_argument(
        "--transceiver", help="the lab transceiver's link HOST:PORT, as the relay knows it"
    )
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--spawn-rate", type=float, default=500.0, help="new sessions per second")
    p.add_argument("--hold-s", type=float, default=30.0)
    p.add_argument("--steps", default="", help="comma list of levels, each held --hold-s")
    p.add_argument("--canaries", type=int, default=100, help="sessions sending media at 50 pps")
    p.add_argument("--address-mode", choices=("pktinfo", "sockets"), default="pktinfo")
    p.add_argument("--consent-s", type=float, default=5.0)
    p.add_argument("--relay-workers", type=int, default=1, help="local lab: workers per relay")
    p.add_argument("--relays", type=int, default=1, help="local lab: relays sharing the port")
    p.add_argument(
        "--fault", default="", help="local lab: relay@SECONDS kills relay 0 that long into the run"
    )
    p.add_argument("--processes", type=int, default=0, help="Locust worker processes on this host")
    p.add_argument("--master", action="store_true")
    p.add_argument("--expect-workers", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--master-host", default="127.0.0.1")
    p.add_argument(
        "--master-port",
        type=int,
        default=0,
        help="Locust master port (default: 5557 across hosts, a free one with --processes)",
    )
    p.add_argument("--server-pids", default="", help="NAME:PID,... to sample from /proc")
    p.add_argument("--server-metrics", default="", help="NAME=HOST:PORT,... /metrics to scrape")
    p.add_argument("--report-dir", type=Path, default=Path("loadtest-report/relay"))
    p.add_argument(
        "--no-figures", action="store_true", help="the JSON report and summary, no PNG figures"
    )
    return p


def locust_command(
    args: argparse.Namespace, target: str, transceiver: str, servers: str
) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    if args.worker:
        port = str(args.master_port or 5557)
        return [*command, "--worker", "--master-host", args.master_host, "--master-port", port]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    command += [
        "--csv",
        str(args.report_dir / "locust"),
        "--html",
        str(args.report_dir / "locust.html"),
    ]
    command += ["--stop-timeout", "10", "--exit-code-on-error", "0"]
    command += ["--expect-workers-max-wait", "120"]  # a worker that never comes: stop
    if args.master:
        command += ["--master", "--expect-workers", str(args.expect_workers)]
        command += ["--master-bind-port", str(args.master_port or 5557)]
    elif args.processes:
        # workers forked on this host find the master on this port: never another run's
        command += ["--processes", str(args.processes)]
        port = str(args.master_port or free_port(socket.SOCK_STREAM))
        command += ["--master-bind-port", port, "--master-port", port]
    return [
        *command,
        *("--lt-target", target, "--lt-transceiver", transceiver),
        *("--lt-sessions", str(args.sessions), "--lt-spawn-rate", str(args.spawn_rate)),
        *("--lt-hold-s", str(args.hold_s), "--lt-steps", args.steps),
        *("--lt-canaries", str(args.canaries), "--lt-address-mode", args.address_mode),
        *("--lt-consent-s", str(args.consent_s), "--lt-report-dir", str(args.report_dir)),
        *("--lt-server-pids", servers, "--lt-server-metrics", args.server_metrics),
        *("--lt-fault", args.fault),
        *(["--lt-no-figures"] if args.no_figures else []),
    ]


def start_lab_transceiver(
    stack: ExitStack, env: dict[str, str], flags: Sequence[str] = ()
) -> tuple[str, int, int]:
    """Start ``python -m loadtest lab-transceiver`` on loopback: (host, port, pid)."""
    log = Path(tempfile.mkdtemp(prefix="lab-transceiver-")) / "lab.log"
    sink = stack.enter_context(log.open("wb"))
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "loadtest", "lab-transceiver", "--listen", f"{LOOPBACK}:0"),
            *flags,
        ],
        stdout=sink,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    stack.callback(_stop, process)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("lab-transceiver listening on "):
                host, _, port = line.rsplit(" ", 1)[1].rpartition(":")
                return host, int(port), process.pid
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the lab transceiver did not start; see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _become(command: list[str], env: dict[str, str]) -> NoReturn:
    """Replace this process with Locust: signals (a pod's SIGTERM) reach it directly."""
    sys.stdout.flush()
    os.execve(command[0], command, env)


def start_lab(args: argparse.Namespace, stack: ExitStack, env: dict[str, str]) -> Lab:
    """A lab transceiver and ``--relays`` relay processes sharing one public port (the
    kernel's SO_REUSEPORT hashing stands in for a load balancer in front of several relays),
    with a Redis route cache when there is more than one relay (a survivor finds the routes
    of a dead relay's clients there)."""
    env["LOADTEST_KEYS"] = env.get("LOADTEST_KEYS") or new_keyring_spec()
    workdir = Path(tempfile.mkdtemp(prefix="relay-lab-"))
    lab_flags: list[str] = []
    relay_flags: tuple[str, ...] = ()
    if args.relays > 1:
        redis = RedisServer(workdir, "redis").start()
        stack.callback(redis.stop)
        lab_flags = ["--redis-url", redis.url]
        relay_flags = ("--redis-url", redis.url)
    host, port, lab_pid = start_lab_transceiver(stack, env, lab_flags)
    public = (LOOPBACK, free_port())
    relays = []
    for number in range(args.relays):
        spec = ForwarderSpec(
            RELAY,
            args.relay_workers,
            public,
            (host, port),
            env["LOADTEST_KEYS"],
            http=(LOOPBACK, free_port(socket.SOCK_STREAM)),
            extra=relay_flags,
        )
        relay = start_forwarder(spec, Path("/nonexistent"), workdir / f"relay-{number}")
        stack.callback(relay.stop)
        relays.append(relay)
    return Lab(f"{public[0]}:{public[1]}", f"{host}:{port}", lab_pid, relays)


class Lab:
    def __init__(
        self, target: str, transceiver: str, lab_pid: int, relays: list[RunningForwarder]
    ) -> None:
        self.target = target
        self.transceiver = transceiver
        self.lab_pid = lab_pid
        self.relays = relays

    def drops(self) -> dict[str, float]:
        """The live relays' dropped datagrams by reason, summed (a dead relay counts no more)."""
        total: dict[str, float] = {}
        for relay in self.relays:
            if relay.process.poll() is not None:
                continue
            with contextlib.suppress(OSError):
                for name, value in scrape_counters(relay.spec.http).items():
                    if name.startswith("relay_dropped_packets"):
                        reason = name.partition("reason=")[2].rstrip("}")
                        total[reason] = total.get(reason, 0.0) + value
        return total

    def servers(self) -> str:
        names = [f"relay{i}:{r.process.pid}" for i, r in enumerate(self.relays)]
        if len(self.relays) == 1:
            names = [f"relay:{self.relays[0].process.pid}"]
        return ",".join([*names, f"lab:{self.lab_pid}"])


def add_relay_drops(report_dir: Path, before: dict[str, float], after: dict[str, float]) -> None:
    """Put the lab relays' drops during the run, by reason, into the report the master wrote
    (the relay counts them; the master has no address for its /metrics)."""
    path = report_dir / "report.json"
    if not path.exists():
        return
    report = json.loads(path.read_text())
    report["relay_drops"] = {
        reason: int(value - before.get(reason, 0.0))
        for reason, value in sorted(after.items())
        if value - before.get(reason, 0.0) > 0
    }
    path.write_text(json.dumps(report, indent=1))
    shown = ", ".join(f"{k} {v:,}" for k, v in report["relay_drops"].items()) or "none"
    print(f"relay drops during the run: {shown}", flush=True)
    with (report_dir / "summary.txt").open("a") as summary:
        summary.write(f"relay drops during the run: {shown}\n")


def parse_fault(text: str) -> tuple[str, float] | None:
    if not text:
        return None
    kind, _, at = text.partition("@")
    if kind != "relay" or not at:
        raise SystemExit(f"--fault: expected relay@SECONDS, got {text!r}")
    return kind, float(at)


def kill_relay_later(lab: Lab, at_s: float, report_dir: Path, done: threading.Event) -> None:
    """SIGKILL the first relay's whole process tree ``at_s`` seconds after the test started
    (the master writes ``started.json`` then), unless the run ends first; note when."""
    started = report_dir / "started.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not started.exists():
        if done.wait(0.05) or time.monotonic() > deadline:
            return
    begun = json.loads(started.read_text())["unix_s"]
    if done.wait(max(0.0, begun + at_s - time.time())):
        return
    relay = lab.relays[0]
    relay.refresh_pids()
    killed_at = time.time()
    for pid in relay.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "fault.json").write_text(
        json.dumps({"kind": "relay", "killed_unix_s": killed_at, "pids": list(relay.pids)})
    )
    print(f"fault: killed relay 0 (pids {list(relay.pids)}) at +{at_s:.1f} s", flush=True)


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fault = parse_fault(args.fault)
    if args.worker:
        _become(locust_command(args, "", "", ""), env)
    if args.target is not None:
        if "LOADTEST_KEYS" not in env:
            print("set LOADTEST_KEYS to the relay's keyring (ID:HEX)", file=sys.stderr)
            return 2
        if not args.transceiver or fault:
            print("--target needs --transceiver, and takes no --fault", file=sys.stderr)
            return 2
        _become(locust_command(args, args.target, args.transceiver, args.server_pids), env)
    if fault and args.relays < 2:
        print("--fault relay@S needs --relays 2 or more (a survivor)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        (args.report_dir / "started.json").unlink(missing_ok=True)
        (args.report_dir / "fault.json").unlink(missing_ok=True)
        lab = start_lab(args, stack, env)
        servers = ",".join(filter(None, [args.server_pids, lab.servers()]))
        print(
            f"lab: {args.relays} relay(s) on {lab.target} ({args.relay_workers} workers each), "
            f"transceiver {lab.transceiver}",
            flush=True,
        )
        done = threading.Event()
        if fault:
            killer = threading.Thread(
                target=kill_relay_later, args=(lab, fault[1], args.report_dir, done), daemon=True
            )
            killer.start()
        before = lab.drops()
        try:
            code = subprocess.call(
                locust_command(args, lab.target, lab.transceiver, servers), env=env
            )
        finally:
            done.set()
        add_relay_drops(args.report_dir, before, lab.drops())
        return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
