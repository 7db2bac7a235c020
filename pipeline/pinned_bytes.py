"""Whether some bytes are one pinned file: its exact size (when pinned) and sha256.

Pure. Model files and recordings that come out of registry packages are checked with it
before they are used; each caller raises its own error with the text this gives.
"""

from __future__ import annotations

import hashlib


def mismatch(
    content: bytes, sha256: str, size_bytes: int | None = None, what: str = "file"
) -> str | None:
    """Why ``content`` is not the pinned ``what`` ("N bytes, the pinned file has M" or
    "sha256 X, the pinned file has Y"), or None when it is."""
    if size_bytes is not None and len(content) != size_bytes:
        return f"{len(content)} bytes, the pinned {what} has {size_bytes}"
    digest = hashlib.sha256(content).hexdigest()
    if digest != sha256:
        return f"sha256 {digest}, the pinned {what} has {sha256}"
    return None
