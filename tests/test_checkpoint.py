"""Checkpoint decisions (pure) and the save/load shell in one process (DCP without a group).

Multi-rank saves, resharding and kills are exercised by test_train_resume.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from llamajob_trainer import protocol
from llamajob_trainer.checkpoint import (
    CheckpointEntry,
    CheckpointManager,
    latest_complete,
    parse_step,
    prune_plan,
    resolve_resume,
)
from llamajob_trainer.config import ModelSpec
from llamajob_trainer.errors import CheckpointCorruptError, CheckpointError
from torch import nn
from trainer_helpers import MODEL, checkpoint_listing, tree_fingerprint

# --- pure ------------------------------------------------------------------------------------


def entries(*specs: tuple[int, bool]) -> list[CheckpointEntry]:
    return [CheckpointEntry(step, Path(f"/c/step_{step}"), done) for step, done in specs]


def test_parse_step_accepts_only_exact_names() -> None:
    assert parse_step("step_12") == 12
    for name in ("step_", "step_1a", ".tmp-step_3", "superseded-step_4", "xstep_5", "step_-1"):
        assert parse_step(name) is None


def test_latest_is_newest_complete() -> None:
    assert latest_complete(entries((4, True), (8, True), (12, False))).step == 8
    assert latest_complete(entries((12, False))) is None


def test_resume_modes() -> None:
    root = Path("/c")
    found = entries((4, True), (8, True), (12, False))
    assert resolve_resume("latestIfExists", found, root) == 8
    assert resolve_resume("latestIfExists", [], root) is None
    assert resolve_resume(4, found, root) == 4
    assert resolve_resume("none", entries((3, False)), root) is None
    with pytest.raises(CheckpointError, match=r"step_5 does not exist.*step_4, step_8"):
        resolve_resume(5, found, root)
    with pytest.raises(CheckpointError, match="step_12 is incomplete"):
        resolve_resume(12, found, root)
    # A fresh start over existing checkpoints would mix runs; refuse instead of pruning them.
    with pytest.raises(CheckpointError, match=r"already holds checkpoints .*step_8"):
        resolve_resume("none", found, root)


def test_prune_keeps_newest_complete_and_never_touches_incomplete() -> None:
    found = entries((2, True), (4, True), (6, False), (8, True))
    # Incomplete step dirs are quarantined at start-up, never deleted by pruning.
    assert prune_plan(found, keep=2) == [Path("/c/step_2")]
    assert prune_plan(found, keep=5) == []
    assert prune_plan(found, keep=0) == [Path("/c/step_4"), Path("/c/step_2")]  # keeps >= 1


# --- save / load -----------------------------------------------------------------------------


def tiny_module(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_a_bit(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


def manager(root: Path, **kw: object) -> CheckpointManager:
    opts = {"keep": 2, "fingerprint": "fp-1", "log": lambda line: None, **kw}
    return CheckpointManager(root, **opts)  # type: ignore[arg-type]


def test_round_trip_is_exact(root: Path) -> None:
    model, opt = tiny_module()
    train_a_bit(model, opt)
    mgr = manager(root)
    mgr.prepare()
    random.seed(99)
    torch.manual_seed(1234)
    mgr.save(3, [model], [opt], {"data": {"consumed_samples": 24}})
    expected_draw = torch.rand(3)

    other, other_opt = tiny_module(seed=5)
    torch.manual_seed(0)
    state = mgr.load(3, [other], [other_opt])
    assert state["step"] == 3 and state["data"] == {"consumed_samples": 24}
    assert state["fingerprint"] == "fp-1" and state["world_size"] == 1
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = opt.state_dict(), other_opt.state_dict()
    for pid, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, loaded["state"][pid][key]), key
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored too
    names = {p.name for p in (root / "step_3").iterdir()}
    assert names == {"state", "rng", "trainer_state.json", "manifest.json", "done"}


def test_load_keeps_this_runs_hyperparameters_and_the_saved_moments(root: Path) -> None:
    """An edited spec (weight decay, betas, eps) takes effect on resume: the checkpoint brings
    the optimizer's state, the config its settings."""
    model, opt = tiny_module()
    train_a_bit(model, opt)
    mgr = manager(root)
    mgr.prepare()
    mgr.save(3, [model], [opt], {})
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    edited = torch.optim.AdamW(other.parameters(), lr=3e-3, weight_decay=0.02, betas=(0.8, 0.9),
                               eps=1e-6)
    mgr.load(3, [other], [edited])
    group = edited.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.02, (0.8, 0.9), 1e-6)
    saved, loaded = opt.state_dict()["state"], edited.state_dict()["state"]
    for pid, moments in saved.items():
        for key, value in moments.items():
            assert torch.equal(value, loaded[pid][key]), key


