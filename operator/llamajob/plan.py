"""The planner: does this job's layout make sense, does it fit, what will it cost?

Pure functions over the spec. The operator runs `make_plan` before creating any pod (an invalid
or non-fitting job goes straight to Failed/InvalidSpec), and `llamajob plan` prints it.

Memory is estimated per rank (a NeuronCore, a GPU or a CPU process) on the most loaded pipeline
stage and compared with the device memory the catalogue gives per rank. There is one model per
trainer backend, because the two hold different things.

nxd backend (NeuronX Distributed on torch-xla; written for trn1), counted from what
parallel/neuron_backend.py asks NxD for: torch.autocast("xla", bf16) over fp32 parameters, NxD's
mixed_precision_config with use_master_weights, use_fp32_grad_acc and use_master_weights_in_ckpt
all off, and ZeRO-1 when parallelism.zero1. Read at aws-neuron/neuronx-distributed v2.28.0 (the
Neuron 2.28 release) and pytorch/xla v2.9.0:
- States, bytes per parameter held by the core (after TP/PP sharding), whatever the precision:
  4 (the fp32 parameter) + 4 (its fp32 .grad: the bf16 casts are differentiable, so the
  gradient lands in the parameter's dtype) + 12/DP under ZeRO-1 (8 without). NxD's
  initialize_optimizer_from_class (trainer/trainer.py L243-315) builds NeuronZero1Optimizer and
  passes optimizer_dtype only when use_master_weights is on (L281-283), so torch-xla's default,
  fp32, applies (torch_xla/distributed/zero_redundancy_optimizer.py L101). _shard_parameters
  (L234-269) copies each parameter's DP shard into a new fp32 nn.Parameter even when the
  parameter is fp32 already, and AdamW steps those shards (init_zero, L138): a 4-byte shard copy
  plus the 4-byte exp_avg and exp_avg_sq, 12/DP. use_master_weights would only make that copy
  double precision (with XLA_DOWNCAST_BF16=1) and halve a bucket size (L261-283): the fp32 copy
  is there with it off. Without ZeRO-1 NxD steps the optimizer on the parameters themselves:
  exp_avg and exp_avg_sq, 8.
- Step buffers, held during the optimizer step only (step_buffer): _reduce_gradients (L339-401)
  gives every shard an fp32 gradient of 4/DP, dropped after the step (L411), and
  allgather_weights_and_update_full_parameter (L440-486) all-gathers the updated shards into
  full-size fp32 tensors, 4, before copying them into the parameters. So 4 + 4/DP under ZeRO-1.
  These peak after backward: the trainer always clips (max_grad_norm is infinite when
  gradClip is 0), and the clip needs the norm of every gradient, so no shard can be updated,
  and none gathered, before the whole backward is done and its activations are free.
- bf16 weight copies (gather_buffer) under bf16-mixed: NxD's parallel linears cast their weight
  to bf16 before the matmul and save the cast for backward (linear_with_async_allreduce,
  parallel_layers/layers.py L508-533; _linear_autograd_base_setup_fwd, layers_utils.py L50-53), as
  autocast's weight cache does for plain matmuls: 2 bytes per matmul parameter of the stage from
  forward to backward. Under whole-block recompute without a pipeline this overstates what is
  held (the checkpointed forward saves nothing), by at most those 2 bytes.
- Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models"), 16-bit activations per layer and micro-batch: s*b*h*(34 + 5*a*s/h) without
  recompute; the 5*a*s/h term (the attention scores and softmax, b x a/t x s x s each) leaves
  the layers' saved set under selective recompute; with sequence parallel everything divides by
  t, without it only the 24 inside the 34 does. The scores do not leave the working set: a layer
  whose core or whole block is recomputed rebuilds them during its backward (the model's
  attention core materialises them: the trainer uses no fused attention kernel on XLA), so
  selective recompute adds one layer's 5*a*s/h and full recompute counts one layer's whole
  34 + 5*a*s/h on top of each layer's input (2*s*b*h, /t with SP). The first pipeline stage
  holds min(pp, micro-batches) micro-batches in flight under 1F1B, all of them under GPipe,
  and (1 + (pp-1)/(pp*v)) times more under the interleaved schedule.
- Logits: fp32 logits and their gradient on the last stage, vocabulary split over TP.
- Layouts the runtime refuses are errors, not estimates: on trn1 the tensor-parallel degree is
  one of NXD_TRN1_TENSOR_DEGREES, and kvReplicator must satisfy NxD's GQAQKVColumnParallelLinear
  and the trainer's kv-head placement (nxd_kv_replicators).

torch backend (parallel/torch_backend.py: DDP or FSDP2, DTensor TP + SP, torch pipelining),
counted from what that code allocates. P is the stage's parameters per TP rank, B one block's,
D the data-parallel degree, c the compute dtype's bytes (2 under bf16-mixed, 4 under fp32):
- States: parameters stay fp32 whatever the precision (bf16-mixed computes in bf16 from them,
  through FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) with FSDP and
  torch.autocast without), so 4 (parameters) + 4 (gradients) + 8 (AdamW moments) bytes per
  parameter. FSDP (parallelism.fsdp, full shard) divides all 16 by D; DDP keeps the replica, and
  its buckets add nothing because the gradients are views into them (gradient_as_bucket_view).
- Gathered or cast parameters (gather_buffer). FSDP: the root's parameters (embedding, final
  norm, head) gathered in dtype c for the whole step, since FSDP2 never reshards the root after
  forward, plus the head's unsharded gradient, which waits for the root's reduce-scatter at the
  end of backward; per block (3c + 4)*B: the block in backward, the one prefetched behind it,
  the block's unsharded gradient, and the previous block's fp32 reduce-scatter input (FSDP2
  keeps one in flight). Pipeline stages do not reshard after forward (and torch pipelining turns
  resharding after backward off until the last micro-batch), so there the whole stage stays
  gathered: c*P + (c + 4)*B. Without FSDP under bf16-mixed, autocast casts each matmul weight
  to bf16 once per forward and backward keeps the copy: 2 bytes per matmul parameter.
- Accumulation: with FSDP and more than one micro-batch per step (gradient accumulation, or any
  pipeline) the trainer turns gradient sync off until the last micro-batch, and FSDP2 keeps
  every unsharded gradient in fp32 until then: 4*P, not divided by D.
- Activations, bytes per token and block, as model.py saves them (the tests measure them on
  CPU): each RMSNorm keeps an fp32 copy of its input, its normalised input in the residual dtype
  r and its rsqrt, 2*(4 + r)*h + 8, divided by t under SP (r is 2 under FSDP's bf16 parameters,
  4 when autocast leaves the residual stream in fp32 and under fp32); the q/k/v and w1/w3 inputs
  2*c*h, or 5 bf16 copies (10*h) under autocast, which casts the input once per linear, never
  divided by t (under SP the gathered input is what the linear keeps); attention
  c*(3h + 2*kv) + 4*a (q and k after RoPE, v, the SDPA output and its log-sum-exp, and the copy
  wo takes) and the MLP 4*c*i, both divided by t; plus RoPE's casts of its tables, 2*s*d*c per
  block and micro-batch in bf16. Selective recompute drops the SDPA output and log-sum-exp. The
  attention core is counted as a fused (flash) kernel that keeps no s x s scores, as SDPA is on
  CUDA and CPU; torch.compile, which fuses and recomputes more, is not modelled. Full recompute
  keeps each block's input (r*h, /t under SP) plus one block's working set, and micro-batches in
  flight follow the schedules as for nxd.
- Logits: 12 bytes per token and vocabulary entry on the last stage at the start of backward
  (the fp32 log-probabilities cross-entropy keeps, the fp32 gradient from the NLL and the fp32
  gradient of the logits), vocabulary-sharded over TP by loss parallel; plus the final norm and
  the head's input.
- Step buffers, held after backward when activations and logits are gone, so counted as the
  larger of the two phases rather than on top: the flat copy of every gradient that tensor
  parallel without FSDP all-reduces over D (4*P), and AdamW's foreach temporaries (4 bytes per
  updated parameter) where it cannot run fused (on Neuron, or over a mix of DTensor and plain
  parameters).

Both models add a runtime reserve per device family (RUNTIME_RESERVE_GIB).

The torch model is checked against the minimum-platform table of AWS's GPU FSDP sample
(tests/test_plan_gpu_fsdp.py), with two deviations left visible there: the sample offloads saved
activations to CPU, which this trainer does not do, so at the sample's settings the planner
counts each layer's input on the device (2*s*h bytes per layer) where the sample holds none; and
the table's 4 p5en nodes for Llama 3.1 70B are not reproduced, because at the sample's settings
that row holds the same as its Llama 2 70B row, which fits on 2.

Compute: FLOPs per token = 6*N + 12*L*h*s (Chowdhery et al. 2022, PaLM appendix B), with N the
parameters that take part in matmuls (the input embedding lookup does not). Step time follows from
an assumed MFU of the instance's peak (DEFAULT_MFU_BY_FAMILY, by mfu_family: the catalogue
family, with trn1 split into pipelined and unpipelined NxD layouts), or a measured TFLOPS per node.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Literal

from llamajob_trainer.presets import Architecture

from .api import QUANTITY_PATTERN, LlamaTrainingJobSpec
from .catalogue import GIB, INSTANCE_TYPES, POD_SHARE_PERCENT, InstanceType
from .jobfile import SpecError

# Default utilisation when nothing was measured, by MFU family (mfu_family: the catalogue family,
# with trn1 split by whether NxD pipelines; a family not listed gets DEFAULT_MFU). MFU here is
# the planner's own: flops_per_token at the catalogue peak, so a published throughput converts
# into it exactly (benchmarks/planner_vs_published.py prints the conversions).
# - trn1+pp (NxD TP + PP + DP on trn1): AWS's two published Llama 3 70B runs with the layout of
#   examples/llama3-70b.yaml (TP=32, PP=8, micro-batch 1, global batch 1024, sequence 8192), in
#   that unit: 32.2% on 32 nodes (7.94 seq/s, Neuron 2.24: about-neuron/benchmarks/trn1/
#   training_data_decoder.csv in aws-neuron/aws-neuron-sdk) and 34.1% on 16 nodes (243.8 s/step
#   over steps 2-5 of NxD's run_llama3_70B_tp_pp.sh in the SageMaker HyperPod Llama 3 70B trn1
#   guide: awslabs/ai-on-sagemaker-hyperpod, website/docs/02-slurm-blueprints/training/trainium/
#   Llama3-70B/04-training.md L165-169). 0.33 puts both within 4% (16 nodes do a little better:
#   half the data-parallel replicas, each running 512 micro-batches behind the same pipeline fill
#   instead of 256, and a later release).
# - trn1 (NxD without pipeline: TP + ZeRO-1 data parallel): the published Llama 3.1 8B run at
#   TP=32 on 32 nodes works out to 23.4% (47.95 seq/s, Neuron 2.24, same file); the HyperPod
#   tutorial measured ~21% (634 of 3,040 TFLOPS, Llama-3-8B at TP=32 on one trn1.32xlarge).
#   Small per-core matmuls (hidden 4096 over 32 cores) are what keep it below the 70B figure,
#   and the figure is for TP=32: AWS's Llama2-7B at TP=8 on 16 nodes (sequence 4096, Neuron
#   2.21) implies 36.9%, so the planner is 60% slow there (the benchmark prints it).
# - trn2, trn3 (torch on TorchNeuron): no published TorchNeuron or TorchTitan-Neuron throughput
#   to derive one from (see benchmarks/planner_vs_published.py), so the single trn1 figure used
#   before the split above is kept; pass --mfu or --tflops once measured.
# - gpu: torchtitan's own benchmark, benchmarks/llama3_h100_202412_torchtitan.md in
#   pytorch/torchtitan: FSDP2 Llama 3.1 8B on 8 or 128 H100s without Float8 reaches 33% MFU in
#   eager mode (39% compiled), the same building blocks (FSDP2, bf16 parameters, fp32 reduce) as
#   the torch backend, which runs eager unless compile.torchCompile.
# - cpu: a placeholder, like the CPU peak it multiplies.
DEFAULT_MFU = 0.25
DEFAULT_MFU_BY_FAMILY: dict[str, float] = {
    "trn1": 0.23,
    "trn1+pp": 0.33,
    "trn2": 0.25,
    "trn3": 0.25,
    "gpu": 0.33,
    "cpu": 0.25,
}

# Device memory no tensor of the job can use, by catalogue family (a family not listed gets the
# largest, so a new type is judged conservatively rather than failing).
# - trn1, trn2, trn3: the Neuron runtime, the collectives' buffers and the loaded program.
# - gpu: the CUDA context (about 0.3 GiB with lazy module loading, CUDA 11.7 and later:
#   pytorch/pytorch#107667) and the NCCL communicators (0.5 to 0.7 GiB each on four NVLink A100s:
#   NVIDIA/nccl#964); the torch backend initialises at least two, the world group and the
#   data-parallel group.
# - cpu: the Python process and the gloo buffers.
RUNTIME_RESERVE_GIB: dict[str, float] = {
    "trn1": 1.0,
    "trn2": 1.0,
    "trn3": 1.0,
    "gpu": 2.0,
    "cpu": 0.5,
}


def mfu_family(spec: LlamaTrainingJobSpec) -> str:
    """The DEFAULT_MFU_BY_FAMILY key of a job: its instance's family, except that pipelined
    layouts on trn1 (NxD's TP + PP) are calibrated apart from unpipelined ones."""
    family = INSTANCE_TYPES[spec.cluster.instance_type].family
    if family == "trn1" and spec.parallelism.pipeline > 1:
        return "trn1+pp"
    return family


def default_mfu(inst: InstanceType, spec: LlamaTrainingJobSpec | None = None) -> float:
    """The assumed MFU of a job (or, without one, of the instance's family as such)."""
    family = inst.family if spec is None else mfu_family(spec)
    return DEFAULT_MFU_BY_FAMILY.get(family, DEFAULT_MFU_BY_FAMILY.get(inst.family, DEFAULT_MFU))


def runtime_reserve_bytes(inst: InstanceType) -> float:
    gib = RUNTIME_RESERVE_GIB.get(inst.family, max(RUNTIME_RESERVE_GIB.values()))
    return gib * GIB


# Host memory each rank's process is taken to need at the least (the interpreter, torch, the
# device runtime's host side, data loading). The in-memory /dev/shm counts against the pod's
# memory limit, so spec.cluster.shmSize must leave this much per rank inside it. A floor that
# catches a /dev/shm crowding out the processes, not an estimate of what they use.
HOST_MEMORY_PER_RANK_GIB = 4

_QUANTITY_SUFFIX: dict[str, Decimal] = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "m": Decimal("0.001"),
    "": Decimal(1),
}


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity of the spec (api.QUANTITY_PATTERN) as a number: bytes or cores."""
    match = re.fullmatch(QUANTITY_PATTERN, value)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = Decimal(match.group(1)), match.group(3) or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** int(suffix[1:])
    return number * _QUANTITY_SUFFIX[suffix]


def pod_cpu_memory(spec: LlamaTrainingJobSpec) -> dict[str, str]:
    """The cpu and memory every compile and training pod requests, limits equal: the user's
    spec.cluster.cpu and memory, else the instance type's defaults (catalogue.POD_SHARE_PERCENT
    of the node's vCPUs and memory), which make the pods Guaranteed QoS. Types without host
    figures (``cpu``, which is any machine, and trn3) have no defaults."""
    cluster = spec.cluster
    inst = INSTANCE_TYPES[cluster.instance_type]
    out: dict[str, str] = {}
    cpu = cluster.cpu or (str(inst.pod_cpu) if inst.pod_cpu else None)
    memory = cluster.memory or (f"{inst.pod_memory_gib}Gi" if inst.pod_memory_gib else None)
    if cpu:
        out["cpu"] = cpu
    if memory:
        out["memory"] = memory
    return out


def _shm_problem(spec: LlamaTrainingJobSpec, inst: InstanceType, ranks: int) -> str | None:
    """Why spec.cluster.shmSize does not fit the pod's memory limit beside its ranks, if so."""
    memory = pod_cpu_memory(spec).get("memory")
    if memory is None:
        return None  # no limit: /dev/shm is bounded by its sizeLimit and the node alone
    limit, shm = quantity(memory), quantity(spec.cluster.shm_size)
    kept = Decimal(ranks * HOST_MEMORY_PER_RANK_GIB * GIB)
    if shm <= limit - kept:
        return None
    if spec.cluster.memory:
        whose = "spec.cluster.memory"
    else:
        whose = f"the default, {POD_SHARE_PERCENT}% of {inst.name}'s {inst.host_memory_gib} GiB"
    fixes = []
    room_gib = math.floor((limit - kept) / GIB)
    if room_gib >= 1:
        fixes.append(f"use a shmSize of at most {room_gib}Gi")
    need_gib = math.ceil((shm + kept) / GIB)
    if inst.pod_memory_gib is None or need_gib <= inst.pod_memory_gib:
        fixes.append(f"set spec.cluster.memory to at least {need_gib}Gi")
    fix = " or ".join(fixes) or "lower shmSize and raise spec.cluster.memory"
    return (
        f"{spec.cluster.shm_size} of /dev/shm is memory and counts against the pod's memory "
        f"limit of {memory} ({whose}), which must also hold {HOST_MEMORY_PER_RANK_GIB} GiB for "
        f"each of the {ranks} ranks; {fix}"
    )


