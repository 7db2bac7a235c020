"""Session state in Redis, so sessions survive their transceiver.

``connection`` reaches Redis (URL or Sentinel, as ``relay.wire.redis_config`` says); ``keys``
and ``scripts`` are the record's layout and its fenced Lua updates; ``sessions`` is the store
(claim, load, append, end); ``errors`` what it raises; ``write_behind`` queues writes
(``writes``, the records) while Redis is away; ``heartbeat`` renews leases; ``journal`` turns
one session's history into stored writes; ``catch_up`` stores the sessions begun while Redis
was away; ``health`` pings Redis; ``persistence`` is the facade a live session talks to;
``survival`` its policy as data; ``contracts`` the client contract a stored session speaks
(GPT-Live's config beside Realtime's);
``route_cache`` and ``route_publishing`` publish client routes for relays;
``sideband_directory`` where each session a sideband may attach to runs. ``call_records``
(keys, Lua, shapes) and ``call_log`` (the writer and the reads) keep a record of every call.
``rate_limits`` (the limits, token-bucket arithmetic and keys) and ``rate_limit_store`` (its
Lua run on Redis) are the rate limits every transceiver shares. ``secret_sessions`` keeps the
sessions of ``ek_`` client secrets too large to carry them, for as long as each secret lives.

May import: relay.wire, transceiver.background, transceiver.restarts, pipeline.providers
Pure: keys, errors, scripts, writes, survival, call_records, contracts, rate_limits
"""
