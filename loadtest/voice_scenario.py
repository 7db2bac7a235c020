"""``python -m loadtest voice``: real WebRTC voice calls against a stack, run by Locust.

Against a running stack (``--url``; its API key from ``TRANSCEIVER_API_KEY``) or a local one it
starts (``--local offline``: the embedded pipeline; ``--local api``: the OpenAI-compatible
providers against the fake OpenAI server on loopback). Three shapes:

- ``--calls N --turns K``: N calls at once, K turns each;
- ``--long-call K``: one call of K turns: turn latency and server RSS by turn number;
- ``--knee``: steps of sessions (``--steps``) held ``--step-s`` each, until turn p95 passes
  ``--threshold`` x the one-call figure or anything fails; the last good step in sessions per
  transceiver core (server CPU from /proc).

Locust runs as a subprocess (``python -m locust -f loadtest/locust_voice.py --headless``); this
module never imports it. The questions are spoken by piper and encoded to Opus once per run.
Writes ``--report-dir``: ``voice.json`` (the report), Locust's CSV and HTML, the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.fake_openai import FakeOpenAIServer
from deploy.launched import launched
from deploy.processes import free_port
from loadtest.voice_calls import spoken_questions

LOCUSTFILE = Path(__file__).resolve().with_name("locust_voice.py")
REPORT_NAME = "voice.json"
SERVER_NAMES = ("transceiver", "relay", "redis")  # the stack's processes measured as the server
MARGIN_S = 120  # run-time bound beyond what the shape itself needs


@dataclass(frozen=True)
class Target:
    url: str
    server_pids: str  # "name=pid,..." of processes on this host, or ""
    providers_pid: int | None = None  # the fake OpenAI server's, when we started one


@contextlib.contextmanager
def local_stack(mode: str) -> Iterator[Target]:
    """``make run``'s stack on free loopback ports, the pipeline agent offline or against the
    fake OpenAI server (which is then a provider, not part of the server measured)."""
    with contextlib.ExitStack() as held:
        env = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
        fake = None
        if mode == "api":
            fake = held.enter_context(FakeOpenAIServer())
            env = {"OPENAI_API_KEY": "sk-local-load", "OPENAI_BASE_URL": fake.base_url + "/v1"}
        stack = held.enter_context(launched(["--agent", "pipeline"], env=env))
        named = {n: p for n, p in stack.child_pids.items() if n.startswith(SERVER_NAMES)}
        pids = ",".join(f"{name}={pid}" for name, pid in named.items())
        yield Target(stack.url, pids, fake.pid if fake else None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest voice", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default="", help="a running stack's base URL")
    where.add_argument("--local", choices=("offline", "api"), help="start a local stack")
    parser.add_argument("--server-pids", default="", help="with --url: name=pid,... here")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--spawn-rate", type=float, default=1.0)
    parser.add_argument("--turns", type=int, default=2, help="per call; 0: until stopped")
    parser.add_argument("--long-call", type=int, default=0, metavar="TURNS")
    parser.add_argument("--knee", action="store_true")
    parser.add_argument("--steps", default="1,2,4,6,8,10,12,16,20,24,32")
    parser.add_argument("--step-s", type=float, default=30.0)
    parser.add_argument("--threshold", type=float, default=1.5)
    parser.add_argument("--baseline-ms", type=float, default=0.0, help="one-call turn p95")
    parser.add_argument("--processes", type=int, default=1, help="Locust worker processes")
    parser.add_argument("--master", action="store_true", help="Locust master only")
    parser.add_argument("--expect-workers", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help="Locust worker only")
    parser.add_argument("--master-host", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=5557, help="--master/--worker")
    parser.add_argument("--report-dir", type=Path, default=Path("loadtest-reports/voice"))
    parser.add_argument("--loglevel", default="WARNING", help="Locust's")
    parser.add_argument("--run-time-s", type=float, default=0.0, help="bound (default: fitted)")
    return parser


def run_time_s(args: argparse.Namespace) -> float:
    """How long the shape may need, plus a margin: Locust's own bound on the run."""
    if args.run_time_s:
        return float(args.run_time_s)
    if args.knee:
        return len(args.steps.split(",")) * float(args.step_s) + MARGIN_S
    turns = int(args.long_call or max(args.turns, 1))
    return turns * 30.0 + MARGIN_S


