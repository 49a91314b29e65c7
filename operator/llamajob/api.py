"""The LlamaTrainingJob resource: pydantic models for spec and status.

These models are the single source of truth: the CRD in ``crds/`` (see ``crd.py``), the chart's
copy, the operator's validation and the local runner all derive from them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from llamajob_trainer.config import PositiveInt, SpecModel, TrainingSpec
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from .catalogue import INSTANCE_TYPES

GROUP = "llamajob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LlamaTrainingJob"
PLURAL = "llamatrainingjobs"
SINGULAR = "llamatrainingjob"
SHORT_NAMES = ["ltj"]

InstanceTypeName = Literal["ml.trn1.32xlarge", "ml.trn1n.32xlarge", "ml.trn2.48xlarge", "cpu"]
assert set(InstanceTypeName.__args__) == set(INSTANCE_TYPES), "catalogue and enum drifted"

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


def _key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return (f"key {key!r}: the prefix before '/' must be a DNS subdomain (lowercase letters, "
                "digits, '-' and '.'), e.g. example.com/team")
    if not name or len(name) > 63 or not _NAME_PART.match(name):
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
            for k, v in value.items() if len(v) > 63 or not re.match(LABEL_VALUE_PATTERN, v)
        ]
    if problems:
        raise ValueError("; ".join(problems))


class Volume(SpecModel):
    name: DnsLabel = Field(description="Volume name inside the pod.")
    claim_name: str = Field(description="PersistentVolumeClaim to mount (e.g. the FSx claim).")
    mount_path: str = Field(pattern=r"^/", description="Absolute mount path in the container.")
    read_only: bool = Field(False, description="Mount read-only.")


class Toleration(SpecModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class EnvVar(SpecModel):
    name: EnvName
    value: str = Field(description="Plain value. Use `secrets` for anything sensitive.")


class SecretEnv(SpecModel):
    """An environment variable filled from a Secret; the value never enters the job object."""

    name: EnvName = Field(description="Environment variable name, e.g. HF_TOKEN.")
    secret_name: DnsLabel = Field(description="Secret in the job's namespace.")
    key: str = Field(description="Key inside the Secret.")


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
    image: str = Field(
        "ghcr.io/llamajob/trainer:0.1.0", description="Trainer image (has torchrun, llamajob)."
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
    cpu: str | None = Field(None, description="CPU request and limit per pod, e.g. '120'.")
    memory: str | None = Field(None, description="Memory request and limit per pod, e.g. '480Gi'.")
    shm_size: str = Field("64Gi", description="Size limit of the in-memory /dev/shm.")
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


class RestartPolicy(SpecModel):
    max_restarts: int = Field(10, ge=0, le=1000, description="Gang restarts before Failed.")
    backoff_seconds: int = Field(
        30, ge=0, le=3600, description="First backoff; doubles per restart, capped at 10 minutes."
    )
    hang_timeout_seconds: int = Field(
        1800,
        ge=0,
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
    world_size: int | None = None
    pods: int | None = None
    compile_key: str | None = None
    revision: str | None = Field(
        None, description="Spec revision the current attempt's pods run (restartPolicy aside)."
    )
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
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
