"""Route cache: which transceiver link serves a client address, in Redis with a TTL.

A relay that meets an unknown client address (after a restart, or a load-balancer re-hash)
may ask this cache, off its hot path, instead of waiting for the client's next STUN check.
Transceivers publish ``client ip:port -> link ip:port`` when a session connects, refresh it on
a cadence and withdraw it when the session ends (``route_publishing``); relays read it with
one MGET per batch (``relay.route_lookup``).

The pure record format (``route_key``, ``encode_route``, ``decode_route``) lives in
``relay.wire.route_record``, beside the relay's other wire formats; this module is the transceiver's
writes: ``RouteCache``.

Key: ``P:route:1.2.3.4:5000`` or ``P:route:[2001:db8::1]:5000`` (IPv4-mapped IPv6 addresses
are written as IPv4, as the relay's link header decodes them). Value: ``1 <link ip> <port>``
(a version, then the link address). Routes are independent keys: no hash tag.
"""

from __future__ import annotations

from collections.abc import Mapping

from redis.asyncio import Redis

from relay.wire.route_record import encode_route, route_key
from transceiver.store.connection import unavailable_as_store_error

Address = tuple[str, int]

# Delete only a route that still names this link: never another transceiver's newer one.
_WITHDRAW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RouteCache:
    def __init__(self, redis: Redis, prefix: str, ttl_s: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._withdraw = redis.register_script(_WITHDRAW)

    async def publish_many(self, routes: Mapping[Address, Address]) -> None:
        """Set (or refresh) many routes in one round trip."""
        if not routes:
            return
        with unavailable_as_store_error("route publish"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for client, link in routes.items():
                    pipe.set(route_key(self._prefix, client), encode_route(link), px=self._ttl_ms)
                await pipe.execute()

    async def withdraw(self, client: Address, link: Address) -> bool:
        """Delete the route if it still names ``link``; True if it was deleted."""
        key = route_key(self._prefix, client)
        with unavailable_as_store_error("route withdraw"):
            return bool(await self._withdraw(keys=[key], args=[encode_route(link)]))