def test_keep_prunes_old_checkpoints(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root, keep=2)
    mgr.prepare()
    for step in (1, 2, 3, 4):
        train_a_bit(model, opt, 1)
        mgr.save(step, [model], [opt], {})
    assert checkpoint_listing(root) == {"step_3": True, "step_4": True}
    assert mgr.latest_complete_step() == 4


class Killed(Exception):
    pass


def test_interrupted_save_is_never_loaded_and_is_cleaned(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root)
    mgr.prepare()
    mgr.save(2, [model], [opt], {})

    def die(step: int) -> None:
        raise Killed(step)

    dying = manager(root, before_done=die)
    train_a_bit(model, opt, 1)
    with pytest.raises(Killed):
        dying.save(4, [model], [opt], {})
    # Shards and trainer state written, no `done`: still under its temporary name.
    tmp = root / ".tmp-step_4"
    assert (tmp / "state" / ".metadata").is_file() and (tmp / "trainer_state.json").is_file()
    assert not (tmp / protocol.CHECKPOINT_DONE_MARKER).exists()
    # A step dir without `done` (e.g. copied by hand) is not complete either.
    (root / "step_6" / "state").mkdir(parents=True)

    restart = manager(root)
    assert restart.resolve("latestIfExists") == 2
    with pytest.raises(CheckpointError, match="incomplete"):
        restart.resolve(6)
    restart.prepare()  # removes nothing before a checkpoint has loaded
    assert checkpoint_listing(root) == {".tmp-step_4": False, "step_2": True, "step_6": False}
    fresh, fresh_opt = tiny_module(seed=5)
    state = restart.restore("latestIfExists", [fresh], [fresh_opt])
    assert state is not None and state["step"] == 2
    # The interrupted save goes once step_2 has loaded; the step dir without `done` is kept,
    # out of the way, with a note saying why.
    listing = checkpoint_listing(root)
    assert listing == {"quarantine": False, "step_2": True}
    (moved,) = (root / "quarantine").iterdir()
    assert moved.name.startswith("step_6.")
    assert "no done marker" in (moved / "QUARANTINED.txt").read_text()


