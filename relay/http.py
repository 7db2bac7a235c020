"""The relay's HTTP port: ``/metrics`` (Prometheus text), ``/livez``, ``/readyz``.

I/O layer. A tiny HTTP/1.1 responder on ``asyncio.start_server`` (one request per connection,
``Connection: close``): three GET endpoints do not need a framework. The metrics come from a
custom prometheus-client collector that reads the counters the workers publish into shared
memory, so no worker ever calls the metrics library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import counters as c

MAX_REQUEST_LINE_BYTES = 8192
MAX_HEADER_LINES = 100
REQUEST_TIMEOUT_S = 5.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (totals over every worker, per-worker rows, workers alive, worker restarts)
Snapshot = tuple[Sequence[int], Sequence[Sequence[int]], int, int]
Response = tuple[int, str, bytes]
_STATUS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class RelayCollector(Collector):
    """Prometheus metric families computed from a snapshot of the shared counters."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        totals, rows, alive, restarts = self.snapshot()
        yield _directional("relay_forwarded_packets", "Datagrams forwarded", totals, 1)
        yield _directional("relay_forwarded_bytes", "Payload bytes forwarded", totals, 2)
        drops = CounterMetricFamily(
            "relay_dropped_packets", "Datagrams dropped, by reason", labels=["reason"]
        )
        for i, reason in enumerate(c.DROP_REASONS):
            drops.add_metric([reason], totals[c.DROPS + i])
        yield drops
        yield _per_worker("relay_routes", "Route table entries", rows, c.ROUTES)
        yield from _transceivers(totals, rows)
        yield _counter("relay_routes_learned", "Routes learned", totals[c.ROUTES_LEARNED])
        yield _counter("relay_hellos_sent", "HELLO messages sent", totals[c.HELLOS_SENT])
        yield _counter("relay_control_received", "Control messages", totals[c.CONTROL_RECEIVED])
        yield _counter("relay_send_errors", "sendto failures", totals[c.SEND_ERRORS])
        yield _route_cache(totals)
        yield _counter(
            "relay_route_cache_queue_full",
            "Route cache lookups not queued (queue full)",
            totals[c.ROUTE_CACHE_QUEUE_FULL],
        )
        yield _counter(
            "relay_routes_from_cache", "Routes installed from cache", totals[c.ROUTES_FROM_CACHE]
        )
        yield _counter("relay_worker_restarts", "Workers restarted after dying", restarts)
        yield _task_crashes(totals)
        yield GaugeMetricFamily("relay_workers_alive", "Worker processes alive", value=alive)


def _per_worker(name: str, text: str, rows: Sequence[Sequence[int]], slot: int) -> Metric:
    family = GaugeMetricFamily(name, text, labels=["worker"])
    for index, row in enumerate(rows):
        family.add_metric([str(index)], row[slot])
    return family


def _transceivers(totals: Sequence[int], rows: Sequence[Sequence[int]]) -> Iterator[Metric]:
    """What each worker knows of RELAY_TRANSCEIVERS (relay.discovery, relay.transceivers)."""
    yield _per_worker(
        "relay_transceivers", "Transceiver addresses a worker forwards to", rows, c.TRANSCEIVERS
    )
    yield _per_worker(
        "relay_transceiver_names_unresolved",
        "RELAY_TRANSCEIVERS names whose last lookup failed (their last answer stands)",
        rows,
        c.NAMES_UNRESOLVED,
    )
    yield _counter(
        "relay_transceiver_lookup_failures",
        "Lookups of RELAY_TRANSCEIVERS names that failed, over all workers",
        totals[c.LOOKUPS_FAILED],
    )
    changes = CounterMetricFamily(
        "relay_transceiver_changes",
        "Transceiver addresses added to or removed from a worker's set, over all workers",
        labels=["change"],
    )
    changes.add_metric(["added"], totals[c.TRANSCEIVERS_ADDED])
    changes.add_metric(["removed"], totals[c.TRANSCEIVERS_REMOVED])
    yield changes


def _directional(name: str, text: str, totals: Sequence[int], offset: int) -> Metric:
    family = CounterMetricFamily(name, text, labels=["direction"])
    family.add_metric(["to_transceiver"], totals[c.TO_TRANSCEIVER_PACKETS - 1 + offset])
    family.add_metric(["to_client"], totals[c.TO_CLIENT_PACKETS - 1 + offset])
    return family


def _route_cache(totals: Sequence[int]) -> Metric:
    family = CounterMetricFamily(
        "relay_route_cache_lookups", "Unknown client addresses asked of Redis", labels=["result"]
    )
    for result, slot in (
        ("hit", c.ROUTE_CACHE_HITS),
        ("miss", c.ROUTE_CACHE_MISSES),
        ("error", c.ROUTE_CACHE_ERRORS),
    ):
        family.add_metric([result], totals[slot])
    return family


def _task_crashes(totals: Sequence[int]) -> Metric:
    family = CounterMetricFamily(
        "relay_task_crashes",
        "Worker tasks that crashed (each logged and restarted)",
        labels=["task"],
    )
    for task, slot in (
        ("route cache lookups", c.ROUTE_LOOKUP_CRASHES),
        ("ticker", c.TICKER_CRASHES),
        ("transceiver discovery", c.DISCOVERY_CRASHES),
    ):
        family.add_metric([task], totals[slot])
    return family


def _counter(name: str, text: str, value: int) -> Metric:
    return CounterMetricFamily(name, text, value=value)


class HttpEndpoints:
    """Maps a path to a response; ``ready`` says whether /readyz is 200 and ``status`` (when
    given) what its body says, either way."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        ready: Callable[[], bool],
        status: Callable[[], str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(snapshot))
        self.ready = ready
        self.status = status

    def respond(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, METRICS_CONTENT_TYPE, generate_latest(self.registry)
        if path == "/livez":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready = self.ready()
            said = "ready" if ready else "not ready"
            if self.status is not None:
                said = self.status()
            return (200 if ready else 503), "text/plain", f"{said}\n".encode()
        return 404, "text/plain", b"not found: try /metrics, /livez, /readyz\n"


async def handle_connection(
    endpoints: HttpEndpoints, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One request, one response, close. Malformed or slow requests get 400 or nothing."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            status, kind, body, head_only = await _read_and_route(endpoints, reader)
            writer.write(_encode(status, kind, b"" if head_only else body, len(body)))
            await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    except ValueError:  # a line longer than the reader's limit
        pass
    finally:
        writer.close()


async def _read_and_route(
    endpoints: HttpEndpoints, reader: asyncio.StreamReader
) -> tuple[int, str, bytes, bool]:
    parts = (await reader.readline()).decode("latin-1").split()
    for _ in range(MAX_HEADER_LINES):
        if (await reader.readline()).strip() == b"":
            break
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, "text/plain", b"bad request line\n", False
    status, kind, body = endpoints.respond(parts[0], parts[1])
    return status, kind, body, parts[0] == "HEAD"


def _encode(status: int, kind: str, body: bytes, length: int) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def start_http(endpoints: HttpEndpoints, host: str, port: int) -> asyncio.Server:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_connection(endpoints, reader, writer)

    return await asyncio.start_server(
        on_connection, host, port, limit=MAX_REQUEST_LINE_BYTES, reuse_address=True
    )
