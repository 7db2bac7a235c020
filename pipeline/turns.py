"""The per-turn record: where each millisecond between the user's last word and the answer went.

Protocol layer, pure. The engine marks moments on a :class:`TurnRecorder` (loop-clock seconds)
and the time it spends awaiting a provider (or a tool); :meth:`TurnRecorder.finish` derives the
durations and the pipeline's own overhead on the critical path:

    overhead_ms = (first frame out - speech stopped) - provider time within that window

Provider intervals overlap (the LLM writes while TTS speaks), so their union is used.
With ``semantic_vad``, the turn's decision: its last voiced frame, the model first asked in
its last pause, and the model's own time for the question that ended it (``DecisionTiming``).

The cost comes from an injected estimator (``pipeline.pricing`` for paid providers); offline
providers cost nothing, which is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

MOMENTS = (
    "speech_started",
    "last_voiced",  # the utterance's last frame the VAD called speech, as it arrived
    "turn_asked",  # semantic_vad: the end-of-turn model first asked, in the turn's last pause
    "speech_stopped",
    "stt_final",
    "llm_first_token",
    "first_tts_request",
    "first_tts_audio",
    "first_frame_out",
    "llm_last_token",
    "response_done",
)


@dataclass(frozen=True)
class DecisionTiming:
    """The end-of-turn model's run for the question that ended the turn (wall clock, on its
    thread), and how many questions the turn's last pause asked; the last answer's probability
    that the speaker was done and whether it said so (None: the model had not answered, or
    failed)."""

    queued_ms: float = 0.0
    features_ms: float = 0.0
    model_ms: float = 0.0
    asked: int = 0
    probability: float | None = None
    complete: bool | None = None
    cpu_ms: float | None = None  # the decision thread's CPU time for it (load hardly moves it)


@dataclass(frozen=True)
class TurnRecord:
    turn: int
    interrupted: bool
    transcript: str
    heard_text: str  # the assistant text the user actually heard
    stt_provider: str
    llm_provider: str
    tts_provider: str
    # loop-clock timestamps, seconds; None when the stage did not happen
    speech_started_s: float | None
    speech_stopped_s: float | None
    stt_final_s: float | None
    llm_first_token_s: float | None
    first_tts_request_s: float | None
    first_tts_audio_s: float | None
    first_frame_out_s: float | None
    llm_last_token_s: float | None
    response_done_s: float | None
    # durations, milliseconds
    stt_ms: float | None
    llm_first_token_ms: float | None
    tts_first_audio_ms: float | None
    speech_stopped_to_first_frame_ms: float | None
    provider_ms: float | None  # provider/tool time within that window
    overhead_ms: float | None  # the pipeline's own share of that window
    # counts
    input_audio_s: float
    transcript_chars: int
    llm_input_tokens: int
    llm_output_tokens: int
    tool_calls: int
    tts_chars: int
    output_audio_s: float  # audio actually played
    cost_usd: float = 0.0
    # answers started at a pause (before the turn ended): thrown away when the user went on,
    # and whether the one that answered was started so
    early_answers_discarded: int = 0
    answered_early: bool = False
    early_answers_wasted_ms: float = 0.0  # the discarded answers' providers' time (union)
    # calls the model made beyond a turn's first when it was asked for one (parallel_tool_calls
    # false): not made, and not kept in the conversation
    tool_calls_dropped: int = 0
    # semantic_vad's decision (loop-clock seconds; the model's own time)
    last_voiced_s: float | None = None
    turn_asked_s: float | None = None
    decision: DecisionTiming | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


CostEstimator = Callable[[TurnRecord], float]


def free_of_charge(_: TurnRecord) -> float:
    return 0.0


@dataclass
class TurnRecorder:
    turn: int
    stt_provider: str = ""
    llm_provider: str = ""
    tts_provider: str = ""
    transcript: str = ""
    heard_text: str = ""
    input_audio_s: float = 0.0
    llm_input_tokens: int = 0
    llm_output_tokens: int = 0
    tool_calls: int = 0
    tts_chars: int = 0
    output_audio_s: float = 0.0
    early_answers_discarded: int = 0
    answered_early: bool = False
    early_answers_wasted_ms: float = 0.0
    tool_calls_dropped: int = 0
    decision: DecisionTiming | None = None
    moments: dict[str, float] = field(default_factory=dict)
    busy: list[tuple[float, float]] = field(default_factory=list)

    def mark(self, moment: str, at_s: float, *, overwrite: bool = False) -> None:
        if moment not in MOMENTS:
            raise ValueError(f"unknown turn moment {moment!r}")
        if overwrite or moment not in self.moments:
            self.moments[moment] = at_s

    def provider_busy(self, start_s: float, end_s: float) -> None:
        self.busy.append((start_s, end_s))

    def busy_ms(self) -> float:
        """The union of the time spent awaiting providers, whenever it was."""
        if not self.busy:
            return 0.0
        window = (min(s for s, _ in self.busy), max(e for _, e in self.busy))
        return _union_ms(self.busy, window) or 0.0

    def absorb(self, turn: TurnRecorder) -> None:
        """This recorder's answer was started before ``turn`` ended: take in the turn's own
        record (its moments, transcript, input and the time spent transcribing it)."""
        for moment, at_s in turn.moments.items():
            self.mark(moment, at_s)
        self.transcript, self.input_audio_s = turn.transcript, turn.input_audio_s
        self.busy.extend(turn.busy)
        self.early_answers_discarded += turn.early_answers_discarded
        self.early_answers_wasted_ms += turn.early_answers_wasted_ms
        self.decision = self.decision or turn.decision
        self.answered_early = True

    def finish(
        self, *, interrupted: bool, estimate_cost: CostEstimator = free_of_charge
    ) -> TurnRecord:
        at = self.moments.get
        window = (self.moments.get("speech_stopped"), self.moments.get("first_frame_out"))
        provider_ms = _union_ms(self.busy, window)
        total_ms = _ms(*window)
        record = TurnRecord(
            turn=self.turn,
            interrupted=interrupted,
            transcript=self.transcript,
            heard_text=self.heard_text,
            stt_provider=self.stt_provider,
            llm_provider=self.llm_provider,
            tts_provider=self.tts_provider,
            speech_started_s=at("speech_started"),
            speech_stopped_s=at("speech_stopped"),
            stt_final_s=at("stt_final"),
            llm_first_token_s=at("llm_first_token"),
            first_tts_request_s=at("first_tts_request"),
            first_tts_audio_s=at("first_tts_audio"),
            first_frame_out_s=at("first_frame_out"),
            llm_last_token_s=at("llm_last_token"),
            response_done_s=at("response_done"),
            stt_ms=self._between("speech_stopped", "stt_final"),
            llm_first_token_ms=self._between("stt_final", "llm_first_token"),
            tts_first_audio_ms=self._between("first_tts_request", "first_tts_audio"),
            speech_stopped_to_first_frame_ms=total_ms,
            provider_ms=provider_ms,
            overhead_ms=None if total_ms is None or provider_ms is None else total_ms - provider_ms,
            input_audio_s=self.input_audio_s,
            transcript_chars=len(self.transcript),
            llm_input_tokens=self.llm_input_tokens,
            llm_output_tokens=self.llm_output_tokens,
            tool_calls=self.tool_calls,
            tts_chars=self.tts_chars,
            output_audio_s=self.output_audio_s,
            early_answers_discarded=self.early_answers_discarded,
            answered_early=self.answered_early,
            early_answers_wasted_ms=self.early_answers_wasted_ms,
            tool_calls_dropped=self.tool_calls_dropped,
            last_voiced_s=at("last_voiced"),
            turn_asked_s=at("turn_asked"),
            decision=self.decision,
        )
        return replace(record, cost_usd=estimate_cost(record))

    def _between(self, start: str, end: str) -> float | None:
        return _ms(self.moments.get(start), self.moments.get(end))


def _ms(start_s: float | None, end_s: float | None) -> float | None:
    if start_s is None or end_s is None:
        return None
    return (end_s - start_s) * 1000


def _union_ms(
    intervals: list[tuple[float, float]], window: tuple[float | None, float | None]
) -> float | None:
    """Total length of the union of intervals, clipped to the window."""
    low, high = window
    if low is None or high is None:
        return None
    clipped = sorted((max(s, low), min(e, high)) for s, e in intervals if e > low and s < high)
    total_s, reach = 0.0, low
    for start, end in clipped:
        if end > reach:
            total_s += end - max(start, reach)
            reach = end
    return total_s * 1000
