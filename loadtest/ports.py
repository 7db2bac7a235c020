"""The ``ports`` scenario: one port per session (exposed the way kube-proxy does it) against one
relay port, measured side by side in one run.

For each session count N, in a private network namespace (``ip netns add``, deleted on the way
out, one per N so conntrack starts empty) with the echo servers of both designs running, and
the designs in turn (their order alternating from one N to the next):

- **rules**: the nat table a kube-proxy in iptables mode would hold: PREROUTING and OUTPUT jump
  to KUBE-SERVICES, which holds one DNAT rule per exposed service port (N for port per session,
  1 for the relay port), programmed with one ``iptables-restore`` and timed (the process's wall
  time, repeated, each time into an empty table; the same restore of the empty table is timed
  as the fixed cost). ``iptables-save`` reads the rules back and they are counted.
- **first packet**: new flows (a new socket each, so conntrack sees a new flow and the nat
  table is walked) to the Service IP, spread over all the exposed ports, and more to the last
  rule; the RTT of each first packet against a C echo behind the DNAT.
  The control, sent before any rules are programmed: the same spread straight to the pod,
  with the same sockets and conntrack but no rules to walk.
- **server CPU per packet**: the same packet rate into N echo sockets or into one, sent
  straight to the pod with the rules flushed (packets of established flows skip the nat
  table; the load's own new flows would each walk all N rules, which is the first-packet
  figure, and at 30k rules would hold the generator far below the rate), in short runs
  alternating between the designs; the median run counts. CPU of the echo processes from
  ``/proc/PID/schedstat`` (``/proc/PID/stat`` where the kernel lacks it); several echo
  processes when N is over ``MAX_PORTS_PER_ECHO``, as RLIMIT_NOFILE is 20,000 here and cannot
  be raised.
- kernel memory (``Slab`` from ``/proc/meminfo``: machine-wide, so other work on the machine
  shows in it) added by the rules and by the echo sockets, and the conntrack entries each
  load run added (one per flow: max(N, ``load_sockets``) for N ports, ``load_sockets`` for
  one port).

Writes ``ports.json`` and ``ports.png`` to the report directory and prints a table. Needs root,
``ip``, ``iptables-restore``, ``iptables-save`` and gcc.

    python -m loadtest.ports [--sessions 1000,10000,30000] [--report-dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import random
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from pathlib import Path
from shutil import which
from typing import Any

import numpy as np

from loadtest import native

PORT_PER_SESSION = "port_per_session"
ONE_PORT = "one_port"
DESIGNS = (PORT_PER_SESSION, ONE_PORT)
SERVICE_IP = "10.96.0.1"  # the Service's cluster IP
POD_IP = "10.244.0.2"  # the pod behind it
FIRST_SESSION_PORT = 20000
RELAY_PORT = 3478
MAX_SESSIONS = 65535 - FIRST_SESSION_PORT + 1
MAX_PORTS_PER_ECHO = 15000  # RLIMIT_NOFILE is 20,000 here and cannot be raised
MAX_PROBES = 4096  # udpecho.c's limit per probe run
WARMUP_PROBES = 8
PROBE_TIMEOUT_MS = 500
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
LOAD_SOURCE_FIRST_PORT = 4000  # the generator's source ports: below the session ports
CLONE_NEWNET = 0x40000000
TOOLS = {"ip": "iproute2", "iptables-restore": "iptables", "iptables-save": "iptables"}
ECHO_PROGRAM = "udpecho"
Result = dict[str, Any]
Progress = Callable[[str], None]


class ScenarioError(RuntimeError):
    """A tool is missing or failed; the message says which and why."""


@dataclass(frozen=True)
class PortsSettings:
    sessions: tuple[int, ...] = (1000, 10000, 30000)
    probes: int = 400
    last_rule_probes: int = 100
    restore_repeats: int = 3
    cpu_s: float = 3.0  # of load per design and session count, in cpu_repeats runs
    cpu_repeats: int = 3
    cpu_pps: int = 50000  # the generator holds it on a shared 2-core machine; 100k it does not
    load_sockets: int = 256
    payload_bytes: int = 200
    report_dir: Path = Path("bench-results/ports")
    build_dir: Path = Path("bench-results/bin")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class Netns:
    """A private network namespace with loopback up and the Service and pod addresses on it.

    Programs run in it through ``setns(2)`` between fork and exec, so a timed command pays for
    fork and exec only, as on the host (``ip netns exec`` would add its own mount namespace and
    remount to every timing); the timed restore of the empty table shows that fixed cost.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = Path("/run/netns") / name
        _libc()  # loaded before any fork

    def __enter__(self) -> Netns:
        _check(["ip", "netns", "add", self.name])
        try:
            _check(["ip", "-n", self.name, "link", "set", "lo", "up"])
            for address in (SERVICE_IP, POD_IP):
                _check(["ip", "-n", self.name, "addr", "add", f"{address}/32", "dev", "lo"])
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.delete()

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def enter(self) -> None:
        """Move the calling process into the namespace (run in the child, before exec)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _libc().setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.path}")
        finally:
            os.close(fd)

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        pipe = subprocess.PIPE
        return subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, preexec_fn=self.enter)

    def run(self, argv: Sequence[str], stdin: str = "", timeout_s: float = 120.0) -> str:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            preexec_fn=self.enter,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            command = " ".join(argv[:3])
            raise ScenarioError(f"{command} failed in {self.name}: {done.stderr.strip()}")
        return done.stdout


def _check(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def new_netns_name() -> str:
    return f"voicerelay-ports-{os.getpid()}-{secrets.token_hex(3)}"


def session_ports(design: str, sessions: int) -> list[int]:
    """The ports a design exposes: one per session, or the one relay port."""
    if design == ONE_PORT:
        return [RELAY_PORT]
    return list(range(FIRST_SESSION_PORT, FIRST_SESSION_PORT + sessions))


def nat_rules(ports: Sequence[int]) -> str:
    """``iptables-restore`` input: kube-proxy's KUBE-SERVICES layout, one DNAT rule per port."""
    portal = '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    lines += [f"-A PREROUTING {portal}", f"-A OUTPUT {portal}"]
    lines += [
        f"-A KUBE-SERVICES -d {SERVICE_IP}/32 -p udp"
        f' -m comment --comment "voice/session-{i}:media cluster IP"'
        f" -m udp --dport {port} -j DNAT --to-destination {POD_IP}:{port}"
        for i, port in enumerate(ports)
    ]
    return "\n".join([*lines, "COMMIT", ""])


