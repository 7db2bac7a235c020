"""Engine events -> GPT-Live server events, in the shapes ``openai.types.live`` defines.

Protocol layer, pure: one :class:`LiveTranslator` per session. Times (``start_ms``, ``end_ms``,
``offset_ms``) are on the session's timeline: milliseconds since it started, from the clock it
is given.

- The user: ``session.input_transcript.delta``, one per utterance once its transcript is final
  (the recogniser revises its partial guesses, and Live deltas cannot be taken back).
- The answer: ``session.output_transcript.delta`` per text delta, ``session.output_audio.delta``
  (base64 PCM16 24 kHz, no timestamps on the primary WebSocket) per audio chunk.
- With Responses delegation (``delegated``), each answer is a delegation to the language model
  stage: ``session.delegation.created`` (target ``responses``), then ``response.event`` carrying
  the Responses stream: ``response.created``, the message's ``response.output_item.added``,
  ``response.output_text.delta``/``.done`` and ``response.output_item.done``, a function call's
  ``response.output_item.added``, ``response.function_call_arguments.delta``/``.done`` and
  ``response.output_item.done``, and ``response.completed`` (or ``.incomplete``/``.failed``)
  with usage and no output (lifecycle snapshots are kept small). A response that ended with a
  function call leaves its delegation open: the answer after the client's tool output continues
  it (same delegation id, no new ``session.delegation.created``).
- Each finished turn: ``session.usage.updated`` (whole seconds since the session started).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import events as ev
from pipeline.turns import TurnRecord
from transceiver.realtime.client_events import EventError, new_id
from transceiver.realtime.translation import ResponseLedger

Event = dict[str, Any]
Clock = Callable[[], int]  # milliseconds since the session started
_TERMINAL = {
    "completed": "response.completed",
    "cancelled": "response.incomplete",  # interrupted
    "incomplete": "response.incomplete",  # stopped at the delegation's max_output_tokens
}


def live_event(kind: str, client_event_id: str | None = None, **fields: Any) -> Event:
    """A Live server event with a fresh event_id (and the client's, when it answers one)."""
    event: Event = {"type": kind, "event_id": new_id("event"), **fields}
    if client_event_id is not None:
        event["client_event_id"] = client_event_id
    return event


def live_error(
    error: EventError, client_event_id: str | None, error_type: str = "invalid_request_error"
) -> Event:
    body = {
        "type": error_type,
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "client_event_id": client_event_id,
    }
    return live_event("error", client_event_id, error=body)


@dataclass
class _Response:
    id: str
    created_at_s: int
    delegation_id: str | None
    last_ms: int
    output: list[Event] = field(default_factory=list)
    message: Event | None = None
    text: str = ""
    status: str = "in_progress"
    called: bool = False  # it asked for a function call: its delegation waits for the output


class LiveTranslator(ResponseLedger[_Response]):
    def __init__(self, clock_ms: Clock, *, delegated: bool, model: str, epoch_s: int) -> None:
        super().__init__()
        self._clock_ms = clock_ms
        self.delegated = delegated
        self.model = model  # the backend model named in the Responses events
        self._epoch_s = epoch_s  # wall-clock second the session started (created_at)
        self._waiting: str | None = None  # delegation whose function call awaits its output
        self._turn_start_ms: dict[int, int] = {}
        self._heard_any = False
        self._sequence = 0

    def translate(self, event: ev.EngineEvent) -> list[Event]:
        handler = _HANDLERS.get(type(event))
        return [] if handler is None else handler(self, event)

    def audio_delta(self, engine_response_id: str, pcm: bytes) -> list[Event]:
        if engine_response_id not in self._responses or not pcm:
            return []
        delta = base64.b64encode(pcm).decode("ascii")
        return [{"type": "session.output_audio.delta", "delta": delta}]

    def usage(self) -> Event:
        return {"seconds": float(self._clock_ms() // 1000)}

    # --- the user -------------------------------------------------------------------------

    def _speech_started(self, event: ev.SpeechStartedEvent) -> list[Event]:
        self._turn_start_ms[event.turn] = self._clock_ms()
        return []

    def _transcript(self, event: ev.InputTranscript) -> list[Event]:
        if not event.final:
            return []
        now = self._clock_ms()
        start = self._turn_start_ms.pop(event.turn, now)
        text = event.text.strip()
        if not text:
            return []
        delta = (" " if self._heard_any else "") + text
        self._heard_any = True
        return [
            live_event("session.input_transcript.delta", delta=delta, start_ms=start, end_ms=now)
        ]

    # --- the answer -----------------------------------------------------------------------

    def _response_started(self, event: ev.ResponseStarted) -> list[Event]:
        now = self._clock_ms()
        if not self.delegated:
            self._responses[event.response_id] = _Response(new_id("resp"), 0, None, now)
            return []
        continued, self._waiting = self._waiting, None
        delegation_id = continued or new_id("deleg")
        created_at = self._epoch_s + now // 1000
        response = _Response(new_id("resp"), created_at, delegation_id, now)
        self._responses[event.response_id] = response
        events = []
        if continued is None:
            delegation = {
                "id": delegation_id,
                "type": "delegation",
                "target": "responses",
                "response_id": response.id,
            }
            events.append(
                live_event("session.delegation.created", delegation=delegation, offset_ms=now)
            )
        events.append(self._nested(response, "response.created", response=self._snapshot(response)))
        return events

    def _text_delta(self, event: ev.ResponseTextDelta) -> list[Event]:
        response = self._responses.get(event.response_id)
        if response is None or not event.text:
            return []
        now = self._clock_ms()
        start, response.last_ms = response.last_ms, now
        response.text += event.text
        events = [
            live_event(
                "session.output_transcript.delta", delta=event.text, start_ms=start, end_ms=now
            )
        ]
        if response.delegation_id is None:
            return events
        if response.message is None:
            response.message = {
                "id": new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            events.append(self._item(response, "response.output_item.added", response.message))
        where = self._where(response, response.message)
        events.append(
            self._nested(
                response,
                "response.output_text.delta",
                **where,
                content_index=0,
                delta=event.text,
                logprobs=[],
            )
        )
        return events

    def _client_call(self, event: ev.ClientToolCallRequested) -> list[Event]:
        response = self._responses.get(event.response_id)
        if response is None or response.delegation_id is None:
            return []
        call = event.call
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        added = self._item(response, "response.output_item.added", item)
        done_item = {**item, "arguments": call.arguments, "status": "completed"}
        response.output[-1] = done_item
        response.called = True
        where = self._where(response, done_item)
        return [
            added,
            self._nested(
                response, "response.function_call_arguments.delta", **where, delta=call.arguments
            ),
            self._nested(
                response,
                "response.function_call_arguments.done",
                **where,
                name=call.name,
                arguments=call.arguments,
            ),
            self._nested(
                response,
                "response.output_item.done",
                output_index=where["output_index"],
                item=done_item,
            ),
        ]

    def _response_done(self, event: ev.ResponseDone) -> list[Event]:
        response = self._ended(event)
        if response is None:
            return []
        message = response.message
        if message is None or response.delegation_id is None:
            return []
        where = self._where(response, message)
        part = {"type": "output_text", "text": response.text, "annotations": []}
        done = {**message, "status": "completed" if event.status == "completed" else "incomplete"}
        done["content"] = [part]
        response.output[where["output_index"]] = done
        return [
            self._nested(
                response,
                "response.output_text.done",
                **where,
                content_index=0,
                text=response.text,
                logprobs=[],
            ),
            self._nested(
                response, "response.output_item.done", output_index=where["output_index"], item=done
            ),
        ]

    def _turn_completed(self, event: ev.TurnCompleted) -> list[Event]:
        response, _ = self._completed()
        usage = live_event("session.usage.updated", usage=self.usage())
        if response is None:
            return [usage]
        if response.delegation_id is None:
            return [usage]
        if response.called and response.status == "completed":
            self._waiting = response.delegation_id
        kind = _TERMINAL.get(response.status, "response.failed")
        snapshot = self._snapshot(response, event.record)
        return [self._nested(response, kind, response=snapshot), usage]

    def _engine_error(self, event: ev.EngineError) -> list[Event]:
        code = "provider_error_retryable" if event.retryable else "provider_error"
        return [live_error(EventError(code, event.message), None, "server_error")]

    # --- the Responses stream -------------------------------------------------------------

    def _nested(self, owner: _Response, kind: str, **fields: Any) -> Event:
        self._sequence += 1
        nested = {"type": kind, "sequence_number": self._sequence, **fields}
        return live_event("response.event", event=nested, delegation_id=owner.delegation_id)

    def _item(self, response: _Response, kind: str, item: Event) -> Event:
        response.output.append(item)
        return self._nested(response, kind, output_index=len(response.output) - 1, item=item)

    @staticmethod
    def _where(response: _Response, item: Event) -> dict[str, Any]:
        index = next(i for i, out in enumerate(response.output) if out["id"] == item["id"])
        return {"item_id": item["id"], "output_index": index}

    def _snapshot(self, response: _Response, record: TurnRecord | None = None) -> Event:
        status = response.status
        body: Event = {
            "id": response.id,
            "object": "response",
            "created_at": response.created_at_s,
            "status": status,
            "model": self.model,
            "output": [],
            "usage": None if record is None else _usage(record),
        }
        if status == "cancelled":
            body["status"] = "incomplete"
            body["incomplete_details"] = {"reason": "interrupted"}
        elif status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body


def _usage(record: TurnRecord) -> Event:
    inputs, outputs = record.llm_input_tokens, record.llm_output_tokens
    return {
        "input_tokens": inputs,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": outputs,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": inputs + outputs,
    }


_HANDLERS: dict[type, Callable[[LiveTranslator, Any], list[Event]]] = {
    ev.SpeechStartedEvent: LiveTranslator._speech_started,
    ev.InputTranscript: LiveTranslator._transcript,
    ev.ResponseStarted: LiveTranslator._response_started,
    ev.ResponseTextDelta: LiveTranslator._text_delta,
    ev.ClientToolCallRequested: LiveTranslator._client_call,
    ev.ResponseDone: LiveTranslator._response_done,
    ev.TurnCompleted: LiveTranslator._turn_completed,
    ev.EngineError: LiveTranslator._engine_error,
}
