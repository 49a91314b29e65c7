"""Kubernetes objects for a LlamaTrainingJob, as plain dicts (pure: spec in, manifests out).

One job owns three kinds of children:
- a headless Service named after the job, so every pod resolves as
  ``{hostname}.{service}.{ns}.svc`` (the hostname is the pod name, or see ``pod_hostname``)
  and pod 0 is the torchrun rendezvous (``publishNotReadyAddresses`` so the name resolves before
  any readiness);
- a ConfigMap per spec revision with the trainer's config (``TrainerConfig`` as YAML), mounted
  at /etc/llamajob: ``{job}-config-{revision}``. A gang's pods keep reading their own revision's
  config while an edited spec's ConfigMap is created beside it; all go with the job;
- one pod per node and gang: ``{job}-{role}-a{attempt}-{rank}``, role ``compile`` or ``train``,
  labelled with the spec revision it runs.

Everything Kubernetes-specific lives here (names, labels, resources, HyperPod labels, and the
reverse reading of pods and nodes into the core's observations); ``reconcile.py`` only speaks of
roles, attempts, ranks and phases, so the local runner can drive the same core with processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from llamajob_trainer import protocol
from llamajob_trainer.config import TrainerConfig

from .api import API_VERSION, KIND, LlamaTrainingJob
from .catalogue import EFA_RESOURCE
from .jobfile import JobFileError
from .observed import NodeHealth, ObservedPod
from .plan import Plan, make_plan, pod_cpu_memory

APP = "llamajob"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_JOB = "llamajob.dev/job"
LABEL_ROLE = "llamajob.dev/role"
LABEL_ATTEMPT = "llamajob.dev/attempt"
LABEL_RANK = "llamajob.dev/rank"
LABEL_REVISION = "llamajob.dev/revision"

ROLE_COMPILE = "compile"
ROLE_TRAIN = "train"
ROLES = (ROLE_COMPILE, ROLE_TRAIN)

CONTAINER = "trainer"
CONFIG_DIR = "/etc/llamajob"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
RENDEZVOUS_PORT = 29500
# c10d rendezvous: how long nodes may join late (image pulls on a large gang take minutes) and
# how long a store operation, the first connection to pod 0 included, may wait.
RDZV_TIMEOUT = 1800
DISABLE_SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
METRICS_PORT = protocol.DEFAULT_METRICS_PORT
# Reserved volume names: user volumes are DNS labels too, so ours carry a prefix no sane claim
# mount would pick.
SHM_VOLUME = "llamajob-shm"
CONFIG_VOLUME = "llamajob-config"

INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# SageMaker HyperPod's health agent labels every node; only "Schedulable" nodes are healthy
# (others: UnschedulablePendingReplacement, UnschedulablePendingReboot, Unschedulable).
HYPERPOD_HEALTH_LABEL = "sagemaker.amazonaws.com/node-health-status"
HYPERPOD_SCHEDULABLE = "Schedulable"
NODE_GONE = "NodeGone"

SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
# Values from the Neuron reference training scripts (NxD Llama pre-training): the nxd backend's.
NEURON_CC_BASE_FLAGS = "--model-type transformer --distribution-strategy=llm-training"
# Async runtime: how many executions the host may queue ahead of the device. NxD's Llama
# scripts at v2.28.0 (examples/training/llama/): 3 for tensor parallel + ZeRO-1 on one replica
# (tp_zero1_llama_hf_pretrain/tp_zero1_llama3_8B_hf_pretrain.sh, line 12), 7 for the pipeline
# layouts (tp_pp_llama_hf_pretrain/run_llama3_70B_tp_pp.sh, line 18; run_llama2_13B_tp_pp.sh,
# line 18). NxDT's 70B configs (its Neuron 2.26 release) use 5 to 7
# (examples/conf/hf_llama3_70B_config.yaml: 5, hf_llama3.1_70B_config.yaml: 7); NxD's own
# scripts are the ones this backend follows.
NEURON_INFLIGHT_REQUESTS = "3"
NEURON_INFLIGHT_REQUESTS_PIPELINE = "7"
# The network interface of Neuron's collectives bootstrap socket: eth0, the pod's interface
# under the VPC CNI, as NxD's and NxDT's scripts set it when they run on EKS (the
# OMPI_COMM_WORLD_RANK branch of tp_zero1_llama3_8B_hf_pretrain.sh, line 94, and of
# run_llama3_70B_tp_pp.sh, line 62, at NxD v2.28.0; examples/train_setup.sh, line 36, in NxDT's
# Neuron 2.26 release).
CCOM_SOCKET_IFNAME = "eth0"
# glibc arenas per thread otherwise exhaust host memory with 32 ranks (64 on trn2/trn3).
MALLOC_ARENA_MAX = "64"
# TorchNeuron's persistent NEFF cache, under compile.cacheDir on the shared file system.
NEFF_CACHE_SUBDIR = "neff"

_MAX_LABEL = 63


# --- names ------------------------------------------------------------------------------------
def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _dns_label(base: str, suffix: str = "", *, letter_first: bool = False) -> str:
    """``base + suffix`` as a DNS-1123 label (<= 63 chars, [a-z0-9-]).

    A base that is already clean and short enough is kept verbatim, so names stay readable;
    otherwise it is cleaned, shortened and given a digest of the original, which keeps distinct
    jobs ("a.b" vs "a-b", two long names with the same prefix) apart.
    """
    clean = re.sub(r"[^a-z0-9-]", "-", base.lower())
    if letter_first and not clean[:1].isalpha():
        clean = "j-" + clean
    if clean == base and len(base) + len(suffix) <= _MAX_LABEL:
        return base + suffix
    tag = _digest(base)
    keep = max(_MAX_LABEL - len(suffix) - len(tag) - 1, 1)
    head = clean[:keep].strip("-") or "j"
    return f"{head}-{tag}{suffix}"


def label_value(value: str) -> str:
    """Label values are at most 63 characters; longer job names keep a prefix and a digest."""
    if len(value) <= _MAX_LABEL:
        return value
    return f"{value[: _MAX_LABEL - 9].rstrip('-._')}-{_digest(value)}"


def pod_name(job_name: str, role: str, attempt: int, rank: int) -> str:
    """Deterministic pod name, also its hostname (hence a DNS label of at most 63 characters)."""
    return _dns_label(job_name, f"-{role}-a{attempt}-{rank}")


def service_name(job_name: str) -> str:
    """Service names are DNS-1035 labels: they must start with a letter."""
    return _dns_label(job_name, letter_first=True)


def configmap_name(job_name: str, revision: str) -> str:
    return _dns_label(job_name, f"-config-{revision}")


def spec_revision(job: LlamaTrainingJob) -> str:
    """Digest of everything in the spec that reaches the pods or the trainer's config.

    ``restartPolicy`` and ``suspend`` are left out: only the operator reads them, so editing
    them takes effect without touching a running gang (suspending stops it, but as a suspension,
    not an edit). Any other edit gives a new revision, and a gang running an older one is
    restarted with it (see ``reconcile``).
    """
    payload = job.spec.model_dump(mode="json", exclude={"restart_policy", "suspend"})
    if job.spec.restart_policy.process_restarts:
        # The exception: it changes the torchrun command. Absent when 0, so jobs that do not
        # use it keep the revision they had.
        payload["processRestarts"] = job.spec.restart_policy.process_restarts
    return _digest(json.dumps(payload, sort_keys=True), 10)


def elastic(job: LlamaTrainingJob, role: str) -> bool:
    """Training gangs with ``restartPolicy.processRestarts`` use torchrun's c10d rendezvous,
    the one that can restart processes in place; everything else the static rendezvous."""
    return role == ROLE_TRAIN and job.spec.restart_policy.process_restarts > 0


def pod_hostname(job: LlamaTrainingJob, role: str, attempt: int, rank: int) -> str:
    """The pod's name in the headless Service's DNS. Normally the pod name. For the c10d
    rendezvous it is ``{role}-a{attempt}-n{rank}``, the rank zero-padded: c10d numbers the nodes
    by sorting their addresses, and pod names do not sort by rank (``-10`` before ``-2``, and a
    long job name is shortened by a different amount for a longer rank), while these do. That
    keeps node rank = pod index, so rank 0, whose metrics the operator reads, is on pod 0."""
    if elastic(job, role):
        width = max(4, len(str(job.spec.cluster.nodes - 1)))
        return f"{role}-a{attempt}-n{rank:0{width}d}"
    return pod_name(job.metadata.name, role, attempt, rank)


def pod_address(job: LlamaTrainingJob, role: str, attempt: int, rank: int) -> str:
    """Stable DNS name of one pod of a gang, through the headless Service."""
    host = pod_hostname(job, role, attempt, rank)
    return f"{host}.{service_name(job.metadata.name)}.{job.metadata.namespace}.svc"


def master_addr(job: LlamaTrainingJob, role: str, attempt: int) -> str:
    """Stable DNS name of rank 0 of a gang: the rendezvous."""
    return pod_address(job, role, attempt, 0)


def labels(
    job: LlamaTrainingJob,
    role: str | None = None,
    attempt: int | None = None,
    rank: int | None = None,
    revision: str | None = None,
) -> dict[str, str]:
    value = label_value(job.metadata.name)
    out = {LABEL_NAME: APP, LABEL_INSTANCE: value, LABEL_JOB: value}
    if role is not None:
        out[LABEL_COMPONENT] = role
        out[LABEL_ROLE] = role
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    if rank is not None:
        out[LABEL_RANK] = str(rank)
    if revision is not None:
        out[LABEL_REVISION] = revision
    return out


def selector(job: LlamaTrainingJob) -> dict[str, str]:
    """Every pod of the job, any role and attempt (what the shell lists and the Service selects)."""
    return {LABEL_NAME: APP, LABEL_JOB: label_value(job.metadata.name)}


def owner_references(job: LlamaTrainingJob) -> list[dict[str, Any]]:
    """Children are garbage-collected with the job. Without a uid (a file rendered offline)
    there is no owner to point at, so none is written."""
    if not job.metadata.uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.metadata.name,
            "uid": job.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(job: LlamaTrainingJob, name: str, lbls: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": job.metadata.namespace, "labels": lbls}
    owners = owner_references(job)
    if owners:
        meta["ownerReferences"] = owners
    return meta


# --- trainer config ---------------------------------------------------------------------------
def trainer_config(job: LlamaTrainingJob, plan: Plan) -> TrainerConfig:
    """The training spec plus what the trainer cannot derive: identity, backend, device peak."""
    spec = job.spec
    data = spec.model_dump(exclude={"cluster", "restart_policy", "suspend"})
    inst = plan.instance
    data.update(
        job_name=job.metadata.name,
        namespace=job.metadata.namespace,
        resolved_backend=plan.backend,
        device=plan.device,
        # On CPU the catalogue's peak is a planning placeholder; unset lets the trainer measure.
        peak_tflops_per_core=inst.peak_tflops_per_core if inst.device != "cpu" else None,
        image=spec.cluster.image,
        metrics_port=METRICS_PORT,
    )
    return TrainerConfig.model_validate(data)


def render_configmap(job: LlamaTrainingJob, plan: Plan) -> dict[str, Any]:
    text = yaml.safe_dump(trainer_config(job, plan).to_wire(), sort_keys=False)
    revision = spec_revision(job)
    name = configmap_name(job.metadata.name, revision)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, name, labels(job, revision=revision)),
        "data": {CONFIG_KEY: text},
    }


def render_service(job: LlamaTrainingJob) -> dict[str, Any]:
    # The selector covers both roles: a pod's {hostname}.{subdomain} record only exists while a
    # headless Service of that name selects it, and compile pods rendezvous the same way.
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.metadata.name), labels(job)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(job),
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


# --- pods -------------------------------------------------------------------------------------
def command(
    job: LlamaTrainingJob,
    plan: Plan,
    role: str,
    attempt: int,
    rank: int,
    config_path: str = CONFIG_PATH,
) -> list[str]:
    """torchrun with its rendezvous at pod 0, one rank per NeuronCore (logical on trn2/trn3),
    GPU or CPU slot. The nxd backend compiles under neuron_parallel_compile (it runs the script
    once to extract torch-xla graphs, then compiles them in parallel into the cache); every
    other backend's compile step is plain ``llamajob compile``: TorchNeuron compiles the graphs it
    runs into its NEFF cache (see ``env``), Inductor into its own.

    Static rendezvous (``--node_rank``, no in-place restarts: after one, the restarted processes
    read the previous round's addresses and never connect) unless ``elastic``: then c10d with
    ``--max-restarts``, pod 0 hosting the rendezvous store, every pod naming itself by its
    sortable address, and a fresh bootstrap store per round
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``, in ``env``) so no round reads an older one's keys.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    master = master_addr(job, role, attempt)
    rendezvous = [
        "--node_rank", str(rank),
        "--master_addr", master,
        "--master_port", str(RENDEZVOUS_PORT),
    ]  # fmt: skip
    if elastic(job, role):
        conf = f"is_host={int(rank == 0)},join_timeout={RDZV_TIMEOUT},read_timeout={RDZV_TIMEOUT}"
        rendezvous = [
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master}:{RENDEZVOUS_PORT}",
            "--rdzv-id", f"{service_name(job.metadata.name)}-{role}-a{attempt}",
            "--rdzv-conf", conf,
            "--local-addr", pod_address(job, role, attempt, rank),
            "--max-restarts", str(job.spec.restart_policy.process_restarts),
        ]  # fmt: skip
    argv = [
        "torchrun",
        "--nnodes", str(plan.nodes),
        "--nproc_per_node", str(plan.processes_per_node),
        *rendezvous,
        "-m", "llamajob.cli", role, "--config", config_path,
    ]  # fmt: skip
    if role == ROLE_COMPILE and plan.backend == "nxd":
        # neuron_parallel_compile compiles after the command it wraps has ended, so the
        # compile marker can only follow its exit status: llamajob_trainer.compile runs it and
        # records this node when it succeeds (see that module's docstring).
        argv = [
            "python", "-m", "llamajob_trainer.compile",
            "--node", str(rank), "--nodes", str(plan.nodes), "--config", config_path,
            "--", "neuron_parallel_compile", *argv,
        ]  # fmt: skip
    return argv


