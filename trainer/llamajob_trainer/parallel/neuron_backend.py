"""Trainium backend: torch-xla + neuronx-distributed (NxD).

UNVERIFIED: no Trainium device and no Neuron packages are available where this project is
tested, so this module has never run. It follows NxD's documented API (``parallel_state``,
``parallel_layers``, ``modules.qkv_linear``, ``neuronx_distributed_config`` /
``initialize_parallel_model`` / ``initialize_parallel_optimizer``, ``NxDPPModel``); what *is*
tested here is that selecting it without the packages fails with a clear error.

It does not define a second model. It takes the one ``Llama`` and converts it:

- Tensor parallel: ``nn.Embedding`` / ``nn.Linear`` become NxD's ``ParallelEmbedding``,
  ``ColumnParallelLinear`` and ``RowParallelLinear`` under the same attribute names. Each rank
  fills its slice from ``model.init_tensor`` (one full parameter at a time), so both backends
  start from identical weights. With ``kvReplicator > 1`` (tensor degree above the number of kv
  heads) q/k/v become one ``GQAQKVColumnParallelLinear(kv_size_multiplier=kvReplicator)``; the
  q rows of each rank are chosen to match the kv head NxD places on that rank, so the
  attention is the standard GQA of the unsharded model.
- Sequence parallel: NxD layers with ``sequence_dimension=1`` (the model is batch-first) and
  norm weights flagged ``sequence_parallel_enabled`` so NxD's optimizer all-reduces their
  gradients over the tensor group.
- Loss: NxD's vocabulary-parallel cross-entropy on sharded logits (no ``[b, s, vocab]`` gather).
- Data parallel and ZeRO-1: NxD's optimizer wrapper (``make_optimizer``), which reduces,
  clips and steps in ``step()``; hence ``optimizer_step`` instead of ``clip_grad_norm``.
- Pipeline: ``NxDPPModel`` (``transformer_layer_cls=TransformerBlock``, micro-batches = gradient
  accumulation steps, ``virtual_pipeline_size``).
- Activation checkpointing: ``full`` lets NxD checkpoint each ``TransformerBlock``;
  ``selective`` uses the model's attention-core recompute.
- ``bf16-mixed``: ``torch.autocast("xla", bfloat16)`` over fp32 parameters.

Differences from the torch backend: the step loss is the mean of micro-batch means (what NxD's
pipeline returns), equal to the global token mean when no label is ignored (packed data);
checkpoints use NxD's per-rank format; ranks build their tensor-parallel shards of every layer
on the host before NxD's pipeline partitioning keeps their stage's.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import TrainerConfig
from ..model import (
    IGNORE_INDEX,
    Attention,
    Llama,
    RMSNorm,
    TransformerBlock,
    init_tensor,
    rope_tables,
)
from ..presets import Architecture
from ..protocol import EXIT_DEPENDENCY
from .base import ParallelModel
from .dist import DistEnv
from .layout import Layout, make_layout

NEURON_MODULES = ("torch_xla", "torch_neuronx", "neuronx_distributed")
INSTALL_HINT = (
    "install the trainer's `neuron` extra from the AWS Neuron pip repository "
    "(pip install 'llamajob[trainer,neuron]' --extra-index-url "
    "https://pip.repos.neuron.amazonaws.com), or use the Trainium trainer image; "
    "on CPU/GPU set backend: torch"
)


class NeuronUnavailable(RuntimeError):
    """The nxd backend was selected but its packages are not installed."""

    exit_code = EXIT_DEPENDENCY


def missing_neuron_modules() -> list[str]:
    return [name for name in NEURON_MODULES if importlib.util.find_spec(name) is None]


def require_neuron() -> None:
    missing = missing_neuron_modules()
    if missing:
        raise NeuronUnavailable(
            f"backend 'neuron' needs {', '.join(missing)}, not installed here; {INSTALL_HINT}"
        )


def init_xla_process_group(rank: int, world_size: int, local_rank: int) -> DistEnv:
    require_neuron()
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

    if not dist.is_initialized():
        dist.init_process_group("xla", init_method="xla://")
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=xm.xla_device(),
        backend="xla",
    )


def parallelize_neuron(cfg: TrainerConfig, arch: Architecture, env: DistEnv) -> ParallelModel:
    require_neuron()
    import neuronx_distributed as nxd

    layout = make_layout(cfg, arch, env.world_size)
    p = cfg.parallelism
    clip = cfg.optimizer.grad_clip
    pipeline_config = None
    if layout.pp > 1:
        pipeline_config = {
            "transformer_layer_cls": TransformerBlock,
            "num_microbatches": layout.grad_accum,
            "virtual_pipeline_size": layout.virtual_pipeline,
            "output_loss_value_spec": (True,),
            "input_names": ["input_ids", "labels"],
            "leaf_module_cls": [RMSNorm.__name__],
            "autowrap_functions": (vocab_parallel_loss,),
            "tracer_cls": "torch",
            "use_zero1_optimizer": p.zero1,
            "broadcast_and_average_loss": True,
        }
    nxd_config = nxd.neuronx_distributed_config(
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        pipeline_config=pipeline_config,
        # Clipping always on (infinite bound when disabled) so the optimizer reports the norm.
        optimizer_config={
            "zero_one_enabled": p.zero1,
            "grad_clipping": True,
            "max_grad_norm": clip if clip > 0 else float("inf"),
        },
        sequence_parallel=layout.sequence_parallel,
        activation_checkpoint_config=(
            TransformerBlock if layout.activation_checkpointing == "full" else None
        ),
        mixed_precision_config={
            "use_master_weights": False,
            "use_fp32_grad_acc": False,
            "use_master_weights_in_ckpt": False,
        },
    )
    model = nxd.initialize_parallel_model(
        nxd_config, _build_model, False, arch, layout, cfg.seed, p.kv_replicator
    )
    return NeuronParallelModel(layout, env, nxd_config, model)


class NeuronLlama(Llama):
    """The Llama with its loss inside ``forward``: NxD's pipeline traces ``forward`` and
    backpropagates from its first output. Same FQNs as ``Llama``."""

    def forward(self, input_ids: Tensor, labels: Tensor) -> tuple[Tensor]:  # type: ignore[override]
        return (vocab_parallel_loss(super().forward(input_ids), labels),)


def vocab_parallel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy of vocabulary-sharded logits; -100 labels are ignored."""
    from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

    valid = labels != IGNORE_INDEX
    per_token = parallel_cross_entropy(logits.float(), labels.clamp_min(0))
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


