"""Engine events -> OpenAI Realtime (GA) server events, in the order and shapes OpenAI sends.

Protocol layer, pure: one :class:`EngineEventTranslator` per session keeps the ids (user items
per turn, response and output items) and turns each ``pipeline.events`` value into the server
events it means. Audio frames are not events here (they go on the media track). Server-side
tools (the built-ins) stay inside the server, as OpenAI's own do; client tools become
``function_call`` output items that end their response.

A user turn: speech_started, speech_stopped, committed, conversation.item.added/done (user
audio), input_audio_transcription.delta*/completed. A response: response.created,
output_item.added + conversation.item.added + content_part.added, output_audio_buffer.started,
output_audio_transcript.delta*, transcript.done, output_audio.done, content_part.done,
output_item.done + conversation.item.done, response.done (with usage), then the
``voicerelay.turn.metrics`` extension, all when generation ends; then, when its audio has
played, output_audio_buffer.stopped (OpenAI: "emitted after the full response data has been
sent to the client (response.done)"). A barge-in before that: output_audio_buffer.cleared and
conversation.item.truncated, the item's transcript cut to the words played (a cancelled
response's item is cut in its own response.done). Over WebRTC an answer's item knows its
audio's length (``ResponseDone.audio_ms``), so a client's ``truncate`` cuts it as over
WebSocket.

Over WebSocket (``media_track=False``) the audio rides in the events: ``audio_delta`` makes
``response.output_audio.delta`` (base64 PCM16 at 24 kHz) and there is no output audio buffer,
so no ``output_audio_buffer.*`` events and no automatic truncation on barge-in: as with
OpenAI, the client plays the audio and says what it heard with ``conversation.item.truncate``
(``truncate`` answers what text that leaves).

A response's body carries the conversation's id, its ``metadata``, its audio output format and
voice and its ``max_output_tokens`` (``shape``: what a ``response.create`` asked for; else the
session's). An out-of-band response (``conversation: "none"``) has ``conversation_id: null``:
its output items are the response's only (``response.output_item.*``, no
``conversation.item.*``, not kept for retrieve or truncate) and no output audio buffer events.

A text-only response (``output_modalities: ["text"]``) has an ``output_text`` part:
``response.output_text.delta``/``.done`` instead of the audio transcript events, and no
``response.output_audio.*``. A response stopped at its ``max_output_tokens`` is ``incomplete``
(``status_details.reason: "max_output_tokens"``). With input transcription off
(``transcription = False``) the transcription events are not sent and a user audio item's
transcript stays null. A push-to-talk commit (``InputCommitted``) is
``input_audio_buffer.committed`` and the user audio item, without speech events.

``input_audio_transcription.completed`` carries ``usage`` (``{"type": "duration", "seconds"}``:
the audio the turn committed); a turn whose transcription failed gets ``.failed`` on its item
(OpenAI's words, the cause after them) instead of an ``error``, and is not answered. A
response's ``usage`` counts the language model's tokens as text and the audio as OpenAI's
model would bill it (``MS_PER_AUDIO_TOKEN``): input audio tokens for the audio items of its
input (the conversation's, or those its own ``input`` refers to; user audio heard or created,
answers' audio made), output audio tokens for the audio it made (over WebSocket: sent).

``conversation.item.retrieved`` (``retrieved``) carries an audio item's ``audio`` while the
session keeps it (``item_audio``, the newest ``RealtimeLimits.item_audio_s`` across items): a
user turn's utterance (``SpeechStoppedEvent.pcm``, ``InputCommitted.pcm``) and an answer's
frames (``output_audio``), cut where the answer is truncated or cleared.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from pipeline import events as ev
from pipeline.providers import SpeakerSegment, TokenLogprob
from pipeline.turns import TurnRecord
from transceiver.realtime.client_events import AUDIO_RATE_HZ, EventError, new_id
from transceiver.realtime.item_audio import ItemAudio
from transceiver.realtime.server_events import function_call_item, message_item, server_event
from transceiver.realtime.stable_words import StableWords

Event = dict[str, Any]
FirstFrameLookup = Callable[[str], float | None]
Resample = Callable[[bytes, int], bytes]  # PCM16 at a rate -> at AUDIO_RATE_HZ
MAX_ITEMS_KEPT = 256
MAX_TAILS = 8  # done responses whose audio may still be playing
# OpenAI's audio tokens (developers.openai.com/api/docs/guides/realtime-costs): "Audio tokens
# in user messages are 1 token per 100 ms of audio, while audio tokens in assistant messages
# are 1 token per 50ms of audio."
MS_PER_AUDIO_TOKEN = {"user": 100, "assistant": 50}
AUDIO_FORMAT = {"type": "audio/pcm", "rate": AUDIO_RATE_HZ}
_AUDIO_PARTS = ("input_audio", "output_audio")  # a retrieved item's part that carries audio
_STATUS_REASON = {"cancelled": "turn_detected", "incomplete": "max_output_tokens"}


@dataclass(frozen=True)
class ResponseShape:
    """What one response reports of itself beyond its output."""

    in_conversation: bool = True  # False: out of band (conversation "none")
    metadata: Mapping[str, str] | None = None
    voice: str | None = None  # None: the session's
    max_output_tokens: int | None = None  # None: "inf"
    input_items: tuple[str, ...] | None = None  # its input's items (None: the conversation's)


@dataclass
class _Response:
    id: str
    shape: ResponseShape = field(default_factory=ResponseShape)
    output: list[Event] = field(default_factory=list)
    message_id: str | None = None
    text: str = ""
    status: str = "in_progress"
    cancel_reason: str = "turn_detected"
    audio: bool = True  # False: a text-only answer
    played: bool = False  # its audio has left the output buffer (stopped or cleared)
    input_audio_tokens: int = 0  # the audio of its input's items
    output_audio_tokens: int = 0  # the audio it made
    error: Event | None = None  # failed: the error's type and code

    def position(self, item_id: str) -> dict[str, Any]:
        index = next(i for i, item in enumerate(self.output) if item["id"] == item_id)
        return {"response_id": self.id, "item_id": item_id, "output_index": index}


class _Ending(Protocol):
    status: str


R = TypeVar("R", bound=_Ending)


class ResponseLedger(Generic[R]):
    """A translator's responses by engine response id, and the one that ended (``ResponseDone``)
    whose ``TurnCompleted`` comes next. The GPT-Live translator keeps its responses here too."""

    def __init__(self) -> None:
        self._responses: dict[str, R] = {}
        self._done: R | None = None
        self.done_engine_response_id = ""  # the response whose TurnCompleted comes next

    def _ended(self, event: ev.ResponseDone) -> R | None:
        """The response ``event`` ends, with its status, kept as done (None: not known)."""
        response = self._responses.get(event.response_id)
        if response is None:
            return None
        response.status = event.status
        self._done, self.done_engine_response_id = response, event.response_id
        return response

    def _completed(self) -> tuple[R | None, str]:
        """The done response (None: none) and its engine id, forgotten: its turn completed."""
        response, engine_id = self._done, self.done_engine_response_id
        if response is not None:
            self._done = None
            self._responses.pop(engine_id, None)
        return response, engine_id


class EngineEventTranslator(ResponseLedger[_Response]):
    def __init__(
        self, first_frame_sent_s: FirstFrameLookup = lambda _: None, *, media_track: bool = True
    ) -> None:
        super().__init__()
        self._first_frame_sent_s = first_frame_sent_s
        self.media_track = media_track  # False: WebSocket, the audio is in the events
        self.transcription = True  # False: no input transcription events
        # False: none of our voicerelay.* events (the official SDKs check every event against
        # their own types: the Agents SDK turns ours into error events)
        self.extension_events = True
        # audio item id -> its audio: a user's heard or created, an answer's made (over
        # WebSocket: sent in deltas)
        self.audio_ms: dict[str, float] = {}
        self._user_items: dict[int, str] = {}  # turn -> its user audio item, until transcribed
        self._started_ms: dict[int, int] = {}  # turn -> where its speech started
        self._turn_audio_ms: dict[int, int] = {}  # turn -> the audio it committed
        self._partials: dict[int, str] = {}
        # True: the speech-to-text's partials are new guesses that may revise earlier words
        # (``providers.REVISED_PARTIALS``): only their settled words are sent (``stable_words``)
        self.settled_partials = False
        self._settling: dict[int, StableWords] = {}  # turn -> its words settled so far
        self._details_sent: dict[int, tuple[int, int]] = {}  # a turn's logprobs, segments sent
        self.order: list[str] = []  # the conversation's item ids, in order
        self.items: dict[str, Event] = {}  # the latest body of each recent item, by id
        self.audio = ItemAudio()  # their audio, the newest of it (``item_audio``)
        self.conversation_id = new_id("conv")
        self.shape = ResponseShape()  # of responses no response.create shaped: the session's
        self._shapes: dict[str, ResponseShape] = {}  # engine response id -> its own
        self._tails: dict[str, _Response] = {}  # done responses whose audio still plays
        self._last_error: Event = {"type": "server_error", "code": None}  # a failure's cause

    def shape_response(self, engine_response_id: str, shape: ResponseShape) -> None:
        """How the response the engine is starting reports itself (before it starts)."""
        self._shapes[engine_response_id] = shape

    def response_id(self, engine_response_id: str) -> str | None:
        """The client's id of a response still running, or done with its audio still playing."""
        response = self._responses.get(engine_response_id) or self._tails.get(engine_response_id)
        return None if response is None else response.id

    def cancelled_by_client(self, engine_response_id: str) -> None:
        if (response := self._responses.get(engine_response_id)) is not None:
            response.cancel_reason = "client_cancelled"

    def translate(self, event: ev.EngineEvent) -> list[Event]:
        handler = _HANDLERS.get(type(event))
        return [] if handler is None else handler(self, event)

    @property
    def last_item_id(self) -> str | None:
        return self.order[-1] if self.order else None

    def previous_of(self, item_id: str) -> str | None:
        """The id of the item before ``item_id`` in the conversation (None: it is first)."""
        index = self.order.index(item_id) if item_id in self.order else 0
        return self.order[index - 1] if index > 0 else None

    def added(self, item: Event, previous: str | None = None, *, last: bool = True) -> list[Event]:
        """conversation.item.added + .done for an item that is complete at once: last in the
        conversation, or (``last`` False) right after ``previous`` (None: first)."""
        if last:
            previous = self._append(item["id"])
        else:
            self.order.insert(0 if previous is None else self.order.index(previous) + 1, item["id"])
        self.items[item["id"]] = item
        return [
            server_event("conversation.item.added", previous_item_id=previous, item=item),
            server_event("conversation.item.done", previous_item_id=previous, item=item),
        ]

    # --- the user's turn ------------------------------------------------------------------

    def _append(self, item_id: str) -> str | None:
        """The item goes last in the conversation; the id of the item before it."""
        previous = self.last_item_id
        self.order.append(item_id)
        if len(self.order) > MAX_ITEMS_KEPT:
            forgotten = self.order.pop(0)
            self.items.pop(forgotten, None)
            self.audio_ms.pop(forgotten, None)
            self.audio.forget(forgotten)
        return previous

    def forget(self, item_id: str) -> bool:
        if item_id in self.order:
            self.order.remove(item_id)
        self.audio_ms.pop(item_id, None)
        self.audio.forget(item_id)
        return self.items.pop(item_id, None) is not None

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]:
        """``response.output_audio.delta`` for PCM16 at 24 kHz (WebSocket sessions)."""
        response = self._responses.get(engine_response_id)
        if response is None or not pcm:
            return []
        events = self._open_message(response)
        assert response.message_id is not None
        item_id = response.message_id
        self.audio_ms[item_id] = self.audio_ms.get(item_id, 0.0) + len(pcm) * 500 / AUDIO_RATE_HZ
        where = response.position(item_id)
        delta = base64.b64encode(pcm).decode("ascii")
        return [
            *events,
            server_event("response.output_audio.delta", **where, content_index=0, delta=delta),
        ]

    def output_audio(self, engine_response_id: str, pcm: bytes, sample_rate_hz: int) -> None:
        """An answer's audio as it is made (over WebSocket: as sent; over WebRTC: as played),
        kept with its item for ``retrieved`` (an out-of-band answer's is not)."""
        response = self._responses.get(engine_response_id) or self._tails.get(engine_response_id)
        if response is None or response.message_id is None or not response.shape.in_conversation:
            return
        self.audio.keep(response.message_id, pcm, sample_rate_hz)

    def retrieved(self, item_id: str, resample: Resample) -> Event | None:
        """The item as ``conversation.item.retrieved`` shows it: its audio part with its
        ``audio`` (base64 PCM16 at ``AUDIO_RATE_HZ``, ``resample`` makes it so) while it is
        kept; None: no such item."""
        item = self.items.get(item_id)
        if item is None:
            return None
        clip = self.audio.clip(item_id)
        content = item.get("content")
        if clip is None or not content or content[0].get("type") not in _AUDIO_PARTS:
            return item
        audio = base64.b64encode(resample(*clip)).decode("ascii")
        return {**item, "content": [{**content[0], "audio": audio}, *content[1:]]}

    def truncate(self, item_id: str, audio_end_ms: int) -> tuple[str, str] | None:
        """(full text, text heard in ``audio_end_ms``) of an assistant item whose audio went out
        in deltas; None for any other item. The cut is proportional to the audio (at a word
        boundary): the text-to-audio ledger ends with its response; the item's audio is that
        long from now on. Raises EventError when ``audio_end_ms`` is past the item's audio."""
        sent_ms = self.audio_ms.get(item_id)
        item = self.items.get(item_id)
        if sent_ms is None or item is None or item.get("role") != "assistant":
            return None
        if audio_end_ms > sent_ms + 1:
            message = f"audio_end_ms {audio_end_ms} is past the item's {int(sent_ms)} ms of audio"
            raise EventError("invalid_value", message, "audio_end_ms")
        full = str(item["content"][0].get("transcript") or "") if item["content"] else ""
        heard = _heard_part(full, audio_end_ms / sent_ms if sent_ms else 0.0)
        if item["content"]:
            item["content"][0]["transcript"] = heard
        self.audio_ms[item_id] = min(sent_ms, float(audio_end_ms))  # the audio left in it
        self.audio.cut(item_id, audio_end_ms)
        return full, heard

    def _speech_started(self, event: ev.SpeechStartedEvent) -> list[Event]:
        item_id = self._user_items[event.turn] = new_id("item")
        self._started_ms[event.turn] = event.audio_start_ms
        return [
            server_event(
                "input_audio_buffer.speech_started",
                audio_start_ms=event.audio_start_ms,
                item_id=item_id,
            )
        ]

    def _speech_stopped(self, event: ev.SpeechStoppedEvent) -> list[Event]:
        item_id = self._user_items.get(event.turn)
        if item_id is None:
            return []
        started_ms = self._started_ms.pop(event.turn, event.audio_end_ms)
        self._heard(event.turn, item_id, event.audio_end_ms - started_ms)
        self.audio.keep(item_id, event.pcm, event.sample_rate_hz)
        stopped = server_event(
            "input_audio_buffer.speech_stopped", audio_end_ms=event.audio_end_ms, item_id=item_id
        )
        return [stopped, *self._committed(item_id)]

    def _input_committed(self, event: ev.InputCommitted) -> list[Event]:
        item_id = self._user_items[event.turn] = new_id("item")
        self._heard(event.turn, item_id, event.audio_ms)
        self.audio.keep(item_id, event.pcm, event.sample_rate_hz)
        return self._committed(item_id)

    def _heard(self, turn: int, item_id: str, audio_ms: int) -> None:
        """A user turn committed ``audio_ms`` of audio into ``item_id``."""
        self._turn_audio_ms[turn] = audio_ms
        self.audio_ms[item_id] = float(audio_ms)

    def timed_out(self, audio_start_ms: int, audio_end_ms: int) -> list[Event]:
        """The idle timeout ran out: ``input_audio_buffer.timeout_triggered``, then the silent
        input committed as a user audio item (no transcript), as OpenAI does."""
        item_id = new_id("item")
        triggered = server_event(
            "input_audio_buffer.timeout_triggered",
            audio_start_ms=audio_start_ms,
            audio_end_ms=audio_end_ms,
            item_id=item_id,
        )
        self.audio_ms[item_id] = float(audio_end_ms - audio_start_ms)
        return [triggered, *self._committed(item_id)]

    def _committed(self, item_id: str) -> list[Event]:
        item = message_item(item_id, "user", "", audio=True)
        item["content"][0]["transcript"] = None  # until the transcription completes
        previous = self.last_item_id
        return [
            server_event(
                "input_audio_buffer.committed", previous_item_id=previous, item_id=item_id
            ),
            *self.added(item),
        ]

    def _transcript(self, event: ev.InputTranscript) -> list[Event]:
        item_id = self._user_items.get(event.turn)
        audio_ms = self._transcribed(event.turn) if event.final else 0
        if item_id is None or not self.transcription:
            return []
        sent = self._partials.get(event.turn, "")
        logprobs_sent, segments_sent = self._details_sent.get(event.turn, (0, 0))
        events = [_segment(item_id, segment) for segment in event.segments[segments_sent:]]
        text = event.text if event.final else self._settled(event.turn, event.text)
        if text.startswith(sent) and len(text) > len(sent):
            delta = text[len(sent) :]
            self._partials[event.turn] = text
            fields = _logprobs_field(event.logprobs[logprobs_sent:])
            logprobs_sent = len(event.logprobs)
            events.append(_transcription("delta", item_id, delta=delta, **fields))
        self._details_sent[event.turn] = (logprobs_sent, len(event.segments))
        if event.final:
            self._partials.pop(event.turn, None)
            self._settling.pop(event.turn, None)
            self._details_sent.pop(event.turn, None)
            if (item := self.items.get(item_id)) is not None:
                item["content"][0]["transcript"] = event.text
            usage = transcription_usage(audio_ms)
            fields = {"transcript": event.text, "usage": usage, **_logprobs_field(event.logprobs)}
            events.append(_transcription("completed", item_id, **fields))
        return events

    def _settled(self, turn: int, text: str) -> str:
        """A partial's text to send deltas of: all of it, or only its settled words."""
        if not self.settled_partials:
            return text
        return self._settling.setdefault(turn, StableWords()).guess(text)

    # --- the response ---------------------------------------------------------------------

    def _response_started(self, event: ev.ResponseStarted) -> list[Event]:
        shape = self._shapes.pop(event.response_id, self.shape)
        if shape.voice is None:
            shape = replace(shape, voice=self.shape.voice)
        response = _Response(new_id("resp"), shape, audio=event.audio)
        items = self.order if shape.input_items is None else shape.input_items
        response.input_audio_tokens = sum(self._audio_tokens(item_id) for item_id in items)
        self._responses[event.response_id] = response
        body = _body(response, self.conversation_id)
        return [server_event("response.created", response=body)]

    def _audio_tokens(self, item_id: str) -> int:
        """The audio tokens of an item of a response's input, at OpenAI's rates (0: no audio)."""
        audio_ms, item = self.audio_ms.get(item_id), self.items.get(item_id)
        if not audio_ms or item is None or item.get("role") not in MS_PER_AUDIO_TOKEN:
            return 0
        return audio_tokens(audio_ms, item["role"])

    def _text_delta(self, event: ev.ResponseTextDelta) -> list[Event]:
        response = self._responses.get(event.response_id)
        if response is None:
            return []
        events = self._open_message(response)
        response.text += event.text
        assert response.message_id is not None
        where = response.position(response.message_id)
        kind = "output_audio_transcript" if response.audio else "output_text"
        delta = server_event(f"response.{kind}.delta", **where, content_index=0, delta=event.text)
        return [*events, delta]

    def _open_message(self, response: _Response) -> list[Event]:
        if response.message_id is not None:
            return []
        response.message_id = new_id("item")
        item = message_item(
            response.message_id, "assistant", "", audio=response.audio, status="in_progress"
        )
        item["content"] = []
        response.output.append(item)
        joins = response.shape.in_conversation
        previous = self._append(response.message_id) if joins else None
        where = response.position(response.message_id)
        part = _part(response.audio, "")
        return [
            *_item_added(response.id, where, previous, item, joins),
            server_event("response.content_part.added", **where, content_index=0, part=part),
        ]

    def _client_call(self, event: ev.ClientToolCallRequested) -> list[Event]:
        response = self._responses.get(event.response_id)
        if response is None:
            return []
        call = event.call
        item = function_call_item(new_id("item"), call.call_id, call.name, "", "in_progress")
        response.output.append(item)
        joins = response.shape.in_conversation
        previous = self._append(item["id"]) if joins else None
        where = response.position(item["id"])
        done_item = {**item, "arguments": call.arguments, "status": "completed"}
        response.output[-1] = done_item
        args = {**where, "call_id": call.call_id}
        return [
            *_item_added(response.id, where, previous, item, joins),
            server_event("response.function_call_arguments.delta", **args, delta=call.arguments),
            server_event(
                "response.function_call_arguments.done",
                **args,
                name=call.name,
                arguments=call.arguments,
            ),
            *self._item_done(response, done_item, previous),
        ]

    def _item_done(self, response: _Response, item: Event, previous: str | None) -> list[Event]:
        index = response.position(item["id"])["output_index"]
        done = server_event(
            "response.output_item.done", response_id=response.id, output_index=index, item=item
        )
        if not response.shape.in_conversation:
            return [done]
        self.items[item["id"]] = item
        return [done, server_event("conversation.item.done", previous_item_id=previous, item=item)]

    def _buffered(self, engine_response_id: str, *, ended: bool) -> _Response | None:
        """The response whose output buffer event this is (None: it has no buffer events);
        ``ended``: its audio leaves the buffer (stopped or cleared)."""
        response = self._responses.get(engine_response_id)
        if response is None:  # done: its audio may start after its response.done
            tails, name = self._tails, engine_response_id
            response = tails.pop(name, None) if ended else tails.get(name)
        if response is None or not self.media_track or not response.shape.in_conversation:
            return None
        if ended and response.played:  # it left already (a cancel's cut, then a clear's)
            return None
        response.played = ended
        return response

    def _audio_buffer(self, kind: str, engine_response_id: str) -> list[Event]:
        response = self._buffered(engine_response_id, ended=kind != "started")
        if response is None:
            return []
        return [server_event(f"output_audio_buffer.{kind}", response_id=response.id)]

    def _cleared(self, event: ev.OutputCleared) -> list[Event]:
        done = event.response_id in self._tails  # after its response.done
        response = self._buffered(event.response_id, ended=True)
        if response is None:
            return []
        events = [server_event("output_audio_buffer.cleared", response_id=response.id)]
        if response.message_id is not None:
            if done:
                self._cut(response.message_id, event)
            events.append(
                server_event(
                    "conversation.item.truncated",
                    item_id=response.message_id,
                    content_index=0,
                    audio_end_ms=event.audio_end_ms,
                )
            )
        return events

    def _cut(self, item_id: str, event: ev.OutputCleared) -> None:
        """A done answer's item after a barge-in: the words played, its audio's length."""
        item = self.items.get(item_id)
        if item is not None and item.get("content"):
            item["content"][0]["transcript"] = event.heard_text
        if item_id in self.audio_ms:
            self.audio_ms[item_id] = float(event.audio_end_ms)
        self.audio.cut(item_id, event.audio_end_ms)

    def _response_done(self, event: ev.ResponseDone) -> list[Event]:
        response = self._ended(event)
        if response is not None and event.status == "failed":  # the engine's error came first
            response.error = self._last_error
            if event.refused is not None:  # refused before it ran: why, in OpenAI's words
                response.error = asdict(event.refused)
                response.input_audio_tokens = 0  # its input was given to no model
        if response is None or response.message_id is None:
            return []
        if self.media_track and response.audio and response.shape.in_conversation:
            self.audio_ms[response.message_id] = event.audio_ms  # for truncate
        if response.audio:  # over WebSocket: the audio sent; else all the audio made
            made_ms = event.audio_ms if self.media_track else self.audio_ms.get(response.message_id)
            response.output_audio_tokens = audio_tokens(made_ms or 0.0, "assistant")
        where = response.position(response.message_id)
        heard = event.heard_text if event.status == "cancelled" else response.text
        audio = response.audio
        status = "completed" if event.status == "completed" else "incomplete"
        item = message_item(response.message_id, "assistant", heard, audio=audio, status=status)
        index = where["output_index"]
        response.output[index] = item
        if audio:
            ends = [
                server_event(
                    "response.output_audio_transcript.done",
                    **where,
                    content_index=0,
                    transcript=response.text,
                ),
                server_event("response.output_audio.done", **where, content_index=0),
            ]
        else:
            ends = [
                server_event(
                    "response.output_text.done", **where, content_index=0, text=response.text
                )
            ]
        part = _part(audio, heard)
        return [
            *ends,
            server_event("response.content_part.done", **where, content_index=0, part=part),
            *self._item_done(response, item, self.previous_of(response.message_id)),
        ]

    def _turn_completed(self, event: ev.TurnCompleted) -> list[Event]:
        response, engine_id = self._completed()
        if response is None:
            return []
        if response.audio and response.message_id is not None and not response.played:
            # its audio plays on: output_audio_buffer.started/.stopped or .cleared come later
            self._tails[engine_id] = response
            while len(self._tails) > MAX_TAILS:
                self._tails.pop(next(iter(self._tails)))
        record = event.record
        body = _body(response, self.conversation_id, record)
        done = server_event("response.done", response=body)
        if not self.extension_events:
            return [done]
        metrics = turn_metrics_event(response.id, record, self._first_frame_sent_s(engine_id))
        return [done, metrics]

    def _engine_error(self, event: ev.EngineError) -> list[Event]:
        if failed := self._transcription_failed(event.turn, event.message):
            return failed
        code = "provider_error_retryable" if event.retryable else "provider_error"
        self._last_error = {"type": "server_error", "code": code}
        error = {"type": "server_error", "code": code, "message": event.message, "param": None}
        return [server_event("error", error={**error, "event_id": None})]

    def _transcription_failed(self, turn: int | None, cause: str) -> list[Event]:
        """When ``turn`` is a transcription's (it failed, the turn is not answered): ``.failed``
        on its item; else, or with transcription off, nothing (the ``error`` tells it)."""
        item_id = None if turn is None else self._user_items.get(turn)
        if turn is None or item_id is None:
            return []
        self._transcribed(turn)
        self._partials.pop(turn, None)
        self._settling.pop(turn, None)
        self._details_sent.pop(turn, None)
        return [transcription_failed(item_id, cause)] if self.transcription else []

    def _transcribed(self, turn: int) -> int:
        """The turn's transcription ended: it is forgotten; the audio it committed."""
        self._user_items.pop(turn, None)
        return self._turn_audio_ms.pop(turn, 0)


