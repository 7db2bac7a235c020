"""Requests between the workers of a pod: pod-wide health, spilled offers.

I/O layer (httpx over loopback). In a pod (``transceiver.workers``) every worker takes requests
on the shared public port (SO_REUSEPORT), so a request may land on any of them:

- ``/readyz`` and ``/metrics`` are the pod's: asked of the supervisor, which asks every worker;
- a new offer that this worker refuses for room (``full``, ``overloaded``) is offered to the
  others in turn; the first answer that is not a 503 is the caller's (else this worker's 503).

A follow-up for a call (``DELETE`` / ``POST .../hangup`` of ``/v1/realtime/calls/{id}``) that
names another worker goes to it through ``owner_routing``, as one for a call on another
transceiver does. A request the pod sent itself carries the hop header (``hop_signature``)
signed with the pod's own key for its path (``pod_target``) and is answered by the worker it
reached, never forwarded again (no loops). The hop is not a credential: the worker that answers
checks ``Authorization`` as for any request.
"""

from __future__ import annotations

import time

import httpx
from fastapi import Request, Response

from transceiver.http.errors import error_response
from transceiver.http.hop_signature import (
    HopError,
    hop_header_of,
    hop_headers,
    pod_keys,
    pod_target,
)
from transceiver.http.owner_hop import forward_request
from transceiver.workers.seats import Seat

FORWARD_TIMEOUT_S = 30.0  # an offer's answer waits for ICE gathering and the agent's start
SPILL_MAX_BYTES = 4 * 64 * 1024  # offers larger than this are answered here, not spilled


class WorkerRouting:
    """Plain HTTP to loopback only: no TLS context to load, no proxy from the environment."""

    def __init__(self, seat: Seat) -> None:
        self.seat = seat
        self._hops = pod_keys(seat.hop_key)
        self._http = httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S, verify=False, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    def is_hop(self, request: Request) -> bool:
        """Whether the pod sent ``request`` itself (its hop header verifies with the pod's key)."""
        header = hop_header_of(request.headers)
        if header is None:
            return False
        target, authorization = pod_target(request.url.path), request.headers.get("authorization")
        try:
            self._hops.verify(header, target, authorization, time.time())
        except HopError:
            return False
        return True

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
        target, authorization = pod_target(request.url.path), request.headers.get("authorization")
        hop = hop_headers(self._hops.sign(target, authorization, time.time()))
        return await forward_request(self._http, request, address, hop)
