"""A process that refuses its configuration refuses it before importing the server.

``python -m transceiver`` and ``python -m relay`` check their flags and environment with the
config modules only (argparse and dataclasses); fastapi, aiortc, the pipeline's providers,
redis and the relay's workers are imported once the configuration has passed. Each case runs
the real entry point with ``-X importtime`` (the interpreter lists every module it imports, on
standard error) and checks the refusal (exit 2, the message) and what was imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.processes import random_keys

ROOT = Path(__file__).resolve().parents[1]
KEYS = random_keys()
# What the transceiver's server imports and a refusal must not: WebRTC, Redis, the pipeline's
# audio (numpy) and the server modules themselves; and, but for a pod's checks, which come after
# its supervisor is imported, the web stack.
SERVER = {"aiortc", "av", "redis", "numpy", "transceiver.server", "transceiver.agents"}
WEB = {"fastapi", "uvicorn", "httpx"}


def refuse(args: list[str], env: dict[str, str]) -> tuple[str, set[str]]:
    """Run ``python -X importtime -m ARGS``; expect exit 2 and return (its error lines, the
    modules it imported)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSCEIVER_", "RELAY_"))}
    base = {k: v for k, v in base.items() if not k.startswith(("PIPELINE_", "REDIS_"))}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", *args],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    errors = "\n".join(line for line in lines if not line.startswith("import time:"))
    assert done.returncode == 2, errors
    return errors, imported


TRANSCEIVER_REFUSALS = [
    pytest.param([], {}, "TRANSCEIVER_API_KEY is not set", id="no-api-key"),
    pytest.param(
        ["--insecure-dev", "--agent", "pipeline"],
        {"PIPELINE_STT": "bogus"},
        "PIPELINE_STT must be one of",
        id="bad-pipeline-setting",
    ),
    pytest.param(
        ["--insecure-dev"],
        {"TRANSCEIVER_POD_SEAT": "not json"},
        "TRANSCEIVER_POD_SEAT is not a pod seat",
        id="bad-worker-seat",
    ),
    pytest.param(
        ["--insecure-dev", "--workers", "2", "--link", "127.0.0.1:65535"],
        {},
        "2 workers need link ports to 65536",
        id="pod-out-of-link-ports",
    ),
]


@pytest.mark.parametrize(("flags", "env", "message"), TRANSCEIVER_REFUSALS)
def test_the_transceiver_refuses_before_importing_its_server(
    flags: list[str], env: dict[str, str], message: str
) -> None:
    errors, imported = refuse(["transceiver", "--keys", KEYS, *flags], env)
    assert message in errors
    assert "transceiver.config" in imported  # the listing is there: the checks below can fail
    heavy = SERVER if "--workers" in flags else SERVER | WEB
    assert not imported & heavy, sorted(imported & heavy)


def test_export_without_redis_refuses_before_importing_the_store() -> None:
    errors, imported = refuse(["transceiver", "export"], {})
    assert "set REDIS_URL" in errors
    assert "relay.wire.redis_config" in imported
    heavy = {"transceiver.store.call_log", "asyncio", *SERVER, *WEB}
    assert not imported & heavy, sorted(imported & heavy)


def test_the_relay_refuses_before_importing_its_supervisor() -> None:
    errors, imported = refuse(["relay", "--keys", "not-a-keyring"], {})
    assert "relay: bad configuration" in errors
    assert "relay.config" in imported
    heavy = {"relay.supervisor", "relay.worker", "redis", "prometheus_client", "uvloop"}
    assert not imported & heavy, sorted(imported & heavy)
