"""The knowledge file of the local agent: parsing and keyword search.

Protocol layer, pure (the file is read by :func:`load_knowledge`, everything else works on text).

Format (the shipped sample is ``pipeline/data/knowledge.md``)::

    anything before the first "## " heading: documentation, ignored
    ## Title                      <- one entry; the title's words are match words
    keywords: word, word          <- optional, right under the heading: more match words
    Answer text, spoken as written. Further lines are joined with spaces.

Search is tolerant keyword overlap (speech recognisers drop and mangle words): the entry sharing
the most match words with the question wins, answer words break ties, and no shared match word
means no answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "about",
        "at",
        "be",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "please",
        "tell",
        "the",
        "to",
        "was",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)
_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    return [word.strip("'") for word in _WORD.findall(text.lower()) if word.strip("'")]


def content_words(text: str) -> set[str]:
    return {word for word in words_of(text) if word not in STOPWORDS}


@dataclass(frozen=True)
class KnowledgeEntry:
    title: str
    keywords: frozenset[str]
    answer: str

    @property
    def match_words(self) -> frozenset[str]:
        return self.keywords | content_words(self.title)


class KnowledgeFormatError(ValueError):
    pass


@dataclass(frozen=True)
class KnowledgeBase:
    entries: tuple[KnowledgeEntry, ...]

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> KnowledgeBase:
        entries = [_parse_entry(block, source) for block in ("\n" + text).split("\n## ")[1:]]
        if not entries:
            raise KnowledgeFormatError(f"{source}: no '## Title' entries found")
        return cls(tuple(entries))

    def search(self, question: str) -> KnowledgeEntry | None:
        asked = content_words(question)
        scored = [(self._score(entry, asked), entry) for entry in self.entries]
        best_score, best = max(scored, key=lambda pair: pair[0])
        return best if best_score[0] > 0 else None

    @property
    def titles(self) -> list[str]:
        return [entry.title for entry in self.entries]

    @staticmethod
    def _score(entry: KnowledgeEntry, asked: set[str]) -> tuple[int, int]:
        return len(asked & entry.match_words), len(asked & content_words(entry.answer))


def _parse_entry(block: str, source: str) -> KnowledgeEntry:
    title, _, body = block.partition("\n")
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    keywords: frozenset[str] = frozenset()
    if lines and lines[0].lower().startswith("keywords:"):
        keywords = frozenset(words_of(lines.pop(0).partition(":")[2]))
    if not title.strip() or not lines:
        raise KnowledgeFormatError(f"{source}: entry '{title.strip()}' has no answer text")
    return KnowledgeEntry(title.strip(), keywords, " ".join(lines))


def load_knowledge(path: str | Path | None = None) -> KnowledgeBase:
    """Read a knowledge file; ``None`` is the sample shipped with the package."""
    if path is None:
        text = files("pipeline").joinpath("data/knowledge.md").read_text(encoding="utf-8")
        return KnowledgeBase.parse(text, "pipeline/data/knowledge.md")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise KnowledgeFormatError(f"cannot read knowledge file {path}: {error.strerror}") from None
    return KnowledgeBase.parse(text, str(path))