def device_resources(job: LlamaTrainingJob, plan: Plan) -> dict[str, int]:
    """Extended resources per pod: accelerator devices and EFA interfaces (none on CPU)."""
    inst, cluster = plan.instance, job.spec.cluster
    out: dict[str, int] = {}
    if inst.device_resource:
        name = cluster.device_resource or inst.device_resource
        if name.endswith("neuroncore"):
            # The device plugin also counts single cores; one per rank then.
            out[name] = plan.processes_per_node
        else:
            per_device = inst.cores_per_node // inst.devices_per_node
            out[name] = math.ceil(plan.processes_per_node / per_device)
    if inst.efa_devices:
        out[cluster.efa_resource or inst.efa_resource or EFA_RESOURCE] = inst.efa_devices
    return out


def resources(job: LlamaTrainingJob, plan: Plan) -> dict[str, Any]:
    """The devices, and cpu and memory (``plan.pod_cpu_memory``: the user's, else most of the
    node's), requests equal to limits: Guaranteed QoS, so that under node pressure the
    training pod is the last to be evicted or OOM-killed. With extended resources alone a pod is
    BestEffort, and its memory-backed /dev/shm is then charged to no limit. Compile pods get the
    same. Types without host figures (``cpu``, trn3) request cpu and memory only when
    spec.cluster.cpu and memory say so."""
    amounts: dict[str, Any] = dict(device_resources(job, plan))
    amounts.update(pod_cpu_memory(job.spec))
    if not amounts:
        return {}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def shutdown_timeout(grace_seconds: int) -> int:
    """torchrun forwards SIGTERM to its ranks and SIGKILLs them after this many seconds (30 by
    default, too short for a large save); it ends a little before the pod's grace period so
    torchrun itself exits cleanly."""
    return max(1, grace_seconds - 5)


