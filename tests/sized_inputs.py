"""Hypothesis strategies for inputs at a boundary's real size limit, not a few hundred bytes.

``around(limit)``: sizes at, just under and just over a limit (the byte that decides).
``mutated(payload)``: a payload with a few bytes overwritten (its size kept, so a test still
knows which side of the limit it is on). ``padded_json(prefix, suffix, size)``: a valid JSON
text of exactly ``size`` bytes, the room between prefix and suffix filled with a string.
``nested_json(depth)``: arrays and objects inside each other, closed or not.
"""

from __future__ import annotations

import hashlib

from hypothesis import strategies as st


def around(limit: int, spread: int = 64) -> st.SearchStrategy[int]:
    return st.sampled_from([limit - 1, limit, limit + 1]) | st.integers(
        limit - spread, limit + spread
    )


@st.composite
def mutated(draw: st.DrawFn, payload: bytes, max_changes: int = 8) -> bytes:
    data = bytearray(payload)
    if not data:
        return payload
    changes = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                            max_size=max_changes))  # fmt: skip
    for position, value in changes:
        data[position] = value
    return bytes(data)


def padded_json(prefix: str, suffix: str, size: int, *, varied: bool = False) -> bytes:
    """``prefix + '"xxx…"' + suffix`` of exactly ``size`` bytes (ASCII). ``varied`` pads with
    hex digits that do not repeat, so the string does not shrink when compressed."""
    room = size - len(prefix) - len(suffix) - 2
    if room < 0:
        raise ValueError(f"{size} bytes is too small for {prefix!r}…{suffix!r}")
    filler = _varied_hex(room) if varied else "x" * room
    return f'{prefix}"{filler}"{suffix}'.encode("ascii")


def _varied_hex(length: int) -> str:
    blocks = (hashlib.sha256(str(i).encode()).hexdigest() for i in range(length // 64 + 1))
    return "".join(blocks)[:length]


@st.composite
def nested_json(draw: st.DrawFn, max_depth: int) -> str:
    """Arrays and ``{"k": ...}`` objects ``depth`` deep; closed (valid JSON) or cut short."""
    depth = draw(st.integers(1, max_depth))
    kinds = draw(st.lists(st.booleans(), min_size=1, max_size=8))
    opens = [("[", "]") if kinds[i % len(kinds)] else ('{"k":', "}") for i in range(depth)]
    text = "".join(o for o, _ in opens) + "0" + "".join(c for _, c in reversed(opens))
    return text if draw(st.booleans()) else text[: draw(st.integers(0, len(text) - 1))]
