"""The deployment files are valid as their own tools see them, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay.config import ConfigError as RelayConfigError
from relay.config import load_config as load_relay_config
from transceiver.config import ConfigError as TransceiverConfigError
from transceiver.config import TransceiverConfig
from transceiver.http.auth import AuthConfig, AuthConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_kustomize_builds_and_validates_against_kubernetes_schemas(tmp_path: Path) -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / "dev"))
    assert built.returncode == 0, built.stderr
    manifest = tmp_path / "voicerelay.yaml"
    manifest.write_text(built.stdout)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    checked = run(str(BIN / "kubernetes-validate"), "--strict", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_pod_has_liveness_readiness_and_metrics_annotations() -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s" / "base"))
    workloads = [
        d for d in yaml.safe_load_all(built.stdout) if d and "template" in d.get("spec", {})
    ]
    assert len(workloads) == 2
    for workload in workloads:
        pod = workload["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for container in pod["spec"]["containers"]:
            assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_dockerfile_passes_hadolint() -> None:
    checked = run(str(BIN / "hadolint"), str(ROOT / "deploy" / "Dockerfile"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def env_file(name: str, overlay: str = "production") -> dict[str, str]:
    lines = (ROOT / "k8s" / "overlays" / overlay / name).read_text().splitlines()
    entries = [line.partition("=") for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, _, value in entries}


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_shipped_keys_are_placeholders_that_neither_process_accepts(overlay: str) -> None:
    shared, own = env_file("keys.env", overlay), env_file("transceiver-keys.env", overlay)
    assert shared["RELAY_KEYS"] == shared["TRANSCEIVER_KEYS"]
    with pytest.raises(RelayConfigError, match="^RELAY_KEYS: key 1 secret is not hex"):
        load_relay_config([], {**shared, "RELAY_TRANSCEIVERS": "127.0.0.1:7000"})
    with pytest.raises(TransceiverConfigError, match="^TRANSCEIVER_KEYS: key 1 secret is not"):
        TransceiverConfig.load([], shared)
    with pytest.raises(AuthConfigError, match="^TRANSCEIVER_SECRET_KEYS: key 1 secret is not"):
        AuthConfig.validated("required", "k8s-test-api-key-0123", own["TRANSCEIVER_SECRET_KEYS"])