def test_truncated_shard_is_reported_and_left_in_place(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root)
    mgr.save(2, [model], [opt], {})
    shard = next((root / "step_2" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    before = tree_fingerprint(root)
    with pytest.raises(CheckpointCorruptError, match=r"step_2 is damaged: state/__0_0.distcp has"):
        mgr.load(2, *map(list, zip(tiny_module(), strict=True)))
    mgr.prepare()  # a start-up cleanup must not delete a complete (if damaged) checkpoint
    assert tree_fingerprint(root) == before


def test_unreadable_shard_metadata_is_a_corrupt_checkpoint(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root)
    mgr.save(2, [model], [opt], {})
    meta = root / "step_2" / "state" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # same size: only the digest can tell
    other, other_opt = tiny_module()
    with pytest.raises(CheckpointCorruptError, match=r"state/.metadata has changed"):
        mgr.load(2, [other], [other_opt])


def test_fingerprint_mismatch_is_refused(root: Path) -> None:
    model, opt = tiny_module()
    manager(root).save(2, [model], [opt], {})
    with pytest.raises(CheckpointError, match=r"different model .*fp-1.*fp-2"):
        manager(root, fingerprint="fp-2").verify(2)


def test_explicit_older_resume_sets_later_checkpoints_aside(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root, keep=3)
    for step in (2, 4, 6):
        mgr.save(step, [model], [opt], {})
    assert mgr.resolve(2) == 2
    mgr.set_aside_later(2)
    assert checkpoint_listing(root) == {
        "step_2": True, "superseded-step_4": True, "superseded-step_6": True,
    }
    assert mgr.resolve("latestIfExists") == 2


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_finalizes_in_background(root: Path) -> None:
    model, opt = tiny_module()
    train_a_bit(model, opt)
    mgr = manager(root, async_save=True)
    mgr.save(3, [model], [opt], {"data": {"consumed_samples": 3}})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_bit(model, opt)  # training continues; the save holds its own staged copy
    assert mgr.wait() == 3
    other, other_opt = tiny_module(seed=3)
    manager(root).load(3, [other], [other_opt])
    for key, value in other.state_dict().items():
        assert torch.equal(value, expected[key]), key


# --- Hugging Face export / import --------------------------------------------------------------


def test_export_loads_in_transformers_and_imports_back(tmp_path: Path) -> None:
    from llamajob_trainer.hf import apply_full_state_dict, export_checkpoint, load_pretrained
    from llamajob_trainer.model import Llama

    arch = ModelSpec.model_validate(MODEL).architecture()
    model = Llama(arch)
    model.init_weights(11)
    with torch.no_grad():  # make the norms non-trivial so a swapped name would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    opt = torch.optim.AdamW(model.parameters())
    manager(tmp_path / "ckpt").save(5, [model], [opt], {})

    out = export_checkpoint(tmp_path / "ckpt", None, arch, "fp-1", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 2

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    fresh = Llama(arch)
    fresh.init_weights(99)
    apply_full_state_dict([fresh], load_pretrained(out, arch))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    wrong = ModelSpec.model_validate({**MODEL, "numLayers": 3}).architecture()
    with pytest.raises(Exception, match="num_hidden_layers is 2, the job's model has 3"):
        load_pretrained(out, wrong)


def test_garbage_rng_file_is_a_damaged_checkpoint_naming_the_file(tmp_path: Path) -> None:
    from llamajob_trainer.checkpoint import read_rng

    bad = tmp_path / "rank_0.pt"
    bad.write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(CheckpointCorruptError, match=r"rank_0.pt: cannot read the RNG state"):
        read_rng(bad)


def test_checkpoint_with_a_size_only_manifest_still_loads(root: Path) -> None:
    """Checkpoints written before digests existed: their manifest maps files to sizes."""
    model, opt = tiny_module()
    train_a_bit(model, opt)
    manager(root).save(2, [model], [opt], {})
    step = root / "step_2"
    manifest = json.loads((step / "manifest.json").read_text())
    old = {rel: rec["size"] for rel, rec in manifest["files"].items()}
    (step / "manifest.json").write_text(json.dumps(old))
    other, other_opt = tiny_module(seed=3)
    manager(root).load(2, [other], [other_opt])
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    # Sizes are still checked.
    shard = sorted((step / "state").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointCorruptError, match=r"has .* bytes, expected"):
        manager(root).load(2, [other], [other_opt])


def test_manifest_must_list_exactly_the_files_and_stay_inside(root: Path) -> None:
    model, opt = tiny_module()
    mgr = manager(root)
    mgr.save(2, [model], [opt], {})
    step = root / "step_2"
    (step / "state" / "__9_0.distcp").write_bytes(b"stray")
    assert mgr.check(step, 2) == ["state/__9_0.distcp is not in the manifest"]
    (step / "state" / "__9_0.distcp").unlink()
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"size": 1}
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert mgr.check(step, 2) == ["manifest names '../outside', outside the checkpoint"]
