"""A bad network between a client and the stack: a network namespace for the client, a veth
pair to the host, and impairments on the client's UDP in both directions.

- ``ImpairedPath`` makes the namespace (``ip netns add``) and the veth pair (a /30 chosen
  free among the host's addresses), and removes both by name: only what it made.
- ``Impairment`` is one condition: random loss (nftables ``numgen random``), delay with
  jitter (netfilter's queue, read by ``loadtest.delay_queue``: this kernel has no ``tc
  netem``), and an outage (``ImpairedPath.outage``: the host's address in an nftables set
  whose elements time out, every UDP datagram to or from it dropped meanwhile).
- The queue rules are xtables' ``NFQUEUE`` target, written with ``iptables-restore``
  (iptables-nft: nftables running the xtables target): nft's own ``queue`` statement is
  refused by this kernel ("Could not process rule: No such file or directory", no
  ``nft_queue``), while ``nfnetlink_queue`` itself is there.
- ``NetnsLoop`` runs an asyncio loop on a thread that lives in the namespace: sockets made on
  it (an aiortc peer's, its signalling's) are the client's.

Only UDP is impaired: the call's media and data channel (STUN, DTLS, SRTP, SCTP) are; the
HTTP signalling that sets the call up is not the subject.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from deploy.processes import Process
from loadtest.nfqueue import HOOK_LOCAL_IN, HOOK_LOCAL_OUT

CLONE_NEWNET = 0x40000000
NFT_TABLE = "voicerelay_impair"
DONE_LINE = "delay queue done"  # loadtest.delay_queue's last line
QUEUE = 7  # the namespace's own queue numbers: no other reader can be bound there
VETH_POOL = ipaddress.IPv4Network("10.203.0.0/16")  # the /30s a path picks from
COMMAND_TIMEOUT_S = 30.0
T = TypeVar("T")


class ImpairmentError(RuntimeError):
    """A command that sets the path up failed (its words in the message)."""


@dataclass(frozen=True)
class Impairment:
    """One condition on the client's UDP, both directions."""

    name: str
    loss_percent: int = 0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    outage_ms: int = 0  # the length of ``ImpairedPath.outage``; 0: none

    def __post_init__(self) -> None:
        if not 0 <= self.loss_percent < 100:
            raise ValueError(f"loss {self.loss_percent} % is not in 0..99")
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(f"jitter {self.jitter_ms} ms is not in 0..delay {self.delay_ms} ms")
        if self.outage_ms < 0:
            raise ValueError(f"outage {self.outage_ms} ms is negative")

    @property
    def delayed(self) -> bool:
        return self.delay_ms > 0


