"""Trainium backend: torch-xla + neuronx-distributed (NxD).

UNVERIFIED: no Trainium device and no Neuron packages are available where this project is
tested, so this module has never run. It follows NxD's documented API (``parallel_state``,
``parallel_layers``, ``modules.qkv_linear``, ``neuronx_distributed_config`` /
``initialize_parallel_model`` / ``initialize_parallel_optimizer``, ``NxDPPModel``), read at
aws-neuron/neuronx-distributed v2.28.0 and pytorch/xla v2.9.0 (the trn1 image's Neuron 2.28 and
torch 2.9); the paths cited in the comments are theirs at those tags. What *is* tested here:
selecting it without the packages fails with a clear error, and its calls into NxD and
torch-xla, made against stand-in modules, are the ones those sources take
(tests/test_nxd_backend.py); not how it runs on Trainium.

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
  clips (to ``optimizer.gradClip``, ZeRO-1 included) and steps in ``step()``; hence
  ``optimizer_step`` instead of ``clip_grad_norm``.
- Pipeline: ``NxDPPModel`` (``transformer_layer_cls=TransformerBlock``, micro-batches = gradient
  accumulation steps, ``virtual_pipeline_size``), partitioned by NxD (``auto_partition``).
- Activation checkpointing: ``full`` lets NxD checkpoint each ``TransformerBlock``;
  ``selective`` uses the model's attention-core recompute. Both recompute through torch-xla's
  reentrant checkpoint (``xla_recompute``), never torch's.
- Graphs: one per micro-batch and one for the optimizer step (``xm.mark_step``); the loss and
  the gradient norm are read in step closures once their graph has run (``sync_and_read``).
- ``bf16-mixed``: ``torch.autocast("xla", bfloat16)`` over fp32 parameters.

Differences from the torch backend: the step loss is the mean of micro-batch means (what NxD's
pipeline returns), equal to the global token mean when no label is ignored (packed data);
checkpoints are written and read by NxD's ``save_checkpoint``/``load_checkpoint`` in its per-rank
format, inside the checkpoint manager's guarantees, and resume only in the layout that saved
them (``checkpoint_nxd.NxDStateIO``). With a pipeline the model is built on the meta device and
NxD materialises only each rank's stages, filled through NxD's ``param_init_fn`` from the same
per-FQN initial values; without one, every rank's shards are filled as the model is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ..checkpoint import StateIO

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
            # NxD's Llama pipeline script sets both (examples/training/llama/
            # tp_pp_llama_hf_pretrain/run_llama_nxd.py at v2.28.0, lines 137 and 143).
            # auto_partition: NxDPPModel traces and cuts only when given cuts or this flag
            # (pipeline/model.py, lines 340-372), and NxD keeps delayed tracing off
            # (utils/model_utils.py, lines 359-362); unpartitioned, the first parameters() call
            # raises "Model has not been partitioned yet" (lines 872-876) and full activation
            # checkpointing finds no stage modules to wrap (utils/activation_checkpoint.py,
            # lines 71-72). NxD splits the layers evenly, the remainder to the later stages
            # (pipeline/partition.py, lines 280-303).
            "auto_partition": True,
            # The data-parallel gradient reduction is NxD's optimizer wrapper's; without this
            # flag the pipeline also all-reduces every gradient when ZeRO-1 is off
            # (pipeline/model.py, line 1687).
            "use_optimizer_wrapper": True,
            "use_zero1_optimizer": p.zero1,
            "broadcast_and_average_loss": True,
        }
    # Pipeline: NxD's meta-device initialisation, as its 70B Llama pipeline runs
    # (run_llama2_70B_tp_pp.sh at v2.28.0, line 131: --use_meta_device_init 1, which
    # run_llama_nxd.py turns into this config at lines 113-117). The model is built on the meta
    # device (trainer/trainer.py, lines 162-166), NxDPPModel partitions it, and only this rank's
    # stages are materialised on the host through param_init_fn (lines 172-183; pipeline/
    # model.py, lines 686-688 and 1954-1961); the other stages' layers are never allocated.
    # Without it every rank would hold its shards of every layer until partitioning.
    # sequential_move_factor is NxD's default (trainer/trainer.py, line 45), set to keep its
    # "not set" warning (lines 103-108) quiet.
    stage_init = _StageInit() if layout.pp > 1 else None
    model_init_config = (
        None
        if stage_init is None
        else {"meta_device_init": True, "param_init_fn": stage_init, "sequential_move_factor": 11}
    )
    nxd_config = nxd.neuronx_distributed_config(
        tensor_parallel_size=layout.tp,
        pipeline_parallel_size=layout.pp,
        pipeline_config=pipeline_config,
        # max_grad_norm is read by NxD's own clipping, used without ZeRO-1 (trainer/
        # optimizer.py at v2.28.0, lines 142-143); ZeRO-1 clips inside torch-xla's optimizer,
        # which NeuronParallelModel.make_optimizer gives the same bound.
        optimizer_config={
            "zero_one_enabled": p.zero1,
            "grad_clipping": True,
            "max_grad_norm": max_grad_norm(cfg.optimizer.grad_clip),
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
        model_init_config=model_init_config,
    )
    model = nxd.initialize_parallel_model(
        nxd_config, _build_model, False, arch, layout, cfg.seed, p.kv_replicator, stage_init
    )
    return NeuronParallelModel(layout, env, nxd_config, model)


def max_grad_norm(grad_clip: float) -> float:
    """The clipping bound NxD's optimizer gets for ``optimizer.gradClip``: clipping stays on
    (so the optimizer reports the norm) with an infinite bound when gradClip is 0."""
    return grad_clip if grad_clip > 0 else float("inf")


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


class _StageInit:
    """NxD's ``param_init_fn`` for the pipeline, handed over before the model exists: it
    forwards to the converter ``_build_model`` makes."""

    def __init__(self) -> None:
        self.converter: _Converter | None = None

    def __call__(self, module: nn.Module, device: torch.device) -> None:
        if self.converter is None:
            raise RuntimeError("NxD asked for parameters before the model was built")
        self.converter.init_module(module, device)


def _build_model(
    arch: Architecture,
    layout: Layout,
    seed: int,
    kv_rep: int,
    stage_init: _StageInit | None = None,
) -> NeuronLlama:
    """Called by NxD after ``initialize_model_parallel``: the one Llama, NxD layers swapped in.

    With ``stage_init`` (the pipeline) the parameters stay on the meta device and are filled
    later, by NxD, for this rank's stages only; without, every shard is filled now.
    """
    from neuronx_distributed.parallel_layers import parallel_state

    with torch.device("meta"):
        model = NeuronLlama(arch, max_seq_len=layout.seq_length)
    converter = _Converter(
        arch,
        layout,
        seed,
        kv_rep,
        parallel_state.get_tensor_model_parallel_rank(),
        stage_init is not None,
    )
    converter.apply(model)
    if stage_init is not None:
        stage_init.converter = converter
    selective = layout.activation_checkpointing == "selective"
    for block in model.layers.values():
        block.attention.recompute_core = selective
        if selective:
            block.attention.recompute_fn = xla_recompute
    return model


def xla_recompute(function: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """The selective recompute on torch-xla: torch-xla's checkpoint, reentrant, as NxD wraps
    its own checkpointed modules (utils/activation_checkpoint.py at v2.28.0, lines 37-46).

    torch's non-reentrant checkpoint (the model's default) does not run on XLA: torch-xla's
    refuses use_reentrant=False (torch_xla/utils/checkpoint.py at v2.9.0, lines 301-304) and
    torch's looks up ``torch.xla``, which does not exist (aws-neuron-sdk issue 1317). torch-xla's
    puts an optimization barrier on the recompute's inputs in backward (lines 168-178), so the
    compiler cannot fold the recompute into the forward values it was meant to replace.
    """
    from torch_xla.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=True)


class _Converter:
    """Swaps NxD's layers into the meta-device model and fills this rank's shards.

    Which rows and columns the rank holds is ``nxd_shards``'s map, the one pretrained import
    and export use too, so a fresh start, an import and an export agree by construction.
    """

    def __init__(
        self,
        arch: Architecture,
        layout: Layout,
        seed: int,
        kv_rep: int,
        tp_rank: int,
        deferred: bool = False,
    ) -> None:
        from neuronx_distributed.parallel_layers import layers

        from .nxd_shards import RankShards, ShardPlan, platform_named

        self.layers = layers
        self.arch, self.seed = arch, seed
        platform = platform_named(self._platform()) if kv_rep > 1 else None
        self.shards = RankShards(ShardPlan(arch, layout.tp, kv_rep, platform), tp_rank)
        self.sp = layout.sequence_parallel
        self.seq_kwargs: dict[str, Any] = (
            {"sequence_parallel_enabled": True, "sequence_dimension": 1} if self.sp else {}
        )
        # Deferred (the pipeline): parameters stay on the meta device and each is only named
        # here, per owning module, with its FQN and whether it is a shard; NxD fills the ones of
        # this rank's stage through ``init_module``.
        self.deferred = deferred
        self.pending: dict[nn.Module, dict[str, tuple[str, bool]]] = {}

    @staticmethod
    def _platform() -> str:
        """trn1 or trn2, decided as NxD's GQA layer decides where kv copies go: the same two
        functions (``modules/qkv_linear.py`` at v2.28.0 imports them at lines 32 and 40 and
        branches on them at lines 80-88)."""
        from neuronx_distributed.utils.utils import hardware
        from torch_neuronx.utils import get_platform_target

        target = get_platform_target()
        try:
            return str(hardware(target).value)
        except ValueError:
            return str(target)

    def apply(self, model: NeuronLlama) -> None:
        a = self.arch
        h = a.hidden_size
        emb = self.layers.ParallelEmbedding(a.vocab_size, h, **self.seq_kwargs)
        self._fill(emb, "weight", "tok_embeddings.weight")
        model.tok_embeddings = emb
        for idx, block in model.layers.items():
            self._convert_block(f"layers.{idx}.", block)
        assert model.norm is not None
        self._norm(model.norm, "norm.weight")
        if a.tie_embeddings:
            # Output rows and embedding rows are both vocabulary shards: one parameter.
            out = self._column(h, a.vocab_size, None)
            out.weight = emb.weight
            if self.deferred:
                # The output sits on the last stage, the embedding on the first: each stage
                # fills its copy with the same rows, which NxD then keeps in sync as a shared
                # weight (pipeline/model.py at v2.28.0, register_shared_weights, lines 750-777;
                # _sync_shared_weights, lines 818-832).
                self._fill(out, "weight", "tok_embeddings.weight")
        else:
            out = self._column(h, a.vocab_size, "output.weight")
        model.output = out
        model.rope_cos, model.rope_sin = rope_tables(a.head_dim, model.max_seq_len, a.rope_theta)
        # Pretrained import finds the map here (``hf.rank_shards_of``): NxD's wrappers keep the
        # model object but not attributes set on parameters.
        model.rank_shards = self.shards

    def _convert_block(self, prefix: str, block: TransformerBlock) -> None:
        a = self.arch
        h, q_dim = a.hidden_size, a.num_heads * a.head_dim
        att, ff = block.attention, block.feed_forward
        if self.shards.plan.replicated_kv:
            self._replicated_kv(prefix, att)
        else:
            att.wq = self._column(h, q_dim, prefix + "attention.wq.weight")
            att.wk = self._column(h, a.kv_dim, prefix + "attention.wk.weight")
            att.wv = self._column(h, a.kv_dim, prefix + "attention.wv.weight")
        # With replicated kv the rank's q heads are not a contiguous block; the map gives wo
        # the same heads in the same order.
        att.wo = self._row(q_dim, h, prefix + "attention.wo.weight")
        ff.w1 = self._column(h, a.intermediate_size, prefix + "feed_forward.w1.weight")
        ff.w3 = self._column(h, a.intermediate_size, prefix + "feed_forward.w3.weight")
        ff.w2 = self._row(a.intermediate_size, h, prefix + "feed_forward.w2.weight")
        self._norm(block.attention_norm, prefix + "attention_norm.weight")
        self._norm(block.ffn_norm, prefix + "ffn_norm.weight")

    def _replicated_kv(self, prefix: str, att: Attention) -> None:
        from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear

        a = self.arch
        proj = GQAQKVColumnParallelLinear(
            a.hidden_size,
            [a.num_heads * a.head_dim, a.kv_dim],
            bias=False,
            gather_output=False,
            sequence_parallel_enabled=self.sp,
            kv_size_multiplier=self.shards.plan.kv_replicator,
            fuse_qkv=False,
        )
        self._fill(proj, "weight_q", prefix + "attention.wq.weight")
        self._fill(proj, "weight_k", prefix + "attention.wk.weight")
        self._fill(proj, "weight_v", prefix + "attention.wv.weight")
        for name in ("wq", "wk", "wv"):
            delattr(att, name)
        att.qkv_proj = proj
        att.__class__ = _ReplicatedKVAttention

    def _column(self, fan_in: int, fan_out: int, fqn: str | None) -> nn.Module:
        layer = self.layers.ColumnParallelLinear(
            fan_in, fan_out, bias=False, gather_output=False, **self.seq_kwargs
        )
        if fqn is not None:
            self._fill(layer, "weight", fqn)
        return layer

    def _row(self, fan_in: int, fan_out: int, fqn: str) -> nn.Module:
        layer = self.layers.RowParallelLinear(
            fan_in, fan_out, bias=False, input_is_parallel=True, **self.seq_kwargs
        )
        self._fill(layer, "weight", fqn)
        return layer

    def _norm(self, norm: RMSNorm, fqn: str) -> None:
        if self.deferred:
            shape = self.shards.plan.full_shape(fqn)
            norm.weight = nn.Parameter(torch.empty(shape, device="meta"))
            self._fill(norm, "weight", fqn, sharded=False)
        else:
            norm.weight = nn.Parameter(self._full(fqn))
        # NxD's optimizer all-reduces these over the tensor group under sequence parallel; NxD's
        # re-initialisation keeps the flag (utils/model_utils.py at v2.28.0,
        # preserve_parallel_attributes, lines 165-201).
        norm.weight.sequence_parallel_enabled = self.sp  # type: ignore[attr-defined]

    def _full(self, fqn: str) -> Tensor:
        return init_tensor(self.arch, self.seed, fqn, self.shards.plan.full_shape(fqn))

    def _fill(self, module: nn.Module, name: str, fqn: str, sharded: bool = True) -> None:
        """Give ``module``'s parameter ``name`` this rank's part of ``fqn``'s initial value: now,
        or, deferred, when NxD materialises the module (``init_module``)."""
        if self.deferred:
            self.pending.setdefault(module, {})[name] = (fqn, sharded)
        else:
            self._copy(module._parameters[name], fqn, sharded)

    def init_module(self, module: nn.Module, device: torch.device) -> None:
        """NxD's ``param_init_fn``: fill ``module``'s own parameters, not its submodules'.

        NxD calls it for every module of this rank's pipeline stages only, after partitioning,
        each parameter already replaced by an empty one on ``device`` (the host): ``reinit_model``
        (utils/model_utils.py at v2.28.0, lines 220-229) from ``maybe_materialize_local_module``
        (pipeline/model.py, lines 1954-1961). The modules are the ones built here: the tracer
        keeps NxD's parallel layers, ``TransformerBlock`` and ``RMSNorm`` as leaves
        (pipeline/trace.py, lines 173-177; model.py, lines 585-586), and torch.fx's
        ``split_module`` places leaf modules into the stages as the same objects.
        """
        for name, (fqn, sharded) in self.pending.get(module, {}).items():
            self._copy(module._parameters[name], fqn, sharded)

    @torch.no_grad()
    def _copy(self, param: Tensor | None, fqn: str, sharded: bool) -> None:
        """Copy this rank's shard of ``fqn``'s initial value (all of it for a replicated
        parameter) into the NxD layer's parameter."""
        if param is None:
            raise RuntimeError(f"{fqn}: the NxD layer has no such parameter")
        full = self._full(fqn)
        value = self.shards.take(fqn, full) if sharded else full
        if tuple(param.shape) != tuple(value.shape):
            raise RuntimeError(
                f"{fqn}: shard shape {tuple(value.shape)} != NxD layer {tuple(param.shape)}"
            )
        param.copy_(value)


