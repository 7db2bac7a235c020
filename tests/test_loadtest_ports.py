"""The ports scenario, really run: a network namespace, kube-proxy-style DNAT rules programmed
with iptables-restore and read back, C echo servers behind them, new flows through the rules.

A short run (100 and 1,000 sessions) in this process; asserts what was programmed, echoed and
written, and that nothing is left behind (namespace, echo processes). No timing assertions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtest import ports

SESSIONS = (100, 1000)
PROBES, LAST_RULE_PROBES = 40, 10
SOCKETS = ports.PortsSettings().load_sockets
CPU_REPEATS = 3


def netns_unavailable() -> str | None:
    """Why this machine cannot run the scenario, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    if missing := ports.missing_tools():
        return f"missing {', '.join(missing)}"
    name = ports.new_netns_name()
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None if made.returncode == 0 else f"no network namespaces: {made.stderr.strip()}"


UNAVAILABLE = netns_unavailable()
needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def our_children() -> list[str]:
    """Commands of this process's live children (the echo servers must all be gone)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            line = stat.read_text()
        except OSError:
            continue
        after = line[line.rindex(")") + 2 :].split()
        if int(after[1]) == os.getpid() and after[0] != "Z":
            children.append(line[line.index("(") + 1 : line.rindex(")")])
    return children


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("ports")
    argv = ["--sessions", ",".join(map(str, SESSIONS)), "--probes", str(PROBES)]
    argv += ["--last-rule-probes", str(LAST_RULE_PROBES), "--cpu-s", "0.6"]
    argv += ["--cpu-repeats", str(CPU_REPEATS)]
    argv += ["--restore-repeats", "1", "--report-dir", str(out / "report")]
    argv += ["--build-dir", str(out / "bin")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = ports.main(argv)
    report = json.loads((out / "report" / "ports.json").read_text()) if code == 0 else {}
    return code, report, out / "report", printed.getvalue()


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_session_count_has_both_designs(run: tuple[int, dict[str, Any], Path, str]) -> None:
    code, report, _, _ = run
    assert code == 0
    assert report["scenario"] == "ports"
    assert [p["sessions"] for p in report["points"]] == list(SESSIONS)
    for point in report["points"]:
        assert set(point["designs"]) == set(ports.DESIGNS)


@needs_netns
@pytest.mark.slow
def test_rules_read_back_are_one_per_session_and_one(
    run: tuple[int, dict[str, Any], Path, str],
) -> None:
    for point in run[1]["points"]:
        designs = point["designs"]
        assert designs[ports.PORT_PER_SESSION]["rules_read_back"] == point["sessions"]
        assert designs[ports.ONE_PORT]["rules_read_back"] == 1


@needs_netns
@pytest.mark.slow
def test_first_packets_of_new_flows_are_echoed(run: tuple[int, dict[str, Any], Path, str]) -> None:
    for point in run[1]["points"]:
        for name, design in point["designs"].items():
            first = design["first_packet"]
            flows = {label: summary["flows"] for label, summary in first.items()}
            assert flows == {"spread": PROBES, "last_rule": LAST_RULE_PROBES, "no_rules": PROBES}
            for label, summary in first.items():
                assert summary["echoed"] > 0, (point["sessions"], name, label)
                assert summary["p50_us"] > 0
            added = design["conntrack_probes_added"]
            if added is not None:  # every probe through the rules was a new flow
                assert added >= first["spread"]["echoed"] + first["last_rule"]["echoed"]


@needs_netns
@pytest.mark.slow
def test_echo_servers_carried_the_cpu_load(run: tuple[int, dict[str, Any], Path, str]) -> None:
    for point in run[1]["points"]:
        for design in point["designs"].values():
            cpu = design["server_cpu"]
            assert len(cpu["runs"]) == CPU_REPEATS
            for load in cpu["runs"]:
                assert load["sent"] > 0 and 0 < load["echoed"] <= load["sent"]
                assert load["us_per_packet"] is not None and load["us_per_packet"] > 0
                if load["conntrack_added"] is not None:  # each slot of a run is a new flow
                    flows = min(load["sent"], max(design["ports"], SOCKETS))
                    assert load["conntrack_added"] >= flows, (point["sessions"], load)
            assert cpu["us_per_packet"] in [load["us_per_packet"] for load in cpu["runs"]]
            assert design["echoed_total"] >= cpu["echoed"]


@needs_netns
@pytest.mark.slow
def test_nothing_is_left_behind(run: tuple[int, dict[str, Any], Path, str]) -> None:
    used = {point["netns"] for point in run[1]["points"]}
    assert len(used) == len(SESSIONS)
    assert not used & netns_names()
    assert not any(Path("/run/netns", name).exists() for name in used)
    assert not [c for c in our_children() if c.startswith(ports.ECHO_PROGRAM)]


@needs_netns
@pytest.mark.slow
def test_table_and_plot_are_written(run: tuple[int, dict[str, Any], Path, str]) -> None:
    _, _, report_dir, printed = run
    png = (report_dir / "ports.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    rows = [line.split()[0] for line in printed.splitlines() if line[:6].strip().isdigit()]
    assert rows == [str(n) for n in SESSIONS]


@needs_netns
def test_namespace_is_deleted_when_the_body_fails() -> None:
    netns = ports.Netns(ports.new_netns_name())
    with pytest.raises(RuntimeError, match="boom"), netns:
        assert netns.name in netns_names()
        assert "inet 10.244.0.2/32" in netns.run(["ip", "-4", "addr", "show", "dev", "lo"])
        raise RuntimeError("boom")
    assert netns.name not in netns_names()


def test_a_missing_tool_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for tool in ("ip", "iptables-save", "gcc"):
        (tmp_path / tool).symlink_to(shutil.which(tool) or tool)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert ports.main(["--sessions", "10", "--report-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "missing tools: iptables-restore (Debian package iptables)" in error
    assert not (tmp_path / "out").exists()


def test_session_counts_outside_the_port_range_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        ports.main(["--sessions", f"1000,{ports.MAX_SESSIONS + 1}"])
    assert exit_.value.code == 2
    assert f"each count must be in [1, {ports.MAX_SESSIONS}]" in capsys.readouterr().err
