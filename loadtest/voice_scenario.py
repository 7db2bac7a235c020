"""``python -m loadtest voice``: real WebRTC voice calls against a stack, run by Locust.

Against a running stack (``--url``; its API key from ``TRANSCEIVER_API_KEY``) or a local one it
starts (``--local offline``: the embedded pipeline; ``--local api``: the OpenAI-compatible
providers against the fake OpenAI server on loopback). Three shapes:

- ``--calls N --turns K``: N calls at once, K turns each;
- ``--long-call K``: one call of K turns: turn latency and server RSS by turn number;
- ``--knee``: steps of sessions (``--steps``) held ``--step-s`` each, until turn p95 passes
  ``--threshold`` x the one-call figure or anything fails; the last good step in sessions per
  transceiver core (server CPU from /proc).

A transceiver fault (``--fault transceiver@S``, with ``--local``; the stack then has
``--transceivers`` 2 or more behind its front door): S seconds after the test starts, the
scenario SIGKILLs (by PID, with its child processes) the transceiver holding the most calls
(waiting, if none holds one yet, for one that has sent a ``session.created``). Each call on
it notices its media stop (``--silence-s`` without a packet), posts a resume offer with its
session id and resume token through the front door, which passes over the dead transceiver,
waits for ``session.created`` and asks the cut question again. The report's ``faults``
section gives, per affected call, the ms from the kill to the resume's 201, its
``session.created``, the first packet from the new transceiver (media again: the gap) and
the first answer audio of the re-asked question; what was lost: the turn cut, whether the
stored conversation came back (``conversation.item.added`` replayed on resume, against two
items per answered turn), the calls that could not resume and why. Its p50/p99 are printed.

**Calls per core.** ``--confine-cores C`` (and/or ``--confine-cpus LIST``) puts the local
stack's transceivers in a cgroup of their own (``loadtest.cpu_confinement``: a quota of C cores
per ``--confine-period-us``, 10 ms by default so a throttled stall stays short, and the cores
of the cpuset), and ``--generator-cpus LIST`` pins Locust and its driver children elsewhere, and
with the transceivers confined, this process and the rest of what it started too (the fake
providers, Redis, the relay: their every thread), so the transceivers' cores are theirs alone: the
knee is then in calls per confined core (knee calls / confined cores), with the group's
throttling per step. Where cgroups cannot be written it says so and measures unconfined.
``--media-paths lean,aiortc`` runs the knee once per media path (``TRANSCEIVER_MEDIA_PATH``),
each on a fresh stack, in the order given (repeat a path to interleave), side by side in one
``paths.json`` and one figure (``loadtest.voice_paths``).

Locust runs as a subprocess (``python -m locust -f loadtest/locust_voice.py --headless``); this
module never imports it. The questions (``--question``, else ``voice_calls.QUESTIONS``) are
spoken by piper and encoded to Opus once per run, while the local stack starts. Writes
``--report-dir``: ``voice.json`` (the report), Locust's CSV and HTML, the figures (not with
``--no-figures``) and ``summary.txt`` (the summary it prints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from deploy.launched import launched
from deploy.processes import free_port
from loadtest.cpu_confinement import (
    DEFAULT_PERIOD_US,
    CgroupUnavailable,
    Confinement,
    CpuLimit,
    parse_cpus,
    pin_threads,
)
from loadtest.hosts import metric_samples, process_tree
from loadtest.voice_calls import CLIENTS, QUESTIONS, SILENCE_RESUME_S, spoken_questions
from transceiver.config import MEDIA_PATHS

LOCUSTFILE = Path(__file__).resolve().with_name("locust_voice.py")
REPORT_NAME = "voice.json"
SERVER_NAMES = ("transceiver", "relay", "redis")  # the stack's processes measured as the server
MARGIN_S = 120  # run-time bound beyond what the shape itself needs
STARTED_FILE, FAULT_FILE = "started.json", "fault.json"  # beside the report (locust_voice)
START_TIMEOUT_S = 180.0  # Locust starts its test within this
HOLDER_TIMEOUT_S = 60.0  # after S, a transceiver holds a call within this, or nothing is killed
POLL_S = 0.1
SESSIONS_METRIC = "transceiver_link_sessions"
MEDIA_PATH_ENV = "TRANSCEIVER_MEDIA_PATH"
PREWARM_ENV = "PIPELINE_SPEECH_PREWARM"
CREATED_METRIC = "transceiver_realtime_events_total{direction=server,type=session.created}"


@dataclass(frozen=True)
class Transceiver:
    name: str  # as deploy.local names it: transceiver-0, transceiver-1, ...
    pid: int
    url: str  # its own HTTP listener (behind the front door)


@dataclass(frozen=True)
class Confined:
    """The transceivers' cgroup, as the Locust master reads it."""

    cores: float  # the CPU they were given (quota, else the cpuset's cores)
    stat_path: str  # the group's cpu.stat ("" without a quota)
    described: dict[str, Any]


