"""``python -m loadtest.media_cost``: a transceiver's CPU per call-second, per media path.

For each media path asked (``--paths lean,aiortc``, in that order, in the same run): the local
stack with the OpenAI-compatible providers against the fake OpenAI server (``voice_scenario``'s
``--local api``), ``--calls`` lean load-test calls (``voice_calls.VoiceCall``: pre-encoded
Opus, a packet every 20 ms, speech or silence) each asking a question every ``--turn-every-s``
(8 s; later if its last turn is not over, so that the work per call-second does not follow the
latency), and, after ``--warmup-s``, a window of ``--window-s`` over which the transceiver's CPU
is read from /proc per thread (utime + stime of ``/proc/PID/task/*/stat``: native threads of
onnxruntime, BLAS or libopus show up by name) and of its child processes, and how often its
main thread (the event loop) slept and woke (``main_thread_wakeups_per_s``). The primary figure
is ``cpu_ms_per_call_s`` (1000 / it = calls per core); beside it the turn latency (speech end
-> the answer's first loud packet, at the client) of the turns answered in the window, failed
turns, and ``/proc/loadavg`` before and after (the machine is shared).

``--sample-stacks DIR`` has the transceiver sample its own Python stacks
(``loadtest.stack_sampler``, started by a ``sitecustomize`` this puts first on its
``PYTHONPATH``) during the window: ``DIR/<path>.collapsed``, one ``frame;frame;... count``
line per stack (flame-graph input); the result gives the share of each of ``STAGES`` in ms per
call-second, and the top functions.

The client runs on this machine too: its CPU is not the server's and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.hosts import CLOCK_TICKS_PER_S, PROC, metric_samples, process_tree
from loadtest.voice_calls import (
    SETUP_TIMEOUT_S,
    CallFailed,
    Metronome,
    Questions,
    VoiceCall,
    spoken_questions,
)
from loadtest.voice_scenario import local_stack

MEDIA_PATH_ENV = "TRANSCEIVER_MEDIA_PATH"
BUDGET_ENV = "TRANSCEIVER_CPU_BUDGET_CORES"  # 0: admission by measured CPU off (we measure it)
SAMPLE_ENV = "VOICERELAY_STACK_SAMPLES"  # read by loadtest.stack_sampler in the transceiver
SETUP_SPREAD_S = 0.05  # between two calls' offers: setup is not what is measured
STOP_TIMEOUT_S = 30.0  # for the calls' tasks to end once told
TURN_EVERY_S = 8.0  # each call asks a question this often (a turn takes ~3 s unloaded)


# Stages of a call's CPU, by a frame on the sampled stack (the first listed that is on it).
STAGES = (
    ("opus decode (FEC, PLC)", ("lean_media:OpusDecoder.", "codecs.opus:OpusDecoder.")),
    ("resample in", ("lean_media:_resample", "audio:InputResampler.convert")),
    ("engine: VAD, turns, STT feed", ("engine:ConversationEngine.push_audio",)),
    ("srtp unprotect", ("__init__:Session.unprotect",)),
    ("rtp in: parse, reorder, stats", ("lean_media:LeanCall._on_rtp", "rtcrtpreceiver:")),
    ("link in (recv, demux, aioice)", ("link:Link.datagram_received",)),
    ("opus encode", ("lean_media:OpusEncoder.encode", "codecs.opus:OpusEncoder.")),
    ("audio level", ("lean_media:level_dbov", "rtp_tuning:audio_level_dbov")),
    (
        "srtp protect + send",
        ("lean_media:LeanCall._send", "rtcdtlstransport:RTCDtlsTransport._send_rtp"),
    ),
    ("tick, rtcp, voice track", ("lean_media:LeanMedia._tick", "rtcrtpsender:")),
    (
        "providers (HTTP to the API)",
        ("openai_providers:", "_base_client:", "response:", "provider_http:", "openai_http:"),
    ),
    (
        "data channel, events, Redis",
        ("rtcsctptransport:", "rtcdtlstransport:", "session:", "sessions:"),
    ),
)


def stage_shares(text: str) -> dict[str, float]:
    """Percent of the sampled stacks in each of ``STAGES`` (the rest: ``other``)."""
    from loadtest.stack_sampler import parse

    shares: Counter[str] = Counter()
    stacks = parse(text)
    for stack, samples in stacks.items():
        shares[_stage_of(stack)] += samples
    total = sum(shares.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in shares.most_common()}


def _stage_of(stack: str) -> str:
    for name, marks in STAGES:
        if any(mark in stack for mark in marks):
            return name
    return "other"


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid`` and its descendants, summed by thread name (``comm``); the main
    thread of ``pid`` is ``main`` (threads inherit its name unless they set their own)."""
    by_name: dict[str, float] = {}
    for member in process_tree(pid):
        for task in (PROC / str(member) / "task").glob("*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                line = (task / "stat").read_text()
                name = line[line.index("(") + 1 : line.rindex(")")]
                fields = line[line.rindex(")") + 2 :].split()
                ticks = int(fields[14 - 3]) + int(fields[15 - 3])
                label = name if member == pid else f"child:{name}"
                label = "main" if task.name == str(pid) else label
                by_name[label] = by_name.get(label, 0.0) + ticks / CLOCK_TICKS_PER_S
    return by_name


def main_thread_sleeps(pid: int) -> int:
    """How often ``pid``'s main thread has blocked (its voluntary context switches): for an
    event loop, about one per wake-up, whose CPU a timing of Python code does not see."""
    with contextlib.suppress(OSError, ValueError):
        for line in (PROC / str(pid) / "task" / str(pid) / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def load_average() -> str:
    with contextlib.suppress(OSError):
        return (PROC / "loadavg").read_text().strip()
    return ""


@dataclass
class Window:
    """The turns answered and failed while the CPU window was open."""

    open: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    turns_all: int = 0


async def _ask(
    call: VoiceCall, questions: Questions, first: int, window: Window, every_s: float
) -> None:
    """A question every ``every_s`` (or as soon as the last turn is over, if later) until
    cancelled: the same work per call-second whatever the latency. A failed turn ends the call."""
    count = len(questions.questions)
    loop = asyncio.get_running_loop()
    due_s = loop.time()
    while True:
        await asyncio.sleep(max(0.0, due_s - loop.time()))  # pacing the workload
        due_s = max(due_s + every_s, loop.time())
        try:
            result = await call.turn(questions.questions[(first + call.turns_done) % count])
        except CallFailed as failure:
            window.failures[str(failure)] += 1
            return
        window.turns_all += 1
        if window.open:
            window.latencies_ms.append(result.latency_ms)


async def _connect_all(
    url: str, questions: Questions, calls: int, http: httpx.AsyncClient, metronome: Metronome
) -> list[VoiceCall]:
    made: list[VoiceCall] = []
    for _ in range(calls):
        call = VoiceCall(metronome, questions)
        made.append(call)
        try:
            await call.connect(http, url)
        except (CallFailed, httpx.HTTPError) as error:
            for each in made:
                await each.close()
            raise SystemExit(f"call {len(made)} of {calls} did not connect: {error}") from None
        await asyncio.sleep(SETUP_SPREAD_S)  # spacing offers, not synchronising anything
    return made


async def measure_calls(
    url: str,
    pid: int,
    questions: Questions,
    calls: int,
    warmup_s: float,
    window_s: float,
    samples: Path | None = None,
    turn_every_s: float = TURN_EVERY_S,
    metrics_url: str = "",
) -> dict[str, Any]:
    """Connect ``calls``, let them talk ``warmup_s``, then read the CPU over ``window_s``
    (and, with ``samples``, have the transceiver sample its stacks meanwhile)."""
    metronome, window = Metronome(), Window()
    async with httpx.AsyncClient(timeout=SETUP_TIMEOUT_S) as http:
        made = await _connect_all(url, questions, calls, http, metronome)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(_ask(c, questions, i, window, turn_every_s))
            for i, c in enumerate(made)
        ]
        try:
            await asyncio.sleep(warmup_s)  # a measuring window's start, not a synchronisation
            packets_before = await lean_packets(http, metrics_url)  # its CPU outside the window
            before, load_before, began = thread_cpu_s(pid), load_average(), time.monotonic()
            sleeps_before = main_thread_sleeps(pid)
            window.open = True
            if samples is not None:
                os.kill(pid, signal.SIGUSR1)  # loadtest.stack_sampler: start
            await asyncio.sleep(window_s)  # the window itself
            window.open = False
            after, wall_s = thread_cpu_s(pid), time.monotonic() - began
            sleeps = main_thread_sleeps(pid) - sleeps_before
            packets_after = await lean_packets(http, metrics_url)
            if samples is not None:
                os.kill(pid, signal.SIGUSR2)  # stop and write
                await _written(samples)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), STOP_TIMEOUT_S)
            for call in made:
                await call.close()
            metronome.close()
    figures = _figures(calls, before, after, wall_s, window, load_before)
    figures["main_thread_wakeups_per_s"] = round(sleeps / wall_s, 1)
    for kind, count in packets_after.items():  # the load the CPU carried: ~50 in a second
        moved = count - packets_before.get(kind, 0.0)
        figures[f"lean_{kind}_per_call_s"] = round(moved / (calls * wall_s), 1)
    return figures


