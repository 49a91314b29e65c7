"""The checkpoint manager on the nxd backend's state format (``checkpoint_nxd.NxDStateIO``).

NxD is not installed here, so ``neuronx_distributed.trainer`` (``save_checkpoint``,
``load_checkpoint``, and in ``.checkpoint`` ``finalize_checkpoint``, ``g_iostate``,
``CheckpointIOState``) and ``torch_xla.core.xla_model``'s RNG calls are stand-ins put in
``sys.modules``. The stand-in writes and reads real files in the layout NxD v2.28.0 writes with
xser (trainer/checkpoint.py at that tag): a ``checkpoint`` marker and ``done`` by rank 0,
``model/dp_rank_00_tp_rank_TT_pp_rank_PP.pt`` whose tensor files the data-parallel replicas
share out, ``optim/dp_rank_DD_tp_rank_TT_pp_rank_PP.pt`` per rank with ZeRO-1, each with its
``.info.pt`` and ``.tensors/tensor_I.pt``. It keeps NxD's bookkeeping that matters here: the
async writer thread and its future, a background save's next ``begin`` marking the previous tag
done in the new directory, the pruning of ``num_kept_ckpts`` (which really deletes), the exit
hook. Its optimizer behaves as ZeRO-1 does on load: the fp32 shards are cut from the parameters
as they are when the optimizer state loads, and every step writes them back.

What is checked: the manager's guarantees hold around NxD's files (temporary name, manifest with
digests of NxD's files, ``done`` last, quarantine and fallback on a flipped byte, keep-N ours and
NxD's pruning idle, data position and RNG, XLA's included); a resume in another layout, or in
another backend's format, is refused with the fields named; a background save completes (NxD's
``finalize_checkpoint``) before ``done``. One process with a gloo group of one, and two gloo
ranks. Nothing here says how NxD behaves on Trainium.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib.machinery
import json
import os
import shutil
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from llamajob_trainer import checkpoint as ckpt_module
from llamajob_trainer import protocol
from llamajob_trainer.checkpoint import CheckpointManager, DCPStateIO
from llamajob_trainer.checkpoint_nxd import (
    NxDLayout,
    NxDStateIO,
    nxd_hash_owners,
    nxd_layout_changes,
)
from llamajob_trainer.errors import CheckpointError
from torch import nn

# --- the stand-in ----------------------------------------------------------------------------


@dataclass
class NxDWorld:
    """This process's NxD ranks and what the stand-in was asked to do."""

    coords: tuple[int, int, int] = (0, 0, 0)  # (dp, tp, pp)
    dp_size: int = 1
    zero1: bool = True
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    atexit_registered: list[Any] = field(default_factory=list)
    atexit_unregistered: list[Any] = field(default_factory=list)
    hold_writes: threading.Event | None = None  # set: the async writer may run
    xla_seed: int = 1234


_TENSOR = "__nxd_tensor__"


def _rendezvous() -> None:
    # xm.rendezvous: every rank waits for the others.
    dist.barrier()


def _rank() -> int:
    return dist.get_rank()


def _shard(kind: str, dp: int, tp: int, pp: int) -> str:
    return f"{kind}/dp_rank_{dp:02d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


def _xser_jobs(
    state_dir: Path, base: str, sd: Any, writes_ref: bool, mine: Callable[[int], bool]
) -> list[tuple[Any, Path]]:
    """xser's split: a reference file whose tensors are ids, an info file, one file a tensor."""
    tensors: list[torch.Tensor] = []

    def strip(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj.detach().cpu().clone())  # to the host now, as NxD does
            return {_TENSOR: len(tensors) - 1}
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    ref = strip(sd)
    folder = state_dir / f"{base}.tensors"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(t, folder / f"tensor_{i}.pt") for i, t in enumerate(tensors) if mine(i)]
    if writes_ref:
        info = {i: {"shape": tuple(t.shape), "dtype": t.dtype} for i, t in enumerate(tensors)}
        jobs += [(ref, state_dir / base), (info, state_dir / f"{base}.info.pt")]
    return jobs


