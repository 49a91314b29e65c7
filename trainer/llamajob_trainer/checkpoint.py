"""Sharded checkpoints that survive crashes and are never trusted unchecked; the torch backend
may resume them in a different layout, the nxd backend only in its own.

Layout of `checkpoint.dir`:

    step_N/
      state/              the model and optimizer state, written and read by the run's `StateIO`:
                          torch backend (`DCPStateIO`): torch.distributed.checkpoint (DCP) files,
                            every rank its own shards (`__R_*.distcp`); DCP reshards on load, so
                            a run saved on 2 FSDP ranks can resume on 1 rank (or another TP/PP
                            layout);
                          nxd backend (`checkpoint_nxd.NxDStateIO`): NxD's checkpoint of one
                            tag (`checkpoint`, `model/` and `optim/` with one
                            `dp_rank_DD_tp_rank_TT_pp_rank_PP.pt`
                            per rank, xser tensor files, NxD's `done`), written and read by
                            `neuronx_distributed.trainer.save_checkpoint`/`load_checkpoint`; NxD
                            cannot reshard, so a resume in another layout is refused
      rng/rank_R.pt       RNG states of each rank (restored only when the world size matches)
      trainer_state.json  step, consumed samples, scheduler, fingerprint, layout (rank 0); on
                          the nxd backend also `state_format` (NxD, xser, the NxD layout)
      manifest.json       size and SHA-256 of every file above (rank 0, from each rank's own)
      done                written last (rank 0), after every rank finished its shards
    .tmp-step_N/          a save in progress; renamed to step_N once `done` is in it
    quarantine/           damaged or incomplete checkpoints, moved here (never deleted), each
                          with a QUARANTINED.txt saying why
    superseded-step_N/    later checkpoints set aside by an explicit `resume: N`

Integrity. Each rank hashes the files it wrote itself (its shards and RNG file) right after
writing them, while they are still in the page cache, so the cost is spread over the ranks; rank 0
merges the digests into the manifest. (NxD's files carry the writer's ranks in their names, but
which replica wrote which tensor file is NxD's business: there each rank hashes the files of its
own ranks' shards, split among the replicas, once NxD's save is complete everywhere.) Before a
checkpoint is loaded the ranks check it together: the trainer state must name the directory's
step and this job's model (and, on the nxd backend, its format and layout), the manifest must list
exactly the files present, and every file's size and digest must match (each rank re-hashes a
share of the files). A checkpoint that fails any check, or whose shards or RNG files then fail to
load, is moved to `quarantine/` and the next older complete one is tried.

What is never done:
- load a directory without `done` (a save renames its directory only after writing `done`, so a
  `step_N` without it was made by something else: it is quarantined, not loaded or deleted);
- prune before the newest intact checkpoint has loaded (a damaged newest one must not cost the
  good older ones), or prune the checkpoint just loaded or written (`keep` >= 1); NxD's own
  pruning never runs on our directories (`NxDStateIO`);
- start fresh while step directories exist (or were quarantined) and none could be loaded: that
  is an error naming them, unless the spec says `resume: none`.

The decisions (what is complete, what to try, what to prune, what a manifest says about the files,
which NxD layout changes cannot load, which rank hashes which NxD file) are pure functions;
`CheckpointManager` is the I/O shell around them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import protocol
from .errors import CheckpointCorruptError, CheckpointError

TMP_PREFIX = ".tmp-"
SUPERSEDED_PREFIX = "superseded-"
QUARANTINE_DIR = "quarantine"
QUARANTINE_NOTE = "QUARANTINED.txt"
STATE_DIR = "state"
RNG_DIR = "rng"
CHECKSUM_DIR = "checksums"  # per-rank digests while a save is in progress; merged, then removed
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
DIGEST = "sha256"
_CHUNK = 4 << 20
# How long rank 0 waits for the other ranks' digests of a background save; their writes have
# finished by then (DCP's coordinator completes last), so this only bounds a hashing stall.
CHECKSUM_WAIT_SECONDS = 600.0
_STEP_RE = re.compile(rf"^{re.escape(protocol.CHECKPOINT_PREFIX)}(\d+)$")

ResumeMode = str | int


# --- pure core -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    path: Path
    complete: bool


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint as its manifest describes it (digest None: size only)."""

    size: int
    sha256: str | None = None


def step_dir_name(step: int) -> str:
    return f"{protocol.CHECKPOINT_PREFIX}{step}"


def parse_step(name: str) -> int | None:
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def latest_complete(entries: Sequence[CheckpointEntry]) -> CheckpointEntry | None:
    complete = [e for e in entries if e.complete]
    return max(complete, key=lambda e: e.step) if complete else None