@dataclass(frozen=True)
class Target:
    url: str
    server_pids: str  # "name=pid,..." of processes on this host, or ""
    providers_pid: int | None = None  # the fake OpenAI server's, when we started one
    transceivers: tuple[Transceiver, ...] = ()  # when we started the stack
    confined: Confined | None = None  # the transceivers' cgroup, when they were confined
    unconfined_why: str = ""  # why they could not be, when asked
    favoured: str = ""  # --favour-stack: how many processes were favoured, or why none


@contextlib.contextmanager
def local_stack(
    mode: str, transceivers: int = 1, media_path: str = "", speech_prewarm: bool = True
) -> Iterator[Target]:
    """``make run``'s stack on free loopback ports, the pipeline agent offline or against the
    fake OpenAI server (which is then a provider, not part of the server measured); with
    several transceivers, behind deploy.local's front door (``Target.url``); ``media_path``:
    the transceivers' ``TRANSCEIVER_MEDIA_PATH`` ("" leaves the environment's); not
    ``speech_prewarm``: the offline agent's fixed replies are not spoken as a transceiver starts
    (``PIPELINE_SPEECH_PREWARM=0``, where ``make run`` has 1)."""
    with contextlib.ExitStack() as held:
        env = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}
        fake = None
        if mode == "api":
            from deploy.fake_openai import FakeOpenAIServer  # its imports (fastapi): "api" only

            fake = held.enter_context(FakeOpenAIServer())
            env = {"OPENAI_API_KEY": "sk-local-load", "OPENAI_BASE_URL": fake.base_url + "/v1"}
        if media_path:
            env["TRANSCEIVER_MEDIA_PATH"] = media_path
        if not speech_prewarm:
            env[PREWARM_ENV] = "0"
        flags = ["--agent", "pipeline", "--transceivers", str(transceivers)]
        stack = held.enter_context(launched(flags, env=env))
        named = {n: p for n, p in stack.child_pids.items() if n.startswith(SERVER_NAMES)}
        pids = ",".join(f"{name}={pid}" for name, pid in named.items())
        own = tuple(
            Transceiver(f"transceiver-{i}", stack.child_pids[f"transceiver-{i}"], url)
            for i, url in enumerate(stack.transceiver_urls)
        )
        yield Target(stack.url, pids, fake.pid if fake else None, own)


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
    parser.add_argument(
        "--transceivers", type=int, default=0, help="with --local (default: 1, 2 with --fault)"
    )
    parser.add_argument(
        "--fault",
        default="",
        metavar="transceiver@S",
        help="with --local: SIGKILL a transceiver holding calls S s into the test",
    )
    parser.add_argument(
        "--silence-s",
        type=float,
        default=SILENCE_RESUME_S,
        help="a call resumes elsewhere after this long without media (0: never)",
    )
    parser.add_argument("--refine", type=int, default=0, help="knee: bisect to this many calls")
    parser.add_argument(
        "--first-step-s", type=float, default=0.0, help="knee: the one-call step's hold"
    )
    parser.add_argument(
        "--client", choices=CLIENTS, default="lean", help="the calls' media (voice_calls)"
    )
    parser.add_argument(
        "--question",
        action="append",
        metavar="TEXT",
        help="a question the calls ask, in turn (repeat for more; default: "
        + " / ".join(QUESTIONS)
        + ")",
    )
    parser.add_argument(
        "--no-figures", action="store_true", help="the summary only, no PNG figures"
    )
    parser.add_argument(
        "--no-speech-prewarm",
        dest="speech_prewarm",
        action="store_false",
        help="with --local: the transceivers do not speak the offline agent's fixed replies as "
        "they start (~5 CPU-s each, spent while the first calls run; unused by questions whose "
        "answers are not among them, such as the time)",
    )
    confine = parser.add_argument_group("calls per core (with --local; cgroups, as root)")
    confine.add_argument("--confine-cores", type=float, default=0.0, help="transceiver quota")
    confine.add_argument("--confine-period-us", type=int, default=DEFAULT_PERIOD_US)
    confine.add_argument("--confine-cpus", default="", help="transceiver cpuset, e.g. 1")
    confine.add_argument(
        "--generator-cpus",
        default="",
        help="Locust's cores (taskset), e.g. 0; with the transceivers confined, the rest's too",
    )
    confine.add_argument(
        "--favour-stack",
        action="store_true",
        help="this process, Locust and the stack (the transceivers too, unless confined) in a "
        "cgroup of the highest weight: on a shared machine they run before other work",
    )
    confine.add_argument("--media-paths", default="", help="knee per path, e.g. lean,aiortc")
    return parser