def sync_and_read(value: Tensor, *pending: DeviceScalar) -> float:
    """Cut the pending graph (``xm.mark_step``) and read ``value`` in a step closure.

    torch-xla runs step closures at the end of ``mark_step``, after the graph that computes
    ``value`` has been handed to the device (torch_xla/core/xla_model.py at v2.9.0, lines
    977-1028; torch_xla/torch_xla.py, lines 78-96), so the read takes device data. A bare
    ``.item()`` before the cut would instead compile and run the part of the graph the value
    needs on its own, and cut the step there. NxD's Llama scripts read the loss and the norm
    the same way (examples/training/llama/tp_zero1_llama_hf_pretrain/
    tp_zero1_llama_hf_pretrain.py at v2.28.0, lines 331-336; tp_pp_llama_hf_pretrain/
    run_llama_nxd.py, lines 295-311).
    """
    import torch_xla.core.xla_model as xm

    read: list[float] = []
    xm.add_step_closure(lambda t: read.append(float(t.item())), (value,))
    for scalar in pending:
        # Values of the step's earlier graphs, read in the same closure pass: one host wait per
        # step, as in NxD's scripts, instead of one per value.
        xm.add_step_closure(scalar.set_from, (scalar.tensor,))
    xm.mark_step()
    return read[0]


