"""The voice-pipeline agent: one ``RealtimeSession`` per call over providers shared per process.

I/O layer. ``PipelineAgents`` is opened once by ``python -m transceiver --agent pipeline``: the
heavy providers (one pocketsphinx worker pool, one piper model) are started here and shared by
every session; each call gets its own engine (history, VAD state, tools).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry

from pipeline.assembly import Providers, build_engine, open_providers
from pipeline.config import PipelineConfig
from pipeline.tools import builtin_tools
from transceiver.metrics import RealtimeMetrics, ResilienceCollector
from transceiver.realtime import RealtimeSession
from transceiver.session_config import SessionPolicy


class PipelineAgents:
    def __init__(
        self, config: PipelineConfig, providers: Providers, registry: CollectorRegistry
    ) -> None:
        self.config = replace(config, realtime_playout=True)
        self.providers = providers
        self.metrics = RealtimeMetrics(registry)
        registry.register(ResilienceCollector([providers.stt, providers.llm, providers.tts]))
        tools = builtin_tools(providers.knowledge)
        self.policy = SessionPolicy(self.config.engine_config(), tools)

    def __call__(self, requested: Mapping[str, Any] | None = None) -> RealtimeSession:
        """A session for one call; EventError when ``requested`` is not a valid session."""
        session = self.policy.initial(requested)
        engine = build_engine(self.config, self.providers)
        return RealtimeSession(engine, self.policy, session, self.metrics)


@asynccontextmanager
async def pipeline_agents(
    config: PipelineConfig, registry: CollectorRegistry
) -> AsyncIterator[PipelineAgents]:
    async with open_providers(config) as providers:
        yield PipelineAgents(config, providers, registry)
