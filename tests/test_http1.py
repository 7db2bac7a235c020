"""``pipeline.http1``: a response read from its bytes however they are cut, its framing by
Content-Length, chunked coding or the connection's end, and what it refuses (with the error
that says why), at and past its size limits; a multipart form as httpx writes one."""

from __future__ import annotations

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.http1 import (
    MAX_HEAD_BYTES,
    MAX_LINE_BYTES,
    FormFile,
    HTTPFramingError,
    ResponseReader,
    form_fields,
    header_lines,
    multipart_body,
)

SSE = b'data: {"a":1}\n\ndata: [DONE]\n\n'


def read(cuts: list[bytes], *, closed: bool = True) -> tuple[ResponseReader, bytes]:
    """A reader fed ``cuts`` (then the connection's end when ``closed``) and the body."""
    reader, body = ResponseReader(), b""
    for cut in cuts:
        body += b"".join(reader.feed(cut))
    if closed:
        reader.end_of_input()
    return reader, body


def chunked(body: bytes, sizes: list[int]) -> bytes:
    """``body`` in chunks of ``sizes`` (cycled), as chunked coding frames it."""
    out, at, turn = b"", 0, 0
    while at < len(body):
        size = max(1, sizes[turn % len(sizes)])
        out += b"%x\r\n" % len(body[at : at + size]) + body[at : at + size] + b"\r\n"
        at, turn = at + size, turn + 1
    return out + b"0\r\n\r\n"


def test_a_content_length_response_is_read_and_reusable() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: audio/pcm\r\nContent-Length: 4\r\n\r\nabcd"
    reader, body = read([wire], closed=False)
    assert reader.head is not None and reader.head.status == 200 and reader.head.reason == "OK"
    assert reader.head.get("content-type") == "audio/pcm"
    assert body == b"abcd" and reader.complete and reader.reusable


def test_a_chunked_response_with_extensions_and_trailers_is_read() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"5;name=value\r\nhello\r\n1\r\n!\r\n0\r\nX-Checksum: 1\r\n\r\n"
    reader, body = read([wire], closed=False)
    assert body == b"hello!" and reader.complete and reader.reusable


