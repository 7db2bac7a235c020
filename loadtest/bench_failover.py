"""Failover benchmarks: how long a conversation goes quiet when a process under it dies.

- **Transceiver kill.** redis-server, a relay and two transceivers running the offline voice
  pipeline (``deploy.survival``). An aiortc Realtime client asks transceiver A
  "Tell me about water." and hears the answer; A is SIGKILLed; the client at once posts a resume
  offer for its session (its resume token in ``X-Voicerelay-Resume-Token``) to transceiver B,
  media through the relay, and asks "What did I just ask?". Measured: kill -> first non-silent
  audio frame heard, split into kill -> offer ready -> resume 201 -> ``session.created`` -> first
  audio. A is restarted on the same ports between runs.
- **Relay kill.** redis-server, a relay (2 workers) and one echo transceiver publishing its
  routes to Redis; an aiortc client sends a tone and hears it back through the relay. The relay
  is SIGKILLed and restarted on the same ports with the same keyring, alternately recovering by
  HELLO (the default) and by the Redis route cache alone (``--hello off``). Measured: kill ->
  the first RTP packet the client receives after the outage, and the new relay's ready line ->
  that packet.

Each figure is the median (with min, max and every sample) of several runs. ``--quick`` (the
smoke test's) runs each once, asks "Tell me the time." (a shorter answer to hear out) and
gives the killed relay one worker. The processes are the
local deployment's launchers (``deploy.processes``, ``deploy.survival``): each started here, ended
by PID; every wait has a deadline. Times are printed and returned, never asserted.

    .venv/bin/python -m loadtest.bench_failover [--runs N | --quick]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from deploy.processes import Stack
from deploy.redis_server import RedisServer
from deploy.survival import contents, stored_until, survival_stack
from deploy.waiting import eventually
from loadtest.realtime_client import TOKEN_HEADER, RealtimeClient, ask, call
from loadtest.tones import ToneClient

ROOT = Path(__file__).resolve().parents[1]
RUNS, QUICK_RUNS = 5, 1
QUESTION, RECALL_QUESTION = "Tell me about water.", "What did I just ask?"
QUICK_QUESTION = "Tell me the time."  # --quick: the clock's answer, ~1.5 s of speech, not ~6 s
RELAY_WORKERS, QUICK_RELAY_WORKERS = 2, 1  # the relay-kill relay's workers (--quick: 1)
TONE_HZ = 440.0
POLL_S = 0.005  # how often the client's frames and packet counters are looked at
OUTAGE_GAP_S = 0.2  # packets stop for longer than this when the relay dies; a restart is slower
READY_TIMEOUT_S = 90.0  # a pipeline transceiver loads its speech models before it is ready
ANSWER_TIMEOUT_S = 30.0
MEDIA_TIMEOUT_S = 15.0
FRESH_FRAMES = 25  # 0.5 s of the tone after a recovery before the next run
QUICK_FRESH_FRAMES = 10  # --quick: 0.2 s, still 5 Hz bins around the 440 Hz tone
Progress = Callable[[str], None]
Sample = dict[str, float]


@dataclass(frozen=True)
class Sizes:
    """How much each figure runs: ``make bench``'s sizes, or ``QUICK`` (it runs, it measures
    nothing: one run each, recoveries checked on fewer frames, a shorter answer, one worker)."""

    runs: int = RUNS
    fresh_frames: int = FRESH_FRAMES
    question: str = QUESTION
    relay_workers: int = RELAY_WORKERS


QUICK = Sizes(QUICK_RUNS, QUICK_FRESH_FRAMES, QUICK_QUESTION, QUICK_RELAY_WORKERS)


# --- pure: statistics and the two detectors ---------------------------------------------------


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every sample (in run order), rounded to 0.1."""
    return {
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
        "samples": [round(s, 1) for s in samples],
    }


