"""A user message's images: the ``input_image`` part checked (``transceiver.realtime.
image_urls``), refused by name for a model that sees none (a real session over the offline
rule-based agent), counted by the context window, and put in either OpenAI API's request
shape. End to end through the SDK: ``tests/test_realtime_session_fields.py``."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig
from pipeline.context_window import ContextWindow, estimated_tokens
from pipeline.engine import ConversationEngine
from pipeline.espeak_tts import EspeakTextToSpeech
from pipeline.knowledge import load_knowledge
from pipeline.local_agent import LocalRuleBasedAgent
from pipeline.openai_providers import message_param
from pipeline.openai_responses import input_items
from pipeline.pocketsphinx_stt import PocketsphinxSpeechToText
from pipeline.providers import ImagePart, Message
from transceiver.metrics import RealtimeMetrics
from transceiver.realtime.client_events import (
    ConversationItemCreate,
    EventError,
    UserText,
    parse_client_event,
)
from transceiver.realtime.image_urls import MAX_IMAGE_BYTES, image_bytes, image_part
from transceiver.realtime.policy import SessionPolicy
from transceiver.realtime.session import RealtimeSession

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARAM = "item.content[1].image_url"


def png_bytes(width: int = 1, height: int = 1) -> bytes:
    """A real PNG: ``width`` x ``height`` grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(height)))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def refusal(url: str) -> tuple[str, str, str | None]:
    with pytest.raises(EventError) as caught:
        image_bytes(url, PARAM)
    return caught.value.code, caught.value.message, caught.value.param


@settings(max_examples=40, deadline=None)
@given(size=st.integers(MAX_IMAGE_BYTES - 8, MAX_IMAGE_BYTES + 8), fill=st.binary(max_size=16))
def test_an_image_is_taken_up_to_its_bound_and_refused_by_name_beyond(
    size: int, fill: bytes
) -> None:
    body = (fill or b"\x00") * (size // max(1, len(fill)) + 1)
    data = (PNG_SIGNATURE + body)[:size]
    if size <= MAX_IMAGE_BYTES:
        assert image_bytes(data_url(data), PARAM) == ("image/png", data)
    else:
        code, message, param = refusal(data_url(data))
        assert (code, param) == ("image_too_large", PARAM)
        assert str(MAX_IMAGE_BYTES) in message


def test_a_bad_image_url_gets_its_own_error() -> None:
    png = png_bytes()
    cases = [
        ("https://example.com/cat.png", "must be a data URL"),
        ("data:image/png," + base64.b64encode(png).decode(), "data:<type>;base64,<data>"),
        ("data:image/png;base64", "data:<type>;base64,<data>"),
        (data_url(png, "image/bmp"), "image type 'image/bmp' is not taken"),
        (data_url(png, "image/svg+xml"), "image type 'image/svg+xml' is not taken"),
        ("data:image/png;base64,iVBO$$$=", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # unpadded
        (data_url(png, "image/jpeg"), "not those of image/jpeg"),
        (data_url(b"RIFF\x00\x00\x00\x00WAVE", "image/webp"), "not those of image/webp"),
        (data_url(b""), "not those of image/png"),
    ]
    for url, fragment in cases:
        code, message, param = refusal(url)
        assert (code, param) == ("invalid_value", PARAM), url
        assert fragment in message, (url, message)
    jpeg, gif = b"\xff\xd8\xff\xe0" + bytes(16), b"GIF89a" + bytes(16)
    webp = b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8)
    for data, mime in [(jpeg, "image/jpeg"), (gif, "image/gif"), (webp, "image/webp")]:
        assert image_bytes(data_url(data, mime.upper()), PARAM) == (mime, data)


def test_an_image_parts_fields_are_checked() -> None:
    url = data_url(png_bytes())
    assert image_part({"type": "input_image", "image_url": url}, "p.") == ImagePart(url, "auto")
    assert image_part({"image_url": url, "detail": "low"}, "p.") == ImagePart(url, "low")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"detail": "low"}, "missing_required_parameter", "p.image_url"),
        ({"image_url": 7}, "invalid_type", "p.image_url"),
        ({"image_url": url, "detail": "medium"}, "invalid_value", "p.detail"),
    ]
    for part, code, param in cases:
        with pytest.raises(EventError) as caught:
            image_part(part, "p.")
        assert (caught.value.code, caught.value.param) == (code, param), part


def _item_create(*parts: dict[str, Any]) -> str:
    item = {"type": "message", "role": "user", "content": list(parts)}
    return json.dumps({"type": "conversation.item.create", "item": item})


def test_a_user_item_keeps_its_words_and_images_in_order() -> None:
    url = data_url(png_bytes(2, 2))
    text = {"type": "input_text", "text": "What is this?"}
    event = parse_client_event(_item_create({"type": "input_image", "image_url": url}, text))
    assert isinstance(event, ConversationItemCreate)
    item = event.item
    assert isinstance(item, UserText)
    assert (item.text, item.images, item.first_image) == ("What is this?", (ImagePart(url),), 0)
    assert item.parts == (ImagePart(url), "What is this?")


def test_the_context_window_counts_an_image_by_its_detail() -> None:
    url = data_url(png_bytes())
    text = Message("user", "Look.")
    low, high = (
        Message("user", "Look.", images=(ImagePart(url, "low"),)),
        Message("user", "Look.", images=(ImagePart(url, "high"),)),
    )
    assert estimated_tokens(low) - estimated_tokens(text) == 85
    assert estimated_tokens(high) - estimated_tokens(text) == 765
    window = ContextWindow(budget_tokens=200, retention_ratio=0.5)
    history = [high, Message("assistant", "A grey square."), Message("user", "And now?")]
    assert window.view(history) == history[1:]  # the image alone is over the budget


def test_either_api_is_sent_the_text_then_the_images() -> None:
    url = data_url(png_bytes())
    message = Message("user", "What is this?", images=(ImagePart(url, "low"),))
    assert message_param(message) == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
        ],
    }
    assert input_items([message]) == [{
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": url, "detail": "low"},
        ],
    }]  # fmt: skip
    assert message_param(Message("user", "Hi.")) == {"role": "user", "content": "Hi."}


async def test_a_model_that_sees_no_images_refuses_one_by_name() -> None:
    config = EngineConfig(input_sample_rate_hz=16000, output_sample_rate_hz=24000)
    tts = EspeakTextToSpeech()
    llm = LocalRuleBasedAgent(load_knowledge())
    engine = ConversationEngine(
        config, PocketsphinxSpeechToText(), llm, tts, classify=lambda _: False
    )
    policy = SessionPolicy(config, voices=tts.voices)
    session = RealtimeSession(
        engine, policy, policy.initial(None), RealtimeMetrics(CollectorRegistry())
    )
    await session.start()
    try:
        text = {"type": "input_text", "text": "What is this?"}
        image = {"type": "input_image", "image_url": data_url(png_bytes())}
        session.on_message(_item_create(text, image))
        session.on_message(_item_create(text))
        given = {"type": "message", "role": "user", "content": [image]}
        response = {"conversation": "none", "input": [given]}
        session.on_message(json.dumps({"type": "response.create", "response": response}))
        sent = list(session._pending)
    finally:
        await session.aclose()
    errors = [event["error"] for event in sent if event["type"] == "error"]
    assert [(e["code"], e["param"]) for e in errors] == [
        ("invalid_value", "item.content[1].type"), ("invalid_value", "response.input")
    ]  # fmt: skip
    for error in errors:
        assert llm.name in error["message"] and "takes no images" in error["message"], error
    assert [m.content for m in engine.history] == ["What is this?"]  # the text item alone
