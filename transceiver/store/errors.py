"""What can go wrong with the session store and the route cache.

Protocol layer (pure). Every error carries ``retryable``: ``True`` means the same call may succeed
later unchanged (Redis unreachable, replicas lagging); ``False`` means retrying is pointless
(this transceiver lost the session, the session does not exist). Lua scripts refuse a write with
an error reply whose first word is a code; ``from_script_error`` turns it into the typed error.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every session-store and route-cache error."""

    retryable = False


class StoreUnavailableError(StoreError):
    """Redis is unreachable, timed out, is loading, or is a read-only (demoted) primary."""

    retryable = True


class ReplicationError(StoreError):
    """The write was applied on the primary but fewer replicas than required acknowledged it.

    Retrying is safe (every write is idempotent, and a repeated claim only mints a newer token)
    and re-issues the WAIT; the caller decides whether to retry, queue or accept.
    """

    retryable = True

    def __init__(self, replicas_acked: int, replicas_required: int) -> None:
        super().__init__(
            f"{replicas_acked} of {replicas_required} required replicas acknowledged the write"
        )
        self.replicas_acked = replicas_acked
        self.replicas_required = replicas_required


class StaleOwnerError(StoreError):
    """The write carried a fencing token that is no longer the session's current one."""

    def __init__(self, session_id: str, token: int, current: str) -> None:
        shown = current or "none (released)"
        super().__init__(f"session {session_id}: token {token} is stale, current token {shown}")
        self.session_id = session_id
        self.token = token


class LeaseHeldError(StoreError):
    """A claim was refused: another owner's lease is still live (use ``force`` on failover)."""

    def __init__(self, session_id: str, holder: str, remaining_ms: int) -> None:
        super().__init__(
            f"session {session_id}: owned by {holder!r}, lease live for {remaining_ms} ms"
        )
        self.session_id = session_id
        self.holder = holder
        self.remaining_ms = remaining_ms


class SessionNotFoundError(StoreError):
    """No such session (never created, ended, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} does not exist")
        self.session_id = session_id


class SessionEndedError(StoreError):
    """The session was ended (its caller hung up): it can never be claimed or written again."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} has ended")
        self.session_id = session_id


class SessionExistsError(StoreError):
    """``create`` for a session id that is already stored."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} already exists")
        self.session_id = session_id


# Codes the Lua scripts put first in their error replies (session_scripts.py).
STALE_OWNER = "STALE_OWNER"
LEASE_HELD = "LEASE_HELD"
NO_SESSION = "NO_SESSION"
SESSION_EXISTS = "SESSION_EXISTS"
SESSION_ENDED = "SESSION_ENDED"


def from_script_error(message: str, session_id: str, token: int = 0) -> StoreError | None:
    """The typed error for a script's error reply, or ``None`` if it is not one of ours."""
    code, _, rest = message.partition(" ")
    if code == STALE_OWNER:
        return StaleOwnerError(session_id, token, rest)
    if code == LEASE_HELD:
        holder, _, remaining = rest.rpartition(" ")
        return LeaseHeldError(session_id, holder, int(remaining) if remaining.isdigit() else 0)
    if code == NO_SESSION:
        return SessionNotFoundError(session_id)
    if code == SESSION_EXISTS:
        return SessionExistsError(session_id)
    if code == SESSION_ENDED:
        return SessionEndedError(session_id)
    return None
