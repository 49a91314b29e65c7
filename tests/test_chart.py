"""The Helm chart, rendered by the real Helm engine (helm-python-sdk binds Helm's Go SDK).

Covered here: lint, schema and template checks on values, Kubernetes schema validation of every
rendered object (kubernetes-validate --strict, 1.30 and 1.33), RBAC equal to
`llamajob.permissions`, the monitoring objects and their gates, every metric named by an alert
or a dashboard query existing in the operator's and the trainer's registries, and `kubectl
apply` of the whole release, with strict validation, against a real kube-apiserver
(tests/k8s_control_plane.py) that has the Prometheus Operator's real CRDs: what the server
stores, Pod Security and ServiceAccount admission of the operator's pods, and the RBAC
authorizer's answers for its ServiceAccount. What is not covered: the Prometheus Operator's own
admission webhooks, Grafana actually drawing the dashboard, and Prometheus evaluating the rules
on real series.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    MONITORING_API,
    NAMESPACE,
    OPERATOR_REPOSITORY,
    RELEASE,
    ROOT,
    chart_crds,
    exposed_series,
    grafana_to_promql,
    install_sorted,
    kinds,
    load_chart,
    manifests,
    notes,
    of_kind,
    one,
    render,
    render_objects,
    selectors,
    with_operator_image,
)
from k8s_control_plane import ControlPlane, wait_for
from llamajob import permissions
from llamajob.api import GROUP, PLURAL
from llamajob.crd import crd_yaml

KUBE_VERSIONS = ["1.30.0", "1.33.0"]
PEERING_2 = {"replicas": 2, "peering": {"enabled": True}}
IN_NAMESPACES = {"scope": "namespace"}

# name -> (values, API versions the cluster serves)
SCENARIOS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "defaults": ({}, []),
    "defaults-with-prometheus-operator": ({}, [MONITORING_API]),
    "namespace": ({"operator": {"watch": IN_NAMESPACES}}, []),
    "namespaces-peering": (
        {"operator": {"watch": {**IN_NAMESPACES, "namespaces": ["team-a", "team-b"]},
                      **PEERING_2}},
        [MONITORING_API],
    ),
    "cluster": ({"operator": {"watch": {"scope": "cluster"}}}, [MONITORING_API]),
    "cluster-peering": (
        {"operator": {"watch": {"scope": "cluster"}, "replicas": 3, "peering": {"enabled": True}}},
        [MONITORING_API],
    ),
    "monitoring-off": ({"monitoring": {"enabled": False}}, [MONITORING_API]),
}

NAMESPACE_RBAC = ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
CLUSTER_RBAC = ["ClusterRole", "ClusterRoleBinding"]
USER_ROLES = ["ClusterRole", "ClusterRole"]  # edit and view, aggregated into the default roles
# ConfigMap = the dashboard
CORE = ["ConfigMap", "Deployment", "Service", "ServiceAccount", *USER_ROLES]
MONITORS = ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
EXPECTED_KINDS: dict[str, list[str]] = {
    "defaults": sorted(CORE + CLUSTER_RBAC),
    "defaults-with-prometheus-operator": sorted(CORE + CLUSTER_RBAC + MONITORS),
    "namespace": sorted(CORE + NAMESPACE_RBAC),
    "namespaces-peering": sorted(
        CORE + ["ClusterRole", "ClusterRoleBinding"] + ["Role", "RoleBinding"] * 2
        + ["KopfPeering"] * 2 + MONITORS
    ),
    "cluster": sorted([*CORE, "ClusterRole", "ClusterRoleBinding", *MONITORS]),
    "cluster-peering": sorted(
        [*CORE, "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", *MONITORS]
    ),
    "monitoring-off": sorted(
        ["Deployment", "Service", "ServiceAccount", *USER_ROLES, *CLUSTER_RBAC]
    ),
}


def scenario_objects(name: str) -> list[dict[str, Any]]:
    values, apis = SCENARIOS[name]
    return render_objects(values, api_versions=apis)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


# --- CRDs ---------------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    chart_file = CHART_DIR / "crds" / "llamatrainingjobs.llamajob.dev.yaml"
    fix = (
        "regenerate both: llamajob crd > crds/llamatrainingjobs.llamajob.dev.yaml && "
        "cp crds/llamatrainingjobs.llamajob.dev.yaml charts/llamajob/crds/"
    )
    assert chart_file.read_text() == crd_yaml(), f"chart CRD is stale: {fix}"
    top_level = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"
    assert chart_file.read_bytes() == top_level.read_bytes(), f"chart and crds/ differ: {fix}"


def test_chart_ships_the_crds_helm_installs() -> None:
    with load_chart() as chart:
        names = sorted(yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds)
    # One CRD per file, each a single YAML document.
    assert names == sorted(
        ["llamatrainingjobs.llamajob.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"]
    )
    assert all(doc["kind"] == "CustomResourceDefinition" for doc in chart_crds())


# --- lint and rendering -------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict_is_clean(scenario: str, kube_version: str) -> None:
    values, _ = SCENARIOS[scenario]
    report = helm.lint(
        CHART_DIR, with_operator_image(values), strict=True, namespace=NAMESPACE,
        kube_version=f"v{kube_version}",
    )
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 = warning, 3 = error.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_kinds(scenario: str) -> None:
    assert kinds(scenario_objects(scenario)) == EXPECTED_KINDS[scenario]


def test_every_object_is_labelled_and_namespaced_where_it_should_be() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    for scenario in SCENARIOS:
        for obj in scenario_objects(scenario):
            meta = obj["metadata"]
            assert meta["labels"]["app.kubernetes.io/part-of"] == "llamajob"
            assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
            if obj["kind"] in cluster_scoped:
                assert "namespace" not in meta
            else:
                assert meta["namespace"], f"{obj['kind']} {meta['name']} has no namespace"


# --- Kubernetes schema validation ---------------------------------------------------------------

# kubernetes-validate knows only built-in kinds. These CRD-defined kinds are checked against a
# minimal schema of the fields this chart writes (from the Prometheus Operator's and kopf's
# CRDs), strict about unknown keys so a misspelt field fails like it would with --strict.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}},
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "labels"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
    "additionalProperties": False,
}


def _kind_schema(api_version: str, kind: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": _METADATA,
    }
    if spec is not None:
        props["spec"] = spec
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", *(["spec"] if spec else [])],
        "properties": props,
    }


_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["alert", "expr", "labels", "annotations"],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
        "expr": {"type": "string", "minLength": 1},
        "for": _DURATION,
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
}
CRD_KIND_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _kind_schema(MONITORING_API, "ServiceMonitor", {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NAMESPACE_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    }),
    "PodMonitor": _kind_schema(MONITORING_API, "PodMonitor", {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NAMESPACE_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    }),
    "PrometheusRule": _kind_schema(MONITORING_API, "PrometheusRule", {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string"},
                        "rules": {"type": "array", "minItems": 1, "items": _RULE},
                    },
                },
            }
        },
    }),
    "KopfPeering": _kind_schema("kopf.dev/v1", "KopfPeering", None),
    "ClusterKopfPeering": _kind_schema("kopf.dev/v1", "ClusterKopfPeering", None),
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_manifests_pass_kubernetes_validate_strict(scenario: str, kube_version: str) -> None:
    objects = scenario_objects(scenario) + chart_crds()
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in CRD_KIND_SCHEMAS:
            jsonschema.validate(obj, CRD_KIND_SCHEMAS[obj["kind"]])
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.absolute_path)
            pytest.fail(f"{where}, Kubernetes {kube_version}, at {path}: {err.message}")


def test_own_schemas_catch_mistakes() -> None:
    """The minimal schemas above are not vacuous: they reject typical slips."""
    objects = scenario_objects("cluster")
    monitor = copy.deepcopy(one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(monitor, CRD_KIND_SCHEMAS["ServiceMonitor"])
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError, match="5 minutes"):
        jsonschema.validate(rule, CRD_KIND_SCHEMAS["PrometheusRule"])


# --- operator Deployment ------------------------------------------------------------------------


def test_deployment_is_hardened() -> None:
    objects = scenario_objects("defaults")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(objects)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    assert c["image"] == f"{OPERATOR_REPOSITORY}:0.1.0"  # the chart's appVersion
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_image_tag_digest_and_ports_follow_values() -> None:
    objects = render_objects({
        "image": {"repository": "123456789012.dkr.ecr.us-west-2.amazonaws.com/llamajob-operator",
                  "tag": "0.2.0", "digest": "sha256:" + "a" * 64},
        "operator": {"livenessPort": 18080, "metricsPort": 19090},
        "metrics": {"service": {"port": 9999}},
    })
    c = container(objects)
    assert c["image"] == (
        "123456789012.dkr.ecr.us-west-2.amazonaws.com/llamajob-operator:0.2.0@sha256:" + "a" * 64
    )
    assert "--liveness-port=18080" in c["args"]
    assert "--metrics-port=19090" in c["args"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 18080,
                                                                    "metrics": 19090}
    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9999, "targetPort": "metrics", "protocol": "TCP"}
    ]


@pytest.mark.parametrize(
    ("scenario", "watch_args", "peering_arg", "strategy"),
    [
        ("defaults", ["--all-namespaces"], "--standalone", "Recreate"),
        ("namespace", [f"--namespace={NAMESPACE}"], "--standalone", "Recreate"),
        ("namespaces-peering", ["--namespace=team-a", "--namespace=team-b"],
         f"--peering={RELEASE}", "RollingUpdate"),
        ("cluster", ["--all-namespaces"], "--standalone", "Recreate"),
        ("cluster-peering", ["--all-namespaces"], f"--peering={RELEASE}", "RollingUpdate"),
    ],
)
def test_operator_arguments_follow_scope_and_peering(
    scenario: str, watch_args: list[str], peering_arg: str, strategy: str
) -> None:
    objects = scenario_objects(scenario)
    args = container(objects)["args"]
    assert args == ["--liveness-port=8080", "--metrics-port=9090", *watch_args, peering_arg]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"]["type"] == strategy
    assert deployment["spec"]["replicas"] == SCENARIOS[scenario][0].get("operator", {}).get(
        "replicas", 1
    )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_cli_accepts_the_rendered_arguments(scenario: str) -> None:
    """The Deployment's args parse with `llamajob operator`'s own parser, to what was meant."""
    from llamajob.operator_cli import build_parser

    values, _ = SCENARIOS[scenario]
    operator = values.get("operator", {})
    args = build_parser().parse_args(container(scenario_objects(scenario))["args"])
    assert (args.liveness_port, args.metrics_port) == (8080, 9090)
    if operator.get("watch", {}).get("scope", "cluster") == "cluster":  # the default
        assert args.all_namespaces and not args.namespaces
    else:
        assert args.namespaces == operator.get("watch", {}).get("namespaces", [NAMESPACE])
    if operator.get("peering", {}).get("enabled"):
        assert args.peering == RELEASE and not args.standalone
    else:
        assert args.standalone and args.peering is None


def test_peering_objects_exist_where_the_operator_looks() -> None:
    objects = scenario_objects("namespaces-peering")
    peerings = of_kind(objects, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", RELEASE), ("team-b", RELEASE)
    ]
    custom = render_objects({"operator": {"watch": {"scope": "cluster"}, **PEERING_2,
                                          "peering": {"enabled": True, "name": "trainium-ops"}}})
    assert one(custom, "ClusterKopfPeering")["metadata"]["name"] == "trainium-ops"
    assert "--peering=trainium-ops" in container(custom)["args"]
    assert of_kind(scenario_objects("cluster"), "ClusterKopfPeering") == []


# --- RBAC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("peering", [False, True], ids=["standalone", "peering"])
@pytest.mark.parametrize("scope", permissions.SCOPES)
def test_rbac_equals_permissions_module(scope: permissions.Scope, peering: bool) -> None:
    operator: dict[str, Any] = {"watch": {"scope": scope}, "peering": {"enabled": peering}}
    if scope == "namespace":
        operator["watch"]["namespaces"] = ["team-a", "team-b"]
    objects = render_objects({"operator": operator})
    expected = permissions.grants(scope, peering=peering)

    (cluster_role,) = operator_cluster_roles(objects)
    assert cluster_role["rules"] == permissions.policy_rules(expected.cluster)
    roles = of_kind(objects, "Role")
    if scope == "namespace":
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
        for role in roles:
            assert role["rules"] == permissions.policy_rules(expected.namespaced)
    else:
        assert roles == [] and expected.namespaced == ()


def test_permissions_cover_what_the_operator_does() -> None:
    """The calls handlers.py, worker.py and kube.py make, by triple, so a regrouping cannot hide
    a change."""
    namespaced = permissions.triples(permissions.grants("namespace", peering=True).namespaced)
    for verb in ("create", "delete", "list", "watch"):
        assert ("", "pods", verb) in namespaced
    for resource in ("services", "configmaps"):
        for verb in ("create", "list", "watch"):
            assert ("", resource, verb) in namespaced
    assert ("", "events", "create") in namespaced
    assert ("llamajob.dev", "llamatrainingjobs/status", "patch") in namespaced
    assert {("llamajob.dev", "llamatrainingjobs", v) for v in ("list", "watch")} <= namespaced
    assert ("kopf.dev", "kopfpeerings", "patch") in namespaced
    cluster = permissions.triples(permissions.grants("cluster", peering=True).cluster)
    assert {t for t in namespaced if t[1] != "kopfpeerings"} <= cluster
    assert {("", "nodes", v) for v in ("list", "watch")} <= cluster
    assert ("kopf.dev", "clusterkopfpeerings", "list") in cluster
    # Least privilege: no secrets, no RBAC, no updates or deletes of jobs, no wildcards.
    everything = namespaced | cluster
    assert not {t for t in everything if t[1] in {"secrets", "roles", "clusterroles"}}
    assert not {t for t in everything if t[1] == "llamatrainingjobs" and t[2] != "list"
                and t[2] != "watch"}
    assert not {t for t in everything if "*" in t}


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def operator_cluster_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in of_kind(objects, "ClusterRole")
            if not any(k.startswith(AGGREGATE) for k in r["metadata"]["labels"])]


def test_user_roles_aggregate_into_the_default_roles() -> None:
    objects = render_objects({})
    users = {r["metadata"]["name"]: r for r in of_kind(objects, "ClusterRole")
             if r not in operator_cluster_roles(objects)}
    (operator_role,) = operator_cluster_roles(objects)
    base = operator_role["metadata"]["name"]
    edit, view = users.pop(f"{base}-edit"), users.pop(f"{base}-view")
    assert users == {}
    aggregated = {k.removeprefix(AGGREGATE) for k, v in edit["metadata"]["labels"].items()
                  if k.startswith(AGGREGATE) and v == "true"}
    assert aggregated == {"edit", "admin"}
    assert {k for k in view["metadata"]["labels"] if k.startswith(AGGREGATE)} == {
        AGGREGATE + "view"}
    granted = {(g, r, v) for rule in edit["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    for verb in ("create", "get", "list", "watch", "patch", "update", "delete"):
        assert (GROUP, PLURAL, verb) in granted  # what kubectl apply/edit/delete need
    assert not {t for t in granted if t[1] == f"{PLURAL}/status" and t[2] not in
                ("get", "list", "watch")}  # the status is the operator's alone
    read = {(g, r, v) for rule in view["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}
    assert read == {(GROUP, r, v) for r in (PLURAL, f"{PLURAL}/status")
                    for v in ("get", "list", "watch")}
    # Nothing binds them: Kubernetes aggregates them into edit, admin and view.
    bound = {b["roleRef"]["name"] for b in of_kind(objects, "ClusterRoleBinding")}
    assert bound == {base}
    # Off by value, and with the rest of the RBAC.
    for values in ({"rbac": {"aggregateToDefaultRoles": False}},
                   {"rbac": {"create": False}, "serviceAccount": {"name": "x"}}):
        rendered = render_objects(values)
        assert of_kind(rendered, "ClusterRole") == operator_cluster_roles(rendered)


def test_role_bindings_bind_the_service_account() -> None:
    objects = scenario_objects("namespaces-peering")
    sa = one(objects, "ServiceAccount")["metadata"]
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}
        ]
        role_kind = "Role" if binding["kind"] == "RoleBinding" else "ClusterRole"
        assert binding["roleRef"]["kind"] == role_kind
        targets = [r for r in of_kind(objects, role_kind)
                   if r["metadata"]["name"] == binding["roleRef"]["name"]
                   and r["metadata"].get("namespace") == binding["metadata"].get("namespace")]
        assert len(targets) == 1
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]


def test_rbac_and_service_account_can_be_left_to_the_user() -> None:
    objects = render_objects({"rbac": {"create": False},
                              "serviceAccount": {"create": False, "name": "platform-ops"}})
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                "ServiceAccount"} & set(kinds(objects))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-ops"


# --- values validation --------------------------------------------------------------------------

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("typo in a key", {"operator": {"replica": 2}}, "additional properties 'replica'"),
    ("unknown scope", {"operator": {"watch": {"scope": "everywhere"}}},
     "/operator/watch/scope"),
    ("zero replicas", {"operator": {"replicas": 0}}, "/operator/replicas"),
    ("replicas as text", {"operator": {"replicas": "two"}}, "/operator/replicas"),
    ("namespace not a DNS label", {"operator": {"watch": {"namespaces": ["Team_A"]}}},
     "/operator/watch/namespaces/0"),
    ("repeated namespace", {"operator": {"watch": {"namespaces": ["a", "a"]}}},
     "/operator/watch/namespaces"),
    ("port out of range", {"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
    ("tag inside repository", {"image": {"repository": "ghcr.io/llamajob/operator:0.1.0"}},
     "/image/repository"),
    ("bad digest", {"image": {"digest": "sha256:xyz"}}, "/image/digest"),
    ("bad pull policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("duration without unit", {"monitoring": {"podMonitor": {"interval": "15"}}},
     "/monitoring/podMonitor/interval"),
    ("empty duration", {"monitoring": {"serviceMonitor": {"interval": ""}}},
     "/monitoring/serviceMonitor/interval"),
    ("ratio above one",
     {"monitoring": {"prometheusRule": {"alerts": {"throughputDrop": {"ratio": 1.5}}}}},
     "/monitoring/prometheusRule/alerts/throughputDrop/ratio"),
    ("unknown severity",
     {"monitoring": {"prometheusRule": {"alerts": {"jobFailed": {"severity": "page"}}}}},
     "/monitoring/prometheusRule/alerts/jobFailed/severity"),
    ("dashboard label not a string", {"monitoring": {"dashboard": {"labels": {"a": 1}}}},
     "/monitoring/dashboard/labels/a"),
    ("existing service account without a name", {"serviceAccount": {"create": False}},
     "/serviceAccount/name"),
]


@pytest.mark.parametrize(("case", "values", "fragment"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_values_schema_rejects(case: str, values: dict[str, Any], fragment: str) -> None:
    with load_chart() as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(values))
    assert fragment in str(err.value)
    # helm install/template validate the same way before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_values_schema_accepts_the_defaults_and_every_scenario() -> None:
    with load_chart() as chart:
        for values, _ in SCENARIOS.values():
            chart.validate_schema(chart.merge_values(values))


TEMPLATE_CHECKS: list[tuple[str, dict[str, Any], str]] = [
    # What `helm install --set operator.replicas=2` prints: one message naming both values.
    ("replicas without peering", {"operator": {"replicas": 2}},
     "operator.replicas 2 needs operator.peering.enabled=true: without peering every replica "
     "would act on every job. Add --set operator.peering.enabled=true"),
    ("latest tag", {"image": {"tag": "latest"}}, "image.tag: `latest` is not allowed"),
    ("port clash", {"operator": {"livenessPort": 9090}},
     "operator.livenessPort and operator.metricsPort are both 9090"),
    ("namespaces with cluster scope",
     {"operator": {"watch": {"scope": "cluster", "namespaces": ["a"]}}},
     "operator.watch.namespaces is only used with operator.watch.scope=namespace"),
]


@pytest.mark.parametrize(("case", "values", "message"), TEMPLATE_CHECKS,
                         ids=[c[0] for c in TEMPLATE_CHECKS])
def test_templates_reject_inconsistent_values(
    case: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert message in str(err.value)


def test_replicas_without_peering_passes_the_schema_to_reach_the_clear_message() -> None:
    """The schema does not judge the pair (its message would be "at '/operator/peering/enabled':
    value must be true"), so the template's message is the one Helm prints."""
    with load_chart() as chart:
        values = with_operator_image({"operator": {"replicas": 2}})
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(helm.HelmError) as err:
        render({"operator": {"replicas": 3}})
    assert "operator.replicas 3 needs operator.peering.enabled=true" in str(err.value)
    assert not isinstance(err.value, helm.HelmValuesError)
    render({"operator": PEERING_2})  # with peering it renders


def test_without_an_operator_image_the_chart_says_how_to_build_one() -> None:
    """No image is published: the chart's defaults refuse to render, telling the user what to
    build (a real Dockerfile target) and which value to set, rather than a Deployment whose pods
    can never pull."""
    with load_chart() as chart:
        assert chart.merge_values({})["image"]["repository"] == ""
        chart.validate_schema(chart.merge_values({}))  # the template speaks, not the schema
    for values in (None, {"image": {"repository": ""}}, {"image": {"tag": "0.1.0"}}):
        with pytest.raises(helm.HelmError) as err:
            render(values, operator_image=False)
        message = str(err.value)
        assert "image.repository is not set" in message
        assert "docker build --target operator -t <registry>/llamajob-operator:0.1.0 ." in message
        assert "--set image.repository=<registry>/llamajob-operator" in message
        assert "trainerImage.repository" in message
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert " AS operator\n" in dockerfile
    # `helm lint` runs templates in lint mode, where `fail` only logs: the bare chart lints.
    assert helm.lint(CHART_DIR, {}, strict=True, namespace=NAMESPACE)["errors"] == []


def trainer_image_args(values: dict[str, Any]) -> list[str]:
    args = container(render_objects(values))["args"]
    return [a for a in args if a.startswith("--trainer-image")]


def test_trainer_images_become_operator_flags() -> None:
    from llamajob.images import TRAINER_FAMILIES
    from llamajob.operator_cli import build_parser, trainer_images

    assert trainer_image_args({}) == []  # no default: every job must set spec.cluster.image
    repo = "123456789012.dkr.ecr.us-west-2.amazonaws.com/llamajob-trainer"
    args = trainer_image_args({"trainerImage": {"repository": repo}})
    assert args == [f"--trainer-image={f}={repo}:0.1.0-{f}" for f in ("neuron", "trn1", "cuda")]
    # The families are the operator's, and each is a trainer target of the Dockerfile, whose
    # tags docs/install.md builds as <tag>-<family>.
    assert set(TRAINER_FAMILIES) == {"neuron", "trn1", "cuda"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = (ROOT / "docs" / "install.md").read_text()
    for family in TRAINER_FAMILIES:
        assert f" AS trainer-{family}\n" in dockerfile
        assert f"--target trainer-{family} " in install and f":0.1.0-{family} ." in install
    args = trainer_image_args({"trainerImage": {"repository": repo, "tag": "0.2.0",
                                                "cuda": "registry.example/gpu:7"}})
    assert args == [f"--trainer-image=neuron={repo}:0.2.0-neuron",
                    f"--trainer-image=trn1={repo}:0.2.0-trn1",
                    "--trainer-image=cuda=registry.example/gpu:7"]
    only = trainer_image_args({"trainerImage": {"neuron": "registry.example/trn2:1"}})
    assert only == ["--trainer-image=neuron=registry.example/trn2:1"]
    parsed = build_parser().parse_args(args)
    assert trainer_images(parsed.trainer_images) == {
        "neuron": f"{repo}:0.2.0-neuron", "trn1": f"{repo}:0.2.0-trn1",
        "cuda": "registry.example/gpu:7",
    }
    with load_chart() as chart, pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values({"trainerImage": {
            "repository": "r.example/t:0.1.0"}}))
    assert "/trainerImage/repository" in str(err.value)


def test_notes_say_what_is_missing() -> None:
    text = notes(render({}))
    assert "Watching LlamaTrainingJobs in every namespace" in text
    assert "No trainer image" in text and "spec.cluster.image" in text
    text = notes(render({"trainerImage": {"repository": "r.example/t"}}))
    assert "No trainer image" not in text
    assert ("Trainer images (for jobs without spec.cluster.image): "
            "neuron=r.example/t:0.1.0-neuron") in text


# --- monitoring ---------------------------------------------------------------------------------


def test_monitoring_objects_need_both_values_and_the_api() -> None:
    without_api = render({})
    assert not set(MONITORS) & set(kinds(manifests(without_api)))
    assert "SKIPPED ServiceMonitor, PodMonitor and PrometheusRule" in notes(without_api)
    with_api = render({}, api_versions=[MONITORING_API])
    assert set(MONITORS) <= set(kinds(manifests(with_api)))
    assert "SKIPPED" not in notes(with_api)
    for key, kind in [("serviceMonitor", "ServiceMonitor"), ("podMonitor", "PodMonitor"),
                      ("prometheusRule", "PrometheusRule")]:
        objects = render_objects({"monitoring": {key: {"enabled": False}}},
                                 api_versions=[MONITORING_API])
        assert set(kinds(objects)) & set(MONITORS) == set(MONITORS) - {kind}
    off = render_objects({"monitoring": {"enabled": False}}, api_versions=[MONITORING_API])
    assert not {"ConfigMap", *MONITORS} & set(kinds(off))
    extra = render_objects({"monitoring": {"labels": {"release": "kube-prometheus-stack"}}},
                           api_versions=[MONITORING_API])
    for kind in MONITORS:
        assert one(extra, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_scrapes_the_operator_metrics_service() -> None:
    objects = scenario_objects("defaults-with-prometheus-operator")
    monitor = one(objects, "ServiceMonitor")["spec"]
    service = one(objects, "Service")
    pod_template = one(objects, "Deployment")["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    assert service["spec"]["selector"].items() <= pod_template["metadata"]["labels"].items()
    [endpoint] = monitor["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["honorLabels"] is True  # keeps the per-job `job` label of operator series
    assert service["spec"]["ports"][0]["targetPort"] in {
        p["name"] for p in pod_template["spec"]["containers"][0]["ports"]
    }


@pytest.mark.parametrize(
    ("scenario", "namespace_selector"),
    [
        ("defaults-with-prometheus-operator", {"any": True}),
        ("namespaces-peering", {"matchNames": ["team-a", "team-b"]}),
        ("cluster", {"any": True}),
    ],
)
def test_pod_monitor_scrapes_rank_zero_trainers(
    scenario: str, namespace_selector: dict[str, Any]
) -> None:
    monitor = one(scenario_objects(scenario), "PodMonitor")["spec"]
    assert monitor["selector"] == {"matchLabels": {
        "app.kubernetes.io/name": "llamajob", "llamajob.dev/role": "train",
        "llamajob.dev/rank": "0",
    }}
    assert monitor["namespaceSelector"] == namespace_selector
    [endpoint] = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    # The trainer labels its series job=<LlamaTrainingJob name>; honorLabels keeps that label.
    assert endpoint["honorLabels"] is True


def test_pod_monitor_selects_exactly_rank_zero_of_a_rendered_job() -> None:
    """Against the pods the operator really creates (render.py), not a copy of their labels."""
    from llamajob.jobfile import load_job
    from llamajob.render import render_all
    from llamajob_trainer.protocol import DEFAULT_METRICS_PORT

    objects = scenario_objects("defaults-with-prometheus-operator")
    selector = one(objects, "PodMonitor")["spec"]["selector"]["matchLabels"]
    operator_selector = one(objects, "Service")["spec"]["selector"]
    pods = [d for d in render_all(load_job(ROOT / "examples" / "llama3-70b.yaml"))
            if d["kind"] == "Pod"]
    assert len(pods) > 2
    scraped = [p for p in pods if selector.items() <= p["metadata"]["labels"].items()]
    labels = [p["metadata"]["labels"] for p in scraped]
    assert [(lbl["llamajob.dev/role"], lbl["llamajob.dev/rank"]) for lbl in labels] == [
        ("train", "0")
    ]
    ports = {port["name"]: port["containerPort"]
             for c in scraped[0]["spec"]["containers"] for port in c.get("ports", [])}
    assert ports["metrics"] == DEFAULT_METRICS_PORT
    assert not [p for p in pods if operator_selector.items() <= p["metadata"]["labels"].items()]


def alert_rules(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = one(objects, "PrometheusRule")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_alert_rules() -> None:
    rules = alert_rules(scenario_objects("defaults-with-prometheus-operator"))
    assert sorted(rules) == sorted(
        ["JobStalled", "HighRestartRate", "ThroughputDrop", "JobFailed", "CheckpointQuarantined",
         "OperatorDown"]
    )
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert selectors(rule["expr"]), f"{name}: expression reads no series"
    # OperatorDown watches the scrape target the ServiceMonitor creates: Prometheus Operator
    # names the job after the Service.
    [(metric, labels)] = selectors(rules["OperatorDown"]["expr"])
    assert metric == "up"
    assert labels == {"job": f"{RELEASE}-metrics", "namespace": NAMESPACE}
    assert {name for name, _ in selectors(rules["JobStalled"]["expr"])} == {
        "llamajob_train_step", "llamajob_train_max_steps"
    }
    assert ("llamajob_jobs", {"phase": "Failed"}) in selectors(rules["JobFailed"]["expr"])
    assert selectors(rules["CheckpointQuarantined"]["expr"]) == [
        ("llamajob_checkpoints_quarantined", {})
    ]


def test_alert_thresholds_follow_values() -> None:
    alerts = {
        "jobStalled": {"window": "2h", "for": "10m", "severity": "warning"},
        "highRestartRate": {"restarts": 7, "window": "6h"},
        "throughputDrop": {"ratio": 0.8, "baseline": "3h"},
    }
    rules = alert_rules(render_objects({"monitoring": {"prometheusRule": {"alerts": alerts}}},
                                       api_versions=[MONITORING_API]))
    stalled = rules["JobStalled"]
    assert "llamajob_train_step[2h]" in stalled["expr"] and "offset 2h" in stalled["expr"]
    assert (stalled["for"], stalled["labels"]["severity"]) == ("10m", "warning")
    assert "[6h]" in rules["HighRestartRate"]["expr"]
    assert rules["HighRestartRate"]["expr"].rstrip().endswith("> 7")
    assert "0.8 * max by" in rules["ThroughputDrop"]["expr"]
    assert "[3h]" in rules["ThroughputDrop"]["expr"]


def dashboard(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    config_map = one(objects, "ConfigMap")
    [text] = config_map["data"].values()
    return config_map, json.loads(text)


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel and template variable."""
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict) and query["query"].startswith("label_values("):
            # label_values(<selector>, <label>): the selector is PromQL.
            inner = query["query"][len("label_values("):].rsplit(",", 1)[0]
            queries.append((f"${var['name']}", inner))
    return queries


def test_dashboard_config_map() -> None:
    config_map, board = dashboard(scenario_objects("defaults"))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["uid"] == "llamajob-training"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= set(variables)
    assert variables["job"]["multi"] is True and variables["job"]["includeAll"] is True
    titles = {p["title"] for p in board["panels"] if p["type"] != "row"}
    assert {
        "Loss", "Tokens per second", "MFU", "Step time", "Checkpoint save / load seconds",
        "Restarts", "Jobs by phase", "Fault detection latency", "Restart latency",
    } <= titles
    for title, expr in dashboard_queries(board):
        selectors(grafana_to_promql(expr))  # parses, or raises naming the syntax error
        if not title.startswith("$") and 'job=~"$job"' not in expr:
            # Per-job panels follow the job variable; the operator-wide ones carry no job label.
            assert "llamajob_train" not in expr and "checkpoint" not in expr, title
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    moved = render_objects({"monitoring": {"dashboard": {"namespace": "grafana"}}})
    assert one(moved, "ConfigMap")["metadata"]["namespace"] == "grafana"


def test_dashboard_lists_every_job_the_operator_works() -> None:
    """The Namespace and Job lists come from an operator series that exists for every job from
    its first decision, not from a trainer series: a job that never trained (Pending, or Failed
    by its spec) still shows in "Jobs by phase" and "Restarts"."""
    from llamajob import metrics

    _, board = dashboard(scenario_objects("defaults"))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    operator_families = {f.name for f in metrics.REGISTRY.collect()}
    for name in ("namespace", "job"):
        [(metric, _)] = selectors(dashboard_queries({"panels": [], "templating": {
            "list": [variables[name]]}})[0][1])
        assert metric == "llamajob_job_info", name
        assert metric in operator_families
    assert set(metrics.JOB_INFO._labelnames) == {"namespace", "job", "phase"}


def test_job_info_follows_the_operators_jobs() -> None:
    from llamajob import handlers, metrics

    def info(job: str) -> dict[str, float]:
        return {s.labels["phase"]: s.value for f in metrics.REGISTRY.collect()
                if f.name == "llamajob_job_info" for s in f.samples
                if s.labels["job"] == job and s.labels["namespace"] == "dash-ns"}

    op = handlers.Operator()
    op.set_phase("dash-ns", "never-trained", "Failed")  # InvalidSpec on its first decision
    op.set_phase("dash-ns", "runs", "Pending")
    assert info("never-trained") == {"Failed": 1.0}
    op.set_phase("dash-ns", "runs", "Compiling")
    op.set_phase("dash-ns", "runs", "Training")
    assert info("runs") == {"Training": 1.0}  # one series per job: the current phase
    import asyncio

    asyncio.run(op.forget("dash-ns", "runs"))
    asyncio.run(op.forget("dash-ns", "never-trained"))
    assert info("runs") == {} and info("never-trained") == {}


def test_dashboard_file_is_what_the_config_map_ships() -> None:
    _, board = dashboard(scenario_objects("defaults"))
    on_disk = json.loads((CHART_DIR / "dashboards" / "llamajob-training.json").read_text())
    assert board == on_disk


# --- metric names: alerts and dashboards against the code's registries --------------------------

# Series Prometheus itself creates for every scrape target, not exported by our code.
PROMETHEUS_BUILTINS = {"up"}


def known_series() -> dict[str, set[str]]:
    from llamajob.metrics import REGISTRY
    from llamajob_trainer.metrics import build_registry

    trainer_registry, _ = build_registry("job", "namespace")
    series = exposed_series(REGISTRY)
    for name, labels in exposed_series(trainer_registry).items():
        series.setdefault(name, set()).update(labels)
    return series


def all_queries() -> list[tuple[str, str]]:
    objects = scenario_objects("defaults-with-prometheus-operator")
    rules = [(f"alert {name}", r["expr"]) for name, r in alert_rules(objects).items()]
    _, board = dashboard(objects)
    panels = [(f"panel {t}", grafana_to_promql(e)) for t, e in dashboard_queries(board)]
    return rules + panels


def test_every_queried_metric_exists_in_the_code() -> None:
    series = known_series()
    missing = []
    for where, expr in all_queries():
        for name, labels in selectors(expr):
            if name in PROMETHEUS_BUILTINS:
                continue
            if name not in series:
                missing.append(f"{where}: {name}")
            elif series[name] and not set(labels) <= series[name]:
                missing.append(f"{where}: {name} has no label(s) {set(labels) - series[name]}")
    assert missing == [], "queries name metrics or labels the code does not export"


def test_the_catalogue_is_used() -> None:
    """Every metric family the code exports is read by an alert or a panel."""
    used = {name for _, expr in all_queries() for name, _ in selectors(expr)}
    series = known_series()
    families: dict[str, set[str]] = {}
    for name in series:
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] + "_bucket" in series:
                base = name[: -len(suffix)]
        families.setdefault(base, set()).add(name)
    unused = sorted(base for base, names in families.items() if not names & used)
    assert unused == [], (
        "exported but shown nowhere: add a panel to charts/llamajob/dashboards/"
        "llamajob-training.json (and to docs/monitoring.md) or an alert"
    )


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('max by (namespace, job) (foo{job=~"$job"})', [("foo", {"job": "$job"})]),
        ("sum(rate(x_bucket[5m])) / on (le) group_left count(y offset 1h)",
         [("x_bucket", {}), ("y", {})]),
        ('absent(up{job="a"} == 1) or vector(0)', [("up", {"job": "a"})]),
        ("histogram_quantile(0.9, sum by (le) (increase(h_bucket[6h])))", [("h_bucket", {})]),
    ],
)
def test_selector_extraction(expr: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    assert sorted(selectors(expr), key=lambda s: s[0]) == sorted(expected, key=lambda s: s[0])


def test_selector_extraction_rejects_bad_promql() -> None:
    with pytest.raises(ValueError):
        selectors("sum(rate(foo[5m])")
    with pytest.raises(ValueError):
        selectors("rate(foo[$__rate_interval])")  # Grafana variables must be substituted


def test_exposed_series_follow_the_exposition_format() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    Counter("c_total", "c", ["job"], registry=registry).labels("j").inc()
    Histogram("h_seconds", "h", registry=registry).observe(1)
    Gauge("g", "g", ["phase", "namespace"], registry=registry)  # no child: no labels known
    series = exposed_series(registry)
    assert series == {
        "c_total": {"job"}, "h_seconds_bucket": set(), "h_seconds_sum": set(),
        "h_seconds_count": set(), "g": set(),
    }


# --- NOTES --------------------------------------------------------------------------------------


def test_notes_explain_the_install() -> None:
    text = notes(render({"operator": {"watch": {**IN_NAMESPACES,
                                                 "namespaces": ["team-a", "team-b"]}}}))
    assert "Watching LlamaTrainingJobs in: team-a, team-b" in text
    assert "IGNORED" in text
    assert "standalone" in text
    assert 'grafana_dashboard="1"' in text
    text = notes(render({"operator": {"watch": {"scope": "cluster"}, **PEERING_2}},
                        api_versions=[MONITORING_API]))
    assert "every namespace" in text and f'peering "{RELEASE}"' in text
    assert "ServiceMonitor created, PodMonitor created, PrometheusRule created" in text


# --- kubectl apply against a real API server ----------------------------------------------------

MONITORING_CRDS_SCRIPT = ROOT / "tools" / "k8s" / "monitoring-crds.sh"
# The Prometheus Operator CRDs the chart's monitoring objects need (the script fetches them all).
MONITORING_PLURALS = ("servicemonitors", "podmonitors", "prometheusrules")
WATCHED = ("team-a", "team-b")  # namespaces-peering's watch list


def prometheus_operator_crds() -> list[Path]:
    """The real Prometheus Operator CRD files, at the version tools/k8s/monitoring-crds.sh pins.

    A failed fetch fails the test with the script's output rather than skipping it."""
    proc = subprocess.run(["bash", str(MONITORING_CRDS_SCRIPT)], capture_output=True, text=True,
                          check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{MONITORING_CRDS_SCRIPT} failed (exit {proc.returncode}):\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}",
                    pytrace=False)
    directory = Path(lines[-1])
    return [directory / f"monitoring.coreos.com_{plural}.yaml" for plural in MONITORING_PLURALS]


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One real control plane (tests/k8s_control_plane.py) for this module's scenarios, set up as
    a cluster that runs the Prometheus Operator is before the chart comes: the operator's CRDs
    installed and established, and the namespaces the release goes into and watches. The
    release namespace enforces the `restricted` Pod Security Standard, so the operator's pods
    pass the real PodSecurity admission or are refused."""
    crds = prometheus_operator_crds()  # before the control plane starts: fail fast
    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    plane.start()
    try:
        # Server-side, as upstream installs them: a client-side apply would copy each 75 kB
        # schema into a last-applied annotation.
        plane.kubectl("apply", "--server-side", "--validate=strict",
                      *(f"--filename={path}" for path in crds))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      *(f"crd/{plural}.monitoring.coreos.com" for plural in MONITORING_PLURALS))
        # Not create_namespace(): no pod here runs as `default`, and waiting for the
        # controller-manager to make that ServiceAccount would cost about 5 s up front.
        for ns in (NAMESPACE, *WATCHED):
            labels = {"pod-security.kubernetes.io/enforce": "restricted"} if ns == NAMESPACE else {}
            plane.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": ns, "labels": labels}})
        yield plane
    finally:
        plane.stop()


def _differences(rendered: Any, stored: Any, path: str) -> list[str]:
    """Where `stored` does not hold `rendered`: every rendered field must come back with the
    same value; fields the server adds (defaults) are allowed."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [f"{path}: rendered a mapping, stored {stored!r}"]
        found: list[str] = []
        for key, value in rendered.items():
            if key not in stored:
                found.append(f"{path}.{key}: rendered {value!r}, not stored")
            else:
                found += _differences(value, stored[key], f"{path}.{key}")
        return found
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [f"{path}: rendered {rendered!r}, stored {stored!r}"]
        return [d for i, (r, s) in enumerate(zip(rendered, stored, strict=True))
                for d in _differences(r, s, f"{path}[{i}]")]
    return [] if rendered == stored else [f"{path}: rendered {rendered!r}, stored {stored!r}"]


def _ident(obj: dict[str, Any]) -> tuple[str, str | None, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace"), meta["name"])


def _can_i(k8s: ControlPlane, user: str, verb: str, resource: str, *args: str) -> bool:
    proc = k8s.kubectl("auth", "can-i", verb, resource, f"--as={user}", *args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {proc}"
    return answer == "yes"


@pytest.mark.parametrize("scenario", ["namespaces-peering", "cluster-peering"])
def test_release_applies_to_a_real_api_server(
    k8s: ControlPlane, tmp_path: Path, scenario: str
) -> None:
    """`kubectl apply` of the chart's CRDs, then of every rendered object in `helm install`'s
    order, against a real kube-apiserver with the Prometheus Operator's real CRDs installed,
    and with kubectl's strict validation: the server's OpenAPI for built-in kinds and the CRDs'
    schemas for the custom ones refuse unknown or mistyped fields.

    Then, from the server: every object is stored as rendered (defaults aside); a second apply
    changes nothing; the operator Deployment's pods are created (ServiceAccount and PodSecurity
    admission, `restricted`); each binding names a ServiceAccount and role that exist, and the
    RBAC authorizer grants the operator's ServiceAccount what it needs and nothing it must not
    have; a job applies under strict validation and `ltj` resolves. Each scenario deletes its
    objects afterwards, so both share one control plane (the CRDs stay).
    """
    begin = time.monotonic()
    objects = install_sorted(scenario_objects(scenario))
    release = tmp_path / "release.yaml"
    release.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    job = ROOT / "examples" / "tiny.yaml"
    cluster_scope = scenario.startswith("cluster")
    try:
        crd_names = [crd["metadata"]["name"] for crd in chart_crds()]
        out = k8s.kubectl("apply", "--validate=strict", "-f", str(CHART_DIR / "crds")).stdout
        for name in crd_names:
            assert f"customresourcedefinition.apiextensions.k8s.io/{name} " in out, out
        k8s.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{name}" for name in crd_names))

        applied = k8s.kubectl("apply", "--validate=strict", "-f", str(release))
        assert applied.stdout.count(" created\n") == len(objects), applied.stdout
        assert "Warning" not in applied.stderr, applied.stderr

        listed = json.loads(k8s.kubectl("get", "-f", str(release), "-o", "json").stdout)
        stored = {_ident(item): item for item in listed["items"]}
        assert sorted(stored) == sorted(_ident(obj) for obj in objects)
        for obj in objects:
            found = stored[_ident(obj)]
            for key in ("rules", "data", "subjects", "roleRef"):
                if key in obj:
                    assert found[key] == obj[key], f"{_ident(obj)}: {key}"
            if "spec" in obj:
                assert not _differences(obj["spec"], found["spec"], "spec"), (
                    _ident(obj), _differences(obj["spec"], found["spec"], "spec"))

        # Applying the same release again changes nothing.
        out = k8s.kubectl("apply", "--validate=strict", "-f", str(release)).stdout
        assert out.count(" unchanged\n") == len(objects), out

        # The Deployment is admitted, and so are its pods: the ReplicaSet creates every replica
        # (the ServiceAccount they run as exists; they meet the `restricted` standard). They stay
        # Pending: no kubelet runs.
        deployment = one(objects, "Deployment")
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{deployment['metadata']['name']}"
        want = deployment["spec"]["replicas"]

        def created() -> bool:
            status = k8s.ok("GET", path).get("status", {})
            failures = [c for c in status.get("conditions", [])
                        if c["type"] == "ReplicaFailure" and c["status"] == "True"]
            assert not failures, failures
            return bool(status.get("replicas") == want)

        wait_for(f"{want} operator pods", created, 30,
                 on_timeout=lambda: f"; {k8s.ok('GET', path).get('status')}")
        service_account = one(objects, "ServiceAccount")["metadata"]["name"]
        pods = k8s.ok("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        assert len(pods) == want
        assert {p["spec"]["serviceAccountName"] for p in pods} == {service_account}

        # The bindings and the ServiceAccount reference each other, on the server.
        for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
            ref = binding["roleRef"]
            role_path = (f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{ref['name']}"
                         if ref["kind"] == "ClusterRole" else
                         f"/apis/rbac.authorization.k8s.io/v1/namespaces/"
                         f"{binding['metadata']['namespace']}/roles/{ref['name']}")
            assert k8s.request("GET", role_path).status == 200, binding
            for subject in binding["subjects"]:
                assert subject["kind"] == "ServiceAccount", binding
                assert k8s.request("GET", f"/api/v1/namespaces/{subject['namespace']}/"
                                   f"serviceaccounts/{subject['name']}").status == 200, binding

        # The RBAC authorizer's answer for the operator's ServiceAccount.
        user = f"system:serviceaccount:{NAMESPACE}:{service_account}"
        jobs = f"{PLURAL}.{GROUP}"
        assert _can_i(k8s, user, "patch", jobs, "--subresource=status", "-n", "team-a")
        assert _can_i(k8s, user, "create", "pods", "-n", "team-b")
        if cluster_scope:
            assert _can_i(k8s, user, "patch", "clusterkopfpeerings.kopf.dev")
        else:
            assert _can_i(k8s, user, "patch", "kopfpeerings.kopf.dev", "-n", "team-a")
        # Outside the watched namespaces only a cluster-wide operator may write jobs.
        assert _can_i(k8s, user, "patch", jobs, "--subresource=status", "-n",
                      "default") == cluster_scope
        assert not _can_i(k8s, user, "get", "secrets", "-n", "kube-system")

        # The CRD is served: a job applies (validated against its schema) and `ltj` resolves.
        k8s.kubectl("apply", "--validate=strict", "-n", "team-a", "-f", str(job))
        out = k8s.kubectl("get", "ltj", "-n", "team-a", "-o", "name").stdout
        assert out.strip() == "llamatrainingjob.llamajob.dev/tiny"
    finally:
        k8s.kubectl("delete", "--ignore-not-found", "--wait", "-n", "team-a", "-f", str(job),
                    check=False)
        # Foreground: kubectl returns once the Deployment's ReplicaSet and pods are gone too,
        # so the next scenario counts only its own.
        k8s.kubectl("delete", "--ignore-not-found", "--wait", "--cascade=foreground",
                    "-f", str(release), check=False)
        print(f"{scenario}: {time.monotonic() - begin:.1f}s against the control plane")


# --- docs ---------------------------------------------------------------------------------------


def test_monitoring_doc_shows_the_shipped_queries() -> None:
    """docs/monitoring.md quotes every alert and panel query as the chart ships it."""
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    objects = scenario_objects("defaults-with-prometheus-operator")
    for name, rule in alert_rules(objects).items():
        assert f"### {name} (" in doc, f"alert {name} is not described"
        assert rule["expr"].strip() in doc, f"alert {name}: the doc shows another query"
    _, board = dashboard(objects)
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert f"#### {panel['title']}\n" in doc, f"panel {panel['title']} is not described"
        for target in panel["targets"]:
            assert target["expr"] in doc, f"panel {panel['title']}: the doc shows another query"
