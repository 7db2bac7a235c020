"""The link's housekeeping loop and a session's watcher, when a dependency raises a bug.

Housekeeping is restarted (its passes are idempotent); a watcher is not (its one job is to end
its session), but its crash is seen and the session still ends. Both are logged with their
traceback and counted in ``transceiver_task_crashes_total{task}``. Real link sockets, a
``LoopbackRelay`` and an aiortc client calling in-process ``Calls``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from aiortc import RTCSessionDescription
from prometheus_client import CollectorRegistry

from deploy.processes import LoopbackRelay, random_keys
from deploy.waiting import eventually
from loadtest.realtime_client import RealtimeClient
from relay.wire.ufrag import Keyring
from transceiver.metrics import TaskCrashCollector
from transceiver.restarts import RestartPolicy
from transceiver.webrtc import ice
from transceiver.webrtc.calls import CallLimits, Calls
from transceiver.webrtc.echo import EchoAgent
from transceiver.webrtc.link import Link
from transceiver.webrtc.link_policy import LinkPolicy

TIMEOUT_S = 15.0  # the first restart pauses 0.5 s
KEYS = random_keys()
KEYRING = Keyring.parse(KEYS)


class Bug(TypeError):
    """What a programming error in our code looks like."""


class FaultyLink(Link):
    """A link whose ``expire`` raises a bug on its first pass."""

    bugs = 1
    passes = 0

    def expire(self) -> None:
        self.passes += 1
        if self.bugs:
            self.bugs -= 1
            raise Bug("expire called with the wrong arguments")
        super().expire()


class FaultyEchoAgent(EchoAgent):
    """The echo agent, whose ``aclose`` raises a bug after closing."""

    closed = 0

    async def aclose(self) -> None:
        await super().aclose()
        FaultyEchoAgent.closed += 1
        raise Bug("aclose called with the wrong arguments")


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TaskCrashCollector())
    return registry


def crashes(registry: CollectorRegistry, task: str) -> float:
    return registry.get_sample_value("transceiver_task_crashes_total", {"task": task}) or 0.0


def crash_logged(caplog: pytest.LogCaptureFixture, logger: str, task: str) -> None:
    for record in caplog.records:
        if record.name == logger and record.getMessage().startswith(f"{task} crashed"):
            assert record.levelno == logging.ERROR
            assert record.exc_info is not None and isinstance(record.exc_info[1], Bug)
            assert "Traceback" in caplog.text and "Bug: " in caplog.text
            return
    raise AssertionError(f"no crash of {task} logged:\n{caplog.text}")


async def test_link_housekeeping_that_crashes_is_seen_and_restarted(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    short = LinkPolicy(housekeeping_interval_s=0.01)
    restarts = RestartPolicy(first_s=0.01)  # the link hands it to its housekeeping loop
    link = FaultyLink(("127.0.0.1", 0), KEYRING, policy=short, restarts=restarts)
    before = crashes(registry, "link housekeeping")
    await link.start()
    try:
        await eventually(
            lambda: crashes(registry, "link housekeeping") == before + 1, TIMEOUT_S, "the count"
        )
        crash_logged(caplog, "transceiver.background", "link housekeeping")
        await eventually(lambda: link.passes >= 3, TIMEOUT_S, "housekeeping to run again")
    finally:
        await link.aclose()


@pytest.fixture
async def sessions(registry: CollectorRegistry) -> AsyncIterator[Calls]:
    ice.install()
    link = Link(("127.0.0.1", 0), KEYRING)
    relay = LoopbackRelay(await link.start(), KEYS)
    public = await relay.start()
    relay.hello()

    def agents(requested: Mapping[str, Any] | None) -> FaultyEchoAgent:
        return FaultyEchoAgent(requested)

    limits = CallLimits(capacity=2, connect_timeout_s=TIMEOUT_S)
    running = Calls(ice.RelayedIce(link, KEYRING, (public,)), limits, registry, agents)
    try:
        yield running
    finally:
        await running.aclose()
        relay.close()
        await link.aclose()


async def test_a_session_watcher_that_crashes_is_seen_and_its_session_ends(
    sessions: Calls, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    client = RealtimeClient()
    try:
        await client.pc.setLocalDescription(await client.pc.createOffer())
        with sessions.reserve() as reservation:
            session, answer = await sessions.create(reservation, client.pc.localDescription.sdp)
        await client.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await eventually(session.connected.is_set, TIMEOUT_S, "the call to connect")
    finally:
        await client.close()  # the peer leaves: the watcher ends the session, and meets the bug
    await eventually(
        lambda: crashes(registry, "session watcher") == 1, TIMEOUT_S, "the watcher's crash"
    )
    crash_logged(caplog, "transceiver.webrtc.calls", "session watcher")
    assert len(sessions) == 0 and FaultyEchoAgent.closed == 1
