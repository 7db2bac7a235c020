"""HTTP/1.1 as the providers' client speaks it (RFC 9112): a request's form body, and a
response read from its bytes as they arrive.

Protocol layer: bytes in, values out; no sockets. ``ResponseReader`` is fed what a connection
received, in pieces cut anywhere; it says the response's head once it is whole and hands on
the body's bytes as they come, framed by Content-Length, chunked coding or the connection's
end (RFC 9112 section 6.3). What it cannot frame is an ``HTTPFramingError`` saying why; its
limits (``MAX_HEAD_BYTES``, ``MAX_LINE_BYTES``) bound what a server can make it hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_HEAD_BYTES = 64 * 1024  # a response's status line and header fields together
MAX_LINE_BYTES = 8 * 1024  # one header field, a chunk's size line, a trailer field
MAX_CHUNK_SIZE_DIGITS = 15  # a chunk of up to 2**60 bytes: more is no size a server means

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_HEX = re.compile(rb"[0-9A-Fa-f]+")


class HTTPFramingError(ValueError):
    """A response that is not HTTP/1.1 this client can frame."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status line and header fields (names lower-case, in the order sent)."""

    version: str
    status: int
    reason: str
    fields: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str | None:
        """The field's value, repeated fields joined with ", " (None: not sent)."""
        values = [value for field, value in self.fields if field == name]
        return ", ".join(values) if values else None

    def mapping(self) -> dict[str, str]:
        """Every field by its lower-case name, repeated ones joined."""
        joined: dict[str, str] = {}
        for name, value in self.fields:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        return joined

    @property
    def keep_alive(self) -> bool:
        """Whether the server keeps the connection open after this response (section 9.3)."""
        tokens = {t.strip().lower() for t in (self.get("connection") or "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


def parse_head(block: bytes) -> ResponseHead:
    """A response head without its blank line's CRLF CRLF."""
    status_line, *lines = block.split(b"\r\n")
    version, status, reason = _status_line(status_line)
    fields = tuple(_field(line) for line in lines)
    return ResponseHead(version, status, reason, fields)


def _status_line(line: bytes) -> tuple[str, int, str]:
    version, _, rest = line.partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPFramingError(f"status line {line[:60]!r} is not HTTP/1.1 nor HTTP/1.0")
    if len(status) != 3 or not status.isdigit():
        raise HTTPFramingError(f"status line {line[:60]!r} has no three-digit status code")
    return version.decode("ascii"), int(status), reason.decode("latin-1")


def _field(line: bytes) -> tuple[str, str]:
    if len(line) > MAX_LINE_BYTES:
        raise HTTPFramingError(f"a header field of {len(line)} bytes (at most {MAX_LINE_BYTES})")
    if line[:1] in (b" ", b"\t"):
        raise HTTPFramingError(f"obsolete line folding in {line[:60]!r}")
    name, colon, value = line.partition(b":")
    if not colon or _TOKEN.fullmatch(name) is None:
        raise HTTPFramingError(f"header line {line[:60]!r} is not 'name: value'")
    return name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")


# What the reader waits for next.
_HEAD, _LENGTH, _SIZE, _DATA, _DATA_END, _TRAILER, _TO_CLOSE, _DONE = range(8)


class ResponseReader:
    """One response, fed its connection's bytes (``feed``) and told of the connection's end
    (``end_of_input``). ``head`` is set once the head is whole (1xx interim responses are
    skipped), ``complete`` once the body has ended; ``reusable`` then says whether the
    connection may carry another request (the server keeps it open, the body was framed and
    nothing came after it). ``bodiless``: the request was HEAD (no body whatever the head says).
    """

    def __init__(self, bodiless: bool = False) -> None:
        self.head: ResponseHead | None = None
        self.complete = False
        self.reusable = False
        self.received_any = False
        self._bodiless = bodiless
        self._state = _HEAD
        self._buffer = b""  # a chunked-coding line or CRLF begun
        self._held = bytearray()  # a head begun (searched from where the last search ended)
        self._left = 0  # bytes of the body (Content-Length) or of the chunk still to come
        self._trailer_bytes = 0
        self._framed = True  # the body's end is known from the bytes, not the connection's

    def feed(self, data: bytes) -> list[bytes]:
        """The body's bytes among ``data`` (in order); HTTPFramingError if it cannot be read."""
        if data:
            self.received_any = True
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        body: list[bytes] = []
        while data and self._state != _DONE:
            data = self._step(data, body)
        if data:  # bytes after the response's end: no request asked for them
            self.reusable = False
        return body

    def end_of_input(self) -> None:
        """The connection ended: the end of a body read to it, or HTTPFramingError when the
        response was not whole."""
        if self._state == _TO_CLOSE:
            self._finish()
        elif self._state == _HEAD and not self.received_any:
            raise HTTPFramingError("the server closed the connection without a response")
        elif self._state == _LENGTH:
            raise HTTPFramingError(f"the connection closed with {self._left} body bytes to come")
        elif self._state != _DONE:
            raise HTTPFramingError("the connection closed before the response's end")

    def _step(self, data: bytes, body: list[bytes]) -> bytes:
        """Read what the state wants from ``data``; the bytes left over."""
        state = self._state
        if state in (_LENGTH, _DATA):
            return self._data(data, body)
        if state == _TO_CLOSE:
            body.append(data)
            return b""
        if state == _DATA_END:
            return self._data_end(data)
        if state == _HEAD:
            return self._head(data)
        line, rest = self._line(data)
        if line is not None:
            self._size(line) if state == _SIZE else self._trailer(line)
        return rest

    def _data(self, data: bytes, body: list[bytes]) -> bytes:
        take = self._left
        if len(data) <= take:
            body.append(data)
            self._left -= len(data)
            rest = b""
        else:
            body.append(data[:take])
            self._left, rest = 0, data[take:]
        if self._left == 0:
            if self._state == _LENGTH:
                self._finish()
            else:
                self._state = _DATA_END
        return rest

    def _data_end(self, data: bytes) -> bytes:
        if len(data) < 2:
            self._buffer = data
            return b""
        if data[:2] != b"\r\n":
            raise HTTPFramingError(f"a chunk's data not followed by CRLF but {data[:8]!r}")
        self._state = _SIZE
        return data[2:]

    def _line(self, data: bytes) -> tuple[bytes | None, bytes]:
        """A CRLF-ended line and what follows it; (None, b"") when it is not whole yet."""
        end = data.find(b"\r\n")
        if end < 0 or end > MAX_LINE_BYTES:
            if end > MAX_LINE_BYTES or len(data) > MAX_LINE_BYTES + 1:
                raise HTTPFramingError(f"a chunked-coding line over {MAX_LINE_BYTES} bytes")
            self._buffer = data
            return None, b""
        return data[:end], data[end + 2 :]

    def _head(self, data: bytes) -> bytes:
        end, data = self._head_end(data)
        if end < 0:
            return b""
        head = parse_head(data[:end])
        if 100 <= head.status < 200:  # interim (100 Continue, 103 Early Hints): the next
            if head.status == 101:
                raise HTTPFramingError("101 Switching Protocols to a request that asked none")
            return data[end + 4 :]
        self.head = head
        self._frame(head)
        return data[end + 4 :]

    def _head_end(self, data: bytes) -> tuple[int, bytes]:
        """Where the head's blank line starts in the bytes so far (and those bytes), or -1
        while it has not come: the bytes are then held, and only the new ones searched on the
        next feed, so a head arriving a byte at a time costs no more than at once."""
        held = self._held
        start = max(0, len(held) - 3)
        if held:
            held += data
            end, size = held.find(b"\r\n\r\n", start), len(held)
        else:
            end, size = data.find(b"\r\n\r\n"), len(data)
        if end > MAX_HEAD_BYTES or (end < 0 and size > MAX_HEAD_BYTES + 3):
            raise HTTPFramingError(f"a response head over {MAX_HEAD_BYTES} bytes")
        if end < 0:
            if not held:
                held += data
            return -1, b""
        if held:
            data = bytes(held)
            held.clear()
        return end, data

    def _frame(self, head: ResponseHead) -> None:
        """The body's framing (RFC 9112 section 6.3)."""
        coding, length = head.get("transfer-encoding"), head.get("content-length")
        if self._bodiless or head.status in (204, 304):
            self._finish()
        elif coding is not None:
            chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
            self._state = _SIZE if chunked else _TO_CLOSE
            self._framed = chunked and length is None  # both sent: not trusted for reuse
        elif length is not None:
            self._left = _content_length(length)
            self._state = _LENGTH
            if self._left == 0:
                self._finish()
        else:
            self._state, self._framed = _TO_CLOSE, False

    def _size(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip(b" \t")
        if _HEX.fullmatch(digits) is None or len(digits) > MAX_CHUNK_SIZE_DIGITS:
            raise HTTPFramingError(f"chunk size line {line[:40]!r} is not a hex size")
        self._left = int(digits, 16)
        self._state = _DATA if self._left else _TRAILER

    def _trailer(self, line: bytes) -> None:
        if not line:
            self._finish()
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > MAX_HEAD_BYTES:
            raise HTTPFramingError(f"trailer fields over {MAX_HEAD_BYTES} bytes")
        _field(line)  # checked, not kept: nothing here reads trailers

    def _finish(self) -> None:
        self._state, self.complete = _DONE, True
        self.reusable = self._framed and self.head is not None and self.head.keep_alive


def _content_length(value: str) -> int:
    """Content-Length's value: equal repeats allowed (section 6.3, point 5)."""
    lengths = {part.strip() for part in value.split(",")}
    if len(lengths) != 1 or not (length := lengths.pop()).isdigit() or len(length) > 18:
        raise HTTPFramingError(f"Content-Length {value[:40]!r} is not one length")
    return int(length)


# --- request ----------------------------------------------------------------------------


def form_fields(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A request's fields as a multipart form carries them, as the ``openai`` SDK writes
    them: text as it is, booleans ``true``/``false``, numbers in decimal, a list's items each
    under ``name[]``; None is left out."""
    fields: list[tuple[str, str]] = []
    for name, value in body.items():
        if isinstance(value, list | tuple):
            fields.extend((f"{name}[]", _form_value(name, item)) for item in value)
        elif value is not None:
            fields.append((name, _form_value(name, value)))
    return fields


def _form_value(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise TypeError(f"form field {name!r}: {type(value).__name__} is not text, a number or bool")


@dataclass(frozen=True, slots=True)
class FormFile:
    """A file in a multipart form."""

    field: str
    filename: str
    content_type: str
    data: bytes


def multipart_body(fields: list[tuple[str, str]], files: list[FormFile], boundary: str) -> bytes:
    """A multipart/form-data body (RFC 7578) as httpx writes one: fields, then files."""
    dash = b"--" + boundary.encode("ascii")
    parts: list[bytes] = []
    for name, value in fields:
        disposition = f'Content-Disposition: form-data; name="{_quoted(name)}"'
        parts += (dash, b"\r\n", disposition.encode(), b"\r\n\r\n", value.encode(), b"\r\n")
    for file in files:
        disposition = (
            f'Content-Disposition: form-data; name="{_quoted(file.field)}"; '
            f'filename="{_quoted(file.filename)}"\r\nContent-Type: {file.content_type}'
        )
        parts += (dash, b"\r\n", disposition.encode(), b"\r\n\r\n", file.data, b"\r\n")
    parts += (dash, b"--\r\n")
    return b"".join(parts)


def _quoted(name: str) -> str:
    """A name inside a quoted-string of a Content-Disposition, escaped as httpx escapes it
    (the HTML standard's form encoding: ``"`` as %22, a backslash doubled, controls as %XX)."""
    escaped = name.replace("\\", "\\\\").replace('"', "%22")
    return "".join(f"%{ord(c):02X}" if ord(c) < 0x20 and c != "\x1b" else c for c in escaped)


def header_lines(fields: list[tuple[bytes, bytes]]) -> bytes:
    """Header fields as they go on the wire; ValueError for a name or value that would break
    the framing (a CR, LF or NUL, a name that is not a token)."""
    for name, value in fields:
        if _TOKEN.fullmatch(name) is None or any(c in value for c in b"\r\n\0"):
            raise ValueError(f"header field {name[:40]!r} cannot be sent as it is")
    return b"".join(name + b": " + value + b"\r\n" for name, value in fields)
