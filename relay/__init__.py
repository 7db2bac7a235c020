"""voicerelay relay: a stateless UDP forwarder that routes WebRTC by the signed ICE ufrag.

Layers: protocol (``wire``, the contract with the transceivers; ``routing``, ``counters``,
``transceivers``: pure, no sockets or asyncio), I/O (``worker``, ``supervisor``, ``http``,
``route_lookup``, ``discovery``, ``restarts``: sockets, processes, uvloop, DNS, Redis;
``loop_lag``: event-loop stall watch, which the transceiver uses too; ``tracing``: spans of
route learning, only when ``OTEL_*`` asks) and policy (``config``;
``timing``, its timings as data). Nothing here imports the transceiver or the pipeline.

May import: (nothing of ours)
Pure: routing, counters, timing, transceivers
"""
