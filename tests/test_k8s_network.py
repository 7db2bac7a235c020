"""Who may reach what: the rendered NetworkPolicies, evaluated as Kubernetes would, against a
table. The evaluator is small and follows the NetworkPolicy API: a pod that no Ingress policy
selects takes everything; a selected pod takes what one rule of one selecting policy allows
(peers by pod selector in the policy's namespace, namespace selector, both, or IP block; ports
by number, range or the destination container's port name; protocol TCP unless named).
IP blocks match addresses outside the cluster only (for pod addresses the API leaves it to the
network plugin)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest
from test_k8s_overlays import Doc, one, rendered, settings, workloads

NAMESPACE = "voicerelay"


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str | None = None  # None: outside the cluster
    labels: dict[str, str] = field(default_factory=dict)
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, containerPort, protocol)
    address: str = "10.0.0.1"


def matches(selector: Doc | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def peer_allowed(peer: Doc, source: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if source.namespace is not None:
            return False
        address = ipaddress.ip_address(source.address)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if source.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], namespace_labels(source.namespace)):
            return False
    elif source.namespace != policy_namespace:
        return False
    return matches(peer.get("podSelector"), source.labels)


def port_allowed(entry: Doc, destination: Peer, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return any(
            (name, number, proto) == (wanted, port, protocol)
            for name, number, proto in destination.ports
        )
    return bool(wanted <= port <= entry.get("endPort", wanted))


def reachable(
    policies: list[Doc], source: Peer, destination: Peer, port: int, protocol: str
) -> bool:
    assert destination.namespace is not None
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == destination.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], destination.labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if peers and not any(
                peer_allowed(peer, source, policy["metadata"]["namespace"]) for peer in peers
            ):
                continue
            ports = rule.get("ports")
            if not ports or any(port_allowed(e, destination, port, protocol) for e in ports):
                return True
    return False


def pod_peer(workload: Doc) -> Peer:
    template = workload["spec"]["template"]
    ports = tuple(
        (p["name"], p["containerPort"], p.get("protocol", "TCP"))
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
    )
    return Peer(
        workload["metadata"]["name"],
        workload["metadata"]["namespace"],
        template["metadata"]["labels"],
        ports,
    )


def peers(docs: list[Doc]) -> dict[str, Peer]:
    found = {w["metadata"]["name"]: pod_peer(w) for w in workloads(docs)}
    if "redis" not in found:  # production: the redis-ha chart's pods (not in the manifests)
        ports = (("redis", 6379, "TCP"), ("sentinel", 26379, "TCP"))
        found["redis"] = Peer("redis", NAMESPACE, {"app": "redis-ha", "release": "redis-ha"}, ports)
    return found | {
        "stranger": Peer("stranger", NAMESPACE, {"app": "debug"}),
        "prometheus": Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "ingress": Peer("ingress", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
        "elsewhere": Peer("elsewhere", "default", {"app.kubernetes.io/name": "relay"}),
        "internet": Peer("internet", address="203.0.113.7"),
    }


SOURCES = (
    "relay",
    "transceiver",
    "redis",
    "stranger",
    "prometheus",
    "ingress",
    "elsewhere",
    "internet",
)
# destination, port, protocol -> the sources that may reach it ("*" everyone)
TABLE: dict[tuple[str, int, str], set[str]] = {
    ("relay", 3478, "UDP"): {"*"},  # media: the clients, wherever they are
    ("relay", 3478, "TCP"): set(),
    ("relay", 7100, "UDP"): {"transceiver"},  # the link's answers
    ("relay", 9100, "TCP"): {"prometheus"},
    ("transceiver", 7000, "UDP"): {"relay"},  # the link
    ("transceiver", 8080, "TCP"): {"ingress", "prometheus", "transceiver"},  # and sidebands
    ("transceiver", 7000, "TCP"): set(),
    ("redis", 6379, "TCP"): {"relay", "transceiver", "redis?"},
}


def table_mismatches(docs: list[Doc], redis_peers: bool) -> list[str]:
    """Rows where the policies disagree with the table. ``redis?``: Redis pods reach each
    other (replication, Sentinel) where there are several."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    every = peers(docs)
    wrong = []
    for (target, port, protocol), allowed in TABLE.items():
        for source in SOURCES:
            expected = (
                "*" in allowed or source in allowed or (redis_peers and f"{source}?" in allowed)
            )
            got = reachable(policies, every[source], every[target], port, protocol)
            if got != expected:
                wrong.append(f"{source} -> {target}:{port}/{protocol}: {got}, expected {expected}")
    return wrong


@pytest.mark.parametrize(("overlay", "redis_peers"), [("dev", False), ("production", True)])
def test_who_may_reach_what(overlay: str, redis_peers: bool) -> None:
    assert table_mismatches(rendered(overlay), redis_peers) == []


def test_sentinels_are_reachable_from_our_pods_only() -> None:
    docs = rendered("production")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    every = peers(docs)
    allowed = {s for s in SOURCES if reachable(policies, every[s], every["redis"], 26379, "TCP")}
    assert allowed == {"relay", "transceiver", "redis"}


@pytest.mark.parametrize("overlay", ["dev", "production"])
def test_every_relay_worker_hears_the_transceivers(overlay: str) -> None:
    """The relay's link sockets bind RELAY_INTERNAL_PORT + worker index: all inside the rule."""
    docs = rendered(overlay)
    config = settings(docs)
    first, workers = int(config["RELAY_INTERNAL_PORT"]), int(config["RELAY_WORKERS"])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    every = peers(docs)
    for port in range(first, first + workers):
        assert reachable(policies, every["transceiver"], every["relay"], port, "UDP")
    # and up to 16 workers, the most the rule admits
    assert reachable(policies, every["transceiver"], every["relay"], first + 15, "UDP")
    assert not reachable(policies, every["transceiver"], every["relay"], first + 16, "UDP")


def test_the_table_fails_when_a_policy_opens_too_much_or_too_little() -> None:
    docs = rendered("production")
    transceiver = one(docs, "NetworkPolicy", "transceiver")
    del transceiver["spec"]["ingress"][0]["from"]  # link open to anyone
    relay = one(docs, "NetworkPolicy", "relay")
    relay["spec"]["ingress"][2]["from"][0]["namespaceSelector"]["matchLabels"] = {
        "kubernetes.io/metadata.name": "observability"
    }
    wrong = table_mismatches(docs, redis_peers=True)
    assert "stranger -> transceiver:7000/UDP: True, expected False" in wrong
    assert "internet -> transceiver:7000/UDP: True, expected False" in wrong
    assert "prometheus -> relay:9100/TCP: False, expected True" in wrong
    # and without the default deny nor the Redis policy, Redis is open to the namespace
    opened = [
        d
        for d in rendered("production")
        if d["kind"] != "NetworkPolicy"
        or d["metadata"]["name"] not in ("redis", "default-deny-ingress")
    ]
    assert "stranger -> redis:6379/TCP: True, expected False" in table_mismatches(opened, True)
