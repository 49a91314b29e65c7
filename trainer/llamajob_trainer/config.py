"""The training part of a LlamaTrainingJob spec.

Pure pydantic, no torch: the operator imports this module to validate and render jobs, and the
trainer reads the same models from the ConfigMap the operator writes. Field names are camelCase
on the wire (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .presets import PRESETS, Architecture
from .protocol import compile_key

PresetName = Literal[
    "llama3-8b",
    "llama3-70b",
    "llama3.1-8b",
    "llama3.1-70b",
    "llama3.2-1b",
    "llama3.2-3b",
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "tiny",
]

PositiveInt = Annotated[int, Field(ge=1)]

# Upper bounds. Each is far above any published Llama (405B: 126 layers, hidden 16384, 128
# heads, 128K context, 15.6T tokens) yet small enough that the planner's arithmetic and the
# trainer's allocations stay meaningful: without them a typo such as an extra three zeros passes
# validation and fails hours later, or an integer beyond 64 bits crashes torch.
MAX_STEPS = 10**9  # steps and step intervals: a billion steps is centuries at a second each
MAX_TOKENS = 10**15  # 64x the largest published pre-training run
MAX_LAYERS = 1024
MAX_HIDDEN = 131072
MAX_HEADS = 4096  # head dim >= 32 at the largest hidden size
MAX_INTERMEDIATE = 1 << 20  # 8x the largest hidden size
MAX_VOCAB = 1 << 22  # 4M entries, 32x Llama 3's vocabulary
MAX_POSITIONS = 1 << 24  # 16M positions, above every published context length
MAX_MICRO_BATCH = 65536
MAX_GLOBAL_BATCH = 1 << 20
# Parallel degrees: real layouts keep tensor groups within a node (<= 128 ranks), pipeline stages
# divide the layers, and kvReplicator never needs to exceed the tensor degree.
MAX_PARALLEL = 1024
# The largest integer a JSON number holds exactly: the API server reads a CRD's bounds as float64
# and refuses an integer bound that is not exact (2**63 - 1 is not), so no bound goes above it.
MAX_EXACT_INT = 2**53 - 1
MAX_SEED = MAX_EXACT_INT  # torch.manual_seed takes up to 2**64 - 1; this is the JSON limit
# Paths: Linux's PATH_MAX and NAME_MAX. Longer paths fail only when the trainer opens them.
MAX_PATH = 4096
MAX_PATH_COMPONENT = 255


class FieldValueError(ValueError):
    """A model-level check that blames one field: ``field`` (camelCase, relative to the model
    that raised it) is appended to the error location, so the message names e.g.
    spec.model.hiddenSize rather than spec.model. See ``jobfile.errors_from_validation``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _nul_free(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, dict):
        return all(_nul_free(k) and _nul_free(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_nul_free(v) for v in value)
    return True


def _check_path(value: str) -> str:
    # An over-long name fails only when the trainer first writes the file, possibly after hours
    # of training. (NUL bytes are refused for every string: SpecModel._no_nul.)
    too_long = [part for part in value.split("/") if len(part) > MAX_PATH_COMPONENT]
    if too_long:
        raise ValueError(
            f"path component {too_long[0][:40]!r}... is {len(too_long[0])} characters; "
            f"file systems allow at most {MAX_PATH_COMPONENT}"
        )
    return value


# A file or directory path. The CRD carries the length and NUL rules too; component lengths are
# checked by the models only.
PathStr = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PATH, json_schema_extra={"pattern": r"^[^\x00]*$"}),
    AfterValidator(_check_path),
]


