"""The words of an utterance a revising recogniser has settled on, for deltas that add up.

Protocol layer (pure). An offline speech-to-text (``pipeline.moonshine_stt``,
``pipeline.pocketsphinx_stt``) gives each partial as a new guess at the whole utterance so
far, and a later guess may change words an earlier one had ("Tell me abut" then "Tell me
about"). A transcription delta cannot be taken back, so only words that have settled are
sent: those two guesses in a row agree on, from the start, the newest guess's last word left
out (it may be a word cut short by the end of the audio so far). What has been sent only
grows: a later pair of guesses that disagrees with it adds nothing until the guesses agree
past it again. The final transcript is the recogniser's last word: ``Translator`` sends its
rest as the last delta when it goes on from what was sent (the usual case: the deltas then
add up to the completed transcript exactly), and none when it revised a settled word; the
``.completed`` event always carries the whole final transcript, as OpenAI's does.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\S+")


class StableWords:
    """One utterance's settled text: ``guess`` takes each partial guess in turn."""

    def __init__(self) -> None:
        self._previous: list[str] = []
        self.text = ""  # settled so far; only grows

    def guess(self, text: str) -> str:
        """The settled text after this guess (the same or longer)."""
        spans = [(m.group(), m.end()) for m in _WORD.finditer(text)][:-1]  # all but the last
        agreed = 0
        for (word, _), before in zip(spans, self._previous, strict=False):
            if word != before:
                break
            agreed += 1
        self._previous = [m.group() for m in _WORD.finditer(text)]
        settled = text[: spans[agreed - 1][1]] if agreed else ""
        if len(settled) > len(self.text) and _goes_on(settled, self.text):
            self.text = settled
        return self.text


def _goes_on(text: str, start: str) -> bool:
    """``text`` is ``start`` and more words (not ``start``'s last word made longer)."""
    return text.startswith(start) and (not start or text[len(start)].isspace())