def resolve_resume(
    mode: ResumeMode, entries: Sequence[CheckpointEntry], root: Path
) -> int | None:
    """The newest step the mode allows, None for a fresh start, or a clear error. Pure."""
    if mode == "none":
        newest = latest_complete(entries)
        if newest is not None:
            raise CheckpointError(
                f"checkpoint.resume is none but {root} already holds checkpoints (newest "
                f"{newest.path.name}); a fresh run there would mix with and prune them. Use an "
                "empty checkpoint.dir, or resume: latestIfExists"
            )
        return None
    if mode == "latestIfExists":
        newest = latest_complete(entries)
        return newest.step if newest else None
    if isinstance(mode, int) and not isinstance(mode, bool):
        found = [e for e in entries if e.step == mode]
        if not found:
            have = ", ".join(e.path.name for e in entries if e.complete) or "none"
            raise CheckpointError(
                f"checkpoint.resume asks for step {mode} but {root / step_dir_name(mode)} does "
                f"not exist (complete checkpoints: {have}); pick one of those or latestIfExists"
            )
        if not found[0].complete:
            raise CheckpointError(
                f"checkpoint.resume asks for step {mode} but {found[0].path} is incomplete (no "
                f"'{protocol.CHECKPOINT_DONE_MARKER}' marker: its save was interrupted); pick "
                "another step or latestIfExists"
            )
        return mode
    raise CheckpointError(f"checkpoint.resume: unknown mode {mode!r}")


def candidates(mode: ResumeMode, entries: Sequence[CheckpointEntry]) -> list[CheckpointEntry]:
    """Checkpoints to try, in order, once `resolve_resume` accepted the mode: the requested one
    alone, or every complete one from the newest down (a damaged one falls back to the next)."""
    if mode == "none":
        return []
    if isinstance(mode, int) and not isinstance(mode, bool):
        return [e for e in entries if e.step == mode and e.complete]
    return sorted((e for e in entries if e.complete), key=lambda e: e.step, reverse=True)


def prune_plan(entries: Sequence[CheckpointEntry], keep: int) -> list[Path]:
    """Complete checkpoints beyond the newest `keep`, to delete. Incomplete step directories are
    never pruned: they are quarantined at the next start, where someone can look at them."""
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.step, reverse=True)
    return [e.path for e in complete[max(keep, 1):]]


def later_than(entries: Sequence[CheckpointEntry], step: int) -> list[CheckpointEntry]:
    return [e for e in entries if e.complete and e.step > step]


