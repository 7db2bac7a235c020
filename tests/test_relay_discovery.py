"""The relay learns transceivers at run time: RELAY_TRANSCEIVERS names are looked up again and
again (relay.discovery), and what the answers mean is relay.transceivers' rule.

Three levels: the pure rule; a real Worker (its real UDP sockets on loopback) with an injected
lookup whose answers the test changes; and the real ``python -m relay`` process resolving a name
through the C library, in a mount namespace of its own where the test owns /etc/hosts (as a
headless Service's name, it stands for several loopback addresses, and its answer changes while
the relay runs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from stun_samples import signed_request
from test_relay_process import KEYS, RING, SRTP, START_TIMEOUT_S, WAIT_S, free_port, stop, udp

from deploy.waiting import wait_until
from relay import counters as c
from relay.config import load_config
from relay.routing import UNKNOWN_TRANSCEIVER
from relay.transceivers import Address, TransceiverDirectory
from relay.wire.header import HEADER_BYTES, header_for, parse_header
from relay.wire.hello import open_hello
from relay.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
NAME = "transceivers.test"

# --- the rule ----------------------------------------------------------------------------------

A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7000)


def test_literals_stay_and_a_name_adds_its_last_answer_even_when_a_lookup_fails() -> None:
    directory = TransceiverDirectory([("10.9.9.9", 7000), (NAME, 7000)], grace_s=10)
    assert directory.current == {("10.9.9.9", 7000)}
    assert directory.failing == {(NAME, 7000): "not resolved yet"}
    assert directory.failed((NAME, 7000), "Name or service not known") is False  # still failing
    assert not directory.settle(0.0, set)
    assert directory.resolved((NAME, 7000), [A, B]) is True  # it recovered
    change = directory.settle(1.0, set)
    assert (change.added, change.removed) == ({A, B}, set())
    assert directory.failed((NAME, 7000), "Temporary failure in name resolution") is True
    assert not directory.settle(100.0, set)  # a DNS outage empties nothing
    assert directory.current == {("10.9.9.9", 7000), A, B} and directory.failing


def test_a_vanished_address_goes_after_its_grace_and_its_last_route() -> None:
    directory = TransceiverDirectory([(NAME, 7000)], grace_s=10)
    directory.resolved((NAME, 7000), [A, B])
    directory.settle(0.0, set)
    directory.resolved((NAME, 7000), [B, C])  # A left the answer
    asked: list[float] = []

    def in_use(now: float, links: set[Address]) -> set[Address]:
        asked.append(now)
        return links

    assert directory.settle(1.0, lambda: in_use(1.0, set())).added == {C}
    assert directory.current == {A, B, C} and asked == []  # within its grace: not even asked
    assert not directory.settle(11.0, lambda: in_use(11.0, {A}))  # a route still uses it
    assert directory.current == {A, B, C} and asked == [11.0]
    change = directory.settle(12.0, lambda: in_use(12.0, {B}))
    assert (change.added, change.removed) == (set(), {A})
    assert directory.current == {B, C}


def test_an_address_that_comes_back_within_its_grace_was_never_gone() -> None:
    directory = TransceiverDirectory([(NAME, 7000)], grace_s=10)
    directory.resolved((NAME, 7000), [A, B])
    directory.settle(0.0, set)
    directory.resolved((NAME, 7000), [B])  # a partial answer
    assert not directory.settle(5.0, set)
    directory.resolved((NAME, 7000), [A, B])
    assert not directory.settle(6.0, set)
    directory.resolved((NAME, 7000), [B])
    assert not directory.settle(15.0, set)  # its grace starts again, from here
    assert not directory.settle(24.0, set)
    assert directory.settle(25.0, set).removed == {A}


# --- a real worker, an injected lookup -----------------------------------------------------------


class Answers:
    """The lookup the worker is handed: what ``NAME`` stands for now, set by the test."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.crash_next = False
        self.asked = 0

    async def __call__(self, host: str, port: int, family: int) -> Sequence[Address]:
        self.asked += 1
        if self.crash_next:
            self.crash_next = False
            raise RuntimeError("a bug in the lookup")
        if host != NAME or not self.hosts:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(h, port) for h in self.hosts]


