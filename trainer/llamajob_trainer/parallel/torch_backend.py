"""Torch-native parallelism on a (pp, dp, tp) DeviceMesh, on any device of ``device``: cpu
(gloo), cuda (nccl) or neuron (TorchNeuron's "neuron" process group). Everything that
differs between them (autocast device type, compile backend, fused AdamW, the oneDNN CPU
linear, DDP's device ids) is read from ``device.kind_of(env.device)``.

- Data parallel: DDP, or FSDP2 ``fully_shard`` per layer plus the root when
  ``parallelism.fsdp``. DDP cannot hold DTensor parameters, so with tensor parallel and without
  FSDP the data-parallel gradient all-reduce is done here, once per step, over one flat buffer.
- ``parallelism.zero1`` is not mapped on this backend (it belongs to the Neuron backend's
  optimizer wrapper): set ``fsdp: true`` to shard optimizer state, gradients and parameters.
- Tensor parallel: DTensor Colwise/Rowwise plans; with sequence parallel the residual stream and
  the norms are sharded along the sequence (``Shard(1)``). Loss parallel: the logits stay
  sharded on the vocabulary (``Shard(-1)``) and the cross-entropy runs on the shards
  (``loss_parallel``), so no rank ever holds batch x seq x vocab logits (with Llama 3's 128K
  vocabulary that tensor is 4 GiB per 8K-token micro-batch in fp32).
- Pipeline parallel: ``torch.distributed.pipelining`` stages built from the same ``Llama`` class
  with modules removed; GPipe, 1F1B, or interleaved 1F1B for ``virtualPipeline > 1``. The loss
  runs on the last stage; micro-batches are the gradient-accumulation steps. A tied embedding
  split across the first and last stage is kept in sync by summing its two gradients.
- Activation checkpointing: ``full`` recomputes each block from its input, ``selective``
  recomputes the attention core; both are flags on the model (FQNs unchanged). With the fused
  (flash) SDPA kernels the attention core keeps no s x s tensor anyway, so ``selective`` saves
  little there; it matters where SDPA falls back to the math kernel, and for compiled blocks
  on CPU below sequence 768, whose block-causal attention keeps its probabilities.
- ``compile.torchCompile``: each transformer block is compiled with ``torch.compile`` (the
  device's backend: Inductor on cpu and cuda, ``neuron`` on neuron), after tensor parallel and
  before FSDP as torchtitan does; blocks share one compiled graph, and ``Module.compile`` keeps
  the FQNs. On CPU below sequence 768 the compiled attention is
  ``model.block_causal_attention`` (it skips the masked half that PyTorch's CPU flash kernel
  computes at those lengths). Inductor's cache goes to ``compile.cacheDir/inductor``
  (``TORCHINDUCTOR_CACHE_DIR`` is set to it), so the compile step warms it for the training
  pods; TorchNeuron keeps its NEFFs in its own cache.
- fp32 linears on CPU run on oneDNN or ``torch.mm``'s MKL, whichever is faster for this model on
  this CPU (``cpu_linear``: rank 0 times the model's linear shapes on both, every rank takes
  its answer; oneDNN won 2.1x on an AMD Zen 5 CPU, MKL won on an Intel Xeon).
  ``LLAMAJOB_CPU_MATMUL=onednn|aten`` pins it; a resumed run takes the library its checkpoint
  records. Not with tensor parallel (DTensor weights) nor for bf16 operands, which keep
  ``F.linear``.
- ``bf16-mixed``: FSDP2 ``MixedPrecisionPolicy`` (bf16 params for compute, fp32 reduce) with
  FSDP, ``torch.autocast(<device type>, bfloat16)`` otherwise; master weights stay fp32 either
  way.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from .. import cpu_linear
from ..config import TrainerConfig
from ..model import IGNORE_INDEX, Llama, loss_sum
from ..presets import Architecture
from . import device as devices
from .base import ParallelModel
from .dist import DistEnv
from .layout import Layout, make_layout, stage_layer_range


def parallelize_torch(cfg: TrainerConfig, arch: Architecture, env: DistEnv) -> TorchParallelModel:
    layout = make_layout(cfg, arch, env.world_size)
    kind = devices.kind_of(env.device)
    if layout.torch_compile and kind.compile_cache_env is not None:
        # Set, not defaulted: torch fills in its /tmp default as soon as anything asks for the
        # cache directory, so an existing value does not mean the user chose it.
        cache = Path(cfg.compile.cache_dir).absolute() / kind.compile_backend
        os.environ[kind.compile_cache_env] = str(cache)
    mesh = init_device_mesh(
        env.device.type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=("pp", "dp", "tp")
    )
    pp_rank = mesh.get_local_rank("pp")
    stage_ids = layout.stage_ids(pp_rank) if layout.pp > 1 else [0]
    parts = [_build_part(arch, layout, mesh, sid, env.device, cfg.seed) for sid in stage_ids]
    pm = TorchParallelModel(layout, env, mesh, arch, parts, stage_ids)
    cpu_linear.requested()  # a bad value is refused in every run, not only where it applies
    if kind.onednn_linear and layout.tp == 1 and not layout.bf16:
        library, seconds = _choose_cpu_matmul(layout, env, parts)
        pm.use_cpu_matmul(library, seconds)
    return pm


def _choose_cpu_matmul(
    layout: Layout, env: DistEnv, parts: list[Llama]
) -> tuple[str, dict[str, float]]:
    """The CPU matmul library for this run, the same on every rank, and rank 0's timings (empty
    when the environment variable pins it or torch has no oneDNN). With pipeline parallelism
    rank 0 times its own stages' shapes, which are the model's but for the output projection."""
    pinned = cpu_linear.pinned()
    if pinned is not None:
        return pinned, {}
    answer: list[Any] = [None, None]
    if env.rank == 0:
        shapes = [shape for part in parts for shape in cpu_linear.linear_shapes(part)]
        rows = cpu_linear.timing_rows(shapes, layout.micro_batch_size * layout.seq_length)
        seconds = cpu_linear.measure(shapes, rows)
        answer = [cpu_linear.decide(seconds), seconds]
    if env.world_size > 1:
        # Every rank must run the same kernels: a rank that timed its own could pick the other
        # library and break the bit-identical guarantees between layouts and resumes.
        dist.broadcast_object_list(answer, src=0)
    return answer[0], answer[1]


def _build_part(
    arch: Architecture, layout: Layout, mesh: DeviceMesh, stage: int, device: torch.device,
    seed: int,
) -> Llama:
    # Built on the meta device so a pipeline stage never allocates the layers it drops; the
    # per-FQN seeded init gives every layout the same weights.
    with torch.device("meta"):
        model = Llama(arch, max_seq_len=layout.seq_length)
    if layout.pp > 1:
        _keep_stage(model, layout, stage)
    model.to_empty(device=device)
    model.init_weights(seed)
    for block in model.layers.values():
        block.recompute = layout.activation_checkpointing == "full"
        block.attention.recompute_core = layout.activation_checkpointing == "selective"
    kind = devices.kind_of(device)
    if layout.tp > 1:
        # Tensor-parallel weights are DTensors, which only F.linear takes (the oneDNN path is
        # chosen after the parts are built, and only without tensor parallel).
        _apply_tensor_parallel(model, mesh["tp"], layout.sequence_parallel)
    if layout.torch_compile:
        for block in model.layers.values():
            block.compile(backend=kind.compile_backend)
    if layout.fsdp:
        _apply_fsdp(model, mesh["dp"], layout.bf16, reshard_after_forward=layout.pp == 1)
    return model


def _keep_stage(model: Llama, layout: Layout, stage: int) -> None:
    keep = {str(i) for i in stage_layer_range(model.arch.num_layers, layout.num_stages, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage != 0:
        model.tok_embeddings = None
    if stage != layout.num_stages - 1:
        model.norm = None
        model.output = None


def _apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    seq = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False
        )
    if top:
        parallelize_module(model, tp_mesh, top)  # type: ignore[arg-type]
        # Embedding rows and output rows are both sharded on the vocabulary dimension, so a
        # tied weight stays one DTensor.
        model.tie_weights()
    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan |= {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None),
                    desired_input_layouts=(Replicate(), None, None),
                ),
                "feed_forward": PrepareModuleInput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
            }
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]


def _apply_fsdp(model: Llama, dp_mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool) -> None:
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


class TorchParallelModel(ParallelModel):
    def __init__(
        self,
        layout: Layout,
        env: DistEnv,
        mesh: DeviceMesh,
        arch: Architecture,
        parts: list[Llama],
        stage_ids: list[int],
    ) -> None:
        self.layout = layout
        self.env = env
        self.kind = devices.kind_of(env.device)
        self.mesh = mesh
        self.model_parts = list(parts)
        self.stage_ids = stage_ids
        self.pp_size, self.dp_size, self.tp_size = layout.pp, layout.dp, layout.tp
        self.pp_rank = mesh.get_local_rank("pp")
        self.dp_rank = mesh.get_local_rank("dp")
        self.tp_rank = mesh.get_local_rank("tp")
        self._dp_group = mesh["dp"].get_group()
        self._reports_loss = self.pp_rank == layout.pp - 1 and self.tp_rank == 0

        use_ddp = layout.dp > 1 and not layout.fsdp and layout.tp == 1
        # DDP and FSDP average gradients over dp; the manual all-reduce sums them.
        self._manual_dp_allreduce = layout.dp > 1 and not layout.fsdp and layout.tp > 1
        self._averaging_dp = layout.dp if (use_ddp or layout.fsdp) else 1
        self._runners: list[nn.Module] = [
            DistributedDataParallel(
                part,
                process_group=self._dp_group,
                # Inputs are already on the device (_prepare), so DDP has nothing to move.
                device_ids=[env.device.index] if self.kind.ddp_device_ids else None,
                forward_sync_buffers=False,  # only the RoPE tables, identical everywhere
                gradient_as_bucket_view=True,
            )
            if use_ddp
            else part
            for part in parts
        ]
        self._tied_group, self._tied_params = self._tied_embedding_sync(arch, mesh)
        self._norm_weights: dict[int, float] = {}
        self._loss_scale: Tensor | None = None
        self._schedules: dict[int, object] = {}
        pp_group = mesh["pp"].get_group()
        self._stages = (
            [
                PipelineStage(runner, sid, layout.num_stages, env.device, group=pp_group)
                for runner, sid in zip(self._runners, stage_ids, strict=True)
            ]
            if layout.pp > 1
            else []
        )

    # --- the training step ------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        batches, tokens = self._prepare(micro_batches)
        tokens = tokens.clamp_min(1).to(torch.float32)
        # Gradients of sum(CE) / global tokens; DDP/FSDP divide by dp, so pre-multiply.
        self._loss_scale = self._averaging_dp / tokens
        run = self._run_pipeline if self.pp_size > 1 else self._run_plain
        local_sum = run(batches)
        self._finish_gradients()
        return float((self._global_loss_sum(local_sum) / tokens).item())

    @torch.no_grad()
    def evaluate(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[float, int]:
        batches, tokens = self._prepare(micro_batches)
        if self.pp_size > 1:
            self._loss_scale = torch.ones((), device=self.env.device)  # plain sums
            local_sum = self._run_pipeline(batches, backward=False)
        else:
            # The bare module: DDP's wrapper has nothing to do without gradients.
            model = self.model_parts[0]
            local_sum = torch.zeros((), dtype=torch.float32, device=self.env.device)
            with self._autocast(), self._loss_parallel():
                for x, y in batches:
                    local_sum += _local(loss_sum(model(x), y))
        return float(self._global_loss_sum(local_sum).item()), int(tokens.item())

    def _prepare(
        self, micro_batches: list[tuple[Tensor, Tensor]]
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Micro-batches on the device, and the token count of the global batch."""
        if not micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        device = self.env.device
        batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                   for x, y in micro_batches]
        tokens = torch.stack([(y != IGNORE_INDEX).sum() for _, y in batches]).sum()
        if self.dp_size > 1:
            dist.all_reduce(tokens, group=self._dp_group)
        return batches, tokens

    def _global_loss_sum(self, local_sum: Tensor) -> Tensor:
        """Sum over data parallel of the loss sums, counted once per model replica (the last
        stage's first tensor-parallel rank holds it); the same on every rank."""
        total = local_sum if self._reports_loss else torch.zeros_like(local_sum)
        if self.env.world_size > 1:
            dist.all_reduce(total)
        return total

    def _run_plain(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        runner, model = self._runners[0], self.model_parts[0]
        acc = torch.zeros((), dtype=torch.float32, device=self.env.device)
        last = len(batches) - 1
        for i, (x, y) in enumerate(batches):
            with self._grad_sync(runner, model, i == last), self._loss_parallel():
                with self._autocast():
                    raw = loss_sum(runner(x), y)
                (raw * self._loss_scale).backward()
            acc += _local(raw.detach())
        return acc

    def _run_pipeline(self, batches: list[tuple[Tensor, Tensor]], backward: bool = True) -> Tensor:
        schedule = self._schedule(len(batches))
        run = schedule.step if backward else schedule.eval  # type: ignore[attr-defined]
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        has_first = 0 in self.stage_ids
        has_last = self.layout.num_stages - 1 in self.stage_ids
        losses: list[Tensor] = []
        with self._autocast(), self._loss_parallel():
            args = (inputs,) if has_first else ()
            run(
                *args,
                target=targets if has_last else None,
                losses=losses if has_last else None,
                return_outputs=False,
            )
        acc = torch.zeros((), dtype=torch.float32, device=self.env.device)
        for scaled in losses:
            acc += _local(scaled.detach()).float()
        assert self._loss_scale is not None
        return acc / self._loss_scale

    def _pipeline_loss(self, output: Tensor, target: Tensor) -> Tensor:
        # The schedule may call this for shape inference too, so it must not count anything.
        assert self._loss_scale is not None
        return loss_sum(output, target) * self._loss_scale

    def _schedule(self, n_micro: int) -> object:
        if n_micro not in self._schedules:
            kind = self.layout.schedule
            kwargs: dict[str, object] = {
                "n_microbatches": n_micro,
                "loss_fn": self._pipeline_loss,
                "scale_grads": False,  # the loss is already scaled to the global token count
            }
            if kind == "Interleaved1F1B":
                sched: object = ScheduleInterleaved1F1B(self._stages, **kwargs)  # type: ignore[arg-type]
            elif kind == "GPipe":
                sched = ScheduleGPipe(self._stages[0], **kwargs)  # type: ignore[arg-type]
            else:
                sched = Schedule1F1B(self._stages[0], **kwargs)  # type: ignore[arg-type]
            self._schedules[n_micro] = sched
        return self._schedules[n_micro]

    def _grad_sync(
        self, runner: nn.Module, model: nn.Module, sync: bool
    ) -> contextlib.AbstractContextManager[Any]:
        """Reduce gradients over dp only on the last micro-batch of the step."""
        if isinstance(runner, DistributedDataParallel) and not sync:
            return runner.no_sync()
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _loss_parallel(self) -> contextlib.AbstractContextManager[Any]:
        """Cross-entropy over vocabulary-sharded logits; covers the backward too, which must
        run inside it."""
        return loss_parallel() if self.tp_size > 1 else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.layout.bf16 and not self.layout.fsdp:
            return torch.autocast(self.kind.autocast, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _finish_gradients(self) -> None:
        if self.tp_size > 1 and not self.layout.fsdp:
            # Tensor parallel leaves some gradients in another layout than their parameter:
            # Partial sums for replicated norm weights under sequence parallel, a replicated
            # gradient for the vocabulary-sharded embedding. Settle them once here rather than
            # letting every optimizer op redistribute them. (FSDP2 does this itself.)
            for p in self.parameters():
                g = p.grad
                if isinstance(g, DTensor) and isinstance(p, DTensor) and (
                    g.placements != p.placements
                ):
                    p.grad = g.redistribute(p.device_mesh, p.placements)
        if self._manual_dp_allreduce:
            grads = [_local(p.grad) for p in self.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self._dp_group)
            for g, reduced in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                g.copy_(reduced)
        if self._tied_group is not None:
            for p in self._tied_params:
                if p.grad is not None:
                    dist.all_reduce(_local(p.grad), group=self._tied_group)

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def compile_report(self) -> str | None:
        if not self.layout.torch_compile:
            return None
        if self.kind.compile_backend != "inductor":
            # The counters below are Inductor's; another backend keeps its own books.
            return f"torch.compile: blocks compiled by the {self.kind.compile_backend} backend"
        from torch._dynamo.utils import counters

        hits = counters["inductor"]["fxgraph_cache_hit"]
        misses = counters["inductor"]["fxgraph_cache_miss"]
        return (
            f"torch.compile: {hits} graph(s) from the cache, {misses} compiled "
            f"(cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')})"
        )

    # --- optimizer ------------------------------------------------------------------------
    def make_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], params: Any, **defaults: Any
    ) -> torch.optim.Optimizer:
        """The fused implementation (one kernel over all parameters) where the device's table
        entry says so (cpu, cuda); torch's own default on CPU is a Python loop over parameters.
        DTensor runs the fused kernel on each shard, but not over a mix of DTensor and plain
        tensors (tensor parallel without FSDP leaves the norms plain): that keeps the default."""
        params = list(params)
        tensors = [
            p for item in params for p in (item["params"] if isinstance(item, dict) else [item])
        ]
        kinds = {isinstance(p, DTensor) for p in tensors}
        if (
            "fused" not in defaults
            and "foreach" not in defaults
            and optimizer_cls in (torch.optim.AdamW, torch.optim.Adam)
            and self.kind.fused_adamw
            and len(kinds) == 1
        ):
            defaults["fused"] = True
        return optimizer_cls(params, **defaults)

    # --- gradient norm ------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        by_weight: dict[float, list[Tensor]] = {}
        for p in self._params_with_grad():
            assert p.grad is not None
            by_weight.setdefault(self._norm_weight(p), []).append(_local(p.grad))
        device = self.env.device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for weight, grads in by_weight.items():
            norms = torch.stack(torch._foreach_norm(grads)).float()
            sq += norms.pow(2).sum() * weight
        if self.env.world_size > 1:
            dist.all_reduce(sq)
        total = math.sqrt(max(float(sq.item()), 0.0))
        if max_norm > 0 and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for grads in by_weight.values():
                torch._foreach_mul_(grads, coef)
        return total

    def _params_with_grad(self) -> Iterator[nn.Parameter]:
        for p in self.parameters():
            if p.grad is not None:
                yield p

    def _norm_weight(self, p: nn.Parameter) -> float:
        """1 / (number of ranks holding this gradient shard), so one all-reduce over the world
        sums every gradient element exactly once."""
        key = id(p)
        if key not in self._norm_weights:
            copies = self.dp_size * self.tp_size
            if isinstance(p, DTensor):
                # Mesh dims outside the parameter's mesh and Replicate dims hold copies; every
                # other placement (Shard, FSDP's _StridedShard) splits the tensor.
                copies //= p.device_mesh.size()
                for size, placement in zip(p.device_mesh.shape, p.placements, strict=True):
                    if placement.is_replicate():
                        copies *= size
            if any(p is t for t in self._tied_params):
                copies *= 2  # the tied weight lives on the first and the last stage
            self._norm_weights[key] = 1.0 / copies
        return self._norm_weights[key]

    # --- tied embeddings across pipeline stages -------------------------------------------------
    def _tied_embedding_sync(
        self, arch: Architecture, mesh: DeviceMesh
    ) -> tuple[dist.ProcessGroup | None, list[nn.Parameter]]:
        if not arch.tie_embeddings or self.pp_size == 1:
            return None, []
        ranks = mesh.mesh
        mine = None
        # Every rank creates every group (a collective requirement), keeps its own.
        for d in range(self.dp_size):
            for t in range(self.tp_size):
                pair = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
                group = dist.new_group(pair)
                if (d, t) == (self.dp_rank, self.tp_rank) and self.pp_rank in (0, self.pp_size - 1):
                    mine = group
        params: list[nn.Parameter] = []
        for part in self.model_parts:
            assert isinstance(part, Llama)
            if part.tok_embeddings is not None:
                params.append(part.tok_embeddings.weight)
            if part.output is not None:
                params.append(part.output.weight)
        return mine, params


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t

