"""Which transceivers a worker forwards to: ``RELAY_TRANSCEIVERS`` resolved again and again.

Pure: answers and times are handed in, changes come out; ``relay.discovery`` does the lookups
on the worker's event loop and applies the changes to the ``Router``.

An entry of ``RELAY_TRANSCEIVERS`` is an IP literal (fixed for the life of the process) or a DNS
name, which may stand for many transceivers (a headless Service answers with one A record per
pod). The set a worker forwards to is the union of the fixed addresses and every name's last
successful answer, plus the addresses that left it recently:

- **A failed lookup changes nothing.** The name keeps its last answer (a DNS outage must not
  empty the set while calls run); a name that never answered contributes nothing yet and is
  retried every refresh. Failures are counted, and the names failing now are reported.
- **An address no answer names any more is removed only when both** it has been missing for
  ``grace_s`` **and** no route of this worker points to it. The grace rides out answers that
  briefly omit a live transceiver (EndpointSlice churn, a resolver handing back part of a
  set). The route rule protects calls: a transceiver that is draining hands its calls over
  while its clients still send through this relay, and its name may leave DNS before they
  have moved (a Service that does not publish not-ready addresses drops it at once); until
  the last of those routes idles out (``RELAY_ROUTE_IDLE_S`` after its client stops), its
  media keeps flowing both ways. Removal is what turns an address back into a stranger: its
  datagrams on the link are dropped and a ufrag naming it is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

Address = tuple[str, int]


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalized(address: Address) -> Address:
    return str(ipaddress.ip_address(address[0])), address[1]


@dataclass(frozen=True)
class Change:
    """What one ``settle`` changed."""

    added: frozenset[Address]
    removed: frozenset[Address]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class TransceiverDirectory:
    """The configured entries, each name's last answer, and the addresses on their way out."""

    def __init__(self, entries: Sequence[Address], grace_s: float) -> None:
        self.grace_s = grace_s
        self.names: tuple[Address, ...] = tuple(e for e in entries if not is_ip_literal(e[0]))
        self.fixed = frozenset(normalized(e) for e in entries if is_ip_literal(e[0]))
        self.answers: dict[Address, frozenset[Address]] = {}
        # name -> why its last lookup failed ("not resolved yet" until its first answer)
        self.failing: dict[Address, str] = dict.fromkeys(self.names, "not resolved yet")
        self.missing_since: dict[Address, float] = {}
        self.current: frozenset[Address] = self.fixed

    def resolved(self, name: Address, addresses: Iterable[Address]) -> bool:
        """A name answered; True if it was failing before (it recovered)."""
        self.answers[name] = frozenset(normalized(a) for a in addresses)
        return self.failing.pop(name, None) is not None

    def failed(self, name: Address, error: str) -> bool:
        """A name's lookup failed (its last answer stands); True if it was answering before."""
        was_answering = name not in self.failing
        self.failing[name] = error
        return was_answering

    def settle(self, now: float, links_in_use: Callable[[], Collection[Address]]) -> Change:
        """Fold the answers into ``current``. ``links_in_use`` (the transceivers this worker's
        routes point to) is asked only when an address has outlived its grace."""
        answered = set(self.fixed)
        for addresses in self.answers.values():
            answered |= addresses
        for address in self.current - answered:
            self.missing_since.setdefault(address, now)
        for address in answered & self.missing_since.keys():
            del self.missing_since[address]
        overdue = {a for a, since in self.missing_since.items() if now - since >= self.grace_s}
        if overdue:
            overdue -= set(links_in_use())
        for address in overdue:
            del self.missing_since[address]
        new = frozenset(answered | self.missing_since.keys())
        change = Change(new - self.current, self.current - new)
        self.current = new
        return change
