"""The LlamaTrainingJob resource: pydantic models for spec and status.

These models are the single source of truth: the CRD in ``crds/`` (see ``crd.py``), the chart's
copy, the operator's validation and the local runner all derive from them.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from llamajob_trainer import protocol
from llamajob_trainer.config import (
    MAX_EXACT_INT,
    FieldValueError,
    PathStr,
    PositiveInt,
    SpecModel,
    TrainingSpec,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .catalogue import INSTANCE_TYPES

GROUP = "llamajob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LlamaTrainingJob"
PLURAL = "llamatrainingjobs"
SINGULAR = "llamatrainingjob"
SHORT_NAMES = ["ltj"]

# Spelled out (not built from the catalogue) so that type checkers see the names too; the CRD
# enum lists them in this order, which the assert holds to the catalogue's.
InstanceTypeName = Literal[
    "ml.trn1.32xlarge",
    "ml.trn1n.32xlarge",
    "ml.trn2.48xlarge",
    "trn3.48xlarge",
    "ml.g5.8xlarge",
    "ml.g5.12xlarge",
    "ml.g5.24xlarge",
    "ml.g5.48xlarge",
    "ml.g6e.8xlarge",
    "ml.g6e.12xlarge",
    "ml.g6e.24xlarge",
    "ml.g6e.48xlarge",
    "ml.p4d.24xlarge",
    "ml.p4de.24xlarge",
    "ml.p5.48xlarge",
    "ml.p5e.48xlarge",
    "ml.p5en.48xlarge",
    "ml.p6-b200.48xlarge",
    "cpu",
]
assert InstanceTypeName.__args__ == tuple(INSTANCE_TYPES), "catalogue and enum drifted"

# DNS-1123 label: what Kubernetes accepts for volume and env names alike (env is looser, but a
# label-safe name is always valid).
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=253)]
DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]

# Label and annotation keys, label values: Kubernetes' own rules, checked here so that a bad one
# fails the job with a message naming the field instead of every pod creation being refused.
_NAME_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# For the CRD, so that the API server refuses a bad label value at apply time already.
_LABEL_VALUES_SCHEMA = {
    "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
}


# Kubernetes object names (metadata.name of the job, and the Secrets and claims it names).
MAX_NAME = 253
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def dns_subdomain_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS subdomain (a Kubernetes object name), or None."""
    if len(value) > MAX_NAME:
        return f"is {len(value)} characters; Kubernetes allows at most {MAX_NAME}"
    if not _DNS_SUBDOMAIN.fullmatch(value):
        return (
            "must be lowercase letters, digits, '-' and '.', starting and ending with a letter "
            "or digit (a DNS subdomain, as Kubernetes requires), e.g. llama3-8b-run1"
        )
    return None


def _key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    # fullmatch, not match: '$' also matches before a trailing newline.
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return (f"key {key!r}: the prefix before '/' must be a DNS subdomain (lowercase letters, "
                "digits, '-' and '.'), e.g. example.com/team")
    if not name or len(name) > 63 or not _NAME_PART.fullmatch(name):
        return (f"key {key!r}: the name must be 1-63 letters, digits, '-', '_' or '.', starting "
                "and ending with a letter or digit")
    return None


def check_metadata_map(value: dict[str, str], *, label_values: bool, reserved: bool) -> None:
    """Raise ValueError naming each bad key (and label value) with the rule it breaks."""
    problems = [p for key in value if (p := _key_problem(key))]
    if reserved:
        problems += [f"key {key!r}: keys under {GROUP}/ are set by the operator"
                     for key in value if key.startswith(f"{GROUP}/")]
    if label_values:
        problems += [
            f"value {v!r} of {k!r}: at most 63 letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit (or empty)"
            for k, v in value.items() if len(v) > 63 or not re.fullmatch(LABEL_VALUE_PATTERN, v)
        ]
    if problems:
        raise ValueError("; ".join(problems))


