"""Where a request for a session goes when the process it lands on does not run it.

I/O layer (the directory is Redis). The names a forwarded request's hop is signed for: the
endpoint's kind and the target's id, and the hop's stage (``BETWEEN_TRANSCEIVERS`` or
``WITHIN_POD``).
"""

from __future__ import annotations

from dataclasses import dataclass

BETWEEN_TRANSCEIVERS, WITHIN_POD = "", ":pod"  # a hop's stage, the end of what it signs


@dataclass(frozen=True)
class Kind:
    """What one endpoint calls its target, and the query parameters it takes."""

    name: str  # "realtime" or "live": the hop's signed target is "<name>:<id>"
    not_found: str  # the 404's code
    param: str  # the parameter that names the target
    query: frozenset[str]


REALTIME = Kind("realtime", "call_not_found", "call_id", frozenset({"call_id", "model"}))
LIVE = Kind("live", "session_not_found", "session_id", frozenset({"graceful_close"}))


def _signed(kind: Kind, target_id: str, stage: str) -> str:
    """What a hop's header signs: the endpoint, the session and the hop's stage."""
    return f"{kind.name}:{target_id}{stage}"
