"""Selective activation recompute on torch-xla: the nxd backend recomputes the attention core
through torch-xla's reentrant checkpoint (``neuron_backend.xla_recompute``), the way NxD
checkpoints its own modules, never through torch's non-reentrant one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_xla
import torch_xla.utils.checkpoint as xla_checkpoint
from llamajob_trainer import model as model_module
from llamajob_trainer.data import BatchSource, PackedDataset
from llamajob_trainer.model import Attention, rope_tables
from llamajob_trainer.parallel import neuron_backend as nb
from llamajob_trainer.parallel import parallelize
from llamajob_trainer.parallel.dist import DistEnv
from llamajob_trainer.presets import Architecture
from llamajob_trainer.train import to_batch
from torch import Tensor
from xla_helpers import MICRO_BATCHES, nxd_config, packed_dataset

ARCH = Architecture(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
    vocab_size=512, rope_theta=10000.0, max_position_embeddings=64,
)


def attention(device: torch.device, recompute_fn: Callable[..., Tensor] | None) -> Attention:
    torch.manual_seed(0)  # the same weights for every variant
    att = Attention(ARCH)
    if recompute_fn is not None:
        att.recompute_core, att.recompute_fn = True, recompute_fn
    return att.to(device)


def backward(att: Attention, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """Loss and gradients of one pass, still lazy (nothing run on the device yet)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, ARCH.hidden_size, generator=gen).to(device)
    cos, sin = (t.to(device) for t in rope_tables(ARCH.head_dim, 16, ARCH.rope_theta))
    loss = att(x, cos, sin).square().sum()
    loss.backward()
    return loss, [p.grad for p in att.parameters()]


def test_xla_recompute_gives_the_loss_and_gradients_of_no_recompute(
    device: torch.device,
) -> None:
    results = []
    for fn in (None, nb.xla_recompute):
        loss, grads = backward(attention(device, fn), device)
        torch_xla.sync()
        results.append((loss.item(), [g.cpu() for g in grads]))
    (plain_loss, plain_grads), (loss, grads) = results
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_the_recompute_is_in_the_backward_graph_behind_an_optimization_barrier(
    device: torch.device,
) -> None:
    """torch-xla's checkpoint puts a barrier on the recompute's inputs, so that the compiler
    cannot merge the recomputed attention with the forward values it replaces (which would
    keep the s x s scores alive after all). The graph that computes the gradients holds the
    attention core twice (its softmax exponentials double) and the barrier."""
    texts = []
    for fn in (None, nb.xla_recompute):
        _, grads = backward(attention(device, fn), device)
        texts.append(torch_xla._XLAC._get_xla_tensors_hlo(grads))
        torch_xla.sync()
    plain, recomputed = texts
    assert "opt-barrier" not in plain and "opt-barrier" in recomputed
    assert recomputed.count("exponential") == 2 * plain.count("exponential") > 0


def test_torchs_non_reentrant_checkpoint_does_not_run_on_xla(device: torch.device) -> None:
    """Why the nxd backend swaps the model's default recompute (aws-neuron-sdk issue 1317):
    torch's non-reentrant checkpoint looks up a ``torch.xla`` module that does not exist."""
    with pytest.raises(AttributeError, match="has no attribute 'xla'"):
        backward(attention(device, model_module.checkpoint_non_reentrant), device)


@pytest.mark.usefixtures("nxd")
def test_selective_recompute_on_the_nxd_path_is_torch_xlas_and_changes_nothing(
    device: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend's model with ``activationCheckpointing: selective`` (the default): each
    block recomputes its attention core through torch-xla's checkpoint, reentrant, once per
    layer and micro-batch; torch's checkpoint is never called; loss and gradients are those of
    ``none``."""
    dataset = PackedDataset(packed_dataset(tmp_path / "data"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend="xla")
    results = {}
    calls: list[dict[str, Any]] = []
    real = xla_checkpoint.checkpoint

    def spy(function: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(function, *args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.utils.checkpoint called on the nxd path")

    monkeypatch.setattr(xla_checkpoint, "checkpoint", spy)
    monkeypatch.setattr(model_module, "checkpoint", refuse)
    for mode in ("none", "selective"):
        cfg = nxd_config(tmp_path, parallelism={"activationCheckpointing": mode})
        pm = parallelize(cfg, cfg.model.architecture(), env)
        blocks = list(pm.model_parts[0].layers.values())
        assert all(b.attention.recompute_core is (mode == "selective") for b in blocks)
        assert all(b.recompute is False for b in blocks)  # whole blocks are NxD's to wrap
        if mode == "selective":
            assert all(b.attention.recompute_fn is nb.xla_recompute for b in blocks)
        source = BatchSource(dataset, seed=cfg.seed,
                             global_batch_size=cfg.batch.global_batch_size,
                             micro_batch_size=cfg.batch.micro_batch_size, dp_rank=0, dp_size=1)
        loss = float(pm.forward_backward([to_batch(rows) for rows in source.next_micro_batches()]))
        named = pm.model_parts[0].named_parameters()
        results[mode] = (loss, {name: p.grad.cpu() for name, p in named})
    assert calls == [{"use_reentrant": True}] * (len(blocks) * MICRO_BATCHES)
    (plain_loss, plain_grads), (loss, grads) = results["none"], results["selective"]
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
