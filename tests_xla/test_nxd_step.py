"""The nxd backend's training step on torch-xla: the trainer's own loop pieces (data loader,
learning-rate schedule, ``forward_backward``, ``optimizer_step``), NxD stood in at tensor
degree 1 (``nxd_standins``), torch-xla's graphs and ZeRO-1 optimizer real.

The graph counts are the point of the micro-batch loop: torch-xla records lazily, so without a
cut per micro-batch a step is one graph that grows with gradient accumulation (for 8B on one
node, 1,024 forward and backward passes), which the Neuron compiler cannot take.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.data import BatchSource, PackedDataset
from llamajob_trainer.model import Llama, loss_sum
from llamajob_trainer.parallel import ParallelModel, init_distributed, parallelize
from llamajob_trainer.parallel import neuron_backend as nb
from llamajob_trainer.parallel.dist import DistEnv
from llamajob_trainer.train import (
    build_optimizers,
    lr_at,
    optimizer_step,
    param_groups,
    set_lr,
    to_batch,
)
from torch import Tensor
from xla_helpers import (
    MICRO_BATCHES,
    SEQ,
    count_graphs,
    free_port,
    nxd_config,
    packed_dataset,
)

Batch = list[tuple[Tensor, Tensor]]


def build(cfg: TrainerConfig, device: torch.device) -> ParallelModel:
    """The trainer's entry point (``parallel.parallelize``), which picks the nxd backend."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend="xla")
    pm = parallelize(cfg, cfg.model.architecture(), env)
    assert isinstance(pm, nb.NeuronParallelModel)
    return pm


def loader(cfg: TrainerConfig, tmp_path: Path, pm: ParallelModel) -> BatchSource:
    """The training loop's data loader over a small packed dataset, for this rank."""
    return BatchSource(
        PackedDataset(packed_dataset(tmp_path / "data")),
        seed=cfg.seed,
        global_batch_size=cfg.batch.global_batch_size,
        micro_batch_size=cfg.batch.micro_batch_size,
        dp_rank=pm.dp_rank,
        dp_size=pm.dp_size,
    )


def cpu_reference(cfg: TrainerConfig) -> Llama:
    """The unsharded model on the CPU with the same initial weights (the backend fills NxD's
    layers from the same per-parameter generators)."""
    model = Llama(cfg.model.architecture(), max_seq_len=cfg.data.seq_length)
    model.init_weights(cfg.seed)
    return model


def reference_loss(model: Llama, batch: Batch) -> Tensor:
    """The nxd backend's step loss: the mean of the micro-batches' mean token losses."""
    return torch.stack([loss_sum(model(x), y) / y.numel() for x, y in batch]).mean()


@pytest.mark.usefixtures("nxd")
def test_each_micro_batch_is_one_graph_and_steps_compile_nothing_after_warm_up(
    device: torch.device, tmp_path: Path
) -> None:
    """Steps as the training loop runs them (``train._loop``): every step executes one graph per
    micro-batch and one for the optimizer. Warm-up compiles the first, middle and last
    micro-batch graphs (the last also reduces the loss) and the optimizer's graphs (its first
    step creates AdamW's moments); after it, a step compiles nothing, although the learning
    rate changes every step (torch-xla passes such scalars as data, not as constants)."""
    cfg = nxd_config(tmp_path)
    pm = build(cfg, device)
    source = loader(cfg, tmp_path, pm)
    optimizers = build_optimizers(pm, cfg.optimizer)
    steps, lrs, losses = [], [], []
    for step in range(4):
        with count_graphs() as graphs:
            lrs.append(lr_at(step, cfg.optimizer, cfg.total_steps()))
            set_lr(optimizers, lrs[-1])
            batch = [to_batch(rows) for rows in source.next_micro_batches()]
            assert len(batch) == MICRO_BATCHES
            loss = pm.forward_backward(batch)
            norm = optimizer_step(pm, optimizers, cfg.optimizer.grad_clip)
            losses.append(float(loss))  # as train._loop: read with the optimizer's graph
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
        steps.append(graphs)
        assert math.isfinite(losses[-1]) and math.isfinite(norm) and norm > 0
    assert [g.executed for g in steps] == [MICRO_BATCHES + 1] * 4
    # First, middle and last micro-batch, then the optimizer: at most four new graphs in the
    # first step (fewer when an earlier test traced the same ones), at most one in the second.
    assert steps[0].compiled <= 4 and steps[1].compiled <= 1
    assert steps[2].compiled == steps[3].compiled == 0
    assert len(set(lrs)) == 4
    # And the steps train: four of them lower the loss on this text.
    assert losses[3] < losses[0]


@pytest.mark.usefixtures("nxd")
@pytest.mark.parametrize("zero1", [True, False])
def test_the_step_on_xla_is_the_unsharded_models_step_on_the_cpu(
    device: torch.device, tmp_path: Path, zero1: bool
) -> None:
    """Loss, gradients accumulated across the graph cuts, the pre-clip norm and the AdamW update
    (torch-xla's ZeRO-1 optimizer, or AdamW itself) equal the plain model's on the CPU."""
    cfg = nxd_config(tmp_path, parallelism={"zero1": zero1}, optimizer={"gradClip": 0.5})
    pm = build(cfg, device)
    batch = [to_batch(rows) for rows in loader(cfg, tmp_path, pm).next_micro_batches()]
    optimizers = build_optimizers(pm, cfg.optimizer)
    lr = lr_at(0, cfg.optimizer, cfg.total_steps())
    set_lr(optimizers, lr)
    loss = float(pm.forward_backward(batch))
    model = pm.model_parts[0]
    grads = {name: p.grad.cpu() for name, p in model.named_parameters()}

    ref = cpu_reference(cfg)
    ref_loss = reference_loss(ref, batch)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_params = dict(ref.named_parameters())
    assert grads.keys() == ref_params.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    spec = cfg.optimizer
    ref_opt = torch.optim.AdamW(param_groups(ref, spec.weight_decay), lr=lr, betas=spec.betas,
                                eps=spec.eps)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), spec.grad_clip)
    assert ref_norm > spec.grad_clip  # so that the clipping shows in the update
    ref_opt.step()
    norm = optimizer_step(pm, optimizers, spec.grad_clip)
    assert norm == pytest.approx(float(ref_norm), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.cpu(), ref_params[name].detach(), rtol=0, atol=2e-6,
                                   msg=name)


