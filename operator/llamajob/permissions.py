"""Every Kubernetes API permission the operator uses: the single source of truth for its RBAC.

The Helm chart writes these rules out in ``charts/llamajob/templates/_rbac.tpl``; a test renders
the chart and asserts that its Roles and ClusterRoles equal :func:`grants` exactly, in both watch
scopes, with peering on and off. A call the operator starts making must be added here first, and
one it stops making removed, so that the grant stays least-privilege.

What the operator calls (handlers.py, worker.py, kube.py): kopf watches (list + watch) jobs,
their pods, Services and ConfigMaps, and nodes, through event handlers and indices only, so kopf
never patches a job and adds no finalizer; the operator itself patches a job's ``status``
subresource, creates pods, Services, ConfigMaps and Events, and deletes pods (Services and
ConfigMaps go with their job, through ownerReferences and the garbage collector).

What kopf 1.45 calls on its own: it lists and watches CustomResourceDefinitions to notice CRDs
installed after it started and, when confined to namespaces, lists and watches Namespaces to
resolve its ``--namespace`` arguments (without these it logs warnings and falls back to a
one-time scan). Peering reads the peering object with list + watch and writes it with patch;
kopf 1.45 never GETs a single object, so ``get`` is not granted anywhere it is not needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .api import GROUP, PLURAL

Scope = Literal["namespace", "cluster"]
SCOPES: tuple[Scope, ...] = ("namespace", "cluster")
CORE = ""  # the core API group ("v1") is the empty string in RBAC rules
KOPF_GROUP = "kopf.dev"


@dataclass(frozen=True)
class Permission:
    api_group: str
    resource: str  # plural, or "plural/subresource"
    verbs: tuple[str, ...]
    why: str


# Objects that live in the job's namespace. Namespace scope grants them with a Role in every
# watched namespace; cluster scope grants them with the ClusterRole.
NAMESPACED: tuple[Permission, ...] = (
    Permission(GROUP, PLURAL, ("list", "watch"),
               "watch jobs (kopf event handlers: no patches, no finalizer)"),
    Permission(GROUP, f"{PLURAL}/status", ("patch",),
               "write phase, step, loss, restarts and conditions into the status subresource"),
    Permission(CORE, "pods", ("create", "delete", "list", "watch"),
               "one worker pod per node; the whole gang is deleted and recreated on a fault"),
    Permission(CORE, "services", ("create", "list", "watch"),
               "headless Service for the torchrun rendezvous at pod 0"),
    Permission(CORE, "configmaps", ("create", "list", "watch"),
               "the trainer config mounted into every pod"),
    Permission(CORE, "events", ("create",),
               "Events such as Compiling, NodeFault, Restarted, CheckpointSaved"),
)

# Cluster-scoped objects: always a ClusterRole, whatever the watch scope.
CLUSTER: tuple[Permission, ...] = (
    Permission(CORE, "nodes", ("list", "watch"),
               "HyperPod node-health labels: avoid faulty nodes, detect node loss"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch"),
               "kopf notices the LlamaTrainingJob CRD being installed or upgraded at runtime"),
)

# Only a namespace-confined kopf lists namespaces (to resolve its --namespace patterns).
NAMESPACE_DISCOVERY: tuple[Permission, ...] = (
    Permission(CORE, "namespaces", ("list", "watch"),
               "kopf matches its --namespace arguments against existing namespaces"),
)

NAMESPACED_PEERING: tuple[Permission, ...] = (
    Permission(KOPF_GROUP, "kopfpeerings", ("list", "watch", "patch"),
               "kopf peering: replicas elect one active operator per watched namespace"),
)

CLUSTER_PEERING: tuple[Permission, ...] = (
    Permission(KOPF_GROUP, "clusterkopfpeerings", ("list", "watch", "patch"),
               "kopf peering: replicas elect one active cluster-wide operator"),
)


@dataclass(frozen=True)
class Grants:
    """What to grant, split by the kind of role that carries it."""

    namespaced: tuple[Permission, ...]  # Role in each watched namespace; empty in cluster scope
    cluster: tuple[Permission, ...]  # the ClusterRole


def grants(scope: Scope, *, peering: bool) -> Grants:
    if scope == "namespace":
        return Grants(
            namespaced=NAMESPACED + (NAMESPACED_PEERING if peering else ()),
            cluster=CLUSTER + NAMESPACE_DISCOVERY,
        )
    if scope == "cluster":
        return Grants(
            namespaced=(),
            cluster=NAMESPACED + CLUSTER + (CLUSTER_PEERING if peering else ()),
        )
    raise ValueError(f"unknown scope {scope!r}: expected one of {', '.join(SCOPES)}")


def policy_rules(permissions: Iterable[Permission]) -> list[dict[str, Any]]:
    """Render permissions as Kubernetes PolicyRule dicts.

    Resources of the same API group with the same verbs share one rule, in first-seen order, so
    the chart's rules stay short enough to read next to this file.
    """
    rules: list[dict[str, Any]] = []
    index: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for perm in permissions:
        key = (perm.api_group, perm.verbs)
        rule = index.get(key)
        if rule is None:
            rule = {"apiGroups": [perm.api_group], "resources": [], "verbs": list(perm.verbs)}
            index[key] = rule
            rules.append(rule)
        if perm.resource not in rule["resources"]:
            rule["resources"].append(perm.resource)
    return rules


def triples(permissions: Iterable[Permission]) -> set[tuple[str, str, str]]:
    """Flatten to (apiGroup, resource, verb): the unit a drift check compares."""
    return {(p.api_group, p.resource, verb) for p in permissions for verb in p.verbs}