# kube-proxy's own filter rule; it also keeps conntrack on in the namespace in every phase
# (nf_tables takes conntrack only while a rule needs it), as it is on a node.
CONNTRACK_RULES = "\n".join(
    ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    + ["-A INPUT -m conntrack --ctstate INVALID -j DROP", "COMMIT", ""]
)


def timed_restore(netns: Netns, rules: str) -> float:
    started = time.perf_counter()
    netns.run(["iptables-restore"], rules)
    return time.perf_counter() - started


def program_rules(netns: Netns, rules: str) -> tuple[float, float]:
    """The table emptied, then (seconds to restore the empty table over the empty table: the
    fixed cost, seconds to restore ``rules`` into it)."""
    timed_restore(netns, nat_rules([]))
    return timed_restore(netns, nat_rules([])), timed_restore(netns, rules)


def rules_read_back(netns: Netns) -> int:
    """DNAT rules in KUBE-SERVICES, as ``iptables-save`` reads them back from the kernel."""
    saved = netns.run(["iptables-save", "-t", "nat"]).splitlines()
    return sum(1 for line in saved if line.startswith("-A KUBE-SERVICES") and "-j DNAT" in line)


def conntrack_entries(netns: Netns) -> int | None:
    try:
        return int(netns.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]))
    except (ScenarioError, ValueError):
        return None