def _trainium_env(job: LlamaTrainingJob, plan: Plan) -> list[dict[str, Any]]:
    """Trainium: libfabric's EFA settings, the logical core size, then the backend's own.

    Sources (AWS Neuron documentation):
    - FI_*: "How to prepare trn1.32xlarge for multi-node execution", Application execution
      environment (https://awsdocs-neuron.readthedocs-hosted.com/en/latest/frameworks/torch/
      torch-neuronx/setup-trn1-multi-node-execution.html); FI_EFA_FORK_SAFE for kernels older
      than 5.15, "Neuron Runtime Troubleshooting" (.../neuron-runtime/nrt-troubleshoot.html).
      They are libfabric's, read by whatever drives EFA in the process; TorchNeuron's multi-node
      collectives run over the same EFA setup ("How to use torch.distributed on Neuron",
      prerequisites: .../torch/guides/torch-distributed.html), so both backends get them.
    - NEURON_LOGICAL_NC_CONFIG: "Logical NeuronCore configuration" (.../general/arch/
      neuron-features/logical-neuroncore-config.html): the runtime groups that many physical
      cores into one logical core, and programs must be compiled for the same size; the
      catalogue's cores per node (the ranks, torchrun's nproc) are counted at this size.
    - TORCH_NEURONX_NEFF_CACHE_DIR: TorchNeuron's persistent NEFF cache, written by eager mode
      and torch.compile(backend="neuron") alike ("What are Neuron Compiler artifacts?",
      .../compiler/about-compiler-artifacts.html; "TorchNeuron environment variables",
      .../torch/reference/env-vars.html). NEURON_CC_FLAGS and NEURON_COMPILE_CACHE_URL belong to
      the torch-xla path (neuron_parallel_compile), hence nxd only.
    """
    inst, cache = plan.instance, job.spec.compile.cache_dir
    items: list[dict[str, Any]] = []
    if inst.efa_devices:
        items += [
            {"name": "FI_PROVIDER", "value": "efa"},
            {"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"},
            {"name": "FI_EFA_FORK_SAFE", "value": "1"},
        ]
    if inst.lnc:
        items.append({"name": "NEURON_LOGICAL_NC_CONFIG", "value": str(inst.lnc)})
    if plan.backend == "nxd":
        items += [
            # Per process: each torchrun worker drives one NeuronCore (the runtime reserves this
            # many cores for every process that sets it).
            {"name": "NEURON_RT_NUM_CORES", "value": "1"},
            {
                "name": "NEURON_CC_FLAGS",
                "value": f"{NEURON_CC_BASE_FLAGS} --cache_dir={cache} --retry_failed_compilation",
            },
            {"name": "NEURON_COMPILE_CACHE_URL", "value": cache},
            {"name": "NEURON_FUSE_SOFTMAX", "value": "1"},
            {
                "name": "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS",
                "value": (
                    NEURON_INFLIGHT_REQUESTS_PIPELINE
                    if plan.pipeline > 1
                    else NEURON_INFLIGHT_REQUESTS
                ),
            },
            # Functionalization on: NxD's and NxDT's scripts set it because ZeRO-1 trails
            # by 3% in convergence without it ("In PT2.1, functionalization is needed to
            # close 3% convergence gap compared to PT1.13 for ZeRO1": run_llama3_70B_tp_pp.sh,
            # lines 14-15, and test/integration/zero1/run_test_zero1.sh, line 5, at NxD
            # v2.28.0; examples/train_setup.sh, lines 58-60, in NxDT's Neuron 2.26 release).
            {"name": "XLA_DISABLE_FUNCTIONALIZATION", "value": "0"},
            {"name": "CCOM_SOCKET_IFNAME", "value": CCOM_SOCKET_IFNAME},
        ]
    else:
        # No NEURON_RT_NUM_CORES (the torch-xla path's core count per process): AWS launches
        # TorchNeuron with plain torchrun, one worker per logical core and no runtime core
        # variables, leaving the assignment to the framework ("Troubleshooting: TorchTitan
        # Neuron": NGPU = 64 on a trn2.48xlarge, passed as --nproc_per_node; "How to use
        # torch.distributed on Neuron").
        neff_cache = posixpath.join(cache, NEFF_CACHE_SUBDIR)
        items.append({"name": "TORCH_NEURONX_NEFF_CACHE_DIR", "value": neff_cache})
    items.append({"name": "MALLOC_ARENA_MAX", "value": MALLOC_ARENA_MAX})
    return items


