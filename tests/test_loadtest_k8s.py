"""The distributed load tester's manifests (k8s/loadtest) and image agree with each other and
with the relay they test, and are valid as their own tools see them, offline."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import ConfigError as RelayConfigError
from relay.config import load_config as load_relay_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOADTEST = ROOT / "k8s" / "loadtest"
RELAY_PATCH = LOADTEST / "relay-under-test.patch.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile.loadtest"
MASTER, WORKER, LAB = "loadtest-master", "loadtest-worker", "lab-transceiver"
PORT_RANGE = "net.ipv4.ip_local_port_range"
UNPRIVILEGED_PORT_START = 1024  # the kernel's default net.ipv4.ip_unprivileged_port_start

Doc = dict[str, Any]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def kustomize(path: Path) -> str:
    built = run(str(BIN / "kubectl"), "kustomize", str(path))
    assert built.returncode == 0, built.stderr
    return built.stdout


def documents(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate_strict(text: str, where: Path) -> None:
    where.write_text(text)
    checked = run(str(BIN / "kubernetes-validate"), "--strict", str(where))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return documents(kustomize(LOADTEST))


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return documents(kustomize(ROOT / "k8s" / "base"))


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(docs: list[Doc], name: str) -> Doc:
    (only,) = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return dict(only)


def args(container: Doc) -> list[str]:
    """The container's arguments after Kubernetes expands ``$(VAR)`` from its literal env."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container["args"]]


def flag(arguments: list[str], name: str) -> str:
    assert arguments.count(name) == 1, f"{name} once in {arguments}"
    return arguments[arguments.index(name) + 1]


def service_port(service: Doc, name: str) -> Doc:
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == name]
    return dict(port)


def container_port(container: Doc, name: str) -> Doc:
    (port,) = [p for p in container["ports"] if p["name"] == name]
    return dict(port)


