"""The Kubernetes overlays (k8s/overlays/{dev,production}, with the autoscaling components) render,
validate offline against the Kubernetes schemas and the CRDs they use, run locked down, never
cut a call (grace period, PDBs, liveness) and scale on calls; each check also fails on a copy
with its property broken.

Each overlay is rendered once per test session (``rendered``, cached); the other test_k8s_*
modules import it from here.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from relay.config import load_config as load_relay_config
from relay.http import HttpEndpoints
from transceiver.config import TransceiverConfig

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from
# 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# After the drain: close what is left, stop HTTP, release leases, close Redis (transceiver);
# after the workers stop: exit (relay).
TRANSCEIVER_SHUTDOWN_MARGIN_S = 10.0
RELAY_SHUTDOWN_MARGIN_S = 5.0
RENDERS = {
    "base": ("k8s/base", ()),
    "dev": ("k8s/overlays/dev", ()),
    "production": ("k8s/overlays/production", ()),
    "production+keda": ("k8s/overlays/production", ("k8s/components/autoscale-keda",)),
    "production+hpa": ("k8s/overlays/production", ("k8s/components/autoscale-hpa",)),
}
OVERLAYS = ("dev", "production", "production+keda", "production+hpa")

Doc = dict[str, Any]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def kustomize(path: Path) -> list[Doc]:
    built = run(str(BIN / "kubectl"), "kustomize", str(path))
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def compose(where: Path, base: Path, components: tuple[Path, ...]) -> Path:
    """A kustomization in ``where`` of ``base`` plus ``components``, as an operator's own."""
    relative = [os.path.relpath(p, where) for p in (base, *components)]
    kustomization = {"resources": relative[:1], "components": relative[1:]}
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return where


@functools.cache
def _rendered(name: str) -> str:
    base, components = RENDERS[name]
    if not components:
        return json.dumps(kustomize(ROOT / base))
    with tempfile.TemporaryDirectory() as tmp:
        paths = tuple(ROOT / c for c in components)
        return json.dumps(kustomize(compose(Path(tmp), ROOT / base, paths)))


def rendered(name: str) -> list[Doc]:
    """The rendered documents of one overlay (a fresh copy of the session's one render)."""
    docs: list[Doc] = json.loads(_rendered(name))
    return docs


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def ours(docs: list[Doc]) -> dict[str, Doc]:
    """The relay and transceiver workloads by name."""
    return {w["metadata"]["name"]: w for w in workloads(docs) if w["metadata"]["name"] in NAMES}


NAMES = ("relay", "transceiver")


def settings(docs: list[Doc]) -> dict[str, str]:
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"].startswith("voicerelay-")
        and "dashboard" not in d["metadata"]["name"]
    ]
    data: dict[str, str] = config["data"]
    return data


# --- schemas -----------------------------------------------------------------------------------


