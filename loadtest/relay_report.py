"""The master's side of the ``relay`` scenario: merge what the workers report, sample the
servers, keep a time series, judge the generator, and write the report.

Histograms arrive HdrHistogram-encoded and are merged with ``decode_and_add``, so the run's
percentiles are exactly those of every sample in one histogram, however many workers recorded
them. Servers are sampled either from /proc (a process and its descendants: CPU seconds, RSS) or
from a Prometheus endpoint (``process_cpu_seconds_total``, ``process_resident_memory_bytes``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest import figures, hdr
from loadtest.hosts import ProcessCpu, ScrapedCpu, generator_verdict

INTERVAL_S = 3.0


class Server:
    """A server process tree on this host (by PID) or one seen through its /metrics."""

    def __init__(self, name: str, pid: int = 0, metrics_url: str = "") -> None:
        self.name = name
        self.pid = pid
        self.metrics_url = metrics_url
        self.meter: ProcessCpu | ScrapedCpu | None = None

    def cores(self) -> tuple[float | None, float]:
        """Cores used since the previous call (None at the first), and RSS in MB."""
        if self.meter is None:
            self.meter = (
                ScrapedCpu(self.metrics_url)
                if self.metrics_url
                else ProcessCpu([self.pid], descendants=True)
            )
            return None, self.meter.rss_mb()
        return self.meter.sample(), self.meter.rss_mb()


def parse_servers(pids: str, metrics: str) -> list[Server]:
    """``relay:123,lab:456`` and ``relay=10.0.0.5:9100`` into servers to sample."""
    servers = []
    for item in filter(None, pids.split(",")):
        name, _, pid = item.partition(":")
        servers.append(Server(name, pid=int(pid)))
    for item in filter(None, metrics.split(",")):
        name, _, url = item.partition("=")
        if not url.startswith("http"):
            url = f"http://{url}/metrics"
        servers.append(Server(name, metrics_url=url))
    return servers


@dataclass
class Window:
    """What the workers reported since the previous row of the series."""

    rtt: HdrHistogram = field(default_factory=hdr.new_histogram)
    setup: HdrHistogram = field(default_factory=hdr.new_histogram)
    tick_lag: HdrHistogram = field(default_factory=hdr.new_histogram)
    counters: dict[str, int] = field(default_factory=dict)
    worker_cpu_s: dict[str, float] = field(default_factory=dict)

    def add(self, other: Window) -> None:
        """Fold ``other`` (a closed window) into this one: the run's totals, the hold's."""
        for name in ("rtt", "setup", "tick_lag"):
            getattr(self, name).add(getattr(other, name))
        for name, value in other.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        for worker, cpu_s in other.worker_cpu_s.items():
            self.worker_cpu_s[worker] = self.worker_cpu_s.get(worker, 0.0) + cpu_s


class RelayReport:
    def __init__(
        self,
        report_dir: Path,
        config: dict[str, Any],
        servers: list[Server],
        figures: bool = True,
    ) -> None:
        self.report_dir = report_dir
        self.figures = figures  # draw the PNG figures beside the report
        self.config = config
        self.servers = servers
        self.interval_s = INTERVAL_S
        self.window = Window()
        self.total = Window()
        self.gauges: dict[str, dict[str, int]] = {}
        self.udp_start: dict[str, dict[str, int]] = {}
        self.udp_now: dict[str, dict[str, int]] = {}
        self.crashed: dict[str, str] = {}
        self.series: list[dict[str, Any]] = []
        self.finals: dict[str, dict[str, Any]] = {}
        self.expected_finals = 0
        self.started = time.monotonic()
        self.started_unix = time.time()
        self.last_row_at = self.started
        self.locust_setup: dict[str, int] = {}
        self.written = False
        self.peak_sessions = 0
        self.udp_reported: dict[str, int] = {}
        self.hold = Window()
        self.hold_udp: dict[str, int] = {}

    def start(self) -> None:
        """The test starts: a driver timing a fault from this moment reads ``started.json``."""
        self.started = self.last_row_at = time.monotonic()
        self.started_unix = time.time()
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / "started.json").write_text(json.dumps({"unix_s": self.started_unix}))
        for server in self.servers:
            server.cores()

    def _add_interval(self, wire: dict[str, Any] | None) -> None:
        if not wire:
            return
        window = self.window  # decoded once; closing the window folds it into the totals
        window.rtt.decode_and_add(wire["rtt"])
        window.setup.decode_and_add(wire["setup"])
        window.tick_lag.decode_and_add(wire["tick_lag"])
        for name, value in wire["counters"].items():
            window.counters[name] = window.counters.get(name, 0) + value

    def add_worker_report(self, worker: str, lt: dict[str, Any]) -> None:
        self._add_interval(lt.get("interval"))
        if lt.get("interval"):
            self.gauges[worker] = lt["interval"]["gauges"]
        self.window.worker_cpu_s[worker] = self.window.worker_cpu_s.get(worker, 0.0) + lt["cpu_s"]
        self.udp_start.setdefault(lt["host"], lt["udp"])
        self.udp_now[lt["host"]] = lt["udp"]
        if lt.get("crashed"):
            self.crashed[worker] = lt["crashed"]

    def add_final(self, worker: str, final: dict[str, Any]) -> None:
        self._add_interval(final.get("interval"))
        self.finals[worker] = final
        if final.get("crashed"):
            self.crashed[worker] = final["crashed"]

    def _gauge(self, name: str) -> int:
        return sum(g.get(name, 0) for g in self.gauges.values())

    def close_interval(self) -> None:
        now = time.monotonic()
        span = max(now - self.last_row_at, 1e-6)
        self.last_row_at = now
        window, self.window = self.window, Window()
        sessions = self._gauge("sessions_up")
        self.peak_sessions = max(self.peak_sessions, sessions)
        server_cpu: dict[str, float] = {}
        server_rss: dict[str, float] = {}
        for server in self.servers:
            try:
                cores, rss = server.cores()
            except OSError:
                continue
            if cores is not None:
                server_cpu[server.name] = round(cores, 4)
            server_rss[server.name] = round(rss, 1)
        counters = window.counters
        sent = counters.get("media_sent", 0)
        received = counters.get("media_received", 0)
        lag = hdr.summary_ms(window.tick_lag)
        udp_total = self._udp_delta()
        udp = {k: v - self.udp_reported.get(k, 0) for k, v in udp_total.items()}
        self.udp_reported = udp_total
        # A hold interval: every session of a level up for the whole interval, none being set
        # up. Ramps stall the generator (Locust spawns users on the same core); the hold's
        # figures and the verdict are kept apart from them.
        previous = self.series[-1]["sessions"] if self.series else -1
        holding = sessions > 0 and sessions == previous and self._gauge("sessions_setting_up") == 0
        self.total.add(window)
        if holding:
            self.hold.add(window)
            for name, value in udp.items():
                self.hold_udp[name] = self.hold_udp.get(name, 0) + value
        self.series.append(
            {
                "t_s": round(now - self.started, 2),
                "phase": "hold" if holding else "ramp",
                "sessions": sessions,
                "media_sessions": self._gauge("media_sessions"),
                "setting_up": self._gauge("sessions_setting_up"),
                "consent_stale": self._gauge("consent_stale"),
                "rtt_ms": hdr.summary_ms(window.rtt),
                "setup_ms": hdr.summary_ms(window.setup),
                "loss_ratio": None if not sent else max(0.0, 1 - received / sent),
                "packets_per_s": round((sent + counters.get("consents_sent", 0)) / span, 1),
                "server": {"cpu_cores": server_cpu, "rss_mb": server_rss},
                "generator": {
                    "cpu_cores": round(sum(window.worker_cpu_s.values()) / span, 4),
                    "tick_lag_p99_ms": None if lag is None else lag["p99"],
                    "rcvbuf_errors": udp["RcvbufErrors"],
                    "sndbuf_errors": udp["SndbufErrors"],
                    "send_short": counters.get("send_short", 0),
                },
            }
        )

    def progress(self) -> str:
        """One line about the latest interval, printed while the test runs."""
        if not self.series:
            return "relay load: starting"
        row = self.series[-1]
        rtt = row["rtt_ms"]["p99"] if row["rtt_ms"] else None
        loss = row["loss_ratio"]
        servers = " ".join(f"{k} {v:.2f}" for k, v in row["server"]["cpu_cores"].items())
        lag = row["generator"]["tick_lag_p99_ms"]
        return (
            f"relay load +{row['t_s']:.0f} s [{row['phase']}]: {row['sessions']:,} sessions up,"
            f" {row['setting_up']:,} setting up, {row['media_sessions']:,} canaries;"
            f" RTT p99 {'-' if rtt is None else f'{rtt:.1f} ms'},"
            f" loss {'-' if loss is None else f'{loss:.3%}'}; server cores: {servers or '-'};"
            f" generator {row['generator']['cpu_cores']:.2f} cores,"
            f" tick lag p99 {'-' if lag is None else f'{lag:.1f} ms'}"
        )

    def _udp_delta(self) -> dict[str, int]:
        total = {"RcvbufErrors": 0, "SndbufErrors": 0, "InErrors": 0}
        for host, now in self.udp_now.items():
            start = self.udp_start.get(host, now)
            for name in total:
                total[name] += now.get(name, 0) - start.get(name, 0)
        return total

    # -- the report --------------------------------------------------------------------------
    def media(self) -> dict[str, Any]:
        sent = np.array([x for f in self.finals.values() for x in f["media_sent"]], np.int64)
        received = np.array(
            [x for f in self.finals.values() for x in f["media_received"]], np.int64
        )
        jitter = np.array([x for f in self.finals.values() for x in f["jitter_ms"]], np.float64)
        if sent.size == 0:
            return {"canaries": 0}
        loss = 1 - received / np.maximum(sent, 1)
        return {
            "canaries": int(sent.size),
            "packets_sent": int(sent.sum()),
            "packets_received": int(received.sum()),
            "loss_ratio": float(1 - received.sum() / max(int(sent.sum()), 1)),
            "sessions_over_1pct_loss": int((loss > 0.01).sum()),
            "jitter_ms": {
                name: round(float(np.percentile(jitter, p)), 4)
                for name, p in (("p50", 50), ("p95", 95), ("p99", 99))
            },
            "rtt_ms": hdr.summary_ms(self.total.rtt),
        }

    def faults(self) -> list[dict[str, Any]]:
        """For a run with a fault (``fault.json`` written by the driver when it killed a relay):
        which canaries lost their echoes at that moment, how long until media flowed again
        through the survivor, and whether anything was lost after that."""
        path = self.report_dir / "fault.json"
        if not path.exists():
            return []
        fault = json.loads(path.read_text())
        killed = float(fault["killed_unix_s"])
        began = np.array([x for f in self.finals.values() for x in f["gap_began_unix_s"]])
        gap = np.array([x for f in self.finals.values() for x in f["max_gap_ms"]])
        sent_after = np.array([x for f in self.finals.values() for x in f["sent_after_gap"]])
        got_after = np.array([x for f in self.finals.values() for x in f["received_after_gap"]])
        lost = np.array([x for f in self.finals.values() for x in f["lost_in_gap"]])
        last_echo = np.array([x for f in self.finals.values() for x in f["last_echo_unix_s"]])
        # a canary was cut by the kill when its longest silence lost packets (a stall only
        # delays them) and began around the kill: its last echo through the dead relay came at
        # most a packet time before it, or in flight just after it. Canaries whose route the
        # survivor already had (ROUTES answering its periodic HELLO) lose nothing at all.
        affected = (lost > 0) & (began > killed - 0.05) & (began < killed + 0.3)
        recovered = affected & (got_after > 0)
        back_ms = (began + gap / 1000 - killed) * 1000  # kill -> first echo through the survivor
        row: dict[str, Any] = {
            "kind": fault["kind"],
            "at_s": round(killed - self.started_unix, 2),
            "canaries": int(gap.size),
            "affected": int(affected.sum()),
            "recovered": int(recovered.sum()),
            "lost_in_gap": int(lost[affected].sum()),
            # canaries that never heard an echo again after the kill: media did not come back
            "cut_off": int((last_echo < killed).sum()),
            "lost_after": int(np.maximum(sent_after - got_after, 0)[recovered].sum()),
            "unaffected_longest_gap_ms": float(gap[~affected].max()) if (~affected).any() else None,
        }
        if affected.any():
            for name, values in (("gap_ms", gap[affected]), ("media_back_ms", back_ms[affected])):
                row[name] = {
                    "p50": round(float(np.percentile(values, 50)), 2),
                    "p99": round(float(np.percentile(values, 99)), 2),
                    "max": round(float(values.max()), 2),
                }
        return [row]

    def verdict(self) -> dict[str, Any]:
        """Whether the generator kept up (``loadtest.hosts.generator_verdict``: tick lag, its
        host's UDP buffer drops, its busiest worker) while the load was held, and whether
        every worker's engine ran to the end and sent its final data. Without a hold phase
        the whole run is judged. A ramp that stalled the generator is noted, not failed."""
        held = [row for row in self.series if row.get("phase") == "hold"]
        judged = held or self.series
        window = self.hold if held else self.total
        lag = hdr.summary_ms(window.tick_lag)
        udp = self.hold_udp if held else self._udp_delta()
        workers = max(len(self.gauges), 1)
        busiest = max(
            (row["generator"]["cpu_cores"] / workers for row in judged if row["sessions"]),
            default=0.0,
        )
        _, reasons = generator_verdict(
            0.0 if lag is None else lag["p99"],
            udp.get("RcvbufErrors", 0),
            udp.get("SndbufErrors", 0),
            busiest,
            1.0,
        )
        short = window.counters.get("send_short", 0)
        if short:
            reasons.append(f"{short} datagrams could not be sent (socket buffer full)")
        if self.crashed:
            reasons.append(f"engine crashed on {sorted(self.crashed)}: {self.crashed}")
        if self.expected_finals and len(self.finals) < self.expected_finals:
            reasons.append(f"final data from {len(self.finals)}/{self.expected_finals} workers")
        notes = []
        ramp_lag = [
            row["generator"]["tick_lag_p99_ms"]
            for row in self.series
            if row.get("phase") == "ramp" and row["generator"]["tick_lag_p99_ms"] is not None
        ]
        if held and ramp_lag and max(ramp_lag) > 20.0:
            notes.append(
                f"ramp: generator tick lag p99 up to {max(ramp_lag):.0f} ms while Locust "
                "spawned users; the hold figures exclude the ramp"
            )
        return {
            "valid": not reasons,
            "reasons": reasons,
            "judged": "hold" if held else "whole run",
            "notes": notes,
        }

    def hold_summary(self) -> dict[str, Any] | None:
        held = [row for row in self.series if row.get("phase") == "hold"]
        if not held:
            return None
        sent = self.hold.counters.get("media_sent", 0)
        received = self.hold.counters.get("media_received", 0)
        return {
            "intervals": len(held),
            "seconds": round(held[-1]["t_s"] - held[0]["t_s"] + INTERVAL_S, 1),
            "sessions": held[-1]["sessions"],
            "rtt_ms": hdr.summary_ms(self.hold.rtt),
            "tick_lag_ms": hdr.summary_ms(self.hold.tick_lag),
            "media_sent": sent,
            "media_received": received,
            "loss_ratio": None if not sent else max(0.0, 1 - received / sent),
            "consents_sent": self.hold.counters.get("consents_sent", 0),
            "consents_answered": self.hold.counters.get("consents_answered", 0),
            "udp_errors": self.hold_udp,
        }

    def server_per_session(self) -> dict[str, Any]:
        """At the peak: server cores and RSS per session, and the relay's full-rate capacity
        per core extrapolated from the packets it forwarded per CPU-second."""
        peak = [
            r for r in self.series if r["sessions"] and r["sessions"] >= 0.99 * self.peak_sessions
        ]
        if not peak:
            return {}
        out: dict[str, Any] = {"sessions": self.peak_sessions}
        first = self.series[0]["server"]["rss_mb"] if self.series else {}
        for server in self.servers:
            cores = [r["server"]["cpu_cores"].get(server.name) for r in peak]
            cores = [c for c in cores if c is not None]
            if not cores:
                continue
            mean = float(np.mean(cores))
            rss = peak[-1]["server"]["rss_mb"].get(server.name, 0.0)
            out[server.name] = {
                "cpu_cores": round(mean, 4),
                "cpu_us_per_session_s": round(mean / self.peak_sessions * 1e6, 3),
                "rss_mb": rss,
                "rss_kb_per_session": round(
                    (rss - first.get(server.name, rss)) * 1000 / self.peak_sessions, 3
                ),
            }
            packets = float(np.mean([r["packets_per_s"] for r in peak]))
            if mean > 0 and server.name == "relay":
                # both directions pass the relay: each client packet is forwarded out and back
                per_core = 2 * packets / mean
                out[server.name]["forwards_per_cpu_s"] = round(per_core, 1)
                out[server.name]["full_rate_sessions_per_core"] = round(per_core / 100, 1)
        return out

    def build(self) -> dict[str, Any]:
        setup_total = self.locust_setup or {}
        failed = int(self.total.counters.get("setups_failed", 0))
        ok = int(self.total.counters.get("setups_ok", 0))
        return {
            "scenario": "relay",
            "config": {**self.config, "workers": len(self.gauges) or 1},
            "verdict": self.verdict(),
            "setup": {
                "attempted": ok + failed,
                "succeeded": ok,
                "failed": {"stun_timeout": failed} if failed else {},
                "ms": hdr.summary_ms(self.total.setup),
                "locust": setup_total,
            },
            "peak_sessions": self.peak_sessions,
            "hold": self.hold_summary(),
            "media": self.media(),
            "consent": {
                "sent": sum(f.get("consents_sent", 0) for f in self.finals.values()),
                "answered": sum(f.get("consents_answered", 0) for f in self.finals.values()),
                "stale_at_end": sum(
                    f.get("gauges", {}).get("consent_stale", 0) for f in self.finals.values()
                ),
            },
            "server_per_session": self.server_per_session(),
            "generator": {
                "tick_lag_ms": hdr.summary_ms(self.total.tick_lag),
                "cpu_s": {k: round(v, 2) for k, v in self.total.worker_cpu_s.items()},
                "udp_errors": self._udp_delta(),
                "workers_final": f"{len(self.finals)}/{self.expected_finals}",
            },
            "series": self.series,
            "faults": self.faults(),
            "histograms": {
                "rtt_us": self.total.rtt.encode().decode("ascii")
                if self.total.rtt.get_total_count()
                else None,
            },
        }

    def headline(self) -> dict[str, Any]:
        report = self.build()
        return {
            "valid": report["verdict"]["valid"],
            "peak_sessions": report["peak_sessions"],
            "setup": {k: report["setup"][k] for k in ("attempted", "succeeded")},
            "media": {k: v for k, v in report["media"].items() if k != "rtt_ms"},
        }

    def write(self) -> Path:
        self.close_interval()
        self.report_dir.mkdir(parents=True, exist_ok=True)
        report = self.build()
        path = self.report_dir / "report.json"
        path.write_text(json.dumps(report, indent=1))
        if self.figures:
            figures.draw(report, self.report_dir)
        text = figures.summary(report)
        (self.report_dir / "summary.txt").write_text(text + "\n")
        print(text, flush=True)
        self.written = True
        return path
