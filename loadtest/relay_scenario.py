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
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

from loadtest.forwarders import (
    LOOPBACK,
    RELAY,
    ForwarderSpec,
    free_udp_port,
    start_forwarder,
)
from loadtest.sessions import new_keyring_spec

LOCUSTFILE = Path(__file__).resolve().parent / "locust_relay.py"
READY_TIMEOUT_S = 20.0


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
    p.add_argument("--relay-workers", type=int, default=1, help="local lab: relay worker processes")
    p.add_argument("--processes", type=int, default=0, help="Locust worker processes on this host")
    p.add_argument("--master", action="store_true")
    p.add_argument("--expect-workers", type=int, default=1)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--master-host", default="127.0.0.1")
    p.add_argument("--server-pids", default="", help="NAME:PID,... to sample from /proc")
    p.add_argument("--server-metrics", default="", help="NAME=HOST:PORT,... /metrics to scrape")
    p.add_argument("--report-dir", type=Path, default=Path("loadtest-report/relay"))
    return p


def locust_command(
    args: argparse.Namespace, target: str, transceiver: str, servers: str
) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    if args.worker:
        return [*command, "--worker", "--master-host", args.master_host]
    args.report_dir.mkdir(parents=True, exist_ok=True)
    command += [
        "--csv",
        str(args.report_dir / "locust"),
        "--html",
        str(args.report_dir / "locust.html"),
    ]
    command += ["--stop-timeout", "10", "--exit-code-on-error", "0"]
    if args.master:
        command += ["--master", "--expect-workers", str(args.expect_workers)]
    elif args.processes:
        command += ["--processes", str(args.processes)]
    return [
        *command,
        *("--lt-target", target, "--lt-transceiver", transceiver),
        *("--lt-sessions", str(args.sessions), "--lt-spawn-rate", str(args.spawn_rate)),
        *("--lt-hold-s", str(args.hold_s), "--lt-steps", args.steps),
        *("--lt-canaries", str(args.canaries), "--lt-address-mode", args.address_mode),
        *("--lt-consent-s", str(args.consent_s), "--lt-report-dir", str(args.report_dir)),
        *("--lt-server-pids", servers, "--lt-server-metrics", args.server_metrics),
    ]


def start_lab_transceiver(stack: ExitStack, env: dict[str, str]) -> tuple[str, int, int]:
    """Start ``python -m loadtest lab-transceiver`` on loopback: (host, port, pid)."""
    log = Path(tempfile.mkdtemp(prefix="lab-transceiver-")) / "lab.log"
    sink = stack.enter_context(log.open("wb"))
    process = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "lab-transceiver", "--listen", f"{LOOPBACK}:0"],
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


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with ExitStack() as stack:
        servers = args.server_pids
        if args.worker:
            _become(locust_command(args, "", "", ""), env)
        if args.target is None:
            env["LOADTEST_KEYS"] = env.get("LOADTEST_KEYS") or new_keyring_spec()
            lab_host, lab_port, lab_pid = start_lab_transceiver(stack, env)
            public = (LOOPBACK, free_udp_port())
            spec = ForwarderSpec(
                RELAY, args.relay_workers, public, (lab_host, lab_port), env["LOADTEST_KEYS"]
            )
            logs = Path(tempfile.mkdtemp(prefix="lab-relay-"))
            relay = start_forwarder(spec, Path("/nonexistent"), logs)
            stack.callback(relay.stop)
            target, transceiver = f"{public[0]}:{public[1]}", f"{lab_host}:{lab_port}"
            servers = ",".join(
                filter(None, [servers, f"relay:{relay.process.pid}", f"lab:{lab_pid}"])
            )
            print(
                f"lab: relay {target} ({args.relay_workers} workers), transceiver {transceiver}",
                flush=True,
            )
        else:
            if "LOADTEST_KEYS" not in env:
                print("set LOADTEST_KEYS to the relay's keyring (ID:HEX)", file=sys.stderr)
                return 2
            if not args.transceiver:
                print("--transceiver is required with --target", file=sys.stderr)
                return 2
            target, transceiver = args.target, args.transceiver
            _become(locust_command(args, target, transceiver, servers), env)
        return subprocess.call(locust_command(args, target, transceiver, servers), env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