@functools.cache
def crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> the vendored strict schema (k8s/schemas, see its README)."""
    found = {}
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        source = schema["x-vendored-from"]
        found[(f"{source['group']}/{source['version']}", source["kind"])] = schema
    return found


def schema_errors(docs: list[Doc]) -> list[str]:
    """Every document against its schema: Kubernetes' own (strict) for built-in kinds, the
    vendored CRD schema for the rest; a kind with neither is an error, never a pass."""
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        crd = crd_schemas().get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            for error in jsonschema.Draft202012Validator(crd).iter_errors(doc):
                errors.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{where}: no schema for {doc['apiVersion']} {doc['kind']}")
                break
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                errors.append(f"{where} (Kubernetes {version}): {path}: {error.message}")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_validates_against_kubernetes_and_crd_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    assert schema_errors(docs) == []
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_schema_validation_fails_on_a_typo_an_unknown_field_and_an_unknown_kind() -> None:
    docs = rendered("production+keda")
    relay = one(docs, "Deployment", "relay")
    relay["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    scaled = one(docs, "ScaledObject", "transceiver")
    scaled["spec"]["minReplicas"] = 3  # KEDA's is minReplicaCount
    monitor = one(docs, "PodMonitor", "relay")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a duration string
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    errors = "\n".join(schema_errors([relay, scaled, monitor, unknown]))
    assert "Deployment/relay" in errors and "livenessprobe" in errors
    assert "ScaledObject/transceiver" in errors and "minReplicas" in errors
    assert "PodMonitor/relay: spec.podMetricsEndpoints.0.interval" in errors
    assert "Widget/w: no schema" in errors


def test_the_kubernetes_validate_command_passes_the_production_overlay(tmp_path: Path) -> None:
    """The same tool as an operator runs it (custom kinds are only warned about there)."""
    manifest = tmp_path / "production.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered("production")))
    checked = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(manifest))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- least privilege ---------------------------------------------------------------------------


def policy_findings(docs: list[Doc]) -> list[str]:
    """What a policy scan would report: the restricted Pod Security Standard and more."""
    found = []
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        context = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            found.append(f"{name}: mounts a service-account token")
        if pod.get("enableServiceLinks") is not False:
            found.append(f"{name}: Service variables in the environment")
        if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
            found.append(f"{name}: shares a host namespace")
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            found.append(f"{name}: may run as root")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            found.append(f"{name}: seccomp is not RuntimeDefault")
        for container in pod["containers"] + pod.get("initContainers", []):
            found += container_findings(f"{name}/{container['name']}", container)
    for account in (d for d in docs if d["kind"] == "ServiceAccount"):
        if account.get("automountServiceAccountToken") is not False:
            found.append(f"ServiceAccount {account['metadata']['name']}: token automounted")
    for namespace in (d for d in docs if d["kind"] == "Namespace"):
        enforce = namespace["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        if enforce != "restricted":
            found.append(f"Namespace {namespace['metadata']['name']}: not restricted")
    return found


def container_findings(where: str, container: Doc) -> list[str]:
    found = []
    context = container.get("securityContext", {})
    if context.get("readOnlyRootFilesystem") is not True:
        found.append(f"{where}: writable root filesystem")
    if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
        found.append(f"{where}: may escalate privileges")
    capabilities = context.get("capabilities", {})
    if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
        found.append(f"{where}: keeps capabilities")
    if any(port.get("hostPort") for port in container.get("ports", [])):
        found.append(f"{where}: binds a host port")
    resources = container.get("resources", {})
    if not {"cpu", "memory"} <= resources.get("requests", {}).keys():
        found.append(f"{where}: no CPU and memory requests")
    if "memory" not in resources.get("limits", {}):
        found.append(f"{where}: no memory limit")
    image = container["image"]
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        found.append(f"{where}: image {image} is not pinned")
    for variable in container.get("env", []):
        if re.search(r"KEY|SECRET|PASSWORD", variable["name"]) and "value" in variable:
            found.append(f"{where}: {variable['name']} is written in the manifest")
    return found


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_every_pod_runs_locked_down(overlay: str) -> None:
    assert policy_findings(rendered(overlay)) == []


def test_the_policy_scan_reports_each_broken_property() -> None:
    docs = rendered("production")
    relay, transceiver = ours(docs)["relay"], ours(docs)["transceiver"]
    del relay["spec"]["template"]["spec"]["automountServiceAccountToken"]
    relay["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    transceiver["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"] = (
        "Unconfined"
    )
    (container,) = transceiver["spec"]["template"]["spec"]["containers"]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    container["env"].append({"name": "TRANSCEIVER_API_KEY", "value": "in-the-manifest"})
    findings = "\n".join(policy_findings(docs))
    for expected in (
        "relay: mounts a service-account token",
        "relay: may run as root",
        "transceiver: seccomp is not RuntimeDefault",
        "transceiver/transceiver: writable root filesystem",
        "transceiver/transceiver: keeps capabilities",
        "transceiver/transceiver: TRANSCEIVER_API_KEY is written in the manifest",
    ):
        assert expected in findings


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_keys_come_from_secrets_and_only_transceivers_get_the_client_secret_keys(
    overlay: str,
) -> None:
    docs = rendered(overlay)
    secrets_by_name = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    held = {}
    for name, workload in ours(docs).items():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
        held[name] = {key for ref in refs for key in secrets_by_name[ref]}
    assert {"RELAY_KEYS", "TRANSCEIVER_KEYS"} <= held["relay"] | held["transceiver"]
    assert "TRANSCEIVER_SECRET_KEYS" in held["transceiver"]
    assert "TRANSCEIVER_SECRET_KEYS" not in held["relay"]
    assert not any("KEYS" in key for key in settings(docs))  # never in the ConfigMap


# --- never cut a call --------------------------------------------------------------------------


def pre_stop_s(container: Doc) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def container_environment(docs: list[Doc], container: Doc) -> dict[str, str]:
    """What the process sees: the ConfigMap, literal env ($(VAR) expanded), test keys and IPs."""
    keyring = f"1:{secrets.token_hex(32)}"
    env = {
        **settings(docs),
        "RELAY_KEYS": keyring,
        "TRANSCEIVER_KEYS": keyring,
        "POD_IP": "10.0.0.1",
    }
    env["RELAY_INTERNAL_HOST"] = "10.0.0.1"
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), variable["value"]
            )
    return env


def grace_findings(docs: list[Doc]) -> list[str]:
    """Each pod's grace period against preStop + what its process is configured to take."""
    found = []
    for name, workload in ours(docs).items():
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = container_environment(docs, container)
        argv = container["args"][1:]
        if name == "transceiver":
            config = TransceiverConfig.load(argv, env)
            needed = (
                config.drain_timeout_s
                + config.survival.route_flush_timeout_s
                + TRANSCEIVER_SHUTDOWN_MARGIN_S
            )
            what = f"drain {config.drain_timeout_s:g} s + route flush + margin"
        else:
            needed = load_relay_config(argv, env).timing.stop_timeout_s + RELAY_SHUTDOWN_MARGIN_S
            what = "worker stop + margin"
        needed += pre_stop_s(container)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < needed:
            found.append(f"{name}: grace {grace} s < preStop + {what} = {needed:g} s")
    return found


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_the_grace_period_covers_pre_stop_drain_and_hand_over(overlay: str) -> None:
    docs = rendered(overlay)
    assert grace_findings(docs) == []
    # The drain is the configured setting, not the default, and there is a preStop pause.
    assert float(settings(docs)["TRANSCEIVER_DRAIN_TIMEOUT_S"]) == 60
    for workload in ours(docs).values():
        assert pre_stop_s(workload["spec"]["template"]["spec"]["containers"][0]) > 0


