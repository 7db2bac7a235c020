"""A signal-based sampler of a process's main-thread Python stacks, as collapsed stacks.

py-spy is not installed here, and cProfile's per-call hooks distort a hot path of small
functions several-fold. This samples instead: ``ITIMER_PROF`` fires every ``INTERVAL_S`` of the
process's CPU time (all threads), and the handler (which Python runs in the main thread) adds
the main thread's stack to a count. A CPU second spent in a native thread while the main
thread waits in ``epoll`` shows up under ``select``: read it beside the per-thread CPU of
``/proc/PID/task`` (``loadtest.media_cost``), which names the thread. A ctypes or C call is
charged to the Python function that made it. A cyclic garbage collection is C between two
bytecodes: its CPU is charged to the first Python code run after it, which is a ``gc.callbacks``
callback when one is installed (the transceiver's ``GcPauses._on_gc``): samples there are the
collections, not the callback (allocating cycles with it installed: 37 % of the samples in the
callback, whose own cost was under 0.4 % of the CPU).

In the process measured: ``start_from_env()`` (from a ``sitecustomize``, see
``loadtest.media_cost``) arms it when ``VOICERELAY_STACK_SAMPLES`` names an output file;
``SIGUSR1`` then starts a sampling window and ``SIGUSR2`` ends it and writes the file: one
``outer;...;inner count`` line per stack (Brendan Gregg's collapsed format), frames named
``module:function``. Only the transceiver process arms it (its ``argv``), not its children.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType

ENV = "VOICERELAY_STACK_SAMPLES"
INTERVAL_S = 0.002  # of process CPU time
MAX_DEPTH = 60


class StackSampler:
    def __init__(self, out: Path, interval_s: float = INTERVAL_S) -> None:
        self.out = out
        self.interval_s = interval_s
        self.counts: Counter[tuple[CodeType, ...]] = Counter()

    def install(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.signal(signal.SIGUSR1, self._start)
        signal.signal(signal.SIGUSR2, self._stop)

    def _start(self, _signum: int, _frame: FrameType | None) -> None:
        self.counts.clear()
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(collapsed(self.counts))
        tmp.replace(self.out)  # whole or absent: the reader waits for it

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        codes: list[CodeType] = []
        while frame is not None and len(codes) < MAX_DEPTH:
            codes.append(frame.f_code)
            frame = frame.f_back
        self.counts[tuple(codes)] += 1


def _name(code: CodeType) -> str:
    module = Path(code.co_filename).stem
    return f"{module}:{code.co_qualname}"


def collapsed(counts: Counter[tuple[CodeType, ...]]) -> str:
    """Innermost-first code tuples -> ``outer;...;inner count`` lines, most samples first."""
    lines = Counter[str]()
    for codes, count in counts.items():
        lines[";".join(_name(c) for c in reversed(codes))] += count
    return "".join(f"{stack} {count}\n" for stack, count in lines.most_common())


def parse(text: str) -> Counter[str]:
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def top_leaves(text: str, count: int) -> list[tuple[str, float]]:
    """The innermost frames with the largest share of samples (percent)."""
    stacks = parse(text)
    leaves: Counter[str] = Counter()
    for stack, samples in stacks.items():
        leaves[stack.rsplit(";", 1)[-1]] += samples
    total = sum(leaves.values()) or 1
    return [(leaf, round(100 * n / total, 1)) for leaf, n in leaves.most_common(count)]


def inclusive(text: str, count: int) -> list[tuple[str, float]]:
    """Functions by the share of samples with them anywhere on the stack (percent)."""
    stacks = parse(text)
    seen: Counter[str] = Counter()
    for stack, samples in stacks.items():
        for frame in set(stack.split(";")):
            seen[frame] += samples
    total = sum(stacks.values()) or 1
    return [(name, round(100 * n / total, 1)) for name, n in seen.most_common(count)]


def _command_line() -> list[bytes]:
    """This process's argv as the kernel has it (``sys.argv`` is not set yet in a
    ``sitecustomize``)."""
    try:
        return Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def start_from_env() -> None:
    """Arm the sampler in the transceiver process when ``VOICERELAY_STACK_SAMPLES`` is set."""
    out = os.environ.get(ENV)
    if not out or b"transceiver" not in _command_line()[:3]:
        return
    os.environ.pop(ENV)  # not inherited by its own children
    StackSampler(Path(out)).install()


if __name__ == "__main__":
    text = Path(sys.argv[1]).read_text()
    for name, share in inclusive(text, int(sys.argv[2]) if len(sys.argv) > 2 else 40):
        print(f"{share:6.1f}%  {name}")