def pod(index: int, port: int) -> socket.socket:
    """A transceiver's link socket on 127.0.0.(2 + index): pods behind one name share a port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((f"127.0.0.{2 + index}", port))
    except OSError:
        sock.close()
        raise
    sock.settimeout(WAIT_S)
    return sock


def pods(count: int) -> list[socket.socket]:
    """``count`` pods on one port."""
    for _ in range(20):
        socks = [pod(0, 0)]
        port = socks[0].getsockname()[1]
        try:
            socks += [pod(i, port) for i in range(1, count)]
        except OSError:
            for sock in socks:
                sock.close()
            continue
        return socks
    raise RuntimeError("no port free on every pod address")


def hello_for(pod: socket.socket, timeout_s: float = WAIT_S) -> tuple[bool, Address]:
    """The next HELLO this pod gets, verified for its address: (wants ROUTES, from)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        pod.settimeout(left)
        data, source = pod.recvfrom(4096)
        if parse_header(data).is_control and data[HEADER_BYTES : HEADER_BYTES + 1] == b"\x01":
            opened = open_hello(RING, data[HEADER_BYTES:], pod.getsockname(), time.time())
            return opened.want_routes, source
    raise TimeoutError("no HELLO")


def data_at(pod: socket.socket, timeout_s: float = WAIT_S) -> tuple[bytes, Address]:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        pod.settimeout(left)
        data, source = pod.recvfrom(4096)
        if not parse_header(data).is_control:
            return data, source
    raise TimeoutError("no data datagram")


async def until(condition: object, what: str, timeout_s: float = WAIT_S) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def worker(answers: Answers, port: int, *flags: str) -> AsyncIterator[tuple[Worker, int]]:
    public = free_port()
    config = load_config(
        ["--public", f"127.0.0.1:{public}", "--keys", KEYS, "--transceivers", f"{NAME}:{port}"]
        + ["--expiry-interval-s", "0.05", "--clock-interval-s", "0.02", *flags],
        {},
    )
    running = Worker(config, 0, [0] * c.ROW, resolve=answers)
    running.start()
    try:
        yield running, public
    finally:
        await running.aclose()


async def recv(sock: socket.socket, size: int = 4096) -> tuple[bytes, Address]:
    """A blocking test socket read off the loop, so the worker keeps running meanwhile."""
    return await asyncio.to_thread(sock.recvfrom, size)