LEAN_EVENTS = "transceiver_lean_media_events_total"
PACKET_KINDS = {"rtp_in": ("rtp_in",), "rtp_out": ("rtp_out", "rtp_keepalive", "rtp_talkspurt_end")}


async def lean_packets(http: httpx.AsyncClient, metrics_url: str) -> dict[str, float]:
    """The lean path's RTP packets in and out so far (its /metrics); {} on the aiortc path."""
    if not metrics_url:
        return {}
    text = (await http.get(metrics_url)).text
    events = metric_samples(text, LEAN_EVENTS)
    counts = {
        name: sum(events.get(f"{LEAN_EVENTS}{{kind={kind}}}", 0.0) for kind in kinds)
        for name, kinds in PACKET_KINDS.items()
    }
    return counts if any(counts.values()) else {}


async def _written(path: Path) -> None:
    deadline_s = time.monotonic() + STOP_TIMEOUT_S
    while not await asyncio.to_thread(path.exists):
        if time.monotonic() > deadline_s:
            raise SystemExit(f"the transceiver wrote no stack samples to {path}")
        await asyncio.sleep(0.1)  # polling a file another process writes


def _figures(
    calls: int,
    before: dict[str, float],
    after: dict[str, float],
    wall_s: float,
    window: Window,
    load_before: str,
) -> dict[str, Any]:
    threads = {name: after[name] - before.get(name, 0.0) for name in after}
    cpu_s = sum(threads.values())
    call_s = calls * wall_s
    latencies = sorted(window.latencies_ms)
    return {
        "calls": calls,
        "window_s": round(wall_s, 2),
        "cpu_ms_per_call_s": round(1000 * cpu_s / call_s, 2),
        "calls_per_core": round(call_s / cpu_s, 1) if cpu_s > 0 else None,
        "server_cores": round(cpu_s / wall_s, 3),
        "threads_cpu_ms_per_call_s": {
            name: round(1000 * used / call_s, 2)
            for name, used in sorted(threads.items(), key=lambda kv: -kv[1])
            if used > 0
        },
        "turns": len(latencies),
        "turn_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "turn_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "failed_turns": dict(window.failures),
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
    }