def _heard_part(text: str, fraction: float) -> str:
    """The words of ``text`` that end within ``fraction`` of its length."""
    if fraction >= 1:
        return text
    cut = int(len(text) * max(0.0, fraction))
    words: list[str] = []
    end = 0
    for word in text.split(" "):
        end += len(word) + (1 if words else 0)
        if end > cut:
            break
        words.append(word)
    return " ".join(words)


def audio_tokens(audio_ms: float, role: str) -> int:
    """Tokens for ``audio_ms`` of a ``role``'s audio at OpenAI's rates (a token begun counts)."""
    return math.ceil(round(audio_ms) / MS_PER_AUDIO_TOKEN[role])


def transcription_usage(audio_ms: float) -> Event:
    """A transcription's ``usage``: the seconds of audio transcribed (``"type": "duration"``,
    as OpenAI reports for a speech-to-text that bills by the second)."""
    return {"type": "duration", "seconds": round(audio_ms / 1000, 3)}


def transcription_failed(item_id: str, cause: str) -> Event:
    """OpenAI's event and words for a failed transcription of ``item_id``, and the cause."""
    message = f"Input transcription failed for item '{item_id}': {cause}"
    error = {"type": "server_error", "code": None, "message": message, "param": None}
    return _transcription("failed", item_id, error=error)