def _gpudirect_rdma(plan: Plan) -> bool:
    """EFA with GPUDirect RDMA: the P instances (p4d/p4de, p5/p5e/p5en, p6). The EFA cheatsheet
    scopes FI_EFA_USE_DEVICE_RDMA to p4/p5, and on an EFA device without RDMA read libfabric's
    EFA provider aborts the process when it is set ("FI_EFA_USE_DEVICE_RDMA=1 was set by user,
    but EFA device has no rdma-read capability", ofiwg/libfabric prov/efa), so the g types
    (EFA, no GPUDirect RDMA) go without it."""
    inst = plan.instance
    return inst.device == "cuda" and bool(inst.efa_devices) and (
        inst.name.removeprefix("ml.").startswith("p")
    )


def _gpu_env(plan: Plan) -> list[dict[str, Any]]:
    """CUDA: the allocator setting of AWS's FSDP workflow on every GPU type; NCCL over EFA
    (aws-ofi-nccl and libfabric, both in the CUDA trainer image) only where the type has EFA.

    Sources: awsome-distributed-training, FSDP test case
    (https://github.com/awslabs/awsome-distributed-training/tree/main/3.test_cases/pytorch/FSDP:
    kubernetes/llama3_1_8b-fsdp.yaml for PYTORCH_CUDA_ALLOC_CONF and NCCL_SOCKET_IFNAME=^lo, the
    value for a pod whose only other interface is the CNI's; slurm/llama3_1_8b-training.sbatch
    for FI_PROVIDER, FI_EFA_USE_HUGE_PAGE, FI_EFA_SET_CUDA_SYNC_MEMOPS) and the EFA cheatsheet
    (.../1.architectures/efa-cheatsheet.md: FI_EFA_USE_DEVICE_RDMA on p4/p5, FI_EFA_FORK_SAFE
    only matters below kernel 5.15 and is harmless above, huge pages off so forked data-loader
    workers do not fail with ENOMEM). NCCL_DEBUG stays unset: the cheatsheet keeps it for
    debugging, and users can add it through cluster.env.
    """
    items: list[dict[str, Any]] = [
        {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
    ]
    if not plan.instance.efa_devices:
        return items
    items.append({"name": "FI_PROVIDER", "value": "efa"})
    if _gpudirect_rdma(plan):
        items.append({"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"})
    items += [
        {"name": "FI_EFA_FORK_SAFE", "value": "1"},
        {"name": "FI_EFA_USE_HUGE_PAGE", "value": "0"},
        {"name": "FI_EFA_SET_CUDA_SYNC_MEMOPS", "value": "0"},
        {"name": "NCCL_SOCKET_IFNAME", "value": "^lo"},
    ]
    return items


def env(job: LlamaTrainingJob, plan: Plan, role: str) -> list[dict[str, Any]]:
    """Container environment. Secrets only by reference: their values never pass through the
    operator, so they cannot reach status, Events or logs."""
    spec, inst = job.spec, plan.instance
    items: list[dict[str, Any]] = [
        {"name": protocol.CONFIG_ENV, "value": CONFIG_PATH},
        {"name": protocol.TERMINATION_LOG_ENV, "value": protocol.DEFAULT_TERMINATION_LOG},
        {
            "name": SHUTDOWN_TIMEOUT_ENV,
            "value": str(shutdown_timeout(spec.checkpoint.terminate_grace_seconds)),
        },
    ]
    if elastic(job, role):
        items.append({"name": DISABLE_SHARED_STORE_ENV, "value": "1"})
    if inst.trainium:
        items += _trainium_env(job, plan)
    elif plan.device == "cuda":
        items += _gpu_env(plan)
    items += [{"name": e.name, "value": e.value} for e in spec.cluster.env]
    items += [
        {"name": s.name, "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": s.key}}}
        for s in spec.cluster.secrets
    ]
    # Later entries win (the user's env over ours, secrets over plain values), once each.
    by_name: dict[str, dict[str, Any]] = {}
    for item in items:
        by_name.pop(item["name"], None)
        by_name[item["name"]] = item
    return list(by_name.values())


