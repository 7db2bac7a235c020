"""A forwarder whose port another process took between the bench's pick and its own bind: the
start says so (``PortTaken``), and the relay bench starts the subject again on new ports. In a
fresh clone's ``make test`` the relay's HTTP port, picked free, was taken by the other test
worker meanwhile, and every test of the quick bench failed with it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.processes import free_port
from loadtest import bench_relay
from loadtest.bench_relay import RelayBenchSettings, start_subject
from loadtest.forwarders import (
    LOOPBACK,
    RELAY,
    ForwarderSpec,
    PortTaken,
    relay_available,
    start_forwarder,
)
from loadtest.sessions import LinkPeer, new_keyring_spec

pytestmark = pytest.mark.skipif(not relay_available(), reason="the relay is not installed")
NO_REFERENCE = Path("/nonexistent")  # (only the C reference forwarder runs a binary)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_relay_whose_http_port_is_taken_says_so(taken_port: int, tmp_path: Path) -> None:
    peer = LinkPeer()
    try:
        public = (LOOPBACK, free_port())
        spec = ForwarderSpec(
            RELAY, 1, public, peer.address, new_keyring_spec(), (LOOPBACK, taken_port)
        )
        with pytest.raises(PortTaken, match="a port was taken"):
            start_forwarder(spec, NO_REFERENCE, tmp_path / "logs")
    finally:
        peer.sock.close()


def test_the_relay_bench_starts_its_subject_again_on_new_ports(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([taken_port])  # the HTTP port's first pick is the taken one

    def pick(kind: int = socket.SOCK_DGRAM) -> int:
        return (next(picks, 0) if kind == socket.SOCK_STREAM else 0) or free_port(kind)

    monkeypatch.setattr(bench_relay, "free_port", pick)
    settings = RelayBenchSettings(clients=2, work_dir=tmp_path)
    subject = start_subject(RELAY, 1, settings, NO_REFERENCE)
    try:
        assert subject.forwarder.spec.http[1] not in (0, taken_port)
        assert subject.forwarder.process.poll() is None
        assert b"address already in use" not in subject.forwarder.log.read_bytes()
    finally:
        subject.close()
