"""``python -m loadtest.link_cost``: the link socket's CPU per call-second, batched I/O or not.

A µ-benchmark beside ``loadtest.media_cost``: a transceiver's real ``Link`` on loopback with
``--calls`` sessions, and a relay process that proves the keyring (HELLO) and forwards a
media-sized datagram per session every 20 ms (``--arrivals spread``: one every 20/N ms, as
independent callers' packets come; ``burst``: all N at once, as after a stall). Each 20 ms one
loop timer sends a datagram per session through the link, as the lean media tick does. The
link process's CPU (``time.process_time``, so other load on the machine is noise, not cost) over
``--seconds`` is given per call-second and per datagram (in + out), for each ``--batches`` value
in order (``LinkPolicy.io_batch``: 1 is one ``sendto``/``recvfrom`` per datagram; ``64@0``: with
``read_interval_s`` 0, read whenever readable), so variants interleave in one run:
``--batches 64,64@0,64,64@0``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import time
from typing import Any

from relay.wire.header import header_for
from relay.wire.hello import seal_hello
from relay.wire.ufrag import Keyring
from transceiver.webrtc.link import Link
from transceiver.webrtc.link_policy import LinkPolicy

KEYRING = Keyring.parse("9:" + "5e" * 32)
FRAME_S = 0.02
PAYLOAD = b"\x80" + bytes(99)  # a first byte of SRTP; the size of a 32 kbit/s Opus packet's
WARMUP_S = 1.0
DEFAULT = LinkPolicy().read_interval_s


def client(i: int) -> tuple[str, int]:
    return f"10.0.{i // 250}.{i % 250 + 1}", 40_000 + i


def relay(link: tuple[str, int], calls: int, seconds: float, arrivals: str) -> None:
    """The relay worker's side (its own process): HELLO, then ``calls`` datagrams per 20 ms."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind(("127.0.0.1", 0))
    sock.sendto(seal_hello(KEYRING, link, time.time()), link)
    datagrams = [header_for(client(i)) + PAYLOAD for i in range(calls)]
    gap_s = FRAME_S / calls if arrivals == "spread" else 0.0
    start = time.monotonic()
    for tick in range(int(seconds / FRAME_S)):
        for i, datagram in enumerate(datagrams):
            wait_s = start + tick * FRAME_S + i * gap_s - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)  # pacing the load, not synchronising anything
            sock.sendto(datagram, link)
        sock.setblocking(False)
        for _ in range(4 * calls):  # what the link sent: read and thrown away
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        sock.setblocking(True)
    sock.close()


class Counting(asyncio.DatagramProtocol):
    received = 0

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        Counting.received += 1


async def measure(
    calls: int, seconds: float, batch: int, arrivals: str, read_interval_s: float = 0.0
) -> dict[str, Any]:
    policy = LinkPolicy(io_batch=batch, read_interval_s=read_interval_s)
    link = Link(("127.0.0.1", 0), KEYRING, policy=policy)
    address = await link.start()
    sessions = []
    for i in range(calls):
        session = link.open_session(f"call{i:04d}")
        session.transport(4, address).set_protocol(Counting())
        sessions.append(session)
    process = multiprocessing.get_context("spawn").Process(
        target=relay, args=(address, calls, WARMUP_S + seconds + 0.5, arrivals)
    )
    process.start()
    loop = asyncio.get_running_loop()

    def tick(due_s: float) -> None:
        for i, session in enumerate(sessions):
            session.send(PAYLOAD, client(i))
        loop.call_at(due_s + FRAME_S, tick, due_s + FRAME_S)

    loop.call_soon(tick, loop.time())
    await asyncio.sleep(WARMUP_S)  # the relay's HELLO is in, the routes learned
    received, sent = Counting.received, link.counters["datagrams_out"]
    cpu_s, load = time.process_time(), os.getloadavg()
    await asyncio.sleep(seconds)  # the measuring window
    cpu_s = time.process_time() - cpu_s
    received, sent = Counting.received - received, link.counters["datagrams_out"] - sent
    await link.aclose()
    process.join(10)
    return {
        "batch": batch,
        "read_interval_s": read_interval_s,
        "arrivals": arrivals,
        "calls": calls,
        "cpu_ms_per_call_s": round(1000 * cpu_s / (calls * seconds), 3),
        "us_per_datagram": round(1e6 * cpu_s / max(1, received + sent), 2),
        "received_per_call_s": round(received / (calls * seconds), 1),
        "sent_per_call_s": round(sent / (calls * seconds), 1),
        "loadavg": " ".join(f"{x:.2f}" for x in load),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.link_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--batches",
        default="64,64@0,64,64@0",
        help="LinkPolicy.io_batch, in order; BATCH@S: read_interval_s S (0: whenever readable)",
    )
    parser.add_argument("--arrivals", choices=("spread", "burst"), default="spread")
    args = parser.parse_args()
    for variant in args.batches.split(","):
        batch, _, interval = variant.partition("@")
        result = asyncio.run(
            measure(args.calls, args.seconds, int(batch), args.arrivals, float(interval or DEFAULT))
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
