"""render.py: the Service, ConfigMap and pods a job becomes, checked field by field and against
the Kubernetes OpenAPI schema (kubernetes-validate, strict). Pure and fast."""

from __future__ import annotations

import copy
import json
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT
from llamajob import api, render
from llamajob.api import LlamaTrainingJob
from llamajob.catalogue import GIB, INSTANCE_TYPES
from llamajob.images import TRAINER_FAMILIES, with_trainer_image
from llamajob.jobfile import JobFileError, load_job, parse_job
from llamajob.plan import HOST_MEMORY_PER_RANK_GIB, make_plan, quantity
from llamajob.render_cli import main as render_main
from llamajob_trainer import protocol
from llamajob_trainer.config import TrainerConfig

K8S_VERSION = "1.31.0"
UID = "0b9f4d1e-7d4e-4b43-9d4f-5a1d2c3b4a5f"


# The examples set no spec.cluster.image; the operator gives them its --trainer-image.
TRAINER_IMAGES = {f: f"registry.example/llamajob-trainer:0.1.0-{f}" for f in TRAINER_FAMILIES}
TRAINER_IMAGE_ARGS = [f"--trainer-image={f}={image}" for f, image in TRAINER_IMAGES.items()]


def example(name: str, uid: str | None = UID, **cluster: Any) -> LlamaTrainingJob:
    """An example job as the operator sees it: with its trainer image filled in."""
    obj = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    obj["spec"].setdefault("cluster", {}).update(cluster)
    if uid:
        obj["metadata"]["uid"] = uid
        obj["metadata"]["namespace"] = "training"
    job, missing = with_trainer_image(parse_job(obj), TRAINER_IMAGES)
    assert missing is None
    return job


