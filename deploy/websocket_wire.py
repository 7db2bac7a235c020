"""The WebSocket opening handshake as the front door sees it (RFC 6455 section 4): check the
client's upgrade request, write the one sent to a transceiver, read the transceiver's answer
head, and write the ``101`` relayed to the client.

Pure: bytes and ``RequestHead`` in, values out. A malformed handshake is a ``HandshakeError``
(an ``HttpError`` with the headers its answer needs), so it gets the front door's JSON error.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from deploy.http_wire import (
    FIELD_VALUE,
    MAX_HEADERS,
    TOKEN,
    Headers,
    HttpError,
    RequestHead,
    downstream_headers,
    upstream_headers,
)

WEBSOCKET_VERSION = "13"  # RFC 6455 section 4.1, the only version
KEY_BYTES = 16  # RFC 6455 section 4.1: a nonce of 16 bytes, base64-encoded
HANDSHAKE_HEADERS = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)
SWITCH_HEADERS = frozenset(
    {b"sec-websocket-accept", b"sec-websocket-protocol", b"sec-websocket-extensions"}
)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2})(?: [\t\x20-\x7e\x80-\xff]*)?")
CONTENT_LENGTH = re.compile(rb"[0-9]{1,15}")
REALTIME_PATH = "/v1/realtime"


class HandshakeError(HttpError):
    """A handshake we refuse ourselves; ``headers`` go on the JSON error answer."""

    def __init__(self, status: int, code: str, message: str, headers: Headers | None = None):
        super().__init__(status, code, message)
        self.headers: Headers = headers or []


class UpstreamError(Exception):
    """A transceiver's answer to the handshake that is not HTTP/1.1 we can relay."""


# --- the client's request (pure) ---------------------------------------------------------------


def tokens(values: list[str]) -> set[str]:
    """The comma-separated tokens of a header's values, lower-cased (RFC 9110 section 5.6.1)."""
    return {t.strip().lower() for value in values for t in value.split(",") if t.strip()}


def websocket_requested(head: RequestHead) -> bool:
    """Whether the request asks for a WebSocket (other upgrades, h2c, are ignored as usual)."""
    return "websocket" in tokens(head.all("upgrade"))


def request_version(raw: bytes) -> str:
    """The HTTP version of a request head that ``parse_head`` accepted."""
    return raw.split(b"\r\n", 1)[0].rsplit(b" ", 1)[-1].decode("latin-1")


def check_handshake(head: RequestHead, version: str) -> None:
    """Refuse a WebSocket upgrade request that RFC 6455 section 4.1 says is not one."""
    if head.method != "GET":
        message = f"a WebSocket handshake is a GET (RFC 6455 section 4.1), not {head.method}"
        raise HandshakeError(405, "websocket_not_get", message, [(b"allow", b"GET")])
    if version != "HTTP/1.1":
        raise HandshakeError(
            400, "websocket_http_version", f"a WebSocket needs HTTP/1.1, not {version}"
        )
    _check_no_body(head)
    if "upgrade" not in tokens(head.all("connection")):
        raise HandshakeError(400, "websocket_connection", "Connection must include Upgrade")
    if len(head.all("host")) != 1:
        raise HandshakeError(400, "websocket_host", "a WebSocket handshake needs one Host header")
    _check_key(head.all("sec-websocket-key"))
    _check_version(head.all("sec-websocket-version"))


def _check_no_body(head: RequestHead) -> None:
    if head.get("transfer-encoding") is not None or head.all("content-length") not in ([], ["0"]):
        raise HandshakeError(400, "websocket_body", "a WebSocket handshake has no body")


def _check_key(values: list[str]) -> None:
    if len(values) != 1:
        message = f"a WebSocket handshake needs one Sec-WebSocket-Key, got {len(values)}"
        raise HandshakeError(400, "websocket_key", message)
    try:
        nonce = b64decode(values[0].encode("latin-1"), validate=True)
    except binascii.Error:
        nonce = b""
    if len(nonce) != KEY_BYTES:
        message = f"Sec-WebSocket-Key {values[0][:40]!r} is not {KEY_BYTES} bytes in base64"
        raise HandshakeError(400, "websocket_key", message)