@dataclass(frozen=True)
class Memory:
    """Bytes per rank on the most loaded pipeline stage.

    Two phases peak at different times: forward/backward (gathered parameters, accumulated
    gradients, activations, logits) and the optimizer step (step_buffer), after backward has
    freed the activations. The total is the states, the reserve and the larger phase.
    """

    weights: float
    gradients: float
    optimizer: float
    gather_buffer: float
    activations: float
    logits: float
    reserve: float
    accumulation: float = 0.0
    step_buffer: float = 0.0

    @property
    def total(self) -> float:
        backward = self.gather_buffer + self.accumulation + self.activations + self.logits
        states = self.weights + self.gradients + self.optimizer + self.reserve
        return states + max(backward, self.step_buffer)

    def gib(self) -> dict[str, float]:
        out = {k: round(v / GIB, 3) for k, v in asdict(self).items()}
        out["total"] = round(self.total / GIB, 3)
        return out


@dataclass
class Plan:
    spec: LlamaTrainingJobSpec
    instance: InstanceType
    backend: str
    device: str
    nodes: int
    processes_per_node: int
    world_size: int
    tensor: int
    pipeline: int
    data_parallel: int
    grad_accum: int
    errors: list[SpecError] = field(default_factory=list)
    num_params: int = 0
    params_per_core: int = 0
    memory: Memory | None = None
    suggestion: str | None = None
    flops_per_token: float = 0.0
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    assumed_mfu: float | None = None
    tflops_per_node: float = 0.0
    step_seconds: float = 0.0
    total_steps: int = 0
    total_tokens: int = 0
    total_seconds: float = 0.0
    price_per_hour: float = 0.0
    total_cost_usd: float = 0.0

    @property
    def pods(self) -> int:
        return self.nodes

    @property
    def core_memory_gib(self) -> float:
        return self.instance.memory_per_core_gib

    @property
    def memory_per_core_gib(self) -> float | None:
        return None if self.memory is None else self.memory.total / GIB

    @property
    def margin_gib(self) -> float | None:
        used = self.memory_per_core_gib
        return None if used is None else self.core_memory_gib - used

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.core_memory_gib * GIB

    @property
    def valid(self) -> bool:
        return not self.errors and self.fits

    def problems(self) -> list[SpecError]:
        """Errors, plus the memory verdict as one when the layout is sound but does not fit."""
        if self.errors or self.fits or self.memory is None:
            return list(self.errors)
        fix = f"; smallest change that fits: {self.suggestion}" if self.suggestion else ""
        msg = (
            f"needs {self.memory_per_core_gib:.1f} GiB per core but {self.instance.name} has "
            f"{self.core_memory_gib:.0f} GiB{fix}"
        )
        return [SpecError("spec.parallelism", msg)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "valid": self.valid,
            "memory_per_core_gib": _r(self.memory_per_core_gib),
            "core_memory_gib": self.core_memory_gib,
            "margin_gib": _r(self.margin_gib),
            "memory_breakdown_gib": self.memory.gib() if self.memory else None,
            "suggestion": self.suggestion,
            "instance_type": self.instance.name,
            "backend": self.backend,
            "device": self.device,
            "nodes": self.nodes,
            "processes_per_node": self.processes_per_node,
            "world_size": self.world_size,
            "tensor_parallel": self.tensor,
            "pipeline_parallel": self.pipeline,
            "data_parallel": self.data_parallel,
            "grad_accum": self.grad_accum,
            "pods": self.pods,
            "num_params": self.num_params,
            "params_per_core": self.params_per_core,
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": self.tokens_per_step,
            "flops_per_step": self.flops_per_step,
            "assumed_mfu": self.assumed_mfu,
            "tflops_per_node": _r(self.tflops_per_node),
            "step_seconds": _r(self.step_seconds),
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "total_seconds": _r(self.total_seconds),
            "price_per_hour": self.price_per_hour,
            "total_cost_usd": _r(self.total_cost_usd, 2),
            "errors": [e.to_dict() for e in self.problems()],
        }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# The operator plans every job it sees, whatever numbers its spec carries (an older CRD admits