# What the operator puts into every pod (see render.py; a test keeps the two in step). A user
# volume or variable of the same name would replace ours, or the pod would be refused.
RESERVED_VOLUME_PREFIX = "llamajob-"
RESERVED_MOUNT_PATHS = {
    "/dev/shm": "the in-memory /dev/shm (size it with cluster.shmSize)",
    "/etc/llamajob": "the trainer config",
    protocol.DEFAULT_TERMINATION_LOG: "the termination message",
}
# Variables the operator derives from the spec or needs for the trainer to work at all.
OPERATOR_ENV = {
    protocol.CONFIG_ENV: "the path of the trainer config",
    protocol.TERMINATION_LOG_ENV: "where the trainer reports why it stopped",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "from checkpoint.terminateGraceSeconds; set that instead",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "for restartPolicy.processRestarts",
    "NEURON_RT_NUM_CORES": "one NeuronCore per rank",
    "NEURON_CC_FLAGS": "with compile.cacheDir; set that instead",
    "NEURON_COMPILE_CACHE_URL": "from compile.cacheDir; set that instead",
    "NEURON_LOGICAL_NC_CONFIG": "the instance type's logical NeuronCore size, which sets the "
    "ranks per node",
    "TORCH_NEURONX_NEFF_CACHE_DIR": "from compile.cacheDir; set that instead",
}
# Variables the operator sets as defaults that a job may override (render: the user's win).
TUNABLE_ENV = frozenset(
    {
        "FI_PROVIDER",
        "FI_EFA_USE_DEVICE_RDMA",
        "FI_EFA_FORK_SAFE",
        "NEURON_FUSE_SOFTMAX",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS",
        "XLA_DISABLE_FUNCTIONALIZATION",
        "CCOM_SOCKET_IFNAME",
        "MALLOC_ARENA_MAX",
        "FI_EFA_USE_HUGE_PAGE",
        "FI_EFA_SET_CUDA_SYNC_MEMOPS",
        "NCCL_SOCKET_IFNAME",
        "PYTORCH_CUDA_ALLOC_CONF",
    }
)


def _mount_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path, e.g. /fsx")
    path = posixpath.normpath(re.sub("/+", "/", value))
    if path == "/":
        raise ValueError("'/' would hide the container's whole file system; mount e.g. /fsx")
    for ours, what in RESERVED_MOUNT_PATHS.items():
        if path == ours or path.startswith(ours + "/"):
            raise ValueError(f"{ours} is where the operator mounts {what}; mount e.g. /fsx")
        if ours.startswith(path + "/"):
            raise ValueError(
                f"would hide {ours}, where the operator mounts {what}; mount e.g. /fsx"
            )
    return value


def _volume_name(value: str) -> str:
    if value.startswith(RESERVED_VOLUME_PREFIX):
        raise ValueError(
            f"names starting with {RESERVED_VOLUME_PREFIX} are the operator's (its /dev/shm and "
            "config volumes); pick another, e.g. fsx"
        )
    return value


def _env_name(value: str) -> str:
    if value in OPERATOR_ENV:
        raise ValueError(f"{value} is set by the operator ({OPERATOR_ENV[value]}); pick another")
    return value


# A Secret's data key: Kubernetes' rule for Secret and ConfigMap keys.
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _secret_key(value: str) -> str:
    if (
        len(value) > MAX_NAME
        or not _SECRET_KEY.fullmatch(value)
        or value in {".", ".."}
        or value.startswith("..")
    ):
        raise ValueError(
            f"a Secret key is 1-{MAX_NAME} letters, digits, '-', '_' or '.' (not '.' or "
            "starting with '..'), e.g. token"
        )
    return value


# Kubernetes resource quantities (480Gi, 120, 500m, 1e3), positive: Kubernetes' own grammar
# minus the sign, with at least one non-zero digit. The API server would take "-5Gi" and refuse
# only the pods, so the job would fail at its first attempt instead of at apply time.
QUANTITY_PATTERN = (
    r"^\+?([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)"
    r"([KMGTPE]i|[mkMGTPE]|[eE][-+]?[0-9]+)?$"
)


def _quantity(value: str) -> str:
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(
            "must be a positive Kubernetes quantity, e.g. 480Gi or 64Gi (memory), 120 or 500m (cpu)"
        )
    return value


Quantity = Annotated[
    str,
    Field(max_length=64, json_schema_extra={"pattern": QUANTITY_PATTERN}),
    AfterValidator(_quantity),
]


class Volume(SpecModel):
    name: Annotated[DnsLabel, AfterValidator(_volume_name)] = Field(
        description="Volume name inside the pod."
    )
    claim_name: str = Field(description="PersistentVolumeClaim to mount (e.g. the FSx claim).")
    mount_path: Annotated[PathStr, AfterValidator(_mount_path)] = Field(
        json_schema_extra={"pattern": r"^/[^\x00]*$"},
        description="Absolute mount path in the container.",
    )
    read_only: bool = Field(False, description="Mount read-only.")


