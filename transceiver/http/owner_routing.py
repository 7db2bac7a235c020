"""Where a request for a session goes when the process it lands on does not run it: the one
seam a sideband (``sideband``, over ``owner_hop``'s WebSocket) and a hang-up (``app``, over
``owner_hop.forward_request``) take to the session's owner.

I/O layer (the directory is Redis). The owner is the directory's
(``transceiver.store.sideband_directory``: a call's stored session, that session's lease, the
lease owner's record), which names the owner's internal HTTP address, and in a pod the worker:
a session resumed since its call began runs elsewhere than the worker its call id names. When
the directory names no owner (no Redis, Redis away, a call answered a moment ago), a call id of
a pod's call names its worker (``transceiver.workers.seats``).
The hop there carries one header (``hop_signature``) signed over the
endpoint's kind, the target's id, the hop's stage and the forwarded credential: with the
transceivers' shared key between transceivers, with the pod's own key (its seat's) within a
pod (a hop within a pod signed with the shared key verifies too). The stage is the loop guard:
a hop between transceivers (``BETWEEN_TRANSCEIVERS``) may go on once within the pod it
reached; a hop within a pod (``WITHIN_POD``) never goes further, so no request loops on a stale
record. A header that does not verify is ``403 invalid_hop``. Without the shared key (no
``TRANSCEIVER_SECRET_KEYS``) or without the directory (no Redis), nothing leaves the pod (or
the transceiver): the target's ``404``.

The owner checks the forwarded credential again: a hop proves where a request came from, never
who sent it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from transceiver.http.errors import error_response
from transceiver.http.hop_signature import HOP_HEADER, HopError, HopKeys, pod_keys
from transceiver.http.websocket import Refused
from transceiver.store.errors import StoreUnavailableError
from transceiver.store.sideband_directory import Owner, SidebandDirectory
from transceiver.workers.seats import Seat

BETWEEN_TRANSCEIVERS, WITHIN_POD = "", ":pod"  # a hop's stage, the end of what it signs
Address = tuple[str, int]


@dataclass(frozen=True)
class Kind:
    """What one endpoint calls its target, and the query parameters it takes."""

    name: str  # "realtime", "live", "hangup": the hop's signed target is "<name>:<id>"
    not_found: str  # the 404's code
    param: str  # the parameter that names the target
    query: frozenset[str]
    what: str = "call"  # the target, in an error's message
    call_ids: bool = True  # its targets are call ids, which name their worker in a pod


REALTIME = Kind("realtime", "call_not_found", "call_id", frozenset({"call_id", "model"}))
LIVE = Kind(
    "live", "session_not_found", "session_id", frozenset({"graceful_close"}), "Live session", False
)
HANGUP = Kind("hangup", "call_not_found", "call_id", frozenset())


@dataclass(frozen=True)
class Hop:
    """Where the owner answers, the signed header that says the request is a hop, its stage."""

    address: Address
    header: str
    stage: str
    worker: int | None = None  # the pod's worker it goes to, when the call id names it


class OwnerRouting:
    """Finds a target's owner and signs or verifies the hop to it."""

    def __init__(
        self,
        directory: SidebandDirectory | None = None,
        hops: HopKeys | None = None,
        seat: Seat | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``hops``: the transceivers' shared keys; ``seat``: this worker's place in a pod of
        workers (``transceiver.workers``), with the pod's own key."""
        self._directory, self._seat, self._clock = directory, seat, clock
        pod = None if seat is None or not seat.hop_key else pod_keys(seat.hop_key)
        self._keys = {BETWEEN_TRANSCEIVERS: hops, WITHIN_POD: pod or hops}  # sign with
        self._verifiers = {BETWEEN_TRANSCEIVERS: [hops], WITHIN_POD: [pod, hops]}

    def stage_of(
        self, hop: str | None, kind: Kind, target_id: str, authorization: str | None
    ) -> str | None:
        """The stage a request's hop header verifies for (None: no header, the client's own
        request); Refused (403) when it verifies for none."""
        if hop is None:
            return None
        now_s, reason = self._clock(), "no_hop_keys"
        for stage, verifiers in self._verifiers.items():
            signed = signed_target(kind, target_id, stage)
            for keys in filter(None, verifiers):
                try:
                    keys.verify(hop, signed, authorization, now_s)
                    return stage
                except HopError as exc:
                    reason = exc.reason
        message = f"the {HOP_HEADER} header does not verify ({reason})"
        raise Refused(error_response(403, "invalid_hop", message))

    async def hop(
        self, kind: Kind, target_id: str, authorization: str | None, came: str | None
    ) -> Hop:
        """The hop towards the target's owner; Refused (404) if there is none, (503) when the
        directory cannot be read. A request that ``came`` between transceivers may go on once
        within the pod it reached, never further."""
        if self._keys[WITHIN_POD] is None or not target_id or came == WITHIN_POD:
            raise not_found(kind, target_id, "is not running here")
        address, stage = await self._route(kind, target_id)
        keys = self._keys[stage]
        if keys is None or (came == BETWEEN_TRANSCEIVERS and stage != WITHIN_POD):
            raise not_found(kind, target_id, "is not running on its transceiver")
        signed = signed_target(kind, target_id, stage)
        return Hop(address, keys.sign(signed, authorization, self._clock()), stage)

    def named_hop(
        self, kind: Kind, target_id: str, authorization: str | None, came: str | None
    ) -> Hop | None:
        """The hop to the sibling worker a call id names, whatever the directory says (None:
        the id names this worker or none of the pod's, or the request may go no further)."""
        named = self._named_sibling(kind, target_id)
        keys = self._keys[WITHIN_POD]
        if named is None or keys is None or came == WITHIN_POD:
            return None
        address, stage = named
        signed = signed_target(kind, target_id, stage)
        worker = None if self._seat is None else self._seat.owner_of(target_id)
        return Hop(address, keys.sign(signed, authorization, self._clock()), stage, worker)

    async def _route(self, kind: Kind, target_id: str) -> tuple[Address, str]:
        """Where the target runs, and the stage of the hop there: where the directory's owner
        is (a sibling worker of this pod, or another transceiver); without one, the sibling a
        call id names (its call's own worker: the directory has no record of it yet, or no
        Redis). A call id names the worker its call began on, not the one its session was
        resumed on since, so the directory goes first."""
        named = self._named_sibling(kind, target_id)
        try:
            owner = await self._owner(kind, target_id)
        except Refused:
            if named is None:
                raise
            return named
        assert self._directory is not None  # _owner found one
        seat = self._seat
        if owner.address != self._directory.me.address:
            return owner.address, BETWEEN_TRANSCEIVERS
        if seat is not None and owner.worker is not None and owner.worker != seat.index:
            return seat.private_address(owner.worker), WITHIN_POD
        if named is not None:
            return named
        raise not_found(kind, target_id, "is not running")  # a stale record of ours

    def _named_sibling(self, kind: Kind, target_id: str) -> tuple[Address, str] | None:
        """The hop to the sibling worker a call id names (None: not a call id of another
        worker of this pod)."""
        seat = self._seat
        worker = None if seat is None or not kind.call_ids else seat.owner_of(target_id)
        if seat is None or worker is None or worker == seat.index:
            return None
        return seat.private_address(worker), WITHIN_POD

    async def _owner(self, kind: Kind, target_id: str) -> Owner:
        if self._directory is None:
            raise not_found(kind, target_id, "is not running on this transceiver")
        try:
            owner = await self._directory.locate(target_id)
        except StoreUnavailableError as exc:
            raise Refused(error_response(503, "store_unavailable", str(exc))) from None
        if owner is None:
            raise not_found(kind, target_id, "is not running")
        return owner


def not_found(kind: Kind, target_id: str, why: str) -> Refused:
    message = f"{kind.what} {target_id!r} {why}"
    return Refused(error_response(404, kind.not_found, message, param=kind.param))


def signed_target(kind: Kind, target_id: str, stage: str) -> str:
    """What a hop's header signs: the endpoint, the session and the hop's stage."""
    return f"{kind.name}:{target_id}{stage}"
