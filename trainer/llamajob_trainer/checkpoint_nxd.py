"""The nxd backend's checkpoint state: NxD's own per-rank files, inside the manager's guarantees.

``NxDStateIO`` writes and reads a checkpoint's ``state/`` with NxD's
``neuronx_distributed.trainer.save_checkpoint``/``load_checkpoint`` (one tag, per (tp, pp[, dp])
rank, xser tensor files); ``checkpoint.CheckpointManager`` keeps its temporary name, digests,
``done`` marker, quarantine and keep-N around them (see that module's docstring). The pure parts
(which layout changes NxD cannot load across, which rank hashes which file) are functions here.
Sources are cited where a choice depends on NxD v2.28.0 or torch-xla v2.9.0.

UNVERIFIED: NxD and torch-xla are not installable where this project is tested; the module is
exercised against a stand-in that writes NxD's file layout (tests/test_checkpoint_nxd.py).
"""

from __future__ import annotations

import atexit
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from .checkpoint import STATE_DIR, STATE_FORMAT, StateIO, _keep_settings, _settings
from .errors import CheckpointError


@dataclass(frozen=True)
class NxDLayout:
    """What decides which file of an NxD checkpoint each rank reads, and its tensors' shapes."""

    tp: int
    pp: int
    dp: int
    zero1: bool
    kv_replicator: int
    virtual_pipeline: int


# The spec fields behind each NxDLayout field, for the refusal message.
NXD_LAYOUT_FIELDS = {
    "tp": "parallelism.tensor",
    "pp": "parallelism.pipeline",
    "virtual_pipeline": "parallelism.virtualPipeline",
    "kv_replicator": "parallelism.kvReplicator",
    "zero1": "parallelism.zero1",
    "dp": "the data-parallel degree (world size / (tensor x pipeline))",
}


def nxd_layout_changes(saved: Any, current: NxDLayout) -> list[str]:
    """The layout fields that differ between a checkpoint's recorded NxD layout and this run's,
    where NxD cannot load across the difference. Pure.

    NxD names each rank's files after its (dp, tp, pp) ranks and every rank loads the file of
    its own ranks (neuronx_distributed trainer/checkpoint.py at v2.28.0, ``_get_path`` lines
    54-63, ``load_checkpoint`` lines 936-951): a different tensor or pipeline degree (or a
    different stage assignment: virtual pipeline) reads another shard's tensors; kvReplicator
    changes the shapes and the arrangement of the replicated k/v heads. The data-parallel
    degree matters only with ZeRO-1, whose optimizer files hold each data-parallel rank's slice
    of the flattened parameters (lines 760-770; torch_xla zero_redundancy_optimizer.py at
    v2.9.0, lines 512-523 load them as they are); without ZeRO-1 every data-parallel rank reads
    the dp_rank_00 files (lines 764-770, 941-946)."""
    record = saved if isinstance(saved, dict) else {}
    now = asdict(current)
    changed = [f for f in ("tp", "pp", "virtual_pipeline", "kv_replicator", "zero1")
               if record.get(f) != now[f]]
    if current.zero1 and record.get("zero1") is True and record.get("dp") != current.dp:
        changed.append("dp")
    return changed


def nxd_shard_file(kind: str, dp: int, tp: int, pp: int) -> str:
    """NxD's name for one rank's model or optimizer file (``_get_path``, trainer/checkpoint.py
    at v2.28.0, lines 54-63; no expert parallelism in this model)."""
    return f"{kind}/dp_rank_{dp:02d}_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"


_NXD_SHARD_RE = re.compile(
    r"^(model|optim)/dp_rank_(\d+)(?:_ep_rank_\d+)?_tp_rank_(\d+)_pp_rank_(\d+)\.pt(?:$|[./])"
)


