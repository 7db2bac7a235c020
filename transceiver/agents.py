"""What the transceiver's calls run: the echo agent, or the Realtime session over the pipeline.

``open_agents`` is opened once by ``python -m transceiver``: for ``--agent pipeline`` it starts
the shared providers, opens session storage when Redis is configured (``transceiver.store``) and
registers the collectors that read them; everything it opens lives as long as its context.
A session config the Realtime policy refuses (``EventError``) reaches the call as the
call-level ``AgentRequestError``: ``webrtc`` knows no Realtime event.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline.config import PipelineConfig
from relay.wire.redis_config import RedisConfig
from transceiver.config import TransceiverConfig
from transceiver.http.app import Resume, SessionDescriber
from transceiver.http.websocket import WebSocketSessions
from transceiver.metrics import LeaseCollector, RedisHealthCollector, StoredImagesCollector
from transceiver.realtime.client_events import EventError
from transceiver.store.persistence import SessionPersistence, open_persistence
from transceiver.webrtc.calls import AgentFactory, AgentRequestError, CallAgent
from transceiver.webrtc.echo import EchoAgent


@dataclass(frozen=True)
class Agents:
    """What calls run, and (pipeline agent with Redis) how a stored session is resumed."""

    factory: AgentFactory
    persistence: SessionPersistence | None = None
    resume: Resume | None = None
    websocket: WebSocketSessions | None = None  # Realtime sessions over WebSocket (pipeline)
    overload: Callable[[], str | None] | None = None  # why calls are refused now (pipeline pool)
    describe: SessionDescriber | None = None  # the session a request starts (client secrets)


@contextlib.asynccontextmanager
async def open_agents(
    config: TransceiverConfig, registry: CollectorRegistry, redis: RedisConfig | None
) -> AsyncIterator[Agents]:
    """The agent factory; for ``pipeline`` the shared providers live as long as this context."""
    if config.agent == "echo":
        yield Agents(EchoAgent)
        return
    from transceiver.realtime.pipeline_agent import pipeline_agents

    pipeline = PipelineConfig.from_env(os.environ).resolved(os.environ)
    async with (
        open_persistence(redis, config.survival) as persistence,
        pipeline_agents(pipeline, registry, persistence, config.realtime) as agents,
    ):
        if persistence is not None:
            registry.register(RedisHealthCollector(persistence.health.down_for_s))
            registry.register(LeaseCollector(persistence.heartbeat.held_count))
            registry.register(StoredImagesCollector(lambda: persistence.images_dropped))
        resume = None if persistence is None else agents.resume
        factory = invalid_session_refused(agents)
        yield Agents(
            factory, persistence, resume, agents.websocket, agents.overload, agents.describe
        )


def invalid_session_refused(
    make: Callable[[Mapping[str, Any] | None], CallAgent],
) -> AgentFactory:
    """``make``, reporting a session config it refuses (``EventError``) as ``AgentRequestError``
    with the same words."""

    def agent(requested: Mapping[str, Any] | None) -> CallAgent:
        try:
            return make(requested)
        except EventError as exc:
            raise AgentRequestError(f"{exc.message} ({exc.param})") from None

    return agent