def summarise_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: summary}`` over runs that each measured the same metrics."""
    return {name: summary([run[name] for run in runs]) for name in (runs[0] if runs else {})}


class FirstSound:
    """Watches a growing list of 16-bit PCM frames for the first one that is not all zeros,
    looking at each frame once."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.checked = 0

    def heard(self) -> bool:
        while self.checked < len(self.frames):
            if np.frombuffer(self.frames[self.checked], dtype=np.int16).any():
                return True
            self.checked += 1
        return False


@dataclass
class OutageWatch:
    """Tells when a packet counter moves again after an outage: the first rise that follows at
    least ``gap_s`` without one. Rises sooner are packets that were in flight at the kill."""

    gap_s: float
    count: int
    changed_at: float

    def resumed(self, now: float, count: int) -> bool:
        if count == self.count:
            return False
        quiet_s = now - self.changed_at
        self.count, self.changed_at = count, now
        return quiet_s >= self.gap_s


# --- the local deployment's launchers --------------------------------------------------------


async def _eventually(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """``deploy.waiting.eventually`` every POLL_S; the monotonic time the predicate held."""
    await eventually(predicate, timeout_s, what, interval_s=POLL_S)
    return time.monotonic()


# --- (a) transceiver kill -> first audio on another transceiver --------------------------------


@dataclass
class Killed:
    session_id: str
    resume_token: str
    killed_at: float
    question: str


@asynccontextmanager
async def _realtime_clients(count: int) -> AsyncIterator[list[Any]]:
    clients = [RealtimeClient() for _ in range(count)]
    try:
        yield clients
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def _talk_then_kill(
    survival: Any, http: httpx.AsyncClient, client: Any, question: str
) -> Killed:
    """A session on transceiver A has asked its question, heard the answer and stored it; then
    A is SIGKILLed. The client stays open (a real client has not noticed yet)."""
    await client.connect(http, survival.stack.base_url(0))
    ids = (await client.wait_for("session.created"))["voicerelay"]
    answer = await ask(client, question)
    await _eventually(FirstSound(client.heard).heard, ANSWER_TIMEOUT_S, "the first answer")

    def answer_stored(state: Any) -> bool:
        return ("assistant", answer) in contents(state)

    await stored_until(survival, ids["session_id"], answer_stored)
    transceiver = survival.stack.transceivers[0]
    killed_at = time.monotonic()
    transceiver.send_signal(signal.SIGKILL)
    await transceiver.exited(10)
    return Killed(ids["session_id"], ids["resume_token"], killed_at, question)


async def _resume_on_b(
    survival: Any, http: httpx.AsyncClient, responses_at: list[float], client: Any, killed: Killed
) -> tuple[Sample, bool]:
    """Resume the killed session on transceiver B and ask about the conversation so far: the
    split timings and whether B recalled the question."""
    await client.pc.setLocalDescription(await client.pc.createOffer())
    offered_at = time.monotonic()
    headers, params = {TOKEN_HEADER: killed.resume_token}, {"session_id": killed.session_id}
    response = await call(client, http, survival.stack.base_url(1), headers, params)
    created_at = time.monotonic()  # call() returns once session.created has arrived
    if response.status_code != 201:
        raise RuntimeError(f"resume answered {response.status_code}: {response.text}")
    async with asyncio.TaskGroup() as group:
        asking = group.create_task(ask(client, RECALL_QUESTION))
        sounded_at = await _eventually(
            FirstSound(client.heard).heard, ANSWER_TIMEOUT_S, "first audio after the resume"
        )
    marks = [killed.killed_at, offered_at, responses_at[-1], created_at, sounded_at]
    return _resume_sample(marks), asking.result() == f"You asked: {killed.question}"


def _resume_sample(marks: Sequence[float]) -> Sample:
    _, offered, answered, created, sounded = (1000 * (m - marks[0]) for m in marks)
    return {
        "kill_to_first_audio_ms": sounded,
        "kill_to_offer_ready_ms": offered,
        "kill_to_resume_201_ms": answered,
        "resume_201_to_session_created_ms": created - answered,
        "session_created_to_first_audio_ms": sounded - created,
    }


async def _restart(process: Any, progress: Progress) -> None:
    started = time.monotonic()
    await process.start().ready(timeout_s=READY_TIMEOUT_S)
    progress(f"failover: {process.name} restarted, ready in {time.monotonic() - started:.1f} s")


async def _transceiver_kill(
    runs: int, log_dir: Path, progress: Progress, question: str = QUESTION
) -> dict[str, Any]:
    samples, recalled = [], []
    responses_at: list[float] = []  # when each HTTP answer's headers arrived

    async def stamp(_: httpx.Response) -> None:
        responses_at.append(time.monotonic())

    hooks = {"response": [stamp]}
    async with (
        survival_stack(log_dir) as survival,
        httpx.AsyncClient(timeout=30, event_hooks=hooks) as http,
    ):
        for run in range(runs):
            if run:
                await _restart(survival.stack.transceivers[0], progress)
            async with _realtime_clients(2) as (first, second):
                killed = await _talk_then_kill(survival, http, first, question)
                sample, ok = await _resume_on_b(survival, http, responses_at, second, killed)
            samples.append(sample)
            recalled.append(ok)
            progress(f"failover: transceiver kill {run + 1}/{runs}: {_line(sample)}")
    return {"metrics": summarise_runs(samples), "recalled": recalled}


# --- (b) relay kill -> media again -------------------------------------------------------------


@asynccontextmanager
async def _echo_deployment(
    log_dir: Path, workers: int = RELAY_WORKERS
) -> AsyncIterator[tuple[Any, Any]]:
    """redis-server, then a relay (``workers`` workers) in front of one echo transceiver that
    publishes its client routes to Redis."""
    redis = await asyncio.to_thread(RedisServer(log_dir, "redis").start)
    stack = Stack(log_dir, transceivers=1, workers=workers, agent="echo")
    stack.transceivers[0].env["REDIS_URL"] = redis.url
    try:
        yield redis, await stack.start()
    finally:
        await stack.stop()
        await asyncio.to_thread(redis.stop)


@asynccontextmanager
async def _tone_session(stack: Any, fresh_frames: int) -> AsyncIterator[Any]:
    """A connected tone client that hears its own tone back through the relay."""
    client = ToneClient(TONE_HZ)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await client.offer(http, stack.base_url(0))
        if response.status_code != 201:
            raise RuntimeError(f"offer answered {response.status_code}: {response.text}")
        await client.connected(MEDIA_TIMEOUT_S)
        await _tone_again(client, fresh_frames)
        yield client
    finally:
        await client.close()


async def _tone_again(client: Any, fresh_frames: int) -> None:
    """The tone heard again in ``fresh_frames`` frames all received from now on."""
    mark = client.frames_received

    def fresh_tone() -> bool:
        fresh = client.frames_received > mark + fresh_frames
        return fresh and bool(client.hears_own_tone([], fresh_frames))

    await _eventually(fresh_tone, MEDIA_TIMEOUT_S, "the tone through the relay")


async def _packets_received(receiver: Any) -> int:
    stats = await receiver.getStats()
    return sum(int(s.packetsReceived) for s in stats.values() if s.type == "inbound-rtp")


async def _media_back(receiver: Any, watch: OutageWatch) -> float:
    """The monotonic time the first packet after the outage was seen (polled every POLL_S)."""
    deadline = time.monotonic() + MEDIA_TIMEOUT_S
    while True:
        count = await _packets_received(receiver)
        now = time.monotonic()
        if watch.resumed(now, count):
            return now
        if now > deadline:
            raise TimeoutError(f"no media {MEDIA_TIMEOUT_S} s after the relay kill")
        await asyncio.sleep(POLL_S)  # polling interval, bounded by the deadline above


async def _relay_outage(
    stack: Any, client: Any, flags: Mapping[str, str], fresh_frames: int
) -> Sample:
    """SIGKILL the relay, start a new one with ``flags`` at once, time the media's return."""
    receiver = client.pc.getReceivers()[0]
    killed_at = time.monotonic()
    watch = OutageWatch(OUTAGE_GAP_S, await _packets_received(receiver), killed_at)
    await stack.relay.stop(signal.SIGKILL)
    async with asyncio.TaskGroup() as group:
        restarted = group.create_task(stack.restart_relay(**flags))
        back_at = await _media_back(receiver, watch)
    ready_at = restarted.result().ready_at
    await _tone_again(client, fresh_frames)
    return {
        "kill_to_media_ms": 1000 * (back_at - killed_at),
        "relay_ready_to_media_ms": 1000 * (back_at - ready_at),
        "kill_to_relay_ready_ms": 1000 * (ready_at - killed_at),
    }


async def _route_cached(redis: Any) -> None:
    with redis.client() as client:
        await _eventually(lambda: bool(client.keys("voicerelay:route:*")), 10, "a cached route")


async def _relay_kill(sizes: Sizes, log_dir: Path, progress: Progress) -> dict[str, Any]:
    runs, fresh_frames = sizes.runs, sizes.fresh_frames
    samples: dict[str, list[Sample]] = {"hello": [], "cache": []}
    async with (
        _echo_deployment(log_dir, sizes.relay_workers) as (redis, stack),
        _tone_session(stack, fresh_frames) as client,
    ):
        await _route_cached(redis)
        flags = {"hello": {}, "cache": {"hello": "off", "redis_url": redis.url}}
        for run in range(runs):
            for mode, mode_samples in samples.items():  # side by side, alternating
                sample = await _relay_outage(stack, client, flags[mode], fresh_frames)
                mode_samples.append(sample)
                progress(f"failover: relay kill ({mode}) {run + 1}/{runs}: {_line(sample)}")
    return {mode: {"metrics": summarise_runs(runs_)} for mode, runs_ in samples.items()}


# --- running -----------------------------------------------------------------------------------


def _line(sample: Sample) -> str:
    return ", ".join(f"{name.removesuffix('_ms')} {value:.0f} ms" for name, value in sample.items())


async def _scenario(
    name: str, run: Awaitable[dict[str, Any]], progress: Progress
) -> dict[str, Any]:
    """One scenario's results, or ``{"error": ...}``: a failed failover is reported, and the
    rest of ``make bench`` still runs."""
    try:
        return await run
    except Exception as error:  # any failure is the result to report
        progress(f"failover: {name} failed: {_describe(error)}")
        return {"error": _describe(error)}


def _describe(error: BaseException) -> str:
    """``Type: message``; a TaskGroup's group of errors by its first member."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


async def _bench(sizes: Sizes, progress: Progress) -> dict[str, Any]:
    runs = sizes.runs
    with tempfile.TemporaryDirectory(prefix="voicerelay-bench-failover-") as tmp:
        logs = [Path(tmp) / name for name in ("transceiver-kill", "relay-kill")]
        for log_dir in logs:
            log_dir.mkdir()
        progress(f"failover: transceiver kill -> first audio elsewhere, {runs} run(s)")
        transceiver_kill = _transceiver_kill(runs, logs[0], progress, sizes.question)
        transceiver = await _scenario("transceiver kill", transceiver_kill, progress)
        progress(f"failover: relay kill -> media again, {runs} run(s) per recovery mode")
        relay_kill = _relay_kill(sizes, logs[1], progress)
        relay = await _scenario("relay kill", relay_kill, progress)
    scenarios = {"transceiver_kill": transceiver}
    if "error" in relay:
        scenarios["relay_kill"] = relay
    else:
        scenarios |= {f"relay_kill_{mode}": result for mode, result in relay.items()}
    return {"runs": runs, "scenarios": scenarios}


def run_failover_bench(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """The two failover figures, each over RUNS runs (with ``quick``, at the ``QUICK`` sizes)."""
    return asyncio.run(_bench(QUICK if quick else Sizes(), progress or print))


def main(argv: Sequence[str] | None = None) -> int:
    from loadtest.bench import Progress as Stamped
    from loadtest.report import failover_text

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_failover", description=__doc__)
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per figure")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} run per figure")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes(runs=args.runs)
    print("\n" + failover_text(asyncio.run(_bench(sizes, Stamped()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
