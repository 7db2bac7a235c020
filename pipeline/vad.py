"""Turn detection: voice activity per frame -> speech started / speech stopped / turn committed.

Protocol layer: a pure state machine. It is fed 10, 20 or 30 ms frames of 16-bit mono PCM and
asks an injected ``classify(frame) -> bool`` whether each frame is voiced (webrtcvad; Silero
where a session asks for its threshold: ``pipeline.silero_vad.vad_classifier``). With
``VadConfig.voice_end_db`` set (off by default: ``pipeline.config`` says why), pauses count from
the end of the voice itself: a voiced frame that far under the utterance's loudest is its
fading tail, which webrtcvad calls speech for 100-140 ms more.
Event times come from an injected clock; durations (silence, padding) are counted in audio, so
a file fed faster than real time is segmented the same way.

The knobs are OpenAI's ``server_vad`` ones:

- ``threshold`` (0..1): how sure the detector must be that a frame is speech: Silero's speech
  probability (``pipeline.silero_vad``), as OpenAI's; also webrtcvad's aggressiveness 0..3,
  the gate in front of the model and the whole decision without it.
- ``prefix_padding_ms``: audio kept from before the detected onset, so the first phoneme is
  not clipped.
- ``silence_duration_ms``: trailing silence that ends the turn.

``min_speech_ms`` is the onset window: that much consecutive voiced audio starts speech. It is
also the barge-in reaction time: the engine stops playout on ``SpeechStarted``.

Semantic end of turn (``semantic_vad``; ``VadConfig.semantic``): at a pause of
``ask_pause_ms`` the detector asks an injected ``ask_end_of_turn(pcm)`` whether the user
is done, passing the last ``DECISION_WINDOW_MS`` of the utterance. It answers with a poll,
which the detector reads on each frame of that pause from ``decision_pause_ms`` on: "complete"
ends the turn at that frame, never sooner; "not yet" from a question asked before
``decision_pause_ms`` is asked again there, of the longer pause; "not yet" then (or speech
coming back) leaves it to ``silence_duration_ms``, the longer window. Asking ahead puts the
model's ~50 ms (and the caller's transcription of the words so far) before the decision's
moment rather than after it; a breath shorter than ``decision_pause_ms`` still ends no turn.
The poll keeps the model off the caller's thread; a poll that answers at once makes
segmentation a function of the audio alone. The model's pauses count from the voice's end;
the "not yet" window from the classifier's last voiced frame, so it waits as long as before
the voice's end was told apart (server_vad's window counts from the voice's end). The model
hears the utterance with ``model_pad_ms`` of digital silence after it: counting from the
voice's end, it is asked ~100 ms sooner into the pause than with webrtcvad's tail inside it,
and the padding gives it back the silence it was tuned to hear.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import VadConfig

VALID_SAMPLE_RATES_HZ = (8000, 16000, 32000, 48000)
VALID_FRAME_MS = (10, 20, 30)
DECISION_WINDOW_MS = 8000  # what the end-of-turn model listens to (pipeline.log_mel)
SILENT_DBFS = -120.0  # digital silence's level, where the logarithm has none
_PCM16 = np.dtype("<i2")
_FULL_SCALE_POWER = 32768.0**2

Verdict = Callable[[], bool | None]  # True: complete, False: not yet, None: still deciding
AskEndOfTurn = Callable[[bytes], Verdict]


@dataclass(frozen=True)
class SpeechStarted:
    at_s: float
    audio_start_ms: int  # position in the input stream, prefix padding included
    prefix_pcm: bytes  # padding and onset frames: the start of the utterance


@dataclass(frozen=True)
class SpeechStopped:
    at_s: float
    audio_end_ms: int
    pcm: bytes = field(default=b"", repr=False)  # the utterance to its end, prefix included


@dataclass(frozen=True)
class TurnCommitted:
    at_s: float
    pcm: bytes  # the whole utterance, prefix padding included
    duration_ms: int


VadEvent = SpeechStarted | SpeechStopped | TurnCommitted


def frame_duration_ms(frame: bytes, sample_rate_hz: int) -> int:
    """Validate one frame and return its duration; a clear ValueError for anything else."""
    if sample_rate_hz not in VALID_SAMPLE_RATES_HZ:
        raise ValueError(
            f"vad sample rate must be one of {VALID_SAMPLE_RATES_HZ}, got {sample_rate_hz}"
        )
    samples, odd = divmod(len(frame), 2)
    duration_ms = samples * 1000 // sample_rate_hz
    if odd or duration_ms not in VALID_FRAME_MS or samples * 1000 % sample_rate_hz:
        raise ValueError(
            f"vad frame must be 10, 20 or 30 ms of 16-bit PCM at {sample_rate_hz} Hz, "
            f"got {len(frame)} bytes"
        )
    return duration_ms


class TurnDetector:
    """Segments a stream of frames into utterances. Not thread-safe; one per input stream."""

    def __init__(
        self,
        config: VadConfig,
        sample_rate_hz: int,
        classify: Callable[[bytes], bool],
        clock: Callable[[], float],
        ask_end_of_turn: AskEndOfTurn | None = None,
    ) -> None:
        frame_duration_ms(b"\0" * (sample_rate_hz // 50), sample_rate_hz)  # validates the rate
        self.config = config
        self.sample_rate_hz = sample_rate_hz
        self._classify = classify
        self._ask_end_of_turn = ask_end_of_turn
        self._verdict: Verdict | None = None  # the pause's decision, while it is pending
        self._asks = 0  # questions asked in this pause (at most two: ahead, then at the pause)
        self._clock = clock
        self._frame_bytes, self._frame_ms = -1, 0  # the last frame size checked, its duration
        self._position_ms = 0
        self._recent: deque[tuple[bytes, bool]] = deque()  # prefix padding + onset window
        self._recent_ms = 0
        self._voiced_run_ms = 0
        self._silence_run_ms = 0  # since the classifier's last voiced frame
        self._faded_run_ms = 0  # since the last frame of the voice itself (not faded)
        self._loudest_dbfs = SILENT_DBFS  # the utterance's (or the onset run's) loudest frame
        self._utterance: list[bytes] = []
        self._utterance_start_ms = 0
        self.in_speech = False

    @property
    def position_ms(self) -> int:
        """How much audio it has been fed."""
        return self._position_ms

    @property
    def pause_ms(self) -> int:
        """The pause since the voice of the utterance in progress last sounded (0 outside
        one): its fading tail, which webrtcvad goes on calling speech, is part of it."""
        return self._faded_run_ms if self.in_speech else 0

    def reconfigure(
        self,
        config: VadConfig,
        classify: Callable[[bytes], bool],
        ask_end_of_turn: AskEndOfTurn | None = None,
    ) -> None:
        """New knobs from the next frame on; an open utterance goes on under them."""
        self.config = config
        self._classify = classify
        self._ask_end_of_turn = ask_end_of_turn

    def reset(self) -> None:
        """Forget the open utterance and the onset window (input buffer cleared)."""
        self.in_speech = False
        self._utterance = []
        self._recent.clear()
        self._recent_ms = self._voiced_run_ms = self._silence_run_ms = self._faded_run_ms = 0
        self._loudest_dbfs = SILENT_DBFS
        self._verdict, self._asks = None, 0

    def push(self, frame: bytes) -> list[VadEvent]:
        """Feed one frame; returns the events it caused (usually none)."""
        if len(frame) != self._frame_bytes:  # a call's frames are all one size: checked once
            self._frame_ms = frame_duration_ms(frame, self.sample_rate_hz)
            self._frame_bytes = len(frame)
        duration_ms = self._frame_ms
        voiced = self._classify(frame)
        self._position_ms += duration_ms
        if self.in_speech:
            return self._push_in_speech(frame, voiced, duration_ms)
        return self._push_in_silence(frame, voiced, duration_ms)

    def flush(self) -> list[VadEvent]:
        """End of input: close an open utterance as if silence followed."""
        if not self.in_speech:
            return []
        return self._stop()

    def _push_in_silence(self, frame: bytes, voiced: bool, duration_ms: int) -> list[VadEvent]:
        self._remember(frame, voiced, duration_ms)
        self._voiced_run_ms = self._voiced_run_ms + duration_ms if voiced else 0
        self._note_loudest(frame, voiced)
        if self._voiced_run_ms < max(self.config.min_speech_ms, duration_ms):
            return []
        self.in_speech = True
        self._silence_run_ms = self._faded_run_ms = 0
        self._utterance = [pcm for pcm, _ in self._recent]
        self._utterance_start_ms = self._position_ms - self._recent_ms
        prefix = b"".join(self._utterance)
        self._recent.clear()
        self._recent_ms = 0
        return [SpeechStarted(self._clock(), self._utterance_start_ms, prefix)]

    def _push_in_speech(self, frame: bytes, voiced: bool, duration_ms: int) -> list[VadEvent]:
        self._utterance.append(frame)
        self._silence_run_ms = 0 if voiced else self._silence_run_ms + duration_ms
        sounding = voiced and self._sounding(frame)
        self._faded_run_ms = 0 if sounding else self._faded_run_ms + duration_ms
        if sounding:
            self._verdict, self._asks = None, 0  # a pause ended: its questions too
        if self._window_run_ms() >= max(self.config.silence_duration_ms, duration_ms):
            return self._stop()
        if self._judged_complete():
            return self._stop()
        return []

    def _sounding(self, frame: bytes) -> bool:
        """A voiced frame within ``voice_end_db`` of the utterance's loudest: the voice itself,
        not its fading tail. webrtcvad calls 100-140 ms of a word's tail and the silence
        after it speech (its hangover, ``kOverHangMax`` in its C core, not ours to tune): the
        pauses the turn is decided at count from the voice's end instead."""
        if math.isinf(self.config.voice_end_db):
            return True  # off: no level is computed (a few microseconds a frame, every call)
        level_dbfs = level_of(frame)
        self._loudest_dbfs = max(self._loudest_dbfs, level_dbfs)
        return level_dbfs >= self._loudest_dbfs - self.config.voice_end_db

    def _note_loudest(self, frame: bytes, voiced: bool) -> None:
        """The onset run's loudest frame (forgotten at an unvoiced one)."""
        if not voiced:
            self._loudest_dbfs = SILENT_DBFS
        elif not math.isinf(self.config.voice_end_db):
            self._loudest_dbfs = max(self._loudest_dbfs, level_of(frame))

    def _window_run_ms(self) -> int:
        """The silence the window counts: server_vad's from the voice's end; semantic_vad's
        "not yet" window from the classifier's, as long as it waited before the voice's end
        was told apart (the model's decisions count from the voice's end)."""
        return self._silence_run_ms if self.config.semantic else self._faded_run_ms

    def _judged_complete(self) -> bool:
        """Semantic end of turn: asks ahead, reads the verdict from the decision's pause on,
        and asks once more there if the question ahead heard "not yet"."""
        if self._ask_end_of_turn is None or not self.config.semantic or not self._faded_run_ms:
            return False
        decide_ms = max(self.config.decision_pause_ms, 1)
        ahead = min(max(self.config.ask_pause_ms, 1), decide_ms) < decide_ms
        if not self._asks and self._faded_run_ms >= (
            self.config.ask_pause_ms if ahead else decide_ms
        ):
            self._ask()
        if self._faded_run_ms < decide_ms:
            return False
        verdict = self._read_verdict()
        if verdict is False and ahead and self._asks == 1:
            self._ask()  # of the pause as long as a decision's, the model may hear it end
            verdict = self._read_verdict()
        return bool(verdict)

    def _ask(self) -> None:
        assert self._ask_end_of_turn is not None
        self._asks += 1
        padding = bytes(self.config.model_pad_ms * self.sample_rate_hz // 500)
        self._verdict = self._ask_end_of_turn(self._decision_pcm() + padding)

    def _read_verdict(self) -> bool | None:
        verdict = self._verdict() if self._verdict is not None else None
        if verdict is not None:
            self._verdict = None
        return verdict

    def _decision_pcm(self) -> bytes:
        """The utterance's last ``DECISION_WINDOW_MS`` (joined from its newest frames only)."""
        keep_bytes = DECISION_WINDOW_MS * self.sample_rate_hz // 500
        tail: list[bytes] = []
        held_bytes = 0
        for pcm in reversed(self._utterance):
            if held_bytes >= keep_bytes:
                break
            tail.append(pcm)
            held_bytes += len(pcm)
        return b"".join(reversed(tail))[-keep_bytes:]

    def _stop(self) -> list[VadEvent]:
        now = self._clock()
        pcm = b"".join(self._utterance)
        self.in_speech = False
        self._utterance = []
        self._voiced_run_ms = 0
        self._loudest_dbfs = SILENT_DBFS
        self._verdict, self._asks = None, 0
        duration_ms = self._position_ms - self._utterance_start_ms
        end_ms = self._position_ms - self._faded_run_ms
        spoken_bytes = (end_ms - self._utterance_start_ms) * self.sample_rate_hz // 500
        return [
            SpeechStopped(now, end_ms, pcm[:spoken_bytes]),
            TurnCommitted(now, pcm, duration_ms),
        ]

    def _remember(self, frame: bytes, voiced: bool, duration_ms: int) -> None:
        self._recent.append((frame, voiced))
        self._recent_ms += duration_ms
        keep_ms = self.config.prefix_padding_ms + max(self.config.min_speech_ms, duration_ms)
        while self._recent_ms - self._pcm_ms(self._recent[0][0]) >= keep_ms:
            old, _ = self._recent.popleft()
            self._recent_ms -= self._pcm_ms(old)

    def _pcm_ms(self, pcm: bytes) -> int:
        return len(pcm) * 500 // self.sample_rate_hz


def level_of(frame: bytes) -> float:
    """A 16-bit PCM frame's RMS level in dBFS; ``SILENT_DBFS`` for digital silence. The
    energy is float32's (the samples' dot product in single precision, as it always was:
    the turn's decisions compare levels, so they stay the same to the last bit)."""
    samples = np.frombuffer(frame, _PCM16).astype(np.float32)
    energy = float(samples @ samples)
    if energy <= 0:
        return SILENT_DBFS  # digital silence, or no samples
    return max(SILENT_DBFS, 10.0 * math.log10(energy / samples.size / _FULL_SCALE_POWER))


def webrtc_classifier(config: VadConfig, sample_rate_hz: int) -> Callable[[bytes], bool]:
    """webrtcvad's GMM classifier at the aggressiveness the threshold maps to."""
    import _webrtcvad  # type: ignore[import-not-found]  # webrtcvad's C core: no stubs
    import webrtcvad

    vad = webrtcvad.Vad(config.aggressiveness)
    state, process = vad._vad, _webrtcvad.process

    def classify(frame: bytes) -> bool:
        # ``Vad.is_speech`` without its Python wrapper (which works out the sample count with
        # a float division and checks it against the buffer: ~0.5 us of its ~2.5 a frame);
        # the C call checks the rate and length itself (tests/test_frame_path.py: the same
        # answers as is_speech on every frame of recorded speech)
        return bool(process(state, sample_rate_hz, frame, len(frame) >> 1))

    return classify