def locust_argv(args: argparse.Namespace, target: Target, questions: Path) -> list[str]:
    out = args.report_dir
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    argv += ["--csv", str(out / "locust"), "--html", str(out / "locust.html")]
    argv += ["--run-time", f"{int(run_time_s(args))}s", "--stop-timeout", "10"]
    argv += ["--loglevel", args.loglevel]
    if args.worker:
        argv += ["--worker", "--master-host", args.master_host]
        argv += ["--master-port", str(args.master_port)]
    elif args.master:
        argv += ["--master", "--expect-workers", str(args.expect_workers)]
        argv += ["--master-bind-port", str(args.master_port)]
    else:  # a master and its forked workers, on a port of their own (not another run's)
        port = str(free_port(socket.SOCK_STREAM))
        argv += ["--processes", str(args.processes)]
        argv += ["--master-bind-port", port, "--master-port", port]
    config = {
        "url": target.url,
        "local": args.local or "",
        "calls": 1 if args.long_call else args.calls,
        "turns": args.long_call or args.turns,
        "mode": "knee" if args.knee else "long_call" if args.long_call else "fixed",
        "workers": args.processes if not (args.master or args.worker) else args.expect_workers,
        "server_pids": target.server_pids,
        "load_average": _load_average(),
    }
    argv += ["--voice-url", target.url, "--voice-questions", str(questions)]
    argv += ["--voice-turns", str(args.turns), "--voice-calls", str(args.calls)]
    argv += ["--voice-spawn-rate", str(args.spawn_rate)]
    argv += ["--voice-long-call", str(args.long_call), "--voice-steps", args.steps]
    argv += ["--voice-step-s", str(args.step_s), "--voice-threshold", str(args.threshold)]
    argv += ["--voice-baseline-ms", str(args.baseline_ms)]
    argv += ["--voice-server-pids", target.server_pids, "--voice-config", json.dumps(config)]
    argv += ["--voice-report", str(out / REPORT_NAME)] + (["--voice-knee"] if args.knee else [])
    return argv


def _load_average() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().strip()
    return ""


def run_locust(args: argparse.Namespace, target: Target) -> int:
    args.report_dir.mkdir(parents=True, exist_ok=True)
    questions = args.report_dir / "questions.json"
    questions.write_text(asyncio.run(spoken_questions()).to_json())
    argv = locust_argv(args, target, questions)
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(argv, cwd=root, timeout=run_time_s(args) + MARGIN_S, check=False)
    except subprocess.TimeoutExpired:
        print("locust outlived its bound and was killed", file=sys.stderr)
        return 1
    return done.returncode


def summarise(report_dir: Path) -> None:
    """The figures and the verdict, when the report exists (and ``loadtest.figures`` does)."""
    path = report_dir / REPORT_NAME
    if not path.exists():
        print(f"no report written at {path}", file=sys.stderr)
        return
    report: dict[str, Any] = json.loads(path.read_text())
    try:
        from loadtest import figures
    except ImportError:
        print(json.dumps({k: report[k] for k in ("setup", "turns", "knee", "client")}, indent=2))
        return
    for drawn in figures.draw(report, report_dir):
        print(f"wrote {drawn}")
    print(figures.summary(report))


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if not (args.url or args.local or args.master):
        _parser().error("give --url of a running stack or --local offline|api")
    with contextlib.ExitStack() as held:
        if args.local and not args.worker:
            target = held.enter_context(local_stack(args.local))
        else:
            target = Target(args.url, args.server_pids)
        code = run_locust(args, target)
    if not args.worker:
        summarise(args.report_dir)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
