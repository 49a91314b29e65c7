"""Generate the CustomResourceDefinition from the pydantic models.

The JSON Schema pydantic emits is close to, but not, a Kubernetes structural schema: it uses
``$ref``/``$defs``, ``anyOf`` with ``null`` for optional fields, ``const``/``prefixItems``, titles
and defaults. This module rewrites it into the structural subset the API server accepts.
Defaults are left out on purpose: the models apply them, so stored objects stay as users wrote
them and a default changed in a later release applies to old objects too.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    LlamaTrainingJobSpec,
    LlamaTrainingJobStatus,
)
from .cel import validations

CRD_NAME = f"{PLURAL}.{GROUP}"
_DROP_KEYS = {"title", "default", "examples"}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # -o wide adds these.
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.cluster.nodes", "priority": 1},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt", "priority": 1},
    {"name": "MFU", "type": "number", "jsonPath": ".status.mfu", "priority": 1},
    {"name": "Val-Loss", "type": "number", "jsonPath": ".status.validationLoss", "priority": 1},
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.message",
        "priority": 1,
    },
]


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].split("/")[-1]]
            merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
            return _resolve(merged, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one resolved JSON Schema node into a structural OpenAPI v3 node."""
    node = {k: v for k, v in node.items() if k not in _DROP_KEYS}
    description = node.pop("description", None)
    for key in ("minimum", "maximum"):
        bound = node.get(key)
        if isinstance(bound, int) and not isinstance(bound, bool) and abs(bound) > 2**53 - 1:
            # The API server reads bounds as float64 and refuses one that is not an exact
            # integer ("Maximum boundary value must be of type integer"): the CRD would not
            # install. Bound the pydantic field by config.MAX_EXACT_INT instead.
            raise ValueError(f"{key} {bound} is beyond 2**53 - 1, not exact as a JSON number")

    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) == 1:
            node = {**_structural(options[0]), **node}
        else:
            types = {o.get("type") for o in options if "const" not in o and "enum" not in o}
            enums = [v for o in options for v in (o.get("enum") or [])] + [
                o["const"] for o in options if "const" in o
            ]
            if types <= {"integer"} and enums and all(isinstance(e, str) for e in enums):
                # int-or-string is the only union the structural subset allows, and only as
                # bare `anyOf: [{type: integer}, {type: string}]`: the API server refuses any
                # other keyword in those branches ("must be empty to be structural"). The
                # bounds and the words become one CEL rule, which sees the value's own type.
                integer = next((o for o in options if o.get("type") == "integer"), {})
                low, high = integer.get("minimum"), integer.get("maximum")
                checks = [f"self >= {low}"] * (low is not None) + [f"self <= {high}"] * (
                    high is not None
                )
                words = ", ".join(f"'{e}'" for e in enums)
                rule = f"type(self) == int ? ({' && '.join(checks) or 'true'}) : self in [{words}]"
                span = f"an integer from {low} to {high}" if checks else "an integer"
                node = {
                    "x-kubernetes-int-or-string": True,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "x-kubernetes-validations": [
                        {"rule": rule, "message": f"must be {span} or one of {', '.join(enums)}"}
                    ],
                    **node,
                }
            else:
                raise ValueError(f"cannot express union in a structural schema: {options}")
    # The isinstance guard: an Optional field is converted twice (its anyOf branch, then the
    # merged node), and the second pass must not turn `minimum` into `true`.
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        # JSON Schema 2020 number -> OpenAPI 3.0 boolean form
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("type") == "array":
        if "prefixItems" in node:  # fixed-length tuple, e.g. betas
            items = node.pop("prefixItems")
            node["items"] = _structural(items[0])
            node["minItems"] = node["maxItems"] = len(items)
        elif "items" in node:
            node["items"] = _structural(node["items"])
    if node.get("type") == "object" or "properties" in node:
        node["type"] = "object"
        if "properties" in node:
            node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
            # Structural schemas prune unknown fields; kubectl's strict field validation then
            # reports them, which matches the models' extra="forbid".
            node.pop("additionalProperties", None)
        elif isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = _structural(node["additionalProperties"])
        else:
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    if description:
        node["description"] = " ".join(description.split())
    return node


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def crd() -> dict[str, Any]:
    spec_schema = openapi_schema(LlamaTrainingJobSpec)
    # The cross-field rules (cel.py): the API server refuses a job that breaks one at apply
    # time, naming the field, instead of the operator failing it as InvalidSpec afterwards.
    spec_schema["x-kubernetes-validations"] = [
        *spec_schema.get("x-kubernetes-validations", []), *validations()
    ]
    status_schema = openapi_schema(LlamaTrainingJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "llamajob"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "llamajob"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Llama pre-training job on Trainium (or CPU).",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "enum": [API_VERSION]},
                                "kind": {"type": "string", "enum": [KIND]},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from operator/llamajob/api.py by `llamajob crd`. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    """`llamajob crd`: print the CRD (what `crds/` and the chart carry)."""
    import argparse

    argparse.ArgumentParser(prog="llamajob crd", description=main.__doc__).parse_args(argv)
    print(crd_yaml(), end="")
    return 0
