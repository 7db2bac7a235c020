"""What keeps sessions alive across failures, as data: leases, health, queues, catch-up.

Policy layer (pure). ``config`` loads it from ``TRANSCEIVER_*`` variables and their flags;
``python -m transceiver`` hands it to ``persistence`` and ``route_publishing``, which pass each
value to the loop that uses it. Tests pass a short policy where they want a short wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transceiver.restarts import RestartPolicy
from transceiver.store.call_records import CallRecordPolicy


@dataclass(frozen=True)
class SurvivalPolicy:
    lease_s: float = 6.0  # a SIGKILLed owner's lease lapses in this long (resume forces anyway)
    health_interval_s: float = 1.0  # Redis is pinged, and catch-up runs, this often
    max_pending_writes: int = 200  # session writes queued while Redis is away, in all
    max_pending_routes: int = 10_000  # route changes kept between two publishing wake-ups
    route_flush_timeout_s: float = 1.0  # at exit, withdrawing routes may take this long
    # A session's stored images (their data URLs) together; the oldest beyond it are dropped
    # (``journal.kept_images``). 2 MiB: eight images of the largest a client may send.
    session_image_bytes: int = 2 * 1024 * 1024
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    records: CallRecordPolicy = field(default_factory=CallRecordPolicy)  # what calls leave

    def __post_init__(self) -> None:
        for name in ("lease_s", "health_interval_s", "route_flush_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"survival policy: {name} must be above 0, got {self}")
        if self.session_image_bytes < 0:
            raise ValueError(f"survival policy: session_image_bytes must be >= 0, got {self}")
        if self.max_pending_writes < 1 or self.max_pending_routes < 1:
            raise ValueError(f"survival policy: queue bounds must be at least 1, got {self}")
