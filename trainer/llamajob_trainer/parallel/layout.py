"""The parallel layout as plain data: degrees, schedule and per-rank batch shape.

Pure (no torch): ``make_layout`` is the single place where a config and a world size become a
layout, and where a layout the trainer cannot run is rejected with a message naming the field.
The operator's planner checks the same rules earlier; the trainer re-checks because it may be
started by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainerConfig
from ..presets import Architecture


class LayoutError(ValueError):
    """A layout this backend cannot run; the message names the spec field and the fix."""


@dataclass(frozen=True)
class Layout:
    world_size: int
    pp: int
    dp: int
    tp: int
    virtual_pipeline: int
    schedule: str  # "1F1B" | "GPipe" | "Interleaved1F1B"
    fsdp: bool
    sequence_parallel: bool
    activation_checkpointing: str  # "none" | "selective" | "full"
    bf16: bool
    torch_compile: bool
    micro_batch_size: int
    grad_accum: int
    seq_length: int

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_pipeline

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of a global rank; tp varies fastest (mesh order)."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return pp_rank, dp_rank, tp_rank

    def stage_ids(self, pp_rank: int) -> list[int]:
        """Pipeline stages held by a pp rank: round-robin (interleaved) when virtual > 1."""
        return [pp_rank + i * self.pp for i in range(self.virtual_pipeline)]


def make_layout(cfg: TrainerConfig, arch: Architecture, world_size: int) -> Layout:
    p = cfg.parallelism
    tp, pp = p.tensor, p.pipeline
    if world_size % (tp * pp):
        raise LayoutError(
            f"world size {world_size} is not a multiple of parallelism.tensor x "
            f"parallelism.pipeline = {tp} x {pp}"
        )
    dp = world_size // (tp * pp)
    neuron = cfg.resolved_backend == "nxd"
    if neuron and cfg.compile.torch_compile:
        raise LayoutError(
            "compile.torchCompile applies to the torch backend; on Trainium the compile step "
            "compiles the graphs with neuron_parallel_compile. Set torchCompile: false"
        )
    _check_tensor_parallel(arch, tp, p.kv_replicator if neuron else 1, neuron)
    if cfg.compile.torch_compile and tp > 1:
        raise LayoutError(
            f"compile.torchCompile does not combine with parallelism.tensor ({tp}) on the torch "
            "backend: torch 2.13 fails to compile tensor-parallel (DTensor) blocks on CPU. "
            "Set tensor: 1 (shard with fsdp) or torchCompile: false"
        )
    sp = p.sequence_parallel and tp > 1
    if sp and cfg.data.seq_length % tp:
        raise LayoutError(
            f"parallelism.sequenceParallel shards the sequence: data.seqLength "
            f"({cfg.data.seq_length}) must be a multiple of parallelism.tensor ({tp}); "
            "change one or set sequenceParallel: false"
        )
    mbs, gbs = cfg.batch.micro_batch_size, cfg.batch.global_batch_size
    if gbs % (mbs * dp):
        raise LayoutError(
            f"batch.globalBatchSize ({gbs}) must be a multiple of batch.microBatchSize x "
            f"data-parallel degree = {mbs} x {dp}"
        )
    grad_accum = gbs // (mbs * dp)
    vpp = p.virtual_pipeline if pp > 1 else 1
    schedule = "Interleaved1F1B" if vpp > 1 else p.pipeline_schedule
    if pp > 1:
        _check_pipeline(arch.num_layers, pp, vpp, schedule, grad_accum)
    return Layout(
        world_size=world_size,
        pp=pp,
        dp=dp,
        tp=tp,
        virtual_pipeline=vpp,
        schedule=schedule,
        fsdp=p.fsdp,
        sequence_parallel=sp,
        activation_checkpointing=p.activation_checkpointing,
        bf16=cfg.precision == "bf16-mixed",
        torch_compile=cfg.compile.torch_compile,
        micro_batch_size=mbs,
        grad_accum=grad_accum,
        seq_length=cfg.data.seq_length,
    )


def _check_tensor_parallel(arch: Architecture, tp: int, kv_rep: int, neuron: bool) -> None:
    sizes = {
        "model.numHeads": arch.num_heads,
        "model.intermediateSize": arch.intermediate_size,
        "model.vocabSize": arch.vocab_size,
    }
    for name, value in sizes.items():
        if value % tp:
            raise LayoutError(f"parallelism.tensor ({tp}) must divide {name} ({value})")
    if (arch.num_kv_heads * kv_rep) % tp:
        if neuron:
            raise LayoutError(
                f"parallelism.tensor ({tp}) must divide model.numKvHeads x "
                f"parallelism.kvReplicator = {arch.num_kv_heads} x {kv_rep}; raise kvReplicator "
                f"to {max(1, tp // max(1, arch.num_kv_heads))}"
            )
        raise LayoutError(
            f"parallelism.tensor ({tp}) must divide model.numKvHeads ({arch.num_kv_heads}): "
            "the torch backend does not replicate kv heads (the nxd backend's kvReplicator "
            "does); lower the tensor degree"
        )
    if neuron and tp % kv_rep:
        raise LayoutError(
            f"parallelism.kvReplicator ({kv_rep}) must divide parallelism.tensor ({tp})"
        )


def _check_pipeline(layers: int, pp: int, vpp: int, schedule: str, n_micro: int) -> None:
    if layers < pp * vpp:
        raise LayoutError(
            f"parallelism.pipeline x virtualPipeline = {pp} x {vpp} stages need at least as "
            f"many layers, the model has {layers}"
        )
    if schedule == "1F1B" and n_micro < pp:
        raise LayoutError(
            f"the 1F1B schedule needs at least parallelism.pipeline ({pp}) micro-batches per "
            f"step, got {n_micro} (globalBatchSize / (microBatchSize x data-parallel)); raise "
            "batch.globalBatchSize or use pipelineSchedule: GPipe"
        )
    if schedule == "Interleaved1F1B":
        rounds = max(1, n_micro // pp)
        if n_micro % rounds:
            raise LayoutError(
                f"the interleaved schedule needs the micro-batches per step ({n_micro}) to be "
                f"a multiple of {rounds} (= micro-batches // pipeline); adjust "
                "batch.globalBatchSize"
            )


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> range:
    """Layers of one pipeline stage: an even split, earlier stages take the remainder."""
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))