# The conditions of issue 17: each alone.
LOSS = Impairment("loss 5 %", loss_percent=5)
JITTER = Impairment("delay 40 ± 8 ms", delay_ms=40.0, jitter_ms=8.0)
OUTAGE = Impairment("outage 300 ms", outage_ms=300)
CONDITIONS = (LOSS, JITTER, OUTAGE)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move the calling thread into the network namespace ``name`` (``setns(2)``)."""
    fd = os.open(Path("/run/netns") / name, os.O_RDONLY)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


def _run(argv: list[str], stdin: str = "") -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise ImpairmentError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def _taken_networks() -> list[ipaddress.IPv4Network]:
    listed = _run(["ip", "-4", "-o", "addr", "show"]).split()
    return [ipaddress.IPv4Interface(word).network for word in listed if "/" in word]


def free_slash30() -> ipaddress.IPv4Network:
    """A /30 of ``VETH_POOL`` that overlaps no address on the host (random, then checked)."""
    taken = _taken_networks()
    for _ in range(64):
        index = secrets.randbelow(VETH_POOL.num_addresses // 4)
        candidate = ipaddress.IPv4Network(f"{VETH_POOL[index * 4]}/30")
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise ImpairmentError(f"no free /30 in {VETH_POOL} after 64 draws")


def ruleset(impairment: Impairment, host: str, device: str) -> str:
    """The namespace's nftables table for ``impairment`` on the client's end of the veth
    (``device``): UDP to and from ``host`` only. Drops happen at the device (netdev ingress
    and egress), as on a link: a drop in the output hook would fail the sender's ``sendto``
    with EPERM, which no lost packet does."""
    lines = [f"table netdev {NFT_TABLE} {{", "  set outage {", "    type ipv4_addr; flags timeout;"]
    lines += ["  }"]
    for chain, hook, peer in (("to_host", "egress", "daddr"), ("from_host", "ingress", "saddr")):
        match = f"meta l4proto udp ip {peer} {host}"
        lines += [f"  chain {chain} {{"]
        lines += [f'    type filter hook {hook} device "{device}" priority -10; policy accept;']
        lines += [f"    {match} ip {peer} @outage counter drop"]
        if impairment.loss_percent:
            lines += [f"    {match} numgen random mod 100 < {impairment.loss_percent} counter drop"]
        lines += ["  }"]
    return "\n".join([*lines, "}", ""])


def queue_rules(impairment: Impairment, host: str) -> str:
    """The namespace's xtables filter table: UDP to and from ``host`` queued if delayed."""
    rules = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    if impairment.delayed:
        target = f"-j NFQUEUE --queue-num {QUEUE}"
        rules += [f"-A OUTPUT -p udp -d {host} {target}", f"-A INPUT -p udp -s {host} {target}"]
    return "\n".join([*rules, "COMMIT", ""])


@dataclass(frozen=True)
class Hits:
    """Datagrams a condition dropped or held, per direction, and the counts they came from."""

    to_host: int
    from_host: int
    dropped: dict[str, int]  # per nftables rule: "to_host loss", "from_host outage", ...
    delay_queue: dict[str, int]  # loadtest.delay_queue's counts


class ImpairedPath:
    """The client's namespace and its veth pair; ``apply`` sets a condition on it."""

    def __init__(self, log_dir: Path) -> None:
        tag = f"{os.getpid() % 100_000}{secrets.token_hex(2)}"
        self.netns = f"vr-impair-{tag}"
        self.host_link, self.client_link = f"vri{tag}h", f"vri{tag}c"  # at most 15 characters
        self.log_dir = log_dir
        self.host = ""  # the host's end of the veth: what the client reaches the stack at
        self.client = ""
        self.impairment = Impairment("none")
        self._delay: Process | None = None

    def __enter__(self) -> ImpairedPath:
        network = free_slash30()
        self.host, self.client = str(network[1]), str(network[2])
        _run(["ip", "netns", "add", self.netns])
        try:
            self._link(network.prefixlen)
        except BaseException:
            self.remove()
            raise
        return self

    def _link(self, prefix: int) -> None:
        _run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name",
              self.client_link, "netns", self.netns])  # fmt: skip
        _run(["ip", "addr", "add", f"{self.host}/{prefix}", "dev", self.host_link])
        _run(["ip", "link", "set", self.host_link, "up"])
        inside = ["ip", "-n", self.netns]
        _run([*inside, "addr", "add", f"{self.client}/{prefix}", "dev", self.client_link])
        _run([*inside, "link", "set", self.client_link, "up"])
        _run([*inside, "link", "set", "lo", "up"])

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Delete the namespace (its end of the veth and its rules go with it) and our link."""
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, timeout=30)

    @property
    def _inside(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def nft(self, script: str) -> str:
        return _run([*self._inside, "nft", "-f", "-"], script)

    async def apply(self, impairment: Impairment) -> None:
        """Replace the condition: the table, and the delay queue's reader if it delays."""
        await self._stop_delay()
        flush = f"table netdev {NFT_TABLE} {{}}\ndelete table netdev {NFT_TABLE}\n"
        if impairment.delayed:  # the reader first: a queue nobody reads drops what it gets
            self._delay = _delay_process(self.netns, impairment, self.log_dir)
            await self._delay.start().ready(timeout_s=30)
        await asyncio.to_thread(self.nft, flush + ruleset(impairment, self.host, self.client_link))
        queues = queue_rules(impairment, self.host)
        await asyncio.to_thread(_run, [*self._inside, "iptables-restore"], queues)
        self.impairment = impairment

    async def _stop_delay(self) -> dict[str, int]:
        """Stop the delay queue's reader, if one runs; its counts (``{}`` if none ran)."""
        if self._delay is None:
            return {}
        process, self._delay = self._delay, None
        if await process.stop() != 0:
            raise ImpairmentError(f"the delay queue failed:\n{process.log_tail()}")
        done = [line for line in process.lines if line.startswith(DONE_LINE)]
        return json.loads(done[0][len(DONE_LINE) :]) if done else {}

    async def hits(self) -> Hits:
        """What the condition did to the traffic so far. Stops the delay queue's reader: call
        it once a call is over."""
        dropped = await asyncio.to_thread(self.counters)
        held = await self._stop_delay()
        to_host = held.get(f"held_hook_{HOOK_LOCAL_OUT}", 0)
        from_host = held.get(f"held_hook_{HOOK_LOCAL_IN}", 0)
        to_host += sum(n for rule, n in dropped.items() if rule.startswith("to_host"))
        from_host += sum(n for rule, n in dropped.items() if rule.startswith("from_host"))
        return Hits(to_host, from_host, dropped, held)

    async def outage(self) -> None:
        """Drop every UDP datagram to and from the host for the condition's ``outage_ms``:
        the kernel expires the set's element, so the length does not depend on us."""
        element = f"{{ {self.host} timeout {self.impairment.outage_ms}ms }}"
        await asyncio.to_thread(self.nft, f"add element netdev {NFT_TABLE} outage {element}\n")

    def counters(self) -> dict[str, int]:
        """Datagrams each rule dropped: ``{"to_host loss": n, "from_host outage": n, ...}``."""
        return _rule_counts(_run([*self._inside, "nft", "list", "table", "netdev", NFT_TABLE]))

    async def aclose(self) -> None:
        await self._stop_delay()
        self.remove()


