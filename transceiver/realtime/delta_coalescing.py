"""Transcript deltas joined before they go on the data channel.

Protocol layer (pure: events in, events out; the session owns the timer). One event a model
chunk or a partial transcript costs the channel a message each (SCTP, DTLS, JSON); a client
reading text loses nothing when consecutive deltas of the same text arrive as one. A delta that
follows one of the same ``type``, ``item_id`` and ``content_index`` is appended to the held one;
any other event first lets the held delta out, so the order of events is unchanged. A delta that
carries ``logprobs`` is never joined (its tokens belong to its own text).
"""

from __future__ import annotations

from typing import Any

Event = dict[str, Any]
JOINED_TYPES = frozenset(
    {
        "response.output_audio_transcript.delta",
        "response.output_text.delta",
        "conversation.item.input_audio_transcription.delta",
    }
)


def joinable(event: Event) -> bool:
    """A delta of text that may be joined to its neighbours of the same text."""
    return (
        event["type"] in JOINED_TYPES
        and "logprobs" not in event
        and isinstance(event.get("item_id"), str)
        and isinstance(event.get("delta"), str)
    )


class HeldDelta:
    """At most one delta held back; what to send now for each event given."""

    def __init__(self) -> None:
        self._held: Event | None = None
        self._parts: list[str] = []

    @property
    def holding(self) -> bool:
        return self._held is not None

    def add(self, event: Event) -> list[Event]:
        """The events to send now: the held delta when ``event`` does not join it, and
        ``event`` itself unless it is held."""
        if self._held is not None and joinable(event) and _same_text(self._held, event):
            self._parts.append(event["delta"])
            return []
        out = self.take()
        if joinable(event):
            self._held, self._parts = event, [event["delta"]]
            return out
        return [*out, event]

    def take(self) -> list[Event]:
        """The held delta (its parts joined, the first one's ``event_id``), or nothing."""
        held, self._held = self._held, None
        if held is None:
            return []
        joined = held if len(self._parts) == 1 else {**held, "delta": "".join(self._parts)}
        self._parts = []
        return [joined]


def _same_text(held: Event, event: Event) -> bool:
    return all(held.get(key) == event.get(key) for key in ("type", "item_id", "content_index"))
