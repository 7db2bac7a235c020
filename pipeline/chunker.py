"""LLM text deltas -> speakable chunks for text-to-speech.

Protocol layer, pure. Text-to-speech sounds natural only on whole phrases, but waiting for a
whole answer costs latency, so the chunker cuts:

- at a sentence end (``.``, ``!``, ``?`` followed by whitespace, not after a known
  abbreviation or a single capital initial);
- for the *first* chunk only, already at a clause boundary once it has ``first_min_chars``: after
  ``,``, ``;``, ``:`` or a dash, or before a word that opens a clause or a phrase (``and``,
  ``but``, ``because``, ``which``..., ``at``, ``from``, ``about``...; cut once the word is
  whole). The first sound of the answer is what the user waits for, and text-to-speech takes
  time in proportion to the chunk's length: piper's first audio for "The library opens" came in
  about half the time of "The library opens at nine in the morning" (125 against 233 ms at
  best, on 2 loaded cores);
- for the *first* chunk only, with ``first_words`` set, after that many whole words (or the
  first word after them that does not lean on the next: "the", "of", "is"...). A local
  language model writes a few tokens a second on shared cores, so the first phrase, not the
  speech, is what the user waits for: "The capital of France" is out four tokens sooner than
  "The capital of France is Paris.";
- anywhere at whitespace once a chunk reaches ``max_chars`` (a run-on sentence must not stall
  speech).

``flush()`` returns the rest at the end of the response.
"""

from __future__ import annotations

import re

from pipeline.config import ChunkerConfig

SENTENCE_ENDS = ".!?"
CLAUSE_ENDS = ",;:\u2014"
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e"})
CLAUSE_CONJUNCTIONS = frozenset(
    {"and", "but", "because", "which", "while", "although", "though", "whereas", "unless"}
)
# Prepositions that open a phrase the head does not need ("of" and "to" are left out: "a cup
# of", "wants to" would end on a word that asks for more)
PHRASE_PREPOSITIONS = frozenset(
    {"at", "in", "on", "from", "about", "for", "with", "by", "after", "before", "during"}
)
FIRST_CUT_WORDS = CLAUSE_CONJUNCTIONS | PHRASE_PREPOSITIONS
# Words a phrase cut by its word count does not end on: each asks for the word after it
LEANING_WORDS = frozenset(
    {"a", "an", "the", "of", "to", "my", "your", "our", "their", "its", "his", "her", "is"}
    | {"are", "was", "were", "be", "i", "you", "we", "they", "it", "and", "or", "very"}
)
NEXT_WHOLE_WORD = re.compile(r"\s+([A-Za-z]+)\s")  # a word with whitespace after it


class SpeechChunker:
    def __init__(self, config: ChunkerConfig | None = None) -> None:
        self.config = config or ChunkerConfig()
        self._pending = ""
        self._chunks_out = 0

    def push(self, text: str) -> list[str]:
        """Add a delta; returns the chunks it completed, in order."""
        self._pending += text
        chunks: list[str] = []
        while (cut := self._find_cut()) is not None:
            chunk, self._pending = self._pending[:cut].strip(), self._pending[cut:].lstrip()
            if chunk:
                chunks.append(chunk)
                self._chunks_out += 1
        return chunks

    def flush(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        if not rest:
            return []
        self._chunks_out += 1
        return [rest]

    def _find_cut(self) -> int | None:
        text = self._pending
        for index in range(1, min(len(text), self.config.max_chars + 1)):
            if not text[index].isspace():
                continue
            if (
                self._is_boundary(text, index - 1)
                or self._before_conjunction(text, index)
                or self._after_first_words(text, index)
            ):
                return index
        if len(text) >= self.config.max_chars:
            space = text.rfind(" ", 0, self.config.max_chars)
            return space if space > 0 else self.config.max_chars
        return None

    def _is_boundary(self, text: str, index: int) -> bool:
        mark = text[index]
        length = len(text[: index + 1].strip())
        if mark in SENTENCE_ENDS:
            return length >= self.config.min_chars and not _ends_with_abbreviation(text[:index])
        first = self._chunks_out == 0
        return first and mark in CLAUSE_ENDS and length >= self.config.first_min_chars

    def _before_conjunction(self, text: str, index: int) -> bool:
        """The first chunk may end at ``index`` (whitespace) when a conjunction or a
        preposition follows."""
        if self._chunks_out or len(text[:index].strip()) < self.config.first_min_chars:
            return False
        word = NEXT_WHOLE_WORD.match(text, index)
        return word is not None and word[1].lower() in FIRST_CUT_WORDS

    def _after_first_words(self, text: str, index: int) -> bool:
        """The first chunk may end at ``index`` (whitespace after a word) once it holds
        ``first_words`` words and its last one does not lean on the next."""
        if self._chunks_out or not self.config.first_words or text[index - 1].isspace():
            return False
        words = text[:index].split()
        last = words[-1].strip("\"'").lower()
        return len(words) >= self.config.first_words and last not in LEANING_WORDS


def _ends_with_abbreviation(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    last = words[-1]
    if len(last) == 1 and last.isupper():
        return True  # an initial: "J. Smith"
    return last.lower() in ABBREVIATIONS
