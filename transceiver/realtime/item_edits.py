"""The client's edits of the conversation: ``conversation.item.create`` of every item kind at
its ``previous_item_id``, ``.delete`` and ``.truncate``, each changing what the model is sent
next (the engine's history, through ``conversation.ItemMessages``).

I/O layer: a created user ``input_audio`` item is transcribed by the engine's speech-to-text
in a task this object owns (``aclose`` cancels and awaits them); its words join the history at
the item's place, and with transcription on the client gets
``conversation.item.input_audio_transcription.completed`` (its ``usage``: the item's seconds of
audio), or ``.failed`` when the speech-to-text fails on it. A response asked for meanwhile
waits for them (``heard``), as one after a commit waits for its transcription.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline.engine import ConversationEngine
from pipeline.playout import PcmResampler
from pipeline.providers import (
    AudioChunk,
    ImagePart,
    Message,
    ProviderError,
    ToolCall,
    sees_images,
    transcribe_with,
)
from transceiver.realtime.client_events import (
    AUDIO_RATE_HZ,
    AssistantText,
    ConversationItemCreate,
    EventError,
    FunctionCall,
    FunctionCallOutput,
    NewItem,
    SystemText,
    UserAudio,
    UserText,
)
from transceiver.realtime.conversation import ItemMessages
from transceiver.realtime.server_events import (
    function_call_item,
    function_call_output_item,
    message_item,
    server_event,
)
from transceiver.realtime.translation import (
    EngineEventTranslator,
    transcription_failed,
    transcription_usage,
)

Event = dict[str, Any]
ROOT = "root"
log = logging.getLogger(__name__)


class ItemEdits:
    def __init__(
        self,
        engine: ConversationEngine,
        translator: EngineEventTranslator,
        send: Callable[[Event], None],
        changed: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.translator = translator
        self.messages = ItemMessages(engine.history)
        self._send = send
        self._changed = changed  # the history changed: store it
        self._hearing: set[asyncio.Task[None]] = set()

    def create(self, event: ConversationItemCreate) -> None:
        """The item at its place (EventError, nothing changed, when it cannot be made)."""
        previous = self._previous(event.previous_item_id)
        self._check_seen(event.item)
        message, body = _message_and_body(event.item_id, event.item)
        if isinstance(event.item, FunctionCallOutput):
            self._check_output(event.item.call_id)
        if message is not None:
            self._place(event, previous, message)
        last = event.previous_item_id is None
        for added in self.translator.added(body, previous, last=last):
            self._send(added)
        if isinstance(event.item, UserAudio):
            self.translator.audio_ms[event.item_id] = _audio_ms(event.item.pcm)
            self.translator.audio.keep(event.item_id, event.item.pcm, AUDIO_RATE_HZ)
            self._spawn_hearing(event.item_id, event.item)
        self._changed()

    def _previous(self, previous_item_id: str | None) -> str | None:
        if previous_item_id is None or previous_item_id == ROOT:
            return None
        if previous_item_id not in self.translator.items:
            message = f"previous_item_id {previous_item_id!r} is not an item of this conversation"
            raise EventError("invalid_value", message, "previous_item_id")
        return previous_item_id

    def _check_seen(self, item: NewItem) -> None:
        """An image only for a model that sees (the offline ones take text alone)."""
        if isinstance(item, UserText) and item.images and not sees_images(self.engine.llm):
            message = (
                f"the language model here ({self.engine.llm.name}) takes no images; "
                "describe the image in input_text instead"
            )
            raise EventError("invalid_value", message, f"item.content[{item.first_image}].type")

    def _check_output(self, call_id: str) -> None:
        history = self.engine.history
        asked = {call.call_id for m in history for call in m.tool_calls}
        answered = {m.tool_call_id for m in history if m.role == "tool"}
        if call_id not in asked or call_id in answered:
            message = f"no function call {call_id!r} is waiting for its output"
            raise EventError("invalid_value", message, "item.call_id")

    def _place(self, event: ConversationItemCreate, previous: str | None, message: Message) -> None:
        if event.previous_item_id is None:
            self.engine.history.append(message)
            self.messages.tie(event.item_id, message)
            return
        self.sync()
        self.messages.insert(self.translator.order, previous, event.item_id, message)

    def sync(self) -> None:
        items = self.translator.items
        self.messages.sync([items[i] for i in self.translator.order if i in items])

    def delete(self, item_id: str) -> None:
        self.sync()
        self.messages.delete(self.translator.items[item_id])
        self.translator.forget(item_id)
        self._changed()

    def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """An answer keeps only the words heard (its audio went out in deltas, or over WebRTC
        on the media track)."""
        self.sync()
        cut = self.translator.truncate(item_id, audio_end_ms)
        if cut is not None:
            self.messages.replace(item_id, cut[1])
            self._changed()

    # --- created audio ----------------------------------------------------------------------

    @property
    def hearing(self) -> bool:
        return bool(self._hearing)

    async def heard(self) -> None:
        """Until the created audio items so far are transcribed."""
        if self._hearing:
            await asyncio.wait(list(self._hearing))

    async def aclose(self) -> None:
        for task in list(self._hearing):
            task.cancel()
        await asyncio.gather(*self._hearing, return_exceptions=True)

    def _spawn_hearing(self, item_id: str, item: UserAudio) -> None:
        task = asyncio.get_running_loop().create_task(self._hear(item_id, item), name="item audio")
        self._hearing.add(task)
        task.add_done_callback(self._hearing.discard)

    async def _hear(self, item_id: str, item: UserAudio) -> None:
        try:
            words = await self._transcribe(item.pcm)
        except ProviderError as error:
            self._not_heard(item_id, f"{type(error).__name__}: {error}")
            return
        body = self.translator.items.get(item_id)
        if body is None:  # deleted meanwhile
            return
        if item.transcript is None:
            body["content"][0]["transcript"] = words
        if self.translator.transcription:
            self._send(
                server_event(
                    "conversation.item.input_audio_transcription.completed",
                    item_id=item_id,
                    content_index=0,
                    transcript=words,
                    usage=transcription_usage(_audio_ms(item.pcm)),
                )
            )
        if words:
            self.sync()
            previous = self.translator.previous_of(item_id)
            self.messages.insert(self.translator.order, previous, item_id, Message("user", words))
            self._changed()

    def _not_heard(self, item_id: str, cause: str) -> None:
        """The speech-to-text failed on a created item: its words never reach the model."""
        log.warning("created audio item %s not transcribed: %s", item_id, cause)
        if self.translator.transcription:
            self._send(transcription_failed(item_id, cause))
        else:
            error = {"type": "server_error", "code": "provider_error", "message": cause}
            self._send(server_event("error", error={**error, "param": None, "event_id": None}))

    async def _transcribe(self, pcm: bytes) -> str:
        rate_hz = self.engine.config.input_sample_rate_hz
        audio = PcmResampler(AUDIO_RATE_HZ, rate_hz).push(pcm[: len(pcm) & ~1])

        async def utterance() -> AsyncIterator[AudioChunk]:
            yield AudioChunk(audio, rate_hz)

        final = ""
        async for transcript in transcribe_with(
            self.engine.stt, utterance(), self.engine.config.transcription
        ):
            if transcript.final:
                final = transcript.text.strip()
        return final


def _audio_ms(pcm: bytes) -> float:
    """The length of PCM16 mono at ``AUDIO_RATE_HZ``."""
    return len(pcm) * 500 / AUDIO_RATE_HZ


def _message_and_body(item_id: str, item: NewItem) -> tuple[Message | None, Event]:
    """What the model is sent for a created item (None: not until its audio is heard), and
    the item as the client is told of it."""
    if isinstance(item, FunctionCallOutput):
        body = function_call_output_item(item_id, item.call_id, item.output)
        return Message("tool", item.output, tool_call_id=item.call_id), body
    if isinstance(item, FunctionCall):
        call = ToolCall(item.call_id, item.name, item.arguments)
        body = function_call_item(item_id, item.call_id, item.name, item.arguments, "completed")
        return Message("assistant", "", tool_calls=(call,)), body
    if isinstance(item, UserAudio):
        body = message_item(item_id, "user", "", audio=True)
        body["content"][0]["transcript"] = item.transcript
        return None, body
    if isinstance(item, SystemText):
        return Message("system", item.text), message_item(item_id, "system", item.text, audio=False)
    if isinstance(item, AssistantText):
        body = message_item(item_id, "assistant", item.text, audio=item.audio)
        return Message("assistant", item.text), body
    body = message_item(item_id, "user", item.text, audio=False)
    if item.images:
        body["content"] = [_content_part(piece) for piece in item.parts]
    return Message("user", item.text, images=item.images), body


def _content_part(piece: str | ImagePart) -> Event:
    """A part of a user item with images, as the client sent it (the model is sent its words,
    then its images)."""
    if isinstance(piece, str):
        return {"type": "input_text", "text": piece}
    return {"type": "input_image", "image_url": piece.data_url, "detail": piece.detail}
