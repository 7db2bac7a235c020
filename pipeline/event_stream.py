"""Server-sent events (the ``text/event-stream`` a provider streams its answer in) cut into
each event's data.

Pure protocol layer: bytes in, each event's ``data`` out, as the WHATWG HTML standard's
"event stream interpretation" reads them: lines end in CRLF, LF or CR; a blank line ends an
event; a line starting with ":" is a comment; ``data`` lines are joined with "\\n" (one space
after the colon dropped); an event without data, and an unfinished event when the stream
ends, are no event. Other fields (``event``, ``id``, ``retry``) are read past: the chat and
transcription streams do not use them. The SDK's own decoder does the same a line at a time
in Python; here a piece of the body is split at blank lines in one call, and the usual event
(one ``data: `` line) is taken as it is.
"""

from __future__ import annotations

DATA_PREFIX = b"data: "


class EventStreamReader:
    """Feed it the body's pieces as they arrive; each feed returns the events it completed."""

    def __init__(self) -> None:
        self._pending = b""  # the body after the last blank line, line ends made LF
        self._after_cr = False  # the last byte fed was a CR: an LF next is that line's end

    def feed(self, piece: bytes) -> list[bytes]:
        """The data of each event ``piece`` completes, in order."""
        if self._after_cr and piece.startswith(b"\n"):
            piece = piece[1:]  # a CRLF cut between two pieces
        text = self._pending + piece
        self._after_cr = text.endswith(b"\r")
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, self._pending = text.split(b"\n\n")
        return [data for block in blocks if (data := event_data(block)) is not None]


def event_data(block: bytes) -> bytes | None:
    """The data of one event's lines (LF-separated, no blank line), None when it has none."""
    if block.startswith(DATA_PREFIX) and b"\n" not in block:
        return block[len(DATA_PREFIX) :]  # the usual event: one data line
    data = []
    for line in block.split(b"\n"):
        field, colon, value = line.partition(b":")
        if field != b"data":  # a comment (empty field), another field, an empty line
            continue
        data.append(value[1:] if colon and value.startswith(b" ") else value)
    return b"\n".join(data) if data else None
