"""Fault injection for resilience tests and demos: kill the trainer at chosen points, once per job.

- kill at step N: right after step N has fully completed (logged, metrics set and, when N is a
  checkpoint step, its checkpoint saved), rank 0 kills itself with SIGKILL: no cleanup, no
  flush, as a node loss would. torchrun then tears down the other ranks.
- NaN at step N: just before step N, rank 0 overwrites its own parameters with NaN (as a
  faulty device or a bit flip would), so step N's loss is NaN on every rank and the divergence
  handling is exercised end to end. The process is not killed.
- kill during checkpoint: rank 0 kills itself in the middle of a checkpoint write, after every
  rank's shards are on disk and before the `done` marker: the next write, or with a step N the
  first write at step N or later (so a complete checkpoint can exist before the torn one).

Each fault fires once per job: before dying, rank 0 records it in the CHAOS_MARKER file in the
checkpoint directory, which survives restarts, so the resumed run does not die again.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import protocol

KILL_AT_STEP = "killAtStep"
KILL_DURING_CHECKPOINT = "killDuringCheckpoint"
NAN_AT_STEP = "nanAtStep"


@dataclass(frozen=True)
class ChaosConfig:
    kill_at_step: int | None = None
    # None: off; 0: the next checkpoint write; N: the first write at step N or later.
    kill_during_checkpoint: int | None = None
    nan_at_step: int | None = None

    @property
    def enabled(self) -> bool:
        return any(
            v is not None for v in (self.kill_at_step, self.kill_during_checkpoint,
                                    self.nan_at_step)
        )


def parse_checkpoint_kill(raw: str) -> int | None:
    """Environment form: 1/true/yes = the next write, an integer N >= 2 = at step N or later."""
    raw = raw.strip().lower()
    if raw in {"1", "true", "yes"}:
        return 0
    return int(raw) if raw.isdigit() and int(raw) > 1 else None


def _step_from_env(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    return int(raw) if raw.isdigit() and 0 < int(raw) < 1 << 62 else None


def chaos_from(
    kill_at_step: int | None,
    kill_during_checkpoint: int | None,
    environ: Mapping[str, str],
    nan_at_step: int | None = None,
) -> ChaosConfig:
    """Command-line flags win; otherwise the environment (set by the operator or local runner)."""
    if kill_at_step is None:
        kill_at_step = _step_from_env(environ, protocol.CHAOS_KILL_AT_STEP_ENV)
    if kill_during_checkpoint is None:
        raw = environ.get(protocol.CHAOS_KILL_DURING_CHECKPOINT_ENV, "")
        kill_during_checkpoint = parse_checkpoint_kill(raw)
    if nan_at_step is None:
        nan_at_step = _step_from_env(environ, protocol.CHAOS_NAN_AT_STEP_ENV)
    return ChaosConfig(kill_at_step, kill_during_checkpoint, nan_at_step)


def read_fired(marker: Path) -> dict[str, object]:
    try:
        value = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class Chaos:
    """The rank-0 side of fault injection; on other ranks every hook does nothing."""

    def __init__(self, config: ChaosConfig, checkpoint_dir: str | Path, rank: int) -> None:
        self.config = config
        self.marker = Path(checkpoint_dir) / protocol.CHAOS_MARKER
        self.active = rank == 0 and config.enabled

    def _record(self, fault: str, detail: object) -> None:
        fired = read_fired(self.marker)
        fired[fault] = detail
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        with tmp.open("w") as handle:
            handle.write(json.dumps(fired, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.marker)

    def _fire(self, fault: str, detail: object) -> None:
        self._record(fault, detail)
        print(
            f"chaos: injecting {fault} ({detail}): SIGKILL to rank 0 (pid {os.getpid()})",
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int) -> None:
        if not self.active or self.config.kill_at_step != step:
            return
        if KILL_AT_STEP in read_fired(self.marker):
            return
        self._fire(KILL_AT_STEP, step)

    def before_checkpoint_done(self, step: int) -> None:
        threshold = self.config.kill_during_checkpoint
        if not self.active or threshold is None or step < threshold:
            return
        if KILL_DURING_CHECKPOINT in read_fired(self.marker):
            return
        self._fire(KILL_DURING_CHECKPOINT, step)

    def before_step(self, step: int, parameters: Iterable[Tensor]) -> None:
        """`step` is about to run (1-based)."""
        if not self.active or self.config.nan_at_step != step:
            return
        if NAN_AT_STEP in read_fired(self.marker):
            return
        self._record(NAN_AT_STEP, step)
        print(f"chaos: injecting NaN into rank 0's parameters before step {step}", flush=True)
        with torch.no_grad():
            for p in parameters:
                p.fill_(float("nan"))