def run_time_s(args: argparse.Namespace) -> float:
    """How long the shape may need, plus a margin: Locust's own bound on the run."""
    if args.run_time_s:
        return float(args.run_time_s)
    if args.knee:
        steps = [int(n) for n in args.steps.split(",") if n]
        bisections = math.ceil(math.log2(max(steps))) if args.refine and max(steps) > 1 else 0
        held_s = (len(steps) + bisections) * float(args.step_s) + float(args.first_step_s)
        return held_s + MARGIN_S
    turns = int(args.long_call or max(args.turns, 1))
    return turns * 30.0 + MARGIN_S


def locust_argv(args: argparse.Namespace, target: Target, questions: Path) -> list[str]:
    out = args.report_dir
    pinned = ["taskset", "-c", args.generator_cpus] if args.generator_cpus else []
    argv = [*pinned, sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
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
        "client": args.client,
    }
    if target.transceivers:
        config["transceivers"] = len(target.transceivers)
    if not args.speech_prewarm:
        config["speech_prewarm"] = False  # the stack's transceivers were started without it
    if args.fault:
        config |= {"fault": args.fault, "silence_s": args.silence_s}
    config |= _confinement_config(args, target)
    argv += ["--voice-url", target.url, "--voice-questions", str(questions)]
    argv += ["--voice-turns", str(args.turns), "--voice-calls", str(args.calls)]
    argv += ["--voice-spawn-rate", str(args.spawn_rate)]
    argv += ["--voice-long-call", str(args.long_call), "--voice-steps", args.steps]
    argv += ["--voice-step-s", str(args.step_s), "--voice-threshold", str(args.threshold)]
    argv += ["--voice-baseline-ms", str(args.baseline_ms)]
    argv += ["--voice-silence-s", str(args.silence_s)]
    argv += ["--voice-server-pids", target.server_pids, "--voice-config", json.dumps(config)]
    argv += ["--voice-report", str(out / REPORT_NAME)] + (["--voice-knee"] if args.knee else [])
    argv += ["--voice-refine", str(args.refine), "--voice-client", args.client]
    argv += ["--voice-first-step-s", str(args.first_step_s)]
    if target.transceivers:
        argv += ["--voice-metrics-urls", ",".join(t.url for t in target.transceivers)]
    if target.confined is not None:
        argv += ["--voice-cgroup-stat", target.confined.stat_path]
        argv += ["--voice-confined-cores", str(target.confined.cores)]
    return argv