class SpecModel(BaseModel):
    """Base for every spec model: camelCase aliases, unknown fields rejected, finite floats.

    Python code may construct models by field name (``max_steps=...``); objects from YAML or the
    API are validated by alias only (``jobfile.parse_job``), since the CRD prunes any key that is
    not camelCase.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        validate_assignment=True,
        # .inf and .nan are valid YAML floats; no spec value means anything non-finite.
        allow_inf_nan=False,
    )

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # Kubernetes and YAML both carry a NUL in a string; exec(), open() and environment
        # variables do not, so it would fail only inside the pod.
        if not _nul_free(value):
            raise ValueError("must not contain a NUL character (\\0)")
        return value

    def to_wire(self) -> dict:
        """The object as it appears in YAML / the Kubernetes API (camelCase, no unset nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSpec(SpecModel):
    preset: PresetName = Field("tiny", description="Published architecture to start from.")
    hidden_size: PositiveInt | None = Field(
        None, le=MAX_HIDDEN, description="Override the preset's hidden size."
    )
    num_layers: PositiveInt | None = Field(
        None, le=MAX_LAYERS, description="Override the number of layers."
    )
    num_heads: PositiveInt | None = Field(
        None, le=MAX_HEADS, description="Override attention heads."
    )
    num_kv_heads: PositiveInt | None = Field(
        None, le=MAX_HEADS, description="Override key/value heads (grouped-query attention)."
    )
    intermediate_size: PositiveInt | None = Field(
        None, le=MAX_INTERMEDIATE, description="Override the MLP width."
    )
    vocab_size: PositiveInt | None = Field(
        None, le=MAX_VOCAB, description="Override the vocabulary size."
    )
    rope_theta: float | None = Field(None, gt=0, description="Override the RoPE base.")
    max_position_embeddings: PositiveInt | None = Field(
        None, le=MAX_POSITIONS, description="Override the maximum sequence length."
    )
    tokenizer: PathStr | None = Field(
        None,
        description="Path to a Hugging Face tokenizer.json; unset uses the built-in byte-level "
        "tokenizer.",
    )
    pretrained: PathStr | None = Field(
        None,
        description="Directory of Hugging Face safetensors weights to start from "
        "(continual pre-training). Ignored once a checkpoint exists.",
    )

    @model_validator(mode="after")
    def _even_head_dim(self) -> ModelSpec:
        arch = self.architecture()
        heads = arch.num_heads
        # Divisibility itself is the planner's check (it suggests the nearest valid size).
        if arch.hidden_size % heads == 0 and arch.head_dim % 2:
            # RoPE rotates pairs of dimensions: an odd head dim has no partner for its last one,
            # and the model would no longer be a Llama.
            step = 2 * heads
            lower, upper = arch.hidden_size // step * step, (arch.hidden_size // step + 1) * step
            use = f"{lower} or {upper}" if lower else str(upper)
            raise FieldValueError(
                "hiddenSize",
                f"{arch.hidden_size} / numHeads {heads} gives head dim {arch.head_dim}, which is "
                f"odd; RoPE needs an even head dim: use hiddenSize {use}",
            )
        return self

    def architecture(self) -> Architecture:
        return PRESETS[self.preset].with_overrides(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
        )


class DataSpec(SpecModel):
    path: PathStr = Field(
        "data/pydoc",
        description="Directory of a tokenized dataset written by `llamajob prepare-data` "
        "(on the shared file system in a cluster).",
    )
    seq_length: PositiveInt = Field(128, le=131072, description="Tokens per training sequence.")


class ParallelismSpec(SpecModel):
    tensor: PositiveInt = Field(1, le=MAX_PARALLEL, description="Tensor-parallel degree.")
    pipeline: PositiveInt = Field(1, le=MAX_PARALLEL, description="Pipeline-parallel degree.")
    virtual_pipeline: PositiveInt = Field(
        1, le=MAX_PARALLEL, description="Model chunks per pipeline rank (interleaved schedule)."
    )
    pipeline_schedule: Literal["1F1B", "GPipe", "Interleaved1F1B"] = Field(
        "1F1B", description="Pipeline schedule (torch backend)."
    )
    zero1: bool = Field(True, description="Shard optimizer states across data-parallel ranks.")
    fsdp: bool = Field(
        False,
        description="Torch backend: shard parameters too (FSDP2, ZeRO-3) instead of DDP.",
    )
    sequence_parallel: bool = Field(
        True, description="Shard norm/dropout activations along the sequence across TP ranks."
    )
    kv_replicator: PositiveInt = Field(
        1,
        le=MAX_PARALLEL,
        description="Replicate each key/value head this many times so that TP can exceed the "
        "number of kv heads (Neuron backend).",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "selective",
        description="Recompute in backward: none, selective (core attention) or full (each "
        "layer keeps only its input).",
    )


class BatchSpec(SpecModel):
    micro_batch_size: PositiveInt = Field(
        1, le=MAX_MICRO_BATCH, description="Sequences per rank per forward pass."
    )
    global_batch_size: PositiveInt = Field(
        8,
        le=MAX_GLOBAL_BATCH,
        description="Sequences per optimizer step across all data-parallel ranks; gradient "
        "accumulation is derived.",
    )


class OptimizerSpec(SpecModel):
    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, le=1, description="Learning rate at the end of decay.")
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm (0 = off).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")

    @model_validator(mode="after")
    def _lr_order(self) -> OptimizerSpec:
        if self.min_lr > self.lr:
            raise ValueError(f"minLr ({self.min_lr}) must not exceed lr ({self.lr})")
        for b in self.betas:
            if not 0 <= b < 1:
                raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        return self