def slab_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    raise ScenarioError("no Slab line in /proc/meminfo")


def process_cpu_s(pid: int) -> float:
    """CPU time of a process: ``/proc/PID/schedstat`` (ns on CPU) where the kernel has it, else
    utime + stime from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks of 10 ms)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    line = Path(f"/proc/{pid}/stat").read_text()
    fields = line[line.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class EchoServers:
    """C echo processes in the namespace, together bound to ``count`` ports from ``first``."""

    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @classmethod
    def start(cls, netns: Netns, binary: Path, first: int, count: int) -> EchoServers:
        servers = cls()
        try:
            for start in range(first, first + count, MAX_PORTS_PER_ECHO):
                n = min(MAX_PORTS_PER_ECHO, first + count - start)
                argv = [str(binary), "echo", "--bind", POD_IP, "--first", str(start)]
                servers.processes.append(netns.popen([*argv, "--count", str(n)]))
            for process in servers.processes:
                _wait_ready(process)
        except BaseException:
            servers.stop()
            raise
        return servers

    def cpu_s(self) -> float:
        return sum(process_cpu_s(p.pid) for p in self.processes)

    def stop(self) -> int:
        """SIGTERM each (SIGKILL after a timeout); returns the datagrams they echoed."""
        echoed = 0
        for process in self.processes:
            process.terminate()
            try:
                out, _ = process.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                out, _ = process.communicate()
            lines = [line for line in (out or "").splitlines() if line.startswith("{")]
            echoed += json.loads(lines[-1])["echoed"] if lines else 0
        return echoed


def _wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.1)[0]:
            if process.stdout.readline().strip() == "ready":
                return
            _, err = process.communicate(timeout=STOP_TIMEOUT_S)
            raise ScenarioError(f"echo exited with {process.returncode}: {err.strip()}")
    raise ScenarioError(f"echo not ready after {READY_TIMEOUT_S} s")


Plan = list[tuple[str, int]]  # (label, port) per new flow, in the order they are sent


def spread_ports(ports: Sequence[int], count: int) -> list[int]:
    """``count`` ports spread evenly over ``ports``, the first and the last included."""
    return [ports[round(i * (len(ports) - 1) / max(1, count - 1))] for i in range(count)]


def through_rules_plan(ports: Sequence[int], settings: PortsSettings) -> Plan:
    """Flows spread over the rules and flows to the last rule, shuffled together so both see
    the same conditions, after a few warm-up flows that are not counted."""
    plan = [("spread", p) for p in spread_ports(ports, settings.probes)]
    plan += [("last_rule", ports[-1])] * settings.last_rule_probes
    random.Random(len(ports)).shuffle(plan)
    return [("warmup", ports[0])] * WARMUP_PROBES + plan


def no_rules_plan(ports: Sequence[int], settings: PortsSettings) -> Plan:
    """The same spread straight to the pod with the rules flushed: the control that has the
    same sockets and conntrack but no rules to walk."""
    spread = [("no_rules", p) for p in spread_ports(ports, settings.probes)]
    return [("warmup", ports[0])] * WARMUP_PROBES + spread


def first_packets(netns: Netns, binary: Path, dest: str, plan: Plan, payload_bytes: int) -> Result:
    """Send the plan's new flows to ``dest``; RTT summaries by label (warm-up left out)."""
    argv = [str(binary), "probe", "--dest", dest, "--timeout-ms", str(PROBE_TIMEOUT_MS)]
    argv += ["--payload-bytes", str(payload_bytes)]
    argv += chain.from_iterable(("--port", str(port)) for _, port in plan)
    timeout_s = len(plan) * PROBE_TIMEOUT_MS / 1000 + 30
    rtt_ns: list[int] = json.loads(netns.run(argv, timeout_s=timeout_s))["rtt_ns"]
    by_label: dict[str, list[int]] = {}
    for (label, _), rtt in zip(plan, rtt_ns, strict=True):
        by_label.setdefault(label, []).append(rtt)
    return {label: rtt_summary(rtts) for label, rtts in by_label.items() if label != "warmup"}


