"""The repository's CRD, examples, renderer and Helm chart against a real Kubernetes control
plane (``k8s_control_plane``): what the emulator can only imitate, the real API server,
garbage collector, scheduler and RBAC authorizer decide here."""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import render_objects
from k8s_control_plane import ControlPlane, wait_for
from llamajob import render
from llamajob.api import GROUP, PLURAL
from llamajob.images import with_trainer_image
from llamajob.jobfile import parse_job
from llamajob.plan import make_plan

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "crds" / "llamatrainingjobs.llamajob.dev.yaml"
CRD = yaml.safe_load(CRD_FILE.read_text())
VERSION = CRD["spec"]["versions"][0]["name"]
JOBS = f"/apis/{GROUP}/{VERSION}"


def jobs_path(namespace: str, name: str = "", sub: str = "") -> str:
    return "/".join(p for p in (f"{JOBS}/namespaces/{namespace}/{PLURAL}", name, sub) if p)


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return doc


_NAMESPACES = itertools.count(1)


def fresh_namespace(k8s: ControlPlane, prefix: str) -> str:
    name = f"{prefix}-{next(_NAMESPACES)}"
    k8s.create_namespace(name)
    return name


def create_job(k8s: ControlPlane, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = k8s.ok("POST", jobs_path(namespace), doc)
    return created


# --- the CRD ------------------------------------------------------------------------------------
def header(output: str) -> list[str]:
    return re.split(r"\s{2,}", output.splitlines()[0].strip())


def test_crd_installs_and_the_examples_apply_with_the_printer_columns(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    ns = fresh_namespace(k8s, "examples")
    for name in ("tiny", "llama3-70b"):
        out = k8s.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / f"{name}.yaml"))
        assert f"llamatrainingjob.{GROUP}/{name} created" in out.stdout
    columns = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
    default = ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]
    wide = ["NAME"] + [c["name"].upper() for c in columns]
    table = k8s.kubectl("get", "ltj", "-n", ns).stdout
    assert header(table) == default
    assert sorted(line.split()[0] for line in table.splitlines()[1:]) == ["llama3-70b", "tiny"]
    assert header(k8s.kubectl("get", "ltj", "-n", ns, "-o", "wide").stdout) == wide
    # The Nodes column is read from the spec by the server, not by kubectl.
    # Empty cells are blank, so read the cell by its column's position, not by splitting.
    head, row = k8s.kubectl("get", "ltj", "llama3-70b", "-n", ns, "-o", "wide").stdout.splitlines()
    cell = row[head.index("NODES"):].split()[0]
    assert cell == str(example("llama3-70b")["spec"]["cluster"]["nodes"])