# any integer), so no search may take time in proportion to one of them. Trial division stops
# at _TRIAL_LIMIT: every divisor of n <= _TRIAL_LIMIT**2 (10**10, beyond any real model) is
# found, and no search takes more than about 10 ms for a 64-bit n. Past 10**10 the searches
# still answer with true divisors (the small ones and their cofactors, plus those within
# _NEAR_WINDOW of the value asked about), though one in between may be missed.
_TRIAL_LIMIT = 10**5
_NEAR_WINDOW = 1024


def _divisors(n: int, near: int | None = None) -> list[int]:
    """Divisors of n, ascending: all of them for n <= _TRIAL_LIMIT**2; past that those up to
    _TRIAL_LIMIT, their cofactors, and (given ``near``) those within _NEAR_WINDOW of it."""
    small = [d for d in range(1, min(math.isqrt(n), _TRIAL_LIMIT) + 1) if n % d == 0]
    found = set(small) | {n // d for d in small}
    if near is not None and n > _TRIAL_LIMIT**2:
        lo, hi = max(1, near - _NEAR_WINDOW), min(n, near + _NEAR_WINDOW)
        found.update(d for d in range(lo, hi + 1) if n % d == 0)
    return sorted(found)


def _nearest(value: int, candidates: list[int]) -> int | None:
    return min(candidates, key=lambda c: (abs(c - value), c)) if candidates else None


def resolve_backend(spec: LlamaTrainingJobSpec) -> str:
    """The trainer backend: the spec's, or the instance type's default."""
    if spec.backend != "auto":
        return spec.backend
    return INSTANCE_TYPES[spec.cluster.instance_type].backend


def resolve_device(spec: LlamaTrainingJobSpec) -> str:
    """The device the ranks train on: the instance type's (validate_layout refuses another)."""
    return INSTANCE_TYPES[spec.cluster.instance_type].device


# Tensor-parallel degrees NxD runs on trn1/trn1n. A trn1.32xlarge's 16 chips are a 2D torus
# (about-neuron/arch/neuron-hardware/trn1-arch.rst in aws-neuron/aws-neuron-sdk), and the Neuron
# runtime runs collectives over the replica groups it supports there, not over any set of cores:
# - the Neuron Calculator's tensor-parallel degrees for Trn1 are 2, 8 and 32
#   (about-neuron/calculator/neuron-calculator.rst L574-577);
# - the runtime of Neuron 2.21 "added support for 4-rank replica group on adjacent Neuron cores
#   on TRN1/TRN1N" (release-notes/components/runtime.rst L1176), and NxD gives TP=4 exactly such
#   groups on trn1 (parallel_state.py L594-618 at v2.28.0) where every other degree takes
#   consecutive ranks;
# - NxD's own trn1 integration configs (test/integration/combinatorial_tests/configs) and every
#   published trn1 Llama result (training_data_decoder.csv) use TP=8 or TP=32;
# - 1 is data parallelism alone.
# 16 is in none of them: on one node it makes the tensor groups (0..15), (16..31) and the
# data-parallel groups (0, 16), (1, 17), ..., and Llama-3-8B at TP=16 x DP=2 on one trn1.32xlarge
# failed at start-up with a replica-group error.
NXD_TRN1_TENSOR_DEGREES: tuple[int, ...] = (1, 2, 4, 8, 32)


def nxd_kv_replicators(arch: Architecture, tp: int, family: str = "trn1") -> list[int]:
    """kvReplicator values the nxd backend accepts at tensor degree ``tp`` on a catalogue
    ``family``, ascending.

    - NxD's GQAQKVColumnParallelLinear asserts that the tensor degree is a multiple of
      kv_size_multiplier (modules/qkv_linear.py L444 at v2.28.0; initialize_kv_group builds the
      kv-sharing groups from it, parallel_state.py L1486), and that the replicated kv heads
      split evenly over the tensor ranks (L445-447; the trainer needs whole heads per rank, so
      numKvHeads x kvReplicator, not only its width, must divide by the degree).
    - Each copy of a kv head must serve whole query heads, so kvReplicator divides the query
      heads per kv head (the trainer's _gqa_heads in parallel/neuron_backend.py).
    - On trn2 NxD places the copies of a kv head on adjacent ranks (repeat_interleave,
      qkv_linear.py L83) and makes every run of kvReplicator adjacent ranks one kv-sharing group
      (arrange_kv_groups, parallel_state.py L1615-1628), so each rank must hold exactly one kv
      head: numKvHeads x kvReplicator equals the degree. trn1's interleaved copies (L86) give
      every rank of a group the same heads however many there are.
    With kvReplicator 1 the plain column-parallel k/v projections need the kv heads to divide
    by the degree, which is the same condition.
    """
    kv = arch.num_kv_heads
    group = arch.num_heads // kv if arch.num_heads % kv == 0 else 0
    return [
        r for r in _divisors(tp)
        if (kv * r) % tp == 0 and (group == 0 or group % r == 0)
        and (r == 1 or family != "trn2" or kv * r == tp)
    ]


def _nxd_kv_problem(arch: Architecture, tp: int, rep: int, family: str) -> str | None:
    """Why kvReplicator ``rep`` does not work at tensor ``tp`` under nxd on ``family``, with
    the fix; None when it does."""
    valid = nxd_kv_replicators(arch, tp, family)
    if rep in valid:
        return None
    fix = (
        f"use kvReplicator: {_nearest(rep, valid)}" if valid
        else "no kvReplicator works at this tensor degree; lower parallelism.tensor"
    )
    kv, group = arch.num_kv_heads, arch.num_heads // max(1, arch.num_kv_heads)
    if tp % rep:
        why = (
            f"{rep} does not divide tensor {tp}: NxD's GQAQKVColumnParallelLinear shares each kv "
            "head over groups of kvReplicator ranks inside the tensor group"
        )
    elif (kv * rep) % tp:
        why = f"{kv} kv heads x kvReplicator {rep} is not divisible by tensor {tp}"
    elif group % rep == 0:
        why = (
            f"{kv} kv heads x kvReplicator {rep} is not tensor {tp}: on {family} NxD holds one "
            "kv head per rank"
        )
    else:
        why = (
            f"{rep} does not divide the {group} query heads per kv head: each copy of a kv head "
            "must serve whole query heads"
        )
    return f"{why}; {fix}"


def validate_layout(spec: LlamaTrainingJobSpec) -> list[SpecError]:
    """Structural checks: each error names the field and the nearest value that works."""
    errors: list[SpecError] = []
    arch = spec.model.architecture()
    inst = INSTANCE_TYPES[spec.cluster.instance_type]
    backend = resolve_backend(spec)
    par = spec.parallelism
    ppn = spec.cluster.processes_per_node or inst.cores_per_node
    world = spec.cluster.nodes * ppn
    tp, pp, vpp = par.tensor, par.pipeline, par.virtual_pipeline

    def err(path: str, msg: str) -> None:
        errors.append(SpecError(f"spec.{path}", msg))

    if backend not in inst.backends:
        why = {
            "nxd": "NeuronX Distributed needs Trainium",
            "torch": "there is no TorchNeuron on trn1/trn1n, only NeuronX Distributed",
        }[backend]
        err("backend", f"{backend} cannot run on {inst.name} ({why}); use auto or "
            f"{' or '.join(inst.backends)}")
    if spec.cluster.hyperpod and inst.device_resource and not inst.name.startswith("ml."):
        err("cluster.hyperpod", f"{inst.name} is not a SageMaker HyperPod instance type, so no "
            "node would carry the HyperPod labels its pods select; set hyperpod: false (plain "
            "EKS)")
    if spec.device != "auto" and spec.device != inst.device:
        err("device", f"{inst.name} trains on {inst.device}, not {spec.device}; use auto or "
            f"{inst.device}")
    if inst.family != "cpu" and ppn > inst.cores_per_node:
        # One rank per NeuronCore or GPU: NCCL refuses two ranks on one GPU.
        unit = "NeuronCores" if inst.trainium else "GPUs"
        err(
            "cluster.processesPerNode",
            f"{ppn} exceeds the {inst.cores_per_node} {unit} of {inst.name}; "
            f"use {inst.cores_per_node}",
        )
    elif shm := _shm_problem(spec, inst, ppn):
        # Judged with a rank count that can run, not the one just refused. No CEL rule mirrors
        # this one (cel.py): a job it refuses is stored and then fails as InvalidSpec.
        err("cluster.shmSize", shm)
    if arch.hidden_size % arch.num_heads:
        fit = _nearest(arch.hidden_size, [d * arch.num_heads for d in range(1, 1025)])
        err(
            "model.hiddenSize",
            f"{arch.hidden_size} is not divisible by numHeads "
            f"{arch.num_heads}; nearest valid: {fit}",
        )
    if arch.num_heads % arch.num_kv_heads:
        fit = _nearest(arch.num_kv_heads, _divisors(arch.num_heads, near=arch.num_kv_heads))
        err(
            "model.numKvHeads",
            f"{arch.num_kv_heads} does not divide numHeads {arch.num_heads}; nearest valid: {fit}",
        )
    if spec.data.seq_length > arch.max_position_embeddings:
        err(
            "data.seqLength",
            f"{spec.data.seq_length} exceeds the model's "
            f"maxPositionEmbeddings {arch.max_position_embeddings}; use at most that",
        )

    if world % tp:
        fit = _nearest(tp, _divisors(world))
        err(
            "parallelism.tensor",
            f"{tp} does not divide the world size {world} "
            f"({spec.cluster.nodes} node(s) x {ppn} processes); nearest valid: {fit}",
        )
        return errors
    if (world // tp) % pp:
        fit = _nearest(pp, _divisors(world // tp))
        err(
            "parallelism.pipeline",
            f"tensor {tp} x pipeline {pp} does not divide the world size "
            f"{world}; nearest valid pipeline: {fit}",
        )
        return errors
    dp = world // (tp * pp)
    if inst.trainium and tp > ppn:
        fit = _nearest(tp, [d for d in _divisors(ppn) if world % d == 0])
        err(
            "parallelism.tensor",
            f"{tp} spans nodes; tensor-parallel groups must stay inside one "
            f"node of {ppn} cores; nearest valid: {fit}",
        )
    split = {"intermediateSize": arch.intermediate_size, "vocabSize": arch.vocab_size}
    unsplit = [(name, n) for name, n in split.items() if n % tp]
    if backend == "nxd" and inst.family == "trn1" and tp not in NXD_TRN1_TENSOR_DEGREES:
        if tp <= ppn:  # past the node's cores it was refused above, as spanning nodes
            degrees = [d for d in NXD_TRN1_TENSOR_DEGREES if world % d == 0 and d <= ppn]
            allowed = ", ".join(map(str, NXD_TRN1_TENSOR_DEGREES[:-1]))
            err(
                "parallelism.tensor",
                f"{tp} is not a tensor-parallel degree NxD runs on {inst.name}: the Neuron "
                f"runtime there runs tensor groups of {allowed} or "
                f"{NXD_TRN1_TENSOR_DEGREES[-1]} NeuronCores (16 fails at start-up with a "
                f"replica-group error); nearest valid: {_nearest(tp, degrees)}",
            )
    elif arch.num_heads % tp:
        # d * pp dividing the world means d divides it: search the small gcd, not the heads.
        heads = math.gcd(arch.num_heads, world)
        fit = _nearest(tp, [d for d in _divisors(heads) if world % (d * pp) == 0])
        err(
            "parallelism.tensor",
            f"{tp} does not divide the {arch.num_heads} attention heads; nearest valid: {fit}",
        )
    elif unsplit:
        # Both backends shard the MLP and the vocabulary evenly (the trainer refuses otherwise).
        name, n = unsplit[0]
        common = math.gcd(math.gcd(arch.num_heads, n), world)
        fit = _nearest(tp, [d for d in _divisors(common) if world % (d * pp) == 0])
        err(
            "parallelism.tensor",
            f"{tp} does not divide model.{name} {n}; nearest valid: {fit}",
        )
    elif backend == "nxd":
        problem = _nxd_kv_problem(arch, tp, par.kv_replicator, inst.family)
        if problem:
            err("parallelism.kvReplicator", problem)
    elif arch.num_kv_heads % tp:
        kv = math.gcd(arch.num_kv_heads, world)
        fit = _nearest(tp, [d for d in _divisors(kv) if world % (d * pp) == 0])
        err(
            "parallelism.tensor",
            f"{tp} does not divide the {arch.num_kv_heads} kv heads "
            f"(the torch backend does not replicate kv heads); nearest valid: {fit}",
        )
    if backend == "torch" and par.kv_replicator != 1:
        err("parallelism.kvReplicator", "only the nxd backend replicates kv heads; use 1")
    if spec.compile.torch_compile and backend == "nxd":
        err(
            "compile.torchCompile",
            "applies to the torch backend; on Trainium the compile step compiles the graphs "
            "with neuron_parallel_compile; use false",
        )
    elif spec.compile.torch_compile and tp > 1:
        err(
            "compile.torchCompile",
            f"does not combine with parallelism.tensor {tp} on the torch backend (torch 2.13 "
            "fails to compile tensor-parallel blocks); use tensor 1 with fsdp, or false",
        )
    if arch.num_layers % pp:
        fit = _nearest(pp, _divisors(math.gcd(arch.num_layers, world // tp)))
        err(
            "parallelism.pipeline",
            f"{pp} does not divide the {arch.num_layers} layers; nearest valid: {fit}",
        )
    elif arch.num_layers % (pp * vpp):
        fit = _nearest(vpp, _divisors(arch.num_layers // pp, near=vpp))
        err(
            "parallelism.virtualPipeline",
            f"pipeline {pp} x virtualPipeline {vpp} does not "
            f"divide the {arch.num_layers} layers; nearest valid: {fit}",
        )
    if vpp > 1 and pp == 1:
        err("parallelism.virtualPipeline", "needs pipeline > 1; use 1")
    if vpp > 1 and par.pipeline_schedule != "Interleaved1F1B" and backend == "torch":
        err("parallelism.pipelineSchedule", f"virtualPipeline {vpp} needs Interleaved1F1B")

    mbs, gbs = spec.batch.micro_batch_size, spec.batch.global_batch_size
    unit = mbs * dp
    if gbs % unit:
        lower, upper = (gbs // unit) * unit, (gbs // unit + 1) * unit
        fit = lower if lower and gbs - lower <= upper - gbs else upper
        err(
            "batch.globalBatchSize",
            f"{gbs} is not divisible by microBatchSize {mbs} x data "
            f"parallel {dp} = {unit}; nearest valid: {fit}",
        )
    elif pp > 1 and gbs // unit < pp:
        err(
            "batch.globalBatchSize",
            f"pipeline {pp} needs at least {pp} micro-batches per step "
            f"but {gbs} / ({mbs} x {dp}) = {gbs // unit}; use at least {pp * unit}",
        )
    return errors


def stage_params(arch: Architecture, pp: int) -> int:
    """Parameters on the most loaded pipeline stage (embedding on the first, head on the last)."""
    per_stage_layers = arch.num_layers // pp * arch.layer_params()
    emb = arch.embedding_params()
    if pp == 1:
        return arch.num_params()
    # With tied embeddings the last stage keeps its own copy of the matrix for the head.
    return per_stage_layers + emb + arch.hidden_size


def _in_flight(spec: LlamaTrainingJobSpec, dp: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once."""
    par = spec.parallelism
    pp, vpp, b = par.pipeline, par.virtual_pipeline, spec.batch.micro_batch_size
    micro = spec.batch.global_batch_size // (b * dp) if dp and b else 1
    if pp == 1:
        return 1.0
    if par.pipeline_schedule == "GPipe":
        return float(micro)
    in_flight = float(min(pp, micro))
    if vpp > 1:
        in_flight *= 1 + (pp - 1) / (pp * vpp)
    return in_flight


def estimate_memory(spec: LlamaTrainingJobSpec, dp: int) -> Memory:
    """Bytes per rank for a layout that validates, by the model of the job's backend."""
    if resolve_backend(spec) == "nxd":
        return _nxd_memory(spec, dp)
    return _torch_memory(spec, dp)


def _nxd_memory(spec: LlamaTrainingJobSpec, dp: int) -> Memory:
    """The nxd model of the module docstring: states, step buffers, bf16 weight copies,
    Korthikanti activations with the recomputed layer's attention scores, and logits."""
    arch = spec.model.architecture()
    par = spec.parallelism
    tp, pp = par.tensor, par.pipeline
    inst = INSTANCE_TYPES[spec.cluster.instance_type]
    params = stage_params(arch, pp) / tp
    mixed = spec.precision == "bf16-mixed"
    s, b, h, a = spec.data.seq_length, spec.batch.micro_batch_size, arch.hidden_size, arch.num_heads
    layers = arch.num_layers // pp

    # fp32 parameters and gradients under either precision (autocast over fp32 parameters).
    weights, grads = 4.0 * params, 4.0 * params
    if par.zero1:
        # ZeRO-1's fp32 copy of the DP shard plus AdamW's two moments of it; while it steps, the
        # shard's reduce-scattered gradient and the full-size all-gather of the updated shards.
        optim = 12.0 * params / dp
        step = (4.0 + 4.0 / dp) * params
    else:
        optim, step = 8.0 * params, 0.0

    # The bf16 copy of every matmul weight, saved from forward for backward (the norms and the
    # embedding lookup are not cast; the head is).
    gather = 0.0
    if mixed:
        matmul = layers * (arch.layer_params() - 2 * h) / tp + arch.embedding_params() / tp
        gather = 2.0 * matmul

    act_scale = 1.0 if mixed else 2.0  # the formula counts 16-bit activations
    sp = par.sequence_parallel and tp > 1
    base = (34.0 / tp) if sp else (10.0 + 24.0 / tp)
    scores = 5.0 * a * s / (h * tp)  # b x a/t x s x s, per s*b*h
    in_flight = _in_flight(spec, dp)
    if par.activation_checkpointing == "full":
        # Each layer keeps its input; backward recomputes one layer at a time, scores included.
        stored = 2.0 * s * b * h / (tp if sp else 1)
        activations = stored * layers * in_flight + s * b * h * (base + scores)
    elif par.activation_checkpointing == "selective":
        # The layers keep all but the attention core, which backward rebuilds one layer at a time.
        activations = s * b * h * (base * layers * in_flight + scores)
    else:
        activations = s * b * h * (base + scores) * layers * in_flight
    activations *= act_scale

    logits = 2 * 4.0 * s * b * arch.vocab_size / tp
    return Memory(
        weights, grads, optim, gather, activations, logits, runtime_reserve_bytes(inst),
        step_buffer=step,
    )


# How the torch backend computes, as far as memory goes: "bf16" (FSDP2 casts the parameters to
# bf16, so everything downstream is bf16), "autocast" (bf16-mixed without FSDP: fp32 parameters
# and residual stream, bf16 matmuls) or "fp32".
TorchMode = Literal["bf16", "autocast", "fp32"]


def torch_mode(precision: str, fsdp: bool) -> TorchMode:
    if precision != "bf16-mixed":
        return "fp32"
    return "bf16" if fsdp else "autocast"


def torch_block_saved_bytes(
    arch: Architecture,
    seq: int,
    micro_batch: int,
    mode: TorchMode,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    recompute_core: bool = False,
) -> float:
    """Bytes one transformer block of model.py keeps for backward, per micro-batch and TP rank,
    without whole-block recompute (``recompute_core``: selective recompute of the attention
    core). The module docstring derives each term; the tests measure them on CPU."""
    h, kv, i = arch.hidden_size, arch.kv_dim, arch.intermediate_size
    heads = arch.num_heads / tp
    c = 4.0 if mode == "fp32" else 2.0  # matmul outputs
    r = 2.0 if mode == "bf16" else 4.0  # the residual stream and what the norms see
    seq_split = tp if sequence_parallel and tp > 1 else 1
    # Two RMSNorms: an fp32 copy of the input (the input itself when it is fp32), the
    # normalised input in the input's dtype, and the fp32 rsqrt per token.
    norms = 2 * ((4.0 + r) * h + 4.0) / seq_split
    # Inputs of q/k/v and of w1/w3: saved once per norm, except that autocast casts the fp32
    # norm output afresh for each of the five linears. Under SP these are the gathered inputs.
    linear_inputs = (5 * 2.0 if mode == "autocast" else 2 * c) * h
    # q and k after RoPE, v, the reshaped copy wo takes, and (unless the core is recomputed) the
    # SDPA output and its fp32 log-sum-exp per head.
    attention = c * (2 * h + 2 * kv) / tp
    if not recompute_core:
        attention += c * h / tp + 4.0 * heads
    mlp = 4 * c * i / tp  # w1 out (silu input), silu out, w3 out, their product (w2 input)
    per_token = norms + linear_inputs + attention + mlp
    # RoPE casts its cos/sin tables to bf16 for q and for k, once per micro-batch.
    rope = 2.0 * seq * arch.head_dim * c if mode != "fp32" else 0.0
    return seq * micro_batch * per_token + rope


def _torch_memory(spec: LlamaTrainingJobSpec, dp: int) -> Memory:
    arch = spec.model.architecture()
    par = spec.parallelism
    tp, pp = par.tensor, par.pipeline
    inst = INSTANCE_TYPES[spec.cluster.instance_type]
    s, b, h = spec.data.seq_length, spec.batch.micro_batch_size, arch.hidden_size
    fsdp = par.fsdp
    mode = torch_mode(spec.precision, fsdp)
    c = 4.0 if mode == "fp32" else 2.0
    r = 2.0 if mode == "bf16" else 4.0
    sp = par.sequence_parallel and tp > 1

    layers = arch.num_layers // pp
    params = stage_params(arch, pp) / tp
    block = arch.layer_params() / tp
    root = params - layers * block  # embedding, final norm, head: what the blocks leave
    head = arch.embedding_params() / tp  # the output projection (the last stage's, or tied)
    micro = spec.batch.global_batch_size // (b * dp) if dp and b else 1

    # fp32 parameters, gradients and AdamW moments; FSDP shards all three.
    shard = dp if fsdp else 1
    weights, grads, optim = 4.0 * params / shard, 4.0 * params / shard, 8.0 * params / shard

    accumulation = 0.0
    if fsdp:
        gather = c * root + c * head
        if pp == 1:
            gather += (3 * c + 4) * block
        else:
            gather += c * layers * block + (c + 4) * block
        if micro > 1 or pp > 1:
            accumulation = 4.0 * params
    elif mode == "autocast":
        matmul = layers * (arch.layer_params() - 2 * h) / tp + head
        gather = 2.0 * matmul
    else:
        gather = 0.0

    in_flight = _in_flight(spec, dp)
    if par.activation_checkpointing == "full":
        # Each block keeps its input; backward recomputes one block at a time, in full.
        stored = r * s * b * h / (tp if sp else 1)
        recomputed = torch_block_saved_bytes(arch, s, b, mode, tp=tp, sequence_parallel=sp)
        activations = stored * layers * in_flight + recomputed
    else:
        per_block = torch_block_saved_bytes(
            arch, s, b, mode, tp=tp, sequence_parallel=sp,
            recompute_core=par.activation_checkpointing == "selective",
        )
        activations = per_block * layers * in_flight

    # Last stage: the loss's fp32 tensors, the final norm's saved tensors and the head's input
    # (autocast's bf16 copy of it, gathered over the sequence under SP). GPipe runs every
    # forward before any backward, so the last stage keeps each micro-batch's log-probabilities.
    head_input = 2.0 if mode == "autocast" else c
    kept = micro if pp > 1 and par.pipeline_schedule == "GPipe" else 1
    logits = (4.0 * kept + 8.0) * s * b * arch.vocab_size / tp + s * b * (
        ((4.0 + r) * h + 4.0) / (tp if sp else 1) + head_input * h
    )

    step = 0.0
    if tp > 1 and not fsdp and dp > 1:
        step = 4.0 * params  # _finish_gradients flattens every gradient into one buffer
    # The trainer asks for the fused AdamW kernel on cpu and cuda only (fused_adamw in
    # parallel/device.py; not imported here, it needs torch), and not over a mix of DTensor and
    # plain parameters, which tensor parallel without FSDP or SP leaves (the norms).
    fused = inst.device in ("cpu", "cuda") and (fsdp or tp == 1 or sp)
    if not fused:
        step = max(step, 4.0 * params / shard)  # one parameter-sized temporary in foreach AdamW
    return Memory(
        weights, grads, optim, gather, activations, logits, runtime_reserve_bytes(inst),
        accumulation=accumulation, step_buffer=step,
    )


def flops_per_token(arch: Architecture, seq_length: int) -> float:
    matmul_params = arch.num_layers * arch.layer_params() + arch.embedding_params()
    return 6.0 * matmul_params + 12.0 * arch.num_layers * arch.hidden_size * seq_length


def _with(spec: LlamaTrainingJobSpec, **changes: Any) -> LlamaTrainingJobSpec:
    data = spec.model_dump()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return LlamaTrainingJobSpec.model_validate(data)


def suggest_fix(spec: LlamaTrainingJobSpec) -> str | None:
    """The smallest single change (in this order of preference) that validates and fits, for a
    spec that validates as it is (``make_plan`` asks only then)."""
    par, inst = spec.parallelism, INSTANCE_TYPES[spec.cluster.instance_type]
    ppn = spec.cluster.processes_per_node or inst.cores_per_node
    world = spec.cluster.nodes * ppn
    arch = spec.model.architecture()

    def works(change: dict[str, Any]) -> bool:
        try:
            trial = _with(spec, **change)
        except ValueError:
            return False
        if validate_layout(trial):
            return False
        dp = world // (trial.parallelism.tensor * trial.parallelism.pipeline)
        return estimate_memory(trial, dp).total <= inst.memory_per_core_gib * GIB

    candidates: list[tuple[str, dict[str, Any]]] = []
    if resolve_backend(spec) == "torch" and not par.fsdp and world > par.tensor * par.pipeline:
        # The torch backend's replicas hold 16 bytes per parameter each; sharding them over
        # the data-parallel ranks is the change that leaves the layout otherwise alone.
        candidates.append(("fsdp: false -> true", {"parallelism.fsdp": True}))
    for tp in sorted(d for d in _divisors(ppn) if d > par.tensor):
        change: dict[str, Any] = {"parallelism.tensor": tp}
        text = f"tensor: {par.tensor} -> {tp}"
        nxd = resolve_backend(spec) == "nxd"
        if nxd and _nxd_kv_problem(arch, tp, par.kv_replicator, inst.family):
            reps = nxd_kv_replicators(arch, tp, inst.family)
            if not reps:
                continue
            rep = _nearest(par.kv_replicator, reps)
            change["parallelism.kv_replicator"] = rep
            text += f" (with kvReplicator: {par.kv_replicator} -> {rep})"
        # Degrees the runtime refuses (TP=16 on trn1) fail validate_layout inside works().
        candidates.append((text, change))
    order = ["none", "selective", "full"]
    for mode in order[order.index(par.activation_checkpointing) + 1 :]:
        candidates.append(
            (
                f"activationCheckpointing: {par.activation_checkpointing} -> {mode}",
                {"parallelism.activation_checkpointing": mode},
            )
        )
    # A pipeline degree must divide the layers and the ranks left by tensor parallelism (the
    # layout check refuses any other), so the small gcd holds every candidate worth a trial.
    stages = math.gcd(arch.num_layers, world // par.tensor)
    for pp in (d for d in _divisors(stages) if d > par.pipeline):
        candidates.append((f"pipeline: {par.pipeline} -> {pp}", {"parallelism.pipeline": pp}))
    for text, change in candidates:
        if works(change):
            return text

    # The largest smaller micro-batch that fits. Every divisor of a valid one is valid too, and
    # memory never grows as it shrinks (activations and logits scale with it; under GPipe the
    # micro-batches in flight grow as it shrinks but their product stays the global batch; the
    # torch backend's FSDP accumulation buffer appears once a step has two micro-batches, which
    # every smaller one has), so
    # the ones that fit are a prefix of the ascending divisors: a bisection finds the largest
    # in a logarithmic number of trials where a scan could take thousands.
    mbs = spec.batch.micro_batch_size
    smaller = [d for d in _divisors(mbs) if d < mbs]
    lo, hi = 0, len(smaller)
    while lo < hi:
        mid = (lo + hi) // 2
        if works({"batch.micro_batch_size": smaller[mid]}):
            lo = mid + 1
        else:
            hi = mid
    if lo:
        return f"microBatchSize: {mbs} -> {smaller[lo - 1]}"
    return None


def make_plan(
    spec: LlamaTrainingJobSpec,
    *,
    mfu: float | None = None,
    tflops_per_node: float | None = None,
    price_per_hour: float | None = None,
    tokens: int | None = None,
) -> Plan:
    inst = INSTANCE_TYPES[spec.cluster.instance_type]
    ppn = spec.cluster.processes_per_node or inst.cores_per_node
    world = spec.cluster.nodes * ppn
    par = spec.parallelism
    arch = spec.model.architecture()
    errors = validate_layout(spec)
    dp = world // (par.tensor * par.pipeline) if world % (par.tensor * par.pipeline) == 0 else 0
    unit = spec.batch.micro_batch_size * dp
    plan = Plan(
        spec=spec,
        instance=inst,
        backend=resolve_backend(spec),
        device=resolve_device(spec),
        nodes=spec.cluster.nodes,
        processes_per_node=ppn,
        world_size=world,
        tensor=par.tensor,
        pipeline=par.pipeline,
        data_parallel=dp,
        grad_accum=spec.batch.global_batch_size // unit if unit else 0,
        errors=errors,
        num_params=arch.num_params(),
    )
    if errors:
        return plan

    plan.params_per_core = int(stage_params(arch, par.pipeline) / par.tensor)
    plan.memory = estimate_memory(spec, dp)
    if not plan.fits:
        plan.suggestion = suggest_fix(spec)

    plan.flops_per_token = flops_per_token(arch, spec.data.seq_length)
    plan.tokens_per_step = spec.tokens_per_step()
    plan.flops_per_step = plan.flops_per_token * plan.tokens_per_step
    # A node running fewer ranks than it has devices uses that share of its peak; a CPU node's
    # ranks are processes, not devices.
    share = ppn / inst.cores_per_node if inst.family != "cpu" else 1.0
    if tflops_per_node is not None:
        plan.tflops_per_node = tflops_per_node
    else:
        plan.assumed_mfu = default_mfu(inst, spec) if mfu is None else mfu
        plan.tflops_per_node = inst.peak_tflops_per_node * share * plan.assumed_mfu
    plan.step_seconds = plan.flops_per_step / (plan.tflops_per_node * 1e12 * plan.nodes)
    plan.total_steps = (
        -(-tokens // plan.tokens_per_step) if tokens is not None else spec.total_steps()
    )
    plan.total_tokens = plan.total_steps * plan.tokens_per_step
    plan.total_seconds = plan.step_seconds * plan.total_steps
    plan.price_per_hour = inst.price_per_hour if price_per_hour is None else price_per_hour
    plan.total_cost_usd = plan.total_seconds / 3600 * plan.price_per_hour * plan.nodes
    return plan