def _part(audio: bool, text: str) -> Event:
    return {"type": "audio", "transcript": text} if audio else {"type": "text", "text": text}


def _logprobs_field(logprobs: tuple[TokenLogprob, ...]) -> Event:
    """A transcription event's ``logprobs`` (OpenAI's ``LogProbProperties``), when there are
    any: the speech-to-text gives them only when the session's ``include`` asks."""
    if not logprobs:
        return {}
    listed = [
        {"token": item.token, "bytes": list(item.token_bytes), "logprob": item.logprob}
        for item in logprobs
    ]
    return {"logprobs": listed}


def _segment(item_id: str, segment: SpeakerSegment) -> Event:
    """A diarized speaker segment of the item's audio, as OpenAI sends it."""
    return _transcription(
        "segment",
        item_id,
        id=segment.id,
        speaker=segment.speaker,
        start=segment.start_s,
        end=segment.end_s,
        text=segment.text,
    )


def _transcription(kind: str, item_id: str, **fields: Any) -> Event:
    return server_event(
        f"conversation.item.input_audio_transcription.{kind}",
        item_id=item_id,
        content_index=0,
        **fields,
    )


def _body(response: _Response, conversation_id: str, record: TurnRecord | None = None) -> Event:
    shape = response.shape
    body: Event = {
        "id": response.id,
        "object": "realtime.response",
        "conversation_id": conversation_id if shape.in_conversation else None,
        "status": response.status,
        "status_details": None,
        "output": list(response.output),
        "output_modalities": ["audio" if response.audio else "text"],
        "audio": {"output": {"format": AUDIO_FORMAT, "voice": shape.voice}},
        "max_output_tokens": shape.max_output_tokens or "inf",
        "metadata": None if shape.metadata is None else dict(shape.metadata),
        "usage": None,
    }
    if response.status == "failed":  # OpenAI's shape: the error's type and code, no reason
        body["status_details"] = {"type": "failed", "error": response.error}
    elif response.status in _STATUS_REASON:
        reason = _STATUS_REASON[response.status]
        reason = response.cancel_reason if response.status == "cancelled" else reason
        body["status_details"] = {"type": response.status, "reason": reason}
    if record is not None:
        body["usage"] = _usage(record, response)
    return body


