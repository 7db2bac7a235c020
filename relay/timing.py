"""The relay's timings as data: one frozen ``RelayTiming``, carried by ``RelayConfig.timing``.

Policy layer (pure). ``relay.config`` loads it from ``RELAY_*`` variables and their flags
(``--hello-interval-s`` <-> ``RELAY_HELLO_INTERVAL_S``); the supervisor, the workers, their
restarted tasks and the route-cache lookups are handed it, so nothing reads a module constant
at run time and a test can pass a short one. The defaults are the values the relay was built
and measured with.

The worker's ticker wakes every ``clock_interval_s`` (the resolution of a route's "last seen"
stamp) and, when their interval has passed, publishes counters, sends HELLOs and expires idle
routes; so those intervals are in effect rounded up to a multiple of ``clock_interval_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class RestartPauses:
    """How a worker's crashed task is restarted: a pause from ``first_s`` doubling up to
    ``max_s``, starting over once a run lasted ``healthy_after_s``."""

    first_s: float = 0.5
    max_s: float = 30.0
    healthy_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s or self.healthy_after_s <= 0:
            raise ValueError(f"restart pauses: need 0 < first_s <= max_s, got {self}")

    def delay_s(self, in_a_row: int) -> float:
        """The pause before the restart after ``in_a_row`` crashes without a healthy run."""
        return min(self.max_s, self.first_s * 2.0 ** (in_a_row - 1))


@dataclass(frozen=True)
class RelayTiming:
    hello_interval_s: float = 1.0  # keyed HELLO to every transceiver
    # A worker asks for ROUTES in its HELLOs for its first ``routes_request_s`` only (restart
    # recovery). Each answer names every client of the transceiver: asking every second made
    # every worker re-learn the whole fleet's routes each second (0.8 of a core at 100,000
    # sessions in the relay load test); with a once-a-minute refresh instead, the interval of
    # the refresh showed a 1 s RTT p99 (100,000 routes learned at once). Later clients are
    # learned from their own STUN, the transceiver's outbound media, or the Redis route cache.
    routes_request_s: float = 10.0
    publish_interval_s: float = 0.5  # a worker's counters into the shared array
    expiry_interval_s: float = 1.0  # idle routes, STUN rate buckets, lookup admissions swept
    clock_interval_s: float = 0.25  # the ticker's period: resolution of "last seen"
    lookup_retry_s: float = 1.0  # one route-cache lookup per unknown source per this long
    ready_timeout_s: float = 30.0  # every worker bound, or the relay exits 1
    stop_timeout_s: float = 5.0  # SIGTERM to SIGKILL for workers at exit
    watch_interval_s: float = 0.1  # supervisor's poll of worker exits while starting, stopping
    respawn_pause_s: float = 0.5  # supervisor's poll of worker deaths while serving
    # RELAY_TRANSCEIVERS names (a headless Service, say) are looked up again this often, and
    # sooner (at most once a second) when a client names a transceiver the worker does not know.
    transceivers_refresh_s: float = 5.0
    # An address no answer names any more stays a transceiver this long, and longer while a
    # route of the worker still points to it (relay.transceivers explains why).
    transceivers_grace_s: float = 60.0
    restarts: RestartPauses = field(default_factory=RestartPauses)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, (int, float)) and not value > 0:
                raise ValueError(f"relay timing: {item.name} must be above 0, got {value}")