def nxd_hash_owners(
    files: Sequence[str], coords: Sequence[tuple[int, int, int]]
) -> dict[str, int]:
    """Which rank hashes each file of an NxD state directory (names relative to it); ``coords``
    holds every rank's (dp, tp, pp). Pure, so every rank computes the same split.

    Each file goes to the rank that most likely wrote it, whose page cache still holds it: a
    ZeRO-1 optimizer file to the rank of its coordinates (every rank writes its own:
    trainer/checkpoint.py at v2.28.0, lines 760-787, 578-585); a model file (dp_rank_00) or a
    non-ZeRO-1 optimizer file to the data-parallel replicas of its (tp, pp), in turn (its first
    replica writes it, line 580; with xser the replicas split its tensor files, lines 495-521).
    Anything else (NxD's marker files) is dealt round-robin over all ranks."""
    world = max(len(coords), 1)
    rank_of = {tuple(c): r for r, c in enumerate(coords)}
    replicas: dict[tuple[int, int], list[int]] = {}
    for r, (_dp, tp, pp) in sorted(enumerate(coords), key=lambda item: tuple(item[1])):
        replicas.setdefault((tp, pp), []).append(r)
    dealt: dict[tuple[int, int], int] = {}
    owners: dict[str, int] = {}
    for i, rel in enumerate(sorted(files)):
        owner = i % world
        match = _NXD_SHARD_RE.match(rel)
        if match:
            kind, dp, tp, pp = match[1], int(match[2]), int(match[3]), int(match[4])
            group = replicas.get((tp, pp))
            if kind == "optim" and (dp, tp, pp) in rank_of:
                owner = rank_of[(dp, tp, pp)]
            elif group:
                turn = dealt.get((tp, pp), 0)
                dealt[(tp, pp)] = turn + 1
                owner = group[turn % len(group)]
        owners[rel] = owner
    return owners


def _nxd_files_of(state: Path, base: str) -> list[str]:
    """One NxD shard's files, relative to the state directory: the ``.pt`` file and, with xser,
    its ``.info.pt`` and ``.tensors/`` (torch_xla/utils/serialization.py at v2.9.0, lines
    16-21)."""
    found = [rel for rel in (base, f"{base}.info.pt") if (state / rel).is_file()]
    tensors = state / f"{base}.tensors"
    if tensors.is_dir():
        found += [f"{base}.tensors/{p.name}" for p in tensors.iterdir() if p.is_file()]
    return found


