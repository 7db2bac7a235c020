"""The local deployment: what ``make run``, the tests and the benchmarks start on one machine.

``local`` is the ``make run`` launcher (Redis, relay, transceivers, front door; prints the URL)
and ``launched`` drives it from tests and benchmarks;
``front_door`` (with ``http_wire``, and ``websocket_wire`` and ``websocket_tunnel`` for the
WebSockets it carries) is the local stand-in for the Kubernetes signalling Service;
``processes`` starts relay and transceiver processes and waits for them (``Stack``,
``Process``, a loopback relay shim); ``redis_server`` starts redis-server and Sentinel;
``waiting`` waits for a condition with a deadline;
``survival`` is the Redis-backed stack the resume tests and failover benchmarks share. The
container image and the Prometheus configuration live beside it (``Dockerfile``,
``prometheus.yml``).

May import: relay, transceiver, pipeline
"""
