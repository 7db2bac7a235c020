"""OpenAI's ``idle_timeout_ms`` (server_vad): silence after an answer makes the server answer.

I/O layer (one loop timer). The timeout runs from the end of the last answer's audio: over
WebRTC from its ``OutputStopped`` (the response is done before its audio has played, so while
it plays nothing is quiet); over WebSocket the client plays the audio after
``response.done``, so its duration is added. Speech, a commit or another response stops it;
when it runs out while the user is silent and no response runs, ``fire`` is called with the
input audio's offsets (``audio_start_ms``, ``audio_end_ms``) of the silent stretch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pipeline import events as ev

_STOPS = (ev.SpeechStartedEvent, ev.ResponseStarted, ev.InputCommitted)


class IdleTimeout:
    def __init__(
        self,
        fire: Callable[[int, int], None],
        quiet: Callable[[], bool],
        input_position_ms: Callable[[], int],
    ) -> None:
        self._fire = fire
        self._quiet = quiet
        self._position_ms = input_position_ms
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at_ms = 0
        self.timeout_ms: int | None = None  # None: off
        self.audio_after_done = False  # WebSocket: the answer plays after response.done

    def observe(self, event: ev.EngineEvent) -> None:
        if isinstance(event, ev.TurnCompleted) and self._quiet():
            playing_s = event.record.output_audio_s if self.audio_after_done else 0.0
            self._arm(playing_s)
        elif isinstance(event, ev.OutputStopped) and not self.audio_after_done:
            self._arm(0.0)  # over WebRTC, after the response was done (``_due`` checks quiet)
        elif isinstance(event, _STOPS):
            self.cancel()

    def configure(self, timeout_ms: int | None) -> None:
        if timeout_ms != self.timeout_ms:
            self.cancel()
        self.timeout_ms = timeout_ms

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, playing_s: float) -> None:
        self.cancel()
        if self.timeout_ms is None:
            return
        self._armed_at_ms = self._position_ms()
        delay_s = playing_s + self.timeout_ms / 1000
        self._handle = asyncio.get_running_loop().call_later(delay_s, self._due)

    def _due(self) -> None:
        self._handle = None
        if self.timeout_ms is None or not self._quiet():
            return  # the user spoke or a response runs: no idle turn
        end_ms = self._position_ms()
        self._fire(max(self._armed_at_ms, end_ms - self.timeout_ms), end_ms)