def env_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def valid_k8s(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- the 70B example: 16 pods on trn1 -----------------------------------------------------------
@pytest.fixture(scope="module")
def job70() -> LlamaTrainingJob:
    return example("llama3-70b")


@pytest.fixture(scope="module")
def gang70(job70: LlamaTrainingJob) -> list[dict[str, Any]]:
    return render.render_gang(job70, make_plan(job70.spec), render.ROLE_TRAIN, 1)


def test_70b_renders_service_configmap_and_both_gangs(job70: LlamaTrainingJob) -> None:
    docs = render.render_all(job70)
    kinds = [d["kind"] for d in docs]
    assert kinds[:2] == ["Service", "ConfigMap"]
    pods = docs[2:]
    assert len(pods) == 32 and {d["kind"] for d in pods} == {"Pod"}
    names = [p["metadata"]["name"] for p in pods]
    assert names[:16] == [f"llama3-70b-compile-a1-{r}" for r in range(16)]
    assert names[16:] == [f"llama3-70b-train-a1-{r}" for r in range(16)]
    assert len(set(names)) == 32


def test_70b_training_pod_resources_requests_equal_limits(gang70: list[dict[str, Any]]) -> None:
    assert len(gang70) == 16
    for pod in gang70:
        res = container(pod)["resources"]
        assert (
            res["requests"]
            == res["limits"]
            == {
                "aws.amazon.com/neuron": 16,
                "vpc.amazonaws.com/efa": 8,
                "cpu": "115",  # 90% of the trn1.32xlarge's 128 vCPUs
                "memory": "460Gi",  # and of its 512 GiB
            }
        )
        assert qos_class(pod) == "Guaranteed"


@pytest.mark.parametrize(
    ("instance", "neuron", "efa"),
    [("ml.trn1.32xlarge", 16, 8), ("ml.trn1n.32xlarge", 16, 16), ("ml.trn2.48xlarge", 16, 16)],
)
def test_device_and_efa_counts_follow_the_catalogue(instance: str, neuron: int, efa: int) -> None:
    job = example("llama3-70b", instanceType=instance)
    # The example's TP 32 with kvReplicator 4 is an NxD layout, which trn2 may run too.
    job.spec.backend = "nxd"
    plan = make_plan(job.spec)
    assert plan.valid, plan.problems()
    res = container(render.render_pod(job, plan, "train", 1, 0))["resources"]
    devices = {k: v for k, v in res["limits"].items() if k not in ("cpu", "memory")}
    assert devices == {"aws.amazon.com/neuron": neuron, "vpc.amazonaws.com/efa": efa}
    assert res["requests"] == res["limits"]


def test_resource_names_overridable_and_cpu_memory_added() -> None:
    job = example(
        "llama3-70b",
        deviceResource="aws.amazon.com/neuroncore",
        efaResource="example.com/efa",
        cpu="120",
        memory="480Gi",
    )
    res = container(render.render_pod(job, make_plan(job.spec), "train", 1, 3))["resources"]
    expected = {
        "aws.amazon.com/neuroncore": 32,  # counted in cores (one per rank), not devices
        "example.com/efa": 8,
        "cpu": "120",
        "memory": "480Gi",
    }
    assert res["requests"] == res["limits"] == expected


# --- cpu and memory: Guaranteed QoS ------------------------------------------------------------
def qos_class(pod: dict[str, Any]) -> str:
    """The QoS class Kubernetes gives the pod (pkg/apis/core/helper/qos, GetPodQOS): only cpu and
    memory count. No container with a cpu or memory request or limit: BestEffort. Every
    container with cpu and memory limits, and requests (defaulted from limits when unset) equal
    to them: Guaranteed. Anything else: Burstable."""
    spec = pod["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    any_set, guaranteed = False, True
    for c in containers:
        res = c.get("resources", {})
        limits = {k: quantity(v) for k, v in res.get("limits", {}).items() if k in CPU_MEMORY}
        requests = {k: quantity(v) for k, v in res.get("requests", {}).items() if k in CPU_MEMORY}
        requests = {**limits, **requests}  # the API server defaults requests to limits
        limits = {k: v for k, v in limits.items() if v}
        requests = {k: v for k, v in requests.items() if v}
        any_set = any_set or bool(limits or requests)
        if set(limits) != CPU_MEMORY or requests != limits:
            guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


CPU_MEMORY = {"cpu", "memory"}


def test_qos_class_follows_kubernetes() -> None:
    def pod(*resources: dict[str, Any]) -> dict[str, Any]:
        return {"spec": {"containers": [{"resources": r} for r in resources]}}

    devices = {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 8}
    both = {"cpu": "2", "memory": "4Gi"}
    assert qos_class(pod({})) == "BestEffort"
    # Extended resources alone do not count: the pods this operator rendered until now.
    assert qos_class(pod({"requests": devices, "limits": devices})) == "BestEffort"
    assert qos_class(pod({"requests": both, "limits": both})) == "Guaranteed"
    assert qos_class(pod({"limits": both})) == "Guaranteed"  # requests default to limits
    assert qos_class(pod({"requests": {"cpu": "2", "memory": "4096Mi"},
                          "limits": both})) == "Guaranteed"  # equal as quantities
    assert qos_class(pod({"requests": both})) == "Burstable"  # no limits
    assert qos_class(pod({"requests": {"cpu": "1", "memory": "4Gi"},
                          "limits": both})) == "Burstable"
    assert qos_class(pod({"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}})) == (
        "Burstable"
    )
    assert qos_class(pod({"requests": both, "limits": both}, {})) == "Burstable"


# The default requests (= limits) per instance type: 90% of the node's vCPUs and memory, rounded
# down (catalogue.POD_SHARE_PERCENT); the host figures are the catalogue's [host] sources.
# None: no default (cpu is any machine; trn3's host figures are not published).
DEFAULT_CPU_MEMORY: dict[str, tuple[str, str] | None] = {
    "ml.trn1.32xlarge": ("115", "460Gi"),  # 128 vCPUs, 512 GiB
    "ml.trn1n.32xlarge": ("115", "460Gi"),  # 128, 512
    "ml.trn2.48xlarge": ("172", "1843Gi"),  # 192, 2,048
    "trn3.48xlarge": None,
    "ml.g5.8xlarge": ("28", "115Gi"),  # 32, 128
    "ml.g5.12xlarge": ("43", "172Gi"),  # 48, 192
    "ml.g5.24xlarge": ("86", "345Gi"),  # 96, 384
    "ml.g5.48xlarge": ("172", "691Gi"),  # 192, 768
    "ml.g6e.8xlarge": ("28", "230Gi"),  # 32, 256
    "ml.g6e.12xlarge": ("43", "345Gi"),  # 48, 384
    "ml.g6e.24xlarge": ("86", "691Gi"),  # 96, 768
    "ml.g6e.48xlarge": ("172", "1382Gi"),  # 192, 1,536
    "ml.p4d.24xlarge": ("86", "1036Gi"),  # 96, 1,152
    "ml.p4de.24xlarge": ("86", "1036Gi"),  # 96, 1,152
    "ml.p5.48xlarge": ("172", "1843Gi"),  # 192, 2,048
    "ml.p5e.48xlarge": ("172", "1843Gi"),
    "ml.p5en.48xlarge": ("172", "1843Gi"),
    "ml.p6-b200.48xlarge": ("172", "1843Gi"),
    "cpu": None,
}


def test_the_default_table_covers_the_catalogue() -> None:
    assert sorted(DEFAULT_CPU_MEMORY) == sorted(INSTANCE_TYPES)


@pytest.mark.parametrize("instance", sorted(DEFAULT_CPU_MEMORY))
def test_default_cpu_and_memory_make_pods_guaranteed(instance: str) -> None:
    job = _family_job(instance)
    plan = make_plan(job.spec)
    assert plan.valid, plan.problems()
    inst = INSTANCE_TYPES[instance]
    for role in render.ROLES:  # compile pods are sized as the training pods
        pod = render.render_pod(job, plan, role, 1, 0)
        res = container(pod).get("resources", {})
        default = DEFAULT_CPU_MEMORY[instance]
        if default is None:
            assert not {"cpu", "memory"} & set(res.get("limits", {}))
            assert qos_class(pod) == "BestEffort"
            continue
        cpu, memory = default
        assert res["requests"] == res["limits"]
        assert (res["limits"]["cpu"], res["limits"]["memory"]) == (cpu, memory)
        assert qos_class(pod) == "Guaranteed"
        # The node keeps at least 10% of each (kubelet reservations, daemonsets).
        assert inst.vcpus is not None and inst.host_memory_gib is not None
        assert quantity(cpu) <= inst.vcpus * Decimal("0.9")
        assert quantity(memory) <= inst.host_memory_gib * GIB * Decimal("0.9")
        # /dev/shm is memory-backed and charged to the limit: the default fits with room for
        # the ranks.
        (shm,) = [v for v in pod["spec"]["volumes"] if v["name"] == render.SHM_VOLUME]
        ranks = plan.processes_per_node
        room = quantity(memory) - ranks * HOST_MEMORY_PER_RANK_GIB * GIB
        assert quantity(shm["emptyDir"]["sizeLimit"]) <= room


@pytest.mark.parametrize("instance", ["cpu", "ml.trn1.32xlarge", "ml.p5.48xlarge", "trn3.48xlarge"])
def test_user_cpu_and_memory_override_the_defaults(instance: str) -> None:
    if instance not in INSTANCE_TYPES:
        pytest.skip(f"no {instance} in the catalogue")
    job = _family_job(instance)
    job.spec.cluster.cpu = "7500m"
    job.spec.cluster.memory = "300Gi"
    job.spec.cluster.shm_size = "8Gi"
    plan = make_plan(job.spec)
    assert plan.valid, plan.problems()
    for role in render.ROLES:
        pod = render.render_pod(job, plan, role, 1, 0)
        res = container(pod)["resources"]
        assert res["requests"] == res["limits"]
        assert (res["limits"]["cpu"], res["limits"]["memory"]) == ("7500m", "300Gi")
        assert qos_class(pod) == "Guaranteed"
    # One of the two: the other keeps its default (or none, where there is no default).
    job.spec.cluster.cpu = None
    res = container(render.render_pod(job, plan, "train", 1, 0))["resources"]
    assert res["limits"]["memory"] == "300Gi"
    default = DEFAULT_CPU_MEMORY[instance]
    assert res["limits"].get("cpu") == (default[0] if default else None)


def test_an_oversized_shm_is_an_invalid_spec_naming_the_fix() -> None:
    # The default limit on trn1 is 460Gi; 32 ranks keep 4 GiB each: 332Gi is left for /dev/shm.
    job = example("llama3-70b", shmSize="400Gi")
    with pytest.raises(JobFileError) as err:
        render.render_all(job)
    (problem,) = err.value.errors
    assert problem.field == "spec.cluster.shmSize"
    assert "460Gi" in problem.message and "at most 332Gi" in problem.message
    # At the limit it fits.
    assert make_plan(example("llama3-70b", shmSize="332Gi").spec).valid
    # A user's memory limit: the message offers both fixes.
    (problem,) = make_plan(example("llama3-70b", memory="150Gi").spec).problems()
    assert problem.field == "spec.cluster.shmSize"
    assert "150Gi (spec.cluster.memory)" in problem.message
    assert "at most 22Gi" in problem.message and "at least 192Gi" in problem.message
    # Without a memory limit (cpu, by default) /dev/shm is bounded by its sizeLimit alone.
    assert make_plan(example("tiny", shmSize="1Ti").spec).valid


def test_default_requests_fit_the_test_clusters_nodes() -> None:
    # tests/kube_cluster.py gives its fake Nodes the allocatable of each instance type it
    # schedules rendered pods on; the default requests must fit those.
    kube_cluster = pytest.importorskip("kube_cluster")
    for instance, allocatable in kube_cluster.ALLOCATABLE.items():
        job = _family_job(instance)
        requests = container(render.render_pod(job, make_plan(job.spec), "train", 1, 0))[
            "resources"]["requests"]
        for name, amount in requests.items():
            assert quantity(str(amount)) <= quantity(allocatable[name]), (instance, name)


def test_70b_command_is_torchrun_with_rendezvous_at_pod_0(gang70: list[dict[str, Any]]) -> None:
    master = "llama3-70b-train-a1-0.llama3-70b.training.svc"
    for rank, pod in enumerate(gang70):
        cmd = container(pod)["command"]
        assert cmd == [
            "torchrun",
            "--nnodes", "16",
            "--nproc_per_node", "32",
            "--node_rank", str(rank),
            "--master_addr", master,
            "--master_port", "29500",
            "-m", "llamajob.cli", "train", "--config", "/etc/llamajob/config.yaml",
        ]  # fmt: skip
        # The master name resolves only if hostname/subdomain match the headless Service.
        assert pod["spec"]["hostname"] == pod["metadata"]["name"]
        assert pod["spec"]["subdomain"] == "llama3-70b"


def nxd_compile_launcher(rank: int, nodes: int) -> list[str]:
    """The nxd compile pod's command up to torchrun: the compile marker follows the exit
    status of neuron_parallel_compile, so llamajob_trainer.compile runs it."""
    return ["python", "-m", "llamajob_trainer.compile", "--node", str(rank), "--nodes",
            str(nodes), "--config", render.CONFIG_PATH, "--", "neuron_parallel_compile",
            "torchrun"]


def test_compile_pods_run_under_neuron_parallel_compile(job70: LlamaTrainingJob) -> None:
    pod = render.render_pod(job70, make_plan(job70.spec), "compile", 2, 5)
    cmd = container(pod)["command"]
    assert cmd[:12] == nxd_compile_launcher(5, 16)
    assert cmd[cmd.index("--node_rank") + 1] == "5"
    assert cmd[cmd.index("--master_addr") + 1] == "llama3-70b-compile-a2-0.llama3-70b.training.svc"
    assert cmd[-3:] == ["compile", "--config", render.CONFIG_PATH]


def test_70b_env(gang70: list[dict[str, Any]], job70: LlamaTrainingJob) -> None:
    env = env_of(gang70[0])
    plain = {k: v["value"] for k, v in env.items() if "value" in v}
    assert plain["FI_PROVIDER"] == "efa"
    assert plain["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert plain["FI_EFA_FORK_SAFE"] == "1"
    assert plain["NEURON_RT_NUM_CORES"] == "1"
    assert "--cache_dir=/fsx/neuron-cache" in plain["NEURON_CC_FLAGS"].split()
    # A pipeline layout (TP 32, PP 8): NxD's 70B pipeline script's depth.
    assert plain["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "7"
    assert plain["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
    assert plain["CCOM_SOCKET_IFNAME"] == "eth0"
    assert plain["MALLOC_ARENA_MAX"] == "64"
    assert plain[protocol.TERMINATION_LOG_ENV] == protocol.DEFAULT_TERMINATION_LOG
    assert plain[protocol.CONFIG_ENV] == render.CONFIG_PATH
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    assert len(env) == len(container(gang70[0])["env"])  # each name once


def test_grace_period_covers_the_save_on_sigterm() -> None:
    """The pod's grace period is checkpoint.terminateGraceSeconds, and torchrun (which
    forwards SIGTERM to the ranks) waits almost as long before it SIGKILLs them."""
    for grace, expected in ((None, 300), (900, 900)):
        obj = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
        if grace is not None:
            obj["spec"]["checkpoint"]["terminateGraceSeconds"] = grace
        job = parse_job(obj)
        pod = render.render_pod(job, make_plan(job.spec), "train", 0, 0)
        assert pod["spec"]["terminationGracePeriodSeconds"] == expected
        timeout = int(env_of(pod)[render.SHUTDOWN_TIMEOUT_ENV]["value"])
        assert expected - 30 < timeout < expected


def test_user_env_overrides_ours_and_secrets_stay_references() -> None:
    job = example(
        "llama3-70b",
        env=[{"name": "MALLOC_ARENA_MAX", "value": "8"}, {"name": "EXTRA", "value": "x"}],
        secrets=[{"name": "WANDB_API_KEY", "secretName": "wandb", "key": "api-key"}],
    )
    pod = render.render_pod(job, make_plan(job.spec), "train", 1, 0)
    env = env_of(pod)
    names = [e["name"] for e in container(pod)["env"]]
    assert names.count("MALLOC_ARENA_MAX") == 1 and env["MALLOC_ARENA_MAX"]["value"] == "8"
    assert env["EXTRA"]["value"] == "x"
    assert env["WANDB_API_KEY"] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}},
    }


def test_secret_values_are_never_rendered(job70: LlamaTrainingJob) -> None:
    """The job only names Secrets; every occurrence of a secret env var in every object is a
    secretKeyRef, and no object carries a `value` for it or embeds Secret data."""
    docs = render.render_all(job70)
    secret_names = {s.name for s in job70.spec.cluster.secrets}
    seen = 0
    for doc in docs:
        assert doc["kind"] != "Secret"
        for c in doc.get("spec", {}).get("containers", []):
            for e in c["env"]:
                if e["name"] in secret_names:
                    seen += 1
                    assert set(e) == {"name", "valueFrom"}
                    assert set(e["valueFrom"]) == {"secretKeyRef"}
    assert seen == 32
    config = yaml.safe_load(docs[1]["data"]["config.yaml"])
    assert "secrets" not in json.dumps(config) and "hf-token" not in json.dumps(config)


def test_70b_node_selection_and_scheduling(gang70: list[dict[str, Any]]) -> None:
    spec = gang70[0]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "ml.trn1.32xlarge",
        "sagemaker.amazonaws.com/node-health-status": "Schedulable",
    }
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti == [
        {
            "labelSelector": {
                "matchLabels": {
                    "llamajob.dev/job": "llama3-70b",
                    "llamajob.dev/role": "train",
                    "llamajob.dev/attempt": "1",
                }
            },
            "topologyKey": "kubernetes.io/hostname",
        }
    ]
    assert "nodeAffinity" not in spec["affinity"]
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


def test_plain_eks_selects_the_ec2_instance_type_without_the_health_label() -> None:
    job = example("llama3-70b", hyperpod=False)
    pod = render.render_pod(job, make_plan(job.spec), "train", 1, 0)
    assert pod["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "trn1.32xlarge"}
    # Without the HyperPod agent, a node is judged by its Ready condition alone.
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert render.node_health("n", ready).healthy
    not_ready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    assert not render.node_health("n", not_ready).healthy


def test_faulty_nodes_are_avoided_by_node_name_when_others_fit(job70: LlamaTrainingJob) -> None:
    plan = make_plan(job70.spec)
    gang = render.render_gang(job70, plan, "train", 3, avoid_nodes=["node-b", "node-a", "node-b"])
    for pod in gang:
        node_affinity = pod["spec"]["affinity"]["nodeAffinity"]
        # Preferred only: a repaired node is used again when the gang fits nowhere else.
        assert list(node_affinity) == ["preferredDuringSchedulingIgnoredDuringExecution"]
        assert node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] == [
            {
                "weight": 100,
                "preference": {
                    "matchFields": [
                        {"key": "metadata.name", "operator": "NotIn",
                         "values": ["node-a", "node-b"]}
                    ]
                },
            }
        ]


def test_unschedulable_pod_is_read_with_the_schedulers_message() -> None:
    job = example("llama3-8b")
    pod = render.render_pod(job, make_plan(job.spec), "train", 1, 0)
    message = "0/3 nodes are available: 3 Insufficient aws.amazon.com/neuron."
    pod["status"] = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": message}]}
    observed = render.observed_pod(pod)
    assert observed is not None and observed.unschedulable == message
    pod["status"]["conditions"][0] = {"type": "PodScheduled", "status": "True"}
    observed = render.observed_pod(pod)
    assert observed is not None and observed.unschedulable is None


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        ({"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:1"'},
         'ImagePullBackOff: Back-off pulling image "x:1"'),
        ({"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'},
         'CreateContainerConfigError: secret "hf" not found'),
        ({"reason": "InvalidImageName"}, "InvalidImageName"),
        ({"reason": "ContainerCreating"}, None),  # on its way
        ({}, None),
    ],
)
def test_container_that_cannot_start_is_read_with_the_kubelets_reason(
    waiting: dict[str, str], expected: str | None
) -> None:
    job = example("llama3-8b")
    pod = render.render_pod(job, make_plan(job.spec), "train", 1, 0)
    pod["status"] = {"phase": "Pending", "containerStatuses": [
        {"name": render.CONTAINER, "state": {"waiting": waiting}}]}
    observed = render.observed_pod(pod)
    assert observed is not None and observed.not_starting == expected


def test_spec_node_selector_and_tolerations_are_added() -> None:
    job = example(
        "llama3-70b",
        nodeSelector={"team": "llm", "node.kubernetes.io/instance-type": "trn1.32xlarge"},
        tolerations=[
            {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
        ],
        serviceAccountName="trainer",
        priorityClassName="high",
    )
    spec = render.render_pod(job, make_plan(job.spec), "train", 1, 0)["spec"]
    # The user's value wins (plain EKS nodes carry the name without the ml. prefix).
    assert spec["nodeSelector"]["node.kubernetes.io/instance-type"] == "trn1.32xlarge"
    assert spec["nodeSelector"]["team"] == "llm"
    assert spec["nodeSelector"]["sagemaker.amazonaws.com/node-health-status"] == "Schedulable"
    assert spec["tolerations"][0] == {
        "key": "dedicated",
        "operator": "Equal",
        "value": "llm",
        "effect": "NoSchedule",
    }
    assert spec["serviceAccountName"] == "trainer" and spec["priorityClassName"] == "high"


def test_pod_labels_annotations_and_scheduler_reach_both_roles() -> None:
    job = example(
        "llama3-70b",
        podLabels={"team": "llm", "kueue.x-k8s.io/queue-name": "training"},
        podAnnotations={"karpenter.sh/do-not-disrupt": "true", "note": "free text: any value"},
        schedulerName="volcano",
    )
    plan = make_plan(job.spec)
    for role in (render.ROLE_COMPILE, render.ROLE_TRAIN):
        pod = render.render_pod(job, plan, role, 2, 3)
        meta = pod["metadata"]
        assert meta["labels"]["team"] == "llm"
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "training"
        assert meta["labels"] == {**meta["labels"], **render.labels(
            job, role, 2, 3, render.spec_revision(job))}  # ours all there, unchanged
        assert meta["annotations"] == {"karpenter.sh/do-not-disrupt": "true",
                                       "note": "free text: any value"}
        assert pod["spec"]["schedulerName"] == "volcano"
        valid_k8s(pod)
    # Without them, nothing extra is rendered.
    plain = render.render_pod(example("llama3-70b"), plan, render.ROLE_TRAIN, 1, 0)
    assert "annotations" not in plain["metadata"] and "schedulerName" not in plain["spec"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("podLabels", {"llamajob.dev/job": "x"}, "keys under llamajob.dev/ are set by the"),
        ("podAnnotations", {"llamajob.dev/revision": "x"}, "are set by the operator"),
        ("podLabels", {"team": "a b"}, "value 'a b' of 'team': at most 63 letters"),
        ("podLabels", {"Example.com/team": "a"}, "the prefix before '/' must be a DNS subdomain"),
        ("podAnnotations", {"-x": "1"}, "key '-x': the name must be 1-63 letters"),
        ("nodeSelector", {"zone": "x" * 64}, "at most 63"),
    ],
)
def test_bad_label_and_annotation_keys_are_refused_with_the_rule(
    field: str, value: dict[str, str], message: str
) -> None:
    """A key or value Kubernetes would refuse fails the job up front, naming the field, instead
    of every pod creation failing."""
    with pytest.raises(JobFileError) as err:
        example("llama3-70b", **{field: value})
    assert [e.field for e in err.value.errors] == [f"spec.cluster.{field}"]
    assert message in err.value.errors[0].message


def test_volumes_shm_config_and_claims(
    gang70: list[dict[str, Any]], job70: LlamaTrainingJob
) -> None:
    pod = gang70[7]
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["llamajob-shm"] == {
        "name": "llamajob-shm",
        "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"},
    }
    revision = pod["metadata"]["labels"]["llamajob.dev/revision"]
    assert revision == render.spec_revision(job70)
    assert vols["llamajob-config"]["configMap"] == {"name": f"llama3-70b-config-{revision}"}
    assert vols["fsx"]["persistentVolumeClaim"] == {"claimName": "fsx-claim"}
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    assert mounts == {"/dev/shm": "llamajob-shm", "/etc/llamajob": "llamajob-config", "/fsx": "fsx"}


def test_container_contract(gang70: list[dict[str, Any]]) -> None:
    c = container(gang70[0])
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["terminationMessagePath"] == protocol.DEFAULT_TERMINATION_LOG
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9400, "rendezvous": 29500}
    assert c["image"] == TRAINER_IMAGES["trn1"]  # the nxd backend's image


def test_labels_and_owner_references(
    gang70: list[dict[str, Any]], job70: LlamaTrainingJob
) -> None:
    rank0 = gang70[0]["metadata"]
    assert rank0["labels"] == {
        "app.kubernetes.io/name": "llamajob",
        "app.kubernetes.io/instance": "llama3-70b",
        "app.kubernetes.io/component": "train",
        "llamajob.dev/job": "llama3-70b",
        "llamajob.dev/role": "train",
        "llamajob.dev/attempt": "1",
        "llamajob.dev/rank": "0",
        "llamajob.dev/revision": render.spec_revision(job70),
    }
    assert rank0["namespace"] == "training"
    assert rank0["ownerReferences"] == [
        {
            "apiVersion": "llamajob.dev/v1alpha1",
            "kind": "LlamaTrainingJob",
            "name": "llama3-70b",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # Only one pod per job carries what the chart's PodMonitor selects (role=train, rank=0).
    monitored = [
        p for p in gang70
        if p["metadata"]["labels"]["llamajob.dev/role"] == "train"
        and p["metadata"]["labels"]["llamajob.dev/rank"] == "0"
    ]  # fmt: skip
    assert len(monitored) == 1


def test_offline_render_has_no_owner_references() -> None:
    job = example("tiny", uid=None)
    for doc in render.render_all(job):
        assert "ownerReferences" not in doc["metadata"]


def test_service_is_headless_and_selects_every_pod_of_the_job(
    job70: LlamaTrainingJob, gang70: list[dict[str, Any]]
) -> None:
    svc = render.render_service(job70)
    assert svc["metadata"]["name"] == gang70[0]["spec"]["subdomain"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [
        {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
    ]
    selector = svc["spec"]["selector"].items()
    compile_pod = render.render_pod(job70, make_plan(job70.spec), "compile", 1, 0)
    for pod in [*gang70, compile_pod]:
        assert selector <= pod["metadata"]["labels"].items()
    other = example("llama3-8b")
    assert not selector <= render.labels(other, "train", 1, 0).items()


def test_configmap_holds_the_trainer_config(job70: LlamaTrainingJob) -> None:
    cm = render.render_configmap(job70, make_plan(job70.spec))
    revision = render.spec_revision(job70)
    assert cm["metadata"]["name"] == f"llama3-70b-config-{revision}"
    assert cm["metadata"]["labels"]["llamajob.dev/revision"] == revision
    cfg = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.job_name == "llama3-70b" and cfg.namespace == "training"
    assert cfg.resolved_backend == "nxd"
    assert cfg.peak_tflops_per_core == pytest.approx(3040 / 32)
    assert cfg.image == TRAINER_IMAGES["trn1"]
    assert cfg.metrics_port == 9400
    assert cfg.parallelism.tensor == 32 and cfg.parallelism.pipeline == 8
    assert cfg.max_steps == 1000 and cfg.checkpoint.dir == "/fsx/checkpoints/llama3-70b"


def test_spec_revision_follows_every_edit_but_the_restart_policy(job70: LlamaTrainingJob) -> None:
    def edited(**changes: Any) -> LlamaTrainingJob:
        spec = job70.spec.model_copy(update=changes)
        return job70.model_copy(update={"spec": spec})

    base = render.spec_revision(job70)
    policy = job70.spec.restart_policy.model_copy(update={"max_restarts": 99})
    assert render.spec_revision(edited(restart_policy=policy)) == base
    # Identity is not part of the spec: two jobs with one spec share a revision, not a name.
    renamed = job70.model_copy(update={"metadata": job70.metadata.model_copy(update={"name": "x"})})
    assert render.spec_revision(renamed) == base
    assert render.configmap_name("x", base) != render.configmap_name("llama3-70b", base)
    cluster = job70.spec.cluster.model_copy(update={"image": "ghcr.io/llamajob/trainer:0.2.0"})
    checkpoint = job70.spec.checkpoint.model_copy(update={"every_steps": 7})
    revisions = {
        render.spec_revision(edited(max_steps=2000)),
        render.spec_revision(edited(cluster=cluster)),
        render.spec_revision(edited(checkpoint=checkpoint)),
    }
    assert len(revisions) == 3 and base not in revisions


@pytest.mark.parametrize("name", ["llama3-70b", "tiny"])
def test_manifests_pass_strict_kubernetes_schema(name: str) -> None:
    job = example(name, cpu="4", memory="8Gi")
    plan = make_plan(job.spec)
    docs = [
        render.render_service(job),
        render.render_configmap(job, plan),
        render.render_pod(job, plan, "compile", 1, 0),
        render.render_pod(job, plan, "train", 4, 0, avoid_nodes=["ip-10-0-0-1"]),
    ]
    for doc in docs:
        valid_k8s(doc)


# --- the tiny example: CPU ----------------------------------------------------------------------
def test_tiny_cpu_pod_has_no_accelerator_parts() -> None:
    job = example("tiny")
    plan = make_plan(job.spec)
    pod = render.render_pod(job, plan, "train", 1, 0)
    c = container(pod)
    assert "resources" not in c
    env = env_of(pod)
    assert not [n for n in env if n.startswith(("FI_", "NEURON_"))]
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]
    assert c["command"][:7] == [
        "torchrun",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--node_rank",
        "0",
    ]
    compile_cmd = container(render.render_pod(job, plan, "compile", 1, 0))["command"]
    assert compile_cmd[0] == "torchrun"  # no neuron_parallel_compile off Trainium
    cfg = render.trainer_config(job, plan)
    assert cfg.resolved_backend == "torch" and cfg.peak_tflops_per_core is None


def test_render_all_rejects_invalid_jobs() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["spec"]["parallelism"]["tensor"] = 3
    with pytest.raises(JobFileError) as err:
        render.render_all(parse_job(obj))
    assert err.value.errors[0].field == "spec.parallelism.tensor"
    assert "nearest valid" in err.value.errors[0].message


def test_rank_outside_the_gang_is_refused() -> None:
    job = example("tiny")
    with pytest.raises(ValueError, match="outside the gang"):
        render.render_pod(job, make_plan(job.spec), "train", 1, 1)


# --- names ------------------------------------------------------------------------------------
def test_pod_names_are_dns_labels_even_for_long_or_dotted_job_names() -> None:
    long_a = "a" * 70 + "-x"
    long_b = "a" * 70 + "-y"
    for job_name in [long_a, long_b, "llama.v2", "7b-run"]:
        for attempt in (1, 999):
            name = render.pod_name(job_name, "compile", attempt, 1023)
            assert len(name) <= 63
            assert name.endswith(f"-compile-a{attempt}-1023")
            assert all(ch.isalnum() or ch == "-" for ch in name) and name[0].isalnum()
            assert name == render.pod_name(job_name, "compile", attempt, 1023)  # deterministic
    assert render.pod_name(long_a, "train", 1, 0) != render.pod_name(long_b, "train", 1, 0)
    assert render.pod_name("llama.v2", "train", 1, 0) != render.pod_name("llama-v2", "train", 1, 0)
    assert render.pod_name("short", "train", 2, 3) == "short-train-a2-3"
    assert render.service_name("7b-run")[0].isalpha()
    assert render.service_name("short") == "short"
    assert len(render.label_value("b" * 100)) <= 63


def test_long_job_name_renders_a_valid_pod() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    obj["metadata"]["name"] = "pretrain-" + "x" * 80
    obj["metadata"]["uid"] = UID
    job = parse_job(obj)
    pod = render.render_pod(job, make_plan(job.spec), "train", 1, 0)
    valid_k8s(pod)
    valid_k8s(render.render_service(job))
    assert pod["spec"]["subdomain"] == render.render_service(job)["metadata"]["name"]


# --- reading Kubernetes objects back --------------------------------------------------------------
def _k8s_pod(**status: Any) -> dict[str, Any]:
    job = example("tiny")
    pod = copy.deepcopy(render.render_pod(job, make_plan(job.spec), "train", 2, 0))
    pod["spec"]["nodeName"] = "node-1"
    pod["status"] = status
    return pod


def test_observed_pod_reads_exit_code_and_termination_message() -> None:
    msg = json.dumps({"reason": "ConfigError", "permanent": True, "message": "bad tokenizer"})
    pod = _k8s_pod(
        phase="Failed",
        podIP="10.0.0.5",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {"terminated": {"exitCode": 78, "reason": "Error", "message": msg}},
            }
        ],
    )
    pod["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    seen = render.observed_pod(pod)
    assert seen is not None
    assert (seen.name, seen.role, seen.attempt, seen.rank) == ("tiny-train-a2-0", "train", 2, 0)
    assert (seen.phase, seen.node, seen.exit_code, seen.reason) == ("Failed", "node-1", 78, "Error")
    assert seen.termination_message == {
        "reason": "ConfigError",
        "permanent": True,
        "message": "bad tokenizer",
    }
    assert seen.deleting is True and seen.ip == "10.0.0.5"


def test_observed_pod_prefers_the_pod_reason_and_disruption_target() -> None:
    evicted = render.observed_pod(_k8s_pod(phase="Failed", reason="Evicted"))
    assert evicted is not None and evicted.reason == "Evicted"
    gc = _k8s_pod(
        phase="Running",
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByPodGC"}],
    )
    seen = render.observed_pod(gc)
    assert seen is not None and seen.reason == "NodeGone"
    assert render.observed_pod({"metadata": {"name": "unrelated", "labels": {}}}) is None


def test_node_health_from_hyperpod_label_and_ready_condition() -> None:
    def node(label: str | None, ready: str = "True") -> dict[str, Any]:
        labels = {} if label is None else {render.HYPERPOD_HEALTH_LABEL: label}
        return {
            "metadata": {"name": "n", "labels": labels},
            "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "KubeletDown"}]},
        }

    assert render.node_health("n", node("Schedulable")).healthy
    assert render.node_health("n", node(None)).healthy  # plain EKS: Ready decides
    bad = render.node_health("n", node("UnschedulablePendingReplacement"))
    assert not bad.healthy and bad.reason == "UnschedulablePendingReplacement"
    not_ready = render.node_health("n", node("Schedulable", ready="Unknown"))
    assert not not_ready.healthy and "NotReady" in not_ready.reason
    gone = render.node_health("n", None)
    assert not gone.healthy and gone.reason == render.NODE_GONE


# --- llamajob render --------------------------------------------------------------------------
def test_render_cli_prints_a_yaml_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert render_main([str(ROOT / "examples" / "llama3-70b.yaml"), "--role", "train",
                        *TRAINER_IMAGE_ARGS]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap"] + ["Pod"] * 16
    cfg = yaml.safe_load(docs[1]["data"]["config.yaml"])
    assert cfg["resolvedBackend"] == "nxd"


def test_render_cli_invalid_job_exits_2_with_the_planner_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-8b.yaml").read_text())
    obj["spec"]["parallelism"]["tensor"] = 8  # does not fit in 16 GiB per core
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(obj))
    assert render_main([str(bad), *TRAINER_IMAGE_ARGS]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "error: spec.parallelism:" in out.err and "GiB" in out.err


@pytest.mark.parametrize(("name", "family"), [("llama3-8b", "trn1"), ("llama3-8b-trn2", "neuron"),
                                              ("llama3-8b-p5", "cuda"), ("tiny", "cuda")])
def test_render_cli_refuses_a_job_without_an_image(
    name: str, family: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No image is published, so there is no default: the job's own, or --trainer-image, which
    follows the operator's rule (an image per Dockerfile trainer target)."""
    path = str(ROOT / "examples" / f"{name}.yaml")
    assert render_main([path]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    [line] = out.err.splitlines()
    assert line.startswith("error: spec.cluster.image: no trainer image")
    build = (f"docker build --target trainer-{family} "
             f"-t <registry>/llamajob-trainer:0.1.0-{family} .")
    assert build in line
    assert "trainerImage.repository" in line and f"--trainer-image {family}=IMAGE" in line
    # The family's image, or one for every family; the job's own image wins over both.
    for args, image in [(["--trainer-image", f"{family}=r.example/a:1"], "r.example/a:1"),
                        (["--trainer-image", "r.example/b:2"], "r.example/b:2")]:
        assert render_main([path, "--role", "train", *args]) == 0
        pods = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "Pod"]
        assert {container(p)["image"] for p in pods} == {image}
    other = next(f for f in TRAINER_FAMILIES if f != family)
    assert render_main([path, "--trainer-image", f"{other}=r.example/c:3"]) == 2
    assert "spec.cluster.image" in capsys.readouterr().err


def test_an_image_in_the_job_is_kept_and_keys_the_compile() -> None:
    job = example("llama3-8b", image="registry.example/mine:7")
    assert job.spec.cluster.image == "registry.example/mine:7"
    plan = make_plan(job.spec)
    pod = render.render_pod(job, plan, "train", 1, 0)
    assert container(pod)["image"] == "registry.example/mine:7"
    # The compile key is the resolved image's: another default image is another key.
    other, _ = with_trainer_image(
        parse_job(yaml.safe_load((ROOT / "examples" / "llama3-8b.yaml").read_text())),
        {"trn1": "registry.example/other:1"})
    assert job.spec.compile_key(plan.backend, job.spec.cluster.image, plan.device) != (
        other.spec.compile_key(plan.backend, other.spec.cluster.image, plan.device))


def test_render_cli_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert render_main([str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_llamajob_render_console_script(llamajob_bin: str) -> None:
    res = subprocess.run(
        [llamajob_bin, "render", str(ROOT / "examples" / "tiny.yaml"), *TRAINER_IMAGE_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all(res.stdout))
    revision = render.spec_revision(example("tiny"))
    assert [d["metadata"]["name"] for d in docs] == [
        "tiny",
        f"tiny-config-{revision}",
        "tiny-compile-a1-0",
        "tiny-train-a1-0",
    ]
    assert load_job(ROOT / "examples" / "tiny.yaml").metadata.name == "tiny"


def test_process_restarts_use_c10d_with_addresses_that_sort_by_rank() -> None:
    obj = yaml.safe_load((ROOT / "examples" / "llama3-70b.yaml").read_text())
    # Long enough that pod names are shortened, by one character more from rank 10 on.
    name = "llama3-70b-continued-pretraining-on-the-support-corpus"
    obj["metadata"].update(name=name, namespace="training", uid=UID)
    obj["spec"]["restartPolicy"]["processRestarts"] = 2
    job = parse_job(obj)
    plan = make_plan(job.spec)
    gang = render.render_gang(job, plan, render.ROLE_TRAIN, 3)
    assert len(gang) == 16
    names = [pod["metadata"]["name"] for pod in gang]
    assert sorted(names) != names  # why c10d cannot be given the pod names
    addresses = [container(p)["command"][container(p)["command"].index("--local-addr") + 1]
                 for p in gang]
    # c10d numbers the nodes in the sorted order of their addresses: node rank = pod index.
    assert sorted(addresses) == addresses and len(set(addresses)) == 16
    service = render.service_name(name)
    for rank, pod in enumerate(gang):
        spec = pod["spec"]
        assert spec["hostname"] == f"train-a3-n{rank:04d}" and spec["subdomain"] == service
        assert addresses[rank] == f"{spec['hostname']}.{service}.training.svc"
        assert container(pod)["command"] == [
            "torchrun",
            "--nnodes", "16",
            "--nproc_per_node", "32",
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{addresses[0]}:29500",
            "--rdzv-id", f"{service}-train-a3",
            "--rdzv-conf", f"is_host={int(rank == 0)},join_timeout=1800,read_timeout=1800",
            "--local-addr", addresses[rank],
            "--max-restarts", "2",
            "-m", "llamajob.cli", "train", "--config", "/etc/llamajob/config.yaml",
        ]  # fmt: skip
        assert env_of(pod)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"
        valid_k8s(pod)
    # The compile gang keeps the static rendezvous and the pod names as hostnames.
    compile_pod = render.render_pod(job, plan, render.ROLE_COMPILE, 1, 3)
    assert "--node_rank" in container(compile_pod)["command"]
    assert compile_pod["spec"]["hostname"] == compile_pod["metadata"]["name"]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env_of(compile_pod)


def test_process_restarts_change_the_revision_only_when_set() -> None:
    job = example("llama3-70b")
    base = render.spec_revision(job)

    def with_restarts(n: int) -> LlamaTrainingJob:
        policy = job.spec.restart_policy.model_copy(update={"process_restarts": n})
        spec = job.spec.model_copy(update={"restart_policy": policy})
        return job.model_copy(update={"spec": spec})

    assert render.spec_revision(with_restarts(0)) == base  # jobs without it keep their revision
    revisions = {render.spec_revision(with_restarts(n)) for n in (1, 2)}
    assert len(revisions) == 2 and base not in revisions


# --- pods per instance family -------------------------------------------------------------------
# What the device adds to the container environment on each family (the rest is the same
# everywhere: the config path, termination log, shutdown timeout).
NXD_ENV = {"NEURON_RT_NUM_CORES", "NEURON_CC_FLAGS", "NEURON_COMPILE_CACHE_URL",
           "NEURON_FUSE_SOFTMAX", "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS",
           "XLA_DISABLE_FUNCTIONALIZATION", "CCOM_SOCKET_IFNAME"}
EFA_ENV = {"FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE"}
NCCL_EFA_ENV = {"FI_PROVIDER", "FI_EFA_FORK_SAFE", "FI_EFA_USE_HUGE_PAGE",
                "FI_EFA_SET_CUDA_SYNC_MEMOPS", "NCCL_SOCKET_IFNAME"}
BASE_ENV = {protocol.CONFIG_ENV, protocol.TERMINATION_LOG_ENV, render.SHUTDOWN_TIMEOUT_ENV}
CACHE = "/fsx/compile-cache"


def _family_job(instance: str, nodes: int = 2) -> LlamaTrainingJob:
    """The tiny model on ``nodes`` nodes of ``instance``, one rank per core or GPU, no
    accumulation: a layout every family can plan, so only the device varies."""
    obj = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    inst = INSTANCE_TYPES[instance]
    obj["metadata"].update(name="family", namespace="training", uid=UID)
    # HyperPod names its types ml.*; others (trn3) run on plain EKS nodes.
    obj["spec"]["cluster"] = {"nodes": nodes, "instanceType": instance,
                              "image": "registry.example/trainer:1",
                              "hyperpod": instance.startswith("ml.")}
    obj["spec"]["compile"]["cacheDir"] = CACHE
    obj["spec"]["precision"] = "bf16-mixed"
    obj["spec"]["batch"] = {"microBatchSize": 1,
                            "globalBatchSize": nodes * inst.cores_per_node}
    obj["spec"].pop("validation")  # its held-out sequences must be a multiple of the batch
    return parse_job(obj)


def _trn3() -> str | None:
    return next((n for n, i in INSTANCE_TYPES.items() if i.family == "trn3"), None)


def _row(name: str | None, *values: Any, family: str = "") -> Any:
    """A table row, skipped while the catalogue has no such instance type."""
    if name is not None and name in INSTANCE_TYPES:
        return pytest.param(name, *values, id=name)
    return pytest.param(name, *values, id=family or str(name), marks=pytest.mark.skip(
        reason=f"no {family or name} instance type in the catalogue"))


# instance, trainer backend, device, process-group backend, device resource and count per pod,
# EFA per pod, ranks per node (torchrun --nproc_per_node), device environment.
# None where the figure is the catalogue's own (trn3's sizes; g5's EFA, which AWS lists for the
# larger g5 sizes only): the row then checks that render follows the catalogue.
FAMILIES = [
    _row("ml.trn1.32xlarge", "nxd", "neuron", "xla", ("aws.amazon.com/neuron", 16), 8, 32,
         EFA_ENV | NXD_ENV | {"MALLOC_ARENA_MAX"}),
    _row("ml.trn2.48xlarge", "torch", "neuron", "neuron", ("aws.amazon.com/neuron", 16), 16, 64,
         EFA_ENV | {"NEURON_LOGICAL_NC_CONFIG", "TORCH_NEURONX_NEFF_CACHE_DIR",
                    "MALLOC_ARENA_MAX"}),
    _row(_trn3(), "torch", "neuron", "neuron", ("aws.amazon.com/neuron", None), None, None,
         {"NEURON_LOGICAL_NC_CONFIG", "TORCH_NEURONX_NEFF_CACHE_DIR", "MALLOC_ARENA_MAX"},
         family="trn3"),
    _row("ml.p5.48xlarge", "torch", "cuda", "nccl", ("nvidia.com/gpu", 8), 32, 8,
         NCCL_EFA_ENV | {"FI_EFA_USE_DEVICE_RDMA", "PYTORCH_CUDA_ALLOC_CONF"}),
    _row("ml.g5.12xlarge", "torch", "cuda", "nccl", ("nvidia.com/gpu", 4), None, 4,
         {"PYTORCH_CUDA_ALLOC_CONF"}),
    _row("cpu", "torch", "cpu", "gloo", None, 0, 2, set()),
]


@pytest.mark.parametrize(
    ("instance", "backend", "device", "process_group", "accelerator", "efa", "nproc", "device_env"),
    FAMILIES,
)
def test_pods_per_instance_family(
    instance: str,
    backend: str,
    device: str,
    process_group: str,
    accelerator: tuple[str, int | None] | None,
    efa: int | None,
    nproc: int | None,
    device_env: set[str],
) -> None:
    from llamajob_trainer.parallel import device as devices

    inst = INSTANCE_TYPES[instance]
    efa = inst.efa_devices if efa is None else efa
    nproc = inst.cores_per_node if nproc is None else nproc
    if inst.efa_devices and not device_env & {"FI_PROVIDER"}:
        # The catalogue gives this type EFA: then NCCL or the Neuron collectives use it.
        device_env = device_env | (EFA_ENV if inst.trainium else NCCL_EFA_ENV)
    job = _family_job(instance)
    plan = make_plan(job.spec)
    assert plan.valid, plan.problems()

    # The trainer learns backend and device from the ConfigMap; the process group follows.
    cfg = TrainerConfig.model_validate(
        yaml.safe_load(render.render_configmap(job, plan)["data"][render.CONFIG_KEY]))
    assert (cfg.resolved_backend, cfg.device) == (backend, device)
    assert (devices.KINDS[device].process_group if backend == "torch" else "xla") == process_group
    if device == "cpu":
        assert cfg.peak_tflops_per_core is None  # measured by the trainer
    else:
        assert cfg.peak_tflops_per_core == pytest.approx(inst.peak_tflops_per_core)

    for role in render.ROLES:
        pod = render.render_pod(job, plan, role, 1, 1)
        c = container(pod)
        limits = c.get("resources", {}).get("limits", {})
        expected: dict[str, int] = {}
        if accelerator is not None:
            name, count = accelerator
            expected[name] = inst.devices_per_node if count is None else count
        if efa:
            expected["vpc.amazonaws.com/efa"] = efa
        default = DEFAULT_CPU_MEMORY[instance]
        if default is not None:
            expected.update(cpu=default[0], memory=default[1])
        assert limits == expected
        if expected:
            assert c["resources"]["requests"] == limits
        assert qos_class(pod) == ("Guaranteed" if default else "BestEffort")

        cmd = c["command"]
        assert cmd[cmd.index("--nproc_per_node") + 1] == str(nproc)
        assert cmd[cmd.index("--nnodes") + 1] == "2"
        # neuron_parallel_compile is torch-xla's: the nxd compile step only.
        nxd_compile = backend == "nxd" and role == render.ROLE_COMPILE
        launcher = nxd_compile_launcher(1, 2) if nxd_compile else ["torchrun"]
        assert cmd[: len(launcher)] == launcher
        assert cmd[-4:] == ["llamajob.cli", role, "--config", render.CONFIG_PATH]

        env = {e["name"]: e["value"] for e in c["env"]}
        assert set(env) - BASE_ENV == device_env
        # Every variable render adds is reserved or a documented default a job may override.
        assert set(env) <= set(api.OPERATOR_ENV) | api.TUNABLE_ENV
        if "NEURON_LOGICAL_NC_CONFIG" in env:
            assert inst.lnc and env["NEURON_LOGICAL_NC_CONFIG"] == str(inst.lnc)
            # Ranks are logical cores: the runtime groups lnc of each chip's eight physical
            # NeuronCores (Trainium2 and Trainium3 architecture pages) into one.
            assert nproc * inst.lnc == inst.devices_per_node * 8
        if "TORCH_NEURONX_NEFF_CACHE_DIR" in env:
            assert env["TORCH_NEURONX_NEFF_CACHE_DIR"] == f"{CACHE}/neff"
        if "NEURON_CC_FLAGS" in env:
            assert f"--cache_dir={CACHE}" in env["NEURON_CC_FLAGS"].split()
            assert "--distribution-strategy=llm-training" in env["NEURON_CC_FLAGS"].split()
        if "FI_PROVIDER" in env:
            assert env["FI_PROVIDER"] == "efa"

        spec = pod["spec"]
        if accelerator is None:
            assert "nodeSelector" not in spec and "tolerations" not in spec
        elif instance.startswith("ml."):
            assert spec["nodeSelector"] == {
                "node.kubernetes.io/instance-type": instance,
                "sagemaker.amazonaws.com/node-health-status": "Schedulable",
            }
        else:
            assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": instance}
        if accelerator is not None:
            assert {"key": accelerator[0], "operator": "Exists",
                    "effect": "NoSchedule"} in spec["tolerations"]
        valid_k8s(pod)


def test_gpu_efa_environment_values_and_rdma_only_on_p_instances() -> None:
    gpus = [n for n, i in INSTANCE_TYPES.items() if i.device == "cuda"]
    if not gpus:
        pytest.skip("no GPU instance type in the catalogue")
    for name in gpus:
        inst = INSTANCE_TYPES[name]
        job = _family_job(name, nodes=1)
        env = {e["name"]: e["value"]
               for e in render.env(job, make_plan(job.spec), render.ROLE_TRAIN)}
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert not [k for k in env if k.startswith("NEURON_")]
        if not inst.efa_devices:
            assert not [k for k in env if k.startswith(("FI_", "NCCL_"))], name
            continue
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_FORK_SAFE"] == "1"
        assert env["FI_EFA_USE_HUGE_PAGE"] == "0" and env["FI_EFA_SET_CUDA_SYNC_MEMOPS"] == "0"
        assert env["NCCL_SOCKET_IFNAME"] == "^lo"
        # GPUDirect RDMA over EFA: the P instances; libfabric refuses it elsewhere.
        p_family = name.removeprefix("ml.").startswith("p")
        assert ("FI_EFA_USE_DEVICE_RDMA" in env) == p_family, name


def test_trn2_on_nxd_keeps_the_nxd_environment_with_its_logical_core_size() -> None:
    job = example("llama3-70b", instanceType="ml.trn2.48xlarge")
    job.spec.backend = "nxd"
    plan = make_plan(job.spec)
    env = {e["name"]: e.get("value") for e in render.env(job, plan, render.ROLE_TRAIN)}
    assert set(env) >= NXD_ENV and "TORCH_NEURONX_NEFF_CACHE_DIR" not in env
    assert env["NEURON_LOGICAL_NC_CONFIG"] == "2"
    cmd = render.command(job, plan, render.ROLE_COMPILE, 1, 0)
    assert cmd[:12] == nxd_compile_launcher(0, plan.nodes)


def test_torch_on_neuron_compiles_with_llamajob_compile_not_neuron_parallel_compile() -> None:
    job = example("llama3-8b-trn2")
    plan = make_plan(job.spec)
    assert (plan.backend, plan.device) == ("torch", "neuron")
    cmd = render.command(job, plan, render.ROLE_COMPILE, 1, 0)
    assert cmd[0] == "torchrun" and "neuron_parallel_compile" not in cmd
    assert cmd[-4:] == ["llamajob.cli", "compile", "--config", render.CONFIG_PATH]
    # Compile and training pods share the NEFF cache on the shared volume: what the compile
    # step compiles, the training pods load.
    caches = {
        next(e["value"] for e in render.env(job, plan, role)
             if e["name"] == "TORCH_NEURONX_NEFF_CACHE_DIR")
        for role in render.ROLES
    }
    assert caches == {"/fsx/neuron-cache/neff"}
    assert job.spec.cluster.volumes[0].mount_path == "/fsx"


# --- trn1 (nxd): the environment of NxD's Llama scripts ------------------------------------------
@pytest.mark.parametrize(
    ("name", "inflight"),
    [("llama3-8b", "3"), ("llama3-70b", "7")],
)
def test_trn1_nxd_pods_get_the_nxd_scripts_environment(name: str, inflight: str) -> None:
    """NxD v2.28.0's Llama scripts: functionalization on for ZeRO-1 (run_llama3_70B_tp_pp.sh,
    line 15), eth0 for the collectives' socket on EKS (line 62; tp_zero1_llama3_8B_hf_pretrain.sh,
    line 94), and an in-flight depth of 3 without a pipeline (8B at TP 32, that script's line
    12) and 7 with one (70B at TP 32, PP 8, run_llama3_70B_tp_pp.sh, line 18)."""
    job = example(name)
    plan = make_plan(job.spec)
    assert plan.backend == "nxd" and plan.instance.family == "trn1"
    assert (plan.pipeline > 1) == (inflight == "7")
    for role in render.ROLES:
        env = {e["name"]: e.get("value") for e in render.env(job, plan, role)}
        assert env["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
        assert env["CCOM_SOCKET_IFNAME"] == "eth0"
        assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == inflight


def test_trn1_nxd_environment_defaults_yield_to_the_job() -> None:
    job = example("llama3-8b", env=[{"name": "CCOM_SOCKET_IFNAME", "value": "ens5"},
                                    {"name": "XLA_DISABLE_FUNCTIONALIZATION", "value": "1"}])
    env = {e["name"]: e["value"] for e in render.env(job, make_plan(job.spec), "train")}
    assert env["CCOM_SOCKET_IFNAME"] == "ens5"
    assert env["XLA_DISABLE_FUNCTIONALIZATION"] == "1"


def test_torchneuron_pods_get_none_of_the_torch_xla_settings() -> None:
    job = example("llama3-8b-trn2")
    plan = make_plan(job.spec)
    assert (plan.backend, plan.device) == ("torch", "neuron")
    env = {e["name"] for e in render.env(job, plan, render.ROLE_TRAIN)}
    assert not env & {"XLA_DISABLE_FUNCTIONALIZATION", "CCOM_SOCKET_IFNAME",
                      "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"}


def test_nxd_compile_wraps_the_plain_compile_command_for_its_marker() -> None:
    """The compile pod runs the same torchrun command as before under neuron_parallel_compile,
    inside the marker's wrapper (llamajob_trainer.compile.main), which knows its node."""
    from llamajob_trainer import compile as compile_step

    job = example("llama3-70b")
    plan = make_plan(job.spec)
    for rank in (0, 15):
        cmd = render.command(job, plan, render.ROLE_COMPILE, 1, rank)
        split = cmd.index("--")
        assert cmd[:split] == nxd_compile_launcher(rank, 16)[:split]
        assert cmd[split + 1] == "neuron_parallel_compile"
        train = render.command(job, plan, render.ROLE_TRAIN, 1, rank)
        plain = [arg.replace("-train-", "-compile-") for arg in train]
        plain[plain.index("train")] = "compile"
        assert cmd[split + 2 :] == plain
    assert callable(compile_step.main)


def test_tunable_device_defaults_yield_to_the_job_and_derived_ones_are_refused() -> None:
    job = example("llama3-8b-trn2", env=[{"name": "FI_EFA_FORK_SAFE", "value": "0"},
                                         {"name": "MALLOC_ARENA_MAX", "value": "8"}])
    env = {e["name"]: e["value"] for e in render.env(job, make_plan(job.spec), "train")}
    assert env["FI_EFA_FORK_SAFE"] == "0" and env["MALLOC_ARENA_MAX"] == "8"
    for name in ("NEURON_LOGICAL_NC_CONFIG", "TORCH_NEURONX_NEFF_CACHE_DIR"):
        with pytest.raises(JobFileError) as err:
            example("llama3-8b-trn2", env=[{"name": name, "value": "1"}])
        assert "set by the operator" in err.value.errors[0].message


@pytest.mark.parametrize("name", ["llama3-8b-trn2", "llama3-70b-trn2", "llama3-8b-p5"])
def test_device_examples_render_valid_pods(name: str) -> None:
    if not (ROOT / "examples" / f"{name}.yaml").exists():
        pytest.skip(f"examples/{name}.yaml is not there yet")
    job = example(name)
    plan = make_plan(job.spec)
    assert plan.valid, plan.problems()
    assert plan.backend == "torch"
    for doc in render.render_all(job):
        valid_k8s(doc)


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("llama3-8b-trn2", "neuron"),
        ("llama3-8b-p5", "cuda"),
        ("llama3-70b", "neuron"),
        ("tiny", "cpu"),
    ],
)
def test_compile_key_names_the_device_and_pods_compute_the_operators_key(
    name: str, device: str
) -> None:
    """The compile pods report the key they computed from the ConfigMap; it must be the one the
    operator derived from the spec, or every edit would compile again."""
    from llamajob_trainer.compile import compile_key_and_marker

    job = example(name)
    plan = make_plan(job.spec)
    assert plan.device == device
    cm = render.render_configmap(job, plan)
    cfg = TrainerConfig.model_validate(yaml.safe_load(cm["data"][render.CONFIG_KEY]))
    operator_key = job.spec.compile_key(plan.backend, job.spec.cluster.image, plan.device)
    pod_key, marker = compile_key_and_marker(cfg)
    assert pod_key == operator_key
    assert marker.name == f"{operator_key}.json"
    # The same spec compiled for another device is another set of graphs.
    others = {"cpu", "cuda", "neuron"} - {device}
    assert all(
        job.spec.compile_key(plan.backend, job.spec.cluster.image, other) != operator_key
        for other in others
    )