def test_a_drain_deadline_longer_than_the_grace_period_fails() -> None:
    docs = rendered("production")
    settings(docs)["TRANSCEIVER_DRAIN_TIMEOUT_S"] = "120"
    ours(docs)["relay"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 12
    findings = grace_findings(docs)
    assert len(findings) == 2
    assert findings[0].startswith("relay: grace 12 s < preStop")
    assert (
        findings[1]
        == "transceiver: grace 90 s < preStop + drain 120 s + route flush + margin = 136 s"
    )


def disruption_findings(docs: list[Doc]) -> list[str]:
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    found = []
    for name, workload in ours(docs).items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [
            b
            for b in budgets
            if all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
        ]
        if len(covering) != 1:
            found.append(f"{name}: {len(covering)} disruption budgets")
        elif covering[0]["spec"].get("maxUnavailable") != 1:
            found.append(f"{name}: the budget is not one pod at a time")
    return found


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_relays_and_transceivers_have_a_disruption_budget_of_one(overlay: str) -> None:
    assert disruption_findings(rendered(overlay)) == []


def test_a_missing_disruption_budget_is_found() -> None:
    docs = [d for d in rendered("production") if d["kind"] != "PodDisruptionBudget"]
    assert disruption_findings(docs) == [
        "relay: 0 disruption budgets",
        "transceiver: 0 disruption budgets",
    ]


def livez_reads(source: str) -> set[str]:
    """The names the transceiver's /livez handler reads (nothing but its own reply)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and any(
            isinstance(d, ast.Call) and d.args and getattr(d.args[0], "value", None) == "/livez"
            for d in node.decorator_list
        ):
            body = ast.Module(body=node.body, type_ignores=[])
            return {n.id for n in ast.walk(body) if isinstance(n, ast.Name)}
    raise AssertionError("no /livez handler")


def test_liveness_never_depends_on_redis_or_any_dependency() -> None:
    for workload in ours(rendered("production")).values():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The relay: /livez answers 200 while /readyz says not ready.
    endpoints = HttpEndpoints(lambda: ((), (), 0, 0), ready=lambda: False)
    assert endpoints.respond("GET", "/livez")[0] == 200
    assert endpoints.respond("GET", "/readyz")[0] == 503
    # The transceiver: the handler reads nothing (no persistence, no calls, no provider).
    assert livez_reads((ROOT / "transceiver" / "http" / "app.py").read_text()) == set()
    broken = '@app.get("/livez")\nasync def livez():\n    return persistence.status()\n'
    assert livez_reads(broken) == {"persistence"}


# --- overlays ----------------------------------------------------------------------------------


def discovery_findings(docs: list[Doc]) -> list[str]:
    """The relay must find every transceiver pod that may hold calls, whatever their count: its
    RELAY_TRANSCEIVERS names a headless Service selecting them all, ready or not, on the link
    port (relay.transceivers: a relay lets go of an address the answers drop)."""
    stateful = ours(docs)["transceiver"]
    labels = stateful["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    found = []
    for entry in settings(docs)["RELAY_TRANSCEIVERS"].split(","):
        host, _, port = entry.rpartition(":")
        service = services.get(host)
        if service is None:
            found.append(f"{entry}: not a Service of the overlay")
            continue
        spec = service["spec"]
        if spec.get("clusterIP") != "None":
            found.append(f"{entry}: not headless (one address, not one per pod)")
        if spec.get("publishNotReadyAddresses") is not True:
            found.append(f"{entry}: drops pods that are not ready (full, draining)")
        if not spec["selector"].items() <= labels.items():
            found.append(f"{entry}: does not select the transceiver pods")
        if not any(p["port"] == int(port) and p["protocol"] == "UDP" for p in spec["ports"]):
            found.append(f"{entry}: no UDP port {port}")
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    link = {e["name"]: e.get("value") for e in container["env"]}.get("TRANSCEIVER_LINK")
    if link != "$(POD_IP):7000":
        found.append(f"transceiver: TRANSCEIVER_LINK {link} is not the pod IP on the link port")
    return found


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_the_relay_finds_every_transceiver_pod_through_the_headless_service(overlay: str) -> None:
    docs = rendered(overlay)
    workers = int(settings(docs)["TRANSCEIVER_WORKERS"])  # worker i of a pod: link port 7000 + i
    links = tuple(("transceiver", 7000 + index) for index in range(workers))
    assert settings(docs)["RELAY_TRANSCEIVERS"] == ",".join(f"{h}:{p}" for h, p in links)
    assert discovery_findings(docs) == []
    env = container_environment(
        docs, ours(docs)["relay"]["spec"]["template"]["spec"]["containers"][0]
    )
    config = load_relay_config([], env)  # the relay takes the name as it is, to look up later
    assert config.transceivers == links


def test_a_service_that_hides_pods_from_the_relay_is_found() -> None:
    docs = rendered("production")
    service = one(docs, "Service", "transceiver")
    service["spec"]["publishNotReadyAddresses"] = False
    service["spec"]["clusterIP"] = "10.0.0.10"
    settings(docs)["RELAY_TRANSCEIVERS"] = "transceiver:7000,signalling:7000"
    assert discovery_findings(docs) == [
        "transceiver:7000: not headless (one address, not one per pod)",
        "transceiver:7000: drops pods that are not ready (full, draining)",
        "signalling:7000: not headless (one address, not one per pod)",
        "signalling:7000: drops pods that are not ready (full, draining)",
        "signalling:7000: no UDP port 7000",
    ]


def test_dev_fits_a_laptop() -> None:
    docs = rendered("dev")
    replicas = {w["metadata"]["name"]: w["spec"]["replicas"] for w in workloads(docs)}
    assert replicas == {"relay": 1, "transceiver": 1, "redis": 1}
    assert one(docs, "Service", "relay")["spec"]["type"] == "NodePort"
    assert settings(docs)["REDIS_URL"] == "redis://redis:6379/0"


def test_production_keeps_client_addresses_spreads_zones_and_uses_sentinel() -> None:
    docs = rendered("production")
    relay_service = one(docs, "Service", "relay")
    assert relay_service["spec"]["type"] == "LoadBalancer"
    assert relay_service["spec"]["externalTrafficPolicy"] == "Local"
    spread = ours(docs)["transceiver"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    zones = [c for c in spread if c["topologyKey"] == "topology.kubernetes.io/zone"]
    assert [c["whenUnsatisfiable"] for c in zones] == ["DoNotSchedule"]
    config = settings(docs)
    assert config["REDIS_SENTINELS"] and config["REDIS_SENTINEL_SERVICE"] == "mymaster"
    assert "REDIS_URL" not in config
    values = yaml.safe_load((K8S / "overlays" / "production" / "redis-ha-values.yaml").read_text())
    assert values["redis"]["masterGroupName"] == config["REDIS_SENTINEL_SERVICE"]
    assert int(config["REDIS_WAIT_REPLICAS"]) < values["replicas"]


def test_the_signalling_ingress_never_exposes_metrics_or_health() -> None:
    ingress = one(rendered("production"), "Ingress", "signalling")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for private in ("/metrics", "/livez", "/readyz"):
        for path in paths:
            exposed = private == path["path"] or (
                path["pathType"] == "Prefix" and private.startswith(path["path"].rstrip("/") + "/")
            )
            assert not exposed, (private, path)
    assert any(p["path"] == "/v1/realtime" for p in paths)


# --- scale on calls ----------------------------------------------------------------------------


def scaling(docs: list[Doc]) -> Iterator[tuple[str, Doc, Doc]]:
    """(target name, the autoscaler's spec, its HPA behavior) for KEDA and HPA alike."""
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            yield doc["spec"]["scaleTargetRef"]["name"], doc["spec"], behavior
        elif doc["kind"] == "HorizontalPodAutoscaler":
            yield doc["spec"]["scaleTargetRef"]["name"], doc["spec"], doc["spec"]["behavior"]


def per_pod_target(spec: Doc) -> tuple[str, float]:
    """(the metric, its target value per pod)."""
    if "triggers" in spec:
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        return trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    value = str(metric["pods"]["target"]["averageValue"])
    scale = {"k": 1000.0, "m": 0.001}.get(value[-1], 1.0)
    return metric["pods"]["metric"]["name"], float(value.rstrip("km")) * scale


@functools.cache
def adapter_queries() -> dict[str, str]:
    """prometheus-adapter's metric names -> the PromQL behind each (series and query)."""
    values = yaml.safe_load(
        (K8S / "components" / "autoscale-hpa" / "prometheus-adapter-values.yaml").read_text()
    )
    return {
        rule["name"]["as"]: rule["seriesQuery"] + " " + rule["metricsQuery"]
        for rule in values["rules"]["custom"]
    }


def calls_over_capacity(metric: str) -> bool:
    """A KEDA query, or an adapter metric, of live calls over the capacity the pods serve."""
    query = adapter_queries().get(metric, metric)
    return "transceiver_sessions" in query and "transceiver_capacity" in query


def scaling_findings(docs: list[Doc]) -> list[str]:
    found = []
    targets = {}
    for target, spec, behavior in scaling(docs):
        targets[target] = spec
        metric, per_pod = per_pod_target(spec)
        lowest = spec.get("minReplicaCount", spec.get("minReplicas", 0))
        if lowest < 1:
            found.append(f"{target}: may scale to zero")
        if behavior["scaleUp"]["stabilizationWindowSeconds"] != 0:
            found.append(f"{target}: does not scale up at once")
        down = behavior["scaleDown"]
        if target == "transceiver":
            if not calls_over_capacity(metric):
                found.append(f"transceiver: scales on {metric}, not live calls over capacity")
            if not 0 < per_pod < 1:
                found.append(f"transceiver: a target of {per_pod:g} of capacity leaves no room")
            if down["stabilizationWindowSeconds"] < 600 or any(
                p["type"] != "Pods" or p["value"] > 1 for p in down["policies"]
            ):
                found.append("transceiver: scales down faster than one pod at a time, slowly")
            if spec.get("fallback", {}).get("behavior", "currentReplicasIfHigher") != (
                "currentReplicasIfHigher"
            ):
                found.append("transceiver: a metrics outage may scale it down")
        elif "relay_forwarded_packets" not in metric:
            found.append(f"relay: scales on {metric}, not packets")
    if set(targets) != set(NAMES):
        found.append(f"autoscaled: {sorted(targets)}")
    for name, workload in ours(docs).items():
        if "replicas" in workload["spec"]:
            found.append(f"{name}: an apply would reset the autoscaler's replica count")
    return found


@pytest.mark.parametrize("overlay", ["production+keda", "production+hpa"])
def test_autoscaling_follows_calls_up_at_once_and_down_slowly(overlay: str) -> None:
    assert scaling_findings(rendered(overlay)) == []


def test_the_adapter_serves_the_metrics_the_autoscalers_read() -> None:
    values = yaml.safe_load(
        (K8S / "components" / "autoscale-hpa" / "prometheus-adapter-values.yaml").read_text()
    )
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    read = {per_pod_target(spec)[0] for _, spec, _ in scaling(rendered("production+hpa"))}
    assert read == served


def test_autoscaling_that_could_cut_calls_is_found() -> None:
    docs = rendered("production+keda")
    scaled = one(docs, "ScaledObject", "transceiver")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = "1.5"
    scaled["spec"]["triggers"][0]["metadata"]["query"] = "sum(transceiver_sessions)"
    scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] = {
        "stabilizationWindowSeconds": 0,
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
    }
    scaled["spec"]["fallback"]["behavior"] = "static"
    ours(docs)["transceiver"]["spec"]["replicas"] = 3
    assert scaling_findings(copy.deepcopy(docs)) == [
        "transceiver: scales on sum(transceiver_sessions), not live calls over capacity",
        "transceiver: a target of 1.5 of capacity leaves no room",
        "transceiver: scales down faster than one pod at a time, slowly",
        "transceiver: a metrics outage may scale it down",
        "transceiver: an apply would reset the autoscaler's replica count",
    ]
