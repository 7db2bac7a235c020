"""Has the user finished their turn? Smart Turn v3.2 decides from the sound of the last 8 s.

I/O layer (onnxruntime, one thread). ``EndOfTurn`` loads the checked model file
(``pipeline.smart_turn_file``) and scores an utterance's 16 kHz PCM: the probability that the
speaker is done, from intonation and rhythm, not words. The turn detector (``pipeline.vad``)
asks at a short pause; the answer comes back through a poll, so the event loop never waits the
~50 ms a decision takes: ``ask`` hands the work to the detector's own single thread and the
detector looks for the verdict on each following frame.

Threads: onnxruntime runs each decision on the calling thread (``intra_op_num_threads`` 1, no
inter-op pool) and is told not to busy-wait between runs; one decision thread per process,
shared by every call (``shared_end_of_turn``), so decisions queue rather than compete with the
event loop for the cores.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.log_mel import SAMPLE_RATE_HZ, log_mel_features, pcm16_to_float
from pipeline.smart_turn_file import SmartTurnFileError, default_model_path, read_verified

log = logging.getLogger(__name__)
COMPLETE_THRESHOLD = 0.5  # smart-turn's own: P(complete) above it ends the turn
INPUT_NAME = "input_features"

Verdict = Callable[[], bool | None]  # True: complete, False: not yet, None: still deciding


@dataclass(frozen=True)
class Scored:
    """One decision: the model's answer and where its time went (wall clock, on the decision
    thread: ``queued_ms`` waiting for it, then the features, then the model's run; ``cpu_ms``:
    the thread's CPU time for both, which the machine's load hardly changes)."""

    probability: float
    complete: bool
    queued_ms: float
    features_ms: float
    model_ms: float
    cpu_ms: float = 0.0


class Decision:
    """A decision asked of the decision thread. Called, it is a ``Verdict``: None while the
    model runs, then whether the speaker is done (a failed decision says "not yet": the
    silence window then ends the turn); ``scored`` once it is done and did not fail."""

    def __init__(self, future: Future[Scored]) -> None:
        self._future = future
        self._told = False  # its failure logged

    def __call__(self) -> bool | None:
        if not self._future.done():
            return None
        scored = self.scored
        return False if scored is None else scored.complete

    def when_done(self, callback: Callable[[], None]) -> None:
        """``callback()`` once the verdict is in, on the decision thread (at once, on the
        caller's, if it already is)."""
        self._future.add_done_callback(lambda _: callback())

    @property
    def scored(self) -> Scored | None:
        if not self._future.done():
            return None
        if (error := self._future.exception()) is not None:
            if not self._told:
                self._told = True
                log.error("end-of-turn decision failed; the silence window decides: %r", error)
            return None
        return self._future.result()


def session_options() -> Any:
    """One thread, no pool, no spinning: a decision costs one core for its ~50 ms, then none."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class EndOfTurn:
    """The smart-turn model, loaded only from a file that passed its hash check."""

    def __init__(self, model_path: Path, threshold: float = COMPLETE_THRESHOLD) -> None:
        import onnxruntime

        if not 0.0 < threshold < 1.0:
            raise ValueError(f"end-of-turn threshold must be within (0, 1), got {threshold}")
        model = read_verified(model_path)  # SmartTurnFileError: never loaded
        self._session = onnxruntime.InferenceSession(
            model, sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
        self.threshold = threshold
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="end-of-turn")

    def probability_complete(self, pcm: bytes) -> float:
        """P(the speaker is done) for 16 kHz 16-bit mono ``pcm`` ending now."""
        return self.score(pcm).probability

    def is_complete(self, pcm: bytes) -> bool:
        return self.probability_complete(pcm) > self.threshold

    def score(self, pcm: bytes, asked_s: float | None = None) -> Scored:
        """``probability_complete``, timed (``asked_s``: ``time.perf_counter()`` when asked)."""
        started_s, cpu_s = time.perf_counter(), time.thread_time()
        features = log_mel_features(pcm16_to_float(pcm))[np.newaxis]
        featured_s = time.perf_counter()
        (scores,) = self._session.run(None, {INPUT_NAME: features})
        ran_s = time.perf_counter()
        probability = float(scores[0][0])
        queued_ms = 0.0 if asked_s is None else (started_s - asked_s) * 1000
        return Scored(
            probability,
            probability > self.threshold,
            queued_ms,
            (featured_s - started_s) * 1000,
            (ran_s - featured_s) * 1000,
            (time.thread_time() - cpu_s) * 1000,
        )

    def ask(self, pcm: bytes) -> Decision:
        """Start deciding on the decision thread; the returned poll gives the verdict when
        it is ready."""
        return Decision(self._thread.submit(self.score, pcm, time.perf_counter()))

    def wait_decided(self, timeout_s: float) -> None:
        """Returns once every decision asked before this call is done (one thread, in order);
        ``TimeoutError`` after ``timeout_s``."""
        self._thread.submit(int).result(timeout=timeout_s)

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


@functools.cache
def shared_end_of_turn(model_path: Path) -> EndOfTurn:
    """The process's one model (and decision thread) for ``model_path``."""
    return EndOfTurn(model_path)


def end_of_turn_asker(semantic: bool, sample_rate_hz: int) -> Callable[[bytes], Verdict] | None:
    """What a turn detector asks at a pause, or None (the silence window alone decides):
    when the session does not want semantic turn detection, or the model cannot be had."""
    if not semantic:
        return None
    if sample_rate_hz != SAMPLE_RATE_HZ:
        log.error("semantic turn detection needs 16 kHz input, not %d Hz: off", sample_rate_hz)
        return None
    try:
        return shared_end_of_turn(default_model_path()).ask
    except SmartTurnFileError as error:
        log.error("semantic turn detection off, the silence window decides: %s", error)
        return None
