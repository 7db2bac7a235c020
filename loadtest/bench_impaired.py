"""Turn latency through a bad network, each condition beside a clean path in one run.

    .venv/bin/python -m loadtest.bench_impaired [--turns N] [--media-path aiortc|lean]

One stack (``loadtest.impaired_call``: a relay and a pipeline transceiver with the offline
defaults on the host, an aiortc client in its own network namespace). For the clean path and
then each of ``loadtest.impairment.CONDITIONS``, a new call asks N spoken questions in turn
(the outage, as in the test, starts half a second into each answer). Per turn, measured on
the client: from the moment its microphone sent the question's last frame to the first loud
answer frame it heard (``first_audio_ms``: speech end → first answer audio, the silence that
ends the turn, speech-to-text, the agent, the first TTS chunk and transport both ways), and
whether the turn completed. The client's clock is polled every 5 ms, so each figure carries
up to 10 ms of that. Prints a table (p50, max, p50 against the clean path); ``run_impaired_
bench`` returns the figures for ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from loadtest.impaired_call import (
    HEARD_BEFORE_OUTAGE_FRAMES,
    ImpairedStack,
    impaired_stack,
    loud_frames,
)
from loadtest.impairment import CONDITIONS, Impairment, nft_available
from loadtest.realtime_client import RealtimeClient, speak
from pipeline.config import PiperConfig
from pipeline.piper_tts import PiperTextToSpeech

CLEAN = Impairment("clean")
QUESTIONS = ("Tell me about coffee.", "Tell me about water.")
POLL_S = 0.005
TURN_TIMEOUT_S = 60.0


async def _until(check: Any, timeout_s: float, what: str) -> float:
    """Poll ``check()`` every POLL_S until it holds; the loop time then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(POLL_S)
    return loop.time()


def _loud(frames: list[bytes]) -> bool:
    return loud_frames(frames) > 0


async def _timed(client: RealtimeClient, question: bytes) -> float:
    """On the client's loop: say ``question``; ms from its last frame sent to answer audio."""
    client.mic.say(question)
    spoken_s = await _until(lambda: not client.mic.speaking, TURN_TIMEOUT_S, "question sent")
    heard_from = len(client.heard)
    heard_s = await _until(lambda: _loud(client.heard[heard_from:]), TURN_TIMEOUT_S, "answer")
    return (heard_s - spoken_s) * 1000


async def _turn(stack: ImpairedStack, call: Any, question: bytes) -> dict[str, Any]:
    netns, client = call
    start = len(client.events)
    async with asyncio.TaskGroup() as group:
        timing = group.create_task(netns.run(_timed(client, question)))
        if stack.path.impairment.outage_ms:
            group.create_task(_outage_mid_answer(stack, client))
    first_audio_ms = timing.result()
    done = await netns.run(client.wait_for("response.done", after=start, timeout_s=60))
    stopped = "output_audio_buffer.stopped"
    await netns.run(client.wait_for(stopped, after=start, timeout_s=TURN_TIMEOUT_S))
    status = done["response"]["status"]
    return {"first_audio_ms": round(first_audio_ms, 1), "status": status}


async def _outage_mid_answer(stack: ImpairedStack, client: RealtimeClient) -> None:
    """The outage, once the answer has been heard for HEARD_BEFORE_OUTAGE_FRAMES."""
    heard_from = len(client.heard)

    def into_answer() -> bool:
        return loud_frames(client.heard[heard_from:]) >= HEARD_BEFORE_OUTAGE_FRAMES

    await _until(into_answer, TURN_TIMEOUT_S, "the answer before the outage")
    await stack.path.outage()


async def _condition(stack: ImpairedStack, condition: Impairment, questions: list[bytes]) -> Any:
    await stack.path.apply(condition)
    turns = []
    async with stack.call() as call:
        for question in questions:
            turns.append(await _turn(stack, call, question))
    hits = await stack.path.hits()
    return {"turns": turns, "to_host": hits.to_host, "from_host": hits.from_host}


def _summary(name: str, result: dict[str, Any], clean_p50_ms: float | None) -> dict[str, Any]:
    latencies = [t["first_audio_ms"] for t in result["turns"]]
    p50 = statistics.median(latencies)
    completed = sum(t["status"] == "completed" for t in result["turns"])
    ratio = round(p50 / clean_p50_ms, 2) if clean_p50_ms else 1.0
    return {"condition": name, "completed": completed,
            "first_audio_p50_ms": round(p50, 1), "first_audio_max_ms": max(latencies),
            "p50_vs_clean": ratio, **result}  # fmt: skip


async def bench(turns: int, media_path: str, log_dir: Path) -> list[dict[str, Any]]:
    tts = PiperTextToSpeech(PiperConfig(noise_scale=0.0, noise_w_scale=0.0))
    await tts.start()
    try:
        spoken = [await speak(tts, words) for words in QUESTIONS]
    finally:
        await tts.aclose()
    questions = [spoken[i % len(spoken)] for i in range(turns)]
    rows: list[dict[str, Any]] = []
    async with impaired_stack(log_dir, media_path) as stack:
        for condition in (CLEAN, *CONDITIONS):
            result = await _condition(stack, condition, questions)
            clean = rows[0]["first_audio_p50_ms"] if rows else None
            rows.append(_summary(condition.name, result, clean))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'condition':<18}{'done':>6}{'p50 ms':>9}{'max ms':>9}{'p50/clean':>11}"]
    for row in rows:
        done = f"{row['completed']}/{len(row['turns'])}"
        lines.append(
            f"{row['condition']:<18}{done:>6}{row['first_audio_p50_ms']:>9.0f}"
            f"{row['first_audio_max_ms']:>9.0f}{row['p50_vs_clean']:>11.2f}"
        )
    return "\n".join(lines)


def run_impaired_bench(turns: int = 4, media_path: str = "aiortc") -> dict[str, Any]:
    """``make bench``'s entry: the rows, or why it was skipped."""
    unavailable = nft_available()
    if unavailable is not None:
        return {"skipped": unavailable}
    with tempfile.TemporaryDirectory(prefix="bench-impaired-") as log_dir:
        rows = asyncio.run(bench(turns, media_path, Path(log_dir)))
    print(render(rows), flush=True)
    return {"media_path": media_path, "conditions": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_impaired", description=__doc__)
    parser.add_argument("--turns", type=int, default=4, help="spoken turns per condition")
    parser.add_argument("--media-path", default="aiortc", choices=("aiortc", "lean"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    result = run_impaired_bench(args.turns, args.media_path)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if "skipped" in result else 0


if __name__ == "__main__":
    raise SystemExit(main())
