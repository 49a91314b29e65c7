"""Stand-ins for the parts of NeuronX Distributed that the nxd backend calls, for one rank with
tensor degree 1, over the real torch-xla.

NxD cannot be installed without the Neuron SDK, but at tensor degree 1 on one rank what it does
reduces to plain torch on the XLA device, so these stand-ins compute what NxD would there, as
read at aws-neuron/neuronx-distributed v2.28.0:

- ``initialize_parallel_model`` builds the model with the backend's function and moves it to
  torch-xla's device (``trainer/trainer.py``, lines 147-189, phase 3).
- ``ColumnParallelLinear``, ``RowParallelLinear`` and ``ParallelEmbedding`` hold the whole
  weight at tensor degree 1: a plain ``nn.Linear`` or ``nn.Embedding`` of the same shape.
- ``parallel_cross_entropy`` is the per-token cross-entropy, unreduced, shaped like the labels.
- ``trainer.save_checkpoint`` / ``load_checkpoint`` (``trainer/checkpoint.py``) write and read
  one rank's files in NxD's layout under ``<dir>/<tag>/``: the ``checkpoint`` marker,
  ``model/`` and ``optim/dp_rank_DD_tp_rank_TT_pp_rank_PP.pt`` through torch-xla's own xser
  (``torch_xla.utils.serialization``: each XLA tensor moved to the host into its own file under
  ``<file>.tensors/``), and ``done`` last (lines 148, 194, 230, 545-585, 672-681). NxD's
  ``.info.pt`` beside each file (shapes and dtypes for its parallel loader) is left out: nothing
  here reads it. Foreground saves only; loading the optimizer first when both are given, as
  NxD does (lines 894-951).
- ``initialize_parallel_optimizer`` with ZeRO-1 builds torch-xla's own
  ``ZeroRedundancyOptimizer`` (the base class of NxD's ``NeuronZero1Optimizer``) with the
  arguments NxD gives it (lines 250-301: clipping on, layout unpinned, the data-parallel
  groups, 130 MB buckets), plus the keyword arguments the backend passes. Without ZeRO-1 it
  builds the optimizer class itself and clips to ``max_grad_norm`` before stepping, as NxD's
  ``NxDOptimizer.step`` does (``trainer/optimizer.py``, lines 122-146).

Everything else (torch-xla's graphs, collectives, checkpointing of activations, autocast and
ZeRO-1 optimizer) is the real torch-xla 2.9.
"""

from __future__ import annotations

import importlib.machinery
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_xla
from torch import Tensor, nn

DP_GROUPS = [[0]]  # one rank: data-parallel and tensor-parallel groups are that rank alone
TP_GROUPS = [[0]]
# NxD's all-gather and reduce-scatter bucket for ZeRO-1 from torch 2.2 on.
BUCKET_CAP_MB = 130


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    # importlib.util.find_spec (the backend's require_neuron) reads a loaded module's __spec__.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


class NxDOptimizer:
    """NxD's optimizer wrapper as far as the trainer sees it: the wrapped optimizer's groups
    and state, ``step`` (clipping without ZeRO-1) and the pre-clip ``grad_norm``."""

    def __init__(self, optimizer: torch.optim.Optimizer, nxd_config: dict[str, Any]) -> None:
        self.optimizer = optimizer
        self.nxd_config = nxd_config
        self._grad_norm: Tensor | None = None

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def grad_norm(self) -> Tensor | None:
        return self._grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # NxD's checkpoint calls go through the wrapper to the wrapped optimizer's state dict
    # (trainer/optimizer.py): with ZeRO-1, this rank's slice of the flattened parameters.
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def step(self) -> None:
        config = self.nxd_config["optimizer_config"]
        if not config["zero_one_enabled"] and config["grad_clipping"]:
            params = [p for group in self.param_groups for p in group["params"]
                      if p.grad is not None]
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
        self.optimizer.step()
        if config["zero_one_enabled"]:
            self._grad_norm = self.optimizer.grad_norm


def neuronx_distributed_config(**kwargs: Any) -> dict[str, Any]:
    return dict(kwargs)


def initialize_parallel_model(nxd_config: dict[str, Any], model_fn: Callable[..., nn.Module],
                              include_buffers: bool, *args: Any) -> nn.Module:
    return model_fn(*args).to(torch_xla.device())


def initialize_parallel_optimizer(nxd_config: dict[str, Any], optimizer_cls: type,
                                  params: Iterable[Any], **defaults: Any) -> NxDOptimizer:
    config = nxd_config["optimizer_config"]
    if config["zero_one_enabled"]:
        from torch_xla.distributed.zero_redundancy_optimizer import ZeroRedundancyOptimizer

        optimizer: torch.optim.Optimizer = ZeroRedundancyOptimizer(
            params,
            optimizer_cls,
            grad_clipping=config["grad_clipping"],
            pin_layout=False,
            sharding_groups=DP_GROUPS,
            grad_norm_groups=TP_GROUPS,
            bucket_cap_mb_all_gather=BUCKET_CAP_MB // len(DP_GROUPS[0]),
            bucket_cap_mb_reduce_scatter=BUCKET_CAP_MB,
            save_master_weights=False,
            **defaults,
        )
    else:
        optimizer = optimizer_cls(params, **defaults)
    return NxDOptimizer(optimizer, nxd_config)


