"""The nxd backend's checkpoints on torch-xla: the manager (``checkpoint.CheckpointManager``)
around ``checkpoint_nxd.NxDStateIO``, as ``NeuronParallelModel.state_io`` picks it, on torch-xla's
"xla" process group (a world of one), with torch-xla's ZeRO-1 optimizer and the trainer's own
loop pieces. NxD stood in at tensor degree 1 (``nxd_standins``), its ``save_checkpoint`` and
``load_checkpoint`` included: real xser files of the XLA tensors, in NxD's per-rank layout.

The point beyond the CPU tests of the same manager (tests/test_checkpoint_nxd.py): the state
that goes out and comes back is torch-xla's own (the ZeRO-1 optimizer's flattened shards and
base state, the XLA generator), and a resumed run's steps are the uninterrupted run's, bit for
bit. That includes the order of the two loads: ZeRO-1 cuts its fp32 shards from the parameters
when its state loads and writes them back over the parameters at every step, so an optimizer
loaded before the model would undo the loaded weights at the first step.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch_xla.core.xla_model as xm
from llamajob_trainer import protocol
from llamajob_trainer.checkpoint import CheckpointManager
from llamajob_trainer.checkpoint_nxd import NxDStateIO
from llamajob_trainer.config import TrainerConfig
from llamajob_trainer.data import BatchSource, DataState, PackedDataset
from llamajob_trainer.errors import CheckpointCorruptError
from llamajob_trainer.parallel import ParallelModel, init_distributed, parallelize
from llamajob_trainer.parallel import neuron_backend as nb
from llamajob_trainer.parallel.dist import DistEnv
from llamajob_trainer.train import build_optimizers, lr_at, optimizer_step, set_lr, to_batch
from torch import Tensor
from xla_helpers import free_port, nxd_config, packed_dataset

MODEL_FILE = "state/model/dp_rank_00_tp_rank_00_pp_rank_00.pt"
OPTIM_FILE = "state/optim/dp_rank_00_tp_rank_00_pp_rank_00.pt"


@pytest.fixture
def xla_env(nxd: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistEnv]:
    """The trainer's ``init_distributed("nxd")``: torch-xla's "xla" group, a world of one."""
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    env = init_distributed("nxd")
    assert (env.world_size, env.backend) == (1, "xla")
    try:
        yield env
    finally:
        dist.destroy_process_group()


class Run:
    """One training process's pieces, as ``train._loop`` holds them: the model, its optimizers,
    the data loader and the checkpoint manager."""

    def __init__(self, cfg: TrainerConfig, env: DistEnv, data: Path) -> None:
        self.cfg = cfg
        self.pm: ParallelModel = parallelize(cfg, cfg.model.architecture(), env)
        assert isinstance(self.pm, nb.NeuronParallelModel)
        self.optimizers = build_optimizers(self.pm, cfg.optimizer)
        self.manager = CheckpointManager(
            cfg.checkpoint.dir,
            keep=cfg.checkpoint.keep,
            fingerprint=cfg.training_fingerprint(),
            rank=env.rank,
            world_size=env.world_size,
            log=lambda line: None,
            state_io=self.pm.state_io(),
        )
        assert isinstance(self.manager.io, NxDStateIO)
        self.manager.prepare()
        self.data = data
        self.step = 0
        self.source = self._source(DataState())

    def _source(self, state: DataState) -> BatchSource:
        return BatchSource(
            PackedDataset(self.data),
            seed=self.cfg.seed,
            global_batch_size=self.cfg.batch.global_batch_size,
            micro_batch_size=self.cfg.batch.micro_batch_size,
            dp_rank=self.pm.dp_rank,
            dp_size=self.pm.dp_size,
            state=state,
        )

    def train(self, steps: int) -> list[float]:
        """``steps`` steps of ``train._loop``; the losses, read as it reads them."""
        spec, losses = self.cfg.optimizer, []
        for _ in range(steps):
            set_lr(self.optimizers, lr_at(self.step, spec, self.cfg.total_steps()))
            batch = [to_batch(rows) for rows in self.source.next_micro_batches()]
            loss = self.pm.forward_backward(batch)
            optimizer_step(self.pm, self.optimizers, spec.grad_clip)
            losses.append(float(loss))  # after optimizer_step, with its graph, as train._loop
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.step += 1
        return losses

    def save(self) -> Path:
        self.manager.save(self.step, self.pm.model_parts, self.optimizers,
                          {"data": self.source.state.state_dict()})
        return Path(self.cfg.checkpoint.dir) / f"{protocol.CHECKPOINT_PREFIX}{self.step}"

    def restore(self) -> dict[str, Any] | None:
        """``train._loop``'s resume: the newest intact checkpoint, then the data position."""
        state = self.manager.restore("latestIfExists", self.pm.model_parts, self.optimizers)
        if state is not None:
            self.step = int(state["step"])
            self.source = self._source(DataState.from_state_dict(state["data"]))
        return state

    def params(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().clone()
                for name, p in self.pm.model_parts[0].named_parameters()}


def same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def setup(tmp_path: Path) -> tuple[TrainerConfig, Path]:
    cfg = nxd_config(tmp_path, parallelism={"zero1": True}, checkpoint={"keep": 3})
    return cfg, packed_dataset(tmp_path / "data")


