"""`export-hf` on an nxd-backend checkpoint: NxD's per-rank model files back to one HF model.

NxD is not installed here. The checkpoint is made by the checkpoint manager (manifest, digests,
trainer state with the NxD layout) around a stand-in writer that puts a tiny model's full
weights, cut by ``ShardPlan``, into NxD's file names (``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt``)
under the names NxD saves them with: the model's own names, qkv_proj's under kv replication,
each pipeline stage holding its own layers with their global indices (``NxDPPModel.
local_state_dict``, pipeline/model.py at v2.28.0, lines 1893-1923). The files are plain
``torch.save``, NxD's layout without xser; xser files are tests_xla/test_export_nxd.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from llamajob_trainer.checkpoint import STATE_DIR, CheckpointManager, step_dir_name
from llamajob_trainer.checkpoint_nxd import NxDLayout, NxDStateIO, nxd_shard_file
from llamajob_trainer.errors import CheckpointCorruptError, CheckpointError
from llamajob_trainer.hf import export_checkpoint, load_pretrained
from llamajob_trainer.parallel.nxd_shards import ShardPlan
from llamajob_trainer.presets import Architecture
from torch import Tensor, nn

# 4 layers for 2 stages; 4 q heads per kv head, so kvReplicator 2 gives each copy 2 of them.
ARCH = Architecture(32, 4, 8, 2, 48, 64, 500000.0, 64)
FINGERPRINT = "fp-export-nxd"


def stage_of(fqn: str, arch: Architecture, pp: int) -> int:
    """Contiguous layer blocks per stage, the embedding first and the norm and head last."""
    if fqn == "tok_embeddings.weight":
        return 0
    if fqn.startswith("layers."):
        return int(fqn.split(".")[1]) * pp // arch.num_layers
    return pp - 1


class FakeNxDWriter(NxDStateIO):
    """Writes every rank's model file in one process, as NxD's non-xser save lays them out
    (trainer/checkpoint.py at v2.28.0, lines 578-585, 794-812). No optimizer files: export
    reads none."""

    xser = False

    def __init__(self, layout: NxDLayout, plan: ShardPlan, full: dict[str, Tensor]) -> None:
        super().__init__(layout, (0, 0, 0))
        self.plan, self.full = plan, full

    def save(self, state_dir: Path, model_parts: Sequence[nn.Module],
             optimizers: Sequence[torch.optim.Optimizer], *, background: bool,
             group: Any) -> Any:
        pp = self.layout.pp
        for stage in range(pp):
            for rank in range(self.plan.tp):
                state = {
                    self.plan.local_name(fqn): self.plan.shard(fqn, value, rank).clone()
                    for fqn, value in self.full.items()
                    if fqn != "output.weight" or not self.plan.arch.tie_embeddings
                    if stage_of(fqn, self.plan.arch, pp) == stage
                }
                path = state_dir / nxd_shard_file("model", 0, rank, stage)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, path)
        (state_dir / "checkpoint").write_text("")
        (state_dir / "done").write_text("")
        return None

    def own_files(self, tmp: Path, rank: int) -> list[Path]:
        return sorted(p for p in (tmp / STATE_DIR / "model").rglob("*") if p.is_file())

    def device_rng_state(self) -> dict[str, Any] | None:
        return None  # no torch-xla generator here


def full_weights(plan: ShardPlan) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {fqn: torch.randn(plan.full_shape(fqn), generator=gen) for fqn in plan.fqns()}


def write_checkpoint(root: Path, plan: ShardPlan, pp: int, full: dict[str, Tensor]) -> Path:
    layout = NxDLayout(tp=plan.tp, pp=pp, dp=1, zero1=False,
                       kv_replicator=plan.kv_replicator, virtual_pipeline=1)
    mgr = CheckpointManager(root, keep=3, fingerprint=FINGERPRINT,
                            state_io=FakeNxDWriter(layout, plan, full), log=lambda line: None)
    mgr.prepare()
    mgr.save(5, [nn.Linear(1, 1)], [], {"data": {"consumed_samples": 40}})
    mgr.wait()
    return root / step_dir_name(5)


@pytest.mark.parametrize(("tp", "kv_rep", "pp", "platform"), [
    (4, 2, 2, "trn1"),
    (4, 2, 1, "trn2"),
    (2, 1, 2, None),
])
def test_export_reassembles_the_full_weights_exactly(
    tmp_path: Path, tp: int, kv_rep: int, pp: int, platform: str | None
) -> None:
    plan = ShardPlan(ARCH, tp, kv_rep, platform)  # type: ignore[arg-type]
    full = full_weights(plan)
    write_checkpoint(tmp_path / "ckpt", plan, pp, full)

    out = export_checkpoint(tmp_path / "ckpt", None, ARCH, FINGERPRINT, tmp_path / "hf",
                            platform=platform)

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == pp
    assert (out / "model.safetensors.index.json").is_file() == (pp > 1)
    exported = load_pretrained(out, ARCH)  # checks config.json against the model, too
    assert exported.keys() == full.keys()
    assert all(torch.equal(exported[k], full[k]) for k in full)


def test_kv_copies_on_the_wrong_platform_do_not_agree(tmp_path: Path) -> None:
    plan = ShardPlan(ARCH, 4, 2, "trn1")
    write_checkpoint(tmp_path / "ckpt", plan, 2, full_weights(plan))
    with pytest.raises(CheckpointError, match="differ"):
        export_checkpoint(tmp_path / "ckpt", 5, ARCH, FINGERPRINT, tmp_path / "hf",
                          platform="trn2")


def test_kv_replication_needs_the_platform(tmp_path: Path) -> None:
    plan = ShardPlan(ARCH, 4, 2, "trn1")
    write_checkpoint(tmp_path / "ckpt", plan, 1, full_weights(plan))
    with pytest.raises(CheckpointError, match="--platform"):
        export_checkpoint(tmp_path / "ckpt", 5, ARCH, FINGERPRINT, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_a_damaged_model_file_is_refused_and_left_in_place(tmp_path: Path) -> None:
    plan = ShardPlan(ARCH, 4, 2, "trn1")
    step_dir = write_checkpoint(tmp_path / "ckpt", plan, 2, full_weights(plan))
    victim = step_dir / STATE_DIR / nxd_shard_file("model", 0, 3, 1)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(CheckpointCorruptError, match="damaged"):
        export_checkpoint(tmp_path / "ckpt", 5, ARCH, FINGERPRINT, tmp_path / "hf",
                          platform="trn1")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing


def test_a_missing_rank_file_is_refused(tmp_path: Path) -> None:
    plan = ShardPlan(ARCH, 2, 1, None)
    step_dir = write_checkpoint(tmp_path / "ckpt", plan, 2, full_weights(plan))
    (step_dir / STATE_DIR / nxd_shard_file("model", 0, 1, 0)).unlink()
    with pytest.raises(CheckpointCorruptError, match="tp_rank_01_pp_rank_00"):
        export_checkpoint(tmp_path / "ckpt", 5, ARCH, FINGERPRINT, tmp_path / "hf")
