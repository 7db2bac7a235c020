"""The link's timings and bounds as data: worker choice, forgetting, relay trust, ICE rechecks.

Policy layer (pure). ``transceiver.config`` loads it from ``TRANSCEIVER_LINK_*`` variables and
their flags; ``python -m transceiver`` hands it to the ``Link``, which passes each value on to
``KeyedRelays`` and its housekeeping loop, and the relayed ICE agents (``ice``) read it from the
link they run on. Tests pass a short policy where they want a short wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkPolicy:
    # Answer through the worker that last forwarded a session's packets if heard this recently;
    # otherwise through the most recently heard worker.
    heard_window_s: float = 3.0
    worker_forget_s: float = 30.0  # a worker not heard for this long is forgotten
    transaction_ttl_s: float = 40.0  # a sent STUN request's id routes its answer this long
    max_transactions: int = 65_536  # STUN transactions remembered, in all (oldest goes first)
    max_clients_per_session: int = 16  # client addresses one session may learn
    housekeeping_interval_s: float = 1.0  # forgetting runs this often
    # A relay whose last good HELLO is older than this is no longer heard (a relay worker sends
    # one a second).
    keyed_ttl_s: float = 30.0
    max_rechecks: int = 16  # ICE checks resent per connection; those that matter come first
    # Datagrams moved per system call (sendmmsg/recvmmsg); 1: one sendto/recvfrom each.
    io_batch: int = 64
    # A readable socket is read at once, then not again before this interval, as long as each
    # read finds datagrams: a busy link costs a loop wake per interval, not one per datagram
    # (``loadtest.link_cost``), for at most this much delay. 0: read whenever readable. Not
    # longer: what one read brings is handled in one go on the loop, and everything else on it
    # (a turn's provider requests) waits behind it; at 45 lean calls with turns, 10 ms doubled
    # the loop's mean lag (9.7-15 ms against 4.5-5.2) and the server's window p95 (560-1000 ms
    # against 380-470) for ~the same CPU (the voice knee, A/B/A/B).
    read_interval_s: float = 0.002
    # Datagrams waiting to be sent (the socket's buffer full); more are dropped and counted.
    max_queued_datagrams: int = 4096

    def __post_init__(self) -> None:
        times = ("heard_window_s", "worker_forget_s", "transaction_ttl_s")
        for name in (*times, "housekeeping_interval_s", "keyed_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"link policy: {name} must be above 0, got {self}")
        for name in ("max_transactions", "max_clients_per_session", "io_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"link policy: {name} must be at least 1, got {self}")
        if self.max_queued_datagrams < 1:
            raise ValueError(f"link policy: max_queued_datagrams must be at least 1, got {self}")
        if not 0 <= self.read_interval_s <= 1:
            raise ValueError(f"link policy: read_interval_s must be 0 to 1, got {self}")
        if self.max_rechecks < 0:
            raise ValueError(f"link policy: max_rechecks must be at least 0, got {self}")
