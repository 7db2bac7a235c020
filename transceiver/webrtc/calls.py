"""Live calls: admission against capacity, negotiation, connect timeout, hang-up, drain.

I/O layer over aiortc. A call (``rtc_…``) is one RTCPeerConnection whose ICE agent is relayed
over the link (see ``ice``); it runs the configured agent: ``pipeline``
(``transceiver.realtime.session``: the voice pipeline and the ``oai-events`` channel, a Realtime
session ``sess_…``) or ``echo`` (diagnostics). Every call has one watcher task, owned by
``Calls`` and awaited on close; the agent owns its own tasks and ``aclose()`` ends them. A
watcher that crashes is logged with its traceback, counted in
``transceiver_task_crashes_total{task="session watcher"}`` and its call ended (``crashed``): not
restarted, since its one job is to end that call at the right moment, and a call no watcher
ends would hold its capacity forever.

Admission: a new call is refused while draining, when the calls fill ``capacity``, when the
process's measured CPU (``cost``, ``transceiver.cpu_cost``: told every change of the number of
calls) would exceed its budget with one more call at the measured cost per call, or while
``overload`` (the agents' shared work: the offline pipeline's pool) says calls would be slowed
down by one more; the calls in progress go on. The fixed capacity stays the upper bound.

Call ids: ``rtc_`` and 24 hex digits; in a pod of worker processes (``transceiver.workers``)
the first two digits are the index of the worker that owns the call (``worker``), so a
follow-up request that reaches another worker is forwarded to the owner with no lookup.

Capacity: a call holds a slot from ``reserve`` on, before anything is done for it elsewhere
(a resumed session is claimed in Redis only once it has one), and ``create`` turns the slot
into the call; ``create`` owns the agent it is given and closes it on every failure.

Hang-up: only ``hangup`` (the caller's ``DELETE``) is one; an agent that ``EndsOnHangUp`` is
told before it closes, so its stored session ends too. A connection that fails or that the peer
closes is not a hang-up (a client moving to another transceiver closes its old connection).

Drain (SIGTERM): admission stops at once; every agent that can ``hand_over`` (the pipeline
agent) finishes its running turn, stores it and tells its client to reconnect elsewhere; the
calls then end as their clients leave, or at the drain timeout.

Media path (``media_path``, per process): ``aiortc`` (its RTP tasks, codec threads and jitter
buffer carry the audio) or ``lean`` (``lean_media``: once DTLS is up, one shared tick and inline
Opus carry every call's audio; the agent gets a ``LeanInputTrack`` as the caller's audio). On
the lean path the answer asks the caller for Opus DTX (``caller_dtx``, ``sdp.opus_fmtp``):
nothing is sent while it is silent, and the lean call feeds the agent that silence.

The metric names (``transceiver_sessions…``) predate the name ``Calls`` and are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamTrack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from transceiver.background import report_crash
from transceiver.webrtc.ice import RelayedIce, relayed_through
from transceiver.webrtc.lean_media import LeanInputTrack, LeanMedia
from transceiver.webrtc.rtp_tuning import lower_audio_prefetch
from transceiver.webrtc.sdp import answer_with_candidates

logger = logging.getLogger(__name__)
# What aiortc raises for an offer it cannot negotiate (its SDP parser raises the builtins).
NEGOTIATION_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    InternalError,
    InvalidAccessError,
    InvalidStateError,
    OperationError,
)
FAILURE_REASONS = frozenset(
    {"rejected", "error", "connect_timeout", "failed", "invalid_session", "crashed"}
)
MEDIA_PATHS = ("aiortc", "lean")
# served at 0 before the first occurrence; other counters appear once they move
LEAN_MEDIA_KINDS = ("lost", "recovered_fec", "concealed_plc", "srtp_rejected", "rtp_in", "rtp_out")


@dataclass(frozen=True)
class CallLimits:
    capacity: int
    connect_timeout_s: float
    retry_after_s: int = 5


class AdmissionError(Exception):
    """No room for a new call: full, draining, or overloaded (``detail`` says by what)."""

    def __init__(self, reason: str, retry_after_s: int, detail: str | None = None) -> None:
        super().__init__(f"transceiver is {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.retry_after_s = retry_after_s


class OfferRejected(Exception):
    """aiortc could not negotiate the offer; the message says why."""


class AgentRequestError(Exception):
    """The agent cannot be made from what the call asked for (its session config); the message
    names the field and why. ``create`` answers it as a rejected offer."""


class CallCost(Protocol):
    """Measured cost per call (``transceiver.cpu_cost.CpuMeter``): why one more call is refused."""

    def calls_changed(self, count: int) -> None: ...
    def refusal(self, calls: int) -> str | None: ...


def new_call_id(worker: int | None) -> str:
    """``rtc_`` + 24 hex digits; in a pod the first two name the owning worker (0..255)."""
    if worker is None:
        return "rtc_" + secrets.token_hex(12)
    if not 0 <= worker <= 0xFF:
        raise ValueError(f"worker index {worker} is not within 0..255")
    return f"rtc_{worker:02x}" + secrets.token_hex(11)


class Reservation:
    """A slot of capacity held for a call being set up (see ``Calls.reserve``)."""

    def __init__(self) -> None:
        self.held = True


class CallAgent(Protocol):
    """What runs in a call: gets the client's audio track and data channels."""

    def attach_audio(self, track: MediaStreamTrack) -> MediaStreamTrack | None: ...
    def attach_channel(self, channel: Any) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


