"""The audio of the conversation's recent items, for ``conversation.item.retrieved``.

Protocol layer, pure (PCM bytes in and out, at the rate each came in; the session resamples
a retrieved clip to the session's rate). OpenAI's retrieved item carries its audio
(``audio``: base64 PCM16 at the session's 24 kHz): a user's ``input_audio`` as committed (here:
the utterance as the VAD cut it, from ``audio_start_ms`` to ``audio_end_ms``; a push-to-talk
commit's input; a created item's audio) and an answer's ``output_audio`` as made (over
WebSocket: as sent in deltas; over WebRTC: as played), cut to what is left when it is truncated.

Bounded: the clips of all items together hold at most ``max_audio_s`` seconds (each clip kept
at the rate it came in: 16 kHz for the caller, the engine's output rate for answers, so at most
``max_audio_s`` x 2 x the highest of them bytes). When a clip makes the total go over, the
oldest items' audio is dropped, whole, until it fits (an answer longer than the bound on its
own loses its audio too); an item whose audio was dropped is retrieved without ``audio``, as
are items the server has no audio of (a text item, a resumed conversation's, the idle timeout's
silence).

Bounded per process too, in bytes (``ItemAudioBudget``, ``TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES``):
the seconds bound alone lets each session hold up to ~2.9 MB (60 s of 24 kHz answers), ~290 MB
at 100 calls. Every session's ``ItemAudio`` counts its bytes in the process's budget; a clip
that makes the total go over drops the oldest clips of any session, whole, until it fits. Such
an item is retrieved without its audio and ``dropped_reason`` says why (the session sends an
``item_audio_dropped`` error naming the bound). A session's ``release`` hands its bytes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_AUDIO_S = 60.0
PROCESS_BOUND = "the transceiver's bound on item audio (TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES)"


@dataclass(eq=False)  # by identity: a budget orders clips of every session
class _Clip:
    owner: ItemAudio
    sample_rate_hz: int
    pcm: bytearray = field(default_factory=bytearray)
    dropped: bool = False  # over a bound: nothing of it is kept from now on
    dropped_by: str | None = None  # the process's bound (None: the session's own, or none)

    @property
    def audio_s(self) -> float:
        return len(self.pcm) / (2 * self.sample_rate_hz)


class ItemAudioBudget:
    """The bytes of item audio one process holds across its sessions, at most ``max_bytes``
    (0: no bound); over it, the oldest clips of any session are dropped, whole."""

    def __init__(self, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise ValueError(f"item audio: max_bytes must be 0 or above, got {max_bytes}")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.dropped_clips = 0  # dropped by this bound, ever
        self._clips: dict[_Clip, None] = {}  # holding audio, in the order their audio began

    def add(self, clip: _Clip, size_bytes: int) -> None:
        self._clips.setdefault(clip)
        self.held_bytes += size_bytes
        if self.max_bytes and self.held_bytes > self.max_bytes:
            self._bound()

    def remove(self, clip: _Clip, size_bytes: int) -> None:
        self.held_bytes -= size_bytes
        if not clip.pcm:
            self._clips.pop(clip, None)

    def _bound(self) -> None:
        for clip in list(self._clips):
            if self.held_bytes <= self.max_bytes:
                return
            clip.owner.drop(clip, PROCESS_BOUND)
            self.dropped_clips += 1


class ItemAudio:
    """Each recent item's PCM16 mono, by item id, the newest ``max_audio_s`` in all (and
    within the process's ``budget``)."""

    def __init__(
        self, max_audio_s: float = DEFAULT_MAX_AUDIO_S, budget: ItemAudioBudget | None = None
    ) -> None:
        if max_audio_s < 0:
            raise ValueError(f"item audio: max_audio_s must be 0 or above, got {max_audio_s}")
        self.max_audio_s = max_audio_s
        self.budget = budget or ItemAudioBudget()
        self._clips: dict[str, _Clip] = {}  # in the order their audio began
        self._audio_s = 0.0

    @property
    def audio_s(self) -> float:
        """The audio held, in seconds, across items."""
        return self._audio_s

    def keep(self, item_id: str, pcm: bytes, sample_rate_hz: int) -> None:
        """More of ``item_id``'s audio (its first, or what follows); the oldest items' audio
        is dropped when the total goes over a bound."""
        clip = self._clips.get(item_id)
        if clip is None:
            clip = self._clips[item_id] = _Clip(self, sample_rate_hz)
        if clip.dropped or not pcm:
            return
        if sample_rate_hz != clip.sample_rate_hz:
            message = f"item {item_id}: audio at {sample_rate_hz} Hz after {clip.sample_rate_hz}"
            raise ValueError(message)
        even = pcm[: len(pcm) & ~1]
        clip.pcm += even
        self._audio_s += len(even) / (2 * sample_rate_hz)
        self.budget.add(clip, len(even))
        self._bound()

    def _bound(self) -> None:
        if self._audio_s <= self.max_audio_s:
            return  # (each frame of an answer: no walk)
        for clip in list(self._clips.values()):
            if self._audio_s <= self.max_audio_s:
                return
            self.drop(clip)

    def drop(self, clip: _Clip, by: str | None = None) -> None:
        """``clip`` loses its audio, for good (``by``: the bound that took it, if not ours)."""
        if clip.dropped:
            return
        held_bytes = len(clip.pcm)
        self._audio_s -= clip.audio_s
        clip.pcm, clip.dropped, clip.dropped_by = bytearray(), True, by
        self.budget.remove(clip, held_bytes)

    def cut(self, item_id: str, audio_end_ms: float) -> None:
        """The item's audio ends at ``audio_end_ms`` (truncated: what is left of it)."""
        clip = self._clips.get(item_id)
        if clip is None or clip.dropped:
            return
        keep_bytes = int(audio_end_ms * clip.sample_rate_hz / 1000) * 2
        if keep_bytes < len(clip.pcm):
            cut_bytes = len(clip.pcm) - keep_bytes
            self._audio_s -= cut_bytes / (2 * clip.sample_rate_hz)
            del clip.pcm[keep_bytes:]
            self.budget.remove(clip, cut_bytes)

    def forget(self, item_id: str) -> None:
        clip = self._clips.pop(item_id, None)
        if clip is not None:
            self.drop(clip)

    def release(self) -> None:
        """The session ended: every clip's bytes go back to the budget."""
        for item_id in list(self._clips):
            self.forget(item_id)

    def clip(self, item_id: str) -> tuple[bytes, int] | None:
        """The item's audio and its sample rate (None: none is kept)."""
        clip = self._clips.get(item_id)
        if clip is None or not clip.pcm:
            return None
        return bytes(clip.pcm), clip.sample_rate_hz

    def dropped_reason(self, item_id: str) -> str | None:
        """The process's bound, when it took the item's audio (None otherwise)."""
        clip = self._clips.get(item_id)
        return None if clip is None else clip.dropped_by
