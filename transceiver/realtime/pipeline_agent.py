"""The voice-pipeline agent: one ``RealtimeSession`` per call over providers shared per process.

I/O layer. ``PipelineAgents`` is opened once by ``python -m transceiver --agent pipeline``: the
heavy providers (pocketsphinx decoders and one piper model, in the process's pool) are started
here and shared by every session, and ``overload`` says when that pool cannot take another
call; each call gets its own engine (history, VAD state, tools). With Redis (``persistence``),
sessions are stored as they go and ``resume`` continues a stored one. Every
session gets the process's ``RealtimeLimits``, and shares its item audio's byte bound
(``item_audio.ItemAudioBudget``: ``transceiver_item_audio_bytes``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.assembly import Providers, build_engine, open_providers
from pipeline.config import PipelineConfig
from pipeline.providers import transcription_details
from pipeline.tools import builtin_tools
from transceiver.metrics import (
    PipelinePoolCollector,
    RealtimeMetrics,
    ResilienceCollector,
    SubstitutesCollector,
)
from transceiver.realtime.client_events import EventError, SessionConfig
from transceiver.realtime.item_audio import ItemAudioBudget
from transceiver.realtime.limits import RealtimeLimits
from transceiver.realtime.policy import SessionPolicy, stored_session_update
from transceiver.realtime.session import RealtimeSession
from transceiver.realtime.transcription import as_realtime, is_transcription
from transceiver.realtime.transcription import session_json as transcription_json
from transceiver.store.contracts import REALTIME, split_contract
from transceiver.store.persistence import ResumeRefused, SessionPersistence


class PipelineAgents:
    def __init__(
        self,
        config: PipelineConfig,
        providers: Providers,
        registry: CollectorRegistry,
        persistence: SessionPersistence | None = None,
        limits: RealtimeLimits | None = None,
    ) -> None:
        self.config = replace(config, realtime_playout=True)
        self.providers = providers
        self.metrics = RealtimeMetrics(registry)
        registry.register(ResilienceCollector([providers.stt, providers.llm, providers.tts]))
        registry.register(SubstitutesCollector(providers.substitutes))
        self.pool = providers.pool
        if self.pool is not None:
            registry.register(PipelinePoolCollector(self.pool, registry))
        tools = builtin_tools(providers.knowledge)
        self.policy = SessionPolicy(
            self.config.engine_config(),
            tools,
            answering_model(config),
            providers.tts.voices,
            stt=providers.stt.name,
            stt_details=transcription_details(providers.stt),
        )
        self.persistence = persistence
        self.limits = limits or RealtimeLimits()
        self.item_audio = ItemAudioBudget(self.limits.item_audio_bytes)  # every session's
        registry.register(ItemAudioCollector(self.item_audio))

    def overload(self) -> str | None:
        """Why one more call would slow the others down (the pool is saturated), or None."""
        reason = None if self.pool is None else self.pool.saturation()
        return None if reason is None else f"pipeline pool saturated: {reason}"

    def __call__(self, requested: Mapping[str, Any] | None = None) -> RealtimeSession:
        """A session for one call; EventError when ``requested`` is not a valid session."""
        session = self.policy.initial(requested)
        engine = build_engine(self.config, self.providers)
        return RealtimeSession(
            engine, self.policy, session, self.metrics, self.persistence,
            limits=self.limits, item_audio=self.item_audio,
        )  # fmt: skip

    def describe(self, requested: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The session a new session asking for ``requested`` starts with, as its
        ``session.created`` reports it (its id aside: each session has its own); what a client
        secret reports. EventError when ``requested`` is not a valid session."""
        if is_transcription(requested):
            return transcription_json(self.policy.initial(as_realtime(requested)))
        return self.policy.initial(requested).to_json()

    def websocket(self, requested: Mapping[str, Any] | None = None) -> RealtimeSession:
        """A session whose audio rides in its events (WebSocket): the same engine, with its
        frames made as fast as they come (the client plays them) instead of paced."""
        config = replace(self.config, realtime_playout=False)
        policy = replace(self.policy, base=replace(self.policy.base, realtime_playout=False))
        engine = build_engine(config, self.providers)
        session = RealtimeSession(
            engine,
            policy,
            policy.initial(requested),
            self.metrics,
            self.persistence,
            limits=self.limits,
            item_audio=self.item_audio,
        )
        session.use_websocket()
        return session

    async def resume(
        self, session_id: str, credential: str | None, contract: str = REALTIME
    ) -> RealtimeSession:
        """The stored session, claimed here; ResumeRefused when it may not be (or no Redis),
        e.g. when it was stored with another client ``contract`` than the one asking."""
        if self.persistence is None:
            raise ResumeRefused(404, "resume_unavailable", "this deployment stores no sessions")
        journal, state = await self.persistence.resume(session_id, credential, contract)
        try:
            realtime, _ = split_contract(state.config)  # the contract's part: the caller's
            base = SessionConfig(session_id, model=self.policy.model)
            stored = stored_session_update(realtime).apply(base)
        except (EventError, ValueError) as exc:
            await journal.release()  # claimed for nothing: hand it back, stop renewing
            journal.close()
            message = exc.message if isinstance(exc, EventError) else str(exc)
            raise ResumeRefused(409, "invalid_stored_session", message) from None
        engine = build_engine(self.config, self.providers)
        resumed = (journal, state)
        return RealtimeSession(
            engine, self.policy, stored, self.metrics, self.persistence, resumed, self.limits,
            item_audio=self.item_audio,
        )  # fmt: skip


class ItemAudioCollector(Collector):
    """The process's item audio (``item_audio``): the bytes held, the clips its bound took."""

    def __init__(self, budget: ItemAudioBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "transceiver_item_audio_bytes",
            "Bytes of conversation items' audio held for retrieve, across sessions",
            value=self._budget.held_bytes,
        )
        yield CounterMetricFamily(
            "transceiver_item_audio_dropped_clips",
            "Items' audio dropped, oldest first, by TRANSCEIVER_REALTIME_ITEM_AUDIO_BYTES",
            value=self._budget.dropped_clips,
        )


def answering_model(config: PipelineConfig) -> str:
    """The model a session reports (``session.model``): the language model that answers, or
    ``voicerelay-local`` for the offline ones (the rule-based agent, the local model)."""
    return config.openai_llm_model if config.llm == "openai" else SessionPolicy.model


@asynccontextmanager
async def pipeline_agents(
    config: PipelineConfig,
    registry: CollectorRegistry,
    persistence: SessionPersistence | None = None,
    limits: RealtimeLimits | None = None,
) -> AsyncIterator[PipelineAgents]:
    async with open_providers(config) as providers:
        yield PipelineAgents(config, providers, registry, persistence, limits)
