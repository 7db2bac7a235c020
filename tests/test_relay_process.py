"""The real ``python -m relay`` (2 workers) between a test-owned client and a test-owned
transceiver link socket, on loopback, IPv4 and IPv6."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from stun_samples import binding_request, signed_request

from deploy.waiting import wait_until
from relay.wire.header import (
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    ControlMessage,
    ControlType,
    header_for,
    parse_header,
)
from relay.wire.hello import open_hello
from relay.wire.ufrag import Keyring, derive_password, mint_ufrag

ROOT = Path(__file__).resolve().parent.parent
KEYS = "3:" + "c3" * 32
RING = Keyring.parse(KEYS)
START_TIMEOUT_S = 20.0
WAIT_S = 5.0
SRTP = b"\x80\x6f\x00\x01" + b"m" * 196


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free on 127.0.0.1 and ::1 right now (the relay binds it next)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as v4, socket.socket(socket.AF_INET6, kind) as v6:
            v4.bind(("127.0.0.1", 0))
            port = int(v4.getsockname()[1])
            try:
                v6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both loopbacks")


def link_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def udp(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(WAIT_S)
    return sock


@dataclass
class RelayProcess:
    process: subprocess.Popen[str]
    public_port: int
    http_port: int
    link: socket.socket  # the fake transceiver's link socket

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT_S) as response:
            text = response.read().decode()
        pattern = re.compile(r"^(\w+(?:\{[^}]*\})?) (\S+)$", re.M)
        return {name: float(value) for name, value in pattern.findall(text)}

    def drop_count(self, reason: str) -> float:
        return self.metrics().get(f'relay_dropped_packets_total{{reason="{reason}"}}', 0.0)

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5):
                return 200
        except urllib.error.HTTPError as error:
            return error.code

    def receive_data(self, timeout_s: float = WAIT_S) -> tuple[bytes, tuple[str, int]]:
        """The next non-control datagram on the link (HELLOs arrive all the time)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            self.link.settimeout(left)
            data, source = self.link.recvfrom(4096)
            if not parse_header(data).is_control:
                return data, source
        raise TimeoutError("no data datagram on the link")

    def worker_links(self) -> set[tuple[str, int]]:
        """Both workers' link addresses, from their HELLOs (each sends one per second)."""
        seen: set[tuple[str, int]] = set()
        deadline = time.monotonic() + WAIT_S
        while len(seen) < 2 and time.monotonic() < deadline:
            self.link.settimeout(max(deadline - time.monotonic(), 0.01))
            data, source = self.link.recvfrom(4096)
            if data[20:21] == b"\x01" and parse_header(data).is_control:
                seen.add(source)
        assert len(seen) == 2, f"HELLO from {len(seen)} workers"
        return seen


