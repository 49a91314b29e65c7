"""The README's cluster path ("On a cluster, step by step"), followed on the real control plane.

Step 3 installs the chart as documented: every object the Helm engine renders for the documented
values is applied, and the operator is the `llamajob operator` process started with exactly the
arguments of the chart's Deployment, logged in with a token for the chart's ServiceAccount (no
kubelet runs the Deployment here). Step 4 makes the documented namespace, the `hf-token` Secret
with `kubectl create secret`, the claim from docs/install.md's own PersistentVolume and claim,
and the data Job of examples/prepare-data-job.yaml. Step 5 applies the example, and the pods the
operator makes must have what the docs say: the trainer image of `trainerImage`, the claim, the
Secret, Guaranteed QoS as the API server computes it. Then the newcomer mistakes, each with the
signal the docs promise: a namespace the operator does not watch, a missing claim.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import render_objects
from k8s_control_plane import ControlPlane
from kube_cluster import (
    Cluster,
    Identity,
    condition,
    make_cluster,
    pods,
    status,
    wait_for,
)
from test_operator_subprocess import OperatorProcess

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = "registry.example.com/ml"  # what the README's $REGISTRY stands for
DOCUMENTED = {"image": {"repository": f"{REGISTRY}/llamajob-operator"},
              "trainerImage": {"repository": f"{REGISTRY}/llamajob-trainer"}}
JOB = "llama3-8b"
CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class Installed:
    """The chart applied for one release, and its operator running as the Deployment would."""

    def __init__(self, k8s: ControlPlane, workdir: Path, release: str, namespace: str,
                 values: dict[str, Any]) -> None:
        self.k8s, self.release, self.namespace = k8s, release, namespace
        if k8s.request("GET", f"/api/v1/namespaces/{namespace}").status == 404:
            k8s.create_namespace(namespace)
        self.objects = render_objects(values, namespace=namespace, release=release)
        # Like helm install -n NAMESPACE: objects without a namespace go there, the Roles in
        # the watched namespaces stay where the chart puts them.
        for obj in self.objects:
            if obj["kind"] not in CLUSTER_KINDS:
                obj["metadata"].setdefault("namespace", namespace)
        k8s.kubectl("apply", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": self.objects}))
        (deployment,) = [o for o in self.objects if o["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        self.args: list[str] = pod["containers"][0]["args"]
        account = pod["serviceAccountName"]
        kubeconfig, _ = k8s.kubeconfig_for(namespace, account)
        identity = Identity(kubeconfig, f"system:serviceaccount:{namespace}:{account}")
        self.operator = OperatorProcess(identity, workdir / f"operator-{release}.log",
                                        chart_args=self.args).start()

    def stop(self) -> None:
        self.operator.stop()


@pytest.fixture
def installed(k8s: ControlPlane, crd: dict[str, Any], tmp_path: Path) -> Iterator[Installed]:
    """Step 3: `helm install` with the documented values (cluster scope, the default). Per
    test: a cluster-wide operator left running would act on the next test's namespaces."""
    release = Installed(k8s, tmp_path, "path", "path-system", DOCUMENTED)
    yield release
    release.stop()


@pytest.fixture
def team(k8s: ControlPlane, tmp_path: Path) -> Iterator[Cluster]:
    """The namespace a user applies to, with nodes for the 8B example; no claim yet."""
    cluster = make_cluster(k8s, tmp_path, claims=())
    cluster.add_nodes(1)
    try:
        yield cluster
    finally:
        cluster.clean_up()


def doc_yaml(path: Path, containing: str) -> list[dict[str, Any]]:
    """The documents of the first ```yaml block of `path` that holds `containing`."""
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S):
        if containing in block:
            return [d for d in yaml.safe_load_all(block) if d]
    raise AssertionError(f"{path.name} shows no yaml block with {containing!r}")


def documented_claim(cluster: Cluster) -> None:
    """docs/install.md's PersistentVolume and claim, in the team's namespace."""
    volume, claim = doc_yaml(ROOT / "docs" / "install.md", "kind: PersistentVolume")
    volume["metadata"]["name"] = f"{cluster.namespace}-fsx-pv"
    claim["metadata"]["namespace"] = cluster.namespace
    claim["spec"]["volumeName"] = volume["metadata"]["name"]
    cluster.k8s.kubectl("apply", "-f", "-", stdin=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [volume, claim]}))
    cluster.cleanups.append(("persistentvolumes", volume["metadata"]["name"]))
    wait_for(lambda: (cluster.client.get("persistentvolumeclaims", "fsx-claim").get("status")
                      or {}).get("phase") == "Bound", what="the claim bound to the volume")


