"""How a crashed background loop is restarted: one frozen dataclass of pauses and limits.

Policy layer (pure). ``background`` applies it; ``config`` loads it from ``TRANSCEIVER_RESTART_*``
variables and their flags. The pause before a restart grows from ``first_s`` to ``max_s`` and
starts over once a run has lasted ``healthy_after_s``; ``failing_after_crashes`` crashes in a
row, none healthy, make a loop ``failing``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 60.0  # a run this long resets the pause and the crash streak
    failing_after_crashes: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"restart pauses: need 0 < first_s <= max_s, got {self}")
        if self.healthy_after_s <= 0 or self.failing_after_crashes < 1:
            raise ValueError(f"restart policy: healthy_after_s > 0 and 1+ crashes, got {self}")