def rtt_summary(rtt_ns: Sequence[int]) -> Result:
    echoed = np.array([r for r in rtt_ns if r >= 0], dtype=float) / 1e3
    summary: Result = {"flows": len(rtt_ns), "echoed": int(echoed.size)}
    for name, q in (("p50_us", 50), ("p99_us", 99), ("max_us", 100)):
        summary[name] = round(float(np.percentile(echoed, q)), 1) if echoed.size else None
    return summary


@dataclass(frozen=True)
class Load:
    """One load run: the echo servers it feeds, their ports, the generator's source ports."""

    echo: EchoServers
    ports: Sequence[int]
    source_first: int


def load_run(netns: Netns, binary: Path, load: Load, settings: PortsSettings) -> Result:
    """One run of the C generator at ``cpu_pps`` straight to the pod's ports, and the echo
    CPU it cost; each run sends from source ports no earlier run used, so all its flows are
    new to conntrack."""
    echo, ports = load.echo, load.ports
    duration_s = settings.cpu_s / settings.cpu_repeats
    argv = [str(binary), "load", "--dest", POD_IP, "--first", str(ports[0])]
    argv += ["--count", str(len(ports)), "--sockets", str(settings.load_sockets)]
    argv += ["--pps", str(settings.cpu_pps), "--duration-ms", str(int(duration_s * 1000))]
    argv += ["--payload-bytes", str(settings.payload_bytes)]
    argv += ["--src-first", str(load.source_first)]
    conntrack_before, cpu_before_s = conntrack_entries(netns), echo.cpu_s()
    done = json.loads(netns.run(argv, timeout_s=duration_s + 30))
    cpu_s = echo.cpu_s() - cpu_before_s
    received = int(done["received"])
    return {
        "sent": done["sent"],
        "echoed": received,
        "pps_sent": round(done["sent"] / done["elapsed_s"]),
        "server_cpu_s": round(cpu_s, 4),
        "us_per_packet": round(cpu_s / received * 1e6, 2) if received else None,
        "conntrack_added": _added(conntrack_before, conntrack_entries(netns)),
    }


def server_cpu(
    netns: Netns,
    binary: Path,
    echoes: dict[str, EchoServers],
    sessions: int,
    settings: PortsSettings,
) -> dict[str, Result]:
    """Load runs alternating between the designs (A B A B ...); the median run counts."""
    runs: dict[str, list[Result]] = {design: [] for design in echoes}
    source_first = LOAD_SOURCE_FIRST_PORT
    for _ in range(settings.cpu_repeats):
        for design, echo in echoes.items():
            load = Load(echo, session_ports(design, sessions), source_first)
            runs[design].append(load_run(netns, binary, load, settings))
            source_first += settings.load_sockets
    return {design: cpu_summary(runs[design], echoes[design], settings) for design in echoes}


def cpu_summary(runs: list[Result], echo: EchoServers, settings: PortsSettings) -> Result:
    per_packet = [run["us_per_packet"] for run in runs if run["us_per_packet"] is not None]
    return {
        "pps_target": settings.cpu_pps,
        "echo_processes": len(echo.processes),
        "us_per_packet": round(float(np.median(per_packet)), 2) if per_packet else None,
        "sent": sum(run["sent"] for run in runs),
        "echoed": sum(run["echoed"] for run in runs),
        "runs": runs,
    }


def programme(netns: Netns, ports: Sequence[int], repeats: int) -> Result:
    """Each repeat times restoring the empty table, then the design's rules into it."""
    slab_before = slab_kb()
    restores = [program_rules(netns, nat_rules(ports)) for _ in range(repeats)]
    return {
        "rules_programmed": len(ports),
        "rules_read_back": rules_read_back(netns),
        "restore_s": [round(full, 4) for _, full in restores],
        "restore_ms_median": round(float(np.median([f for _, f in restores])) * 1e3, 1),
        "restore_empty_ms_median": round(float(np.median([e for e, _ in restores])) * 1e3, 1),
        "slab_rules_added_kb": slab_kb() - slab_before,
    }


