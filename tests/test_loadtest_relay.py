"""The ``relay`` load-test scenario: its histograms, its STUN, its packet engine, and a short real
run through a relay on Locust (master and two worker processes)."""

from __future__ import annotations

import csv
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aioice import stun
from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest import hdr
from loadtest.lab_transceiver import LabTransceiver
from loadtest.relay_engine import MIN_PAYLOAD_BYTES, EngineConfig, SessionEngine
from loadtest.sessions import new_keyring_spec
from loadtest.stun_messages import StunError, binding_request, binding_success, read_username
from relay.wire.header import MAX_LINK_DATAGRAM_BYTES, MAX_PAYLOAD_BYTES, header_for
from relay.wire.hello import seal_hello
from relay.wire.stun import integrity_ok, read_binding_request
from relay.wire.ufrag import Keyring

ROOT = Path(__file__).resolve().parent.parent


def samples(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spread = rng.lognormal(7, 2.5, count).astype(np.int64)
    edges = np.array([0, 1, 2, 2047, 2048, 4095, 4096, hdr.HIGHEST_US], np.int64)
    return np.concatenate([edges, np.minimum(spread, hdr.HIGHEST_US)])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_vectorised_recording_counts_exactly_what_record_value_counts(seed: int) -> None:
    values = samples(seed, 20_000)
    one_by_one, vectorised = hdr.new_histogram(), hdr.new_histogram()
    for value in values:
        assert one_by_one.record_value(int(value))
    assert hdr.record(vectorised, values) == len(values)
    assert np.array_equal(hdr.counts_of(one_by_one), hdr.counts_of(vectorised))
    assert vectorised.get_total_count() == one_by_one.get_total_count() == len(values)
    assert (vectorised.get_min_value(), vectorised.get_max_value()) == (
        one_by_one.get_min_value(),
        one_by_one.get_max_value(),
    )


def test_two_workers_merge_to_the_percentiles_of_one_histogram() -> None:
    values = samples(7, 50_000)
    alone = hdr.new_histogram()
    hdr.record(alone, values)
    worker_a, worker_b = hdr.new_histogram(), hdr.new_histogram()
    hdr.record(worker_a, values[::2])
    hdr.record(worker_b, values[1::2])
    master = hdr.merged([worker_a.encode(), worker_b.encode()])
    assert np.array_equal(hdr.counts_of(master), hdr.counts_of(alone))
    for percentile in (50, 90, 95, 99, 99.9, 99.99, 100):
        assert master.get_value_at_percentile(percentile) == alone.get_value_at_percentile(
            percentile
        )
    assert hdr.summary_ms(master) == hdr.summary_ms(alone)


def test_out_of_range_values_are_clipped_not_lost() -> None:
    histogram = hdr.new_histogram()
    assert hdr.record(histogram, [-5, 10 * hdr.HIGHEST_US]) == 2
    assert histogram.get_total_count() == 2
    assert histogram.get_max_value() >= hdr.HIGHEST_US * 0.999


def test_stun_request_and_answer_are_byte_for_byte_what_aioice_builds() -> None:
    transaction, password = os.urandom(12), os.urandom(16).hex().encode()
    ours = binding_request(transaction, "server:client", password, 1853817087, 0x1234)
    theirs = stun.Message(stun.Method.BINDING, stun.Class.REQUEST, transaction_id=transaction)
    theirs.attributes["USERNAME"] = "server:client"
    theirs.attributes["PRIORITY"] = 1853817087
    theirs.attributes["ICE-CONTROLLING"] = 0x1234
    theirs.add_message_integrity(password)
    theirs.add_fingerprint()
    assert ours == bytes(theirs)
    request = read_binding_request(ours)
    assert integrity_ok(ours, request, password)
    assert not integrity_ok(ours, request, password + b"x")
    assert read_username(ours) == b"server:client"

    answer = binding_success(transaction, ("127.16.3.4", 40000), password)
    expected = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=transaction)
    expected.attributes["XOR-MAPPED-ADDRESS"] = ("127.16.3.4", 40000)
    expected.add_message_integrity(password)
    expected.add_fingerprint()
    assert answer == bytes(expected)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_PAYLOAD_BYTES))
def test_reading_a_username_from_any_bytes_fails_only_with_stun_error(data: bytes) -> None:
    try:
        username = read_username(data)
    except StunError:
        return
    assert len(username) <= len(data)