def test_schema_invalid_job_is_refused_with_the_field_named(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    ns = fresh_namespace(k8s, "invalid")
    schema = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    maximum = schema["properties"]["spec"]["properties"]["model"]["properties"]["numLayers"][
        "maximum"]
    doc = example("tiny")
    doc["spec"]["model"]["numLayers"] = maximum + 1
    doc["spec"]["maxSteps"] = -5
    out = k8s.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert out.returncode != 0
    assert "spec.model.numLayers" in out.stderr and str(maximum) in out.stderr, out.stderr
    assert "spec.maxSteps" in out.stderr, out.stderr
    missing = k8s.kubectl("get", "ltj", "tiny", "-n", ns, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


@pytest.mark.parametrize(
    ("resume", "accepted"),
    [("latestIfExists", True), ("none", True), (12, True), ("latest", False), (-1, False),
     (10**9 + 1, False)],
)
def test_checkpoint_resume_is_an_int_or_string_checked_by_its_cel_rule(
    k8s: ControlPlane, crd: dict[str, Any], resume: Any, accepted: bool
) -> None:
    """`checkpoint.resume` is the CRD's one int-or-string field: the structural schema allows only
    bare integer and string branches, so its bounds and words are a CEL rule the server runs."""
    ns = fresh_namespace(k8s, "resume")
    doc = example("tiny")
    doc["spec"].setdefault("checkpoint", {})["resume"] = resume
    out = k8s.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    if accepted:
        assert out.returncode == 0, out.stderr
        got = k8s.kubectl("get", "ltj", "tiny", "-n", ns, "-o",
                          "jsonpath={.spec.checkpoint.resume}").stdout
        assert got == str(resume)
    else:
        assert out.returncode != 0
        assert "spec.checkpoint.resume" in out.stderr, out.stderr
        assert "latestIfExists, none" in out.stderr, out.stderr


# --- the status subresource and optimistic concurrency ------------------------------------------
def test_status_subresource_separates_spec_and_status(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    ns = fresh_namespace(k8s, "status")
    job = create_job(k8s, ns, example("tiny"))
    assert "status" not in job or not job["status"].get("phase")
    steps = job["spec"]["maxSteps"]
    merge = {"content_type": "application/merge-patch+json"}

    # Through /status: the status changes, the spec in the same patch is dropped.
    patched = k8s.ok("PATCH", jobs_path(ns, "tiny", "status"),
                     {"status": {"phase": "Training", "step": 3}, "spec": {"maxSteps": 7}},
                     **merge)
    assert patched["status"]["phase"] == "Training" and patched["status"]["step"] == 3
    assert patched["spec"]["maxSteps"] == steps

    # Through the main resource: the spec changes, the status in the same patch is dropped.
    patched = k8s.ok("PATCH", jobs_path(ns, "tiny"),
                     {"spec": {"maxSteps": 7}, "status": {"phase": "Failed"}}, **merge)
    assert patched["spec"]["maxSteps"] == 7
    assert patched["status"]["phase"] == "Training"
    assert patched["metadata"]["generation"] == job["metadata"]["generation"] + 1

    # The status schema is enforced on the subresource too.
    bad = k8s.request("PATCH", jobs_path(ns, "tiny", "status"), {"status": {"phase": "Dancing"}},
                      **merge)
    assert bad.status == 422 and "status.phase" in bad.body["message"]

    # A write carrying a resourceVersion that is no longer current is refused.
    stale = copy.deepcopy(job)
    stale["spec"]["maxSteps"] = 9
    conflict = k8s.request("PUT", jobs_path(ns, "tiny"), stale)
    assert conflict.status == 409, conflict
    stale["status"] = {"phase": "Failed"}
    assert k8s.request("PUT", jobs_path(ns, "tiny", "status"), stale).status == 409
    current = k8s.ok("GET", jobs_path(ns, "tiny"))
    assert current["spec"]["maxSteps"] == 7 and current["status"]["phase"] == "Training"


# --- garbage collection ---------------------------------------------------------------------------
# Nothing runs pods, so a pod the scheduler bound would stay Terminating forever once deleted
# (the kubelet confirms deletions); this one selects no node and stays Pending.
UNSCHEDULABLE = {"llamajob.dev/test": "no-such-node"}


def test_children_are_garbage_collected_after_the_job(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    ns = fresh_namespace(k8s, "gc")
    job = create_job(k8s, ns, example("tiny"))
    owner = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaTrainingJob", "name": "tiny",
              "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    meta = {"name": "tiny-child", "ownerReferences": owner}
    children = {
        f"/api/v1/namespaces/{ns}/configmaps": {"metadata": meta, "data": {"a": "b"}},
        f"/api/v1/namespaces/{ns}/services": {"metadata": meta, "spec": {
            "clusterIP": "None", "selector": {"app": "x"}, "ports": [{"port": 29500}]}},
        f"/api/v1/namespaces/{ns}/pods": {"metadata": meta, "spec": {
            "nodeSelector": UNSCHEDULABLE,
            "containers": [{"name": "c", "image": "example.invalid/none"}]}},
    }
    for path, body in children.items():
        k8s.ok("POST", path, body)
    # An object with no owner: the collector must leave it alone.
    k8s.ok("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "ownerless"}})

    time.sleep(2)  # give the collector time to misbehave before the job goes
    for path in children:
        assert k8s.request("GET", f"{path}/tiny-child").status == 200
    k8s.kubectl("delete", "ltj", "tiny", "-n", ns, "--wait=true")
    begin = time.monotonic()
    wait_for("the job's children to be garbage-collected", lambda: all(
        k8s.request("GET", f"{path}/tiny-child").status == 404 for path in children), 60,
        interval=0.5)
    print(f"children collected {time.monotonic() - begin:.1f}s after the job was deleted")
    assert k8s.request("GET", f"/api/v1/namespaces/{ns}/configmaps/ownerless").status == 200


# --- the scheduler places the rendered 70B gang -----------------------------------------------
def test_scheduler_binds_the_70b_gang_one_pod_per_healthy_node(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    ns = "training"
    k8s.create_namespace(ns)
    created = create_job(k8s, ns, example("llama3-70b"))
    job = parse_job({**example("llama3-70b"), "metadata": created["metadata"]})
    # The example takes the operator's trainer image for its family, as a chart install gives.
    job, missing = with_trainer_image(job, {"trn1": "registry.example/llamajob-trainer:trn1"})
    assert missing is None
    gang = render.render_gang(job, make_plan(job.spec), render.ROLE_TRAIN, 1)
    assert len(gang) == 16
    pod_spec = gang[0]["spec"]
    requests = pod_spec["containers"][0]["resources"]["requests"]
    selector = pod_spec["nodeSelector"]
    taints = [{"key": t["key"], "effect": t["effect"]} for t in pod_spec["tolerations"]
              if t.get("operator") == "Exists" and t.get("key")]
    assert taints, "the gang tolerates the Neuron taint"
    allocatable = {"cpu": "128", "memory": "512Gi", "pods": "110",
                   **{k: str(v) for k, v in requests.items()}}
    healthy = [f"trn1-{i:02d}" for i in range(16)]
    for name in healthy:
        k8s.add_node(name, labels=selector, taints=taints, allocatable=allocatable)
    # Same instance type and resources, but the HyperPod agent has not marked them Schedulable.
    unlabelled = [f"trn1-unchecked-{i}" for i in range(2)]
    instance_only = {k: v for k, v in selector.items() if "node-health" not in k}
    assert instance_only != selector
    for name in unlabelled:
        k8s.add_node(name, labels=instance_only, taints=taints, allocatable=allocatable)

    # The pods mount the job's shared filesystem claim: a bound PVC, or they never schedule.
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"]
              if "persistentVolumeClaim" in v]
    for claim in claims:
        volume = {"name": f"{ns}-{claim}"}
        k8s.ok("POST", "/api/v1/persistentvolumes", {"metadata": volume, "spec": {
            "capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"],
            "storageClassName": "", "nfs": {"server": "fsx.example.invalid", "path": "/"},
            "claimRef": {"namespace": ns, "name": claim}}})
        k8s.ok("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
            "metadata": {"name": claim}, "spec": {
                "accessModes": ["ReadWriteMany"], "storageClassName": "",
                "volumeName": f"{ns}-{claim}", "resources": {"requests": {"storage": "1Ti"}}}})

    begin = time.monotonic()
    for pod in gang:
        k8s.ok("POST", f"/api/v1/namespaces/{ns}/pods", pod)

    def placements() -> dict[str, str] | None:
        pods = k8s.ok("GET", f"/api/v1/namespaces/{ns}/pods")["items"]
        placed = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in pods}
        return placed if len(placed) == 16 and all(placed.values()) else None

    placed = wait_for("all 16 pods to be bound", placements, 90, interval=0.5,
                      on_timeout=lambda: "\n" + k8s.kubectl(
                          "get", "events", "-n", ns, check=False).stdout[-3000:])
    print(f"16 pods bound {time.monotonic() - begin:.1f}s after creation")
    assert sorted(placed.values()) == healthy  # one per node, never on the unlabelled two
    for pod in k8s.ok("GET", f"/api/v1/namespaces/{ns}/pods")["items"]:
        scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
        assert scheduled and scheduled[0]["status"] == "True"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]


# --- the chart's RBAC, enforced ---------------------------------------------------------------
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def test_chart_rbac_grants_the_operator_exactly_what_it_uses(
    k8s: ControlPlane, crd: dict[str, Any]
) -> None:
    release_ns, watched, other = "llamajob-system", "team-a", "team-b"
    for ns in (release_ns, watched, other):
        if k8s.request("GET", f"/api/v1/namespaces/{ns}").status == 404:
            k8s.create_namespace(ns)
    objects = render_objects({"operator": {"watch": {"scope": "namespace",
                                                     "namespaces": [watched]}}},
                             namespace=release_ns)
    rbac = [o for o in objects if o["kind"] in RBAC_KINDS]
    assert {o["kind"] for o in rbac} == set(RBAC_KINDS)
    k8s.kubectl("apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": rbac}))
    (sa,) = [o for o in rbac if o["kind"] == "ServiceAccount"]
    kubeconfig, token = k8s.kubeconfig_for(release_ns, sa["metadata"]["name"])
    k8s.ok("POST", jobs_path(watched), example("tiny"))

    def can(*args: str) -> bool:
        out = k8s.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        assert out.stdout.strip() in ("yes", "no"), out.stdout + out.stderr
        return out.stdout.strip() == "yes"

    # The authorizer reads bindings from a cache: wait for it to see the new ones.
    wait_for("the operator's bindings to take effect", lambda: can(
        "create", "pods", "-n", watched), 15, interval=0.3)
    allowed = [
        ("create", "pods", "-n", watched), ("delete", "pods", "-n", watched),
        ("create", "configmaps", "-n", watched), ("create", "services", "-n", watched),
        ("create", "events", "-n", watched), ("watch", f"{PLURAL}.{GROUP}", "-n", watched),
        ("patch", f"{PLURAL}.{GROUP}", "--subresource=status", "-n", watched),
        ("list", "nodes"),
    ]
    refused = [
        ("get", "secrets", "-n", watched), ("list", "secrets", "--all-namespaces"),
        ("create", "deployments.apps", "-n", watched), ("create", "pods", "-n", other),
        ("patch", f"{PLURAL}.{GROUP}", "-n", watched),
        ("update", f"{PLURAL}.{GROUP}", "--subresource=status", "-n", watched),
        ("delete", "configmaps", "-n", watched), ("create", "roles.rbac.authorization.k8s.io",
                                                  "-n", watched),
    ]
    assert [a for a in allowed if not can(*a)] == []
    assert [r for r in refused if can(*r)] == []

    # And real requests with the token, not just the authorizer's answer.
    made = k8s.kubectl("create", "configmap", "cfg", "--from-literal=a=b", "-n", watched,
                       kubeconfig=kubeconfig)
    assert "configmap/cfg created" in made.stdout
    pod = {"metadata": {"name": "rank0"}, "spec": {
        "nodeSelector": UNSCHEDULABLE, "containers": [{"name": "c", "image": "x.invalid/y"}]}}
    assert k8s.request("POST", f"/api/v1/namespaces/{watched}/pods", pod,
                       token=token).status == 201
    status = k8s.request("PATCH", jobs_path(watched, "tiny", "status"),
                         {"status": {"phase": "Compiling"}}, token=token,
                         content_type="application/merge-patch+json")
    assert status.status == 200 and status.body["status"]["phase"] == "Compiling"
    for path in (f"/api/v1/namespaces/{watched}/secrets", "/api/v1/secrets",
                 f"/apis/apps/v1/namespaces/{watched}/deployments",
                 f"/api/v1/namespaces/{other}/pods", jobs_path(watched, "tiny")):
        denied = k8s.request("GET", path, token=token)
        assert denied.status == 403, (path, denied)
        assert denied.body["reason"] == "Forbidden"
    spec_patch = k8s.request("PATCH", jobs_path(watched, "tiny"), {"spec": {"maxSteps": 1}},
                             token=token, content_type="application/merge-patch+json")
    assert spec_patch.status == 403  # the spec is the user's; the operator writes status only
    refused_cli = k8s.kubectl("get", "secrets", "-n", watched, kubeconfig=kubeconfig, check=False)
    assert refused_cli.returncode != 0 and "Forbidden" in refused_cli.stderr
