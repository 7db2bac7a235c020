"""The error a client event, or a session config, gets when it cannot be accepted.

Pure protocol layer. ``EventError`` carries OpenAI's ``code`` and ``param``; the session sends
it back as an ``error`` server event (the HTTP endpoints as a 4xx JSON body), and goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class EventError(ValueError):
    """A client event that cannot be accepted; becomes an ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def refuse_unknown(obj: Mapping[str, Any], keys: frozenset[str], path: str) -> None:
    """``unknown_parameter`` naming the first key of ``obj`` (at ``path``) not in ``keys``."""
    for key in obj:
        if key not in keys:
            name = f"{path}{key}"
            raise EventError("unknown_parameter", f"Unknown parameter: '{name}'.", name)


def json_object(value: Any, path: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else ``invalid_type`` on ``path``."""
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{path} must be an object", path)
    return value
