"""Out-of-band responses (``response.create`` with ``conversation: "none"``): answers that run
beside the conversation, on the session's providers, without joining it.

I/O layer. Each is a ``pipeline.response.SpokenResponse`` over a copy of its context (the
conversation's, or the ``input`` the client gave): nothing is added to the conversation, the
engine's active response is not in its way (several may run at once), speech does not cancel
it, and its audio is the caller's to route (``emit`` gets its ``OutputAudio`` too). It reports
as the engine's responses do: ``ResponseStarted``, its output, ``ResponseDone``, then
``TurnCompleted``. Every task is owned: ``aclose()`` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Literal

from pipeline import events as ev
from pipeline.config import EngineConfig
from pipeline.engine import ConversationEngine
from pipeline.providers import Message, ProviderError
from pipeline.response import SpokenResponse
from pipeline.tools import ToolRegistry
from pipeline.turns import TurnRecorder

log = logging.getLogger(__name__)
Status = Literal["completed", "cancelled", "failed", "incomplete"]


class SideResponses:
    def __init__(self, engine: ConversationEngine, emit: Callable[[ev.EngineEvent], None]) -> None:
        self._engine = engine
        self._emit = emit
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)

    def start(self, config: EngineConfig, tools: ToolRegistry, context: Sequence[Message]) -> str:
        """Start one; its engine-style response id. The audio is made as fast as it comes."""
        engine = self._engine
        response_id = f"oob_{next(self._ids)}"
        recorder = TurnRecorder(0, engine.stt.name, engine.llm.name, engine.tts.name)
        response = SpokenResponse(
            response_id,
            recorder,
            replace(config, realtime_playout=False),
            (engine.llm, engine.tts, tools),
            list(context),  # its tool calls and results stay in its own copy
            self._emit,
            asyncio.get_running_loop().time,
        )
        task = asyncio.get_running_loop().create_task(self._run(response), name=response_id)
        self._tasks[response_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(response_id, None))
        return response_id

    def running(self) -> list[str]:
        """The ids of those still running."""
        return list(self._tasks)

    def cancel(self, response_id: str) -> bool:
        """Stop one that is running; False when there is none of that id."""
        task = self._tasks.get(response_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, response: SpokenResponse) -> None:
        self._emit(ev.ResponseStarted(response.response_id, 0, response.config.speak))
        status: Status = "cancelled"
        refused = self._engine.refusal()  # as the engine's own responses are refused
        try:
            if refused is not None:
                status = "failed"
                return
            await response.run()
            status = "incomplete" if response.limited else "completed"
        except Exception as error:  # a provider's failure: said, and the session goes on
            status = "failed"
            log.warning("out-of-band response failed: %s", error, exc_info=error)
            retryable = isinstance(error, ProviderError) and error.retryable
            self._emit(ev.EngineError(f"{type(error).__name__}: {error}", retryable))
        finally:
            self._finish(response, status, refused)

    def _finish(
        self, response: SpokenResponse, status: Status, refused: ev.ResponseRefusal | None
    ) -> None:
        recorder = response.recorder
        heard = response.heard_text()
        recorder.heard_text, recorder.output_audio_s = heard, response.played_ms / 1000
        self._emit(ev.ResponseDone(response.response_id, status, heard, refused=refused))
        self._emit(ev.TurnCompleted(recorder.finish(interrupted=status == "cancelled")))