def selects(service: Doc, workload: Doc) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def address(service: Doc, port: str) -> str:
    meta = service["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc:{service_port(service, port)['port']}"


def test_kustomize_builds_and_validates_against_kubernetes_schemas(tmp_path: Path) -> None:
    built = kustomize(LOADTEST)
    kinds = sorted(d["kind"] for d in documents(built))
    assert kinds == ["Deployment"] * 3 + ["Namespace", "Secret"] + ["Service"] * 2
    validate_strict(built, tmp_path / "loadtest.yaml")


def test_workers_connect_to_the_master_service(docs: list[Doc]) -> None:
    worker = args(container(docs, WORKER))
    assert worker[:2] == ["relay", "--worker"]
    assert flag(worker, "--address-mode") == "sockets"
    service = one(docs, "Service", flag(worker, "--master-host"))
    assert "--master-port" not in worker  # Locust's default, 5557
    port = service_port(service, "master")
    assert (port["port"], port["protocol"]) == (5557, "TCP")
    master = one(docs, "Deployment", MASTER)
    assert selects(service, master)
    assert not selects(service, one(docs, "Deployment", WORKER))
    assert container_port(container(docs, MASTER), port["targetPort"])["containerPort"] == 5557
    assert service_port(service, "web")["port"] == 8089


def test_the_master_waits_for_every_worker_pod(docs: list[Doc]) -> None:
    master = args(container(docs, MASTER))
    assert master[:2] == ["relay", "--master"]
    replicas = one(docs, "Deployment", WORKER)["spec"]["replicas"]
    assert int(flag(master, "--expect-workers")) == replicas > 1
    assert one(docs, "Deployment", MASTER)["spec"]["replicas"] == 1


def test_the_worker_count_is_one_setting(tmp_path: Path) -> None:
    copy = tmp_path / "loadtest"
    shutil.copytree(LOADTEST, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    (entry,) = kustomization["replicas"]
    assert entry["name"] == WORKER
    entry["count"] = 7
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = documents(kustomize(copy))
    assert one(docs, "Deployment", WORKER)["spec"]["replicas"] == 7
    assert flag(args(container(docs, MASTER)), "--expect-workers") == "7"


def test_workers_have_a_port_and_a_file_descriptor_per_session(docs: list[Doc]) -> None:
    pod = one(docs, "Deployment", WORKER)["spec"]["template"]["spec"]
    (sysctl,) = [s for s in pod["securityContext"]["sysctls"] if s["name"] == PORT_RANGE]
    low, high = map(int, sysctl["value"].split())
    ports = high - low + 1
    assert UNPRIVILEGED_PORT_START <= low < high <= 65535 and ports >= 60_000
    assert (low + high) % 2 == 1  # the kernel's advice: one even end, one odd
    master = args(container(docs, MASTER))
    workers = one(docs, "Deployment", WORKER)["spec"]["replicas"]
    assert math.ceil(int(flag(master, "--sessions")) / workers) <= ports
    (fd_limit,) = re.findall(r"ulimit -n (\d+)", " ".join(container(docs, WORKER)["command"]))
    assert int(fd_limit) >= ports


def test_every_container_has_resources_and_runs_locked_down(docs: list[Doc]) -> None:
    workloads = [d for d in docs if d["kind"] == "Deployment"]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        # Service variables such as LOADTEST_MASTER_PORT=tcp://... must not read as settings.
        assert pod["enableServiceLinks"] is False
        for each in pod["containers"]:
            assert {"cpu", "memory"} <= each["resources"]["requests"].keys()
            assert "memory" in each["resources"]["limits"]
            context = each["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
    resources = container(docs, WORKER)["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "1"


def test_the_report_directory_is_a_volume(docs: list[Doc]) -> None:
    master = container(docs, MASTER)
    mounts = {m["mountPath"]: m["name"] for m in master["volumeMounts"]}
    volumes = one(docs, "Deployment", MASTER)["spec"]["template"]["spec"]["volumes"]
    assert mounts[flag(args(master), "--report-dir")] in {v["name"] for v in volumes}


def test_keys_come_from_the_secret(docs: list[Doc]) -> None:
    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    for name in (MASTER, WORKER, LAB):
        each = container(docs, name)
        (reference,) = [e for e in each["env"] if e["name"] == "LOADTEST_KEYS"]
        assert "value" not in reference and "envFrom" not in each
        selector = reference["valueFrom"]["secretKeyRef"]
        assert selector["key"] in secrets[selector["name"]]


def env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    entries = [line.partition("=") for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, _, value in entries}


def test_the_shipped_keyring_is_a_placeholder_the_relay_refuses(docs: list[Doc]) -> None:
    shipped = env_file(LOADTEST / "keys.env")["LOADTEST_KEYS"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert base64.b64decode(secret["data"]["LOADTEST_KEYS"]).decode() == shipped
    # LOADTEST_KEYS is the relay's keyring: a copy nobody filled in fails at start, named.
    with pytest.raises(RelayConfigError, match="^RELAY_KEYS: key 1 secret is not hex"):
        load_relay_config([], {"RELAY_KEYS": shipped, "RELAY_TRANSCEIVERS": "127.0.0.1:7000"})


def test_the_master_targets_the_relay_service(docs: list[Doc], base: list[Doc]) -> None:
    relay = one(base, "Service", "relay")
    assert service_port(relay, "media")["protocol"] == "UDP"
    assert flag(args(container(docs, MASTER)), "--target") == address(relay, "media")


def patched_relay(base: list[Doc], tmp_path: Path) -> list[Doc]:
    """The relay deployment of k8s/ with the shipped patch, as `kubectl patch` applies it."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump_all(base))
    shutil.copy(RELAY_PATCH, tmp_path / RELAY_PATCH.name)
    target = {"kind": "Deployment", "name": "relay"}
    kustomization = {
        "resources": ["base.yaml"],
        "patches": [{"path": RELAY_PATCH.name, "target": target}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = kustomize(tmp_path)
    validate_strict(built, tmp_path / "patched.yaml")
    return documents(built)


def test_the_relay_under_test_knows_the_lab_transceiver(
    docs: list[Doc], base: list[Doc], tmp_path: Path
) -> None:
    service = one(docs, "Service", LAB)
    link = service_port(service, "link")
    assert link["protocol"] == "UDP" and selects(service, one(docs, "Deployment", LAB))
    # Headless, and listening on the pod's IP: the relay's HELLOs are addressed to the IP the
    # name resolves to, and the lab transceiver accepts only those addressed to its own.
    assert service["spec"]["clusterIP"] == "None"
    lab = container(docs, LAB)
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in lab[
        "env"
    ]
    listen = flag(args(lab), "--listen")
    assert listen == f"$(POD_IP):{container_port(lab, link['targetPort'])['containerPort']}"
    lab_address = address(service, "link")
    assert flag(args(container(docs, MASTER)), "--transceiver") == lab_address
    relay = container(patched_relay(base, tmp_path), "relay")
    (listed,) = [e["value"] for e in relay["env"] if e["name"] == "RELAY_TRANSCEIVERS"]
    shipped = env_file(ROOT / "k8s" / "base" / "voicerelay.env")["RELAY_TRANSCEIVERS"]
    assert listed.split(",") == [*shipped.split(","), lab_address]


def test_dockerfile_passes_hadolint() -> None:
    checked = run(str(BIN / "hadolint"), str(DOCKERFILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_installs_the_full_lock_and_every_package() -> None:
    text = DOCKERFILE.read_text()
    lock = "--require-hashes --no-deps --only-binary :all: -r requirements.txt"
    assert "COPY requirements.txt ./" in text and f"RUN pip install {lock}" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (p.rstrip("*") for p in patterns):
        assert f"COPY {package} ./{package}\n" in text, package
    assert 'ENTRYPOINT ["python", "-m", "loadtest"]' in text