def _usage(record: TurnRecord, response: _Response) -> dict[str, Any]:
    """The language model's tokens as text, the audio of the input's items and of the answer
    as audio tokens (what OpenAI's model would bill for them); nothing is cached."""
    text_in, text_out = record.llm_input_tokens, record.llm_output_tokens
    audio_in, audio_out = response.input_audio_tokens, response.output_audio_tokens
    inputs, outputs = text_in + audio_in, text_out + audio_out
    cached = {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0}
    return {
        "total_tokens": inputs + outputs,
        "input_tokens": inputs,
        "output_tokens": outputs,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": 0,
            "cached_tokens_details": cached,
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }


def turn_metrics_event(
    response_id: str, record: TurnRecord, first_frame_sent_s: float | None
) -> Event:
    """voicerelay.turn.metrics: each stage in ms after speech stopped (None: did not happen)."""
    origin = record.speech_stopped_s

    def since(at_s: float | None) -> float | None:
        return None if origin is None or at_s is None else round((at_s - origin) * 1000, 1)

    first_out = first_frame_sent_s if first_frame_sent_s is not None else record.first_frame_out_s
    return server_event(
        "voicerelay.turn.metrics",
        response_id=response_id,
        turn=record.turn,
        interrupted=record.interrupted,
        speech_stopped_ms=since(origin),
        stt_final_ms=since(record.stt_final_s),
        llm_first_token_ms=since(record.llm_first_token_s),
        first_tts_request_ms=since(record.first_tts_request_s),
        first_audio_ms=since(record.first_tts_audio_s),
        first_frame_out_ms=since(first_out),
        overhead_ms=None if record.overhead_ms is None else round(record.overhead_ms, 1),
        last_voiced_ms=since(record.last_voiced_s),
        turn_asked_ms=since(record.turn_asked_s),
        turn_decision=None if record.decision is None else asdict(record.decision),
    )


