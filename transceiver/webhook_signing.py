"""Signed webhooks: the policy, the signature and its check, the pause between attempts.

Policy and protocol layer (pure). ``webhooks`` delivers; a receiver checks a delivery with
``verify`` (or its own few lines: the scheme is below). Every delivery of one event carries:

- ``X-Voicerelay-Webhook-Id``: the event's id, the same on every attempt (an idempotency key:
  a receiver that stored it already answers 2xx and stores nothing);
- ``X-Voicerelay-Webhook-Timestamp``: unix seconds when this attempt was signed;
- ``X-Voicerelay-Webhook-Signature``: ``v1=`` and the hex HMAC-SHA256, keyed with the shared
  secret, of ``<id>.<timestamp>.<body>`` (the body's exact bytes). A receiver recomputes it,
  compares in constant time, and refuses a timestamp far from its clock (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

ID_HEADER = "X-Voicerelay-Webhook-Id"
TIMESTAMP_HEADER = "X-Voicerelay-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Voicerelay-Webhook-Signature"
MIN_SECRET_CHARS = 16
SCHEME = "v1="


@dataclass(frozen=True)
class WebhookPolicy:
    """Where ``call.ended`` goes and how hard we try (``TRANSCEIVER_WEBHOOK_*``)."""

    url: str
    secret: str
    max_attempts: int = 8  # then the event is given up, logged and counted
    retry_first_s: float = 1.0  # the pause after the first failure; it doubles each time
    retry_max_s: float = 60.0
    timeout_s: float = 10.0  # one attempt, connect to answer
    max_pending: int = 1000  # events in the outbox (all transceivers'); more are dropped, counted
    # A claimed event not acknowledged by then is claimed again, by any transceiver (its sender
    # died mid-attempt); an event whose leg's writer died before it read the record back waits
    # as long before another sender builds its body from the record.
    claim_timeout_s: float = 60.0
    poll_s: float = 2.0  # how often a sender looks for events other transceivers left

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL {self.url!r}: must be http:// or https://")
        if len(self.secret) < MIN_SECRET_CHARS:
            raise ValueError(f"webhook secret: at least {MIN_SECRET_CHARS} characters")
        if self.max_attempts < 1 or self.max_pending < 1:
            raise ValueError("webhook: max_attempts and max_pending must be at least 1")
        if not 0 < self.retry_first_s <= self.retry_max_s or self.timeout_s <= 0:
            raise ValueError("webhook: need 0 < retry_first_s <= retry_max_s and timeout_s > 0")
        if self.claim_timeout_s <= self.timeout_s or self.poll_s <= 0:
            raise ValueError("webhook: need claim_timeout_s > timeout_s and poll_s > 0")

    def __repr__(self) -> str:  # never print the secret
        return f"WebhookPolicy(url={self.url!r}, max_attempts={self.max_attempts})"

    def pause_s(self, failed_attempts: int, jitter: float = 1.0) -> float:
        """The pause after ``failed_attempts`` failures: doubling from ``retry_first_s`` up to
        ``retry_max_s``, times ``jitter`` (0.5-1.0 from the caller spreads a fleet's retries)."""
        return min(self.retry_max_s, self.retry_first_s * 2.0 ** (failed_attempts - 1)) * jitter


def signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{event_id}.{timestamp}.".encode() + body
    return SCHEME + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signed_headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        ID_HEADER: event_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, event_id, timestamp, body),
        "Content-Type": "application/json",
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, now_s: float, tolerance_s: float = 300
) -> bool:
    """A receiver's check: the signature matches and the timestamp is within the tolerance.
    ``headers``: case-insensitive or lower-cased names."""
    lowered = {name.lower(): value for name, value in headers.items()}
    event_id = lowered.get(ID_HEADER.lower(), "")
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not event_id or not stamp.isdigit() or abs(now_s - int(stamp)) > tolerance_s:
        return False
    return hmac.compare_digest(given, signature(secret, event_id, int(stamp), body))
