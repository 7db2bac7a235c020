"""The route cache's record: ``client ip:port -> transceiver link ip:port`` in Redis.

Pure protocol layer, beside the relay's other wire formats (``ufrag``, ``header``). The
transceiver writes these records (``transceiver.store.route_cache``); a relay that meets an unknown
client address reads them (``relay.route_lookup``), off its hot path.

Key: ``P:route:1.2.3.4:5000`` or ``P:route:[2001:db8::1]:5000`` (IPv4-mapped IPv6 addresses
are written as IPv4, as the link header decodes them). Value: ``1 <link ip> <port>`` (a
version, then the link address). Routes are independent keys: no hash tag.
"""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]
ROUTE_VERSION = b"1"
MAX_ROUTE_BYTES = 64


class RouteValueError(ValueError):
    """A cached value that is not a route this version understands."""


def canonical_ip(host: str) -> str:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def route_key(prefix: str, client: Address) -> str:
    host = canonical_ip(client[0])
    shown = f"[{host}]" if ":" in host else host
    return f"{prefix}:route:{shown}:{int(client[1])}"


def encode_route(link: Address) -> bytes:
    return b"%s %s %d" % (ROUTE_VERSION, canonical_ip(link[0]).encode(), link[1])


def decode_route(raw: bytes) -> Address:
    parts = raw.split(b" ")
    if len(raw) > MAX_ROUTE_BYTES or len(parts) != 3 or parts[0] != ROUTE_VERSION:
        raise RouteValueError(f"not a version-1 route: {raw[:MAX_ROUTE_BYTES]!r}")
    host, port = parts[1].decode("ascii", "replace"), parts[2]
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise RouteValueError(f"route port {port!r} is out of range")
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        raise RouteValueError(f"route host {host!r} is not an IP address") from None