def test_a_body_to_the_connections_end_is_complete_there_and_not_reusable() -> None:
    reader, body = read([b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"])
    assert body == b"all of it" and reader.complete and not reader.reusable


def test_interim_responses_are_skipped() -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    reader, body = read([wire + b"HTTP/1.1 204 No Content\r\n\r\n"], closed=False)
    assert reader.head is not None and reader.head.status == 204
    assert body == b"" and reader.complete and reader.reusable


@pytest.mark.parametrize(
    ("head", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n..", True),
        # both framings: chunked wins, the connection is not trusted again
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            False,
        ),
    ],
)
def test_whether_the_connection_may_carry_another_request(head: bytes, reusable: bool) -> None:
    reader, _ = read([head], closed=False)
    assert reader.complete and reader.reusable is reusable


def test_bytes_after_the_response_spoil_the_connection() -> None:
    reader, body = read([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxJUNK"], closed=False)
    assert body == b"x" and reader.complete and not reader.reusable


def test_a_head_request_has_no_body_whatever_the_length() -> None:
    reader = ResponseReader(bodiless=True)
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n") == []
    assert reader.complete and reader.reusable


@pytest.mark.parametrize(
    ("wire", "said"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "is not HTTP/1.1 nor HTTP/1.0"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "has no three-digit status code"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "is not 'name: value'"),
        (b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n", "is not 'name: value'"),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", "obsolete line folding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "is not one length"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101 Switching Protocols"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "is not a hex size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "not followed by CRLF"),
    ],
)
def test_what_cannot_be_framed_is_refused_saying_why(wire: bytes, said: str) -> None:
    with pytest.raises(HTTPFramingError, match=said):
        ResponseReader().feed(wire)


@pytest.mark.parametrize(
    ("cuts", "said"),
    [
        ([], "closed the connection without a response"),
        ([b"HTTP/1.1 200 OK\r\n"], "before the response's end"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"], "with 3 body bytes to come"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab"], "response's end"),
    ],
)
def test_a_response_cut_short_by_the_connections_end_is_refused(
    cuts: list[bytes], said: str
) -> None:
    with pytest.raises(HTTPFramingError, match=said):
        read(cuts)


def test_a_head_at_the_limit_is_read_and_one_byte_over_is_refused() -> None:
    fields = b"".join(b"X-F%05d: " % n + b"v" * 88 + b"\r\n" for n in range(600))
    start = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\nX-Last: "
    filler = MAX_HEAD_BYTES - len(start)
    head = start + b"v" * filler  # the head without its blank line's CRLF CRLF
    assert len(head) == MAX_HEAD_BYTES and filler < MAX_LINE_BYTES
    reader, _ = read([head + b"\r\n\r\n"], closed=False)
    assert reader.head is not None and reader.head.get("x-last") == "v" * filler
    assert reader.complete
    with pytest.raises(HTTPFramingError, match=f"a response head over {MAX_HEAD_BYTES} bytes"):
        read([head + b"v\r\n\r\n"], closed=False)


def test_a_head_at_the_limit_arriving_a_byte_at_a_time_is_read() -> None:
    fields = b"".join(b"X-F%05d: " % n + b"v" * 88 + b"\r\n" for n in range(650))
    head = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n"
    wire = head + b"X: " + b"v" * (MAX_HEAD_BYTES - len(head) - 3) + b"\r\n\r\nok"
    reader, body = read([wire[at : at + 1] for at in range(len(wire))], closed=False)
    assert reader.head is not None and len(reader.head.fields) == 652
    assert body == b"ok" and reader.complete


def test_a_head_that_never_ends_is_refused_once_past_the_limit() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100)
    with pytest.raises(HTTPFramingError, match="a response head over"):
        for _ in range(MAX_HEAD_BYTES // 1000 + 2):
            reader.feed(b"X: " + b"y" * 995 + b"\r\n")


def test_a_header_field_over_the_line_limit_is_refused() -> None:
    fits = (
        b"HTTP/1.1 200 OK\r\nX: " + b"v" * (MAX_LINE_BYTES - 3) + b"\r\nContent-Length: 0\r\n\r\n"
    )
    assert read([fits], closed=False)[0].complete
    over = fits.replace(b"X: ", b"X: v")
    with pytest.raises(HTTPFramingError, match=f"a header field of {MAX_LINE_BYTES + 1} bytes"):
        ResponseReader().feed(over)


def test_a_chunk_size_line_over_the_line_limit_is_refused() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    extension = b"1;" + b"e" * MAX_LINE_BYTES
    with pytest.raises(HTTPFramingError, match=f"a chunked-coding line over {MAX_LINE_BYTES}"):
        reader.feed(extension)


def test_a_chunk_size_of_more_hex_digits_than_any_real_size_is_refused() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(HTTPFramingError, match="is not a hex size"):
        reader.feed(b"1" + b"0" * 15 + b"\r\n")


# --- any response, cut anywhere -----------------------------------------------------------

NAMES = st.from_regex(r"X-[A-Za-z0-9\-]{1,20}", fullmatch=True)
VALUES = st.from_regex(r"[ -~]{0,40}", fullmatch=True).map(str.strip)
FIELDS = st.lists(st.tuples(NAMES, VALUES), max_size=8)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, list[tuple[str, str]], bytes, bool]:
    """(wire bytes, status, extra fields, body, framed) of a response, framed one of three ways."""
    status = draw(st.sampled_from([200, 201, 400, 429, 500, 503]))
    fields = draw(FIELDS)
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    head = b"HTTP/1.1 %d Reason Phrase\r\n" % status
    head += b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)
    if framing == "length":
        wire = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 700), min_size=1, max_size=5))
        wire = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    else:
        wire = head + b"\r\n" + body
    return wire, status, fields, body, framing != "close"


def cut(wire: bytes, points: list[int]) -> list[bytes]:
    at = sorted({p % (len(wire) + 1) for p in points})
    return [wire[a:b] for a, b in zip([0, *at], [*at, len(wire)], strict=True)]