def column_parallel_linear(fan_in: int, fan_out: int, bias: bool = True,
                           gather_output: bool = True, **kwargs: Any) -> nn.Module:
    return nn.Linear(fan_in, fan_out, bias=bias)


def row_parallel_linear(fan_in: int, fan_out: int, bias: bool = True,
                        input_is_parallel: bool = False, **kwargs: Any) -> nn.Module:
    return nn.Linear(fan_in, fan_out, bias=bias)


def parallel_embedding(num_embeddings: int, dim: int, **kwargs: Any) -> nn.Module:
    return nn.Embedding(num_embeddings, dim)


def parallel_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(
        labels
    )


def nxd_shard_file(kind: str, dp: int, tp: int, pp: int) -> str:
    """NxD's name for one rank's model or optimizer file (``_get_path``, lines 54-63)."""
    return f"{kind}/dp_rank_{dp:02d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def save_checkpoint(checkpoint_dir_str: str, tag: str, model: nn.Module | None = None,
                    optimizer: Any = None, scheduler: Any = None, user_content: Any = None,
                    num_workers: int = 8, use_xser: bool = False,
                    num_kept_ckpts: int | None = None, async_save: bool = False,
                    **kwargs: Any) -> None:
    from torch_xla.utils import serialization as xser

    # What the trainer never asks for stays out: a stand-in that quietly did something else
    # would let a test pass on behaviour NxD does not have.
    if async_save or not use_xser or scheduler is not None or user_content is not None:
        raise NotImplementedError("the stand-in saves xser files in the foreground only, "
                                  "without scheduler or user content")
    root = Path(checkpoint_dir_str) / tag
    root.mkdir(parents=True, exist_ok=True)
    (root / "checkpoint").write_text("1")
    if model is not None:
        path = root / nxd_shard_file("model", 0, 0, 0)
        path.parent.mkdir(exist_ok=True)
        xser.save(model.state_dict(), str(path), master_only=False)
    if optimizer is not None:
        path = root / nxd_shard_file("optim", 0, 0, 0)
        path.parent.mkdir(exist_ok=True)
        xser.save(optimizer.state_dict(), str(path), master_only=False)
    # NxD marks the tag done once every rank's writes ended; one rank here, nothing to wait for.
    # Its pruning of older tags is idle: the trainer passes num_kept_ckpts=None.
    (root / "done").write_text("1")


def load_checkpoint(path: str, tag: str | None = None, model: nn.Module | None = None,
                    optimizer: Any = None, scheduler: Any = None, num_workers: int = 8,
                    strict: bool = True, **kwargs: Any) -> None:
    from torch_xla.utils import serialization as xser

    assert tag is not None, "the trainer always names the tag"
    root = Path(path) / tag
    if optimizer is not None:
        # One rank: its files are dp rank 0's, with ZeRO-1 or without.
        optimizer.load_state_dict(xser.load(str(root / nxd_shard_file("optim", 0, 0, 0))))
    if model is not None:
        model.load_state_dict(xser.load(str(root / nxd_shard_file("model", 0, 0, 0))),
                              strict=strict)


class CheckpointIOState:
    """NxD's background-save state; the manager only names its exit hook (``wait_all``)."""

    def wait_all(self) -> None:
        return None


def finalize_checkpoint() -> None:
    # Foreground saves are complete when save_checkpoint returns.
    return None


def modules() -> dict[str, types.ModuleType]:
    """The stand-in modules by name, each also set as an attribute of its parent."""
    mods = {
        "torch_neuronx": _module("torch_neuronx"),
        "neuronx_distributed": _module(
            "neuronx_distributed",
            neuronx_distributed_config=neuronx_distributed_config,
            initialize_parallel_model=initialize_parallel_model,
            initialize_parallel_optimizer=initialize_parallel_optimizer,
        ),
        "neuronx_distributed.parallel_layers": _module("neuronx_distributed.parallel_layers"),
        "neuronx_distributed.parallel_layers.parallel_state": _module(
            "neuronx_distributed.parallel_layers.parallel_state",
            get_data_parallel_rank=lambda: 0,
            get_data_parallel_size=lambda: len(DP_GROUPS[0]),
            get_data_parallel_replica_groups=lambda: DP_GROUPS,
            get_tensor_model_parallel_rank=lambda: 0,
            get_tensor_model_parallel_replica_groups=lambda: TP_GROUPS,
            get_pipeline_model_parallel_rank=lambda: 0,
        ),
        "neuronx_distributed.parallel_layers.layers": _module(
            "neuronx_distributed.parallel_layers.layers",
            ColumnParallelLinear=column_parallel_linear,
            RowParallelLinear=row_parallel_linear,
            ParallelEmbedding=parallel_embedding,
        ),
        "neuronx_distributed.parallel_layers.loss_functions": _module(
            "neuronx_distributed.parallel_layers.loss_functions",
            parallel_cross_entropy=parallel_cross_entropy,
        ),
        "neuronx_distributed.trainer": _module(
            "neuronx_distributed.trainer",
            save_checkpoint=save_checkpoint,
            load_checkpoint=load_checkpoint,
        ),
        "neuronx_distributed.trainer.checkpoint": _module(
            "neuronx_distributed.trainer.checkpoint",
            save_checkpoint=save_checkpoint,
            load_checkpoint=load_checkpoint,
            finalize_checkpoint=finalize_checkpoint,
            CheckpointIOState=CheckpointIOState,
            g_iostate=None,
        ),
    }
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    return mods
