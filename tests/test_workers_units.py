"""transceiver.workers without processes: seats, call ids naming their worker, folded metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy.processes import metric_values
from transceiver.webrtc.calls import new_call_id
from transceiver.workers.pod_metrics import exposition, fold
from transceiver.workers.seats import Seat, SeatError, worker_link
from transceiver.workers.supervisor import usable_cpus


def seat(index: int = 1, workers: int = 3) -> Seat:
    return Seat(index, tuple(41000 + i for i in range(workers)), 40999, 7)


def test_a_call_id_names_its_worker() -> None:
    pod = seat(workers=3)
    for index in range(3):
        call_id = new_call_id(index)
        assert len(call_id) == 28 and pod.owner_of(call_id) == index
    assert pod.owner_of("rtc_05" + "0" * 22) is None  # no worker 5 in a pod of 3
    for foreign in ("rtc_nope", "rtc_", "sess_00abc", "rtc_zz" + "0" * 22):
        assert pod.owner_of(foreign) is None
    with pytest.raises(ValueError, match="worker index 256"):
        new_call_id(256)


def test_seats_travel_through_the_environment() -> None:
    pod = seat(2, 3)
    assert Seat.from_env(pod.to_env()) == pod
    assert pod.private_address(0) == ("127.0.0.1", 41000)
    assert pod.siblings() == [0, 1]
    with pytest.raises(SeatError, match="index 3 is not one of 3"):
        Seat.from_env(seat(3, 3).to_env())
    with pytest.raises(SeatError, match="TRANSCEIVER_POD_SEAT is not a pod seat"):
        Seat.from_env('{"index": 0}')


def test_worker_links_follow_the_configured_port() -> None:
    assert worker_link(("10.0.0.5", 7000), 3) == ("10.0.0.5", 7003)
    assert worker_link(("127.0.0.1", 0), 3) == ("127.0.0.1", 0)


def test_usable_cpus_reads_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = usable_cpus(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 cores: 2 workers
    assert usable_cpus(quota) == min(2, affinity)
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == affinity


def worker_exposition(sessions: int, load: float, draining: bool, keyed: int) -> str:
    registry = CollectorRegistry()
    Gauge("transceiver_sessions", "Live sessions", registry=registry).set(sessions)
    Gauge("transceiver_capacity", "Capacity", registry=registry).set(10)
    Gauge("transceiver_load", "Load", registry=registry).set(load)
    Gauge("transceiver_draining", "Draining", registry=registry).set(draining)
    Gauge("transceiver_link_keyed_relays", "Keyed", registry=registry).set(keyed)
    ended = Counter("transceiver_sessions_ended", "Ended", ["reason"], registry=registry)
    ended.labels("hangup").inc(sessions)
    Histogram("transceiver_connect_seconds", "Connect", registry=registry).observe(0.2)
    return generate_latest(registry).decode()


def test_the_pod_sums_counts_and_keeps_the_worst_state() -> None:
    text = exposition(
        fold({0: worker_exposition(3, 0.3, False, 2), 1: worker_exposition(5, 0.7, True, 1)})
    ).decode()
    assert metric_values(text, "transceiver_sessions") == {"": 8.0}
    assert metric_values(text, "transceiver_capacity") == {"": 20.0}
    assert metric_values(text, "transceiver_load") == {"": pytest.approx(0.5)}
    assert metric_values(text, "transceiver_draining") == {"": 1.0}
    assert metric_values(text, "transceiver_link_keyed_relays") == {"": 1.0}
    assert metric_values(text, "transceiver_sessions_ended_total") == {"hangup": 8.0}
    assert metric_values(text, "transceiver_connect_seconds_count") == {"": 2.0}
    assert metric_values(text, "transceiver_worker_sessions") == {"0": 3.0, "1": 5.0}
    assert metric_values(text, "transceiver_worker_load") == {"0": 0.3, "1": 0.7}