def parse_manifest(raw: Any) -> dict[str, FileRecord]:
    """The files a manifest lists. Version 2: {"version": 2, "files": {rel: {size, sha256}}};
    version 1 (sizes only, written before digests existed): {rel: size}. ValueError otherwise."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if raw.get("version") == MANIFEST_VERSION:
        files = raw.get("files")
        if not isinstance(files, dict):
            raise ValueError("no 'files' object")
        out = {}
        for rel, rec in files.items():
            if not isinstance(rec, dict) or not _is_size(rec.get("size")):
                raise ValueError(f"bad entry for {rel!r}")
            digest = rec.get(DIGEST)
            if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
                raise ValueError(f"bad {DIGEST} for {rel!r}")
            out[rel] = FileRecord(rec["size"], digest)
        return out
    if all(_is_size(v) for v in raw.values()) and "version" not in raw:
        return {rel: FileRecord(size) for rel, size in raw.items()}
    raise ValueError("unknown manifest format")


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safe_rel(rel: str) -> bool:
    # A manifest is input like any other: it must not point outside its checkpoint.
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def listing_problems(manifest: dict[str, FileRecord], present: set[str]) -> list[str]:
    """Files listed but absent, present but unlisted, or listed outside the checkpoint."""
    problems = [f"manifest names {rel!r}, outside the checkpoint"
                for rel in sorted(manifest) if not _safe_rel(rel)]
    problems += [f"{rel} is missing" for rel in sorted(set(manifest) - present) if _safe_rel(rel)]
    problems += [f"{rel} is not in the manifest" for rel in sorted(present - set(manifest))]
    return problems


def trainer_state_problems(state: Any, step: int) -> list[str]:
    if not isinstance(state, dict):
        return [f"{TRAINER_STATE} is not a JSON object"]
    if state.get("step") != step:
        return [f"{TRAINER_STATE} is for step {state.get('step')!r}, not {step}"]
    data = state.get("data", {"consumed_samples": 0})  # the trainer always writes it
    if not isinstance(data, dict) or not _is_size(data.get("consumed_samples")):
        return [f"{TRAINER_STATE} has no valid data position"]
    return []


def fresh_start_problem(
    mode: ResumeMode, tried: Sequence[str], incomplete: Sequence[str], quarantined: Sequence[str],
    root: Path,
) -> str | None:
    """Why a run must not start from scratch although it found nothing to load, or None.

    Step directories that exist (or were quarantined earlier) mean a run was here; starting over
    would silently throw its training away and prune its traces. Only `resume: none` says so."""
    if mode == "none" or not (tried or incomplete or quarantined):
        return None
    found = [*tried, *(f"{n} (no '{protocol.CHECKPOINT_DONE_MARKER}' marker)" for n in incomplete)]
    if quarantined:
        found.append(f"earlier quarantined: {', '.join(quarantined[:5])}")
    return (
        f"checkpoint.dir {root} holds no intact checkpoint to resume from: "
        f"{'; '.join(found)}. Nothing was deleted; damaged and incomplete ones are in "
        f"{root / QUARANTINE_DIR}. To start over set checkpoint.resume: none (or use an empty "
        "checkpoint.dir); to use one of them, repair it and move it back"
    )


# --- filesystem helpers ------------------------------------------------------------------------


def scan(root: Path) -> tuple[list[CheckpointEntry], list[Path]]:
    """Step directories (with completeness) and leftover temporary directories."""
    entries: list[CheckpointEntry] = []
    leftovers: list[Path] = []
    if not root.is_dir():
        return entries, leftovers
    for child in root.iterdir():
        if not child.is_dir():
            continue
        if child.name.startswith(TMP_PREFIX):
            leftovers.append(child)
            continue
        step = parse_step(child.name)
        if step is not None:
            complete = (child / protocol.CHECKPOINT_DONE_MARKER).is_file()
            entries.append(CheckpointEntry(step, child, complete))
    entries.sort(key=lambda e: e.step)
    return entries, leftovers


def quarantined_steps(root: Path) -> list[str]:
    folder = root / QUARANTINE_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(protocol.CHECKPOINT_PREFIX))


def file_record(path: Path, digest: bool = True) -> FileRecord:
    with path.open("rb") as handle:
        if not digest:
            return FileRecord(os.fstat(handle.fileno()).st_size)
        h = hashlib.sha256()
        size = 0
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileRecord(size, h.hexdigest())


def file_problem(root: Path, rel: str, expected: FileRecord) -> str | None:
    path = root / rel
    try:
        size = path.stat().st_size
    except OSError:
        return f"{rel} is missing"
    if size != expected.size:
        return f"{rel} has {size} bytes, expected {expected.size}"
    if expected.sha256 is None:
        return None
    try:
        actual = file_record(path)
    except OSError as exc:
        return f"{rel} cannot be read ({exc.strerror or exc})"
    if actual.sha256 != expected.sha256:
        return f"{rel} has changed (its {DIGEST} differs from the manifest)"
    return None


def checkpoint_files(root: Path) -> set[str]:
    """The files a manifest must list: everything but the manifest, `done` and digests."""
    skip = {MANIFEST, protocol.CHECKPOINT_DONE_MARKER, QUARANTINE_NOTE}
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip and p.relative_to(root).parts[0] != CHECKSUM_DIR
    }


def _fsync_path(path: Path) -> None:
    # Directories need an fsync for renames inside them to be durable; some filesystems
    # refuse to open directories, which only weakens durability, never correctness.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _records_json(records: dict[str, FileRecord]) -> dict[str, dict[str, Any]]:
    return {
        rel: {"size": r.size, **({DIGEST: r.sha256} if r.sha256 else {})}
        for rel, r in sorted(records.items())
    }


# --- state dicts ---------------------------------------------------------------------------------

# Flattened optimizer state ("state.<fqn>.exp_avg") merges across pipeline stages and reshards.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def collect_state(
    model_parts: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer]
) -> tuple[dict[str, Any], list[tuple[set[str], set[str]]]]:
    """{"model": ..., "optim": ...} over all model parts, and each part's own keys."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    keys: list[tuple[set[str], set[str]]] = []
    for part, opt in zip(model_parts, optimizers, strict=True):
        msd = get_model_state_dict(part, options=_OPTIONS)
        osd = get_optimizer_state_dict(part, opt, options=_OPTIONS)
        model_sd.update(msd)
        optim_sd.update(osd)
        keys.append((set(msd), set(osd)))
    return {"model": model_sd, "optim": optim_sd}, keys


