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
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_AUDIO_S = 60.0


@dataclass
class _Clip:
    sample_rate_hz: int
    pcm: bytearray = field(default_factory=bytearray)
    dropped: bool = False  # over the bound: nothing of it is kept from now on

    @property
    def audio_s(self) -> float:
        return len(self.pcm) / (2 * self.sample_rate_hz)


class ItemAudio:
    """Each recent item's PCM16 mono, by item id, the newest ``max_audio_s`` in all."""

    def __init__(self, max_audio_s: float = DEFAULT_MAX_AUDIO_S) -> None:
        if max_audio_s < 0:
            raise ValueError(f"item audio: max_audio_s must be 0 or above, got {max_audio_s}")
        self.max_audio_s = max_audio_s
        self._clips: dict[str, _Clip] = {}  # in the order their audio began
        self._audio_s = 0.0

    @property
    def audio_s(self) -> float:
        """The audio held, in seconds, across items."""
        return self._audio_s

    def keep(self, item_id: str, pcm: bytes, sample_rate_hz: int) -> None:
        """More of ``item_id``'s audio (its first, or what follows); the oldest items' audio
        is dropped when the total goes over the bound."""
        clip = self._clips.get(item_id)
        if clip is None:
            clip = self._clips[item_id] = _Clip(sample_rate_hz)
        if clip.dropped or not pcm:
            return
        if sample_rate_hz != clip.sample_rate_hz:
            message = f"item {item_id}: audio at {sample_rate_hz} Hz after {clip.sample_rate_hz}"
            raise ValueError(message)
        clip.pcm += pcm[: len(pcm) & ~1]
        self._audio_s += len(pcm[: len(pcm) & ~1]) / (2 * sample_rate_hz)
        self._bound()

    def _bound(self) -> None:
        if self._audio_s <= self.max_audio_s:
            return  # (each frame of an answer: no walk)
        for clip in list(self._clips.values()):
            if self._audio_s <= self.max_audio_s:
                return
            self._audio_s -= clip.audio_s
            clip.pcm, clip.dropped = bytearray(), True

    def cut(self, item_id: str, audio_end_ms: float) -> None:
        """The item's audio ends at ``audio_end_ms`` (truncated: what is left of it)."""
        clip = self._clips.get(item_id)
        if clip is None or clip.dropped:
            return
        keep_bytes = int(audio_end_ms * clip.sample_rate_hz / 1000) * 2
        if keep_bytes < len(clip.pcm):
            self._audio_s -= (len(clip.pcm) - keep_bytes) / (2 * clip.sample_rate_hz)
            del clip.pcm[keep_bytes:]

    def forget(self, item_id: str) -> None:
        clip = self._clips.pop(item_id, None)
        if clip is not None:
            self._audio_s -= clip.audio_s

    def clip(self, item_id: str) -> tuple[bytes, int] | None:
        """The item's audio and its sample rate (None: none is kept)."""
        clip = self._clips.get(item_id)
        if clip is None or not clip.pcm:
            return None
        return bytes(clip.pcm), clip.sample_rate_hz