def test_the_documented_path_starts_the_job_with_what_the_docs_promise(
    installed: Installed, team: Cluster, tmp_path: Path
) -> None:
    ns = team.namespace
    # The operator got the trainer images from trainerImage, one per family, as documented.
    assert f"--trainer-image=trn1={REGISTRY}/llamajob-trainer:0.1.0-trn1" in installed.args
    assert "--all-namespaces" in installed.args

    # Step 4: the Secret, the claim, the data Job.
    team.kubectl("create", "secret", "generic", "hf-token", "--from-literal=token=hf_example")
    documented_claim(team)
    team.kubectl("create", "configmap", f"{JOB}-job",
                 f"--from-file=job.yaml={ROOT / 'examples' / 'llama3-8b.yaml'}")
    manifest = (ROOT / "examples" / "prepare-data-job.yaml").read_text().replace(
        "<registry>", REGISTRY)
    team.k8s.kubectl("apply", "-n", ns, "-f", "-", stdin=manifest)
    data_pod = wait_for(lambda: team.client.list("pods", labels="job-name=prepare-data-llama3-8b"),
                        what="the data Job's pod")[0]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in data_pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["fsx-claim"]
    assert "hf-token" in json.dumps(data_pod["spec"]["containers"][0]["env"])

    # Step 5: apply the example as shipped; the operator starts it.
    out = team.kubectl("apply", "-f", str(ROOT / "examples" / "llama3-8b.yaml"))
    assert f"llamatrainingjob.llamajob.dev/{JOB} created" in out
    (pod,) = wait_for(lambda: pods(team, JOB, role="compile"), timeout=60,
                      what="the compile pod")
    spec = pod["spec"]
    assert spec["containers"][0]["image"] == f"{REGISTRY}/llamajob-trainer:0.1.0-trn1"
    assert [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
            if "persistentVolumeClaim" in v] == ["fsx-claim"]
    # The 8B job reads its tokenizer from the claim (the data Job fetched it with the token);
    # the 70B example, which also loads pretrained weights, takes the token itself.
    assert "hf-token" not in json.dumps(spec)
    assert pod["status"]["qosClass"] == "Guaranteed"
    assert team.kubelet.bound(pod["metadata"]["name"]) in team.nodes
    row = team.kubectl("get", "ltj").splitlines()[1].split()
    assert row[:2] == [JOB, "Compiling"]


def test_a_missing_claim_is_said_in_the_job_status(installed: Installed, team: Cluster) -> None:
    """Step 4 skipped: the scheduler cannot place pods whose claim does not exist, and the job
    says so (PodsUnschedulable with the scheduler's words, and a Warning event)."""
    team.kubectl("apply", "-f", str(ROOT / "examples" / "llama3-8b.yaml"))
    running = wait_for(
        lambda: (c := condition(status(team, JOB), "Running")).get("reason") ==
        "PodsUnschedulable" and c, timeout=60, what="PodsUnschedulable")
    assert 'persistentvolumeclaim "fsx-claim" not found' in running["message"]
    assert 'persistentvolumeclaim "fsx-claim" not found' in status(team, JOB)["message"]


def test_a_namespace_the_operator_does_not_watch_stays_untouched_as_documented(
    k8s: ControlPlane, crd: dict[str, Any], team: Cluster, tmp_path: Path
) -> None:
    """`namespace` scope watches only its namespaces; a job elsewhere is ignored, with nothing
    written to it, which the chart's values and docs/install.md say loudly."""
    watched = team.namespace
    other = make_cluster(k8s, tmp_path / "other")
    values = {**DOCUMENTED, "operator": {"watch": {"scope": "namespace",
                                                   "namespaces": [watched]}}}
    narrow = Installed(k8s, tmp_path, f"narrow-{watched}", f"{watched}-system", values)
    try:
        team.kubectl("create", "secret", "generic", "hf-token", "--from-literal=token=x")
        for cluster in (team, other):
            cluster.kubectl("apply", "-f", str(ROOT / "examples" / "llama3-8b.yaml"))
        wait_for(lambda: pods(team, JOB), timeout=60, what="pods in the watched namespace")
        time.sleep(1.0)
        assert pods(other, JOB) == [] and status(other, JOB) == {}
        row = other.kubectl("get", "ltj").splitlines()[1].split()
        assert row[0] == JOB and row[1] != "Compiling"  # no phase: the age comes next
        values_text = (ROOT / "charts" / "llamajob" / "values.yaml").read_text()
        install_text = (ROOT / "docs" / "install.md").read_text()
        assert "IGNORED" in values_text and "ignored" in install_text.lower()
    finally:
        narrow.stop()
        other.clean_up()