class Toleration(SpecModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # An int64 in the pod spec; bounded where a CRD bound stays an exact JSON integer.
    toleration_seconds: int | None = Field(None, le=MAX_EXACT_INT)


class EnvVar(SpecModel):
    name: Annotated[EnvName, AfterValidator(_env_name)]
    value: str = Field(description="Plain value. Use `secrets` for anything sensitive.")


class SecretEnv(SpecModel):
    """An environment variable filled from a Secret; the value never enters the job object."""

    name: Annotated[EnvName, AfterValidator(_env_name)] = Field(
        description="Environment variable name, e.g. HF_TOKEN."
    )
    secret_name: DnsLabel = Field(description="Secret in the job's namespace.")
    key: Annotated[str, AfterValidator(_secret_key)] = Field(
        max_length=MAX_NAME,
        json_schema_extra={"pattern": "^[-._a-zA-Z0-9]+$"},
        description="Key inside the Secret.",
    )


class ClusterSpec(SpecModel):
    nodes: PositiveInt = Field(1, le=1024, description="Nodes (one training pod per node).")
    instance_type: InstanceTypeName = Field(
        "cpu", description="Instance type; selects cores, memory, devices and EFA per pod."
    )
    processes_per_node: PositiveInt | None = Field(
        None,
        le=128,
        description="Ranks per node; defaults to the instance type's NeuronCores (cpu: 2).",
    )
    image: str | None = Field(
        None,
        min_length=1,
        description="Trainer image (has torchrun, llamajob): a trainer target of the "
        "repository's Dockerfile, built and pushed by you. Default: the operator's trainer image "
        "for the job's device family (Helm value trainerImage); with neither, the job fails "
        "with InvalidSpec.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account_name: str | None = Field(None, description="Service account for the pods.")
    volumes: list[Volume] = Field(
        default_factory=list, description="PersistentVolumeClaims (FSx) mounted into every pod."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels, added to the instance-type selector.",
        json_schema_extra=_LABEL_VALUES_SCHEMA,
    )
    tolerations: list[Toleration] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    secrets: list[SecretEnv] = Field(
        default_factory=list, description="Environment variables taken from Secrets."
    )
    device_resource: str | None = Field(
        None, description="Override the accelerator resource name (default from the catalogue)."
    )
    efa_resource: str | None = Field(
        None, description="Override the EFA resource name (default vpc.amazonaws.com/efa)."
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit per pod, e.g. '120'.")
    memory: Quantity | None = Field(
        None, description="Memory request and limit per pod, e.g. '480Gi'."
    )
    shm_size: Quantity = Field("64Gi", description="Size limit of the in-memory /dev/shm.")
    priority_class_name: str | None = None
    scheduler_name: str | None = Field(
        None,
        max_length=253,
        description="Scheduler for the pods (a gang scheduler, say); default: the cluster's.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on every compile and training pod (keys under llamajob.dev/ "
        "are the operator's).",
        json_schema_extra=_LABEL_VALUES_SCHEMA,
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations on every compile and training pod, e.g. "
        "karpenter.sh/do-not-disrupt: 'true' so that consolidation leaves a running gang alone.",
    )
    hyperpod: bool = Field(
        True,
        description="SageMaker HyperPod nodes: select the ml.-prefixed instance type and the "
        "HyperPod health label Schedulable. false on plain EKS: select the EC2 instance type "
        "(no ml. prefix); node health is then the Ready condition alone.",
    )

    @field_validator("node_selector", "pod_labels")
    @classmethod
    def _labels(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        check_metadata_map(value, label_values=True, reserved=info.field_name == "pod_labels")
        return value

    @field_validator("pod_annotations")
    @classmethod
    def _annotations(cls, value: dict[str, str]) -> dict[str, str]:
        check_metadata_map(value, label_values=False, reserved=True)
        return value

    @model_validator(mode="after")
    def _unique_mounts(self) -> ClusterSpec:
        # Kubernetes refuses a pod with two volumes of one name or two mounts at one path, so
        # every attempt would fail at pod creation.
        names: set[str] = set()
        paths: set[str] = set()
        for i, v in enumerate(self.volumes):
            path = posixpath.normpath(re.sub("/+", "/", v.mount_path))
            if v.name in names:
                raise FieldValueError(
                    f"volumes[{i}].name", f"{v.name!r} is used twice; volume names are unique"
                )
            if path in paths:
                raise FieldValueError(
                    f"volumes[{i}].mountPath", f"{path} is mounted twice; use another path"
                )
            names.add(v.name)
            paths.add(path)
        return self


class RestartPolicy(SpecModel):
    max_restarts: int = Field(10, ge=0, le=1000, description="Gang restarts before Failed.")
    backoff_seconds: int = Field(
        30, ge=0, le=3600, description="First backoff; doubles per restart, capped at 10 minutes."
    )
    hang_timeout_seconds: int = Field(
        1800,
        ge=0,
        le=7 * 86400,  # a week: longer than any step or checkpoint, short enough to notice
        description="No step progress for this long counts as a fault (0 disables).",
    )
    avoid_faulty_nodes: bool = Field(
        True,
        description="Later attempts prefer other nodes than those where a node-level fault was "
        "seen (used again only when nothing else fits).",
    )
    process_restarts: int = Field(
        0,
        ge=0,
        le=100,
        description="torchrun restarts the training processes of a gang in place up to N times "
        "(c10d rendezvous; they resume from the newest checkpoint) before a fault ends the "
        "attempt. 0: every fault is a gang restart. Lost pods and nodes always are.",
    )
    on_divergence: Literal["Fail", "Rollback"] = Field(
        "Fail",
        description="A non-finite loss or gradient norm stops training before anything is "
        "saved. Fail: the job fails with reason TrainingDiverged. Rollback: a restart that "
        "resumes from the newest checkpoint, counted against maxRestarts (helps when the cause "
        "was transient, such as a faulty device; a divergence that the data or learning rate "
        "cause recurs at the same step and ends as Fail does).",
    )


class LlamaTrainingJobSpec(TrainingSpec):
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)  # type: ignore[arg-type]
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)  # type: ignore[arg-type]
    suspend: bool = Field(
        False,
        description="true stops the job's pods (the trainer saves the step it is on) and starts "
        "none until it is false again; then the next attempt resumes from the newest checkpoint, "
        "without backoff and not counted in restarts. A job created suspended is validated, "
        "nothing more. As a Kubernetes Job's suspend.",
    )


Phase = Literal[
    "Pending", "Compiling", "Training", "Restarting", "Suspended", "Succeeded", "Failed"
]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class StatusModel(BaseModel):
    """Status is written by the operator; unknown keys are dropped rather than rejected so an
    older operator can read a newer one's status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Fault(StatusModel):
    attempt: int = 0
    pod: str = ""
    node: str | None = None
    reason: str = ""
    message: str = ""
    time: str | None = None


class LlamaTrainingJobStatus(StatusModel):
    phase: Phase | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    attempt: int = Field(0, description="Current gang attempt (1 = first).")
    restarts: int = 0
    process_restarts: int | None = Field(
        None,
        description="In-place restarts of the training processes by torchrun in the current "
        "attempt (restartPolicy.processRestarts), as rank 0 reports them.",
    )
    checkpoints_quarantined: int | None = Field(
        None,
        description="Damaged or incomplete checkpoints in checkpoint.dir/quarantine/, where "
        "the trainer moves them instead of loading them (never deleted), as it last reported.",
    )
    world_size: int | None = None
    pods: int | None = None
    compile_key: str | None = None
    revision: str | None = Field(
        None, description="Spec revision the current attempt's pods run (restartPolicy aside)."
    )
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    loss_non_finite: Literal["nan", "inf", "-inf"] | None = Field(
        None,
        description="Set when the last reported loss was not a finite number (loss is then "
        "null): the training diverged.",
    )
    validation_loss: float | None = Field(
        None, description="Loss on the held-out validation sequences at the last evaluation."
    )
    tokens_per_second: float | None = None
    mfu: float | None = None
    last_checkpoint_step: int | None = None
    checkpoint_dir: str | None = Field(
        None, description="checkpoint.dir of the checkpoints this job has saved."
    )
    checkpoint_fingerprint: str | None = Field(
        None,
        description="Model fingerprint of those checkpoints (architecture and seqLength), as in "
        "their trainer_state.json. An edit that changes it fails the job before any pod starts.",
    )
    eta_seconds: float | None = None
    last_progress_time: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    restart_after: str | None = Field(None, description="Backoff: next attempt not before this.")
    faulty_nodes: list[str] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else is kept as given."""

    model_config = ConfigDict(extra="allow")
    name: str = "local"
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # The API server enforces this for objects it stores; a job file read locally must meet
        # it too, since the local runner makes directories from the name. Derived names (pods,
        # Service, ConfigMap) are shortened with a digest where needed (render._dns_label), so
        # any DNS subdomain yields valid ones.
        problem = dns_subdomain_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
            raise ValueError(
                "must be at most 63 lowercase letters, digits and '-', starting and ending with "
                "a letter or digit (a DNS label), e.g. training"
            )
        return value


class LlamaTrainingJob(BaseModel):
    """A whole object as in a YAML file or the API."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["llamajob.dev/v1alpha1"]
    kind: Literal["LlamaTrainingJob"]
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: LlamaTrainingJobSpec
    status: LlamaTrainingJobStatus | None = None

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> LlamaTrainingJob:
        return cls.model_validate(obj)