@given(responses(), st.lists(st.integers(0, 10_000), max_size=30))
def test_any_response_cut_anywhere_reads_the_same(
    response: tuple[bytes, int, list[tuple[str, str]], bytes, bool], points: list[int]
) -> None:
    wire, status, fields, body, framed = response
    reader, read_body = read(cut(wire, points), closed=not framed)
    assert reader.head is not None and reader.head.status == status
    assert reader.head.fields[: len(fields)] == tuple((n.lower(), v) for n, v in fields)
    assert read_body == body and reader.complete and reader.reusable is framed


@given(responses(), st.integers(1, 10_000))
def test_a_response_cut_short_is_never_taken_for_whole(
    response: tuple[bytes, int, list[tuple[str, str]], bytes, bool], short: int
) -> None:
    wire, _, _, _, framed = response
    shortened = wire[: max(0, len(wire) - short)]
    if not framed:
        return  # read to the connection's end: any end is its end
    with pytest.raises(HTTPFramingError):
        read([shortened])


@given(
    st.lists(st.integers(1, MAX_LINE_BYTES + 40), min_size=1, max_size=12),
    st.lists(st.integers(0, 200_000), max_size=12),
)
def test_a_head_is_read_within_the_limits_and_refused_past_them_however_cut(
    lengths: list[int], points: list[int]
) -> None:
    """Whatever the cuts: a head within ``MAX_HEAD_BYTES`` whose fields are each within
    ``MAX_LINE_BYTES`` is read; past either, it is refused with the error naming which."""
    names = [b"X-%d: " % n for n in range(len(lengths))]
    fields = [
        name + b"v" * max(0, size - len(name)) for name, size in zip(names, lengths, strict=True)
    ]
    head = b"HTTP/1.1 204 No Content\r\n" + b"".join(field + b"\r\n" for field in fields)
    reader = ResponseReader()
    if len(head) - 2 > MAX_HEAD_BYTES:
        said = f"a response head over {MAX_HEAD_BYTES} bytes"
    elif any(len(field) > MAX_LINE_BYTES for field in fields):
        said = "a header field of"
    else:
        for piece in cut(head + b"\r\n", points):
            reader.feed(piece)
        assert reader.complete and reader.head is not None
        assert len(reader.head.fields) == len(fields)
        return
    with pytest.raises(HTTPFramingError, match=said):
        for piece in cut(head + b"\r\n", points):
            reader.feed(piece)


# --- request ------------------------------------------------------------------------------


def test_a_form_is_the_fields_as_the_sdk_writes_them() -> None:
    body = {"model": "m", "stream": True, "include": ["logprobs"], "temperature": 0.5}
    assert form_fields(body) == [
        ("model", "m"), ("stream", "true"), ("include[]", "logprobs"), ("temperature", "0.5")
    ]  # fmt: skip
    with pytest.raises(TypeError, match="form field 'x': dict is not text, a number or bool"):
        form_fields({"x": {}})


def test_a_multipart_body_is_httpx_own_byte_for_byte() -> None:
    fields = [("model", "gpt"), ("prompt", 'say "hi"\\ \x01 é'), ("include[]", "logprobs")]
    wav = bytes(range(256)) * 4
    ours = multipart_body(fields, [FormFile("file", "utterance.wav", "audio/wav", wav)], "b0")
    request = httpx2.Request(
        "POST",
        "http://x/",
        data=dict(fields),
        files=[("file", ("utterance.wav", wav, "audio/wav"))],
        headers={"Content-Type": "multipart/form-data; boundary=b0"},
    )
    assert ours == request.read()


def test_header_lines_refuse_what_would_break_the_framing() -> None:
    assert header_lines([(b"A", b"b")]) == b"A: b\r\n"
    with pytest.raises(ValueError, match="cannot be sent as it is"):
        header_lines([(b"A", b"b\r\nInjected: 1")])
    with pytest.raises(ValueError, match="cannot be sent as it is"):
        header_lines([(b"A B", b"c")])