def rules_and_first_packets(
    netns: Netns, binary: Path, ports: Sequence[int], settings: PortsSettings
) -> Result:
    """The design's rules programmed and read back, first packets through them, the rules
    flushed again."""
    result = programme(netns, ports, settings.restore_repeats)
    conntrack_before = conntrack_entries(netns)
    plan = through_rules_plan(ports, settings)
    result["first_packet"] = first_packets(netns, binary, SERVICE_IP, plan, settings.payload_bytes)
    result["conntrack_probes_added"] = _added(conntrack_before, conntrack_entries(netns))
    result["flush_ms"] = round(timed_restore(netns, nat_rules([])) * 1e3, 1)
    return result


def _added(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def start_echo(netns: Netns, binary: Path, ports: Sequence[int]) -> tuple[EchoServers, int]:
    """Echo servers on ``ports``, and the slab kB that binding their sockets added."""
    slab_before = slab_kb()
    echo = EchoServers.start(netns, binary, ports[0], len(ports))
    return echo, slab_kb() - slab_before


def measure_point(
    binary: Path, sessions: int, order: Sequence[str], settings: PortsSettings, progress: Progress
) -> Result:
    """Both designs for one session count, in a namespace of their own."""
    designs: dict[str, Result] = {d: {"ports": len(session_ports(d, sessions))} for d in order}
    echoes: dict[str, EchoServers] = {}
    with Netns(new_netns_name()) as netns:
        netns.run(["iptables-restore"], CONNTRACK_RULES + nat_rules([]))
        try:
            for design in order:
                ports = session_ports(design, sessions)
                echoes[design], slab_added_kb = start_echo(netns, binary, ports)
                designs[design]["slab_sockets_added_kb"] = slab_added_kb
            measure_designs(netns, binary, designs, sessions, settings, progress)
            for design, cpu in server_cpu(netns, binary, echoes, sessions, settings).items():
                designs[design]["server_cpu"] = cpu
        finally:
            for design, echo in echoes.items():
                designs[design]["echoed_total"] = echo.stop()
    progress(f"N={sessions} server CPU per echoed packet: {cpu_line(designs)}")
    point = {"sessions": sessions, "order": list(order), "netns": netns.name, "designs": designs}
    point["walk_ns_per_rule"] = walk_ns_per_rule(designs[PORT_PER_SESSION], sessions)
    return point


def measure_designs(
    netns: Netns,
    binary: Path,
    designs: dict[str, Result],
    sessions: int,
    settings: PortsSettings,
    progress: Progress,
) -> None:
    """The no-rules controls of every design first, before any rules were programmed (for a
    while after 30,000 rules were flushed, first packets straight to the pod took 50-120 µs
    rather than 25), then each design's rules and first packets through them."""
    controls = {}
    for design in designs:
        ports = session_ports(design, sessions)
        plan = no_rules_plan(ports, settings)
        controls[design] = first_packets(netns, binary, POD_IP, plan, settings.payload_bytes)
    for design, result in designs.items():
        ports = session_ports(design, sessions)
        result |= rules_and_first_packets(netns, binary, ports, settings)
        result["first_packet"] |= controls[design]
        progress(f"N={sessions} {design}: {design_line(result)}")


def cpu_line(designs: dict[str, Result]) -> str:
    return ", ".join(
        f"{design} {result['server_cpu']['us_per_packet']} µs"
        f" (runs {[run['us_per_packet'] for run in result['server_cpu']['runs']]})"
        for design, result in designs.items()
    )


def walk_ns_per_rule(design: Result, rules: int) -> float | None:
    """What each rule adds to a new flow: last-rule RTT less the no-rules RTT, per rule."""
    last, control = (design["first_packet"][k]["p50_us"] for k in ("last_rule", "no_rules"))
    return None if last is None or control is None else round((last - control) * 1e3 / rules, 1)


def design_line(result: Result) -> str:
    first = result["first_packet"]
    spread, last, control = first["spread"], first["last_rule"], first["no_rules"]
    echoed, flows = (sum(summary[k] for summary in first.values()) for k in ("echoed", "flows"))
    return (
        f"{result['rules_read_back']} rule(s) read back, restore {result['restore_ms_median']} ms,"
        f" first packet p50 {spread['p50_us']} µs (last rule {last['p50_us']} µs,"
        f" no rules {control['p50_us']} µs), {echoed}/{flows} echoed"
    )


def missing_tools() -> list[str]:
    needed = {**TOOLS, "gcc": "gcc"}
    return [f"{tool} (Debian package {pkg})" for tool, pkg in needed.items() if not which(tool)]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine() -> Result:
    version = subprocess.run(["iptables", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "iptables": version.stdout.strip() or None,
        "rlimit_nofile": os.sysconf("SC_OPEN_MAX"),
        "cpu_clock": "schedstat" if Path("/proc/self/schedstat").exists() else "stat",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_ports(settings: PortsSettings, progress: Progress) -> Result:
    """Every session count, both designs; the report as a JSON-ready dict."""
    if missing := missing_tools():
        raise ScenarioError(f"missing tools: {', '.join(missing)} (make sysdeps installs them)")
    if os.geteuid() != 0:
        raise ScenarioError("needs root: it creates a network namespace and programs iptables")
    binary = native.build(ECHO_PROGRAM, settings.build_dir)
    config = {k: v for k, v in asdict(settings).items() if not isinstance(v, Path)}
    config.update(service_ip=SERVICE_IP, pod_ip=POD_IP, max_ports_per_echo=MAX_PORTS_PER_ECHO)
    report: Result = {"scenario": "ports", "config": config, "machine": machine()}
    report["loadavg_before"], report["points"] = loadavg(), []
    for i, sessions in enumerate(settings.sessions):
        order = DESIGNS if i % 2 else DESIGNS[::-1]
        progress(f"N={sessions}: {' then '.join(order)}")
        report["points"].append(measure_point(binary, sessions, order, settings, progress))
    report["loadavg_after"] = loadavg()
    return report


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def table(report: Result) -> str:
    """Rows: N; columns: each measure for port per session, then for the one relay port."""
    header = ["N", "rules", "restore ms", "1st pkt p50 µs", "1st pkt p99 µs", "last rule µs"]
    header += ["no rules µs", "CPU µs/pkt", "load flows"]
    rows = [header, ["", *["ports | relay"] * (len(header) - 1)]]
    for point in report["points"]:
        pair = [point["designs"][d] for d in DESIGNS]
        cells = [[_cell(v) for v in row] for row in zip(*map(_table_values, pair), strict=True)]
        rows.append([str(point["sessions"]), *(" | ".join(c) for c in cells)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _table_values(design: Result) -> list[object]:
    first = design["first_packet"]
    conntrack = design["server_cpu"]["runs"][0]["conntrack_added"]
    return [
        design["rules_read_back"],
        design["restore_ms_median"],
        first["spread"]["p50_us"],
        first["spread"]["p99_us"],
        first["last_rule"]["p50_us"],
        first["no_rules"]["p50_us"],
        design["server_cpu"]["us_per_packet"],
        conntrack,
    ]


def plot(report: Result, path: Path) -> Path:
    """Rule programming time and first-packet latency against N, both designs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sessions = [p["sessions"] for p in report["points"]]
    figure, (restore_axes, rtt_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for design, marker, color in zip(DESIGNS, "os", ("C3", "C0"), strict=True):
        rows = [p["designs"][design] for p in report["points"]]
        restore_ms = [r["restore_ms_median"] for r in rows]
        restore_axes.plot(sessions, restore_ms, marker=marker, color=color, label=design)
        for label, style in (("spread", "-"), ("last_rule", "--"), ("no_rules", ":")):
            p50 = [r["first_packet"][label]["p50_us"] for r in rows]
            rtt_axes.plot(
                sessions, p50, style, marker=marker, color=color, label=f"{design}, {label} p50"
            )
    restore_axes.set(xscale="log", yscale="log", xlabel="sessions N", ylabel="iptables-restore ms")
    restore_axes.set_title("Rule programming (one iptables-restore)")
    rtt_axes.set(xscale="log", yscale="log", xlabel="sessions N", ylabel="first-packet RTT µs")
    rtt_axes.set_title("First packet of a new flow through the DNAT rules")
    for axes in (restore_axes, rtt_axes):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    config = report["config"]
    figure.suptitle(
        f"ports: kube-proxy-style DNAT, one rule per port, vs one relay port"
        f" ({config['probes']} + {config['last_rule_probes']} new flows per point;"
        f" load average {report['loadavg_before'][0]} at the start)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def session_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not counts or not all(1 <= n <= MAX_SESSIONS for n in counts):
        raise argparse.ArgumentTypeError(f"each count must be in [1, {MAX_SESSIONS}]: {text}")
    return counts


def settings_from(argv: list[str]) -> PortsSettings:
    defaults = PortsSettings()
    parser = argparse.ArgumentParser(
        prog="python -m loadtest ports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--sessions", type=session_counts, default=defaults.sessions, help="e.g. 1000,10000,30000")
    add("--probes", type=int, default=defaults.probes, help="new flows spread over the rules")
    add("--last-rule-probes", type=int, default=defaults.last_rule_probes)
    add("--restore-repeats", type=int, default=defaults.restore_repeats)
    add("--cpu-s", type=float, default=defaults.cpu_s, help="seconds of load per CPU point")
    add("--cpu-repeats", type=int, default=defaults.cpu_repeats, help="runs per CPU point")
    add("--cpu-pps", type=int, default=defaults.cpu_pps, help="packets/s for the CPU points")
    add("--report-dir", type=Path, default=defaults.report_dir)
    add("--build-dir", type=Path, default=defaults.build_dir, help="where udpecho is built")
    args = parser.parse_args(argv)
    if min(args.probes, args.last_rule_probes, args.restore_repeats, args.cpu_repeats) < 1:
        parser.error("--probes, --last-rule-probes and the repeats must be at least 1")
    if args.probes + args.last_rule_probes + WARMUP_PROBES > MAX_PROBES:
        parser.error(f"--probes + --last-rule-probes must be at most {MAX_PROBES - WARMUP_PROBES}")
    if args.cpu_s <= 0 or args.cpu_pps < 1:
        parser.error("--cpu-s and --cpu-pps must be positive")
    source_ports = len(DESIGNS) * args.cpu_repeats * defaults.load_sockets
    if LOAD_SOURCE_FIRST_PORT + source_ports > FIRST_SESSION_PORT:
        parser.error("--cpu-repeats is too large: the load would run out of source ports")
    return replace(defaults, **vars(args))


def main(argv: list[str]) -> int:
    settings = settings_from(argv)
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] ports: {line}", flush=True)

    try:
        report = run_ports(settings, progress)
    except (ScenarioError, native.BuildError) as error:
        print(f"ports: {error}", file=sys.stderr)
        return 2
    settings.report_dir.mkdir(parents=True, exist_ok=True)
    out = settings.report_dir / "ports.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    png = plot(report, settings.report_dir / "ports.png")
    print("\nport per session (ports) | one relay port (relay), by session count N\n")
    print(table(report))
    walks = ", ".join(f"N={p['sessions']}: {p['walk_ns_per_rule']}" for p in report["points"])
    print(f"\nns each rule adds to a new flow (last rule less no rules, per rule): {walks}")
    print(f"\nload average before {report['loadavg_before']}, after {report['loadavg_after']}")
    print(f"wrote {out} and {png} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