def node_selector(job: LlamaTrainingJob, plan: Plan) -> dict[str, str]:
    # Accelerator pods select their instance type: device counts alone would let, say, a p5 gang
    # land on any node with eight GPUs. Plain CPU pods go wherever they fit.
    accelerated = plan.instance.device_resource is not None
    out: dict[str, str] = {}
    if accelerated and job.spec.cluster.hyperpod:
        # HyperPod EKS nodes carry the ml.-prefixed name in this label.
        out[INSTANCE_TYPE_LABEL] = plan.instance.name
        out[HYPERPOD_HEALTH_LABEL] = HYPERPOD_SCHEDULABLE
    elif accelerated:
        # Plain EKS: the kubelet sets the EC2 name, and no HyperPod agent labels health.
        out[INSTANCE_TYPE_LABEL] = plan.instance.name.removeprefix("ml.")
    out.update(job.spec.cluster.node_selector)
    return out


def affinity(
    job: LlamaTrainingJob, role: str, attempt: int, avoid_nodes: Iterable[str] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = {
        # One pod of a gang per node. Scoped to the gang so a terminating pod of another gang
        # never blocks its replacement.
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": {
                            LABEL_JOB: label_value(job.metadata.name),
                            LABEL_ROLE: role,
                            LABEL_ATTEMPT: str(attempt),
                        }
                    },
                    "topologyKey": HOSTNAME_LABEL,
                }
            ]
        }
    }
    avoid = sorted(set(avoid_nodes))
    if avoid:
        # Preferred, not required: a node HyperPod repaired in place (rebooted) comes back under
        # its old name, and on a cluster without spare nodes a hard exclusion would leave the
        # gang Pending forever. Nodes that are still unhealthy are excluded by the health label.
        # matchFields on metadata.name is exact; the hostname label can differ from the node name.
        term = {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": avoid}]}
        out["nodeAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": term}
            ]
        }
    return out


