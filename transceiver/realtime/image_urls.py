"""A user message's ``input_image`` part (``conversation.item.create``): its ``image_url`` and
``detail``, checked before the image goes anywhere.

Pure. The image comes inline, as a data URL (``data:image/png;base64,...``): nothing here
fetches an image from elsewhere, so a URL of any other scheme is refused. Its type is one
OpenAI's vision models take (PNG, JPEG, WebP, GIF), its data base64 that decodes, and its
bytes start as that type's do (a mislabelled or truncated upload is caught here, not as the
model's error later). Its size is bounded by ``MAX_IMAGE_BYTES`` decoded, so its data URL fits
in one client event (``client_events.MAX_EVENT_BYTES``, 256 KiB, also WebRTC's data-channel
message) beside the rest of the item. The length of the base64 text is checked before it is
decoded, so an oversized one costs no decoding.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from pipeline.providers import IMAGE_DETAILS, ImagePart
from transceiver.realtime.event_errors import EventError

MAX_IMAGE_BYTES = 180 * 1024  # decoded; its base64 is 240 KiB, within a 256 KiB event
MAX_BASE64_CHARS = -(-MAX_IMAGE_BYTES // 3) * 4

# Each type OpenAI's vision input takes, and how its bytes start.
IMAGE_SIGNATURES: Mapping[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),  # and "WEBP" at bytes 8..12 (``_looks_like``)
}


def image_part(part: Mapping[str, Any], path: str) -> ImagePart:
    """An ``input_image`` part at ``path`` (e.g. ``item.content[1].``), checked."""
    url, param = part.get("image_url"), path + "image_url"
    if url is None:
        raise EventError("missing_required_parameter", f"missing {param}", param)
    if not isinstance(url, str):
        raise EventError("invalid_type", f"{param} must be a string", param)
    detail = part.get("detail", "auto")
    if detail not in IMAGE_DETAILS:
        message = f"invalid detail {detail!r}; expected one of {', '.join(IMAGE_DETAILS)}"
        raise EventError("invalid_value", message, path + "detail")
    image_bytes(url, param)
    return ImagePart(url, detail)


def image_bytes(url: str, param: str) -> tuple[str, bytes]:
    """The image's type and bytes; EventError on ``param`` saying what is wrong with it."""
    if not url.startswith("data:"):
        message = "image_url must be a data URL (data:image/png;base64,...): no image is fetched"
        raise EventError("invalid_value", message, param)
    header, comma, data = url[len("data:") :].partition(",")
    mime, _, encoding = header.partition(";")
    mime = mime.strip().lower()
    if not comma or encoding.strip().lower() != "base64":
        raise EventError("invalid_value", "image_url must be data:<type>;base64,<data>", param)
    if mime not in IMAGE_SIGNATURES:
        taken = ", ".join(IMAGE_SIGNATURES)
        raise EventError("invalid_value", f"image type {mime!r} is not taken; use {taken}", param)
    return mime, _decoded(mime, data, param)


def _decoded(mime: str, data: str, param: str) -> bytes:
    if len(data) > MAX_BASE64_CHARS:
        message = f"the image is over {MAX_IMAGE_BYTES} bytes ({len(data)} base64 characters)"
        raise EventError("image_too_large", message, param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise EventError("invalid_value", "the image's data is not valid base64", param) from None
    if len(raw) > MAX_IMAGE_BYTES:
        message = f"the image is over {MAX_IMAGE_BYTES} bytes ({len(raw)})"
        raise EventError("image_too_large", message, param)
    if not _looks_like(mime, raw):
        raise EventError("invalid_value", f"the image's bytes are not those of {mime}", param)
    return raw


def _looks_like(mime: str, raw: bytes) -> bool:
    if not raw.startswith(IMAGE_SIGNATURES[mime]):
        return False
    return mime != "image/webp" or raw[8:12] == b"WEBP"
