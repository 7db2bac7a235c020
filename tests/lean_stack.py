"""A pipeline transceiver on the lean media path with offline providers, behind a loopback
relay: the stack the lean media path's end-to-end tests call through.

``python -m transceiver --agent pipeline --media-path lean`` as its own process (pocketsphinx
hears, piper speaks with its noise off, so a run says what the last one said; no provider
key or URL taken from the host), its link to the relay the test chooses (``relay_for``:
``LoopbackRelay`` or one that harms the traffic).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from deploy.processes import (
    Address,
    LoopbackRelay,
    free_port,
    random_keys,
    text,
    transceiver_process,
)

READY_TIMEOUT_S = 90.0
OFFLINE_ENV = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}  # offline whatever the host
QUIET_PIPER_ENV = {"PIPELINE_PIPER_NOISE_SCALE": "0", "PIPELINE_PIPER_NOISE_W_SCALE": "0"}

R = TypeVar("R", bound=LoopbackRelay)


@dataclass
class LeanStack(Generic[R]):
    relay: R
    base_url: str  # the transceiver's HTTP


@asynccontextmanager
async def lean_stack(
    log_dir: Path, relay_for: Callable[[Address, str], R]
) -> AsyncIterator[LeanStack[R]]:
    """The transceiver ready behind ``relay_for(its link address, its keys)``; its logs in
    ``log_dir``."""
    link = ("127.0.0.1", free_port())
    http = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    keys = random_keys()
    relay = relay_for(link, keys)
    public = await relay.start()
    process = transceiver_process(
        "transceiver", link, http, text(public), keys, log_dir, OFFLINE_ENV | QUIET_PIPER_ENV,
        agent="pipeline", media_path="lean",
    )  # fmt: skip
    try:
        await process.start().ready(timeout_s=READY_TIMEOUT_S)
        yield LeanStack(relay, f"http://{text(http)}")
    finally:
        await process.stop()
        relay.close()