def tolerations(job: LlamaTrainingJob, plan: Plan) -> list[dict[str, Any]]:
    out = [t.to_wire() for t in job.spec.cluster.tolerations]
    if plan.instance.device_resource:
        # Accelerator node groups (Neuron or NVIDIA) are commonly tainted with the device
        # resource name; only pods that request the devices should land there, which these do.
        taint = {"key": plan.instance.device_resource, "operator": "Exists", "effect": "NoSchedule"}
        if taint not in out:
            out.append(taint)
    return out


def volumes(
    job: LlamaTrainingJob, revision: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): /dev/shm in memory, the revision's config, the user's
    claims."""
    cluster = job.spec.cluster
    vols: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}},
        {
            "name": CONFIG_VOLUME,
            "configMap": {"name": configmap_name(job.metadata.name, revision)},
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    for v in cluster.volumes:
        claim: dict[str, Any] = {"claimName": v.claim_name}
        if v.read_only:
            claim["readOnly"] = True
        vols.append({"name": v.name, "persistentVolumeClaim": claim})
        mount: dict[str, Any] = {"name": v.name, "mountPath": v.mount_path}
        if v.read_only:
            mount["readOnly"] = True
        mounts.append(mount)
    return vols, mounts


def render_pod(
    job: LlamaTrainingJob,
    plan: Plan,
    role: str,
    attempt: int,
    rank: int,
    avoid_nodes: Iterable[str] = (),
) -> dict[str, Any]:
    if not 0 <= rank < plan.pods:
        raise ValueError(f"rank {rank} outside the gang of {plan.pods} pod(s)")
    cluster = job.spec.cluster
    name = pod_name(job.metadata.name, role, attempt, rank)
    revision = spec_revision(job)
    vols, mounts = volumes(job, revision)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        "command": command(job, plan, role, attempt, rank),
        "env": env(job, plan, role),
        "ports": [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": mounts,
        "terminationMessagePath": protocol.DEFAULT_TERMINATION_LOG,
        # The trainer writes a JSON cause there; if it died before writing, the log tail helps.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    res = resources(job, plan)
    if res:
        container["resources"] = res
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Time for the SIGTERM-ed trainer to finish its step and save (checkpoint.saveOnTerminate).
        "terminationGracePeriodSeconds": job.spec.checkpoint.terminate_grace_seconds,
        "hostname": pod_hostname(job, role, attempt, rank),
        "subdomain": service_name(job.metadata.name),
        # Thousands of service env vars help nobody and slow process start-up.
        "enableServiceLinks": False,
        "affinity": affinity(job, role, attempt, avoid_nodes),
        "containers": [container],
        "volumes": vols,
    }
    selector_ = node_selector(job, plan)
    if selector_:
        pod_spec["nodeSelector"] = selector_
    tols = tolerations(job, plan)
    if tols:
        pod_spec["tolerations"] = tols
    if cluster.service_account_name:
        pod_spec["serviceAccountName"] = cluster.service_account_name
    if cluster.priority_class_name:
        pod_spec["priorityClassName"] = cluster.priority_class_name
    if cluster.scheduler_name:
        pod_spec["schedulerName"] = cluster.scheduler_name
    # The user's labels cannot shadow the operator's: keys under llamajob.dev/ are refused.
    meta = _metadata(
        job, name, {**cluster.pod_labels, **labels(job, role, attempt, rank, revision)}
    )
    if cluster.pod_annotations:
        meta["annotations"] = dict(cluster.pod_annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def render_gang(
    job: LlamaTrainingJob,
    plan: Plan,
    role: str,
    attempt: int,
    avoid_nodes: Iterable[str] = (),
) -> list[dict[str, Any]]:
    avoid = tuple(avoid_nodes)
    return [render_pod(job, plan, role, attempt, r, avoid) for r in range(plan.pods)]


def render_all(
    job: LlamaTrainingJob, roles: Iterable[str] | None = None, attempt: int = 1
) -> list[dict[str, Any]]:
    """Service, ConfigMap and the pods of one attempt: compile (when enabled) and training.

    Raises JobFileError with the planner's problems for a job the operator would reject."""
    plan = make_plan(job.spec)
    problems = plan.problems()
    if problems:
        raise JobFileError(problems)
    if roles is None:
        roles = [ROLE_COMPILE, ROLE_TRAIN] if job.spec.compile.enabled else [ROLE_TRAIN]
    docs = [render_service(job), render_configmap(job, plan)]
    for role in roles:
        docs += render_gang(job, plan, role, attempt)
    return docs


