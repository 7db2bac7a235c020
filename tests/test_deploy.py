"""The deployment files are valid as their own tools see them, offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_kustomize_builds_and_validates_against_kubernetes_schemas(tmp_path: Path) -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s"))
    assert built.returncode == 0, built.stderr
    manifest = tmp_path / "voicerelay.yaml"
    manifest.write_text(built.stdout)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(built.stdout) if doc}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    checked = run(str(BIN / "kubernetes-validate"), "--strict", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_pod_has_liveness_readiness_and_metrics_annotations() -> None:
    built = run(str(BIN / "kubectl"), "kustomize", str(ROOT / "k8s"))
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
