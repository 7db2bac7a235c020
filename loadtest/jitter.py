"""When a delayed packet may go: a base delay plus uniform jitter, in order per direction. Pure.

``tc netem delay 40ms 8ms`` draws each packet's delay from 32..48 ms and, at 50 packets a
second, lets a packet overtake the one before it. Paths on the Internet jitter without
reordering a flow (one queue per hop), so here a packet never leaves before the one queued
before it in the same direction: its release time is its own draw or the previous release,
whichever is later. The draws come from a seeded generator, so a run can be repeated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class JitterPolicy:
    delay_ms: float
    jitter_ms: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(f"jitter {self.jitter_ms} ms must be in 0..delay ({self.delay_ms} ms)")


class JitterSchedule:
    """Release times (seconds, the caller's clock) of packets held per direction."""

    def __init__(self, policy: JitterPolicy) -> None:
        self.policy = policy
        self._random = random.Random(policy.seed)
        self._last_release_s: dict[int, float] = {}

    def release_at_s(self, direction: int, arrived_s: float) -> float:
        """When a packet that arrived at ``arrived_s`` going ``direction`` may be released."""
        spread_ms = self._random.uniform(-self.policy.jitter_ms, self.policy.jitter_ms)
        drawn_s = arrived_s + (self.policy.delay_ms + spread_ms) / 1000
        release_s = max(drawn_s, self._last_release_s.get(direction, drawn_s))
        self._last_release_s[direction] = release_s
        return release_s