@contextlib.contextmanager
def media_path_env(path: str, samples: Path | None) -> Iterator[None]:
    """The stack started inside sees ``path`` (and, with ``samples``, samples its stacks)."""
    names = (MEDIA_PATH_ENV, BUDGET_ENV, SAMPLE_ENV, "PYTHONPATH")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="media-cost-") as hook_dir:
        os.environ[MEDIA_PATH_ENV] = path
        os.environ[BUDGET_ENV] = "0"
        if samples is not None:
            Path(hook_dir, "sitecustomize.py").write_text(
                "from loadtest import stack_sampler\nstack_sampler.start_from_env()\n"
            )
            root = str(Path(__file__).resolve().parents[1])
            os.environ["PYTHONPATH"] = os.pathsep.join([hook_dir, root])
            os.environ[SAMPLE_ENV] = str(samples)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_path(path: str, questions: Questions, args: argparse.Namespace) -> dict[str, Any]:
    samples = None
    if args.sample_stacks is not None:
        args.sample_stacks.mkdir(parents=True, exist_ok=True)
        samples = args.sample_stacks / f"{path}.collapsed"
        samples.unlink(missing_ok=True)
    with media_path_env(path, samples), local_stack("api") as target:
        pid = target.transceivers[0].pid
        result = asyncio.run(
            measure_calls(
                target.url,
                pid,
                questions,
                args.calls,
                args.warmup_s,
                args.window_s,
                samples,
                args.turn_every_s,
                target.transceivers[0].url.rstrip("/") + "/metrics",
            )
        )
    result["media_path"] = path
    if samples is not None and samples.exists():
        from loadtest.stack_sampler import inclusive, top_leaves

        shares = stage_shares(samples.read_text())
        per_call_s = result["cpu_ms_per_call_s"]
        result["stages_ms_per_call_s"] = {
            name: round(share * per_call_s / 100, 2) for name, share in shares.items()
        }
        result["top_leaves"] = top_leaves(samples.read_text(), 15)
        result["top_inclusive"] = inclusive(samples.read_text(), 40)
    return result


BENCH_CALLS = 16
BENCH_PATHS = ("lean", "aiortc")  # aiortc: the reference the lean path's ratio is taken against


def run_media_cost_bench(calls: int = BENCH_CALLS) -> dict[str, Any]:
    """``make bench``'s figures: CPU per call-second and calls per core of each media path, in
    one run, and the lean path's CPU as a ratio of aiortc's (the same calls, the same load)."""
    args = argparse.Namespace(
        calls=calls, warmup_s=10.0, window_s=30.0, sample_stacks=None, turn_every_s=TURN_EVERY_S
    )
    questions = asyncio.run(spoken_questions())
    figures: dict[str, Any] = {"calls": calls}
    for path in BENCH_PATHS:
        result = run_path(path, questions, args)
        for key in ("cpu_ms_per_call_s", "calls_per_core", "turn_ms_p95", "loadavg_before"):
            figures[f"{path}_{key}"] = result[key]
        figures[f"{path}_failed_turns"] = sum(result["failed_turns"].values())
    lean, reference = figures["lean_cpu_ms_per_call_s"], figures["aiortc_cpu_ms_per_call_s"]
    figures["lean_to_aiortc_cpu_ratio"] = round(lean / reference, 3) if reference else None
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.media_cost", description=__doc__)
    parser.add_argument("--paths", default="lean,aiortc", help="media paths, in order")
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--turn-every-s", type=float, default=TURN_EVERY_S)
    parser.add_argument("--sample-stacks", type=Path, default=None, metavar="DIR")
    parser.add_argument("--out", type=Path, default=None, help="write the results (JSON)")
    args = parser.parse_args(argv)
    questions = asyncio.run(spoken_questions())
    results = []
    for path in args.paths.split(","):
        result = run_path(path, questions, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