def _xser_read(state_dir: Path, base: str) -> Any:
    ref = torch.load(state_dir / base, weights_only=False)
    folder = state_dir / f"{base}.tensors"

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict) and set(obj) == {_TENSOR}:
            return torch.load(folder / f"tensor_{obj[_TENSOR]}.pt", weights_only=True)
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    return fill(ref)


def build_standin(world: NxDWorld) -> dict[str, types.ModuleType]:
    """The modules NxDStateIO imports, as NxD v2.28.0 behaves for what it calls."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    mod = types.ModuleType("neuronx_distributed.trainer.checkpoint")

    def remove_tags(directory: Path, num_kept: int | None) -> list[Path]:
        # _determine_remove_tags (lines 66-98): unfinished tags before the first finished one,
        # and finished ones beyond num_kept; deleted for real.
        tags = sorted((p.parent for p in directory.glob("*/checkpoint")),
                      key=lambda p: (p / "checkpoint").stat().st_mtime)
        done = [t for t in tags if (t / "done").is_file()]
        doomed = []
        for tag in tags:
            if (tag / "done").is_file():
                break
            doomed.append(tag)
        if num_kept is not None and num_kept != -1 and len(done) > num_kept:
            doomed += done[: len(done) - num_kept]
        return doomed

    class CheckpointIOState:
        def __init__(self, async_save: bool) -> None:
            self._async_save = async_save
            self._current_tag: str | None = None
            self._checkpoint_dir: Path | None = None
            self._save_task: concurrent.futures.Future[None] | None = None
            self._dcp_save_task: concurrent.futures.Future[None] | None = None
            self._num_kept: int | None = None
            self._jobs: list[tuple[Any, Path]] = []

        def begin(self, directory: Path, tag: str) -> None:
            self._checkpoint_dir = directory  # switched first (line 136)
            if self._async_save and self._current_tag is not None:
                self.wait_save()
            self._current_tag = tag
            if _rank() == 0:
                (directory / tag).mkdir(parents=True, exist_ok=True)
                (directory / tag / "checkpoint").write_text("1")
            _rendezvous()

        def end(self, num_kept: int | None) -> None:
            jobs, self._jobs = self._jobs, []
            if self._async_save:
                self._num_kept = num_kept

                def write() -> None:
                    if world.hold_writes is not None:
                        world.hold_writes.wait(30)
                    for obj, path in jobs:
                        torch.save(obj, path)

                self._save_task = executor.submit(write)
                return
            for obj, path in jobs:
                torch.save(obj, path)
            _rendezvous()
            self._mark_done()
            self.submit_remove(num_kept)

        def _mark_done(self) -> None:
            if _rank() == 0:
                assert self._checkpoint_dir is not None and self._current_tag
                # save_text: open(..., "w"), which needs the directory (lines 188-191).
                (self._checkpoint_dir / self._current_tag / "done").write_text("1")
            _rendezvous()

        def wait_save(self) -> None:
            if not self._async_save:
                return
            if self._save_task is not None:
                self._save_task.result()
            _rendezvous()
            self._save_task = None
            self._mark_done()
            self.submit_remove(self._num_kept)

        def submit_remove(self, num_kept: int | None) -> None:
            assert self._checkpoint_dir is not None
            doomed = remove_tags(self._checkpoint_dir, num_kept)
            _rendezvous()
            if _rank() == 0:
                for tag in doomed:
                    world.removed.append(str(tag))
                    shutil.rmtree(tag, ignore_errors=True)
            _rendezvous()

        def wait_all(self) -> None:
            self.wait_save()

    def save_checkpoint(checkpoint_dir_str: str, tag: str, model: Any = None,
                        optimizer: Any = None, scheduler: Any = None, user_content: Any = None,
                        num_workers: int = 8, use_xser: bool = False,
                        num_kept_ckpts: int | None = None, async_save: bool = False,
                        zero1_optimizer: bool = False, use_zero1_dcp: bool = False,
                        avoid_saving_lower_precision_weights: bool = False) -> None:
        assert dist.is_initialized(), "Only support distributed training mode."
        world.calls.append(("save", {
            "dir": checkpoint_dir_str, "tag": tag, "use_xser": use_xser,
            "num_kept_ckpts": num_kept_ckpts, "async_save": async_save,
            "scheduler": scheduler, "user_content": user_content,
        }))
        directory = Path(checkpoint_dir_str)
        if mod.g_iostate is None:
            mod.g_iostate = CheckpointIOState(async_save)
            atexit.register(CheckpointIOState.wait_all, mod.g_iostate)
        state = mod.g_iostate
        state.begin(directory, tag)
        dp, tp, pp = world.coords
        root = directory / tag
        if optimizer is not None:
            base = _shard("optim", dp if world.zero1 else 0, tp, pp)
            if world.zero1 or dp == 0:
                state._jobs += _xser_jobs(root, base, optimizer.state_dict(), True,
                                          lambda i: True)
        if model is not None:
            # The data-parallel replicas of (tp, pp) share the tensor files out (lines 495-521).
            state._jobs += _xser_jobs(root, _shard("model", 0, tp, pp), model.state_dict(),
                                      dp == 0, lambda i: i % world.dp_size == dp)
        state.end(num_kept_ckpts)

    def load_checkpoint(path: str, tag: str | None = None, model: Any = None,
                        optimizer: Any = None, scheduler: Any = None, num_workers: int = 8,
                        strict: bool = True, use_zero1_dcp: bool = False) -> Any:
        assert dist.is_initialized(), "Only support distributed training mode."
        world.calls.append(("load", {"path": path, "tag": tag, "model": model is not None,
                                     "optimizer": optimizer is not None}))
        assert tag is not None
        root = Path(path) / tag
        dp, tp, pp = world.coords
        if optimizer is not None:  # the optimizer first, as NxD (lines 894-937)
            base = _shard("optim", dp if world.zero1 else 0, tp, pp)
            optimizer.load_state_dict(_xser_read(root, base))
        if model is not None:
            model.load_state_dict(_xser_read(root, _shard("model", 0, tp, pp)), strict=strict)
        _rendezvous()
        return None

    def finalize_checkpoint() -> None:
        if mod.g_iostate is not None:
            mod.g_iostate.wait_all()

    mod.g_iostate = None
    mod.CheckpointIOState = CheckpointIOState
    mod.finalize_checkpoint = finalize_checkpoint
    mod.save_checkpoint = save_checkpoint
    mod.load_checkpoint = load_checkpoint
    trainer = types.ModuleType("neuronx_distributed.trainer")
    trainer.save_checkpoint = save_checkpoint
    trainer.load_checkpoint = load_checkpoint
    trainer.checkpoint = mod
    nxd = types.ModuleType("neuronx_distributed")
    nxd.trainer = trainer

    def get_rng_state(device: Any = None) -> int:
        return world.xla_seed

    def set_rng_state(seed: int, device: Any = None) -> None:
        world.xla_seed = seed

    xm = types.ModuleType("torch_xla.core.xla_model")
    xm.get_rng_state = get_rng_state
    xm.set_rng_state = set_rng_state
    core = types.ModuleType("torch_xla.core")
    core.xla_model = xm
    torch_xla = types.ModuleType("torch_xla")
    torch_xla.core = core
    modules = {
        "neuronx_distributed": nxd,
        "neuronx_distributed.trainer": trainer,
        "neuronx_distributed.trainer.checkpoint": mod,
        "torch_xla": torch_xla,
        "torch_xla.core": core,
        "torch_xla.core.xla_model": xm,
    }
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules


# --- a model and a ZeRO-1-like optimizer -------------------------------------------------------


class Zero1Like(torch.optim.Optimizer):
    """What matters of torch-xla's ZeRO-1 here (zero_redundancy_optimizer.py at v2.9.0): an
    inner AdamW over fp32 copies of the parameters ("shards"), cut when the optimizer is built
    and again when its state loads (lines 512-523, 121-141), and written back over the
    parameters after every step (lines 403-415)."""

    def __init__(self, params: list[nn.Parameter], **defaults: Any) -> None:
        self.full = list(params)
        self.defaults_ = defaults
        self._cut()

    def _cut(self) -> None:
        self.shards = [p.detach().clone().requires_grad_(True) for p in self.full]
        self.base = torch.optim.AdamW(self.shards, **self.defaults_)

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.full:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for p, s in zip(self.full, self.shards, strict=True):
            s.grad = None if p.grad is None else p.grad.clone()
        self.base.step()
        for p, s in zip(self.full, self.shards, strict=True):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"base_state": self.base.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cut()
        self.base.load_state_dict(state_dict["base_state"])


def tiny(seed: int) -> tuple[nn.Module, Zero1Like]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return model, Zero1Like(list(model.parameters()), lr=1e-2, weight_decay=0.1)


def train(model: nn.Module, opt: Zero1Like, steps: int, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


LAYOUT = NxDLayout(tp=1, pp=1, dp=1, zero1=True, kv_replicator=1, virtual_pipeline=1)


def extra(step: int) -> dict[str, Any]:
    return {"data": {"consumed_samples": 8 * step}, "layout": {"pp": 1, "dp": 1, "tp": 1,
                                                               "fsdp": False}}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[NxDWorld]:
    """The stand-in in sys.modules, a gloo group of one, and atexit recorded (not changed)."""
    w = NxDWorld()
    for name, module in build_standin(w).items():
        monkeypatch.setitem(sys.modules, name, module)
    def register(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
        w.atexit_registered.append(fn)
        return fn

    monkeypatch.setattr(atexit, "register", register)
    monkeypatch.setattr(atexit, "unregister", w.atexit_unregistered.append)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield w
    finally:
        dist.destroy_process_group()


def manager(root: Path, io: Any = None, **kwargs: Any) -> CheckpointManager:
    mgr = CheckpointManager(root, keep=kwargs.pop("keep", 3), fingerprint="fp-nxd",
                            state_io=io if io is not None else NxDStateIO(LAYOUT, (0, 0, 0)),
                            log=lambda line: None, **kwargs)
    mgr.prepare()
    return mgr


def nxd_files(step_dir: Path) -> set[str]:
    return {str(p.relative_to(step_dir)) for p in (step_dir / "state").rglob("*") if p.is_file()}


def flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# --- pure --------------------------------------------------------------------------------------


def test_layout_changes_name_what_nxd_cannot_load_across() -> None:
    saved = {"tp": 32, "pp": 8, "dp": 2, "zero1": True, "kv_replicator": 4,
             "virtual_pipeline": 1}
    same = NxDLayout(tp=32, pp=8, dp=2, zero1=True, kv_replicator=4, virtual_pipeline=1)
    assert nxd_layout_changes(saved, same) == []
    assert nxd_layout_changes(saved, NxDLayout(32, 4, 4, True, 4, 1)) == ["pp", "dp"]
    assert nxd_layout_changes(saved, NxDLayout(16, 8, 4, True, 2, 1)) == [
        "tp", "kv_replicator", "dp"]
    # Without ZeRO-1 every data-parallel rank reads the dp_rank_00 files: dp may change.
    no_zero = {**saved, "zero1": False}
    assert nxd_layout_changes(no_zero, NxDLayout(32, 8, 4, False, 4, 1)) == []
    assert nxd_layout_changes(no_zero, NxDLayout(32, 8, 2, True, 4, 1)) == ["zero1"]
    assert nxd_layout_changes(None, same) == ["tp", "pp", "virtual_pipeline", "kv_replicator",
                                              "zero1"]


def test_hash_owners_follow_the_writers_and_cover_every_file() -> None:
    coords = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]  # (dp, tp, pp) of ranks 0-3
    files = [
        "checkpoint",
        "optim/dp_rank_01_tp_rank_01_pp_rank_00.pt",
        "optim/dp_rank_01_tp_rank_01_pp_rank_00.pt.tensors/tensor_0.pt",
        "optim/dp_rank_00_tp_rank_01_pp_rank_00.pt",
        "model/dp_rank_00_tp_rank_01_pp_rank_00.pt",
        "model/dp_rank_00_tp_rank_01_pp_rank_00.pt.info.pt",
        "model/dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors/tensor_0.pt",
        "model/dp_rank_00_tp_rank_01_pp_rank_00.pt.tensors/tensor_1.pt",
    ]
    owners = nxd_hash_owners(files, coords)
    assert set(owners) == set(files)
    assert owners["optim/dp_rank_01_tp_rank_01_pp_rank_00.pt"] == 3
    assert owners["optim/dp_rank_01_tp_rank_01_pp_rank_00.pt.tensors/tensor_0.pt"] == 3
    assert owners["optim/dp_rank_00_tp_rank_01_pp_rank_00.pt"] == 1
    # tp rank 1's model files go to its replicas (ranks 1 and 3) in turn.
    model = sorted(f for f in files if f.startswith("model/"))
    assert [owners[f] for f in model] == [1, 3, 1, 3]


# --- one rank ----------------------------------------------------------------------------------


def test_save_lists_nxd_files_with_digests_and_writes_done_last(
    world: NxDWorld, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    train(model, opt, 2)
    seen: dict[str, Any] = {}

    def before_done(step: int) -> None:
        tmp = root / f".tmp-step_{step}"
        seen["tmp_files"] = nxd_files(tmp)
        seen["manifest"] = (tmp / "manifest.json").is_file()
        seen["done"] = (tmp / protocol.CHECKPOINT_DONE_MARKER).exists()
        seen["final"] = (root / f"step_{step}").exists()

    mgr = manager(root, before_done=before_done)
    mgr.save(2, [model], [opt], extra(2))

    step = root / "step_2"
    files = nxd_files(step)
    assert {"state/checkpoint", "state/done",
            "state/model/dp_rank_00_tp_rank_00_pp_rank_00.pt",
            "state/model/dp_rank_00_tp_rank_00_pp_rank_00.pt.info.pt",
            "state/optim/dp_rank_00_tp_rank_00_pp_rank_00.pt",
            "state/model/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors/tensor_0.pt"} <= files
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    # Every file NxD wrote is listed with its digest (NxD's own `done` marker excepted, like
    # ours: its name is the marker's).
    assert files - {"state/done"} <= set(manifest)
    assert all(len(manifest[rel]["sha256"]) == 64 for rel in files - {"state/done"})
    assert "rng/rank_0.pt" in manifest and "trainer_state.json" in manifest
    # `done` came after the manifest and after NxD had finished, under the temporary name.
    assert seen == {"tmp_files": files, "manifest": True, "done": False, "final": False}
    assert (step / protocol.CHECKPOINT_DONE_MARKER).read_text() == "2\n"
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["state_format"] == {"name": "nxd", "xser": True, "layout": {
        "tp": 1, "pp": 1, "dp": 1, "zero1": True, "kv_replicator": 1, "virtual_pipeline": 1}}
    assert state["layout"] == {"pp": 1, "dp": 1, "tp": 1, "fsdp": False}
    assert state["fingerprint"] == "fp-nxd" and state["step"] == 2
    # NxD was given the save's own directory, its own pruning off, xser on, no extra state.
    (name, call), = world.calls
    assert name == "save" and call == {
        "dir": str(root / ".tmp-step_2"), "tag": "state", "use_xser": True,
        "num_kept_ckpts": None, "async_save": False, "scheduler": None, "user_content": None}


def test_resume_restores_weights_moments_rng_and_position(world: NxDWorld, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    train(model, opt, 3)
    world.xla_seed = 4242
    torch.manual_seed(99)
    mgr = manager(root)
    mgr.save(3, [model], [opt], extra(3))
    cpu_rng = torch.get_rng_state()

    world.xla_seed, world.calls = 1, []
    torch.manual_seed(5)
    fresh, fresh_opt = tiny(1)  # other weights
    fresh_opt.param_groups[0]["lr"] = 5e-3  # this run's setting wins over the saved one
    state = manager(root).restore("latestIfExists", [fresh], [fresh_opt])

    assert state is not None and state["step"] == 3
    assert state["data"] == {"consumed_samples": 24}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0]["lr"] == 5e-3
    assert world.xla_seed == 4242 and torch.equal(torch.get_rng_state(), cpu_rng)
    # ZeRO-1's shards were cut from the loaded weights, not the fresh ones: the next step
    # continues the saved run exactly. That needs the model loaded before the optimizer.
    fresh_opt.param_groups[0]["lr"] = 1e-2
    train(model, opt, 1, seed=11)
    train(fresh, fresh_opt, 1, seed=11)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [(c["model"], c["optimizer"]) for n, c in world.calls if n == "load"] == [
        (True, False), (False, True)]


def test_flipped_byte_in_an_nxd_file_is_quarantined_and_the_older_one_loads(
    world: NxDWorld, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    mgr = manager(root)
    train(model, opt, 2)
    mgr.save(2, [model], [opt], extra(2))
    at_two = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 2)
    mgr.save(4, [model], [opt], extra(4))
    target = root / "step_4/state/optim/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors/tensor_0.pt"
    flip(target)  # same size: only the digest can tell
    damaged = target.read_bytes()

    world.calls = []
    fresh, fresh_opt = tiny(1)
    state = manager(root).restore("latestIfExists", [fresh], [fresh_opt])

    assert state is not None and state["step"] == 2
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, at_two[k])
    # NxD never read the damaged checkpoint; it sits in quarantine with its bytes and a note.
    assert all(c["path"] == str(root / "step_2") for n, c in world.calls if n == "load")
    (moved,) = (root / "quarantine").iterdir()
    assert moved.name.startswith("step_4.")
    note = (moved / "QUARANTINED.txt").read_text()
    assert "state/optim/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors/tensor_0.pt has changed" in note
    assert (moved / target.relative_to(root / "step_4")).read_bytes() == damaged
    assert sorted(p.name for p in root.iterdir()) == ["quarantine", "step_2"]


def test_keep_n_is_ours_and_nxd_prunes_nothing(world: NxDWorld, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    mgr = manager(root, keep=2)
    for step in (1, 2, 3, 4):
        train(model, opt, 1)
        mgr.save(step, [model], [opt], extra(step))
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
    assert [c["num_kept_ckpts"] for n, c in world.calls if n == "save"] == [None] * 4
    assert world.removed == []
    assert all((root / s / "state/done").is_file() for s in ("step_3", "step_4"))


def test_resume_in_another_layout_is_refused_with_the_fields(
    world: NxDWorld, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    manager(root).save(2, [model], [opt], extra(2))
    before = nxd_files(root / "step_2")

    other = NxDLayout(tp=2, pp=1, dp=1, zero1=True, kv_replicator=2, virtual_pipeline=1)
    with pytest.raises(CheckpointError) as info:
        manager(root, NxDStateIO(other, (0, 0, 0))).restore("latestIfExists", [model], [opt])
    message = str(info.value)
    assert "parallelism.tensor 1 -> 2" in message
    assert "parallelism.kvReplicator 1 -> 2" in message
    assert "cannot reshard" in message
    # A refusal is not damage: nothing moved, nothing loaded.
    assert not (root / "quarantine").exists() and nxd_files(root / "step_2") == before
    assert [n for n, _ in world.calls] == ["save"]

    # The torch backend's reader (DCP) refuses NxD's files, and the reverse.
    cannot = r"'nxd' state .* torch\.distributed\.checkpoint cannot read"
    with pytest.raises(CheckpointError, match=cannot):
        manager(root, DCPStateIO()).restore("latestIfExists", [model], [opt])
    dcp_root = tmp_path / "dcp"
    plain = nn.Linear(2, 2)
    plain_opt = torch.optim.AdamW(plain.parameters())
    manager(dcp_root, DCPStateIO()).save(1, [plain], [plain_opt], extra(1))
    with pytest.raises(CheckpointError, match=r"torch\.distributed\.checkpoint state .* NxD's"):
        manager(dcp_root).restore("latestIfExists", [plain], [plain_opt])


def test_background_save_completes_through_nxd_before_done(
    world: NxDWorld, tmp_path: Path
) -> None:
    root = tmp_path / "ckpt"
    model, opt = tiny(0)
    mgr = manager(root, async_save=True)
    world.hold_writes = threading.Event()
    mgr.save(2, [model], [opt], extra(2))
    # NxD's writer has not run: nothing to finalize, no `done`, and training goes on.
    assert mgr.poll() is None
    assert not (root / "step_2").exists()
    assert (root / ".tmp-step_2/state/checkpoint").is_file()
    world.hold_writes.set()
    mod = sys.modules["neuronx_distributed.trainer.checkpoint"]
    mod.g_iostate._save_task.result()
    assert mgr.poll() == 2
    assert (root / "step_2/state/done").is_file()
    assert (root / "step_2" / protocol.CHECKPOINT_DONE_MARKER).is_file()
    # NxD's exit hook would mark the renamed directory done again: it is taken off.
    assert world.atexit_registered == [mod.CheckpointIOState.wait_all]
    assert mod.CheckpointIOState.wait_all in world.atexit_unregistered

    # The next background save: NxD first marks the previous tag done in the new directory
    # (made beforehand), then writes; `wait` completes it.
    train(model, opt, 1)
    mgr.save(3, [model], [opt], extra(3))
    assert mgr.wait() == 3
    assert mgr.check(root / "step_3", 3) == []
    assert mgr.check(root / "step_2", 2) == []
    fresh, fresh_opt = tiny(1)
    state = manager(root).restore("latestIfExists", [fresh], [fresh_opt])
    assert state is not None and state["step"] == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# --- two ranks -----------------------------------------------------------------------------------


def _two_rank_worker(rank: int, root: str, store_path: str, out: str) -> None:
    """One of two gloo ranks, data-parallel replicas with ZeRO-1: save steps 2 and 4, damage
    a file of step 4 that rank 1 wrote, resume in fresh managers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    w = NxDWorld(coords=(rank, 0, 0), dp_size=2, zero1=True)
    sys.modules.update(build_standin(w))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    layout = NxDLayout(tp=1, pp=1, dp=2, zero1=True, kv_replicator=1, virtual_pipeline=1)
    base = Path(root)
    result: dict[str, Any] = {}
    try:
        model, opt = tiny(0)
        mgr = CheckpointManager(base, keep=3, fingerprint="fp-nxd", rank=rank, world_size=2,
                                state_io=NxDStateIO(layout, (rank, 0, 0)),
                                log=lambda line: None)
        mgr.prepare()
        train(model, opt, 2)
        mgr.save(2, [model], [opt], extra(2))
        train(model, opt, 2)
        mgr.save(4, [model], [opt], extra(4))
        dist.barrier()
        if rank == 0:
            manifest = json.loads((base / "step_4/manifest.json").read_text())["files"]
            result["manifest"] = sorted(manifest)
            result["files"] = sorted(nxd_files(base / "step_4"))
            flip(base / "step_4/state/optim/dp_rank_01_tp_rank_00_pp_rank_00.pt.tensors/"
                 "tensor_0.pt")
        dist.barrier()
        fresh, fresh_opt = tiny(1)
        again = CheckpointManager(base, keep=3, fingerprint="fp-nxd", rank=rank, world_size=2,
                                  state_io=NxDStateIO(layout, (rank, 0, 0)),
                                  log=lambda line: None)
        again.prepare()
        state = again.restore("latestIfExists", [fresh], [fresh_opt])
        result["step"] = None if state is None else state["step"]
        result["loads"] = [c["path"] for n, c in w.calls if n == "load"]
        result["quarantine"] = sorted(p.name.split(".")[0] for p in (base / "quarantine").iterdir())
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def test_two_gloo_ranks_hash_their_shares_and_fall_back_together(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    out = tmp_path / "result"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_two_rank_worker,
                         args=(r, str(root), str(tmp_path / "store"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    first = results[0]
    # Both ranks' NxD files (rank 1's ZeRO-1 optimizer shard and its share of the model's
    # tensor files) are in the manifest, which rank 0 wrote from both ranks' digests.
    assert "state/optim/dp_rank_01_tp_rank_00_pp_rank_00.pt" in first["manifest"]
    assert set(first["files"]) - {"state/done"} <= set(first["manifest"])
    for result in results:
        assert result["step"] == 2
        assert result["loads"] == [str(root / "step_2")] * 2
        assert result["quarantine"] == ["step_4"]


def test_dcp_manager_keeps_its_own_format() -> None:
    """The default manager is DCP's: no state_format key, the distcp shards are its files."""
    io = DCPStateIO()
    assert io.describe() == {} and io.refusal({"step": 1}) is None
    assert not io.collective_completion
    assert CheckpointManager("unused", keep=1, fingerprint="x").io.__class__ is DCPStateIO
    assert ckpt_module.STATE_FORMAT == "state_format"


def test_each_backend_selects_its_state_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nxd backend hands the manager NxD's format with its layout and this rank's NxD ranks
    (from NxD's parallel_state, a stand-in here); the torch backend keeps DCP."""
    from llamajob_trainer.parallel import neuron_backend as nb
    from llamajob_trainer.parallel.torch_backend import TorchParallelModel

    ps = types.ModuleType("neuronx_distributed.parallel_layers.parallel_state")
    ps.get_tensor_model_parallel_rank = lambda: 3
    ps.get_pipeline_model_parallel_rank = lambda: 1
    layers = types.ModuleType("neuronx_distributed.parallel_layers")
    layers.parallel_state = ps
    nxd = types.ModuleType("neuronx_distributed")
    nxd.parallel_layers = layers
    for module in (nxd, layers, ps):
        monkeypatch.setitem(sys.modules, module.__name__, module)

    pm = object.__new__(nb.NeuronParallelModel)
    pm.layout = types.SimpleNamespace(virtual_pipeline=2)  # type: ignore[assignment]
    pm.model = nn.Linear(2, 2)  # no shard map: kvReplicator 1
    pm.tp_size, pm.pp_size, pm.dp_size, pm.dp_rank = 4, 2, 2, 1
    pm.nxd_config = {"optimizer_config": {"zero_one_enabled": True}}
    io = pm.state_io()
    assert isinstance(io, NxDStateIO)
    assert io.layout == NxDLayout(tp=4, pp=2, dp=2, zero1=True, kv_replicator=1,
                                  virtual_pipeline=2)
    assert io.coords == (1, 3, 1)
    assert type(object.__new__(TorchParallelModel).state_io()) is DCPStateIO


def test_the_platform_is_recorded_and_a_kv_replicated_resume_on_the_other_is_refused() -> None:
    """trn1 and trn2 place kv copies differently (nxd_shards): the state format records the
    platform, export reads it, and a resume with kvReplicator > 1 on the other one is refused."""
    layout = NxDLayout(tp=4, pp=1, dp=1, zero1=True, kv_replicator=2, virtual_pipeline=1)
    trn1 = NxDStateIO(layout, (0, 0, 0), "trn1")
    state = trn1.describe()
    assert state[ckpt_module.STATE_FORMAT]["platform"] == "trn1"
    assert trn1.refusal(state) is None
    refusal = NxDStateIO(layout, (0, 0, 0), "trn2").refusal(state)
    assert refusal is not None and "saved on trn1" in refusal and "kvReplicator" in refusal
    # Without kv copies the platforms agree on every shard.
    plain = NxDLayout(tp=4, pp=1, dp=1, zero1=True, kv_replicator=1, virtual_pipeline=1)
    assert NxDStateIO(plain, (0, 0, 0), "trn2").refusal(
        NxDStateIO(plain, (0, 0, 0), "trn1").describe()
    ) is None
