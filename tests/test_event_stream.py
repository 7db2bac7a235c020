"""Server-sent events cut into each event's data (``pipeline.event_stream``): the standard's
line ends, comments, fields and multi-line data, whatever pieces the body arrives in; and the
same data as the SDK's own decoder (``openai._streaming.SSEDecoder``) on streams of the shape
providers send."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from pipeline.event_stream import EventStreamReader

SIZED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read(*pieces: bytes) -> list[bytes]:
    reader = EventStreamReader()
    return [data for piece in pieces for data in reader.feed(piece)]


def every_split(body: bytes) -> list[list[bytes]]:
    """What ``body`` reads to when it arrives in two pieces, cut at each byte, and byte by byte."""
    cuts = [read(body[:cut], body[cut:]) for cut in range(len(body) + 1)]
    return [*cuts, read(*(body[at : at + 1] for at in range(len(body))))]


def test_each_data_line_is_one_event() -> None:
    assert read(b'data: {"a": 1}\n\ndata: [DONE]\n\n') == [b'{"a": 1}', b"[DONE]"]


def test_every_line_end_and_any_cut_read_the_same() -> None:
    for end in (b"\n", b"\r\n", b"\r"):
        body = b"data: one" + end + end + b"data: two" + end + end
        assert every_split(body) == [[b"one", b"two"]] * (len(body) + 2), end


def test_comments_other_fields_and_extra_blank_lines_are_read_past() -> None:
    body = b": keep-alive\n\nevent: delta\nid: 7\ndata: x\nretry: 10\n\n\n\n:\ndata:y\n\n"
    assert read(body) == [b"x", b"y"]  # no space after the colon: nothing to drop


def test_data_lines_join_with_a_newline_and_only_one_space_is_dropped() -> None:
    assert read(b"data: {\ndata:  1}\ndata\n\n") == [b"{\n 1}\n"]


def test_an_event_without_data_is_none() -> None:
    assert read(b"event: ping\n\n: comment\n\nid: 3\n\n") == []


def test_an_unfinished_event_is_held_and_dropped_at_the_end() -> None:
    reader = EventStreamReader()
    assert reader.feed(b"data: first\n\ndata: sec") == [b"first"]
    assert reader.feed(b"ond\n") == []
    assert reader.feed(b"\n") == [b"second"]
    assert reader.feed(b"data: never finished") == []


LINE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A stream of 0-8 events, each 1-3 data lines among comments and ``event`` lines, its
    lines ended by one of the three line ends; and the data the events carry."""
    lines: list[str] = []
    data: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        values = draw(st.lists(LINE_TEXT, min_size=1, max_size=3))
        extras = draw(st.lists(st.sampled_from([": ping", "event: delta", ":"]), max_size=2))
        space = draw(st.sampled_from(["", " "]))
        lines += [*extras, *(f"data:{space}{value}" for value in values), ""]
        data.append(
            "\n".join(value[1:] if not space and value[:1] == " " else value for value in values)
        )
    end = draw(LINE_ENDS)  # one for the stream: a CR's line then an empty LF's is one CRLF
    return "".join(line + end for line in lines).encode(), data


@SIZED
@given(streams(), st.lists(st.integers(1, 40), max_size=30))
def test_a_stream_reads_as_the_sdks_decoder_reads_it(
    stream: tuple[bytes, list[str]], sizes: list[int]
) -> None:
    body, data = stream
    pieces, at = [], 0
    for size in [*sizes, len(body)]:
        pieces.append(body[at : at + size])
        at += size
    ours = [event.decode() for event in read(*pieces)]
    sdks = [event.data for event in SSEDecoder().iter_bytes(iter(pieces))]
    assert ours == sdks == data