class Lab:
    """A lab transceiver serving on a thread, and a relay link socket that talks to it."""

    def __init__(self) -> None:
        self.keys = Keyring.parse(new_keyring_spec())
        self.lab = LabTransceiver(self.keys, ("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.lab.serve, kwargs={"duration_s": 30})
        self.link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.link.bind(("127.0.0.1", 0))
        self.link.settimeout(2.0)

    def __enter__(self) -> Lab:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.lab.stopping = True
        self.thread.join(5)
        self.link.close()
        self.lab.sock.close()

    def send(self, datagram: bytes) -> None:
        self.link.sendto(datagram, self.lab.address)

    def keyed(self) -> None:
        self.send(seal_hello(self.keys, self.lab.address, time.time(), want_routes=True))


def test_the_lab_transceiver_takes_nothing_from_an_unkeyed_link_then_answers_and_echoes() -> None:
    client = ("127.16.0.9", 5000)
    rtp = header_for(client) + bytes([0x80, 111]) + b"\0" * 170
    with Lab() as lab:
        lab.send(rtp)
        with pytest.raises(TimeoutError):
            lab.link.recvfrom(4096)
        assert lab.lab.counts["unkeyed_dropped"] == 1

        lab.keyed()
        lab.send(rtp)
        echoed, _ = lab.link.recvfrom(4096)
        assert echoed == rtp

        from relay.wire.ufrag import derive_password, mint_ufrag

        ufrag = mint_ufrag(lab.keys, lab.lab.address)
        password = derive_password(lab.keys, ufrag).encode()
        transaction = os.urandom(12)
        request = binding_request(transaction, f"{ufrag}:c", password, 1, 2)
        lab.send(header_for(client) + request)
        answer, _ = lab.link.recvfrom(4096)
        assert answer[:20] == header_for(client)
        assert answer[20:] == binding_success(transaction, client, password)

        lab.keyed()  # a HELLO asking for routes gets ROUTES naming the client it has seen
        routes, _ = lab.link.recvfrom(4096)
        assert routes[1] & 0x01 and client[0].encode() not in routes  # packed, not text
        assert socket.inet_aton(client[0]) in routes


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=MAX_LINK_DATAGRAM_BYTES), min_size=1, max_size=8), st.booleans())
def test_the_lab_transceiver_survives_any_link_datagrams(
    datagrams: list[bytes], keyed: bool
) -> None:
    lab = LabTransceiver(Keyring.parse(new_keyring_spec()), ("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.bind(("127.0.0.1", 0))
        if keyed:
            name = struct.pack("<H", socket.AF_INET) + struct.pack("!H", sender.getsockname()[1])
            lab.keyed[name + socket.inet_aton("127.0.0.1")] = time.monotonic() + 60
        for datagram in datagrams:
            sender.sendto(datagram, lab.address)
        deadline = time.monotonic() + 2
        handled = 0
        while handled < len(datagrams) and time.monotonic() < deadline:
            count = lab.inbox.receive(lab.sock.fileno())
            if count:
                lab.handle(count)
                handled += count
        assert handled == len(datagrams)
        if not keyed:
            assert lab.counts["echoed"] == lab.counts["stun_answered"] == 0
    finally:
        sender.close()
        lab.sock.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=64))
def test_the_engine_counts_whatever_arrives_and_never_crashes(rows: list[bytes]) -> None:
    keys = Keyring.parse(new_keyring_spec())
    engine = SessionEngine(EngineConfig(("127.0.0.1", 9), ("127.0.0.1", 9), keys, 8, 4))
    try:
        for slot, row in enumerate(rows):
            engine.inbox.data[slot] = 0
            engine.inbox.data[slot, : len(row)] = np.frombuffer(row, np.uint8)
        engine._handle(len(rows), time.monotonic())
        assert engine.counters["setups_ok"] == 0  # nothing was opened, so nothing is set up
        assert engine.counters["media_received"] == 0
    finally:
        engine._close_transport()


@pytest.mark.parametrize("mode", ["pktinfo", "sockets"])
def test_canaries_measure_every_echo_and_keepalives_keep_sessions_up(mode: str) -> None:
    """The engine against a lab transceiver through a stand-in relay (a loop that adds and
    strips the link header), with a source address per session either way: IP_PKTINFO on
    one socket, or a socket per session (a pod's one IP)."""
    with Lab() as lab:
        lab.keyed()
        relay = _MiniRelay(lab)
        engine = SessionEngine(
            EngineConfig(
                relay.public, lab.lab.address, lab.keys, 50, 10, consent_s=0.5, address_mode=mode
            )
        )
        runner = threading.Thread(target=engine.run)
        runner.start()
        try:
            for index in range(50):
                engine.open(media=index < 10)
            deadline = time.monotonic() + 10
            while engine.counters["setups_ok"] < 50 and time.monotonic() < deadline:
                relay.forward_for(0.05)
            for _ in range(40):  # 2 s of media and consent
                relay.forward_for(0.05)
            engine.request_final()
            final = None
            deadline = time.monotonic() + 5
            while final is None and time.monotonic() < deadline:
                relay.forward_for(0.05)
                final = next((v for k, v in list(engine.outbox) if k == "final"), None)
        finally:
            engine.stop()
            runner.join(5)
            relay.close()
    assert final is not None
    assert final["canaries"] == 10
    assert all(sent > 50 for sent in final["media_sent"])
    assert final["media_received"] == final["media_sent"]  # drained: nothing in flight
    assert final["consents_answered"] > 0
    assert final["gauges"]["sessions_up"] == 50
    assert final["interval"].rtt_us.get_total_count() == sum(final["media_received"])
    assert engine.counters["unknown_received"] == 0
    assert len(relay.clients) == 50  # a distinct source address per session


