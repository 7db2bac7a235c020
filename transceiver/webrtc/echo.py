"""The echo agent: plays back to the client the audio it receives (test/diagnostic mode).

I/O layer (an aiortc MediaStreamTrack). It stands in for the voice pipeline so media can be
tested both ways end to end: a client sending a tone hears the same tone back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.frame import Frame


class EchoTrack(MediaStreamTrack):
    """An outgoing audio track whose frames are the frames received on ``source``."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self._source = source
        self.frames_echoed = 0

    async def recv(self) -> Frame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame = await self._source.recv()
        except MediaStreamError:
            self.stop()
            raise
        if not isinstance(frame, Frame):
            raise MediaStreamError("the echo agent plays back decoded audio frames only")
        self.frames_echoed += 1
        return frame


class EchoAgent:
    """The diagnostic agent: media echoed, no events (the ``oai-events`` channel is ignored)."""

    def __init__(self, requested: Mapping[str, Any] | None = None) -> None:
        self.track: EchoTrack | None = None

    def attach_audio(self, track: MediaStreamTrack) -> MediaStreamTrack | None:
        self.track = EchoTrack(track)
        return self.track

    def attach_channel(self, channel: Any) -> None:
        return None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        if self.track is not None:
            self.track.stop()
