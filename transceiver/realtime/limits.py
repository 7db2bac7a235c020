"""A Realtime session's own timings and bounds, as data.

Policy layer (pure). ``transceiver.config`` loads it from ``TRANSCEIVER_REALTIME_*`` variables
and their flags; ``agents`` hands it through ``pipeline_agent`` to every ``RealtimeSession``.
Tests pass a short one where they want a short wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RealtimeLimits:
    lost_notice_s: float = 0.25  # an ending session lets its error event leave this long
    max_pending_events: int = 512  # server events kept until the client opens its channel
    item_audio_s: float = 60.0  # the items' audio kept for retrieve, across items (item_audio)
    item_audio_bytes: int = 64 * 1024 * 1024  # the same, across the process's sessions (0: none)
    # Transcript deltas joined on the data channel for at most this long (0: each as it comes;
    # ``delta_coalescing``).
    delta_coalesce_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.lost_notice_s < 0:
            raise ValueError(f"realtime limits: lost_notice_s must be 0 or above, got {self}")
        if self.max_pending_events < 1:
            raise ValueError(f"realtime limits: max_pending_events must be at least 1, got {self}")
        if self.item_audio_s < 0:
            raise ValueError(f"realtime limits: item_audio_s must be 0 or above, got {self}")
        if self.item_audio_bytes < 0:
            raise ValueError(f"realtime limits: item_audio_bytes must be 0 or above, got {self}")
        if self.delta_coalesce_ms < 0:
            raise ValueError(f"realtime limits: delta_coalesce_ms must be 0 or above, got {self}")
