"""Just enough HTTP/1.1 for the front door: read and check a request head, filter headers, and
write a whole reply (RFC 9112 framing, one request per connection).

Pure: bytes in, values out. Every rejection is an ``HttpError`` with the status and a stable
``code`` the front door turns into a JSON error shaped like the transceivers' own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

MAX_HEADERS = 100
CALLS_PATH = "/v1/realtime/calls"
Headers = list[tuple[bytes, bytes]]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2
# RFC 9112 section 3.2.1, origin-form: absolute-path [ "?" query ]; visible ASCII, no fragment
ORIGIN_FORM = re.compile(r"/[\x21\x22\x24-\x7e]*")
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # RFC 9110 section 5.5, no controls
CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
REQUEST_HEADERS = frozenset({b"content-type", b"authorization", b"accept", b"origin"})
REQUEST_PREFIXES = (b"x-voicerelay-", b"access-control-request-")
RESPONSE_HEADERS = frozenset(
    {
        b"content-type",
        b"location",
        b"retry-after",
        b"retry-after-ms",
        b"www-authenticate",
        b"cache-control",
        b"vary",
    }
)
# x-ratelimit-*: a transceiver's rate-limit state (OpenAI's headers), on refusals and answers
RESPONSE_PREFIXES = (b"x-voicerelay-", b"access-control-", b"x-ratelimit-")


# --- the request as received (pure) ------------------------------------------------------------


class HttpError(Exception):
    """A request we answer ourselves, with ``status`` and a JSON body naming ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: Headers  # names lower-cased, values as sent

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        key = name.encode()
        return [value.decode("latin-1") for n, value in self.headers if n == key]


def parse_head(raw: bytes) -> RequestHead:
    """The request line and headers, ``raw`` ending in the blank line (RFC 9112 section 2)."""
    request_line, *lines = raw.removesuffix(b"\r\n\r\n").split(b"\r\n")
    method, target = _request_line(request_line)
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, "too_many_headers", f"more than {MAX_HEADERS} header lines")
    return RequestHead(method, target, [_header_line(line) for line in lines])


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not parts[2].startswith("HTTP/"):
        raise HttpError(400, "invalid_request_line", f"not an HTTP request line: {line[:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400, "unsupported_http_version", f"{version[:20]!r} is not HTTP/1.x")
    if method not in METHODS:
        raise HttpError(405, "method_not_allowed", f"method {method[:20]!r} is not forwarded")
    if not ORIGIN_FORM.fullmatch(target):
        message = f"target {target[:80]!r} must be a path such as {CALLS_PATH} (not a proxy)"
        raise HttpError(400, "invalid_target", message)
    return method, target


def _header_line(line: bytes) -> tuple[bytes, bytes]:
    name, sep, value = line.partition(b":")
    if not sep or not TOKEN.fullmatch(name.decode("latin-1")) or not FIELD_VALUE.fullmatch(value):
        raise HttpError(400, "invalid_header", f"malformed header line {line[:80]!r}")
    return name.lower(), value.strip(b" \t")


def body_length(head: RequestHead, max_body_bytes: int) -> int:
    """The declared body size: Content-Length only, one value, within the limit."""
    if head.get("transfer-encoding") is not None:
        raise HttpError(411, "length_required", "send a Content-Length body, not a chunked one")
    declared = set(head.all("content-length"))
    if not declared:
        return 0
    value = declared.pop()
    if declared or not CONTENT_LENGTH.fullmatch(value):
        raise HttpError(400, "invalid_content_length", f"bad Content-Length {value[:20]!r}")
    if int(value) > max_body_bytes:
        message = f"body of {value} bytes exceeds the limit of {max_body_bytes}"
        raise HttpError(413, "body_too_large", message)
    return int(value)


def upstream_headers(head: RequestHead, client_host: str) -> Headers:
    kept = [
        (n, v) for n, v in head.headers if n in REQUEST_HEADERS or n.startswith(REQUEST_PREFIXES)
    ]
    kept += [(b"x-forwarded-for", client_host.encode()), (b"x-forwarded-proto", b"http")]
    host = head.get("host")
    return kept + ([(b"x-forwarded-host", host.encode("latin-1"))] if host else [])


def downstream_headers(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
    return [
        (name.lower(), value)
        for name, value in raw
        if name.lower() in RESPONSE_HEADERS or name.lower().startswith(RESPONSE_PREFIXES)
    ]


# --- the answer (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: bytes

    def encode(self, head_only: bool = False) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {self.status} {reason}".encode()]
        lines += [name + b": " + value for name, value in self.headers]
        if not head_only:  # a HEAD answer may leave the length out (RFC 9110 section 8.6)
            lines.append(b"content-length: %d" % len(self.body))
        lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else self.body)


def error_reply(status: int, code: str, message: str) -> Reply:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"type": kind, "code": code, "message": message, "param": None}
    body = json.dumps({"error": error}).encode()
    return Reply(status, [(b"content-type", b"application/json")], body)
