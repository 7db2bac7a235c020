"""The relay⇄transceiver wire contract: everything both sides must agree on, byte for byte.

``ufrag`` (the signed ICE username fragment that names a transceiver, and the ICE password
derived from it), ``header`` (the 20-byte link header and its control messages), ``hello`` (the
keyed HELLO a relay worker proves the keyring with), ``stun`` (the STUN peek: which kind of
packet, which ufrag), ``route_record`` (the Redis route cache's keys and values),
``redis_config`` (where that Redis is and how it is reached, read alike by both sides). Pure: bytes
and dataclasses in, decisions out; no sockets, asyncio or Redis. The transceiver imports it as
the documented contract; the relay's own modules build on it.

May import: (nothing of ours)
Pure: ufrag, header, hello, stun, route_record, redis_config
"""