ResumeMode = Literal["latestIfExists", "none"] | Annotated[int, Field(ge=0, le=MAX_STEPS)]


class CheckpointSpec(SpecModel):
    dir: PathStr = Field("checkpoints", description="Checkpoint directory (shared file system).")
    every_steps: PositiveInt = Field(50, le=MAX_STEPS, description="Save every N optimizer steps.")
    # Each kept checkpoint is a full copy of the model and optimizer state.
    keep: PositiveInt = Field(2, le=1000, description="Keep the newest N complete checkpoints.")
    resume: ResumeMode = Field(
        "latestIfExists",
        description="latestIfExists: newest complete checkpoint, if any; none: start fresh; "
        "an integer N: exactly step_N (an error if it is missing or incomplete).",
    )
    async_save: bool = Field(False, description="Write checkpoints in the background.")
    save_on_terminate: bool = Field(
        True,
        description="On SIGTERM (pod deletion, node drain, preemption) every rank finishes "
        "its step, saves a checkpoint and exits, so the restart loses no steps.",
    )
    terminate_grace_seconds: int = Field(
        300,
        ge=1,
        le=86400,
        description="Pod terminationGracePeriodSeconds: how long a SIGTERM-ed pod may take to "
        "finish its step and save before it is killed.",
    )


class ValidationSpec(SpecModel):
    sequences: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,  # a billion sequences: more than any dataset would hold out
        description="Hold out the last N sequences of data.path for a validation loss (never "
        "trained on); a multiple of batch.globalBatchSize. 0 turns validation off.",
    )
    every_steps: PositiveInt = Field(
        50, le=MAX_STEPS, description="Evaluate every N optimizer steps, and after the last step."
    )


class CompileSpec(SpecModel):
    enabled: bool = Field(True, description="Run the compile step before training.")
    cache_dir: PathStr = Field(
        "compile-cache",
        description="Compiler cache on the shared file system: Neuron's (NEURON_CC_FLAGS), or "
        "Inductor's (under inductor/) with torchCompile.",
    )
    steps: PositiveInt = Field(10, le=1000, description="Graph-extraction steps.")
    torch_compile: bool = Field(
        False,
        description="Torch backend: compile each transformer block with torch.compile "
        "(Inductor) for faster steps. The compile step fills the cache, so training reuses "
        "the kernels. Needs a C++ compiler on CPU. The nxd backend compiles through XLA "
        "instead; leave this false there.",
    )