def _check_version(values: list[str]) -> None:
    if len(values) != 1:
        message = f"a WebSocket handshake needs one Sec-WebSocket-Version, got {len(values)}"
        raise HandshakeError(400, "websocket_version", message)
    if values[0] != WEBSOCKET_VERSION:  # RFC 6455 section 4.4: 426 naming what we speak
        message = f"Sec-WebSocket-Version {values[0][:20]!r} is not {WEBSOCKET_VERSION}"
        supported = [(b"sec-websocket-version", WEBSOCKET_VERSION.encode())]
        raise HandshakeError(426, "websocket_version", message, supported)


def sideband_call_id(target: str) -> str | None:
    """The call a Realtime sideband (``/v1/realtime?call_id=rtc_…``) joins, if it names one."""
    path, _, query = target.partition("?")
    values = parse_qs(query).get("call_id") if path == REALTIME_PATH else None
    return values[0] if values and len(values) == 1 else None


def upstream_handshake(head: RequestHead, backend: str, client_host: str) -> bytes:
    """The handshake sent to ``backend``: the client's key, version, subprotocols and
    extensions (so the transceiver's ``Sec-WebSocket-Accept`` is the one the client expects),
    and the headers any forwarded request carries."""
    lines = [f"GET {head.target} HTTP/1.1".encode(), b"host: " + backend.encode()]
    lines += [b"connection: Upgrade", b"upgrade: websocket"]
    lines += [n + b": " + v for n, v in head.headers if n in HANDSHAKE_HEADERS]
    lines += [n + b": " + v for n, v in upstream_headers(head, client_host)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- the transceiver's answer (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: Headers = field(default_factory=list)  # names lower-cased

    def all(self, name: str) -> list[bytes]:
        key = name.encode()
        return [value for n, value in self.headers if n == key]

    def body_bytes(self, max_body_bytes: int) -> int | None:
        """The declared length, or None for a body that ends when the connection does."""
        if self.all("transfer-encoding"):
            raise UpstreamError("a chunked answer to a WebSocket handshake is not relayed")
        declared = set(self.all("content-length"))
        if not declared:
            return None
        value = declared.pop()
        if declared or not CONTENT_LENGTH.fullmatch(value) or int(value) > max_body_bytes:
            raise UpstreamError(f"bad or oversized Content-Length {value[:20]!r}")
        return int(value)

    def switch_head(self) -> bytes:
        """The ``101`` relayed to the client: the upgrade, the WebSocket answer headers and
        the ones any reply carries."""
        lines = [b"HTTP/1.1 101 Switching Protocols", b"upgrade: websocket"]
        lines.append(b"connection: Upgrade")
        lines += [n + b": " + v for n, v in self.headers if n in SWITCH_HEADERS]
        lines += [n + b": " + v for n, v in downstream_headers(self.headers)]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def reply_headers(self) -> Headers:
        """The headers of a refusal relayed as a normal answer (426 names the version)."""
        version = [(n, v) for n, v in self.headers if n == b"sec-websocket-version"]
        return downstream_headers(self.headers) + version


def parse_response_head(raw: bytes) -> ResponseHead:
    """A transceiver's status line and headers, ``raw`` ending in the blank line."""
    status_line, *lines = raw.removesuffix(b"\r\n\r\n").split(b"\r\n")
    match = STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise UpstreamError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    if len(lines) > MAX_HEADERS:
        raise UpstreamError(f"more than {MAX_HEADERS} header lines")
    if match.group(1)[0:1] == b"1" and match.group(1) != b"101":
        raise UpstreamError(f"an interim {match.group(1).decode()} answer to a WebSocket handshake")
    return ResponseHead(int(match.group(1)), [_response_header(line) for line in lines])


def _response_header(line: bytes) -> tuple[bytes, bytes]:
    name, sep, value = line.partition(b":")
    if not sep or not TOKEN.fullmatch(name.decode("latin-1")) or not FIELD_VALUE.fullmatch(value):
        raise UpstreamError(f"malformed header line {line[:80]!r}")
    return name.lower(), value.strip(b" \t")
