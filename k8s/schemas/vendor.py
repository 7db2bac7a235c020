"""Turn a CustomResourceDefinition into the strict JSON schema tests/test_k8s_schemas.py uses.

Usage: ``python k8s/schemas/vendor.py CRD.yaml > k8s/schemas/KIND-GROUP-VERSION.json``

Takes the storage version's ``openAPIV3Schema``, drops the descriptions (size), and makes every
object that lists its ``properties`` refuse others (``additionalProperties: false``) unless it
preserves unknown fields: the API server would prune an unknown field silently, so a typo in a
manifest would otherwise pass here and be lost there. Standard library and PyYAML only.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items() if key != "description"}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def main(path: str) -> None:
    with open(path) as crd_file:
        crd = yaml.safe_load(crd_file)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = strict(version["schema"]["openAPIV3Schema"])
    # apiVersion, kind and metadata are the API server's, checked by kind and name here.
    schema["properties"]["metadata"] = {"type": "object"}
    source = {
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
    }
    json.dump({"x-vendored-from": source, **schema}, sys.stdout, indent=None, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