# --- observations: Kubernetes objects back into the core's terms -------------------------------
# A pod's DisruptionTarget condition says who removed it; these are the node's doing.
_DISRUPTION_REASONS = {
    "DeletionByTaintManager": "NodeNotReady",  # NoExecute taint: node not ready/unreachable
    "DeletionByPodGC": "NodeGone",  # bound to a node that no longer exists
    "TerminationByKubelet": "TerminationByKubelet",  # node pressure or shutdown
    "EvictionByEvictionAPI": "Evicted",  # drain
    "PreemptionByScheduler": "Preempted",
}


# Waiting reasons of a container on its normal way to running.
_STARTING_REASONS = frozenset({"ContainerCreating", "PodInitializing"})


def observed_pod(obj: Mapping[str, Any]) -> ObservedPod | None:
    """Read a pod this operator created (None for anything without our labels)."""
    meta = obj.get("metadata") or {}
    lbls = meta.get("labels") or {}
    try:
        role, attempt, rank = lbls[LABEL_ROLE], int(lbls[LABEL_ATTEMPT]), int(lbls[LABEL_RANK])
    except (KeyError, TypeError, ValueError):
        return None
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    terminated: dict[str, Any] = {}
    not_starting = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            state = cs.get("state") or {}
            terminated = state.get("terminated") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") and waiting["reason"] not in _STARTING_REASONS:
                not_starting = ": ".join(
                    str(part) for part in (waiting["reason"], waiting.get("message")) if part
                )
            if not terminated and status.get("phase") in ("Failed", "Succeeded"):
                terminated = (cs.get("lastState") or {}).get("terminated") or {}
    reason = status.get("reason")
    if not reason:
        for cond in status.get("conditions") or []:
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                reason = _DISRUPTION_REASONS.get(cond.get("reason", ""), cond.get("reason"))
    if not reason:
        reason = terminated.get("reason")
    unschedulable = next(
        (
            str(c.get("message") or "no node fits")
            for c in status.get("conditions") or []
            if c.get("type") == "PodScheduled" and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
        ),
        None,
    )
    return ObservedPod(
        name=str(meta.get("name", "")),
        role=role,
        attempt=attempt,
        rank=rank,
        phase=str(status.get("phase") or "Pending"),
        node=spec.get("nodeName") or None,
        exit_code=terminated.get("exitCode"),
        reason=reason or None,
        termination_message=protocol.parse_termination_message(terminated.get("message")),
        deleting=bool(meta.get("deletionTimestamp")),
        ip=status.get("podIP") or None,
        unschedulable=unschedulable,
        not_starting=not_starting,
    )


def node_health(name: str, obj: Mapping[str, Any] | None) -> NodeHealth:
    """Healthy unless gone, not Ready, or labelled non-Schedulable by HyperPod. Nodes without
    the HyperPod label (plain EKS, kind) are judged by Ready alone."""
    if obj is None:
        return NodeHealth(name, False, NODE_GONE)
    meta = obj.get("metadata") or {}
    health = (meta.get("labels") or {}).get(HYPERPOD_HEALTH_LABEL)
    if health is not None and health != HYPERPOD_SCHEDULABLE:
        return NodeHealth(name, False, health)
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") != "True":
            return NodeHealth(name, False, f"NotReady ({cond.get('reason') or 'no reason'})")
    return NodeHealth(name, True)
