"""Sharded checkpoints that survive crashes and allow a different layout on resume.

Layout of `checkpoint.dir`:

    step_N/
      state/              torch.distributed.checkpoint (DCP) files: model + optimizer, every rank
                          writes its own shards; DCP reshards on load, so a run saved on 2 FSDP
                          ranks can resume on 1 rank (or another TP/PP layout)
      rng/rank_R.pt       RNG states of each rank (restored only when the world size matches)
      trainer_state.json  step, consumed samples, scheduler, fingerprint, layout (rank 0)
      manifest.json       size of every file above, checked before loading (rank 0)
      done                written last (rank 0), after every rank finished its shards
    .tmp-step_N/          a save in progress; renamed to step_N once `done` is in it

A checkpoint is complete when it is named step_N and holds `done`. Only complete checkpoints are
loaded; rank 0 removes leftovers (tmp dirs, step dirs without `done`) on start and after each
save, and keeps the newest `keep` complete checkpoints. A complete checkpoint that cannot be read
back (truncated files) is reported and left in place for a human to inspect.

The decisions (what is complete, what to resume, what to prune) are pure functions over
`CheckpointEntry` lists; `CheckpointManager` is the I/O shell around them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
STATE_DIR = "state"
RNG_DIR = "rng"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(rf"^{re.escape(protocol.CHECKPOINT_PREFIX)}(\d+)$")

ResumeMode = str | int


# --- pure core -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    path: Path
    complete: bool


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
    """The step to load, None for a fresh start, or a clear error. Pure."""
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


def prune_plan(entries: Sequence[CheckpointEntry], keep: int) -> list[Path]:
    """Directories to delete: incomplete step dirs and complete ones beyond the newest `keep`."""
    complete = sorted((e for e in entries if e.complete), key=lambda e: e.step, reverse=True)
    doomed = [e.path for e in entries if not e.complete]
    doomed.extend(e.path for e in complete[keep:])
    return doomed


def later_than(entries: Sequence[CheckpointEntry], step: int) -> list[CheckpointEntry]:
    return [e for e in entries if e.complete and e.step > step]


def manifest_problems(root: Path, manifest: dict[str, int]) -> list[str]:
    """Files that are missing or whose size differs from the manifest."""
    problems = []
    for rel, size in sorted(manifest.items()):
        path = root / rel
        try:
            actual = path.stat().st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if actual != size:
            problems.append(f"{rel} has {actual} bytes, expected {size}")
    return problems


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


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, protocol.CHECKPOINT_DONE_MARKER)
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


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    extra: dict[str, Any]
    future: Any


class CheckpointManager:
    """Save, find, load and prune checkpoints for one training run (all ranks call it)."""

    def __init__(
        self,
        root: str | Path,
        *,
        keep: int,
        fingerprint: str,
        rank: int = 0,
        world_size: int = 1,
        async_save: bool = False,
        before_done: Callable[[int], None] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = Path(root)
        self.keep = keep
        self.fingerprint = fingerprint
        self.rank = rank
        self.world_size = world_size
        self.async_save = async_save
        self.before_done = before_done
        self.log = log
        self._pending: _PendingSave | None = None
        self._async_group: Any = None
        if async_save and _is_dist():
            # Background saves run collectives while training runs its own: give them a
            # separate gloo group so the two never interleave on one communicator.
            self._async_group = dist.new_group(backend="gloo")

    # -- start of a run -------------------------------------------------------------------

    def prepare(self) -> None:
        """Rank 0 creates the directory and removes leftovers of interrupted saves."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._cleanup()
        _barrier()

    def resolve(self, mode: ResumeMode) -> int | None:
        """The step to resume from (None: fresh start); read-only, so it may run before the
        process group exists."""
        return resolve_resume(mode, scan(self.root)[0], self.root)

    def set_aside_later(self, step: int) -> None:
        """After an explicit resume from `step`, move later checkpoints out of the way."""
        self._set_aside_later(scan(self.root)[0], step)

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
        _barrier()

    def latest_complete_step(self) -> int | None:
        newest = latest_complete(scan(self.root)[0])
        return newest.step if newest else None

    def _cleanup(self) -> None:
        entries, leftovers = scan(self.root)
        pending = self._pending.tmp if self._pending else None
        for path in leftovers:
            if path != pending:
                self.log(f"checkpoint: removing interrupted save {path.name}")
                shutil.rmtree(path, ignore_errors=True)
        for path in prune_plan(entries, self.keep):
            kind = "incomplete" if not (path / protocol.CHECKPOINT_DONE_MARKER).exists() else "old"
            self.log(f"checkpoint: removing {kind} checkpoint {path.name}")
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
        torch.save(capture_rng(), tmp / RNG_DIR / f"rank_{self.rank}.pt")
        state, _ = collect_state(model_parts, optimizers)
        extra = {**extra, "step": step}
        if self.async_save:
            with _single_process_ok():
                future = dcp.async_save(
                    state,
                    checkpoint_id=str(tmp / STATE_DIR),
                    process_group=self._async_group,
                    no_dist=not _is_dist(),
                )
            self._pending = _PendingSave(step, tmp, extra, future)
            return time.perf_counter() - started
        with _single_process_ok():
            dcp.save(state, checkpoint_id=str(tmp / STATE_DIR), no_dist=not _is_dist())
        _barrier()  # every rank's shards and RNG file are on disk
        if self.rank == 0:
            self._finalize(step, tmp, extra)
        _barrier()
        return time.perf_counter() - started

    def poll(self) -> int | None:
        """Finalize a finished background save (rank 0); returns its step, else None."""
        pending = self._pending
        if pending is None or not pending.future.done():
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
        result = pending.future.result()  # raises if the save failed
        del result
        self._pending = None
        # DCP's coordinator (rank 0) only finishes after every rank reported its writes, so
        # rank 0 may finalize alone; other ranks need not wait for it.
        if self.rank == 0:
            self._finalize(pending.step, pending.tmp, pending.extra)
        return pending.step

    def _finalize(self, step: int, tmp: Path, extra: dict[str, Any]) -> None:
        trainer_state = {
            **extra,
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "saved_at": time.time(),
            "torch_version": torch.__version__,
        }
        _write_durable(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2, sort_keys=True))
        _write_durable(tmp / MANIFEST, json.dumps(_file_sizes(tmp), indent=2, sort_keys=True))
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

    # -- load ---------------------------------------------------------------------------------

    def read_trainer_state(self, step: int) -> dict[str, Any]:
        path = self.root / step_dir_name(step)
        state = _read_json(path, TRAINER_STATE)
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written for a different model (fingerprint "
                f"{state.get('fingerprint')}, this job {self.fingerprint}: architecture or "
                "seqLength changed); use a new checkpoint.dir or restore the original model spec"
            )
        return state

    def verify(self, step: int) -> dict[str, Any]:
        """Check that step_N exists, is complete, fits this job and has all its bytes."""
        resolve_resume(step, scan(self.root)[0], self.root)
        trainer_state = self.read_trainer_state(step)
        self._check_manifest(self.root / step_dir_name(step))
        return trainer_state

    def load(
        self,
        step: int,
        model_parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
    ) -> dict[str, Any]:
        """Load step_N into the model parts and optimizers; returns its trainer state.

        The optimizers keep their own hyperparameters (learning rate, betas, eps, weight decay:
        this run's config) and take only their state (moments, step counts) from the checkpoint,
        so a resumed job with an edited optimizer spec follows the edit.
        """
        path = self.root / step_dir_name(step)
        trainer_state = self.verify(step)
        state, keys = collect_state(model_parts, optimizers)
        try:
            with _single_process_ok():
                dcp.load(state, checkpoint_id=str(path / STATE_DIR), no_dist=not _is_dist())
        except (Exception, dcp.CheckpointException) as exc:
            # DCP wraps per-rank failures in CheckpointException, a BaseException.
            raise CheckpointCorruptError(
                f"checkpoint {path}: cannot load the model/optimizer shards ({_first_line(exc)}). "
                "It was left in place: move it away or set checkpoint.resume to another step"
            ) from exc
        for part, opt, (model_keys, optim_keys) in zip(
            model_parts, optimizers, keys, strict=True
        ):
            settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=_OPTIONS)
            set_optimizer_state_dict(
                part, opt, {k: state["optim"][k] for k in optim_keys}, options=_OPTIONS
            )
            for group, own in zip(opt.param_groups, settings, strict=True):
                group.update(own)
        rng_file = path / RNG_DIR / f"rank_{self.rank}.pt"
        if trainer_state.get("world_size") == self.world_size and rng_file.is_file():
            restore_rng(torch.load(rng_file, weights_only=False))
        return trainer_state

    def _check_manifest(self, path: Path) -> None:
        manifest = _read_json(path, MANIFEST)
        problems = manifest_problems(path, manifest)
        if problems:
            raise CheckpointCorruptError(
                f"checkpoint {path} is damaged: {'; '.join(problems[:3])}. It was left in place: "
                "move it away or set checkpoint.resume to another step"
            )


def _first_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # CheckpointException: rank -> wrapped error
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = getattr(first, "exception", first)
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _read_json(checkpoint: Path, name: str) -> Any:
    try:
        return json.loads((checkpoint / name).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {checkpoint}: cannot read {name} ({exc}); the checkpoint is damaged. "
            "It was left in place: move it away or set checkpoint.resume to another step"
        ) from exc
