"""A userspace delay line for packets, over netfilter's queue: ``tc netem delay`` where the
kernel has no netem.

``python -m loadtest.delay_queue --netns NAME --queue N --delay-ms 40 --jitter-ms 8`` enters
the network namespace NAME, binds queue N over a raw netlink socket (``loadtest.nfqueue``) and
accepts each packet the ruleset queues there once its time has come (``loadtest.jitter``: a
draw of delay ± jitter, in order per direction: the hook it was queued from). It prints
``delay queue ready`` once bound, and on SIGTERM or SIGINT releases what it holds, prints its
counts (``delay queue done {json}``) and exits 0.

Settings are flags, each mirroring an ``IMPAIR_`` environment variable (``IMPAIR_QUEUE``,
``IMPAIR_DELAY_MS``, ``IMPAIR_JITTER_MS``, ``IMPAIR_SEED``).
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loadtest import nfqueue
from loadtest.impairment import enter_netns
from loadtest.jitter import JitterPolicy, JitterSchedule

READY_LINE = "delay queue ready"
DONE_LINE = "delay queue done"
COPY_RANGE_BYTES = 64  # the IP and UDP headers: enough to log, the kernel copies no more
RECEIVE_BUFFER_BYTES = 4 << 20
MAX_WAIT_S = 0.2  # the longest the loop sleeps, so a stop request is seen promptly
ACK_TIMEOUT_S = 5.0
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5


@dataclass(frozen=True)
class DelayQueueConfig:
    netns: str
    queue: int
    jitter: JitterPolicy

    @classmethod
    def from_args(cls, argv: Sequence[str], env: Mapping[str, str]) -> DelayQueueConfig:
        parser = argparse.ArgumentParser(prog="python -m loadtest.delay_queue")
        parser.add_argument("--netns", required=True, help="the network namespace to enter")
        parser.add_argument("--queue", type=int, default=int(env.get("IMPAIR_QUEUE", "0")))
        parser.add_argument("--delay-ms", type=float, default=_env(env, "IMPAIR_DELAY_MS", 40))
        parser.add_argument("--jitter-ms", type=float, default=_env(env, "IMPAIR_JITTER_MS", 8))
        parser.add_argument("--seed", type=int, default=int(env.get("IMPAIR_SEED", "0")))
        args = parser.parse_args(argv)
        if not 0 <= args.queue <= nfqueue.MAX_QUEUE:
            parser.error(f"--queue {args.queue} is not in 0..{nfqueue.MAX_QUEUE}")
        try:
            policy = JitterPolicy(args.delay_ms, args.jitter_ms, args.seed)
        except ValueError as exc:
            parser.error(str(exc))
        return cls(args.netns, args.queue, policy)


def _env(env: Mapping[str, str], name: str, default: float) -> float:
    return float(env.get(name, default))


class DelayQueue:
    """One bound queue: packets held on a heap by release time, released in that order."""

    def __init__(self, config: DelayQueueConfig) -> None:
        self.config = config
        self.schedule = JitterSchedule(config.jitter)
        self.counts: Counter[str] = Counter()
        self._held: list[tuple[float, int, int]] = []  # release time, packet id, queue
        self._seq = 0
        self._stopping = False
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nfqueue.NETLINK_NETFILTER)

    def stop(self, *_: object) -> None:
        self._stopping = True  # a signal handler: the loop sees it within MAX_WAIT_S

    def bind(self) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self._sock.bind((0, 0))
        self._request(nfqueue.bind_request(self.config.queue, self._next_seq()))
        copy = nfqueue.copy_packet_request(self.config.queue, COPY_RANGE_BYTES, self._next_seq())
        self._request(copy)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _request(self, message: bytes) -> None:
        """Send a request and wait for its acknowledgement; OSError if the kernel refuses."""
        self._sock.send(message)
        deadline_s = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline_s:
            if not select.select([self._sock], [], [], deadline_s - time.monotonic())[0]:
                break
            for reply in nfqueue.parse_messages(self._sock.recv(nfqueue.MAX_DATAGRAM_BYTES)):
                if isinstance(reply, nfqueue.Acknowledgement) and reply.seq == self._seq:
                    if reply.errno:
                        raise OSError(reply.errno, f"nfqueue request refused: {message[:20]!r}")
                    return
        raise TimeoutError(f"no acknowledgement from the kernel in {ACK_TIMEOUT_S} s")

    def run(self) -> None:
        while not self._stopping:
            wait_s = min(MAX_WAIT_S, max(0.0, self._next_release_s() - time.monotonic()))
            try:
                readable = select.select([self._sock], [], [], wait_s)[0]
            except InterruptedError:
                continue
            if readable:
                self._read()
            self._release(time.monotonic())
        self._release(float("inf"))

    def _next_release_s(self) -> float:
        return self._held[0][0] if self._held else float("inf")

    def _read(self) -> None:
        try:
            datagram = self._sock.recv(nfqueue.MAX_DATAGRAM_BYTES)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            self.counts["overruns"] += 1  # the kernel dropped queued packets' messages
            return
        try:
            messages = nfqueue.parse_messages(datagram)
        except nfqueue.NetlinkFormatError:
            self.counts["malformed"] += 1
            return
        for message in messages:
            self._take(message)

    def _take(self, message: nfqueue.Message) -> None:
        if isinstance(message, nfqueue.QueuedPacket):
            release_s = self.schedule.release_at_s(message.hook, time.monotonic())
            heapq.heappush(self._held, (release_s, message.packet_id, message.queue))
            self.counts[f"held_hook_{message.hook}"] += 1
        elif isinstance(message, nfqueue.Acknowledgement) and message.errno:
            self.counts["verdict_errors"] += 1
        elif isinstance(message, nfqueue.Unrecognised):
            self.counts["unrecognised"] += 1

    def _release(self, now_s: float) -> None:
        while self._held and self._held[0][0] <= now_s:
            _, packet_id, queue = heapq.heappop(self._held)
            self._sock.send(nfqueue.verdict(queue, packet_id, True, self._next_seq()))
            self.counts["released"] += 1

    def close(self) -> None:
        self._sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = DelayQueueConfig.from_args(argv if argv is not None else sys.argv[1:], os.environ)
    enter_netns(config.netns)
    delay_queue = DelayQueue(config)
    signal.signal(signal.SIGTERM, delay_queue.stop)
    signal.signal(signal.SIGINT, delay_queue.stop)
    try:
        delay_queue.bind()
        print(READY_LINE, flush=True)
        delay_queue.run()
    finally:
        delay_queue.close()
    print(DONE_LINE, json.dumps(dict(delay_queue.counts), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