def load_in_one_call(self: NxDStateIO, state_dir: Path, model_parts: Sequence[Any],
                     optimizers: Sequence[Any]) -> Any:
    """``NxDStateIO.read`` as one NxD ``load_checkpoint`` call, which loads the optimizer
    before the model: the order the real one avoids."""
    from neuronx_distributed.trainer import load_checkpoint

    model, optimizer = self._single(model_parts, optimizers)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_checkpoint(str(state_dir.parent), tag=state_dir.name, model=model, optimizer=optimizer)
    return settings


def test_a_resumed_run_trains_bit_for_bit_as_the_uninterrupted_one(
    xla_env: DistEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two steps, a save through the manager, two more steps; then a fresh model and optimizer
    restored from it train the same two steps to the same losses and parameters, bit for bit.
    And the test sees the hazard it guards against: with the optimizer loaded first the loaded
    weights are back in the parameters only until the first step writes ZeRO-1's shards, cut
    from the fresh ones, over them."""
    cfg, data = setup(tmp_path)
    first = Run(cfg, xla_env, data)
    first.train(2)
    saved_params = first.params()
    saved_seed = xm.get_rng_state()
    step_dir = first.save()

    # The manager's checkpoint around NxD's files: every file listed with its digest, `done`.
    # Markers named `done` (the manager's and NxD's, state/done) hold no state and are not
    # listed.
    assert (step_dir / protocol.CHECKPOINT_DONE_MARKER).is_file()
    assert (step_dir / "state" / protocol.CHECKPOINT_DONE_MARKER).is_file()
    manifest = json.loads((step_dir / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
    assert set(manifest) == on_disk - {"manifest.json", protocol.CHECKPOINT_DONE_MARKER,
                                       f"state/{protocol.CHECKPOINT_DONE_MARKER}"}
    for rel, record in manifest.items():
        assert len(record["sha256"]) == 64 and record["size"] == (step_dir / rel).stat().st_size
    # NxD's layout, xser: the reference files and one file per XLA tensor beside each.
    for base in (MODEL_FILE, OPTIM_FILE):
        assert base in manifest
        assert any(rel.startswith(f"{base}.tensors/tensor_") for rel in manifest)
    assert {"state/checkpoint", "rng/rank_0.pt", "trainer_state.json"} <= set(manifest)
    trainer_state = json.loads((step_dir / "trainer_state.json").read_text())
    assert trainer_state["state_format"]["layout"]["zero1"] is True

    expected = first.train(2)
    expected_params = first.params()

    second = Run(cfg, xla_env, data)
    fresh_params = second.params()
    xm.set_rng_state(saved_seed + 1)  # anything else: the restore must bring it back
    state = second.restore()
    assert state is not None and state["step"] == 2 and second.step == 2
    assert state["data"]["consumed_samples"] == 2 * cfg.batch.global_batch_size
    assert xm.get_rng_state() == saved_seed
    # The loaded weights, not the fresh ones, before and after ZeRO-1's steps.
    assert same(second.params(), saved_params)
    assert not any(torch.equal(fresh_params[k], saved_params[k]) for k in saved_params)
    assert second.train(2) == expected
    assert same(second.params(), expected_params)

    monkeypatch.setattr(NxDStateIO, "read", load_in_one_call)
    third = Run(cfg, xla_env, data)
    assert third.restore() is not None
    assert same(third.params(), saved_params)  # loaded, for now
    hazard = third.train(2)
    assert hazard[0] == expected[0]  # the first step's forward ran on the loaded weights
    assert hazard[1] != expected[1]  # its update was applied to the fresh ones
    assert not same(third.params(), expected_params)


@pytest.mark.parametrize("damaged", [MODEL_FILE + ".tensors/tensor_0.pt", OPTIM_FILE])
def test_a_flipped_byte_quarantines_the_checkpoint_and_the_older_one_loads(
    xla_env: DistEnv, tmp_path: Path, damaged: str
) -> None:
    """One changed byte in an NxD file of the newest checkpoint: it is moved to quarantine
    and the one before it loads. Damage to that one too, the only one left: a clear error
    naming it, and nothing loaded or deleted."""
    cfg, data = setup(tmp_path)
    first = Run(cfg, xla_env, data)
    first.train(2)
    at_two = first.params()
    older = first.save()
    first.train(2)
    newest = first.save()
    flip(newest / damaged)

    second = Run(cfg, xla_env, data)
    state = second.restore()
    assert state is not None and state["step"] == 2
    assert same(second.params(), at_two)
    assert not newest.exists()
    quarantine = Path(cfg.checkpoint.dir) / "quarantine"
    [moved] = [p for p in quarantine.iterdir() if p.name.startswith(newest.name + ".")]
    assert damaged in (moved / "QUARANTINED.txt").read_text()

    flip(older / damaged)
    third = Run(cfg, xla_env, data)
    untouched = third.params()
    with pytest.raises(CheckpointCorruptError, match="holds no intact checkpoint") as caught:
        third.restore()
    assert older.name in str(caught.value) and damaged in str(caught.value)
    assert same(third.params(), untouched)
    assert len(list(quarantine.iterdir())) == 2  # moved aside, not deleted
