"""SpeechCache: synthesized speech kept by what was said, so a repeated sentence costs nothing.

Pure (no I/O, no threads; used from one event loop). A rule-based agent answers from a fixed
set of sentences (its knowledge file, its greeting), and every call of a process that asks the
same question hears the same sentences: synthesizing them again is the offline pipeline's
largest waste (piper costs ~0.1 CPU-s per second of speech on this machine, while a copy is
free). The cache keeps each text's audio (one PCM part per sentence, as synthesized) by
``SpeechKey``: the voice, the length scale (speed) and the exact text. Its bound is in bytes
(``max_bytes``; 0 keeps nothing): the least recently heard entry goes first, and an entry
larger than the whole bound is not kept. ``hits``, ``misses``, ``evictions`` and ``bytes``
say how it serves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class SpeechKey:
    voice: str
    length_scale: float | None  # None: the voice's own
    text: str


class SpeechCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"speech cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[SpeechKey, tuple[bytes, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: SpeechKey) -> tuple[bytes, ...] | None:
        """The audio kept for ``key`` (now the most recently heard), or None (a miss)."""
        parts = self._entries.get(key)
        if parts is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return parts

    def put(self, key: SpeechKey, parts: tuple[bytes, ...]) -> None:
        """Keep ``parts`` for ``key``, dropping the least recently heard entries to fit."""
        size = sum(len(part) for part in parts)
        if size > self.max_bytes:
            return
        self._drop(key)
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = parts
        self.bytes += size

    def _drop(self, key: SpeechKey) -> None:
        parts = self._entries.pop(key, None)
        if parts is not None:
            self.bytes -= sum(len(part) for part in parts)
