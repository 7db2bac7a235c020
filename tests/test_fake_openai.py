"""The fake OpenAI server's own shortcuts give what their slow references give: the plain
multipart split against the e-mail parser on the forms a client library writes, the cached
tone against the sample-by-sample one."""

import array
import math

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.fake_openai import (
    SPEECH_SAMPLES_PER_WORD,
    _multipart_fields,
    _parsed_multipart_fields,
    _plain_multipart_fields,
    speech_pcm,
)

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_[]", min_size=1, max_size=30)


def encoded(data: dict[str, str], file: bytes, boundary: str | None = None) -> httpx.Request:
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"} if boundary else {}
    request = httpx.Request(
        "POST",
        "http://127.0.0.1/v1/audio/transcriptions",
        data=data,
        files={"file": ("utterance.wav", file, "audio/wav")},
        headers=headers,
    )
    request.read()
    return request


@settings(max_examples=200, deadline=None)
@given(
    data=st.dictionaries(NAMES.filter(lambda name: name != "file"), st.text(max_size=200)),
    file=st.binary(max_size=4096),
)
def test_a_client_librarys_form_splits_as_the_email_parser_reads_it(
    data: dict[str, str], file: bytes
) -> None:
    request = encoded(data, file)
    content_type, body = request.headers["content-type"], request.content
    plain = _plain_multipart_fields(content_type, body)
    assert plain is not None, body[:300]
    assert plain == _parsed_multipart_fields(content_type, body)
    assert plain == {**{k: v.encode() for k, v in data.items()}, "file": file}


def test_a_form_the_split_does_not_know_goes_to_the_email_parser() -> None:
    content_type = "multipart/form-data; boundary=b0"
    body = (
        b"--b0\r\nContent-Disposition: form-data; name=model\r\n"  # the name unquoted
        b"Content-Transfer-Encoding: base64\r\n\r\nd2hpc3Blci0x\r\n--b0--\r\n"
    )
    assert _plain_multipart_fields(content_type, body) is None
    assert _multipart_fields(content_type, body) == {"model": b"whisper-1"}


def test_a_body_without_its_closing_delimiter_is_not_split() -> None:
    request = encoded({"model": "whisper-1"}, b"RIFF", boundary="b0")
    cut = request.content[: -len(b"--b0--\r\n")]
    assert _plain_multipart_fields("multipart/form-data; boundary=b0", cut) is None
    assert _plain_multipart_fields("text/plain", request.content) is None


def test_the_speech_tone_is_the_sample_by_sample_tone() -> None:
    for text in ("one", "one two three", "  ", "a b c d e f g h i j k"):
        count = SPEECH_SAMPLES_PER_WORD * max(1, len(text.split()))
        reference = array.array(
            "h", (int(8000 * math.sin(2 * math.pi * 440 * n / 24_000)) for n in range(count))
        ).tobytes()
        assert speech_pcm(text) == reference