def capture_rng(device_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """This rank's RNG states: CPU, Python and NumPy always, and the generator of the device
    this process trains on (``parallel.device.place``) when it is an accelerator.

    ``device_state`` ({"type", "state"}) replaces the latter where the device is not one
    ``parallel.device`` places (the nxd backend's XLA device: ``StateIO.device_rng_state``)."""
    from .parallel import device as devices

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    accel = devices.rng_device()
    if device_state is not None:
        state["device"] = device_state
    elif accel is not None:
        state["device"] = {"type": accel.type, "state": devices.get_rng_state(accel)}
    return state


def restore_rng(
    state: dict[str, Any], set_device: Callable[[dict[str, Any]], bool] | None = None
) -> None:
    """The inverse of ``capture_rng``. A device state saved on another kind of device (a CPU
    checkpoint resumed on an accelerator, or the reverse) is skipped: the generators differ.
    ``set_device`` (``StateIO.set_device_rng_state``) restores the device state first and
    says whether it did."""
    from .parallel import device as devices

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    saved = state.get("device")
    if set_device is not None and isinstance(saved, dict) and set_device(saved):
        return
    accel = devices.rng_device()
    if accel is not None and isinstance(saved, dict) and saved.get("type") == accel.type:
        devices.set_rng_state(saved["state"], accel)


def read_rng(path: Path) -> dict[str, Any]:
    """A rank's RNG file; any failure to read or unpickle it is a damaged checkpoint."""
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # unpickling raises whatever the bytes happen to decode into
        raise CheckpointCorruptError(
            f"{path}: cannot read the RNG state ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= set(state):
        raise CheckpointCorruptError(f"{path}: not an RNG state")
    return state


# --- how the model and optimizer state is written and read -------------------------------------

STATE_FORMAT = "state_format"  # trainer_state key naming a non-DCP format (absent: DCP)


class StateIO(ABC):
    """How the model and optimizer state goes into a checkpoint's ``state/`` and comes back.

    The manager's guarantees (temporary name, digests, ``done`` last, quarantine, keep-N, data
    position, RNG) sit around it and do not depend on it. ``DCPStateIO`` is the torch backend's,
    ``NxDStateIO`` the nxd backend's."""

    name = "dcp"
    # Whether finishing a background save is a step every rank takes at the same point (NxD's
    # completion rendezvous) instead of one rank 0 notices alone (DCP's coordinator future).
    collective_completion = False

    def attach(self, rank: int, world_size: int, group: Any) -> None:
        """Called once by every rank's manager, with its gloo side group (None: one process).
        Nothing to learn for DCP."""
        return None

    @abstractmethod
    def save(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        background: bool,
        group: Any,
    ) -> Any:
        """Write the state into ``state_dir``. In the background: returns a handle for
        ``save_finished``/``complete`` (DCP: a future); otherwise returns once written."""

    def save_finished(self, handle: Any) -> bool:
        """Whether this rank's part of a background save is on disk (collective completion)."""
        return bool(handle.done())

    def complete(self, handle: Any) -> None:
        """Finish a background save (collective completion: every rank); raises if it failed."""
        handle.result()

    @abstractmethod
    def own_files(self, tmp: Path, rank: int) -> list[Path]:
        """The files under ``tmp/state`` this rank hashes for the manifest; once a save is
        complete, over all ranks, these are all of them (rank 0 adds any left over)."""

    def describe(self) -> dict[str, Any]:
        """What goes into trainer_state.json besides the manager's own keys."""
        return {}

    def refusal(self, trainer_state: dict[str, Any]) -> str | None:
        """Why this run must not load a checkpoint with this trainer state (a user error, not
        damage: nothing is quarantined), or None."""
        fmt = trainer_state.get(STATE_FORMAT)
        if fmt is None:
            return None
        name = fmt.get("name") if isinstance(fmt, dict) else fmt
        return (
            f"it holds {name!r} state (NxD's per-rank files, written by the nxd backend), which "
            "torch.distributed.checkpoint cannot read: only the nxd backend, in the layout "
            f"recorded in {TRAINER_STATE}, can load it; or use another checkpoint.dir"
        )

    def problems(self, files: set[str]) -> list[str]:
        """What this rank would miss among a checkpoint's files (relative names) to load it."""
        return []

    @abstractmethod
    def read(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> Any:
        """Read the state; any exception means a damaged checkpoint. Returns what ``apply``
        takes once every rank has read its part."""

    @abstractmethod
    def apply(
        self,
        loaded: Any,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> None:
        """Put what ``read`` returned into the model parts and optimizers. The optimizers keep
        this run's hyperparameters and take only their state from the checkpoint."""

    def device_rng_state(self) -> dict[str, Any] | None:
        """The training device's generator ({"type", "state"}) where ``parallel.device`` does
        not know the device; None leaves it to ``capture_rng``."""
        return None

    def set_device_rng_state(self, saved: dict[str, Any]) -> bool:
        """Restore ``device_rng_state``'s value; False when it is not this device's."""
        return False


def _settings(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _keep_settings(opt: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> None:
    for group, own in zip(opt.param_groups, settings, strict=True):
        group.update(own)


class DCPStateIO(StateIO):
    """torch.distributed.checkpoint: every rank writes its own shards (``__R_*.distcp``), rank 0
    the ``.metadata``; DCP reshards on load, so any layout of the torch backend can resume."""

    def save(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        background: bool,
        group: Any,
    ) -> Any:
        state, _ = collect_state(model_parts, optimizers)
        with _single_process_ok():
            if background:
                return dcp.async_save(
                    state, checkpoint_id=str(state_dir), process_group=group,
                    no_dist=not _is_dist(),
                )
            dcp.save(state, checkpoint_id=str(state_dir), no_dist=not _is_dist())
        return None

    def own_files(self, tmp: Path, rank: int) -> list[Path]:
        return sorted((tmp / STATE_DIR).glob(f"__{rank}_*.distcp"))

    def read(
        self,
        state_dir: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> Any:
        state, keys = collect_state(model_parts, optimizers)
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(state_dir), no_dist=not _is_dist())
        return state, keys

    def apply(
        self,
        loaded: Any,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> None:
        state, keys = loaded
        for part, opt, (model_keys, optim_keys) in zip(
            model_parts, optimizers, keys, strict=True
        ):
            settings = _settings(opt)
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            set_optimizer_state_dict(
                part, opt, {k: state["optim"][k] for k in optim_keys}, options=_OPTIONS
            )
            _keep_settings(opt, settings)


# --- the shell -------------------------------------------------------------------------------


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Without a process group DCP runs in one process on purpose (tests, export-hf); its
    warning about that says nothing useful there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    extra: dict[str, Any]
    future: Any


class CheckpointManager:
    """Save, check, find, load and prune checkpoints for one training run (all ranks call it)."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep: int,
        fingerprint: str,
        rank: int = 0,
        world_size: int = 1,
        async_save: bool = False,
        checksums: bool = True,
        before_done: Callable[[int], None] | None = None,
        log: Callable[[str], None] = print,
        state_io: StateIO | None = None,
    ) -> None:
        self.root = Path(root)
        self.io = state_io if state_io is not None else DCPStateIO()
        self.keep = keep
        self.fingerprint = fingerprint
        self.rank = rank
        self.world_size = world_size
        self.async_save = async_save
        self.checksums = checksums
        self.before_done = before_done
        self.log = log
        self._pending: _PendingSave | None = None
        self._side_group: Any = None
        if _is_dist():
            # Background saves run collectives while training runs its own, and the integrity
            # check exchanges Python objects: a separate CPU (gloo) group keeps both off the
            # training communicator, whatever its device.
            self._side_group = dist.new_group(backend="gloo")
        self.io.attach(rank, world_size, self._side_group)

    def _barrier(self) -> None:
        """Every rank waits for the others, on the gloo side group: the training group's
        barrier returns at once on XLA (torch_xla/distributed/xla_backend.py at v2.9.0, lines
        230-231), where the file operations it orders would race."""
        if _is_dist():
            dist.barrier(group=self._side_group)

    def _all_ranks(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank (a one-integer all-reduce)."""
        if not _is_dist():
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self._side_group)
        return bool(value.item())

    # -- start of a run -------------------------------------------------------------------

    def prepare(self) -> None:
        """Rank 0 creates the directory. Nothing is removed before a checkpoint has loaded."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self._barrier()

    def resolve(self, mode: ResumeMode) -> int | None:
        """The newest step the mode allows (None: fresh start); read-only, so it may run before
        the process group exists. `restore` may still fall back to an older one."""
        return resolve_resume(mode, scan(self.root)[0], self.root)

    def preflight(self, mode: ResumeMode) -> None:
        """The user errors that need no process group: an impossible resume mode, and
        checkpoints of another model. Read-only; damage is judged later, by `restore`."""
        entries = scan(self.root)[0]
        resolve_resume(mode, entries, self.root)
        for entry in candidates(mode, entries):
            with contextlib.suppress(CheckpointCorruptError):
                self.read_trainer_state(entry.step)
                return  # the newest readable one speaks for the run

    def restore(
        self,
        mode: ResumeMode,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> dict[str, Any] | None:
        """Load the newest intact checkpoint the mode allows into the model parts and
        optimizers, quarantining damaged ones on the way; its trainer state, or None for a fresh
        start. Then (and only then) prune. All ranks call it."""
        # Every rank reads the directory, then waits for the others to have read it too: rank 0
        # moves things below, and a rank still scanning would see another set of checkpoints
        # and take a different number of collective steps. (Nothing changes the directory
        # between `prepare`'s barrier and this one.)
        entries, leftovers = scan(self.root)
        earlier = quarantined_steps(self.root)
        self._barrier()
        resolve_resume(mode, entries, self.root)
        loaded: dict[str, Any] | None = None
        tried: list[str] = []
        for entry in candidates(mode, entries):
            problems = self.check(entry.path, entry.step)
            if not problems:
                try:
                    loaded = self._load(entry.path, model_parts, optimizers)
                except CheckpointCorruptError as exc:
                    problems = [str(exc)]
            if not problems:
                if tried:
                    self.log(f"checkpoint: resuming from {entry.path.name}, the newest intact "
                             "checkpoint")
                break
            where = self._quarantine(entry.path, problems)
            tried.append(f"{entry.path.name} ({problems[0]})")
            self.log(f"checkpoint: {entry.path.name} is damaged: {'; '.join(problems[:3])}. "
                     f"Moved to {where}; not loaded")
            if isinstance(mode, int):
                raise CheckpointCorruptError(
                    f"checkpoint.resume asks for step {mode}, but {entry.path} is damaged "
                    f"({problems[0]}); it was moved to {where}. Pick another step or "
                    "latestIfExists"
                )
        incomplete = [e.path.name for e in entries if not e.complete]
        for entry in entries:
            if not entry.complete:
                where = self._quarantine(entry.path, ["no done marker: never finished by a save"])
                self.log(f"checkpoint: {entry.path.name} has no "
                         f"'{protocol.CHECKPOINT_DONE_MARKER}' marker; moved to {where}")
        if loaded is None:
            for path in leftovers:
                # Nothing intact is known: keep even interrupted saves, out of the way.
                where = self._quarantine(path, ["interrupted save (no done marker)"])
                self.log(f"checkpoint: interrupted save {path.name} moved to {where}")
            problem = fresh_start_problem(mode, tried, incomplete, earlier, self.root)
            if problem:
                self._barrier()
                raise CheckpointCorruptError(problem)
        else:
            if isinstance(mode, int):
                self._set_aside_later(scan(self.root)[0], mode)
            if self.rank == 0:
                self._cleanup()
        self._barrier()
        return loaded

    def set_aside_later(self, step: int) -> None:
        """After an explicit resume from `step`, move later checkpoints out of the way."""
        self._set_aside_later(scan(self.root)[0], step)
        self._barrier()

    def _set_aside_later(self, entries: Sequence[CheckpointEntry], step: int) -> None:
        # Resuming from an explicit older step starts a new timeline; later checkpoints of the
        # old one would otherwise be "latest" after the next crash. Keep them, out of the way.
        later = later_than(entries, step)
        if self.rank == 0 and later:
            for entry in later:
                target = entry.path.with_name(f"{SUPERSEDED_PREFIX}{entry.path.name}")
                if target.exists():
                    target = target.with_name(f"{target.name}-{int(time.time())}")
                entry.path.rename(target)
                self.log(f"checkpoint: resuming from step {step}; moved {entry.path.name} "
                         f"(a later step) aside to {target.name}")
            _fsync_path(self.root)

    def quarantine_count(self) -> int:
        folder = self.root / QUARANTINE_DIR
        return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0

    def latest_complete_step(self) -> int | None:
        newest = latest_complete(scan(self.root)[0])
        return newest.step if newest else None

    def _quarantine(self, path: Path, problems: Sequence[str]) -> Path:
        """Rank 0 moves a checkpoint aside with a note; the others wait. Returns the target."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = self.root / QUARANTINE_DIR / f"{path.name.removeprefix(TMP_PREFIX)}.{stamp}"
        if self.rank == 0:
            target.parent.mkdir(exist_ok=True)
            n = 1
            while target.exists():
                n += 1
                target = target.with_name(f"{path.name.removeprefix(TMP_PREFIX)}.{stamp}.{n}")
            path.rename(target)
            with contextlib.suppress(OSError):
                (target / QUARANTINE_NOTE).write_text(
                    f"moved here from {path.name} at {stamp} UTC by llamajob: "
                    + "\n".join(problems) + "\n"
                )
            _fsync_path(self.root)
        self._barrier()
        return target

    def _cleanup(self) -> None:
        """Rank 0, once a checkpoint has loaded or been written: interrupted saves and complete
        checkpoints beyond `keep` go; quarantined and superseded ones stay."""
        entries, leftovers = scan(self.root)
        pending = self._pending.tmp if self._pending else None
        for path in leftovers:
            if path != pending:
                self.log(f"checkpoint: removing interrupted save {path.name}")
                shutil.rmtree(path, ignore_errors=True)
        for path in prune_plan(entries, self.keep):
            self.log(f"checkpoint: removing old checkpoint {path.name}")
            shutil.rmtree(path, ignore_errors=True)

    # -- save ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        extra: dict[str, Any],
    ) -> float:
        """Write step_N; returns the seconds training was blocked. All ranks must call it."""
        self.wait()  # one save at a time: the previous one must be finalized first
        started = time.perf_counter()
        tmp = self.root / f"{TMP_PREFIX}{step_dir_name(step)}"
        (tmp / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(self.io.device_rng_state()), tmp / RNG_DIR / f"rank_{self.rank}.pt")
        extra = {**extra, "step": step}
        handle = self.io.save(tmp / STATE_DIR, model_parts, optimizers,
                              background=self.async_save, group=self._side_group)
        if self.async_save:
            if not self.io.collective_completion:
                # Hash in the background thread too, once this rank's own shards are written.
                handle.add_done_callback(lambda f: self._write_own_records(tmp, f))
            self._pending = _PendingSave(step, tmp, extra, handle)
            return time.perf_counter() - started
        self._write_own_records(tmp)
        self._barrier()  # every rank's shards, RNG file and digests are on disk
        if self.rank == 0:
            self._finalize(step, tmp, extra)
        self._barrier()
        return time.perf_counter() - started

    def _own_files(self, tmp: Path) -> list[Path]:
        return [*self.io.own_files(tmp, self.rank), tmp / RNG_DIR / f"rank_{self.rank}.pt"]

    def _write_own_records(self, tmp: Path, future: Any = None) -> None:
        """This rank's files with their sizes and digests, for rank 0's manifest."""
        out = tmp / CHECKSUM_DIR / f"rank_{self.rank}.json"
        try:
            if future is not None and future.exception() is not None:
                return  # the save failed; `result()` raises it where it is awaited
            records = {
                str(p.relative_to(tmp)): file_record(p, self.checksums)
                for p in self._own_files(tmp)
            }
            body: dict[str, Any] = {"files": _records_json(records)}
        except Exception as exc:  # a background thread: report through the file, never lose it
            body = {"error": f"{type(exc).__name__}: {exc}"}
        out.parent.mkdir(exist_ok=True)
        # Written aside and renamed: rank 0 polls for this file and must never read it half done.
        partial = out.with_name(out.name + ".partial")
        _write_durable(partial, json.dumps(body))
        partial.rename(out)

    def poll(self) -> int | None:
        """Finalize a finished background save (rank 0); returns its step, else None."""
        pending = self._pending
        if pending is None:
            return None
        if self.io.collective_completion:
            # Every rank calls poll at the same step, so they agree here, or all wait on.
            if not self._all_ranks(self.io.save_finished(pending.future)):
                return None
        elif not pending.future.done():
            return None
        return self._complete_pending()

    def wait(self) -> int | None:
        """Block until a background save is finalized; returns its step, else None."""
        if self._pending is None:
            return None
        return self._complete_pending()

    def _complete_pending(self) -> int:
        pending = self._pending
        assert pending is not None
        if self.io.collective_completion:
            # Every rank at once: the format's own completion, then each rank hashes its share
            # of the files (all written now) for rank 0, which finalizes when all have reported.
            self.io.complete(pending.future)  # raises if the save failed
            self._pending = None
            self._write_own_records(pending.tmp)
            if self.rank == 0:
                self._finalize(pending.step, pending.tmp, pending.extra)
            return pending.step
        result = pending.future.result()  # raises if the save failed
        del result
        self._pending = None
        # DCP's coordinator (rank 0) only finishes after every rank reported its writes, so
        # rank 0 may finalize alone; other ranks need not wait for it.
        if self.rank == 0:
            self._finalize(pending.step, pending.tmp, pending.extra)
        return pending.step

    def _gather_records(self, tmp: Path) -> dict[str, FileRecord]:
        """Every rank's file records (rank 0). A background save's digests may trail its
        completion by the hashing time: wait for them, bounded."""
        deadline = time.monotonic() + CHECKSUM_WAIT_SECONDS
        records: dict[str, FileRecord] = {}
        for rank in range(self.world_size):
            path = tmp / CHECKSUM_DIR / f"rank_{rank}.json"
            while not path.is_file():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"checkpoint {tmp.name}: rank {rank} never reported the "
                                       f"digests of its files within {CHECKSUM_WAIT_SECONDS} s")
                time.sleep(0.02)
            body = json.loads(path.read_text())
            if "error" in body:
                raise RuntimeError(f"checkpoint {tmp.name}: rank {rank} could not hash its "
                                   f"files: {body['error']}")
            records.update(parse_manifest({"version": MANIFEST_VERSION, **body}))
        return records

    def _finalize(self, step: int, tmp: Path, extra: dict[str, Any]) -> None:
        trainer_state = {
            **extra,
            **self.io.describe(),
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "saved_at": time.time(),
            "torch_version": torch.__version__,
        }
        _write_durable(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2, sort_keys=True))
        records = self._gather_records(tmp)
        for rel in sorted(checkpoint_files(tmp) - set(records)):
            records[rel] = file_record(tmp / rel, self.checksums)  # .metadata, trainer state
        manifest = {"version": MANIFEST_VERSION, "files": _records_json(records)}
        _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        shutil.rmtree(tmp / CHECKSUM_DIR, ignore_errors=True)
        if self.before_done is not None:
            self.before_done(step)  # fault injection: die with shards written, no `done`
        _write_durable(tmp / protocol.CHECKPOINT_DONE_MARKER, f"{step}\n")
        _fsync_path(tmp)
        final = self.root / step_dir_name(step)
        if final.exists():
            # Only reachable after an explicit resume from an older step moved nothing aside
            # (same step); replace it so the newest timeline wins, and say so.
            self.log(f"checkpoint: replacing existing {final.name}")
            trash = self.root / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        _fsync_path(self.root)
        self._cleanup()

    # -- check and load ---------------------------------------------------------------------------

    def read_trainer_state(self, step: int) -> dict[str, Any]:
        """step_N's trainer state; CheckpointError when it belongs to another model."""
        path = self.root / step_dir_name(step)
        state = _read_json(path, TRAINER_STATE)
        if not isinstance(state, dict):
            raise CheckpointCorruptError(f"checkpoint {path}: {TRAINER_STATE} is not an object")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written for a different model (fingerprint "
                f"{state.get('fingerprint')}, this job {self.fingerprint}: architecture or "
                "seqLength changed); use a new checkpoint.dir or restore the original model spec"
            )
        return state

    def check(self, path: Path, step: int) -> list[str]:
        """What is wrong with the checkpoint at `path`, agreed by all ranks ([] = intact).

        Raises CheckpointError (a user error, not damage) when it is another model's."""
        problems: list[str] = []
        try:
            state = _read_json(path, TRAINER_STATE)
        except CheckpointCorruptError as exc:
            problems.append(f"{TRAINER_STATE} cannot be read ({_cause(exc)})")
        else:
            problems += trainer_state_problems(state, step)
            if not problems and state.get("fingerprint") != self.fingerprint:
                self.read_trainer_state(step)  # raises the user-facing error
            if not problems and (refusal := self.io.refusal(state)):
                raise CheckpointError(f"checkpoint {path} cannot be loaded by this run: {refusal}")
        try:
            manifest = parse_manifest(_read_json(path, MANIFEST))
        except (CheckpointCorruptError, ValueError) as exc:
            problems.append(f"{MANIFEST} cannot be read ({_cause(exc)})")
        else:
            problems += listing_problems(manifest, checkpoint_files(path))
            if not problems:
                problems += self.io.problems(set(manifest))
                # Each rank re-hashes a share of the files; sizes are checked on the way.
                share = sorted(manifest.items())[self.rank :: max(self.world_size, 1)]
                problems += [p for rel, rec in share if (p := file_problem(path, rel, rec))]
        return self._agree(problems)

    def _agree(self, problems: list[str]) -> list[str]:
        """The union of every rank's problems, in order, on every rank."""
        if not _is_dist():
            return problems
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems, group=self._side_group)
        seen: dict[str, None] = {}
        for part in gathered:
            for p in part or []:
                seen.setdefault(p, None)
        return list(seen)

    def verify(self, step: int) -> dict[str, Any]:
        """Check that step_N exists, is complete, fits this job and is intact; its trainer
        state. Read-only (export and explicit loads); training uses `restore`."""
        resolve_resume(step, scan(self.root)[0], self.root)
        path = self.root / step_dir_name(step)
        problems = self.check(path, step)
        if problems:
            raise CheckpointCorruptError(
                f"checkpoint {path} is damaged: {'; '.join(problems[:3])}. It was left in "
                "place: move it away or set checkpoint.resume to another step"
            )
        return self.read_trainer_state(step)

    def load(
        self,
        step: int,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> dict[str, Any]:
        """Verify and load step_N (no fallback, nothing moved); returns its trainer state."""
        self.verify(step)
        return self._load(self.root / step_dir_name(step), model_parts, optimizers)

    def _load(
        self,
        path: Path,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> dict[str, Any]:
        """Load a checked checkpoint; CheckpointCorruptError on every rank if any rank fails.

        The optimizers keep their own hyperparameters (learning rate, betas, eps, weight decay:
        this run's config) and take only their state (moments, step counts) from the checkpoint,
        so a resumed job with an edited optimizer spec follows the edit.
        """
        trainer_state = _read_json(path, TRAINER_STATE)
        try:
            loaded = self.io.read(path / STATE_DIR, model_parts, optimizers)
        except (Exception, dcp.CheckpointException) as exc:
            # DCP wraps per-rank failures in CheckpointException, a BaseException, on all ranks.
            raise CheckpointCorruptError(
                f"checkpoint {path}: cannot load the model/optimizer shards ({_first_line(exc)})"
            ) from exc
        rng: dict[str, Any] | None = None
        problems: list[str] = []
        rng_file = path / RNG_DIR / f"rank_{self.rank}.pt"
        if trainer_state.get("world_size") == self.world_size and rng_file.is_file():
            try:
                rng = read_rng(rng_file)
            except CheckpointCorruptError as exc:
                problems.append(str(exc))
        problems = self._agree(problems)
        if problems:
            raise CheckpointCorruptError(f"checkpoint {path}: {problems[0]}")
        self.io.apply(loaded, model_parts, optimizers)
        if rng is not None:
            restore_rng(rng, self.io.set_device_rng_state)
        return trainer_state


def _first_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # CheckpointException: rank -> wrapped error
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = getattr(first, "exception", first)
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    return _first_line(exc.__cause__ or exc)


def _read_json(checkpoint: Path, name: str) -> Any:
    try:
        return json.loads((checkpoint / name).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {checkpoint}: cannot read {name} ({exc}); the checkpoint is damaged. "
            "It was left in place: move it away or set checkpoint.resume to another step"
        ) from exc
