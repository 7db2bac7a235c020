"""JSON text from outside (a client event, a request body, a client tool's output, a model's
tool arguments), decoded with limits.

Pure protocol layer. ``json.loads`` alone is not safe on such text: ``'[' * 1000`` raises
``RecursionError`` (not ``ValueError``), a nesting just under the interpreter's limit decodes
but then cannot be encoded again further down the stack, ``NaN``/``Infinity`` decode into values
that no other JSON reader accepts when we echo them, and a lone surrogate escape (``"\\ud800"``)
decodes into a string that cannot be encoded as UTF-8 (so it could never be stored). ``decode``
answers each of these, and every syntax error, with one ``JsonInputError`` (a ``ValueError``)
whose message names the problem, so every boundary gives it its normal error.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # arrays and objects inside each other; a tool's JSON schema needs about 10
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonInputError(ValueError):
    """Text that is not JSON we accept; the message says why."""


def decode(text: str | bytes) -> Any:
    """The JSON value of ``text``, or JsonInputError naming the problem."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise JsonInputError(f"nested deeper than {MAX_DEPTH} levels") from None
    except JsonInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JsonInputError(exc.msg) from None
    except ValueError as exc:  # UnicodeDecodeError, an over-long integer
        raise JsonInputError(str(exc)) from None
    if _openers(text) > MAX_DEPTH or _has_surrogate_escape(text):
        _check(value)
    return value


def _refuse_constant(name: str) -> Any:
    raise JsonInputError(f"{name} is not a JSON number")


def _openers(text: str | bytes) -> int:
    """How many arrays and objects ``text`` could open: a bound on its depth."""
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def _has_surrogate_escape(text: str | bytes) -> bool:
    if isinstance(text, str):
        return _SURROGATE_ESCAPE.search(text) is not None
    return _SURROGATE_ESCAPE_BYTES.search(text) is not None


def _check(value: Any) -> None:
    """Walk the value without recursion: depth within MAX_DEPTH, every string UTF-8 text."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _utf8(node)
        elif isinstance(node, dict | list):
            if depth > MAX_DEPTH:
                raise JsonInputError(f"nested deeper than {MAX_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
            if isinstance(node, dict):
                stack.extend((key, depth) for key in node)


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"U+{ord(text[exc.start]):04X}"
        raise JsonInputError(f"a string holds a lone surrogate ({where}), not text") from None