@runtime_checkable
class HearsAt(Protocol):
    """An agent that hears the caller at one rate (the pipeline's 16 kHz): the answer asks the
    caller to code no wider than that (``sdp.opus_fmtp``: maxplaybackrate)."""

    hearing_rate_hz: int


@runtime_checkable
class HandsOver(Protocol):
    """An agent whose session can move to another transceiver (see ``realtime``)."""

    async def hand_over(self, timeout_s: float) -> None: ...


@runtime_checkable
class HangsUp(Protocol):
    """An agent that can end its own session (taken over by another transceiver, or broken:
    ``hangup_reason`` says which, e.g. ``taken_over`` or ``crashed``)."""

    hangup_requested: asyncio.Event
    hangup_reason: str | None


@runtime_checkable
class EndsOnHangUp(Protocol):
    """An agent whose session outlives its connection (stored) unless the caller hangs up."""

    def caller_hung_up(self) -> None: ...


@runtime_checkable
class Recorded(Protocol):
    """An agent that keeps a record of its call: told the call's id before it starts, and why
    the call ended before it closes."""

    def call_began(self, call_id: str) -> None: ...
    def call_ended(self, reason: str) -> None: ...


# requested session config (None: the defaults) -> agent; AgentRequestError if it is invalid
AgentFactory = Callable[[Mapping[str, Any] | None], CallAgent]


@dataclass
class Call:
    call_id: str
    pc: RTCPeerConnection
    created_at_s: float
    agent: CallAgent
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class CallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = Gauge("transceiver_sessions", "Live sessions", registry=registry)
        self.started = Counter(
            "transceiver_sessions_started", "Sessions answered", registry=registry
        )
        self.ended = Counter(
            "transceiver_sessions_ended", "Sessions ended", ["reason"], registry=registry
        )
        self.failed = Counter(
            "transceiver_sessions_failed",
            "Sessions that ended in failure, by reason",
            ["reason"],
            registry=registry,
        )
        self.connect_s = Histogram(
            "transceiver_session_connect_seconds",
            "Offer to connected",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=registry,
        )


class LeanMediaCollector(Collector):
    """The lean media path's counters (one set per process), read at scrape time: packets in
    and out, lost, recovered from FEC, concealed by PLC, refused by SRTP, and the rest."""

    def __init__(self, media: LeanMedia) -> None:
        self._media = media

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "transceiver_lean_media_events",
            "Lean media path events by kind (lost: inbound packets never received; "
            "recovered_fec: rebuilt from the next packet's in-band FEC; concealed_plc: "
            "concealed by Opus PLC; srtp_rejected: packets SRTP refused; rtp_in, rtp_out, ...)",
            labels=["kind"],
        )
        for kind in LEAN_MEDIA_KINDS:
            family.add_metric([kind], self._media.counters[kind])
        for kind, count in sorted(self._media.counters.items()):
            if kind not in LEAN_MEDIA_KINDS:
                family.add_metric([kind], count)
        yield family