def _rule_counts(listed: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    chain = ""
    for line in listed.splitlines():
        words = line.split()
        if words[:1] == ["chain"]:
            chain = words[1]
        elif "counter" in words:
            kind = "outage" if "@outage" in words else "loss"
            counts[f"{chain} {kind}"] = int(words[words.index("packets") + 1])
    return counts


def _delay_process(netns: str, impairment: Impairment, log_dir: Path) -> Process:
    argv = ["-m", "loadtest.delay_queue", "--netns", netns, "--queue", str(QUEUE)]
    argv += ["--delay-ms", str(impairment.delay_ms), "--jitter-ms", str(impairment.jitter_ms)]
    return Process("delay-queue", argv, "delay queue ready", log_dir)


class NetnsLoop:
    """An asyncio loop on a thread of its own inside network namespace ``netns``."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._entered = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"netns {netns}", daemon=True)

    def _serve(self) -> None:
        try:
            enter_netns(self.netns)
        except BaseException as exc:  # reported by __aenter__, in the caller's thread
            self._failure = exc
            return
        finally:
            self._entered.set()
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def __aenter__(self) -> NetnsLoop:
        self._thread.start()
        await asyncio.to_thread(self._entered.wait, COMMAND_TIMEOUT_S)
        if self._failure is not None:
            raise ImpairmentError(f"could not enter {self.netns}") from self._failure
        return self

    async def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the namespace's loop; its result here."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self._thread.join, COMMAND_TIMEOUT_S)
        if not self._thread.is_alive():
            self.loop.close()


def nft_available() -> str | None:
    """Why this host cannot make an impaired path (``None``: it can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need Linux and root"
    if not Path("/proc/net/netfilter/nfnetlink_queue").exists():
        return "the kernel has no nfnetlink_queue (/proc/net/netfilter/nfnetlink_queue)"
    tools = {"ip": "iproute2", "nft": "nftables", "iptables-restore": "iptables"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (Debian package {package})"
    return None