class _ReplicatedKVAttention(Attention):
    """Attention whose q/k/v come from NxD's GQA projection (kv heads replicated)."""

    qkv_proj: nn.Module

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # NxD's GQA projection gathers a sequence-parallel input along dim 0 (sequence-first
        # layout); this model is batch-first, so present it sequence-first and turn back.
        q, k, v = self.qkv_proj(x.transpose(0, 1))
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


def _build_model(arch: Architecture, layout: Layout, seed: int, kv_rep: int) -> NeuronLlama:
    """Called by NxD after ``initialize_model_parallel``: the one Llama, NxD layers swapped in."""
    from neuronx_distributed.parallel_layers import parallel_state

    with torch.device("meta"):
        model = NeuronLlama(arch, max_seq_len=layout.seq_length)
    _Converter(arch, layout, seed, kv_rep, parallel_state.get_tensor_model_parallel_rank()).apply(
        model
    )
    selective = layout.activation_checkpointing == "selective"
    for block in model.layers.values():
        block.attention.recompute_core = selective
    return model


class _Converter:
    def __init__(self, arch: Architecture, layout: Layout, seed: int, kv_rep: int, tp_rank: int):
        from neuronx_distributed.parallel_layers import layers

        self.layers = layers
        self.arch, self.seed, self.kv_rep = arch, seed, kv_rep
        self.tp, self.rank = layout.tp, tp_rank
        self.sp = layout.sequence_parallel
        self.seq_kwargs: dict[str, Any] = (
            {"sequence_parallel_enabled": True, "sequence_dimension": 1} if self.sp else {}
        )

    def apply(self, model: NeuronLlama) -> None:
        a = self.arch
        h = a.hidden_size
        emb = self.layers.ParallelEmbedding(a.vocab_size, h, **self.seq_kwargs)
        self._fill(emb.weight, self._rows(self._full("tok_embeddings.weight", (a.vocab_size, h))))
        model.tok_embeddings = emb
        for idx, block in model.layers.items():
            self._convert_block(f"layers.{idx}.", block)
        assert model.norm is not None
        self._norm(model.norm, "norm.weight")
        if a.tie_embeddings:
            # Output rows and embedding rows are both vocabulary shards: one parameter.
            out = self._column(h, a.vocab_size, None)
            out.weight = emb.weight
        else:
            out = self._column(h, a.vocab_size, "output.weight")
        model.output = out
        model.rope_cos, model.rope_sin = rope_tables(a.head_dim, model.max_seq_len, a.rope_theta)

    def _convert_block(self, prefix: str, block: TransformerBlock) -> None:
        a = self.arch
        h, q_dim = a.hidden_size, a.num_heads * a.head_dim
        att, ff = block.attention, block.feed_forward
        if self.kv_rep > 1:
            self._replicated_kv(prefix, att)
        else:
            att.wq = self._column(h, q_dim, prefix + "attention.wq.weight")
            att.wk = self._column(h, a.kv_dim, prefix + "attention.wk.weight")
            att.wv = self._column(h, a.kv_dim, prefix + "attention.wv.weight")
        att.wo = self._row(q_dim, h, prefix + "attention.wo.weight")
        ff.w1 = self._column(h, a.intermediate_size, prefix + "feed_forward.w1.weight")
        ff.w3 = self._column(h, a.intermediate_size, prefix + "feed_forward.w3.weight")
        ff.w2 = self._row(a.intermediate_size, h, prefix + "feed_forward.w2.weight")
        self._norm(block.attention_norm, prefix + "attention_norm.weight")
        self._norm(block.ffn_norm, prefix + "ffn_norm.weight")

    def _replicated_kv(self, prefix: str, att: Attention) -> None:
        from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear

        a = self.arch
        h, hd = a.hidden_size, a.head_dim
        proj = GQAQKVColumnParallelLinear(
            h,
            [a.num_heads * hd, a.kv_dim],
            bias=False,
            gather_output=False,
            sequence_parallel_enabled=self.sp,
            kv_size_multiplier=self.kv_rep,
            fuse_qkv=False,
        )
        q_heads, kv_heads = self._gqa_heads()
        full_q = self._full(prefix + "attention.wq.weight", (a.num_heads * hd, h))
        full_k = self._full(prefix + "attention.wk.weight", (a.kv_dim, h))
        full_v = self._full(prefix + "attention.wv.weight", (a.kv_dim, h))
        self._fill(proj.weight_q, _heads(full_q, q_heads, hd))
        self._fill(proj.weight_k, _heads(full_k, kv_heads, hd))
        self._fill(proj.weight_v, _heads(full_v, kv_heads, hd))
        for name in ("wq", "wk", "wv"):
            delattr(att, name)
        att.qkv_proj = proj
        att.__class__ = _ReplicatedKVAttention

    def _gqa_heads(self) -> tuple[list[int], list[int]]:
        """(q heads, kv heads) of this rank, in local order, given where NxD puts kv copies.

        NxD lays the kv_heads x kvReplicator copies out as K0..Kn, K0..Kn, ... on trn1 and
        K0, K0, ..., K1, K1, ... on trn2, then gives each rank a contiguous run of copies. Each
        copy serves (group / kvReplicator) of the q heads that share its kv head, so the
        local q heads are chosen to match.
        """
        from neuronx_distributed.parallel_layers import parallel_state

        a = self.arch
        group = a.num_heads // a.num_kv_heads
        if group % self.kv_rep:
            raise ValueError(
                f"parallelism.kvReplicator ({self.kv_rep}) must divide the query heads per kv "
                f"head ({group})"
            )
        per_copy = group // self.kv_rep
        slots_per_rank = a.num_kv_heads * self.kv_rep // self.tp
        hw = parallel_state.hardware(parallel_state.get_platform_target())
        interleaved = hw == parallel_state.hardware.TRN2
        q_heads: list[int] = []
        kv_heads: list[int] = []
        for slot in range(self.rank * slots_per_rank, (self.rank + 1) * slots_per_rank):
            if interleaved:
                head, copy = divmod(slot, self.kv_rep)
            else:
                copy, head = divmod(slot, a.num_kv_heads)
            kv_heads.append(head)
            first = head * group + copy * per_copy
            q_heads.extend(range(first, first + per_copy))
        return q_heads, kv_heads

    def _column(self, fan_in: int, fan_out: int, fqn: str | None) -> nn.Module:
        layer = self.layers.ColumnParallelLinear(
            fan_in, fan_out, bias=False, gather_output=False, **self.seq_kwargs
        )
        if fqn is not None:
            self._fill(layer.weight, self._rows(self._full(fqn, (fan_out, fan_in))))
        return layer

    def _row(self, fan_in: int, fan_out: int, fqn: str) -> nn.Module:
        layer = self.layers.RowParallelLinear(
            fan_in, fan_out, bias=False, input_is_parallel=True, **self.seq_kwargs
        )
        full = self._full(fqn, (fan_out, fan_in))
        n = fan_in // self.tp
        self._fill(layer.weight, full[:, self.rank * n : (self.rank + 1) * n])
        return layer

    def _norm(self, norm: RMSNorm, fqn: str) -> None:
        norm.weight = nn.Parameter(self._full(fqn, (self.arch.hidden_size,)))
        # NxD's optimizer all-reduces these over the tensor group under sequence parallel.
        norm.weight.sequence_parallel_enabled = self.sp  # type: ignore[attr-defined]

    def _full(self, fqn: str, shape: tuple[int, ...]) -> Tensor:
        return init_tensor(self.arch, self.seed, fqn, shape)

    def _rows(self, full: Tensor) -> Tensor:
        n = full.shape[0] // self.tp
        return full[self.rank * n : (self.rank + 1) * n]

    @staticmethod
    @torch.no_grad()
    def _fill(param: Tensor, value: Tensor) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise RuntimeError(f"shard shape {tuple(value.shape)} != layer {tuple(param.shape)}")
        param.copy_(value)