def _confinement_config(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    """What the report's config says of the media path, the confinement and the pinning."""
    config: dict[str, Any] = {"media_path": args.media_path or os.environ.get(MEDIA_PATH_ENV, "")}
    if args.generator_cpus:
        config["generator_cpus"] = args.generator_cpus
    if target.favoured:
        config["favoured_stack"] = target.favoured
    if target.confined is not None:
        config["confinement"] = target.confined.described
    elif args.confine_cores or args.confine_cpus:
        config["confinement"] = {"unavailable": target.unconfined_why}
    return config


def _load_average() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().strip()
    return ""


def write_questions(args: argparse.Namespace) -> Path:
    """The questions (``--question``, else ``QUESTIONS``) spoken by piper and encoded, in the
    report directory for the driver children."""
    args.report_dir.mkdir(parents=True, exist_ok=True)
    questions: Path = args.report_dir / "questions.json"
    texts = args.question or QUESTIONS
    questions.write_text(asyncio.run(spoken_questions(texts)).to_json())
    return questions


def run_locust(args: argparse.Namespace, target: Target, questions: Path) -> int:
    argv = locust_argv(args, target, questions)
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(argv, cwd=root, timeout=run_time_s(args) + MARGIN_S, check=False)
    except subprocess.TimeoutExpired:
        print("locust outlived its bound and was killed", file=sys.stderr)
        return 1
    return done.returncode


def summarise(report_dir: Path, draw: bool = True) -> None:
    """The figures (unless not ``draw``) and the verdict, when the report exists (and
    ``loadtest.figures`` does)."""
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
    for drawn in figures.draw(report, report_dir) if draw else []:
        print(f"wrote {drawn}")
    text = figures.summary(report)
    if report.get("steps"):
        from loadtest.voice_report import where_time_goes

        text += "\n" + where_time_goes(report["steps"])
    (report_dir / "summary.txt").write_text(text + "\n")
    print(text)


# --- the transceiver fault ------------------------------------------------------------------


def parse_fault(text: str) -> float | None:
    """``transceiver@S`` -> S (seconds after the test starts); "" -> None."""
    if not text:
        return None
    kind, _, at = text.partition("@")
    try:
        at_s = float(at)
    except ValueError:
        at_s = -1.0
    if kind != "transceiver" or at_s < 0:
        raise SystemExit(f"--fault: expected transceiver@SECONDS, got {text!r}")
    return at_s


def holding_calls(transceivers: Sequence[Transceiver]) -> tuple[Transceiver, int] | None:
    """The live transceiver with the most sessions on its link, among those that have sent a
    ``session.created`` (from each one's /metrics); None while none has, or while it would be
    the last one alive."""
    found: list[tuple[int, Transceiver]] = []
    for transceiver in transceivers:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            text = httpx.get(transceiver.url.rstrip("/") + "/metrics", timeout=1.0).text
            samples = metric_samples(text, "transceiver_")
            sessions = int(samples.get(SESSIONS_METRIC, 0))
            found.append((sessions if samples.get(CREATED_METRIC, 0) else 0, transceiver))
    holders = [(n, t) for n, t in found if n > 0]
    if len(found) < 2 or not holders:
        return None
    sessions, transceiver = max(holders, key=lambda pair: pair[0])
    return transceiver, sessions


def kill_transceiver_later(
    transceivers: Sequence[Transceiver], at_s: float, report_dir: Path, done: threading.Event
) -> None:
    """``at_s`` after the test started (the master's ``started.json``), SIGKILL the transceiver
    holding the most calls and its child processes, by PID, unless the run ends first; write
    ``fault.json`` (read by the master for the report) and say so."""
    began = _started_unix_s(report_dir / STARTED_FILE, done)
    if began is None or done.wait(max(0.0, began + at_s - time.time())):
        print(f"fault: the run ended before +{at_s:g} s; no transceiver killed", flush=True)
        return
    deadline = time.monotonic() + HOLDER_TIMEOUT_S
    while (holder := holding_calls(transceivers)) is None:
        if done.wait(POLL_S) or time.monotonic() > deadline:
            print("fault: no transceiver held a call any more; none killed", flush=True)
            return
    victim, sessions = holder
    pids = process_tree(victim.pid)  # the transceiver first, then its children
    killed_at = time.time()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    record = {
        "kind": "transceiver",
        "name": victim.name,
        "pid": victim.pid,
        "pids": pids,
        "sessions": sessions,
        "killed_unix_s": killed_at,
        "at_s": round(killed_at - began, 2),
    }
    (report_dir / FAULT_FILE).write_text(json.dumps(record))
    print(
        f"fault: killed {victim.name} (pid {victim.pid}, {sessions} sessions) at "
        f"+{killed_at - began:.1f} s",
        flush=True,
    )


def _started_unix_s(path: Path, done: threading.Event) -> float | None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not done.wait(POLL_S) and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return float(json.loads(path.read_text())["unix_s"])
    return None


@contextlib.contextmanager
def fault_injected(args: argparse.Namespace, target: Target) -> Iterator[None]:
    """With ``--fault``: the killer thread for the run's duration (told to stop at its end)."""
    (args.report_dir / STARTED_FILE).unlink(missing_ok=True)
    (args.report_dir / FAULT_FILE).unlink(missing_ok=True)
    at_s = parse_fault(args.fault)
    if at_s is None:
        yield
        return
    args.report_dir.mkdir(parents=True, exist_ok=True)
    done = threading.Event()
    killer = threading.Thread(
        target=kill_transceiver_later,
        args=(target.transceivers, at_s, args.report_dir, done),
        name="transceiver fault",
        daemon=True,
    )
    killer.start()
    try:
        yield
    finally:
        done.set()
        killer.join(timeout=5.0)


def _check(args: argparse.Namespace) -> None:
    parser = _parser()
    if (args.confine_cores or args.confine_cpus or args.media_paths) and not args.local:
        parser.error("--confine-* and --media-paths are for the stack --local starts")
    unknown = set(filter(None, args.media_paths.split(","))) - set(MEDIA_PATHS)
    if unknown:
        parser.error(f"--media-paths: {', '.join(sorted(unknown))} not in {MEDIA_PATHS}")
    try:
        if args.confine_cores or args.confine_cpus:
            CpuLimit(args.confine_cores, args.confine_period_us, args.confine_cpus)
        for cpus in filter(None, (args.confine_cpus, args.generator_cpus)):
            parse_cpus(cpus)
    except ValueError as error:
        parser.error(f"confinement: {error}")
    if not (args.url or args.local or args.master):
        parser.error("give --url of a running stack or --local offline|api")
    if any(not text.strip() for text in args.question or ()):
        parser.error("--question: an empty question (piper would say nothing)")
    if args.transceivers and not args.local:
        parser.error("--transceivers is for the stack --local starts")
    if not args.speech_prewarm and not args.local:
        parser.error("--no-speech-prewarm is for the stack --local starts")
    if args.fault:
        parse_fault(args.fault)
        if not args.local or args.worker or args.master:
            parser.error("--fault kills a process this starts: it needs --local")
        if args.transceivers == 1:
            parser.error("--fault needs --transceivers 2 or more (a survivor to resume on)")


def favour(args: argparse.Namespace, held: contextlib.ExitStack) -> str:
    """With ``--favour-stack``: this process and its children (the stack, and Locust started
    later) in a favoured cgroup until the run ends; "" or why it could not be."""
    if not args.favour_stack:
        return ""
    try:
        group = held.enter_context(
            Confinement(CpuLimit(favoured=True), f"voicerelay-stack-{os.getpid()}")
        )
    except CgroupUnavailable as why:
        print(f"--favour-stack unavailable ({why})", file=sys.stderr)
        return f"unavailable: {why}"
    return f"{len(group.add(os.getpid()))} processes"


def confine(args: argparse.Namespace, target: Target, held: contextlib.ExitStack) -> Target:
    """The transceivers moved into a cgroup of their own (held until the run ends), when asked
    to; a host that cannot is said so (stderr and the report) and measured unconfined."""
    favoured = favour(args, held)
    if favoured:
        target = replace(target, favoured=favoured)
    if not (args.confine_cores or args.confine_cpus):
        return target
    limit = CpuLimit(args.confine_cores, args.confine_period_us, args.confine_cpus)
    try:
        group = held.enter_context(Confinement(limit, f"voicerelay-transceivers-{os.getpid()}"))
    except CgroupUnavailable as why:
        print(f"confinement unavailable ({why}): transceivers unconfined", file=sys.stderr)
        return replace(target, unconfined_why=str(why))
    moved = [pid for t in target.transceivers for pid in group.add(t.pid)]
    described = group.describe() | {"pids": moved}
    if args.generator_cpus:  # the transceivers' cores are theirs alone
        others = [pid for pid in process_tree(os.getpid()) if pid not in moved]
        described["others_pinned"] = len(pin_threads(others, parse_cpus(args.generator_cpus)))
    print(f"confined: {described}", flush=True)
    return replace(target, confined=Confined(limit.confined_cores, group.stat_path, described))


def run_once(args: argparse.Namespace) -> int:
    """One shape against one stack (started here with --local), then its summary."""
    transceivers = args.transceivers or (2 if args.fault else 1)
    summarised = None
    with contextlib.ExitStack() as held:
        # beside the stack: piper speaks the questions while it starts (its processes load
        # their models), the figures are drawn while it stops (its processes drain and exit)
        beside = held.enter_context(ThreadPoolExecutor(1, "beside the stack"))
        spoken = beside.submit(write_questions, args)
        if args.local and not args.worker:
            stack = local_stack(args.local, transceivers, args.media_path, args.speech_prewarm)
            target = held.enter_context(stack)
            target = confine(args, target, held)
        else:
            target = Target(args.url, args.server_pids)
        questions = spoken.result()
        with fault_injected(args, target):
            code = run_locust(args, target, questions)
        if not args.worker:
            summarised = beside.submit(summarise, args.report_dir, not args.no_figures)
    if summarised is not None:
        summarised.result()  # its failure, raised here
    return code


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    paths = [path for path in args.media_paths.split(",") if path]
    if not paths:
        args.media_path = ""
        return run_once(args)
    runs: list[tuple[str, Path]] = []
    codes = []
    for index, path in enumerate(paths, start=1):
        one = argparse.Namespace(**vars(args))
        one.media_path, one.report_dir = path, args.report_dir / f"{index}-{path}"
        codes.append(run_once(one))
        runs.append((path, one.report_dir / REPORT_NAME))
    from loadtest.voice_paths import compare_paths

    print(compare_paths(runs, args.report_dir))
    return max(codes)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