class NxDStateIO(StateIO):
    """NxD's own checkpoint API (``neuronx_distributed.trainer.save_checkpoint`` and
    ``load_checkpoint`` as of aws-neuron/neuronx-distributed v2.28.0; the line numbers below are
    trainer/checkpoint.py's at that tag unless named otherwise).

    NxD writes one checkpoint "tag" directory under a checkpoint directory. Here the checkpoint
    directory is the save's own ``.tmp-step_N/`` and the tag ``state``, so ``state/`` holds
    exactly NxD's layout: ``checkpoint`` (marker, rank 0, line 148), ``model/`` and ``optim/``
    with a ``dp_rank_DD_tp_rank_TT_pp_rank_PP.pt`` per rank (with xser also ``.pt.info.pt`` and
    ``.pt.tensors/tensor_I.pt``, lines 672-681, 545-576) and ``done`` (rank 0, lines 194, 230).
    No scheduler and no user content: the trainer state is the manager's, in its own file.

    NxD's pruning sees only that directory: ``num_kept_ckpts=None`` keeps every complete tag and
    the only tag there is the one being written, complete before NxD looks (lines 66-98,
    190-196, 227-244). Keep-N is the manager's alone.

    Uses xser (one file per tensor), as NxD's Llama scripts do by default
    (examples/training/llama/tp_pp_llama_hf_pretrain/run_llama_nxd.py line 423,
    tp_zero1_llama_hf_pretrain/tp_zero1_llama_hf_pretrain.py line 349)."""

    name = "nxd"
    collective_completion = True
    xser = True

    def __init__(
        self, layout: NxDLayout, coords: tuple[int, int, int], platform: str | None = None
    ) -> None:
        self.layout = layout
        self.coords = coords  # this rank's (dp, tp, pp) in NxD's parallel_state
        # trn1 or trn2: with kvReplicator > 1 it decides where NxD put each kv copy, so export
        # and resume must know it (nxd_shards.ShardPlan).
        self.platform = platform
        self._all_coords: list[tuple[int, int, int]] = [coords]

    def attach(self, rank: int, world_size: int, group: Any) -> None:
        if group is None:
            return
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, self.coords, group=group)
        self._all_coords = [tuple(c) for c in gathered]

    @staticmethod
    def _single(
        model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        # NxD takes one model (its pipeline wrapper holds every local stage) and one optimizer.
        if len(model_parts) != 1 or len(optimizers) != 1:
            raise ValueError(f"NxD checkpoints take one model and one optimizer, not "
                             f"{len(model_parts)} and {len(optimizers)}")
        return model_parts[0], optimizers[0]

    def save(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        background: bool,
        group: Any,
    ) -> Any:
        import neuronx_distributed.trainer.checkpoint as nxd_checkpoint
        from neuronx_distributed.trainer import save_checkpoint

        model, optimizer = self._single(model_parts, optimizers)
        # Made by every rank before NxD runs: a background save's next call first marks the
        # previous tag done inside the *new* checkpoint directory (``begin`` switches the
        # directory, then ``wait_save`` writes <tag>/done, lines 135-139 and 227-230). The tag
        # is the same, so that file lands in this save's state/ and is rewritten when it ends.
        state_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            str(state_dir.parent),
            tag=state_dir.name,
            model=model,
            optimizer=optimizer,
            scheduler=None,
            user_content=None,
            use_xser=self.xser,
            num_kept_ckpts=None,
            async_save=background,
        )
        if not background:
            return None
        # NxD completes a pending background save again at interpreter exit (lines 731-735,
        # 317-320): rank 0 would write <tag>/done into this directory, which the manager has
        # renamed by then, and fail between two rendezvous, leaving the other ranks waiting.
        # The manager completes every save itself (``wait`` at the end of a run).
        atexit.unregister(nxd_checkpoint.CheckpointIOState.wait_all)
        return state_dir

    def save_finished(self, handle: Any) -> bool:
        """Whether NxD's writer thread is done with this rank's files. NxD has no public call
        for it; its state object keeps the futures (``g_iostate``, line 651; ``_save_task`` and
        ``_dcp_save_task``, lines 128-130, 180, 185). Without them: False, and the save is
        completed by ``complete`` at the next save or the end of the run, as NxD does."""
        import neuronx_distributed.trainer.checkpoint as nxd_checkpoint

        state = getattr(nxd_checkpoint, "g_iostate", None)
        if state is None or not all(hasattr(state, a) for a in ("_save_task", "_dcp_save_task")):
            return False
        tasks = (state._save_task, state._dcp_save_task)
        return all(task is None or task.done() for task in tasks)

    def complete(self, handle: Any) -> None:
        """NxD's ``finalize_checkpoint`` (lines 970-972): waits for the writer thread, raises its
        error, and marks the tag done after a rendezvous of all ranks (lines 198-244)."""
        import neuronx_distributed.trainer.checkpoint as nxd_checkpoint

        nxd_checkpoint.finalize_checkpoint()

    def own_files(self, tmp: Path, rank: int) -> list[Path]:
        """Among the files of this rank's (tp, pp) model shard and of its optimizer shard, those
        ``nxd_hash_owners`` gives it. Each rank lists only those directories (a walk of the
        whole tree by every rank would cost the filesystem ranks x files lookups); NxD's marker
        files are rank 0's when it writes the manifest."""
        state = tmp / STATE_DIR
        dp, tp, pp = self.coords
        bases = (nxd_shard_file("model", 0, tp, pp),
                 nxd_shard_file("optim", dp if self.layout.zero1 else 0, tp, pp))
        files = sorted({rel for base in bases for rel in _nxd_files_of(state, base)})
        owners = nxd_hash_owners(files, self._all_coords)
        return [state / rel for rel in files if owners[rel] == rank]

    def describe(self) -> dict[str, Any]:
        fmt: dict[str, Any] = {"name": self.name, "xser": self.xser,
                               "layout": asdict(self.layout)}
        if self.platform is not None:
            fmt["platform"] = self.platform
        return {STATE_FORMAT: fmt}

    def refusal(self, trainer_state: dict[str, Any]) -> str | None:
        fmt = trainer_state.get(STATE_FORMAT)
        if not isinstance(fmt, dict) or fmt.get("name") != self.name:
            return (
                "it holds torch.distributed.checkpoint state (the torch backend's), which NxD's "
                "load_checkpoint cannot read; resume it with backend torch, or use another "
                "checkpoint.dir"
            )
        saved_platform = fmt.get("platform")
        if (self.layout.kv_replicator > 1 and saved_platform is not None
                and self.platform is not None and saved_platform != self.platform):
            return (
                f"it was saved on {saved_platform}, and this run is on {self.platform}: with "
                "parallelism.kvReplicator > 1 the two place the kv copies differently, so the "
                "files would load into the wrong heads. Resume on the recorded platform, or "
                "start over in another checkpoint.dir"
            )
        changed = nxd_layout_changes(fmt.get("layout"), self.layout)
        if not changed:
            return None
        saved = fmt.get("layout") if isinstance(fmt.get("layout"), dict) else {}
        diffs = ", ".join(
            f"{NXD_LAYOUT_FIELDS[f]} {saved.get(f)!r} -> {getattr(self.layout, f)!r}"
            for f in changed
        )
        return (
            f"it was saved in another NxD layout ({diffs}). NxD checkpoints hold one file per "
            "tensor, pipeline and (with ZeRO-1) data-parallel rank, and NxD loads only the file "
            "of the same ranks: it cannot reshard. Resume with the recorded layout, or start "
            "over in another checkpoint.dir"
        )

    def problems(self, files: set[str]) -> list[str]:
        # Checked before NxD runs, and agreed by all ranks: a rank that raised inside NxD's load
        # would leave the others waiting in its rendezvous.
        dp, tp, pp = self.coords
        wanted = [nxd_shard_file("model", 0, tp, pp),
                  nxd_shard_file("optim", dp if self.layout.zero1 else 0, tp, pp)]
        return [f"{STATE_DIR}/{rel} (NxD's file for this rank) is missing"
                for rel in wanted if f"{STATE_DIR}/{rel}" not in files]

    def read(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> Any:
        """The model first, then the optimizer: two calls. In one call NxD loads the optimizer
        before the model (lines 894-951), and ZeRO-1's ``load_state_dict`` cuts its fp32
        shards from the parameters as they are at that moment (torch_xla
        zero_redundancy_optimizer.py at v2.9.0, lines 512-523, 121-141, 234-259): the freshly
        initialized ones. Every step then writes those shards back over the parameters (lines
        403-415, 440-486), so the loaded weights would be lost at the first step; torch-xla
        warns of it when master weights are not saved (lines 86-88), and NxD's Llama scripts
        re-cut the shards after loading weights (tp_zero1_llama_hf_pretrain.py lines 407-410)."""
        from neuronx_distributed.trainer import load_checkpoint

        model, optimizer = self._single(model_parts, optimizers)
        settings = _settings(optimizer)
        where, tag = str(state_dir.parent), state_dir.name
        load_checkpoint(where, tag=tag, model=model, optimizer=None, scheduler=None, strict=True)
        load_checkpoint(where, tag=tag, model=None, optimizer=optimizer, scheduler=None)
        return settings

    def apply(
        self,
        loaded: Any,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> None:
        _keep_settings(self._single(model_parts, optimizers)[1], loaded)

    def device_rng_state(self) -> dict[str, Any] | None:
        """torch-xla's generator: one integer seed per device (torch_xla/core/xla_model.py at
        v2.9.0, ``get_rng_state`` lines 1466-1478, ``set_rng_state`` lines 1453-1463)."""
        import torch_xla.core.xla_model as xm

        return {"type": "xla", "state": int(xm.get_rng_state())}

    def set_device_rng_state(self, saved: dict[str, Any]) -> bool:
        if saved.get("type") != "xla":
            return False
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(saved["state"]))
        return True


# --- reading the model files in one process (export-hf) --------------------------------------


def nxd_layout_of(trainer_state: dict[str, Any]) -> NxDLayout:
    """The NxD layout a checkpoint's trainer state records (``NxDStateIO.describe``)."""
    fmt = trainer_state.get(STATE_FORMAT)
    record = fmt.get("layout") if isinstance(fmt, dict) else None
    try:
        if isinstance(record, dict):
            return NxDLayout(**record)
    except TypeError:
        pass
    raise CheckpointError(
        f"the checkpoint's {STATE_FORMAT} does not record an NxD layout this version reads: "
        f"{record!r}"
    )


class NxDModelFiles(NxDStateIO):
    """The model files of an NxD checkpoint, read in one process without NxD (``export-hf``).

    As a ``StateIO`` it only checks: the manager's ``verify`` accepts the recorded layout (it is
    this object's) and requires the model file of every (tp, pp) rank. Every data-parallel
    replica of a (tp, pp) holds the same weights and NxD writes them once, as dp_rank_00
    (``save_checkpoint``, trainer/checkpoint.py at v2.28.0, lines 794-812: the model path has no
    dp part, ``_get_path`` lines 54-63). Nothing here writes."""

    def __init__(self, layout: NxDLayout) -> None:
        super().__init__(layout, (0, 0, 0))

    def model_files(self) -> list[str]:
        """Every (tp, pp) rank's model file, relative to the state directory."""
        return [nxd_shard_file("model", 0, tp, pp)
                for pp in range(self.layout.pp) for tp in range(self.layout.tp)]

    def problems(self, files: set[str]) -> list[str]:
        return [f"{STATE_DIR}/{rel} (NxD's model file of a rank) is missing"
                for rel in self.model_files() if f"{STATE_DIR}/{rel}" not in files]

    def save(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("NxDModelFiles only reads")

    @staticmethod
    def load_model(state_dir: Path, tp: int, pp: int) -> dict[str, Tensor]:
        """One rank's model state, on the CPU, under the names NxD saved it with.

        NxD saves ``model.state_dict()``, or under pipeline parallelism
        ``NxDPPModel.local_state_dict()``, which renames the stage's parameters back to the
        original module's names (pipeline/model.py at v2.28.0, lines 1893-1923; trainer/model.py
        lines 84-87): a file holds its stage's parameters under their full names, layer indices
        included, as NxD's converter reads them (scripts/checkpoint_converter.py, lines 317-345,
        513-552). The checkpoint wrapper's module prefix is dropped if a name keeps it.

        An xser file (a directory ``<file>.tensors`` beside it, the test NxD itself uses:
        ``is_checkpoint_xser``, trainer/checkpoint_storage.py lines 150-158) holds references
        that torch_xla's ``serialization.load`` replaces with its per-tensor files (torch_xla
        v2.9.0, torch_xla/utils/serialization.py lines 79-100: plain ``torch.load`` of each, on
        the CPU). Otherwise the file is NxD's plain ``torch.save`` of CPU tensors
        (trainer/checkpoint.py lines 578-585), memory-mapped so a rank's shards are read as they
        are used."""
        path = state_dir / nxd_shard_file("model", 0, tp, pp)
        if path.with_name(path.name + ".tensors").is_dir():
            try:
                from torch_xla.utils import serialization as xser
            except ImportError as exc:
                raise CheckpointError(
                    f"{path} is an xser file (NxD's one file per tensor); reading it needs the "
                    f"torch-xla package (torch_xla), which is not importable here ({exc}). Run "
                    "export-hf in the trainer image, or install torch-xla"
                ) from None
            loaded = xser.load(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path} does not hold a model state dict")
        return {str(k).replace(_CHECKPOINT_PREFIX, ""): v for k, v in loaded.items()
                if isinstance(v, Tensor)}
