"""The relay's counters: names, drop reasons and their slots in the shared counter array.

Pure. Each worker keeps plain ints and copies them every ~0.5 s into its own row of a
shared-memory array of uint64 (``ROW`` slots per worker) owned by the supervisor, which sums
the rows for ``/metrics``. No metrics library is touched on the hot path.
"""

from __future__ import annotations

# Why a datagram was dropped; each is a label value of relay_dropped_packets_total.
UFRAG_REASONS = ("length", "charset", "version", "key_id", "mac", "family", "port")
STUN_REASONS = (
    "stun_short",
    "stun_cookie",
    "stun_length",
    "stun_attribute",
    "no_integrity",
    "no_username",
    "username",
    "integrity",
)
DROP_REASONS: tuple[str, ...] = (
    "not_webrtc",
    "unknown_address",
    "unknown_transceiver",
    "rate_limited",
    "malformed_link",
    "unknown_link_source",
    "oversized",  # public socket: over relay.wire.header.MAX_PAYLOAD_BYTES
    "oversized_link",  # link socket: over relay.wire.header.MAX_LINK_DATAGRAM_BYTES
    *(f"bad_ufrag_{r}" for r in UFRAG_REASONS + STUN_REASONS),
)
DROP_INDEX = {reason: i for i, reason in enumerate(DROP_REASONS)}

# Slots of one worker's row.
READY = 0  # 1 once every socket is bound
TO_TRANSCEIVER_PACKETS = 1
TO_TRANSCEIVER_BYTES = 2
TO_CLIENT_PACKETS = 3
TO_CLIENT_BYTES = 4
ROUTES = 5  # a gauge: this worker's route table size
ROUTES_LEARNED = 6
HELLOS_SENT = 7
CONTROL_RECEIVED = 8
SEND_ERRORS = 9
ROUTE_CACHE_LOOKUPS = 10  # addresses asked of the Redis route cache
ROUTE_CACHE_HITS = 11  # ... answered with a configured transceiver's link
ROUTE_CACHE_MISSES = 12  # ... with no (usable) route
ROUTE_CACHE_ERRORS = 13  # ... not answered: Redis unavailable or too slow
ROUTE_CACHE_QUEUE_FULL = 14  # lookups not even queued (queue at its cap)
ROUTES_FROM_CACHE = 15  # routes installed from a cache hit
ROUTE_LOOKUP_CRASHES = 16  # the route-cache lookup task crashed (it is restarted)
TICKER_CRASHES = 17  # the worker's ticker crashed (it is restarted)
TRANSCEIVERS = 18  # a gauge: transceiver addresses this worker forwards to (relay.transceivers)
NAMES_UNRESOLVED = 19  # a gauge: RELAY_TRANSCEIVERS names whose last lookup failed
LOOKUPS_FAILED = 20  # lookups of those names that failed
TRANSCEIVERS_ADDED = 21  # addresses that became transceivers after the worker started
TRANSCEIVERS_REMOVED = 22  # addresses removed (gone from every answer, grace over, no route)
DISCOVERY_CRASHES = 23  # the lookup task crashed (it is restarted)
DROPS = 24  # DROP_REASONS follow, in order
ROW = DROPS + len(DROP_REASONS)

# Slots that are gauges, not counters: not carried over when a worker is replaced.
GAUGES = (READY, ROUTES, TRANSCEIVERS, NAMES_UNRESOLVED)