@pytest.mark.usefixtures("nxd")
@pytest.mark.parametrize("grad_clip", [0.5, 0.0])
def test_zero1_clips_to_grad_clip_inside_torch_xlas_optimizer(
    device: torch.device, tmp_path: Path, grad_clip: float
) -> None:
    """torch-xla's ZeRO-1 optimizer clips at 1.0 unless told otherwise; the backend passes the
    job's gradClip (0: no clipping). Plain SGD at lr 1 makes the update the clipped gradient."""
    cfg = nxd_config(tmp_path, parallelism={"zero1": True}, optimizer={"gradClip": grad_clip})
    pm = build(cfg, device)
    params = pm.parameters()
    optimizer = pm.make_optimizer(torch.optim.SGD, params, lr=1.0)
    before = [p.detach().cpu().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    norm = pm.optimizer_step(optimizer, cfg.optimizer.grad_clip)
    expected_norm = math.sqrt(sum(p.numel() for p in params))
    assert norm == pytest.approx(expected_norm, rel=1e-5)
    # Far from both 1.0 and gradClip: the default bound would show as 1 / norm.
    scale = grad_clip / (expected_norm + 1e-6) if grad_clip else 1.0
    for old, p in zip(before, params, strict=True):
        torch.testing.assert_close(old - p.detach().cpu(), torch.full_like(old, scale),
                                   rtol=1e-5, atol=0)


@pytest.mark.usefixtures("nxd")
def test_evaluation_is_one_forward_graph_per_micro_batch(
    device: torch.device, tmp_path: Path
) -> None:
    cfg = nxd_config(tmp_path)
    pm = build(cfg, device)
    batch = [to_batch(rows) for rows in loader(cfg, tmp_path, pm).next_micro_batches()]
    with count_graphs() as graphs:
        total, tokens = pm.evaluate(batch)
    assert graphs.executed == MICRO_BATCHES
    assert tokens == MICRO_BATCHES * cfg.batch.micro_batch_size * SEQ
    with torch.no_grad():
        expected = sum(float(loss_sum(cpu_reference(cfg)(x), y)) for x, y in batch)
    assert total == pytest.approx(expected, rel=1e-5)
    # Forward only: no gradient anywhere.
    assert all(p.grad is None for p in pm.parameters())


@pytest.mark.usefixtures("nxd")
def test_bf16_mixed_runs_the_matmuls_in_bf16_over_fp32_parameters(
    device: torch.device, tmp_path: Path
) -> None:
    """``bf16-mixed`` on the nxd backend: torch.autocast("xla") over fp32 parameters, whose
    gradients stay fp32; the loss is the fp32 model's to bf16 precision."""
    cfg = nxd_config(tmp_path, precision="bf16-mixed")
    pm = build(cfg, device)
    batch = [to_batch(rows) for rows in loader(cfg, tmp_path, pm).next_micro_batches()]
    model = pm.model_parts[0]
    seen: list[torch.dtype] = []
    model.layers["0"].feed_forward.w1.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    loss = float(pm.forward_backward(batch))
    assert seen == [torch.bfloat16] * MICRO_BATCHES
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        fp32 = float(reference_loss(cpu_reference(cfg), batch))
    assert loss == pytest.approx(fp32, abs=2e-2)


@pytest.mark.usefixtures("nxd")
def test_the_loader_feeds_the_xla_device_the_rows_it_reads(
    device: torch.device, tmp_path: Path
) -> None:
    """The data loader on torch 2.9 (int64 rows from the memory-mapped uint16 file) and the
    same tensors on the device; the next step's batch follows from the consumed samples."""
    cfg = nxd_config(tmp_path)
    pm = build(cfg, device)
    source = loader(cfg, tmp_path, pm)
    rows = source.next_micro_batches()
    assert source.state.consumed_samples == cfg.batch.global_batch_size
    for micro in rows:
        x, y = to_batch(micro)
        assert x.dtype == y.dtype == torch.int64 and x.shape == (2, SEQ)
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
        on_device = x.to(device)
        assert on_device.device.type == "xla" and torch.equal(on_device.cpu(), x)
    again = loader(cfg, tmp_path, pm)
    again.state.consumed_samples = source.state.consumed_samples
    for a, b in zip(again.next_micro_batches(), source.next_micro_batches(), strict=True):
        assert (a == b).all()


@pytest.mark.usefixtures("nxd")
def test_ranks_agree_through_an_xla_all_reduce(device: torch.device, tmp_path: Path) -> None:
    pm = build(nxd_config(tmp_path), device)
    with count_graphs() as graphs:
        assert pm.any_rank(True) is True
        assert pm.any_rank(False) is False
    assert graphs.executed == 2


@pytest.mark.usefixtures("nxd")
def test_the_nxd_backend_joins_torch_xlas_process_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``init_distributed("nxd")``: the "xla" process group of torch-xla (a world of one here)
    on torch-xla's device, as the trn1 pods join it under torchrun."""
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        env = init_distributed("nxd")
        assert (env.rank, env.world_size, env.backend) == (0, 1, "xla")
        assert env.device.type == "xla" and dist.get_backend() == "xla"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
