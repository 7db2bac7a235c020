"""What the conversation engine tells its consumer, in order.

Protocol layer, pure dataclasses. They map one to one onto OpenAI Realtime server events, so
the transceiver can forward them on the ``oai-events`` data channel:

=========================  ====================================================================
SpeechStartedEvent         input_audio_buffer.speech_started
SpeechStoppedEvent         input_audio_buffer.speech_stopped (+ committed)
InputCommitted             input_audio_buffer.committed (the client's commit, push-to-talk)
InputTranscript            conversation.item.input_audio_transcription.delta / .completed
ResponseStarted            response.created
ResponseTextDelta          response.output_audio_transcript.delta
ToolCallStarted            response.function_call_arguments.done
ClientToolCallRequested    response.function_call_arguments.done (the response ends; the client
                           runs the tool and answers: ``add_tool_output`` + ``create_response``)
ToolCallCompleted          conversation.item.create (function_call_output)
OutputStarted / Stopped    output_audio_buffer.started / .stopped (paced playout: after the
                           response's ResponseDone and TurnCompleted, when its audio has played)
OutputCleared              output_audio_buffer.cleared (barge-in; after ResponseDone, the answer
                           in the history is cut to ``heard_text``)
OutputAudio                one output frame (20 ms of PCM), the media track
ResponseDone               response.done (status completed / cancelled / failed) when generation
                           ends; ``refused``: a response the engine's ``refuse_response`` did not
                           let run (failed at once, its ``ResponseRefusal`` says why)
TurnCompleted              the turn's latency record
EngineError                error
=========================  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.providers import SpeakerSegment, TokenLogprob, ToolCall, ToolResult
from pipeline.turns import TurnRecord


@dataclass(frozen=True)
class SpeechStartedEvent:
    at_s: float
    audio_start_ms: int
    turn: int = 0


@dataclass(frozen=True)
class SpeechStoppedEvent:
    at_s: float
    audio_end_ms: int
    turn: int = 0
    pcm: bytes = field(default=b"", repr=False)  # the committed utterance, 16-bit mono
    sample_rate_hz: int = 16000  # of ``pcm``


@dataclass(frozen=True)
class InputCommitted:
    """The client committed the input heard since its last commit (no VAD): a user turn."""

    audio_ms: int
    turn: int
    pcm: bytes = field(default=b"", repr=False)  # the committed input, 16-bit mono
    sample_rate_hz: int = 16000  # of ``pcm``


@dataclass(frozen=True)
class InputTranscript:
    """The turn's words so far (or all of them: ``final``), with the logprobs and speaker
    segments so far when the speech-to-text was asked for them."""

    turn: int
    text: str
    final: bool
    logprobs: tuple[TokenLogprob, ...] = ()
    segments: tuple[SpeakerSegment, ...] = ()


@dataclass(frozen=True)
class ResponseStarted:
    response_id: str
    turn: int
    audio: bool = True  # False: a text-only answer (no audio, no output audio events)


@dataclass(frozen=True)
class ResponseTextDelta:
    response_id: str
    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    response_id: str
    call: ToolCall


@dataclass(frozen=True)
class ClientToolCallRequested:
    response_id: str
    call: ToolCall


@dataclass(frozen=True)
class ToolCallCompleted:
    response_id: str
    result: ToolResult


@dataclass(frozen=True)
class OutputStarted:
    response_id: str


@dataclass(frozen=True)
class OutputAudio:
    response_id: str
    pcm: bytes
    sample_rate_hz: int


@dataclass(frozen=True)
class OutputStopped:
    response_id: str


@dataclass(frozen=True)
class OutputCleared:
    response_id: str
    audio_end_ms: int  # how much of the answer was played before the interruption
    heard_text: str = ""  # the words played by then


@dataclass(frozen=True)
class ResponseRefusal:
    """Why a response may not run now (e.g. its API key's tokens are spent), in the words of
    OpenAI's error object: ``type``, ``code``, ``message``."""

    type: str
    code: str
    message: str


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    # incomplete: stopped at the response's max_output_tokens
    status: Literal["completed", "cancelled", "failed", "incomplete"]
    heard_text: str
    audio_ms: float = 0.0  # the answer's audio, all of it made (played or not)
    playing: bool = False  # done before its audio played: OutputStopped or OutputCleared follows
    refused: ResponseRefusal | None = None  # failed without running: why


@dataclass(frozen=True)
class TurnCompleted:
    record: TurnRecord


@dataclass(frozen=True)
class EngineError:
    message: str
    retryable: bool
    turn: int | None = None  # a transcription's failure: its turn (None: anything else)


EngineEvent = (
    SpeechStartedEvent
    | SpeechStoppedEvent
    | InputCommitted
    | InputTranscript
    | ResponseStarted
    | ResponseTextDelta
    | ToolCallStarted
    | ClientToolCallRequested
    | ToolCallCompleted
    | OutputStarted
    | OutputAudio
    | OutputStopped
    | OutputCleared
    | ResponseDone
    | TurnCompleted
    | EngineError
)