def _heads(full: Tensor, heads: list[int], head_dim: int) -> Tensor:
    return torch.cat([full[h * head_dim : (h + 1) * head_dim] for h in heads])


class NeuronParallelModel(ParallelModel):
    def __init__(self, layout: Layout, env: DistEnv, nxd_config: dict, model: nn.Module) -> None:
        from neuronx_distributed.parallel_layers import parallel_state

        self.layout = layout
        self.env = env
        self.nxd_config = nxd_config
        self.model = model
        self.model_parts = [model]
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_size()
        self.tp_size, self.pp_size = layout.tp, layout.pp
        self._dp_groups = parallel_state.get_data_parallel_replica_groups()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.layout.bf16:
            return torch.autocast("xla", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        import torch_xla.core.xla_model as xm

        device = self.env.device
        if self.pp_size > 1:
            inputs = torch.cat([x for x, _ in micro_batches]).to(device)
            labels = torch.cat([y for _, y in micro_batches]).to(device)
            with self._autocast():
                # Runs forward and backward over the micro-batches; with
                # broadcast_and_average_loss the loss is the same on every rank.
                loss = self.model.run_train(input_ids=inputs, labels=labels)
            return float(loss)
        n = len(micro_batches)
        total = torch.zeros((), device=device)
        for x, y in micro_batches:
            with self._autocast():
                (loss,) = self.model(input_ids=x.to(device), labels=y.to(device))
            (loss / n).backward()
            total += loss.detach()
        mean = xm.all_reduce(xm.REDUCE_SUM, total / (n * self.dp_size), groups=self._dp_groups)
        return float(mean.item())

    @torch.no_grad()
    def evaluate(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[float, int]:
        """The model's loss is a per-micro-batch mean; packed sequences have no ignored labels,
        so every micro-batch counts the same tokens and mean x tokens is the exact sum."""
        import torch_xla.core.xla_model as xm

        device = self.env.device
        n = len(micro_batches)
        tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches) * self.dp_size
        if self.pp_size > 1:
            inputs = torch.cat([x for x, _ in micro_batches]).to(device)
            labels = torch.cat([y for _, y in micro_batches]).to(device)
            with self._autocast():
                mean = float(self.model.run_eval(input_ids=inputs, labels=labels))
            return mean * tokens, tokens
        total = torch.zeros((), device=device)
        for x, y in micro_batches:
            with self._autocast():
                (loss,) = self.model(input_ids=x.to(device), labels=y.to(device))
            total += loss
        mean = xm.all_reduce(xm.REDUCE_SUM, total / (n * self.dp_size), groups=self._dp_groups)
        return float(mean.item()) * tokens, tokens

    def any_rank(self, flag: bool) -> bool:
        import torch_xla.core.xla_model as xm

        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.env.device)
        return bool(xm.all_reduce(xm.REDUCE_MAX, t).item())

    def make_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], params: Any, **defaults: Any
    ) -> torch.optim.Optimizer:
        import neuronx_distributed as nxd

        return nxd.initialize_parallel_optimizer(self.nxd_config, optimizer_cls, params, **defaults)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """NxD reduces gradients over data parallel, clips (to the configured
        ``optimizer.gradClip``) and steps in one call; returns its pre-clip norm."""
        optimizer.step()
        norm = getattr(optimizer, "grad_norm", None)
        return float(norm) if norm is not None else float("nan")

    def clip_grad_norm(self, max_norm: float) -> float:
        raise NotImplementedError(
            "the nxd backend clips inside NxD's optimizer step (after the data-parallel "
            "reduction); use ParallelModel.optimizer_step"
        )
