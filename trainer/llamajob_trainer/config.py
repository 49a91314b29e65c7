"""The training part of a LlamaTrainingJob spec.

Pure pydantic, no torch: the operator imports this module to validate and render jobs, and the
trainer reads the same models from the ConfigMap the operator writes. Field names are camelCase
on the wire (Kubernetes style) and snake_case in Python.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
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


class SpecModel(BaseModel):
    """Base for every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict:
        """The object as it appears in YAML / the Kubernetes API (camelCase, no unset nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelSpec(SpecModel):
    preset: PresetName = Field("tiny", description="Published architecture to start from.")
    hidden_size: PositiveInt | None = Field(None, description="Override the preset's hidden size.")
    num_layers: PositiveInt | None = Field(None, description="Override the number of layers.")
    num_heads: PositiveInt | None = Field(None, description="Override attention heads.")
    num_kv_heads: PositiveInt | None = Field(
        None, description="Override key/value heads (grouped-query attention)."
    )
    intermediate_size: PositiveInt | None = Field(None, description="Override the MLP width.")
    vocab_size: PositiveInt | None = Field(None, description="Override the vocabulary size.")
    rope_theta: float | None = Field(None, gt=0, description="Override the RoPE base.")
    max_position_embeddings: PositiveInt | None = Field(
        None, description="Override the maximum sequence length."
    )
    tokenizer: str | None = Field(
        None,
        description="Path to a Hugging Face tokenizer.json; unset uses the built-in byte-level "
        "tokenizer.",
    )
    pretrained: str | None = Field(
        None,
        description="Directory of Hugging Face safetensors weights to start from "
        "(continual pre-training). Ignored once a checkpoint exists.",
    )

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
    path: str = Field(
        "data/pydoc",
        description="Directory of a tokenized dataset written by `llamajob prepare-data` "
        "(on the shared file system in a cluster).",
    )
    seq_length: PositiveInt = Field(128, le=131072, description="Tokens per training sequence.")


class ParallelismSpec(SpecModel):
    tensor: PositiveInt = Field(1, description="Tensor-parallel degree.")
    pipeline: PositiveInt = Field(1, description="Pipeline-parallel degree.")
    virtual_pipeline: PositiveInt = Field(
        1, description="Model chunks per pipeline rank (interleaved schedule)."
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
        description="Replicate each key/value head this many times so that TP can exceed the "
        "number of kv heads (Neuron backend).",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "selective",
        description="Recompute in backward: none, selective (core attention) or full (each "
        "layer keeps only its input).",
    )


class BatchSpec(SpecModel):
    micro_batch_size: PositiveInt = Field(1, description="Sequences per rank per forward pass.")
    global_batch_size: PositiveInt = Field(
        8,
        description="Sequences per optimizer step across all data-parallel ranks; gradient "
        "accumulation is derived.",
    )


class OptimizerSpec(SpecModel):
    lr: float = Field(3e-4, gt=0, le=1, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, le=1, description="Learning rate at the end of decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
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


ResumeMode = Literal["latestIfExists", "none"] | Annotated[int, Field(ge=0)]


class CheckpointSpec(SpecModel):
    dir: str = Field("checkpoints", description="Checkpoint directory (shared file system).")
    every_steps: PositiveInt = Field(50, description="Save every N optimizer steps.")
    keep: PositiveInt = Field(2, description="Keep the newest N complete checkpoints.")
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
        description="Hold out the last N sequences of data.path for a validation loss (never "
        "trained on); a multiple of batch.globalBatchSize. 0 turns validation off.",
    )
    every_steps: PositiveInt = Field(
        50, description="Evaluate every N optimizer steps, and after the last step."
    )


class CompileSpec(SpecModel):
    enabled: bool = Field(True, description="Run the compile step before training.")
    cache_dir: str = Field(
        "compile-cache",
        description="Compiler cache on the shared file system: Neuron's (NEURON_CC_FLAGS), or "
        "Inductor's (under inductor/) with torchCompile.",
    )
    steps: PositiveInt = Field(10, le=1000, description="Graph-extraction steps.")
    torch_compile: bool = Field(
        False,
        description="Torch backend: compile each transformer block with torch.compile "
        "(Inductor) for faster steps. The compile step fills the cache, so training reuses "
        "the kernels. Needs a C++ compiler on CPU. The neuron backend compiles through XLA "
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
        None, description="Optimizer steps to train; set this or maxTokens."
    )
    max_tokens: PositiveInt | None = Field(
        None, description="Tokens to train on; converted to steps (rounded up)."
    )
    precision: Literal["bf16-mixed", "fp32"] = Field(
        "bf16-mixed", description="bf16 compute with fp32 master weights, or plain fp32."
    )
    seed: int = Field(1234, ge=0, description="Seed for initialisation and data order.")
    backend: Literal["auto", "torch", "neuron"] = Field(
        "auto",
        description="auto: neuron on Trainium instance types, torch elsewhere.",
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

    def compile_key(self, backend: str, image: str | None = None) -> str:
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
    resolved_backend: Literal["torch", "neuron"] = Field("torch")
    peak_tflops_per_core: float | None = Field(
        None, gt=0, description="Device peak for MFU; unset measures a matmul peak on CPU."
    )
    image: str | None = Field(None, description="Trainer image, part of the compile key.")
    metrics_port: int = Field(9400, ge=0, le=65535, description="Rank 0 metrics port (0 = off).")
