"""Silero VAD: a speech probability per frame, so server_vad's ``threshold`` means OpenAI's.

I/O layer (onnxruntime). The model (``pipeline.silero_vad_file``, checked by hash before it is
loaded) reads 512 samples at 16 kHz (256 at 8 kHz) with the 64 (32) samples before them as
context, and carries a recurrent state from one window to the next; it answers the probability
that the window is speech. ``SileroStream`` cuts 20 ms frames into those windows; a frame's
probability is that of the newest window finished by the frame's end.

CPU decides how it runs. ``python -m loadtest.bench_vad`` (the ten recordings, each followed
by 4 s of quiet: 46 % speech; load 4.7-6.9 on 2 cores, A/B/C interleaved): one window costs
~0.2 ms of CPU on one thread (0.21 ms measured alone at load 5.7; batching streams would cut
it to ~0.07 ms a window at 16 or more, not done); gated, the model ran 0.33 windows per frame
and cost **86-89 us per 20 ms frame, 4.3-4.5 ms per call-second**, where webrtcvad costs 2.5 us
and 0.12 ms, and a whole lean-path call ~9-11 ms. So:

- ``GatedSileroClassifier`` asks webrtcvad first and runs the model only while webrtcvad hears
  a voice, and for ``BRIDGE_FRAMES`` after (the pause between words keeps the model's state):
  digital silence runs no window, and the call in -60 dBFS noise ran no more windows than in
  digital silence (0.323 a frame against 0.328). A stretch starts where both call it
  speech (webrtcvad, and the probability at ``threshold``) and ends where the probability
  falls ``HOLD_MARGIN`` under it; after a pause, webrtcvad's voicing alone brings it back
  until the model is sure again (the model was 200 ms late on a weak word after a pause).
- It runs only where it is asked for (``VadConfig.model``): ``auto``, the default, runs it for
  a server_vad session whose client set a threshold other than the default 0.5 (noise
  reduction's stricter step stays webrtcvad's), so the default costs a call nothing more.

The tail, from the last loud 20 ms block (-40 dBFS) to the end of speech the turn detector
reports, on the recordings (medians, ``loadtest.bench_vad``): webrtcvad as it was 110 ms, the
model 80 ms, with the voice's end too (``VadConfig.voice_end_db`` 40) 60 ms; on piper's
questions the model ends 20-40 ms sooner than webrtcvad's 120-160 ms, the voice's end 100-120 ms
sooner (``tests/test_vad_silero.py``). A second run, the detector included (load 10.4-11.4):
the model 89-93 us a frame, 4.4-4.6 ms per call-second; webrtcvad 4.2 us, 0.21 ms.

One shared session per process (``shared_model``), its run single-threaded and sequential,
with no intra-op pool (so no spinning worker thread); each stream keeps its own state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_THRESHOLD, VadConfig
from pipeline.end_of_turn import session_options
from pipeline.silero_vad_file import SileroFileError, default_model_path, read_verified
from pipeline.vad import webrtc_classifier

log = logging.getLogger(__name__)

WINDOW_SAMPLES = {16000: 512, 8000: 256}  # the model's window per sample rate
CONTEXT_SAMPLES = {16000: 64, 8000: 32}  # samples of the previous window it reads first
STATE_SHAPE = (2, 1, 128)
BRIDGE_FRAMES = 25  # frames webrtcvad calls silent before the model stops (and forgets)
HOLD_MARGIN = 0.15  # once speech is heard, it goes on down to threshold - this (Silero's own)


class SileroModel:
    """The ONNX session, checked and loaded once; thread-safe (onnxruntime's run is)."""

    def __init__(self, content: bytes) -> None:
        import onnxruntime as ort

        options = session_options()  # the end-of-turn model's: one thread, no pool, no spinning
        self._session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise SileroFileError(f"not a Silero VAD model: inputs {sorted(names)}")

    def run(self, window: np.ndarray, state: np.ndarray, rate_hz: int) -> tuple[float, np.ndarray]:
        """One window (context included, shape (1, n)) -> (speech probability, next state)."""
        feeds = {"input": window, "state": state, "sr": np.array(rate_hz, np.int64)}
        probability, next_state = self._session.run(None, feeds)
        return float(probability[0, 0]), next_state


_shared: dict[Path, SileroModel] = {}
_shared_lock = threading.Lock()


def shared_model(path: Path | None = None) -> SileroModel:
    """The process's one model for ``path`` (checked and loaded on first use);
    SileroFileError if the file is missing or not the pinned one."""
    path = path or default_model_path()
    with _shared_lock:
        if path not in _shared:
            _shared[path] = SileroModel(read_verified(path))
        return _shared[path]


class SileroStream:
    """One input stream's windows and recurrent state. Not thread-safe."""

    def __init__(self, model: SileroModel, rate_hz: int) -> None:
        if rate_hz not in WINDOW_SAMPLES:
            raise ValueError(f"silero vad takes 8000 or 16000 Hz, got {rate_hz}")
        self._model = model
        self.rate_hz = rate_hz
        self._window = WINDOW_SAMPLES[rate_hz]
        self._context = CONTEXT_SAMPLES[rate_hz]
        self.windows_run = 0
        self.reset()

    def reset(self, lead: np.ndarray | None = None) -> None:
        """A fresh state; ``lead`` (the samples just before) becomes the first context."""
        self._state = np.zeros(STATE_SHAPE, np.float32)
        self._pending = np.zeros(self._context, np.float32)
        if lead is not None:
            held = np.concatenate([self._pending, lead])
            self._pending = held[-self._context - self._window :]
        self.probability = 0.0

    def push(self, samples: np.ndarray) -> float:
        """Float samples in; the newest finished window's probability out."""
        self._pending = np.concatenate([self._pending, samples])
        while len(self._pending) >= self._context + self._window:
            window = self._pending[: self._context + self._window][None, :]
            self.probability, self._state = self._model.run(window, self._state, self.rate_hz)
            self.windows_run += 1
            self._pending = self._pending[self._window :]
        return self.probability


class GatedSileroClassifier:
    """``classify(frame) -> bool`` for ``pipeline.vad.TurnDetector``: webrtcvad gates, the
    model decides against ``threshold``. Not thread-safe; one per input stream."""

    def __init__(
        self, stream: SileroStream, gate: Callable[[bytes], bool], threshold: float
    ) -> None:
        self.stream = stream
        self._gate = gate
        self.threshold = threshold
        self._lead = np.zeros(0, np.float32)  # the newest samples, to start the model on
        self._quiet_frames = BRIDGE_FRAMES  # the model runs while this is < BRIDGE_FRAMES
        self._heard = False  # a frame of this stretch reached the threshold
        self._voiced = self._gate_was_open = False  # the previous frame's
        self._gate_trusted = False  # webrtcvad's voicing alone is speech (a word after a pause)

    def __call__(self, frame: bytes) -> bool:
        samples = np.frombuffer(frame, "<i2").astype(np.float32) / 32768.0
        gate_open = self._gate(frame)
        self._quiet_frames = 0 if gate_open else self._quiet_frames + 1
        if self._quiet_frames >= BRIDGE_FRAMES:
            self._remember(samples)
            return False
        if self._lead.size:  # waking: a fresh state, a first window ending with this frame
            self._remember(samples)
            self.stream.reset(self._lead)
            self._lead = np.zeros(0, np.float32)
            self._heard, self._gate_trusted = False, False
            probability = self.stream.push(samples[:0])
        else:
            probability = self.stream.push(samples)
        voiced = gate_open and self._speech(probability, gate_open)
        self._voiced, self._gate_was_open = voiced, gate_open
        return voiced

    def _speech(self, probability: float, gate_open: bool) -> bool:
        """The stretch's first speech at ``threshold``, its ends where the probability falls
        ``HOLD_MARGIN`` under it. After a pause, webrtcvad's word alone brings speech back
        until the model is sure again: the model is slow to trust a weak word after a pause
        (200 ms late on a recorded "an", which made a 300 ms pause a 500 ms one)."""
        if not self._heard:
            self._heard = probability >= self.threshold
            return self._heard
        if gate_open and not self._gate_was_open and not self._voiced:
            self._gate_trusted = True  # webrtcvad's onset, not its hangover
        if probability >= self.threshold:
            self._gate_trusted = False
        return self._gate_trusted or probability >= self.threshold - HOLD_MARGIN

    def _remember(self, samples: np.ndarray) -> None:
        keep = WINDOW_SAMPLES[self.stream.rate_hz] + CONTEXT_SAMPLES[self.stream.rate_hz]
        self._lead = np.concatenate([self._lead, samples])[-keep:]


def vad_classifier(
    config: VadConfig, rate_hz: int, model_path: Path | None = None
) -> Callable[[bytes], bool]:
    """What ``config.model`` names: the gated model for ``config.threshold``, or webrtcvad
    alone (``auto`` at the default threshold; also where the model cannot run: no checked
    file, a rate it does not take; why is logged once a process)."""
    gate = webrtc_classifier(config, rate_hz)
    if not uses_model(config):
        return gate
    if rate_hz not in WINDOW_SAMPLES:
        _warn_once(f"silero vad takes 8000 or 16000 Hz, not {rate_hz}")
        return gate
    try:
        model = shared_model(model_path)
    except SileroFileError as error:
        _warn_once(str(error))
        return gate
    return GatedSileroClassifier(SileroStream(model, rate_hz), gate, config.threshold)


def uses_model(config: VadConfig) -> bool:
    """``silero``, or ``auto`` for server_vad with a threshold other than the default: the
    model costs ~4 ms of CPU per call-second where webrtcvad costs 0.1 (the module's
    docstring), and semantic_vad has no threshold (OpenAI's takes none; its model's pauses
    were tuned with webrtcvad's end)."""
    if config.model == "auto":
        return not config.semantic and config.threshold != DEFAULT_THRESHOLD
    return config.model == "silero"


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("silero vad: %s; webrtcvad alone decides (threshold in its 4 steps)", reason)
