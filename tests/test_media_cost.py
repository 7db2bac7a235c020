"""The media-cost tools' own logic: collapsed stacks, the stages a sampled stack is charged to,
per-thread CPU from /proc, and the stack sampler sampling a real busy loop in a child process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import CodeType

from deploy.waiting import eventually
from loadtest.media_cost import main_thread_sleeps, stage_shares, thread_cpu_s
from loadtest.stack_sampler import collapsed, inclusive, parse, top_leaves

ROOT = Path(__file__).resolve().parents[1]
SAMPLER_TIMEOUT_S = 30.0

IN = "runners:Runner.run;link:Link.datagram_received"
COLLAPSED = (
    f"{IN};lean_media:LeanCall._on_rtp;lean_media:OpusDecoder.decode 6\n"
    f"{IN};engine:ConversationEngine.push_audio;vad:TurnDetector.push 2\n"
    "runners:Runner.run;lean_media:LeanMedia._tick;lean_media:OpusEncoder.encode 1\n"
    "runners:Runner.run 1\n"
)


def test_collapsed_stacks_read_back_and_are_summed_by_leaf_and_by_frame() -> None:
    def outer() -> Counter[tuple[CodeType, ...]]:
        return Counter({(inner.__code__, outer.__code__): 3})

    def inner() -> None: ...

    text = collapsed(outer())
    assert text.endswith(".<locals>.inner 3\n") and text.startswith("test_media_cost:")
    assert parse(COLLAPSED)["runners:Runner.run"] == 1
    assert top_leaves(COLLAPSED, 2) == [
        ("lean_media:OpusDecoder.decode", 60.0),
        ("vad:TurnDetector.push", 20.0),
    ]
    assert dict(inclusive(COLLAPSED, 3))["link:Link.datagram_received"] == 80.0


def test_a_stack_is_charged_to_the_first_stage_on_it() -> None:
    shares = stage_shares(COLLAPSED)
    assert shares == {
        "opus decode (FEC, PLC)": 60.0,
        "engine: VAD, turns, STT feed": 20.0,
        "opus encode": 10.0,
        "other": 10.0,
    }


def test_the_lean_provider_clients_reads_are_the_providers_stage() -> None:
    """Its reads run from the loop's data_received, under no provider's frame."""
    read = "runners:Runner.run;provider_http:_Wire.data_received;http1:ResponseReader.feed 3\n"
    sent = "runners:Runner.run;openai_http:LeanRequests.post 1\n"
    assert stage_shares(read + sent) == {"providers (HTTP to the API)": 100.0}


def test_thread_cpu_names_the_main_thread_of_the_process() -> None:
    used = thread_cpu_s(os.getpid())
    assert "main" in used and all(seconds >= 0 for seconds in used.values())
    assert thread_cpu_s(2**22 + 1) == {}  # no such process: nothing, not an error


async def test_main_thread_sleeps_count_an_event_loop_waking() -> None:
    before = main_thread_sleeps(os.getpid())
    for _ in range(3):
        await asyncio.sleep(0.01)  # three timer wake-ups of this loop, what is counted
    assert main_thread_sleeps(os.getpid()) >= before + 3
    assert main_thread_sleeps(2**22 + 1) == 0


async def test_the_sampler_writes_the_stacks_of_a_busy_process_between_its_signals(
    tmp_path: Path,
) -> None:
    out = tmp_path / "busy.collapsed"
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from loadtest.stack_sampler import StackSampler

        StackSampler(Path(sys.argv[1])).install()
        print("ready", flush=True)

        def spin():
            while True:
                sum(range(1000))

        spin()
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(out), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        ready = await asyncio.wait_for(child.stdout.readline(), SAMPLER_TIMEOUT_S)
        assert ready.strip() == b"ready"
        child.send_signal(signal.SIGUSR1)  # start sampling
        busy = lambda: thread_cpu_s(child.pid).get("main", 0.0) > 0.3  # noqa: E731
        await eventually(busy, SAMPLER_TIMEOUT_S, "the child busy for a while")
        child.send_signal(signal.SIGUSR2)  # stop and write
        await eventually(out.exists, SAMPLER_TIMEOUT_S, "the samples written")
    finally:
        child.kill()
        await child.wait()
    leaves = dict(top_leaves(out.read_text(), 3))
    assert "<string>:spin" in leaves, leaves