async def test_a_worker_forwards_to_transceivers_as_the_name_comes_to_stand_for_them() -> None:
    answers = Answers()
    grace = ("--transceivers-refresh-s", "0.05", "--transceivers-grace-s", "0.3")
    flags = (*grace, "--route-idle-s", "0.3", "--restart-first-s", "0.05")
    first, second = pods(2)
    port = first.getsockname()[1]
    a, b = first.getsockname(), second.getsockname()
    with first, second, udp() as client:
        async with worker(answers, port, *flags) as (running, public):
            await until(lambda: running.counts[c.LOOKUPS_FAILED] >= 2, "failed lookups")
            assert running.router.transceivers == frozenset()
            assert running.counts[c.NAMES_UNRESOLVED] == 1

            answers.hosts = ["127.0.0.2"]  # the first pod appears
            assert (await asyncio.to_thread(hello_for, first))[0] is True  # new: asks ROUTES
            assert running.counts[c.TRANSCEIVERS] == 1 and running.counts[c.NAMES_UNRESOLVED] == 0
            request = signed_request(RING, a)
            client.sendto(request, ("127.0.0.1", public))
            data, link = await asyncio.to_thread(data_at, first)
            assert data == header_for(client.getsockname()) + request

            answers.hosts = ["127.0.0.2", "127.0.0.3"]  # the autoscaler adds one
            await asyncio.to_thread(hello_for, second)
            assert running.router.transceivers == {a, b}

            answers.hosts = ["127.0.0.3"]  # the first leaves DNS while its call goes on
            for _ in range(40):  # 0.8 s: past its 0.3 s grace, media both ways all along
                client.sendto(SRTP, ("127.0.0.1", public))
                assert await asyncio.to_thread(data_at, first) == (
                    header_for(client.getsockname()) + SRTP,
                    link,
                )
                first.sendto(header_for(client.getsockname()) + b"\x17answer", link)
                assert (await recv(client))[0] == b"\x17answer"
                await asyncio.sleep(0.02)
            assert a in running.router.transceivers and running.counts[c.TRANSCEIVERS_REMOVED] == 0
            # The call has moved on: its route idles out, then the address goes.
            await until(lambda: running.counts[c.TRANSCEIVERS_REMOVED] == 1, "the removal")
            assert running.router.transceivers == {b}
            dropped = running.counts[c.DROPS + c.DROP_INDEX["unknown_link_source"]]
            first.sendto(header_for(client.getsockname()) + b"\x17late", link)
            await until(
                lambda: (
                    running.counts[c.DROPS + c.DROP_INDEX["unknown_link_source"]] == dropped + 1
                ),
                "its datagram to be refused",
            )

            answers.hosts = []  # DNS goes away: the last answer stands
            failed = running.counts[c.LOOKUPS_FAILED]
            await until(lambda: running.counts[c.LOOKUPS_FAILED] > failed + 2, "failures")
            assert running.router.transceivers == {b} and running.counts[c.NAMES_UNRESOLVED] == 1
            assert running.counts[c.TRANSCEIVERS_ADDED] == 2


async def test_a_client_naming_an_unknown_transceiver_wakes_the_lookup_and_a_crash_restarts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = Answers()
    (new,) = pods(1)
    port = new.getsockname()[1]
    slow = ("--transceivers-refresh-s", "60", "--restart-first-s", "0.05")
    with new, udp() as client:
        async with worker(answers, port, *slow) as (running, public):
            discovery = running.discovery
            assert discovery is not None
            await until(lambda: discovery.rounds == 1, "the first round")
            answers.hosts = ["127.0.0.2"]  # the next round is a minute away
            answers.crash_next = True
            request = signed_request(RING, new.getsockname())
            assert running.router.on_public(request, client.getsockname(), 0, 0.0) is (
                UNKNOWN_TRANSCEIVER
            )
            with caplog.at_level(logging.ERROR, logger="relay.restarts"):
                for _ in range(100):  # a client's ICE checks, every 50 ms, for up to 5 s
                    client.sendto(request, ("127.0.0.1", public))
                    if running.router.transceivers:
                        break
                    await asyncio.sleep(0.05)
            assert running.router.transceivers == {new.getsockname()}
            assert running.counts[c.DISCOVERY_CRASHES] == 1
            assert "transceiver discovery crashed" in caplog.text and "a bug in the" in caplog.text
            client.sendto(request, ("127.0.0.1", public))
            assert (await asyncio.to_thread(data_at, new))[0].endswith(request)


# --- the real process, a name the C library resolves ---------------------------------------------


def namespaces_work() -> str | None:
    """Why a private mount namespace cannot be had here, or None."""
    if shutil.which("unshare") is None:
        return "no unshare(1) (util-linux)"
    tried = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount --bind /dev/null /etc/hostname 2>&1 || exit 1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return None if tried.returncode == 0 else f"no private mount namespace: {tried.stdout}"