_HANDLERS: dict[type, Callable[[EngineEventTranslator, Any], list[Event]]] = {
    ev.SpeechStartedEvent: EngineEventTranslator._speech_started,
    ev.SpeechStoppedEvent: EngineEventTranslator._speech_stopped,
    ev.InputCommitted: EngineEventTranslator._input_committed,
    ev.InputTranscript: EngineEventTranslator._transcript,
    ev.ResponseStarted: EngineEventTranslator._response_started,
    ev.ResponseTextDelta: EngineEventTranslator._text_delta,
    ev.ClientToolCallRequested: EngineEventTranslator._client_call,
    ev.OutputStarted: lambda t, e: t._audio_buffer("started", e.response_id),
    ev.OutputStopped: lambda t, e: t._audio_buffer("stopped", e.response_id),
    ev.OutputCleared: EngineEventTranslator._cleared,
    ev.ResponseDone: EngineEventTranslator._response_done,
    ev.TurnCompleted: EngineEventTranslator._turn_completed,
    ev.EngineError: EngineEventTranslator._engine_error,
}


def _item_added(
    response_id: str, where: Mapping[str, Any], previous: str | None, item: Event, joins: bool
) -> list[Event]:
    """An output item joins the response and (``joins``) the conversation (GA sends both, in
    this order)."""
    added = server_event(
        "response.output_item.added",
        response_id=response_id,
        output_index=where["output_index"],
        item=item,
    )
    if not joins:
        return [added]
    return [added, server_event("conversation.item.added", previous_item_id=previous, item=item)]
