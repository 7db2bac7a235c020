"""Relay benchmark: packets forwarded per CPU-second and added round-trip latency.

Every forwarder kind (the relay, the C reference, the bare Python loop) runs as real processes
on loopback, side by side in the same run, with the same sessions, the same load generator and
the same accounting:

- throughput: the C load generator keeps ``window`` 200-byte datagrams in flight through one
  forwarder (client -> transceiver, then transceiver -> client); packets that reached the sink
  are divided by the CPU-seconds the forwarder's processes (supervisor + workers) spent, read
  from /proc. Repeats rotate the order of the kinds; the median run counts.
- sessions per core: a voice session is 50 packets/s each way (20 ms frames), so
  ``1 / (50 / rate_c2t + 50 / rate_t2c)``, i.e. packets per CPU-second / 100 when both
  directions cost the same.
- latency: one ping at a time, rounds interleaving the direct loopback path and every
  forwarder, echoed by the transceiver end; added latency = forwarder RTT - direct RTT.
"""

from __future__ import annotations

import json
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.processes import free_port
from loadtest import native
from loadtest.forwarders import (
    BARE_PYTHON,
    C_REFERENCE,
    LOOPBACK,
    RELAY,
    ForwarderSpec,
    PortTaken,
    RunningForwarder,
    relay_available,
    scrape_counters,
    start_forwarder,
)
from loadtest.sessions import (
    BenchSessions,
    LinkPeer,
    address_of,
    new_keyring_spec,
    open_sessions,
    udp_socket,
)
from relay.wire.header import HEADER_BYTES, header_for
from relay.wire.ufrag import Keyring

CLIENT_TO_TRANSCEIVER = "client_to_transceiver"
TRANSCEIVER_TO_CLIENT = "transceiver_to_client"
DIRECTIONS = (CLIENT_TO_TRANSCEIVER, TRANSCEIVER_TO_CLIENT)
PACKET_BYTES = 200
PACKETS_PER_SESSION_EACH_WAY_PER_S = 50
DIRECT = "direct"
COUNTERS_TIMEOUT_S = 3.0
PORT_ATTEMPTS = 3  # a forwarder started again on new ports when one picked was taken meanwhile
RELAY_FORWARDED = {
    CLIENT_TO_TRANSCEIVER: "relay_forwarded_packets_total{direction=to_transceiver}",
    TRANSCEIVER_TO_CLIENT: "relay_forwarded_packets_total{direction=to_client}",
}
Progress = Callable[[str], None]
Run = dict[str, Any]


@dataclass(frozen=True)
class RelayBenchSettings:
    flood_s: float = 2.0
    repeats: int = 3
    clients: int = 64
    window: int = 128
    worker_counts: tuple[int, ...] = (1, 2)
    ping_rounds: int = 2000
    kinds: tuple[str, ...] = field(default_factory=lambda: default_kinds())
    work_dir: Path = Path("bench-results")


def default_kinds() -> tuple[str, ...]:
    return (C_REFERENCE, BARE_PYTHON, RELAY) if relay_available() else (C_REFERENCE, BARE_PYTHON)


@dataclass
class Subject:
    """One started forwarder with its bench sessions."""

    forwarder: RunningForwarder
    sessions: BenchSessions

    def close(self) -> None:
        self.forwarder.stop()
        self.sessions.close()


def start_subject(kind: str, workers: int, settings: RelayBenchSettings, ref: Path) -> Subject:
    keys = new_keyring_spec()
    peer = LinkPeer()
    try:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            http = (LOOPBACK, free_port(socket.SOCK_STREAM) if kind == RELAY else 0)
            spec = ForwarderSpec(kind, workers, (LOOPBACK, free_port()), peer.address, keys, http)
            try:
                forwarder = start_forwarder(spec, ref, settings.work_dir / "logs")
                break
            except PortTaken:
                if attempt == PORT_ATTEMPTS:
                    raise
    except BaseException:
        peer.sock.close()
        raise
    try:
        peer.wait_for_workers(workers)
        sessions = open_sessions(peer, spec.public, Keyring.parse(keys), settings.clients)
    except BaseException:
        forwarder.stop()
        peer.sock.close()
        raise
    forwarder.refresh_pids()
    return Subject(forwarder, sessions)


def flood_command(subject: Subject, direction: str, settings: RelayBenchSettings) -> list[str]:
    sessions = subject.sessions
    link_fd = sessions.peer.sock.fileno()
    command = ["flood", "--duration-ms", str(int(settings.flood_s * 1000))]
    command += ["--window", str(settings.window), "--payload-bytes", str(PACKET_BYTES)]
    if direction == CLIENT_TO_TRANSCEIVER:
        command += ["--expect-bytes", str(PACKET_BYTES + HEADER_BYTES), "--sink", str(link_fd)]
        for sock in sessions.sockets:
            command += ["--flow", f"{sock.fileno()},{LOOPBACK},{sessions.public[1]}"]
        return command
    command += ["--expect-bytes", str(PACKET_BYTES)]
    for sock in sessions.sockets:
        client = address_of(sock)
        owner = sessions.owner_of(client)
        command += ["--sink", str(sock.fileno())]
        command += ["--flow", f"{link_fd},{owner[0]},{owner[1]},{header_for(client).hex()}"]
    return command


