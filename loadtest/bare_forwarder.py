"""A bare Python forwarding loop: the benchmark's second reference row.

The least Python can do for the relay's job: blocking ``recvfrom``/``sendto``, one thread per
socket, the link header cached per client address, no routing, no STUN, no counters. It shows
how much of the gap to the C reference is the interpreter itself rather than the relay's logic.

    python -m loadtest.bare_forwarder --public IP:PORT --transceiver IP:PORT --workers N

Each worker is a forked process with its own SO_REUSEPORT public socket and link socket; it
sends HELLO to the transceiver every second like a relay worker. Prints ``bare ready``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time

from relay.wire.header import HEADER_BYTES, ControlMessage, ControlType, header_for, parse_header

MAX_DATAGRAM_BYTES = 2048
SOCKET_BUFFER_BYTES = 4 << 20
HELLO_INTERVAL_S = 1.0
FLAG_BYTE = 1
Address = tuple[str, int]


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _udp_socket(bind_to: Address, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.bind(bind_to)
    return sock


def pump_from_clients(public: socket.socket, link: socket.socket, transceiver: Address) -> None:
    """client -> transceiver: header + payload."""
    headers: dict[Address, bytes] = {}
    receive, send = public.recvfrom, link.sendto
    while True:
        data, client = receive(MAX_DATAGRAM_BYTES)
        header = headers.get(client)
        if header is None:
            header = headers[client] = header_for(client)
        send(header + data, transceiver)


def pump_to_clients(public: socket.socket, link: socket.socket, transceiver: Address) -> None:
    """transceiver -> client: strip the header, send from the public port."""
    clients: dict[bytes, Address] = {}
    receive, send = link.recvfrom, public.sendto
    while True:
        data, source = receive(MAX_DATAGRAM_BYTES)
        if source != transceiver or len(data) <= HEADER_BYTES or data[FLAG_BYTE] & 1:
            continue
        key = data[:HEADER_BYTES]
        client = clients.get(key)
        if client is None:
            client = clients[key] = parse_header(key).client
        send(data[HEADER_BYTES:], client)


def say_hello(link: socket.socket, transceiver: Address) -> None:
    # Unsigned: only the bench's stand-in transceiver (loadtest.sessions.LinkPeer) hears it.
    hello = bytes(ControlMessage(ControlType.HELLO))
    while True:
        link.sendto(hello, transceiver)
        time.sleep(HELLO_INTERVAL_S)


def serve(public: socket.socket, link: socket.socket, transceiver: Address) -> None:
    back = threading.Thread(target=pump_to_clients, args=(public, link, transceiver), daemon=True)
    hello = threading.Thread(target=say_hello, args=(link, transceiver), daemon=True)
    back.start()
    hello.start()
    pump_from_clients(public, link, transceiver)


def start_worker(public_address: Address, transceiver: Address) -> int:
    public = _udp_socket(public_address, reuseport=True)
    link = _udp_socket((transceiver[0], 0), reuseport=False)
    pid = os.fork()
    if pid == 0:
        try:
            serve(public, link, transceiver)
        finally:
            os._exit(0)
    public.close()
    link.close()
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bare_forwarder")
    parser.add_argument("--public", required=True, type=_address)
    parser.add_argument("--transceiver", required=True, type=_address)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    pids = [start_worker(args.public, args.transceiver) for _ in range(args.workers)]
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    print("bare ready", flush=True)
    signal.sigwait(stop_signals)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