class DeviceScalar:
    """A scalar still on the XLA device, read when the step's last graph is cut.

    ``forward_backward`` returns one for the loss, so that the host does not wait for the
    backward graphs before it traces the optimizer's; ``optimizer_step`` reads it together with
    the gradient norm, and ``float()`` gives the value (reading it at once if nothing did)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.value: float | None = None

    def set_from(self, tensor: Tensor) -> None:
        self.value = float(tensor.item())

    def __float__(self) -> float:
        if self.value is None:
            self.value = sync_and_read(self.tensor)
        return self.value


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
        self._pending_loss: DeviceScalar | None = None

    def state_io(self) -> StateIO:
        """Checkpoints through NxD's own ``save_checkpoint``/``load_checkpoint``
        (``checkpoint_nxd.NxDStateIO``). torch's DCP does not fit here: on the XLA process group a
        barrier returns at once (torch_xla/distributed/xla_backend.py at v2.9.0, lines
        230-231), and the ZeRO-1 optimizer's state dict holds this rank's slice of the flattened
        parameters (``base_state``, torch_xla/distributed/zero_redundancy_optimizer.py, lines
        496-510), not per-parameter state DCP could reshard."""
        from neuronx_distributed.parallel_layers import parallel_state

        from ..checkpoint_nxd import NxDLayout, NxDStateIO
        from ..hf import rank_shards_of

        shards = rank_shards_of(self.model)
        layout = NxDLayout(
            tp=self.tp_size,
            pp=self.pp_size,
            dp=self.dp_size,
            zero1=bool(self.nxd_config["optimizer_config"]["zero_one_enabled"]),
            kv_replicator=shards.plan.kv_replicator if shards is not None else 1,
            virtual_pipeline=self.layout.virtual_pipeline,
        )
        coords = (
            self.dp_rank,
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
        )
        platform = shards.plan.platform if shards is not None else None
        return NxDStateIO(layout, coords, platform)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.layout.bf16:
            return torch.autocast("xla", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[tuple[Tensor, Tensor]]) -> float:
        """One graph per micro-batch. Without a cut, torch-xla records every micro-batch of the
        step into one lazy graph (1,024 forward and backward passes for 8B at GBS 1024 on one
        node), which the compiler cannot take. NxD's TP/ZeRO-1 Llama script gets the same cut
        from its loader, which marks a step per batch (examples/training/llama/
        tp_zero1_llama_hf_pretrain/tp_zero1_llama_hf_pretrain.py at v2.28.0, lines 427-430;
        torch_xla/distributed/parallel_loader.py at v2.9.0, lines 39-47), and cuts again at
        the accumulation boundary (line 297). The pipeline cuts its own graphs (NxDPPModel's
        mark steps around and inside ``run_train``)."""
        import torch_xla.core.xla_model as xm

        device = self.env.device
        if self.pp_size > 1:
            inputs = torch.cat([x for x, _ in micro_batches]).to(device)
            labels = torch.cat([y for _, y in micro_batches]).to(device)
            with self._autocast():
                # Runs forward and backward over the micro-batches; with
                # broadcast_and_average_loss the loss is the same on every rank, already on
                # the host (return_loss_on_cpu, NxDPPModel's default: pipeline/model.py at
                # v2.28.0, lines 1993-1999).
                loss = self.model.run_train(input_ids=inputs, labels=labels)
            return float(loss)
        n = len(micro_batches)
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(micro_batches, 1):
            with self._autocast():
                (loss,) = self.model(input_ids=x.to(device), labels=y.to(device))
            (loss / n).backward()
            total += loss.detach()
            if i < n:
                xm.mark_step()
        # The loss reduction joins the last micro-batch's graph; the optimizer step's cut reads
        # it (``DeviceScalar``), so the host goes on tracing while the device runs backward.
        mean = xm.all_reduce(xm.REDUCE_SUM, total / (n * self.dp_size), groups=self._dp_groups)
        xm.mark_step()
        self._pending_loss = DeviceScalar(mean)
        return self._pending_loss  # type: ignore[return-value]  # float() gives the value

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
        for i, (x, y) in enumerate(micro_batches, 1):
            with self._autocast():
                (loss,) = self.model(input_ids=x.to(device), labels=y.to(device))
            total += loss
            if i < n:
                xm.mark_step()  # one forward graph per micro-batch, as in forward_backward
        mean = xm.all_reduce(xm.REDUCE_SUM, total / (n * self.dp_size), groups=self._dp_groups)
        return sync_and_read(mean) * tokens, tokens

    def any_rank(self, flag: bool) -> bool:
        import torch_xla.core.xla_model as xm

        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.env.device)
        return bool(xm.all_reduce(xm.REDUCE_MAX, t).item())

    def make_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], params: Any, **defaults: Any
    ) -> torch.optim.Optimizer:
        """NxD's optimizer wrapper. With ZeRO-1 the clipping is torch-xla's
        ``ZeroRedundancyOptimizer``'s, whose bound is its ``max_norm`` argument, 1.0 unless
        given (torch_xla/distributed/zero_redundancy_optimizer.py at v2.9.0, lines 74, 103 and
        434). NxD does not pass ``optimizer_config["max_grad_norm"]`` on to it (trainer/
        trainer.py at v2.28.0, lines 250-255 and 296-301), but it does pass the keyword
        arguments, so the bound goes in here. Without ZeRO-1 the wrapper clips itself with
        ``max_grad_norm`` (trainer/optimizer.py, lines 142-143) and the optimizer class would
        refuse the extra argument."""
        import neuronx_distributed as nxd

        optimizer_config = self.nxd_config["optimizer_config"]
        if optimizer_config["zero_one_enabled"]:
            defaults = {**defaults, "max_norm": optimizer_config["max_grad_norm"]}
        return nxd.initialize_parallel_optimizer(self.nxd_config, optimizer_cls, params, **defaults)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """NxD reduces gradients over data parallel, clips (to the configured
        ``optimizer.gradClip``) and steps in one call; returns its pre-clip norm.

        The step is a graph of its own, cut here as NxD's Llama scripts cut it after
        ``optimizer.step()`` (run_llama_nxd.py at v2.28.0, lines 292-311); otherwise it
        would join the next step's first micro-batch."""

        optimizer.step()
        pending = [self._pending_loss] if self._pending_loss is not None else []
        self._pending_loss = None
        norm = getattr(optimizer, "grad_norm", None)
        if norm is None:
            norm = torch.full((), float("nan"), device=self.env.device)
        return sync_and_read(norm, *pending)

    def clip_grad_norm(self, max_norm: float) -> float:
        raise NotImplementedError(
            "the nxd backend clips inside NxD's optimizer step (after the data-parallel "
            "reduction); use ParallelModel.optimizer_step"
        )