def _fds(subject: Subject) -> tuple[int, ...]:
    return (subject.sessions.peer.sock.fileno(), *(s.fileno() for s in subject.sessions.sockets))


def run_loadgen(loadgen: Path, args: list[str], fds: Iterable[int], timeout_s: float) -> Run:
    done = subprocess.run(
        [str(loadgen), *args],
        pass_fds=tuple(fds),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"udpload failed ({done.returncode}): {done.stderr.strip()}")
    result: Run = json.loads(done.stdout)
    return result


def children_cpu_s() -> float:
    """CPU of reaped children: the load generator (forwarders are still running)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_flood(subject: Subject, direction: str, settings: RelayBenchSettings, gen: Path) -> Run:
    subject.sessions.peer.drain()
    cpu_before_s, loadgen_before_s = subject.forwarder.cpu_s(), children_cpu_s()
    result = run_loadgen(gen, flood_command(subject, direction, settings), _fds(subject), 60)
    cpu_s = subject.forwarder.cpu_s() - cpu_before_s
    received, elapsed_s = int(result["received"]), float(result["elapsed_s"])
    return {
        **result,
        "cpu_s": round(cpu_s, 3),
        "loadgen_busy_cores": (children_cpu_s() - loadgen_before_s) / elapsed_s,
        "packets_per_cpu_s": received / cpu_s if cpu_s > 0 else 0.0,
        "packets_per_s": received / elapsed_s if elapsed_s > 0 else 0.0,
        "busy_cores": cpu_s / elapsed_s if elapsed_s > 0 else 0.0,
    }


def measure_throughput(
    subjects: dict[str, Subject],
    workers: int,
    settings: RelayBenchSettings,
    gen: Path,
    progress: Progress,
) -> list[Run]:
    runs: list[Run] = []
    kinds = list(subjects)
    for repeat in range(settings.repeats):
        order = kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]
        for direction in DIRECTIONS:
            for kind in order:
                run = run_flood(subjects[kind], direction, settings, gen)
                runs.append(
                    {
                        "forwarder": kind,
                        "workers": workers,
                        "direction": direction,
                        "repeat": repeat,
                        **run,
                    }
                )
                progress(_run_line(runs[-1], settings.repeats))
    return runs


def _run_line(run: Run, repeats: int) -> str:
    return (
        f"  {run['forwarder']:<12} {run['workers']}w {run['direction']:<22} "
        f"run {run['repeat'] + 1}/{repeats}: {run['packets_per_cpu_s'] / 1e3:7.1f}k pkt/CPU-s "
        f"({run['packets_per_s'] / 1e3:.1f}k pkt/s, {run['busy_cores']:.2f} cores busy, "
        f"load generator {run['loadgen_busy_cores']:.2f}, "
        f"{run['received']} forwarded)"
    )


def measure_latency(subjects: dict[str, Subject], settings: RelayBenchSettings, gen: Path) -> Run:
    echo, direct_client = udp_socket(), udp_socket()
    try:
        args = ["ping", "--rounds", str(settings.ping_rounds), "--payload-bytes", str(PACKET_BYTES)]
        args += ["--echo", str(echo.fileno()), "--path"]
        args += [f"{DIRECT},{direct_client.fileno()},{LOOPBACK},{address_of(echo)[1]}"]
        fds = [echo.fileno(), direct_client.fileno()]
        for kind, subject in subjects.items():
            sessions = subject.sessions
            sessions.peer.drain()
            client = sessions.sockets[0]
            args += ["--echo", str(sessions.peer.sock.fileno()), "--path"]
            args += [f"{kind},{client.fileno()},{LOOPBACK},{sessions.public[1]}"]
            fds += [sessions.peer.sock.fileno(), client.fileno()]
        result = run_loadgen(gen, args, fds, 120 + settings.ping_rounds * len(subjects) * 0.2)
    finally:
        echo.close()
        direct_client.close()
    return summarise_latency(result, settings.ping_rounds)


def relay_counters_check(subject: Subject, runs: list[Run]) -> Run:
    """The relay's own /metrics forwarded counters next to what the sinks received."""
    mine = [r for r in runs if r["forwarder"] == RELAY]
    sink = {d: sum(int(r["received"]) for r in mine if r["direction"] == d) for d in DIRECTIONS}
    deadline = time.monotonic() + COUNTERS_TIMEOUT_S
    while True:  # workers publish their counters every ~0.5 s
        counters = scrape_counters(subject.forwarder.spec.http)
        counted = {d: counters.get(name, 0.0) for d, name in RELAY_FORWARDED.items()}
        if all(counted[d] >= sink[d] for d in DIRECTIONS) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    drops = {k: v for k, v in counters.items() if k.startswith("relay_dropped") and v}
    return {
        "workers": subject.forwarder.spec.workers,
        "sink_received": sink,
        "relay_forwarded": counted,
        "relay_dropped": drops,
    }