class _MiniRelay:
    """Forwards client datagrams to the lab with the link header and answers back: the relay's
    job reduced to a loop, so the engine test needs no relay process."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        lab.link.setblocking(False)
        self.public = self.sock.getsockname()
        self.clients: set[tuple[str, int]] = set()

    def forward_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            moved = False
            try:
                data, client = self.sock.recvfrom(4096)
                self.clients.add(client)
                self.lab.send(header_for(client) + data)
                moved = True
            except BlockingIOError:
                pass
            try:
                data, _ = self.lab.link.recvfrom(4096)
                if not data[1] & 0x01:
                    host = socket.inet_ntop(socket.AF_INET6, data[4:20])
                    client = (host.removeprefix("::ffff:"), int.from_bytes(data[2:4], "big"))
                    self.sock.sendto(data[20:], client)
                moved = True
            except BlockingIOError:
                pass
            if not moved:
                time.sleep(0.001)

    def close(self) -> None:
        self.sock.close()


def _locust_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def run_relay_scenario(report_dir: Path, *options: str) -> dict[str, Any]:
    """``python -m loadtest relay`` with a local lab, as a user runs it; its report."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "relay", *options, "--report-dir", str(report_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "relay load +" in done.stdout  # progress while it ran
    report: dict[str, Any] = json.loads((report_dir / "report.json").read_text())
    return report


@pytest.mark.slow
def test_a_short_real_run_through_a_relay_on_a_locust_master_and_two_workers(
    tmp_path: Path,
) -> None:
    report_dir = tmp_path / "report"
    report = run_relay_scenario(
        report_dir,
        *("--sessions", "300", "--canaries", "20", "--spawn-rate", "300", "--hold-s", "4"),
        *("--consent-s", "1", "--processes", "2", "--no-figures"),  # the fault run draws them
    )
    assert report["setup"]["attempted"] == report["setup"]["succeeded"] == 300
    assert report["peak_sessions"] == 300
    assert report["generator"]["workers_final"] == "2/2"
    media = report["media"]
    assert media["canaries"] == 20
    assert media["packets_received"] > 20 * 50  # a few seconds at 50 packets per second
    merged = HdrHistogram.decode(report["histograms"]["rtt_us"])
    assert merged.get_total_count() >= media["packets_received"]  # every echo, from 2 workers
    assert report["consent"]["answered"] > 0
    assert {"relay", "lab"} <= set(report["server_per_session"])
    assert report["series"] and any(row["sessions"] == 300 for row in report["series"])
    stats = _locust_csv(report_dir / "locust_stats.csv")
    assert stats["setup"]["Request Count"] == "300"
    assert stats["setup"]["Failure Count"] == "0"
    assert (report_dir / "locust.html").stat().st_size > 0
    assert not list(report_dir.glob("*.png")) and (report_dir / "summary.txt").exists()
    assert report["config"]["payload_bytes"] >= MIN_PAYLOAD_BYTES
    assert report["relay_drops"] == {}  # the relay's own counters: nothing dropped


@pytest.mark.slow
def test_killing_one_of_two_relays_moves_media_to_the_survivor_and_loses_nothing_after(
    tmp_path: Path,
) -> None:
    report_dir = tmp_path / "report"
    report = run_relay_scenario(
        report_dir,
        *("--sessions", "200", "--canaries", "40", "--spawn-rate", "200", "--hold-s", "7"),
        *("--relays", "2", "--fault", "relay@4"),
    )
    assert report["setup"]["succeeded"] == 200
    (fault,) = report["faults"]
    assert fault["kind"] == "relay", fault
    # Both relays carried sessions (the kernel hashes flows over their sockets) until the kill.
    before = report["series"][0]["server"]["cpu_cores"]
    assert before["relay0"] > 0 and before["relay1"] > 0, report["series"]
    assert report["series"][-1]["server"]["cpu_cores"]["relay0"] == 0
    # Every canary's media came back through the survivor (routes it had from ROUTES or found
    # in the route cache), and nothing was lost after that.
    assert fault["cut_off"] == 0, fault
    assert fault["recovered"] == fault["affected"], fault
    assert fault["lost_after"] == 0, fault
    assert report["media"]["packets_received"] > 0.9 * report["media"]["packets_sent"]
    assert set(report["relay_drops"]) <= {"unknown_address"}  # the survivor, before its lookup
    for figure in ("sessions", "latency", "loss_jitter", "generator"):
        assert (report_dir / f"{figure}.png").read_bytes().startswith(b"\x89PNG"), figure
    if fault["affected"]:
        assert fault["media_back_ms"]["max"] > 0
        assert (report_dir / "faults.png").exists()
