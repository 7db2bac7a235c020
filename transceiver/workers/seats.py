"""Where each worker of a pod sits: its index, the private ports, and which worker a call id names.

Pure. The supervisor hands each worker its ``Seat`` in ``TRANSCEIVER_POD_SEAT`` (JSON): the
worker's index, every worker's private loopback HTTP port (the supervisor keeps those sockets
open, so a restarted worker answers on the same port), the supervisor's own port (pod-wide
``/readyz`` and ``/metrics``) and the descriptor of the worker's private listening socket.

The seat also carries the pod's own hop key (hex; ``transceiver.http.hop_signature``): the
requests the pod sends itself are signed with it, and a worker tells them from a client's by it.

Call ids name their owner (``transceiver.webrtc.calls.new_call_id``): ``rtc_`` then two hex
digits, the worker's index. As with the ufrag naming the transceiver, the worker a call began
on is read from the id itself: no lookup, no map to keep in step with restarts. A session
resumed since runs elsewhere: with Redis, a follow-up asks the directory first
(``transceiver.http.owner_routing``) and the id's worker is what it goes to without an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SEAT_ENV = "TRANSCEIVER_POD_SEAT"
LOOPBACK = "127.0.0.1"
CALL_PREFIX = "rtc_"
Address = tuple[str, int]


class SeatError(ValueError):
    """A ``TRANSCEIVER_POD_SEAT`` that does not describe a seat."""


@dataclass(frozen=True)
class Seat:
    index: int
    private_ports: tuple[int, ...]  # worker i answers privately on LOOPBACK:private_ports[i]
    supervisor_port: int
    private_fd: int
    hop_key: str = ""  # hex: the pod's own key for the hops between its processes

    @property
    def workers(self) -> int:
        return len(self.private_ports)

    def private_address(self, index: int) -> Address:
        return LOOPBACK, self.private_ports[index]

    @property
    def supervisor_address(self) -> Address:
        return LOOPBACK, self.supervisor_port

    def owner_of(self, call_id: str) -> int | None:
        """The worker a call id names, or None when it names none of this pod's."""
        digits = call_id[len(CALL_PREFIX) : len(CALL_PREFIX) + 2]
        if not call_id.startswith(CALL_PREFIX) or len(digits) != 2:
            return None
        try:
            index = int(digits, 16)
        except ValueError:
            return None
        return index if index < self.workers else None

    def siblings(self) -> list[int]:
        """The other workers, starting after this one (so spilled offers spread)."""
        return [(self.index + step) % self.workers for step in range(1, self.workers)]

    def to_env(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "private_ports": list(self.private_ports),
                "supervisor_port": self.supervisor_port,
                "private_fd": self.private_fd,
                "hop_key": self.hop_key,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> Seat:
        try:
            raw = json.loads(text)
            seat = cls(
                index=int(raw["index"]),
                private_ports=tuple(int(port) for port in raw["private_ports"]),
                supervisor_port=int(raw["supervisor_port"]),
                private_fd=int(raw["private_fd"]),
                hop_key=str(raw.get("hop_key", "")),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise SeatError(f"{SEAT_ENV} is not a pod seat: {exc}") from None
        if not 0 <= seat.index < seat.workers:
            raise SeatError(f"{SEAT_ENV}: index {seat.index} is not one of {seat.workers}")
        return seat


def worker_link(link: Address, index: int) -> Address:
    """Worker ``index``'s link socket: the configured port + index (0 stays 0: any port)."""
    host, port = link
    return host, (port + index if port else 0)