def summarise_latency(result: Run, rounds: int) -> Run:
    warmup = min(100, rounds // 10)
    paths: dict[str, Run] = {}
    for name, samples in result["rtt_ns"].items():
        rtt_us = np.asarray(samples[warmup:], dtype=float) / 1e3
        paths[name] = {
            "median_us": float(np.median(rtt_us)) if rtt_us.size else None,
            "p99_us": float(np.percentile(rtt_us, 99)) if rtt_us.size else None,
            "samples": int(rtt_us.size),
            "lost": int(result["lost"][name]),
        }
    direct = paths[DIRECT]
    for name, stats in paths.items():
        if name != DIRECT and stats["median_us"] is not None and direct["median_us"] is not None:
            stats["added_median_us"] = stats["median_us"] - direct["median_us"]
            stats["added_p99_us"] = stats["p99_us"] - direct["p99_us"]
    return {"rounds": rounds, "payload_bytes": PACKET_BYTES, "paths": paths}


def summarise_throughput(runs: list[Run]) -> list[Run]:
    """Median run per (forwarder, workers, direction), with its ratio to the C reference."""
    keys = sorted({(r["forwarder"], r["workers"], r["direction"]) for r in runs}, key=str)
    rows = {k: _median_row(k, [r for r in runs if _key(r) == k]) for k in keys}
    for (_, workers, direction), row in rows.items():
        reference = rows.get((C_REFERENCE, workers, direction))
        ref_rate = reference["packets_per_cpu_s"] if reference else 0.0
        row["ratio_to_reference"] = row["packets_per_cpu_s"] / ref_rate if ref_rate else None
    return list(rows.values())


def _key(run: Run) -> tuple[str, int, str]:
    return run["forwarder"], run["workers"], run["direction"]


def _median_row(key: tuple[str, int, str], runs: list[Run]) -> Run:
    rate = statistics.median(r["packets_per_cpu_s"] for r in runs)
    return {
        "forwarder": key[0],
        "workers": key[1],
        "direction": key[2],
        "packets_per_cpu_s": rate,
        "packets_per_s": statistics.median(r["packets_per_s"] for r in runs),
        "busy_cores": statistics.median(r["busy_cores"] for r in runs),
        "forwarded": sum(int(r["received"]) for r in runs),
        "runs": len(runs),
    }


def sessions_per_core(rows: list[Run]) -> list[Run]:
    """Voice sessions one CPU-second carries: 50 packets/s each way per session."""
    out: list[Run] = []
    for kind, workers in sorted({(r["forwarder"], r["workers"]) for r in rows}, key=str):
        rate = {
            r["direction"]: r["packets_per_cpu_s"]
            for r in rows
            if r["forwarder"] == kind and r["workers"] == workers
        }
        if all(rate.get(d) for d in DIRECTIONS):
            cpu_per_session_s = sum(
                PACKETS_PER_SESSION_EACH_WAY_PER_S / rate[d] for d in DIRECTIONS
            )
            out.append(
                {"forwarder": kind, "workers": workers, "sessions_per_core": 1 / cpu_per_session_s}
            )
    return out


def run_relay_bench(settings: RelayBenchSettings, progress: Progress = print) -> Run:
    bin_dir = settings.work_dir / "bin"
    reference = native.build(native.REFERENCE_FORWARDER, bin_dir)
    gen = native.build(native.LOAD_GENERATOR, bin_dir)
    runs: list[Run] = []
    latency: Run | None = None
    counters: list[Run] = []
    for workers in settings.worker_counts:
        progress(f"relay bench: starting {', '.join(settings.kinds)} with {workers} worker(s)")
        subjects = _start_all(settings, workers, reference)
        try:
            phase = measure_throughput(subjects, workers, settings, gen, progress)
            runs += phase
            if RELAY in subjects:
                counters.append(relay_counters_check(subjects[RELAY], phase))
            if latency is None:
                progress(f"relay bench: {settings.ping_rounds} interleaved ping rounds")
                latency = {"workers": workers, **measure_latency(subjects, settings, gen)}
        finally:
            for subject in subjects.values():
                subject.close()
    rows = summarise_throughput(runs)
    return {
        "settings": {**asdict(settings), "work_dir": str(settings.work_dir)},
        "throughput": rows,
        "sessions_per_core": sessions_per_core(rows),
        "latency": latency,
        "relay_counters": counters,
        "runs": runs,
    }


def _start_all(settings: RelayBenchSettings, workers: int, reference: Path) -> dict[str, Subject]:
    subjects: dict[str, Subject] = {}
    try:
        for kind in settings.kinds:
            subjects[kind] = start_subject(kind, workers, settings, reference)
    except BaseException:
        for subject in subjects.values():
            subject.close()
        raise
    return subjects
