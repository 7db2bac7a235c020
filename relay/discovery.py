"""Look up ``RELAY_TRANSCEIVERS``' names on the worker's event loop, off the packet path.

I/O layer (asyncio on the worker's uvloop). One task per worker (``TransceiverDiscovery.run``,
kept alive by ``relay.restarts``: a crash is logged with its traceback, counted in
``relay_task_crashes_total{task="transceiver discovery"}`` and the task restarted) asks for
every name each ``timing.transceivers_refresh_s``, all names at once, through the loop's
``getaddrinfo`` (uvloop runs it on libuv's thread pool, so the forwarding callbacks never wait
for DNS). A round ends when every lookup has answered or failed, and the next starts a refresh
later: a resolver that hangs delays the next round but never piles lookups up. A client naming
a transceiver the worker does not know yet (a pod the autoscaler just added, whose first
caller got here before the next round) wakes the task early, at most once a second.

What the answers mean is ``relay.transceivers``' business; this module hands them over, counts
the failures, logs each name that starts or stops failing (once, not every round) and tells the
worker what changed (``on_change``): the worker updates its ``Router`` and sends the keyed HELLO
to each new address at once, so a new transceiver takes its datagrams from the first one.

The lookup is injectable (``Resolve``): the unit tests hand in answers that change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, MutableSequence, Sequence

from relay import counters as c
from relay.timing import RelayTiming
from relay.transceivers import Address, Change, TransceiverDirectory

log = logging.getLogger(__name__)

# (host, port, socket family) -> the addresses it stands for; raises OSError when it cannot tell
Resolve = Callable[[str, int, int], Awaitable[Sequence[Address]]]
EARLY_ROUND_SPACING_S = 1.0  # the earliest a woken round follows the last one


async def getaddrinfo_addresses(host: str, port: int, family: int) -> list[Address]:
    """The loop's ``getaddrinfo`` (never the blocking ``socket.getaddrinfo`` on the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=family, type=socket.SOCK_DGRAM
    )
    return sorted({(str(info[4][0]), int(info[4][1])) for info in infos})


class TransceiverDiscovery:
    """The lookup task of one worker: answers into ``directory``, changes to ``on_change``."""

    def __init__(
        self,
        directory: TransceiverDirectory,
        family: int,
        timing: RelayTiming,
        counts: MutableSequence[int],
        on_change: Callable[[Change], None],
        links_in_use: Callable[[], Collection[Address]],
        resolve: Resolve = getaddrinfo_addresses,
        who: str = "relay worker",
    ) -> None:
        self.directory = directory
        self.family = family
        self.timing = timing
        self.counts = counts
        self.on_change = on_change
        self.links_in_use = links_in_use
        self.resolve = resolve
        self.who = who
        self._wake = asyncio.Event()
        self.rounds = 0

    def wake(self) -> None:
        """Look again soon (at most once a second): a client named an unknown transceiver."""
        self._wake.set()

    async def run(self) -> None:
        """Rounds until cancelled: at once, then every refresh interval or when woken."""
        loop = asyncio.get_running_loop()
        spacing_s = min(EARLY_ROUND_SPACING_S, self.timing.transceivers_refresh_s)
        while True:
            started_s = loop.time()
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timing.transceivers_refresh_s):
                    await self._wake.wait()
            self._wake.clear()
            early_s = started_s + spacing_s - loop.time()
            if early_s > 0:
                await asyncio.sleep(early_s)

    async def refresh(self) -> Change:
        """One round: look every name up, fold the answers in, report what changed."""
        names = self.directory.names
        answers = await asyncio.gather(*(self._lookup(host, port) for host, port in names))
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, str):
                self.counts[c.LOOKUPS_FAILED] += 1
                if self.directory.failed(name, answer):
                    log.warning(
                        "%s: RELAY_TRANSCEIVERS name %s:%d does not resolve (%s); its last "
                        "answer stands, asking again every %g s",
                        self.who,
                        *name,
                        answer,
                        self.timing.transceivers_refresh_s,
                    )
            elif self.directory.resolved(name, answer):
                log.info("%s: %s:%d resolves: %s", self.who, *name, _text(answer))
        now_s = asyncio.get_running_loop().time()
        change = self.directory.settle(now_s, self.links_in_use)
        self.counts[c.NAMES_UNRESOLVED] = len(self.directory.failing)
        self.counts[c.TRANSCEIVERS] = len(self.directory.current)
        self.rounds += 1
        if change:
            self.counts[c.TRANSCEIVERS_ADDED] += len(change.added)
            self.counts[c.TRANSCEIVERS_REMOVED] += len(change.removed)
            log.info(
                "%s: transceivers now %s (added %s, removed %s)",
                self.who,
                _text(self.directory.current),
                _text(change.added),
                _text(change.removed),
            )
            self.on_change(change)
        return change

    async def _lookup(self, host: str, port: int) -> Sequence[Address] | str:
        """The addresses, or why there are none (an OSError: gaierror, timeouts, refusals)."""
        try:
            found = await self.resolve(host, port, self.family)
        except OSError as error:
            return str(error) or type(error).__name__
        if not found:
            return "no address of the link's IP family"
        return found


def _text(addresses: Collection[Address]) -> str:
    shown = sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses)
    return ", ".join(shown) if shown else "none"