@pytest.fixture
def own_hosts(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """(the hosts file the relay will see, the command prefix that shows it to the relay)."""
    why = namespaces_work()
    if why is not None:
        pytest.skip(why)
    hosts, nss = tmp_path / "hosts", tmp_path / "nsswitch.conf"
    hosts.write_text("127.0.0.1 localhost\n")
    nss.write_text("passwd: files\ngroup: files\nhosts: files\n")  # no DNS: hermetic
    script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && shift 2'
    yield (
        hosts,
        ["unshare", "-rm", "sh", "-c", f'{script} && exec "$@"', "sh", str(hosts), str(nss)],
    )


def metric(http: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=WAIT_S) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def readyz(http: int) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=WAIT_S) as answer:
            return 200, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_relay_process_starts_before_its_transceivers_and_follows_the_name(
    own_hosts: tuple[Path, list[str]],
) -> None:
    """``python -m relay`` named ``transceivers.test``, which resolves to nothing at first: it
    starts, says why it is not ready, counts the failed lookups; then transceivers started
    after it get HELLOs and media as the name comes to stand for them, and one the name drops
    is let go once its call has moved."""
    hosts, prefix = own_hosts
    free = pods(2)
    port = free[0].getsockname()[1]
    for sock in free:
        sock.close()  # the transceivers start after the relay, on this port
    public, http = free_port(), free_port(socket.SOCK_STREAM)
    argv = [*prefix, sys.executable, "-m", "relay", "--public", f"127.0.0.1:{public}"]
    argv += ["--workers", "1", "--keys", KEYS, "--http", f"127.0.0.1:{http}"]
    argv += ["--transceivers", f"{NAME}:{port}", "--transceivers-refresh-s", "0.1"]
    argv += ["--transceivers-grace-s", "0.5", "--route-idle-s", "0.5"]
    argv += ["--expiry-interval-s", "0.1", "--clock-interval-s", "0.05"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(START_TIMEOUT_S), "the relay did not start"
        assert process.stdout.readline() == "relay ready\n"
        wait_until(
            lambda: metric(http, "relay_transceiver_lookup_failures_total") >= 2,
            WAIT_S,
            "failed lookups",
        )
        status, said = readyz(http)
        assert status == 503 and "no transceiver address known yet" in said, said
        assert metric(http, 'relay_transceiver_names_unresolved{worker="0"}') == 1

        with pod(0, port) as a, udp() as client:
            hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {NAME}\n")
            assert hello_for(a)[0] is True
            wait_until(lambda: readyz(http)[0] == 200, WAIT_S, "ready")
            request = signed_request(RING, ("127.0.0.2", port))
            client.sendto(request, ("127.0.0.1", public))
            data, link = data_at(a)
            assert data == header_for(client.getsockname()) + request
            a.sendto(header_for(client.getsockname()) + b"\x17hello", link)
            client.settimeout(WAIT_S)
            assert client.recvfrom(2048)[0] == b"\x17hello"

            with pod(1, port) as b:
                hosts.write_text(f"127.0.0.1 localhost\n127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n")
                hello_for(b)
                hosts.write_text(f"127.0.0.1 localhost\n127.0.0.3 {NAME}\n")  # a leaves DNS
                for _ in range(50):  # 1 s, twice its grace: its call still carried both ways
                    client.sendto(SRTP, ("127.0.0.1", public))
                    assert data_at(a) == (header_for(client.getsockname()) + SRTP, link)
                    a.sendto(header_for(client.getsockname()) + b"\x17on", link)
                    assert client.recvfrom(2048)[0] == b"\x17on"
                    time.sleep(0.02)
                assert metric(http, 'relay_transceiver_changes_total{change="removed"}') == 0
                wait_until(
                    lambda: metric(http, 'relay_transceiver_changes_total{change="removed"}') == 1,
                    WAIT_S,
                    "the relay to let the first transceiver go",
                )
                assert metric(http, 'relay_transceivers{worker="0"}') == 1
    finally:
        assert stop(process) == 0