def worker_pids(relay_pid: int) -> list[int]:
    """The relay's worker processes (its other child is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{relay_pid}/task/{relay_pid}/children").read_text().split()
    return [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def start_relay(
    *extra: str, workers: int = 2, ports: tuple[int, int] | None = None
) -> tuple[subprocess.Popen[str], int, int]:
    public, http = ports or (free_port(), free_port(socket.SOCK_STREAM))
    argv = [sys.executable, "-m", "relay", "--public", f"127.0.0.1:{public},[::1]:{public}"]
    argv += ["--workers", str(workers), "--keys", KEYS, "--http", f"127.0.0.1:{http}", *extra]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(START_TIMEOUT_S) or process.stdout.readline() != "relay ready\n":
            stop(process)
            raise AssertionError("relay did not print 'relay ready'")
    return process, public, http


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()  # by this Popen's own pid
    return process.wait(5)


@pytest.fixture(scope="module")
def relay() -> Iterator[RelayProcess]:
    link = udp()
    process, public, http = start_relay("--transceivers", link_text(link))
    try:
        yield RelayProcess(process, public, http, link)
    finally:
        stop(process)
        link.close()


def authenticate(relay: RelayProcess, client: socket.socket) -> tuple[str, int]:
    """Send a valid binding request; return the worker link address that forwarded it."""
    request = signed_request(RING, relay.link.getsockname())
    host = client.getsockname()[0]
    client.sendto(request, (host, relay.public_port))
    data, worker = relay.receive_data()
    assert data == header_for(client.getsockname()[:2]) + request
    return worker


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_stun_then_media_forwarded_both_ways(relay: RelayProcess, host: str) -> None:
    with udp(host) as client:
        worker = authenticate(relay, client)
        client.sendto(SRTP, (host, relay.public_port))
        assert relay.receive_data() == (header_for(client.getsockname()[:2]) + SRTP, worker)
        relay.link.sendto(header_for(client.getsockname()[:2]) + b"\x17reply", worker)
        data, source = client.recvfrom(2048)
        assert (data, source[:2]) == (b"\x17reply", (host, relay.public_port))


def test_hello_then_routes_are_learned(relay: RelayProcess) -> None:
    with udp() as client:
        for worker in relay.worker_links():  # the kernel may hash the client to either one
            routes = ControlMessage(ControlType.ROUTES, (client.getsockname(),))
            relay.link.sendto(bytes(routes), worker)
        wait_until(lambda: relay.metrics()["relay_control_received_total"] >= 2, WAIT_S, "ROUTES")
        client.sendto(SRTP, ("127.0.0.1", relay.public_port))  # no STUN first
        data, _ = relay.receive_data()
        assert data == header_for(client.getsockname()) + SRTP


def test_forged_traffic_dropped_and_counted(relay: RelayProcess) -> None:
    link = relay.link.getsockname()
    ufrag = mint_ufrag(RING, link)
    forged_hint = ufrag[:8] + ("B" if ufrag[8] != "B" else "C") + ufrag[9:]
    forgeries = {
        "bad_ufrag_length": binding_request("h6vY", "p" * 22),  # a random browser-style ufrag
        "bad_ufrag_mac": binding_request(
            mint_ufrag(Keyring.parse("3:" + "77" * 32), link), "p" * 22
        ),
        "bad_ufrag_integrity": binding_request(ufrag, "not-the-derived-password"),
        "unknown_transceiver": signed_request(RING, ("127.0.0.1", 1)),
        "unknown_address": SRTP,
        "not_webrtc": b"\x42 junk bytes",
        "bad_ufrag_stun_length": signed_request(RING, link)[:50],
    }
    before = {reason: relay.drop_count(reason) for reason in forgeries}
    hint_before = relay.drop_count("bad_ufrag_mac")
    with udp() as attacker:
        for payload in forgeries.values():
            attacker.sendto(payload, ("127.0.0.1", relay.public_port))
        attacker.sendto(
            binding_request(forged_hint, derive_password(RING, forged_hint)),
            ("127.0.0.1", relay.public_port),
        )
        attacker.sendto(b"\x16\xfe\xfd dtls", ("127.0.0.1", relay.public_port))
    expected = {reason: before[reason] + 1 for reason in forgeries}
    expected["bad_ufrag_mac"] = hint_before + 2  # wrong MAC and the changed hint
    expected["unknown_address"] += 1  # SRTP and DTLS
    wait_until(
        lambda: all(relay.drop_count(r) >= n for r, n in expected.items()), WAIT_S, "drop counts"
    )
    assert {r: relay.drop_count(r) for r in expected} == expected
    with pytest.raises(TimeoutError):
        relay.receive_data(timeout_s=0.3)


def test_link_datagrams_only_from_transceivers(relay: RelayProcess) -> None:
    with udp() as client, udp() as stranger:
        worker = authenticate(relay, client)
        before = relay.drop_count("unknown_link_source")
        stranger.sendto(header_for(client.getsockname()) + SRTP, worker)
        wait_until(
            lambda: relay.drop_count("unknown_link_source") == before + 1, WAIT_S, "the drop"
        )
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recvfrom(2048)


def test_a_datagram_at_the_size_limit_passes_and_one_byte_more_is_dropped(
    relay: RelayProcess,
) -> None:
    """Both directions: a payload of MAX_PAYLOAD_BYTES is forwarded whole; one byte more is
    dropped and counted, not read truncated and forwarded. Each oversized datagram is sent
    just before one at the limit from the same socket, so the first to arrive tells which
    passed."""
    at_limit = b"\x80" + b"a" * (MAX_PAYLOAD_BYTES - 1)
    over = b"\x80" + b"o" * MAX_PAYLOAD_BYTES
    with udp() as client:
        worker = authenticate(relay, client)
        header = header_for(client.getsockname())
        before = relay.drop_count("oversized"), relay.drop_count("oversized_link")
        client.sendto(over, ("127.0.0.1", relay.public_port))
        client.sendto(at_limit, ("127.0.0.1", relay.public_port))
        assert relay.receive_data() == (header + at_limit, worker)
        relay.link.sendto(header + over, worker)
        relay.link.sendto(header + at_limit, worker)
        assert client.recvfrom(4096)[0] == at_limit
    expected = (before[0] + 1, before[1] + 1)
    wait_until(
        lambda: (relay.drop_count("oversized"), relay.drop_count("oversized_link")) == expected,
        WAIT_S,
        "both oversized datagrams to be counted",
    )


def next_hello(link: socket.socket) -> tuple[bytes, tuple[str, int]]:
    deadline = time.monotonic() + WAIT_S
    while (left := deadline - time.monotonic()) > 0:
        link.settimeout(left)
        data, source = link.recvfrom(4096)
        if parse_header(data).is_control and data[HEADER_BYTES : HEADER_BYTES + 1] == b"\x01":
            return data[HEADER_BYTES:], source[:2]
    raise TimeoutError("no HELLO on the link")


@pytest.mark.parametrize(("flag", "want_routes"), [("on", True), ("off", False)])
def test_hellos_are_keyed_for_their_transceiver_with_hello_on_or_off(
    flag: str, want_routes: bool
) -> None:
    """Every worker proves the keyring to each transceiver; RELAY_HELLO only decides whether
    it asks for ROUTES too."""
    with udp() as link:
        process, _, _ = start_relay("--transceivers", link_text(link), "--hello", flag, workers=1)
        try:
            body, _ = next_hello(link)
            opened = open_hello(RING, body, link.getsockname()[:2], time.time())
            assert (opened.key_id, opened.want_routes) == (3, want_routes)
            assert next_hello(link)[0] != body  # a fresh nonce and timestamp every time
        finally:
            stop(process)


def test_a_worker_asks_for_routes_only_while_new() -> None:
    """ROUTES name every client of a transceiver: a worker asks in its HELLOs only for its
    first seconds (restart recovery); it keeps sending HELLOs after that."""
    timing = ("--hello-interval-s", "0.1", "--clock-interval-s", "0.05")
    asks = ("--routes-request-s", "0.5")
    with udp() as link:
        process, _, _ = start_relay("--transceivers", link_text(link), *timing, *asks, workers=1)
        try:
            start = time.monotonic()
            seen: list[tuple[float, bool]] = []
            while (at := time.monotonic() - start) < 2.0:
                body, _ = next_hello(link)
                opened = open_hello(RING, body, link.getsockname()[:2], time.time())
                seen.append((at, opened.want_routes))
        finally:
            stop(process)
    wants = [want for _, want in seen]
    new_for = wants.index(False)  # the worker stopped asking in every HELLO
    assert new_for > 0 and all(wants[:new_for]), seen
    assert not any(wants[new_for:]), seen
    assert len(wants) - new_for > 5, seen  # HELLOs go on, without the question


def test_health_and_worker_restart(relay: RelayProcess) -> None:
    assert relay.status("/livez") == 200 and relay.status("/readyz") == 200
    assert relay.status("/nope") == 404
    workers = worker_pids(relay.process.pid)
    assert len(workers) == 2
    restarts = relay.metrics()["relay_worker_restarts_total"]
    os.kill(workers[0], signal.SIGKILL)  # a worker this test's relay started
    wait_until(
        lambda: relay.metrics()["relay_worker_restarts_total"] == restarts + 1, WAIT_S, "restart"
    )
    wait_until(lambda: relay.status("/readyz") == 200, WAIT_S, "ready again")
    assert relay.metrics()["relay_workers_alive"] == 2
    with udp() as client:
        authenticate(relay, client)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_workers_and_exits_zero(signum: signal.Signals) -> None:
    with udp() as link:
        process, _, _ = start_relay("--transceivers", link_text(link), workers=1)
        (worker,) = worker_pids(process.pid)
        process.send_signal(signum)
        assert process.wait(10) == 0
        wait_until(lambda: not Path(f"/proc/{worker}").exists(), WAIT_S, "the worker to be gone")


def gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_restart_recovery_from_routes() -> None:
    """SIGKILL the relay, start it again: HELLO -> ROUTES makes media flow without new STUN."""
    with udp() as link, udp() as client:
        transceivers = link_text(link)
        process, public, http = start_relay("--transceivers", transceivers, workers=1)
        relay = RelayProcess(process, public, http, link)
        authenticate(relay, client)
        workers = worker_pids(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        wait_until(
            lambda: all(gone(pid) for pid in workers), WAIT_S, "workers to die with the relay"
        )
        started = time.monotonic()
        process, _, _ = start_relay("--transceivers", transceivers, workers=1, ports=(public, http))
        try:
            recovered = carry_media(RelayProcess(process, public, http, link), client)
        finally:
            stop(process)
    print(f"relay restart: media again {recovered - started:.3f} s after the restart began")
    assert recovered - started < 2.0


def carry_media(relay: RelayProcess, client: socket.socket) -> float:
    """Play a transceiver answering HELLO with ROUTES while the client sends every 20 ms."""
    routes = bytes(ControlMessage(ControlType.ROUTES, (client.getsockname(),)))
    relay.link.settimeout(0.02)
    for _ in range(250):  # 5 s
        client.sendto(SRTP, ("127.0.0.1", relay.public_port))
        try:
            data, source = relay.link.recvfrom(4096)
        except TimeoutError:
            continue
        if parse_header(data).is_control:
            relay.link.sendto(routes, source)
        elif data == header_for(client.getsockname()) + SRTP:
            return time.monotonic()
    raise AssertionError("media did not flow again after the restart")


def test_http_rejects_bad_requests(relay: RelayProcess) -> None:
    for request, status in [(b"POST /metrics HTTP/1.1\r\n\r\n", 405), (b"nonsense\r\n\r\n", 400)]:
        with socket.create_connection(("127.0.0.1", relay.http_port), timeout=WAIT_S) as conn:
            conn.sendall(request)
            assert conn.recv(100).startswith(b"HTTP/1.1 %d " % status)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keys", KEYS], "RELAY_TRANSCEIVERS (or --transceivers) is required"),
        (
            ["--keys", "1:zz", "--transceivers", "127.0.0.1:9"],
            "RELAY_KEYS: key 1 secret is not hex",
        ),
        (
            ["--keys", KEYS, "--transceivers", "no_host!:9"],
            "RELAY_TRANSCEIVERS: 'no_host!' is neither an IP address nor a DNS name",
        ),
        (["--keys", KEYS, "--transceivers", "127.0.0.1:9", "--workers", "0"], "RELAY_WORKERS"),
        (
            ["--keys", "1:" + "00" * 32, "--transceivers", "127.0.0.1:9"],
            "RELAY_KEYS: key 1 is all zeros (a placeholder); generate one with: python -c",
        ),
        (
            ["--keys", "1:" + "ab" * 31, "--transceivers", "127.0.0.1:9"],
            "RELAY_KEYS: key 1 is shorter than 32 bytes",
        ),
    ],
)
def test_bad_configuration_exits_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and message in done.stderr
