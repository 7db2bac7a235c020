"""The error a client event, or a session config, gets when it cannot be accepted.

Pure protocol layer. ``EventError`` carries OpenAI's ``code`` and ``param``; the session sends
it back as an ``error`` server event (the HTTP endpoints as a 4xx JSON body), and goes on.
"""

from __future__ import annotations


class EventError(ValueError):
    """A client event that cannot be accepted; becomes an ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
