"""Requests between the workers of a pod: follow-ups to the owner, pod-wide health, spilled offers.

I/O layer (httpx over loopback). In a pod (``transceiver.workers``) every worker takes requests
on the shared public port (SO_REUSEPORT), so a request may land on any of them:

- a follow-up for a call (``DELETE`` / ``POST .../hangup`` of ``/v1/realtime/calls/{id}``) that
  names another worker (its call id says which: ``transceiver.workers.seats``) is forwarded,
  as it came (method, path, query, headers, body), to the owner's private loopback port, and
  the owner's answer is returned as it is. An owner that does not answer (dead, restarting)
  gives 503 ``worker_unavailable`` with ``Retry-After``;
- ``/readyz`` and ``/metrics`` are the pod's: asked of the supervisor, which asks every worker;
- a new offer that this worker refuses for room (``full``, ``overloaded``) is offered to the
  others in turn; the first answer that is not a 503 is the caller's (else this worker's 503).

A request the pod sent itself carries ``X-Voicerelay-Worker-Hop`` and is answered by the
worker it reached, never forwarded again (no loops). The header is not a credential: the
worker that answers checks ``Authorization`` as for any request. Sidebands over WebSocket are
not forwarded here (``/v1/realtime?call_id=``): a call id names its worker, for whichever
forwarder carries them.
"""

from __future__ import annotations

import httpx
from fastapi import Request, Response

from transceiver.http.errors import error_response
from transceiver.http.owner_hop import forward_request
from transceiver.workers.seats import HOP_HEADER, Seat

FORWARD_TIMEOUT_S = 30.0  # an offer's answer waits for ICE gathering and the agent's start
SPILL_MAX_BYTES = 4 * 64 * 1024  # offers larger than this are answered here, not spilled


class WorkerRouting:
    """Plain HTTP to loopback only: no TLS context to load, no proxy from the environment."""

    def __init__(self, seat: Seat) -> None:
        self.seat = seat
        self._http = httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S, verify=False, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def is_hop(request: Request) -> bool:
        return HOP_HEADER.lower() in request.headers

    def owner_elsewhere(self, call_id: str, request: Request) -> int | None:
        """The other worker that owns ``call_id``, or None when this one answers."""
        if self.is_hop(request):
            return None
        owner = self.seat.owner_of(call_id)
        return None if owner == self.seat.index else owner

    async def forward(self, request: Request, index: int) -> Response:
        """``request`` as worker ``index`` answers it."""
        answer = await self._send(request, self.seat.private_address(index))
        if answer is None:
            message = f"worker {index} of this transceiver does not answer; try again"
            return error_response(503, "worker_unavailable", message, {"Retry-After": "1"})
        return answer

    async def ask_pod(self, request: Request) -> Response:
        """The pod's answer (the supervisor's) to a health or metrics request."""
        answer = await self._send(request, self.seat.supervisor_address)
        if answer is None:
            return error_response(503, "pod_unavailable", "the pod's supervisor does not answer")
        return answer

    async def spill(self, request: Request) -> Response | None:
        """A new offer refused here for room, as another worker answers it (None: none did)."""
        size = request.headers.get("content-length", "")
        if self.is_hop(request) or not size.isdigit() or int(size) > SPILL_MAX_BYTES:
            return None
        for index in self.seat.siblings():
            answer = await self._send(request, self.seat.private_address(index))
            if answer is not None and answer.status_code != 503:
                return answer
        return None

    async def _send(self, request: Request, address: tuple[str, int]) -> Response | None:
        hop = {HOP_HEADER: str(self.seat.index)}
        return await forward_request(self._http, request, address, hop)