class TrainingSpec(SpecModel):
    """Everything the trainer process needs; the job spec adds cluster and restart policy."""

    model: ModelSpec = Field(default_factory=ModelSpec)  # type: ignore[arg-type]
    data: DataSpec = Field(default_factory=DataSpec)  # type: ignore[arg-type]
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)  # type: ignore[arg-type]
    batch: BatchSpec = Field(default_factory=BatchSpec)  # type: ignore[arg-type]
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)  # type: ignore[arg-type]
    max_steps: PositiveInt | None = Field(
        None, le=MAX_STEPS, description="Optimizer steps to train; set this or maxTokens."
    )
    max_tokens: PositiveInt | None = Field(
        None, le=MAX_TOKENS, description="Tokens to train on; converted to steps (rounded up)."
    )
    precision: Literal["bf16-mixed", "fp32"] = Field(
        "bf16-mixed", description="bf16 compute with fp32 master weights, or plain fp32."
    )
    seed: int = Field(
        1234, ge=0, le=MAX_SEED, description="Seed for initialisation and data order."
    )
    backend: Literal["auto", "torch", "nxd"] = Field(
        "auto",
        description="Trainer backend. torch: native PyTorch (DDP/FSDP2, DTensor TP+SP, "
        "pipelining) on the device below. nxd: NeuronX Distributed on torch-xla, the only stack "
        "on trn1/trn1n. auto: nxd on trn1/trn1n, torch on everything else.",
    )
    device: Literal["auto", "cpu", "cuda", "neuron"] = Field(
        "auto",
        description="Torch backend: the device the ranks train on. auto: the instance type's "
        "(neuron on trn2/trn3 through TorchNeuron, cuda on GPU types, cpu on cpu); in a local "
        "run, whatever accelerator PyTorch finds (torch.accelerator), else cpu.",
    )
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)  # type: ignore[arg-type]
    validation: ValidationSpec = Field(default_factory=ValidationSpec)  # type: ignore[arg-type]
    compile: CompileSpec = Field(default_factory=CompileSpec)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.max_steps is None and self.max_tokens is None:
            self.max_steps = 100
        held_out, gbs = self.validation.sequences, self.batch.global_batch_size
        if held_out % gbs:
            raise ValueError(
                f"validation.sequences ({held_out}) must be a multiple of "
                f"batch.globalBatchSize ({gbs}): validation runs whole global batches; "
                f"use {max(gbs, held_out // gbs * gbs)}"
            )
        return self

    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.data.seq_length

    def total_steps(self) -> int:
        """maxSteps wins; otherwise maxTokens rounded up to whole steps."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None
        return -(-self.max_tokens // self.tokens_per_step())

    def compile_key(self, backend: str, image: str | None = None, device: str | None = None) -> str:
        """The compile key of this spec on ``backend`` and the resolved ``device`` (never
        ``auto``: the operator passes the instance type's, the trainer the one it runs on)."""
        p = self.parallelism
        layout = {
            "tensor": p.tensor,
            "pipeline": p.pipeline,
            "virtualPipeline": p.virtual_pipeline,
            "zero1": p.zero1,
            "fsdp": p.fsdp,
            "sequenceParallel": p.sequence_parallel,
            "kvReplicator": p.kv_replicator,
            "activationCheckpointing": p.activation_checkpointing,
            "torchCompile": self.compile.torch_compile,
        }
        if self.validation.sequences:
            # The compile step then also runs the forward-only graphs; keys of jobs without
            # validation stay what they were.
            layout["validation"] = True
        return compile_key(
            arch=self.model.architecture().__dict__,
            layout=layout,
            seq_length=self.data.seq_length,
            micro_batch_size=self.batch.micro_batch_size,
            precision=self.precision,
            backend=backend,
            image=image,
            device=device,
        )

    def training_fingerprint(self) -> str:
        """Hash of what makes checkpoints incompatible: architecture, seq length, seed."""
        payload = {
            "arch": self.model.architecture().__dict__,
            "seq": self.data.seq_length,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class TrainerConfig(TrainingSpec):
    """What the operator writes into the ConfigMap for `llamajob train --config`.

    The training spec plus the facts the trainer cannot derive itself: the job's identity (for
    metric labels), the resolved backend and the device's peak for MFU.
    """

    job_name: str = Field("local", description="Job name, used as the metrics `job` label.")
    namespace: str = Field("default", description="Namespace, the metrics `namespace` label.")
    resolved_backend: Literal["torch", "nxd"] = Field("torch")
    peak_tflops_per_core: float | None = Field(
        None, gt=0, description="Device peak for MFU; unset measures a matmul peak on CPU."
    )
    image: str | None = Field(None, description="Trainer image, part of the compile key.")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Rank 0 metrics port (0 = off).")