class Calls:
    def __init__(
        self,
        relayed: RelayedIce,
        limits: CallLimits,
        registry: CollectorRegistry,
        agents: AgentFactory,
        media_path: str = "aiortc",
        overload: Callable[[], str | None] | None = None,
        cost: CallCost | None = None,
        worker: int | None = None,
        caller_dtx: bool = True,
    ) -> None:
        if media_path not in MEDIA_PATHS:
            raise ValueError(f"media path {media_path!r} is not one of {', '.join(MEDIA_PATHS)}")
        self._relayed = relayed
        self._limits = limits
        self._agents = agents
        self._overload = overload
        self._cost = cost
        self._worker = worker
        self._metrics = CallMetrics(registry)
        self.lean_media = None
        if media_path == "lean":
            rtt_s = Histogram(
                "transceiver_lean_media_rtt_seconds",
                "RTCP round trips measured on the lean media path (our SR, the caller's report)",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6),
                registry=registry,
            )
            self.lean_media = LeanMedia(on_rtt=rtt_s.observe, feed_silence=caller_dtx)
            registry.register(LeanMediaCollector(self.lean_media))
        self._calls: dict[str, Call] = {}
        self._reserved = 0  # slots held by calls being set up
        self._watchers: set[asyncio.Task[None]] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, call_id: str) -> Call | None:
        return self._calls.get(call_id)

    @property
    def capacity(self) -> int:
        """Calls this process takes at most (``TRANSCEIVER_CAPACITY``)."""
        return self._limits.capacity

    @property
    def not_ready_reason(self) -> str | None:
        refusal = self._refusal()
        return None if refusal is None else refusal.reason

    @property
    def not_ready_message(self) -> str | None:
        refusal = self._refusal()
        return None if refusal is None else str(refusal)

    def _refusal(self) -> AdmissionError | None:
        retry_after_s = self._limits.retry_after_s
        if self.draining:
            return AdmissionError("draining", retry_after_s)
        held = len(self._calls) + self._reserved
        if held >= self._limits.capacity:
            return AdmissionError("full", retry_after_s)
        costly = None if self._cost is None else self._cost.refusal(held)
        if costly is not None:  # one more call would take this process over its CPU budget
            return AdmissionError("overloaded", retry_after_s, costly)
        overload = None if self._overload is None else self._overload()
        if overload is not None:  # the agents' shared work is behind: calls here would be slow
            return AdmissionError("overloaded", retry_after_s, overload)
        return None

    def admit(self) -> None:
        """Raise AdmissionError when a new call would not be accepted."""
        refusal = self._refusal()
        if refusal is not None:
            raise refusal

    @contextlib.contextmanager
    def reserve(self) -> Iterator[Reservation]:
        """Hold a slot for a call being set up; AdmissionError when there is none. ``create``
        uses it; leaving the block without a call frees it."""
        self.admit()
        reservation = Reservation()
        self._reserved += 1
        try:
            yield reservation
        finally:
            self._release(reservation)

    def _release(self, reservation: Reservation) -> None:
        if reservation.held:
            reservation.held = False
            self._reserved -= 1

    async def create(
        self,
        reservation: Reservation,
        offer_sdp: str,
        requested: Mapping[str, Any] | None = None,
        agent: CallAgent | None = None,
    ) -> tuple[Call, str]:
        """Answer a (sanitised) offer in the reserved slot (AdmissionError if draining began).
        ``requested``: the session config asked for with the call (OfferRejected if invalid);
        ``agent``: one already made (a resumed session) instead of a new one; closed here on
        every failure."""
        try:
            if not reservation.held:
                raise ValueError("a reservation makes one call")
            if self.draining:
                raise AdmissionError("draining", self._limits.retry_after_s)
            self._release(reservation)  # the call takes the slot at once (no await between)
            if agent is None:
                agent = self.new_agent(requested)
        except BaseException:
            if agent is not None:
                await agent.aclose()
            raise
        loop = asyncio.get_running_loop()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        call = Call(new_call_id(self._worker), pc, loop.time(), agent)
        if isinstance(agent, Recorded):
            agent.call_began(call.call_id)
        self._add(call)
        try:
            answer = await self._negotiate(call, offer_sdp)
            await agent.start()
        except NEGOTIATION_ERRORS as exc:
            await self._end(call, "rejected")
            raise OfferRejected(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self._end(call, "error")
            raise
        self._metrics.started.inc()
        self._watch(call)
        return call, answer

    def new_agent(self, requested: Mapping[str, Any] | None) -> CallAgent:
        """The agent a call asking for ``requested`` runs (OfferRejected if it is invalid), for
        a caller that sets it up before ``create``, which then owns it."""
        try:
            return self._agents(requested)
        except AgentRequestError as exc:
            self._metrics.failed.labels("invalid_session").inc()
            raise OfferRejected(f"invalid session: {exc}") from None

    def _add(self, call: Call) -> None:
        self._calls[call.call_id] = call
        self._empty.clear()
        self._counted()
        call.pc.on("connectionstatechange", lambda: self._state_changed(call))

    def _counted(self) -> None:
        self._metrics.active.set(len(self._calls))
        if self._cost is not None:
            self._cost.calls_changed(len(self._calls))

    async def _negotiate(self, call: Call, offer_sdp: str) -> str:
        pc, agent = call.pc, call.agent
        tracks: list[MediaStreamTrack] = []
        pc.on("track", tracks.append)
        pc.on("datachannel", agent.attach_channel)
        with relayed_through(self._relayed):
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            for track in tracks:
                if track.kind == "audio":
                    self._attach_audio(pc, agent, track)
            for receiver in pc.getReceivers():
                if receiver.track is not None and receiver.track.kind == "audio":
                    lower_audio_prefetch(receiver)
            await pc.setLocalDescription(await pc.createAnswer())
        hearing_hz = agent.hearing_rate_hz if isinstance(agent, HearsAt) else None
        dtx = self.lean_media is not None and self.lean_media.feed_silence
        return answer_with_candidates(
            pc.localDescription.sdp, self._relayed.public, hearing_hz, caller_dtx=dtx
        )

    def _attach_audio(self, pc: RTCPeerConnection, agent: CallAgent, track: Any) -> None:
        lean = self.lean_media
        heard = track if lean is None else LeanInputTrack()
        voice = agent.attach_audio(heard)
        if voice is not None:
            pc.addTrack(voice)
        if lean is not None:
            transceiver = next(t for t in pc.getTransceivers() if t.receiver.track is track)
            lean.take_over(transceiver, heard, voice)

    def _state_changed(self, call: Call) -> None:
        state = call.pc.connectionState
        if state == "connected" and not call.connected.is_set():
            call.connected.set()
            loop = asyncio.get_running_loop()
            self._metrics.connect_s.observe(loop.time() - call.created_at_s)
        elif state in ("failed", "closed"):
            call.ended.set()

    def _watch(self, call: Call) -> None:
        task = asyncio.create_task(self._watcher(call), name=f"session {call.call_id}")
        call.watcher = task
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watcher(self, call: Call) -> None:
        try:
            await self._watch_until_ended(call)
        except Exception as error:  # a bug: seen, counted, and the call does not linger
            report_crash("session watcher", error, logger, f"session {call.call_id} ends")
            await self._end(call, "crashed")

    async def _watch_until_ended(self, call: Call) -> None:
        try:
            async with asyncio.timeout(self._limits.connect_timeout_s):
                await call.connected.wait()
        except TimeoutError:
            await self._end(call, "connect_timeout")
            return
        agent = call.agent
        if not isinstance(agent, HangsUp):
            await call.ended.wait()
            await self._end(call, call.pc.connectionState)
            return
        ended = asyncio.ensure_future(call.ended.wait())
        hangup = asyncio.ensure_future(agent.hangup_requested.wait())
        try:
            await asyncio.wait([ended, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (ended, hangup):
                waiter.cancel()
        asked = agent.hangup_requested.is_set()
        reason = (agent.hangup_reason or "taken_over") if asked else call.pc.connectionState
        await self._end(call, reason)

    async def hangup(self, call_id: str) -> bool:
        call = self._calls.get(call_id)
        if call is None:
            return False
        if isinstance(call.agent, EndsOnHangUp):
            call.agent.caller_hung_up()
        await self._end(call, "hangup")
        return True

    async def _end(self, call: Call, reason: str) -> None:
        if self._calls.pop(call.call_id, None) is None:
            return
        call.ended.set()
        if call.watcher is not None and call.watcher is not asyncio.current_task():
            call.watcher.cancel()
        self._counted()
        self._metrics.ended.labels(reason).inc()
        if reason in FAILURE_REASONS:
            self._metrics.failed.labels(reason).inc()
        logger.info("session %s ended: %s", call.call_id, reason)
        if isinstance(call.agent, Recorded):
            call.agent.call_ended(reason)
        try:
            try:
                await call.pc.close()
            finally:
                await call.agent.aclose()  # whatever the peer connection did
        finally:
            if not self._calls:
                self._empty.set()

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting; hand sessions over; wait up to ``timeout_s`` for the calls to end;
        close the rest."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                movable = [c.agent for c in self._calls.values() if isinstance(c.agent, HandsOver)]
                await asyncio.gather(*(agent.hand_over(timeout_s) for agent in movable))
                await self._empty.wait()
        await self.aclose()

    async def aclose(self) -> None:
        self.draining = True
        for call in list(self._calls.values()):
            await self._end(call, "shutdown")
        for task in list(self._watchers):
            task.cancel()
        if self._watchers:
            await asyncio.wait(list(self._watchers))
        if self.lean_media is not None:
            await self.lean_media.aclose()
