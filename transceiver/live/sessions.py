"""The Live sessions this transceiver runs, by their session id: where a sideband finds the
session it attaches to (``transceiver.http.live_websocket``).

A session is added once its contract is on it, with the event that is set when it ends (a
WebRTC call's ``Call.ended``, a primary WebSocket's end); an ended session is never found, and
the ended ones are dropped whenever another is added, so the map holds at most the sessions
running plus those ended since the last one began.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from transceiver.live.contract import LiveContract


@dataclass(frozen=True)
class RunningLive:
    contract: LiveContract
    ended: asyncio.Event


class LiveSessions:
    def __init__(self) -> None:
        self._running: dict[str, RunningLive] = {}

    def add(self, contract: LiveContract, ended: asyncio.Event) -> RunningLive:
        for session_id, running in list(self._running.items()):
            if running.ended.is_set():
                del self._running[session_id]
        running = RunningLive(contract, ended)
        self._running[contract.session_id] = running
        return running

    def get(self, session_id: str) -> RunningLive | None:
        running = self._running.get(session_id)
        if running is None or running.ended.is_set():
            return None
        return running

    def __len__(self) -> int:
        return sum(not running.ended.is_set() for running in self._running.values())
